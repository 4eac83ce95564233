"""Long-context comparison: does the memory help beyond the window on real text? MAC, MAG, MAL, LMM, SWA
and full attention trained on 2,048-token byte sequences at equal parameters, tokens and window, per seed.

    python bench/compare_long.py                                   # configs/compare_long/*.yaml, seed 0
    python bench/compare_long.py --seeds 0,1,2                     # runs/compare_long/<variant>-s<seed>
    python bench/compare_long.py --variants mac,swa --steps 50 train.threads=2
    python bench/compare_long.py --eval-only --seeds 0,1,2         # evaluate existing runs again

Every variant's config (`configs/compare_long/<variant>.yaml`) has the same data (the embedded standard
library corpus in 2,049-token samples, one MQAR row mixed into each batch), batch, sequence length, steps,
optimiser and attention span (SWA / MAG / MAL window = MAC segment = 64); `full` attends over the whole
training sequence. `model.ffn_hidden` is set per variant to match the parameter counts
(`compare_variants.matched_ffn`). Each seed sets `train.seed` (initial weights) and `data.seed` (data
order and synthetic rows), the same for every variant. After training, each run is evaluated
(`pretrain.evaluate`): validation loss by position inside long documents, up to 4× the training length
(fed in pieces through the exact streaming cache), and MQAR accuracy at 2×, 8×, 32× the window; per run
in `<run>/eval/compare_long.{json,md}` and its TensorBoard. `--tasks ...,text_recall` adds the gain on a
validation passage read again 2×, 8×, 32× the window later (`pretrain/text_recall.py`: zero for SWA);
`--eval-only` adds the tasks it runs to each run's earlier results of the same checkpoint. The summary
(mean and min–max over seeds per variant) is printed and written to `--out` (.md, .json, and .png: loss
against position, one line per variant, the seeds' range shaded).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from compare_variants import (  # noqa: E402
    add_variant_arguments,
    load_variants,
    run_overrides,
    train_run,
    variant_names,
)

from pretrain import loss_by_position  # noqa: E402
from pretrain.config import ConfigError, RunConfig  # noqa: E402
from pretrain.evaluate import (  # noqa: E402
    add_task_arguments,
    evaluate,
    parse_list,
    run_mqar_pairs,
    to_markdown,
    write_tensorboard,
)
from pretrain.synthetic import MQAR_TRAINING_PAIRS  # noqa: E402
from titans.model import num_parameters  # noqa: E402

VARIANTS = ("mac", "mag", "mal", "lmm", "swa", "full")
REGION_NAMES = {"inside_span": "loss < window", "span_to_train": "loss window–train len",
                "beyond_train": "loss > train len", "repeats_to_train": "far repeats < train len",
                "repeats_beyond_train": "far repeats > train len"}


def seed_configs(names: list[str], config_dir: Path, overrides: list[str], match: bool, target: int | None,
                 seed: int, runs: str | None) -> dict[str, RunConfig]:
    """The variants' configs for one seed, each training into `<runs>/<variant>-s<seed>` (default
    `<runs>`: the folder above the config's train.out_dir)."""
    seeded = [*overrides, f"train.seed={seed}", f"data.seed={seed}"]
    configs = load_variants(names, config_dir, seeded, match, target)
    for name, cfg in configs.items():
        folder = Path(runs) if runs else Path(cfg.train.out_dir).parent
        cfg.train.out_dir = str(folder / f"{name}-s{seed}")
    return configs


def train_and_evaluate(name: str, seed: int, cfg: RunConfig, args: argparse.Namespace) -> dict[str, Any]:
    """One run: train (unless --eval-only), evaluate, write the run's own results; returns its row."""
    from pretrain.model_io import load_model

    started = time.perf_counter()
    result = None if args.eval_only else train_run(cfg, args.fresh)
    seconds = time.perf_counter() - started
    model = load_model(cfg.train.out_dir)
    started = time.perf_counter()
    results = evaluate(model, parse_list(args.tasks), parse_list(args.distances, float),
                       samples=args.samples, n_pairs=args.pairs or run_mqar_pairs(cfg.to_dict()),
                       max_position=args.max_position,
                       max_documents=args.documents or None, min_doc_len=args.min_doc_len,
                       span=cfg.model.window,  # one unit for all: full attention's own span is its length
                       passage=args.passage,
                       log=lambda m: print(f"   {m}", file=sys.stderr))
    eval_seconds = time.perf_counter() - started
    out = Path(cfg.train.out_dir) / "eval" / "compare_long.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    # --eval-only adds the tasks asked to the same checkpoint's earlier results instead of dropping them
    earlier = json.loads(out.read_text()) if args.eval_only and out.exists() else {}
    results = {**(earlier if earlier.get("step") == model.step else {}), **results, "step": model.step}
    out.write_text(json.dumps(results, indent=2) + "\n")
    out.with_suffix(".md").write_text(to_markdown({"checkpoint": str(model.path), "step": model.step,
                                                   **results}))
    write_tensorboard(results, Path(cfg.train.out_dir) / "tensorboard" / "eval", model.step or 0)
    losses = [x for x in (result.losses[-10:] if result else []) if x == x]
    steps = result.step_seconds if result else []
    return {"variant": name, "seed": seed, "params": num_parameters(cfg.model),
            "ffn_hidden": cfg.model.ffn_hidden, "step": model.step,
            "tokens": text_tokens(cfg, model.step or 0),
            "train_loss": sum(losses) / len(losses) if losses else None, "train_seconds": seconds,
            "step_seconds": sum(steps) / len(steps) if steps else None, "eval_seconds": eval_seconds,
            "out_dir": cfg.train.out_dir, "eval": results}


