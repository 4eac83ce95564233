"""pretrain.harness: requests scored per second, one at a time against right-padded batches, beside
lm-evaluation-harness's own `hf` model on the Hugging Face export of the same weights; with `--generate`,
generation requests (`generate_until`) one at a time against left-padded batches.

    python bench/harness_batch.py          # tiny config, 128 requests, batch 1 / 8 / 32; hf 1 / 8
    python bench/harness_batch.py --requests 256 --batch-sizes 1 16 --layers mac
    python bench/harness_batch.py --generate --requests 32 --batch-sizes 1 8 32
    python bench/harness_batch.py --generate --requests 32 --batch-sizes 1 8 32 --distinct-lengths 4

A multiple-choice task's shape: each request a context of 64–512 tokens and a continuation of 4–32,
random lengths from a fixed seed. The model (random weights: speed does not depend on them) is exported
and loaded as the harness loads any export; every batch size, ours and the `hf` model's (its default is
batch 1), scores the same requests in the same process, and the log-likelihoods are checked equal to the
first row's before any time is printed. Generation: prompts of 16–256 random printable characters (or of
`--distinct-lengths` lengths only), 32 new tokens each, greedy; the texts are checked equal to the first
row's. A padded batch runs its rows of one prompt length together and each other length apart (the
memory's chunks count positions from a row's start), so only prompts that share lengths gain.
"""

from __future__ import annotations

import argparse
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--hf-batch-sizes", type=int, nargs="*", default=[1, 8],
                        help="lm_eval's hf model on the export (1: its default)")
    parser.add_argument("--layers", default=None, help="model.layers (default: tiny.yaml's)")
    parser.add_argument("--generate", action="store_true", help="time generate_until instead of scoring")
    parser.add_argument("--distinct-lengths", type=int, default=0,
                        help="with --generate: prompts of this many lengths only (0: any of 16–256)")
    args = parser.parse_args()
    from lm_eval.models.huggingface import HFLM

    from pretrain.harness import TitansHarnessLM
    from pretrain.hf_export import export_hf
    from titans.model import TitansConfig, TitansLM

    fields = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())["model"]
    cfg = TitansConfig(**{**fields, **({"layers": args.layers} if args.layers else {})})
    rng = random.Random(0)
    if args.generate:
        from lm_eval.api.instance import Instance

        alphabet = "abcdefghijklmnopqrstuvwxyz (){}:=\n"
        lengths = [rng.randint(16, 256) for _ in range(args.distinct_lengths)]
        texts = ["".join(rng.choices(alphabet, k=rng.choice(lengths) if lengths else rng.randint(16, 256)))
                 for _ in range(args.requests)]
        requests = [Instance("generate_until", {}, (text, {"until": ["\x00"], "max_gen_toks": 32}), i)
                    for i, text in enumerate(texts)]
        tokens = 32 * args.requests  # generated
    else:
        requests = [(("", ""), [rng.randrange(256) for _ in range(rng.randint(64, 512))],
                     [rng.randrange(256) for _ in range(rng.randint(4, 32))]) for _ in range(args.requests)]
        tokens = sum(len(c) + len(x) for _, c, x in requests)
    rows, baseline = [], None
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        export_hf(TitansLM(cfg).state_dict(), cfg, Path(tmp) / "hf", None, 256)
        models = [(f"pretrain.harness, batch {b}", b, lambda b=b: TitansHarnessLM(
            str(Path(tmp) / "hf"), tokenizer="bytes", batch_size=b)) for b in args.batch_sizes]
        models += [(f"lm_eval hf (export), batch {b}", b, lambda b=b: HFLM(
            pretrained=str(Path(tmp) / "hf"), trust_remote_code=True, batch_size=b, device="cpu"))
            for b in args.hf_batch_sizes]
        for name, batch_size, build in models:
            lm = build()
            run = (lambda some, lm=lm: lm.generate_until(some, disable_tqdm=True)) if args.generate else (
                lambda some, lm=lm: lm._loglikelihood_tokens(some, disable_tqdm=True))
            run(requests[:batch_size])  # warm-up
            started = time.perf_counter()
            scores = run(requests)
            seconds = time.perf_counter() - started
            baseline = baseline or (seconds, scores)
            if args.generate:
                worst = sum(a != b for a, b in zip(scores, baseline[1], strict=True)) / len(scores)
            else:
                worst = max(abs(a - b) / abs(b) for (a, _), (b, _) in zip(scores, baseline[1], strict=True))
            if worst > 1e-5:
                raise SystemExit(f"{name}: {'texts' if args.generate else 'log-likelihoods'} differ from the "
                                 f"first row's ({worst:.2e})")
            rows.append((name, args.requests / seconds, tokens / seconds, baseline[0] / seconds, worst))
            print(f"{name}: {seconds:.1f} s", file=sys.stderr, flush=True)
    print(f"\nMachine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; "
          f"model tiny.yaml ({cfg.layers}), {args.requests} requests, {tokens:,} tokens"
          + (" generated" if args.generate else ""))
    what, differ = (("generator", "share of texts unlike the first row's") if args.generate else
                    ("scorer", "max relative difference"))
    print(f"\n| {what} | requests/s | tokens/s | vs the first row | {differ} |")
    print("|---|---:|---:|---:|---:|")
    for name, per_s, tokens_per_s, ratio, worst in rows:
        print(f"| {name} | {per_s:.1f} | {tokens_per_s:,.0f} | {ratio:.2f}× | {worst:.1e} |")


if __name__ == "__main__":
    main()
