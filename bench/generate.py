"""Streaming scoring and generation: tokens/s, cache size and peak memory as the context grows.

    python bench/generate.py                       # tiny config, 1K / 8K / 64K tokens of context
    python bench/generate.py --contexts 1024 8192 --new-tokens 64 --layers mac swa full
    python bench/generate.py --contexts 2048 --model dim=512 n_heads=8 window=512 memory_chunk=64
    python bench/generate.py --device cuda --contexts 8192 --model dim=1024 n_heads=16 window=1024

Each (model, context) runs in its own process so its peak resident memory is its own: the context is
scored in pieces through the streaming cache, then `--new-tokens` tokens are generated greedily. Full
causal attention is the reference: its cache (a KV cache) grows with the context; the Titans blocks'
should not. Weights are random (speed and memory do not depend on them).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def measure(layers: str, context: int, new_tokens: int, threads: int, model_fields: dict, device: str
            ) -> dict:
    """One run, in this process: scoring tokens/s, generation tokens/s, cache MiB, peak memory MiB (the
    process's resident memory on the CPU, the allocator's peak on a GPU, where the model runs in bf16)."""
    import torch

    from titans.model import TitansConfig, TitansLM
    from titans.streaming import stream_step

    torch.set_num_threads(threads)
    fields = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())["model"]
    model = TitansLM(TitansConfig(**{**fields, **model_fields, "layers": layers})).eval()
    cuda = device.startswith("cuda")
    model = model.to(device=device, dtype=torch.bfloat16 if cuda else None)
    tokens = torch.randint(0, 256, (1, context), device=device)

    def clock() -> float:
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    started, cache = clock(), None
    for piece in tokens.split(2048, dim=1):  # keep only the last piece's logits: memory is the cache's
        logits, cache = stream_step(model, piece, cache)
    score_s = clock() - started
    token = logits[:, -1:].argmax(-1)
    started = clock()
    with torch.no_grad():
        for _ in range(new_tokens):
            logits, cache = stream_step(model, token, cache)
            token = logits[:, -1:].argmax(-1)
    generate_s = clock() - started
    peak = (torch.cuda.max_memory_allocated() / 2**20 if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"layers": layers, "context": context, "score_tok_s": context / score_s,
            "generate_tok_s": new_tokens / generate_s, "cache_mib": cache.nbytes() / 2**20,
            "peak_mib": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", nargs="+", default=["mac", "mag", "mal", "lmm", "swa", "full"])
    parser.add_argument("--contexts", nargs="+", type=int, default=[1024, 8192, 65536])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu (float32), or cuda (bf16: flash attention)")
    parser.add_argument("--model", nargs="*", default=[], metavar="FIELD=VALUE",
                        help="model fields over configs/tiny.yaml's, e.g. dim=512 window=512")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one measurement, print JSON
    args = parser.parse_args()
    model_fields = {}
    for item in args.model:
        field, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--model takes FIELD=VALUE, got {item!r}")
        model_fields[field] = yaml.safe_load(value)
    if args.one:
        layers, context = args.one.split(":")
        print(json.dumps(measure(layers, int(context), args.new_tokens, args.threads, model_fields,
                                 args.device)))
        return
    over = f", model {' '.join(args.model)}" if args.model else ""
    where = f"{args.threads} threads" if args.device == "cpu" else f"{args.device}, bf16"
    print(f"tiny config (configs/tiny.yaml){over}, {args.new_tokens} new tokens, {where}")
    peak = "peak RSS MiB" if args.device == "cpu" else "peak GPU MiB"
    print(f"{'layers':>6} {'context':>8} {'score tok/s':>12} {'gen tok/s':>10} {'cache MiB':>10} {peak:>13}")
    for layers in args.layers:
        for context in args.contexts:
            done = subprocess.run([sys.executable, __file__, "--one", f"{layers}:{context}", "--new-tokens",
                                   str(args.new_tokens), "--threads", str(args.threads),
                                   "--device", args.device, "--model", *args.model],
                                  capture_output=True, text=True, cwd=ROOT)
            if done.returncode:
                print(f"{layers:>6} {context:>8} failed: {done.stderr.strip().splitlines()[-1]}")
                continue
            r = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"{layers:>6} {context:>8} {r['score_tok_s']:>12.0f} {r['generate_tok_s']:>10.1f} "
                  f"{r['cache_mib']:>10.2f} {r['peak_mib']:>13.0f}", flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
