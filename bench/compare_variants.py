"""Train MAC, MAG, MAL, LMM and the SWA baseline at equal parameters, tokens and window; compare them.

    python bench/compare_variants.py                                  # configs/compare/*.yaml, 300 steps
    python bench/compare_variants.py --variants mac,swa --steps 50 train.threads=2
    python bench/compare_variants.py --eval-only                      # evaluate existing runs again

Every variant's config (`configs/compare/<variant>.yaml`) has the same data, batch, sequence length,
steps, optimiser and attention span (SWA / MAG / MAL window = MAC segment). The variants differ in how
many parameters their token mixers have, so `model.ffn_hidden` is set per variant (a multiple of 8) to
bring every parameter count as close as possible to the largest one (`--params` sets the target;
`--no-match` keeps the configs' FFN). Then each is trained (`pretrain.train.train`) and evaluated
(`pretrain.evaluate`: validation perplexity, needle and MQAR accuracy at multiples of the span), and a
Markdown table is printed and written with the JSON results (`--out`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pretrain.config import ConfigError, RunConfig, load_config  # noqa: E402
from pretrain.evaluate import add_task_arguments, evaluate, parse_list  # noqa: E402
from titans.model import num_parameters  # noqa: E402

if TYPE_CHECKING:
    from pretrain.train import TrainResult

VARIANTS = ("mac", "mag", "mal", "lmm", "swa")


def matched_ffn(cfg: RunConfig, target: int, multiple: int = 8) -> tuple[int, int]:
    """The FFN width (a multiple of `multiple`) whose parameter count is closest to `target`."""
    import dataclasses

    def count(hidden: int) -> int:
        return num_parameters(dataclasses.replace(cfg.model, ffn_hidden=hidden))

    best = None
    for hidden in range(multiple, 16 * cfg.model.dim + 1, multiple):
        n = count(hidden)
        if best is None or abs(n - target) < abs(best[1] - target):
            best = (hidden, n)
        if n > target:
            break
    return best


def load_variants(names: list[str], config_dir: Path, overrides: list[str], match: bool,
                  target: int | None) -> dict[str, RunConfig]:
    configs = {name: load_config(config_dir / f"{name}.yaml", overrides) for name in names}
    if match:
        target = target or max(num_parameters(c.model) for c in configs.values())
        for name, cfg in configs.items():
            hidden, _ = matched_ffn(cfg, target)
            matched = [*overrides, f"model.ffn_hidden={hidden}"]
            configs[name] = load_config(config_dir / f"{name}.yaml", matched)
    return configs


def run_overrides(steps: int | None) -> list[str]:
    """--steps as config overrides, with a warmup, validation and checkpoint to match."""
    if not steps:
        return []
    return [f"train.steps={steps}", f"train.warmup_steps={min(20, steps // 10)}", f"train.eval_every={steps}",
            f"train.checkpoint_every={steps}"]


def train_run(cfg: RunConfig, fresh: bool) -> TrainResult:
    """Train (resuming what the run folder holds); with `fresh` (--fresh), its checkpoints and TensorBoard
    logs are removed first, so the run starts over."""
    from pretrain.train import train

    if fresh:
        for part in ("checkpoints", "tensorboard"):
            shutil.rmtree(Path(cfg.train.out_dir) / part, ignore_errors=True)
    return train(cfg)


def markdown(rows: list[dict], distances: list[float]) -> str:
    head = ["variant", "params", "train tokens", "train loss (last 10)", "val loss", "val ppl"]
    head += [f"needle {d:g}×" for d in distances] + [f"mqar {d:g}×" for d in distances] + ["train s"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for r in rows:
        e = r["eval"]
        ppl = e.get("ppl")
        cells = [r["variant"], f"{r['params']:,}", f"{r['tokens']:,}", f"{r['train_loss']:.4f}",
                 f"{ppl['loss']:.4f}" if ppl else "-", f"{ppl['ppl']:.2f}" if ppl else "-"]
        for task in ("needle", "mqar"):
            cells += [f"{e[task][f'{d:g}']['accuracy']:.3f}" if task in e else "-" for d in distances]
        cells.append(f"{r['train_seconds']:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def add_variant_arguments(parser: argparse.ArgumentParser, variants: tuple[str, ...], configs: Path,
                          runs_help: str) -> None:
    """The options every variant comparison shares: which variants, their configs, where they train, how
    long, parameter matching, resume and evaluate-only (also bench/compare_long.py)."""
    parser.add_argument("--variants", default=",".join(variants), help="comma-separated subset of "
                        + ",".join(variants))
    parser.add_argument("--configs", default=str(configs), help="folder of <variant>.yaml")
    parser.add_argument("--runs", default=None, help=runs_help)
    parser.add_argument("--steps", type=int, default=None, help="override train.steps for every variant")
    parser.add_argument("--params", type=int, default=None, help="parameter target (default: the largest)")
    parser.add_argument("--no-match", action="store_true", help="keep the configs' FFN widths")
    parser.add_argument("--fresh", action="store_true",
                        help="start every run over: remove its checkpoints and TensorBoard logs first")
    parser.add_argument("--eval-only", action="store_true", help="skip training; evaluate the existing runs")


def variant_names(parser: argparse.ArgumentParser, text: str, variants: tuple[str, ...]) -> list[str]:
    """--variants as a list; an unknown name is a usage error naming the choices."""
    names = [v for v in text.split(",") if v]
    unknown = [v for v in names if v not in variants]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(variants)}")
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/compare_variants.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_variant_arguments(parser, VARIANTS, ROOT / "configs" / "compare",
                          "train into <runs>/<variant> (default: each config's train.out_dir)")
    add_task_arguments(parser)
    parser.add_argument("--out", default="runs/compare/results.md", help="Markdown table (and .json beside)")
    parser.add_argument("overrides", nargs="*", help="section.key=value applied to every variant")
    args = parser.parse_intermixed_args(argv)  # overrides may come before or after the options

    names = variant_names(parser, args.variants, VARIANTS)
    overrides = list(args.overrides) + run_overrides(args.steps)
    try:
        configs = load_variants(names, Path(args.configs), overrides, not args.no_match, args.params)
        if args.runs:
            for name, cfg in configs.items():
                cfg.train.out_dir = str(Path(args.runs) / name)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2

    from pretrain.model_io import load_model

    distances = parse_list(args.distances, float)
    tasks = parse_list(args.tasks)
    rows = []
    for name, cfg in configs.items():
        params = num_parameters(cfg.model)
        print(f"== {name}: {params:,} parameters (ffn_hidden {cfg.model.ffn_hidden}), "
              f"out {cfg.train.out_dir}", file=sys.stderr)
        started = time.perf_counter()
        losses = [] if args.eval_only else train_run(cfg, args.fresh).losses
        seconds = time.perf_counter() - started
        model = load_model(cfg.train.out_dir)
        results = evaluate(model, tasks, distances, samples=args.samples,
                           log=lambda m: print(f"   {m}", file=sys.stderr))
        tokens = cfg.data.batch_size * cfg.data.seq_len * cfg.train.grad_accum * (model.step or 0)
        finite = [x for x in losses[-10:] if x == x]
        rows.append({"variant": name, "params": params, "ffn_hidden": cfg.model.ffn_hidden, "tokens": tokens,
                     "train_loss": sum(finite) / len(finite) if finite else float("nan"),
                     "train_seconds": seconds, "step": model.step, "eval": results})
    table = markdown(rows, distances)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
    print(table)
    print(f"written: {out} and {out.with_suffix('.json')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