def text_tokens(cfg: RunConfig, step: int) -> int:
    """The text tokens fed by `step`: the curriculum's first data.synthetic_alone_steps feed no text."""
    text_steps = max(0, step - cfg.data.synthetic_alone_steps)
    return cfg.data.batch_size * cfg.data.seq_len * cfg.train.grad_accum * text_steps


# ------------------------------------------------------------------------------------------ summary


def spread(values: list[float | None]) -> dict[str, float] | None:
    """Mean, min and max of the values present (None where a run has none)."""
    present = [v for v in values if v is not None]
    if not present:
        return None
    return {"mean": sum(present) / len(present), "min": min(present), "max": max(present), "n": len(present)}


def cell(s: dict[str, float] | None, digits: int = 4) -> str:
    if s is None:
        return "-"
    if s["n"] == 1:
        return f"{s['mean']:.{digits}f}"
    return f"{s['mean']:.{digits}f} ({s['min']:.{digits}f}–{s['max']:.{digits}f})"


def common_span(rows: list[dict[str, Any]]) -> int | None:
    """The window shared by the variants, so that every variant's loss regions use the same boundaries:
    the span each run was evaluated at (the configs' window), not its own attention span (full attention's
    is its training length, which would set the boundaries when it is compared alone)."""
    spans = [r["eval"].get("attention_span") or r["eval"]["loss_by_position"]["attention_span"]
             for r in rows if "loss_by_position" in r["eval"]]
    return min(spans) if spans else None


def summarise(rows: list[dict[str, Any]], distances: list[float]) -> dict[str, dict[str, Any]]:
    """Per variant: mean and min–max over its seeds of the train loss, loss regions (relative to the
    common window), per-bucket loss and MQAR accuracy; and the seed-averaged curve for the plot."""
    summary: dict[str, dict[str, Any]] = {}
    window = common_span(rows)
    for name in dict.fromkeys(r["variant"] for r in rows):
        runs = [r for r in rows if r["variant"] == name]
        lbps = [r["eval"]["loss_by_position"] for r in runs if "loss_by_position" in r["eval"]]
        s: dict[str, Any] = {"seeds": [r["seed"] for r in runs], "params": runs[0]["params"],
                             "tokens": runs[0]["tokens"],
                             "train_loss": spread([r["train_loss"] for r in runs]),
                             "train_seconds": spread([r["train_seconds"] for r in runs]),
                             "step_seconds": spread([r["step_seconds"] for r in runs])}
        for task, key in (("mqar", "accuracy"), ("text_recall", "gain")):
            if task in runs[0]["eval"]:
                s[task] = {f"{d:g}": spread([r["eval"][task].get(f"{d:g}", {}).get(key) for r in runs])
                           for d in distances}
        if lbps:
            per_run = [loss_by_position.regions(lbp, window) for lbp in lbps]
            s["regions"] = {k: spread([p[k] for p in per_run]) for k in loss_by_position.REGIONS}
            buckets = []
            for i, b in enumerate(lbps[0]["buckets"]):
                stats = spread([lbp["buckets"][i]["loss"] for lbp in lbps])
                buckets.append({**b, "span": loss_by_position.relation(b["start"], b["end"], window),
                                "loss": stats and stats["mean"], "stats": stats,
                                "repeat_stats": spread([r["buckets"][i].get("repeat_loss") for r in lbps]),
                                **({"loss_min": stats["min"], "loss_max": stats["max"]} if stats else {})})
            s["loss_by_position"] = {**lbps[0], "buckets": buckets, "window": window}
        summary[name] = s
    return summary


