"""What `train.compile` costs and gains on a run's model and sequence: the first training step (which
compiles) and the steady step time, eager against compiled, in one process with the same weights.

Why: a compiled step pays off only after the compile is repaid, and a MAC block compiled whole unrolls its
segment loop, so its compile time grows with the segments per sequence. `train.compile` compiles MAC
blocks whole up to `MAX_WHOLE_MAC_SEGMENTS` segments per sequence and by segment step beyond
(parallel/compile.py). The compiled row is by segment step; `--whole-mac` adds a row compiling MAC blocks
whole, whatever the length.

    python bench/compile_time.py --config configs/compare_long/mac.yaml                 # research recipe
    python bench/compile_time.py --config configs/tiny.yaml --whole-mac --threads 2     # default run
    python bench/compile_time.py --seq 512 --whole-mac --backend aot_eager             # tracing only

Inductor's compile cache lives in a fresh temporary folder unless `--warm-cache`, so the first step
includes code generation, as on a machine that never compiled this model. Rows run one after another
(first steps), then their steady steps alternate round by round (medians), as in model_throughput.py.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs/compare_long/mac.yaml"),
                   help="a training config: its model, seq_len and batch_size (default: the research recipe)")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (default: the config's)")
    p.add_argument("--batch", type=int, default=None, help="sequences per step (default: the config's)")
    p.add_argument("--backend", default="inductor", help="torch.compile backend (default: inductor)")
    p.add_argument("--whole-mac", action="store_true", help="also a row compiling MAC blocks whole")
    p.add_argument("--steps", type=int, default=5, help="steady steps per row, after one warm-up (default 5)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--warm-cache", action="store_true", help="keep inductor's usual compile cache")
    args = p.parse_args()
    if not args.warm_cache:  # before inductor is imported: it reads the folder then
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="titans-compile-time-")

    import torch
    from model_throughput import git_revision

    from parallel.compile import MAX_WHOLE_MAC_SEGMENTS, compile_blocks, compiles_mac_whole
    from pretrain.config import load_config
    from pretrain.loss import causal_lm_loss
    from titans.blocks import MACBlock
    from titans.model import TitansLM

    torch.set_num_threads(args.threads)
    run = load_config(args.config)
    seq, batch = args.seq or run.data.seq_len, args.batch or run.data.batch_size
    torch.manual_seed(0)
    eager = TitansLM(run.model)
    tokens = torch.randint(0, run.model.vocab_size, (batch, seq + 1))

    def compiled(whole_mac: bool) -> TitansLM:
        """A copy of the eager model, compiled. A one-segment length compiles MAC whole; none, by step."""
        model = TitansLM(run.model)
        model.load_state_dict(eager.state_dict())
        compile_blocks(model, args.backend, run.model.segment_len if whole_mac else None)
        return model

    has_mac = any(isinstance(b, MACBlock) for b in eager.blocks.values())
    rows = {"eager": eager, f"compiled, MAC by segment step ({args.backend})": compiled(False)}
    if args.whole_mac and has_mac:
        rows[f"compiled, MAC blocks whole ({args.backend})"] = compiled(True)

    def step(model: TitansLM) -> float:
        start = time.perf_counter()
        causal_lm_loss(model, tokens[:, :-1], tokens[:, 1:]).backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    print(f"# {args.config}: layers {run.model.layers}, dim {run.model.dim}, {run.model.n_layers} layers, "
          f"batch {batch} × {seq} tokens, {args.threads} thread(s), torch {torch.__version__}, commit "
          f"{git_revision()}, {'warm' if args.warm_cache else 'cold'} compile cache", flush=True)
    if has_mac:
        how = "whole" if compiles_mac_whole(run.model, seq) else "by segment step"
        print(f"# {-(-seq // run.model.segment_len)} MAC segments per sequence: train.compile compiles MAC "
              f"blocks {how} (whole up to {MAX_WHOLE_MAC_SEGMENTS})", flush=True)
    first = {}
    for name, model in rows.items():
        first[name] = step(model)
        print(f"#   {name}: first step {first[name]:.1f} s", flush=True)
        step(model)  # a second shape-identical step: any recompile shows here, not in the medians
    times: dict[str, list[float]] = {name: [] for name in rows}
    for _ in range(args.steps):
        for name, model in rows.items():
            times[name].append(step(model))
    base = statistics.median(times["eager"])
    print("| model | first step s | steady step s | × eager step | steps to repay the compile |")
    print("|---|---:|---:|---:|---:|")
    for name in rows:
        median = statistics.median(times[name])
        saved = base - median
        repay = "-" if name == "eager" else (f"{(first[name] - base) / saved:,.0f}" if saved > 0 else "never")
        print(f"| {name} | {first[name]:.1f} | {median:.3f} | {median / base:.2f} | {repay} |")


if __name__ == "__main__":
    main()