def markdown(summary: dict[str, dict[str, Any]], distances: list[float]) -> str:
    """The summary table (one row per variant) and the per-bucket loss table (one column per variant)."""
    seeds = max(len(s["seeds"]) for s in summary.values())
    note = f"Mean over {seeds} seeds, (min–max) in brackets." if seeds > 1 else "One seed."
    recall = distances if any("text_recall" in s for s in summary.values()) else []
    # text tokens: data.batch_size × seq_len × the steps that fed text (the synthetic sequences come on top)
    head = ["variant", "params", "text tokens", "seeds", "train loss (last 10)", *REGION_NAMES.values(),
            *(f"mqar {d:g}×" for d in distances), *(f"recall gain {d:g}×" for d in recall),
            "s / step", "train s"]
    lines = [note, "", "| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for name, s in summary.items():
        regions = s.get("regions", {})
        cells = [name, f"{s['params']:,}", f"{s['tokens']:,}", ",".join(map(str, s["seeds"])),
                 cell(s["train_loss"]), *(cell(regions.get(k)) for k in REGION_NAMES),
                 *(cell(s.get("mqar", {}).get(f"{d:g}"), 3) for d in distances),
                 *(cell(s.get("text_recall", {}).get(f"{d:g}")) for d in recall),
                 cell(s["step_seconds"], 2), cell(s["train_seconds"], 0)]
        lines.append("| " + " | ".join(cells) + " |")
    curves = {name: s["loss_by_position"] for name, s in summary.items() if "loss_by_position" in s}
    if curves:
        first = next(iter(curves.values()))
        lines += ["", f"Validation loss by position in the document (window {first['window']}, training "
                  f"length {first['train_len']}; {first['documents']} documents, each fed whole through the "
                  "exact streaming state).",
                  "", "| positions | " + " | ".join(curves) + " |", "|---|" + "---:|" * len(curves)]
        for i, b in enumerate(first["buckets"]):
            cells = [cell(c["buckets"][i]["stats"]) for c in curves.values()]
            lines.append(f"| [{b['start']}, {b['end']}) ({b['span']}) | " + " | ".join(cells) + " |")
        lines += ["", "The same, on the far repeats only (their preceding "
                  f"{first.get('repeat_context')} tokens last seen, followed by the same token, more than "
                  f"{first.get('repeat_span')} tokens back).",
                  "", "| positions | far repeats | " + " | ".join(curves) + " |",
                  "|---|" + "---:|" * (len(curves) + 1)]
        for i, b in enumerate(first["buckets"]):
            cells = [cell(c["buckets"][i].get("repeat_stats")) for c in curves.values()]
            lines.append(f"| [{b['start']}, {b['end']}) | {b.get('repeat_tokens', 0):,} | "
                         + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/compare_long.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_variant_arguments(parser, VARIANTS, ROOT / "configs" / "compare_long",
                          "train into <runs>/<variant>-s<seed> (default: the folder above each config's "
                          "train.out_dir)")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds: each variant runs once per seed")
    add_task_arguments(parser)
    parser.set_defaults(tasks="loss_by_position,mqar")
    parser.add_argument("--pairs", type=int, default=None,
                        help="key-value pairs per MQAR sequence (default: those of the run's validation "
                             f"curves, train.eval_task_pairs or data.synthetic_pairs, {MQAR_TRAINING_PAIRS} "
                             "unless set)")
    parser.add_argument("--documents", type=int, default=loss_by_position.MAX_DOCUMENTS,
                        help="loss_by_position: most validation documents (0: all)")
    parser.add_argument("--max-position", type=int, default=None,
                        help="loss_by_position: positions up to this (default 4× the training length)")
    parser.add_argument("--min-doc-len", type=int, default=0,
                        help="loss_by_position: skip documents shorter than this")
    parser.add_argument("--passage", type=int, default=None,
                        help="text_recall: passage length in tokens (default: the window)")
    parser.add_argument("--out", default="runs/compare_long/results.md",
                        help="Markdown summary (.json and .png beside)")
    parser.add_argument("overrides", nargs="*", help="section.key=value applied to every variant")
    args = parser.parse_intermixed_args(argv)  # overrides may come before or after the options

    names = variant_names(parser, args.variants, VARIANTS)
    try:
        seeds = parse_list(args.seeds, int)
        distances = parse_list(args.distances, float)
    except ValueError:
        parser.error(f"--seeds / --distances: expected comma-separated numbers, got {args.seeds!r} / "
                     f"{args.distances!r}")
    overrides = list(args.overrides) + run_overrides(args.steps)
    try:
        plan = [(seed, seed_configs(names, Path(args.configs), overrides, not args.no_match, args.params,
                                    seed, args.runs)) for seed in seeds]
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2

    rows = []
    for seed, configs in plan:
        for name, cfg in configs.items():
            print(f"== {name}, seed {seed}: {num_parameters(cfg.model):,} parameters (ffn_hidden "
                  f"{cfg.model.ffn_hidden}), out {cfg.train.out_dir}", file=sys.stderr)
            rows.append(train_and_evaluate(name, seed, cfg, args))
    summary = summarise(rows, distances)
    table = markdown(summary, distances)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table)
    out.with_suffix(".json").write_text(json.dumps({"summary": summary, "runs": rows}, indent=2) + "\n")
    curves = {f"{name} ({len(s['seeds'])} seed{'s' * (len(s['seeds']) > 1)})": s["loss_by_position"]
              for name, s in summary.items() if "loss_by_position" in s}
    if curves:
        loss_by_position.plot_loss_by_position(curves, out.with_suffix(".png"),
                                               "validation loss by position (mean over seeds)")
    print(table)
    print(f"written: {out}, {out.with_suffix('.json')}" + (f", {out.with_suffix('.png')}" if curves else ""),
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
