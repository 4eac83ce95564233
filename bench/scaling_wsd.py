"""A scaling sweep three ways: cosine schedules, warmup-stable-decay (WSD) runs each from scratch, and WSD
with every smaller budget a cooldown forked from its size's largest run (what pretrain.scaling does under
WSD). Prints each run's final validation loss, each sweep's fit, the tokens it trained and its CPU time.

    python bench/scaling_wsd.py                                   # tiny family, 100/200/400 steps
    python bench/scaling_wsd.py --tokens 51200,153600 --jobs 1

The forked cooldowns must give the from-scratch WSD losses exactly (bitwise on CPU); the question the
table answers is what they cost, and how the WSD fit compares with the cosine one.
"""

from __future__ import annotations

import argparse
import csv
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pretrain.scaling import Run  # noqa: E402

SWEEPS = {  # name → extra arguments of pretrain.scaling
    "cosine": [],
    "wsd alone": ["--independent", "train.lr_decay=sqrt", "train.lr_decay_fraction=0.2"],
    "wsd forked": ["train.lr_decay=sqrt", "train.lr_decay_fraction=0.2"],
}


def run_sweep(family: Path, out: Path, extra: list[str], jobs: int) -> dict:
    """One sweep through pretrain.scaling; its per-run losses, fit, tokens trained, CPU and wall time."""
    before, started = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    command = [sys.executable, "-m", "pretrain.scaling", "--family", str(family), "--out", str(out),
               "--local", "--jobs", str(jobs), "--bootstrap", "50", *extra]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(out / "results.csv") as handle:
        losses = {row["run"]: float(row["val loss"]) for row in csv.DictReader(handle)}
    trained = sum(Run(**r).trained_tokens for r in json.loads((out / "sweep.json").read_text())["runs"])
    return {"losses": losses, "fit": json.loads((out / "fit.json").read_text()), "tokens": trained,
            "cpu_s": (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime),
            "wall_s": time.perf_counter() - started}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--family", default=str(ROOT / "configs" / "scaling" / "tiny-family.yaml"))
    p.add_argument("--tokens", default="51200,102400,204800", help="the budgets D, replacing the family's")
    p.add_argument("--out", default=str(ROOT / "runs" / "bench" / "scaling-wsd"))
    p.add_argument("--jobs", type=int, default=2, help="runs at once (pretrain.scaling --local --jobs)")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    family = yaml.safe_load(Path(args.family).read_text())
    family["base"] = str((Path(args.family).parent / family["base"]).resolve())
    family["tokens"] = [int(t) for t in args.tokens.split(",")]
    family_file = out / "family.yaml"
    family_file.write_text(yaml.safe_dump(family, sort_keys=False))
    results = {}
    for name, extra in SWEEPS.items():
        print(f"sweep: {name}", file=sys.stderr, flush=True)
        results[name] = run_sweep(family_file, out / name.replace(" ", "-"), extra, args.jobs)

    names = list(SWEEPS)
    lines = ["| run | " + " | ".join(f"{n} val loss" for n in names) + " |", "|---|" + "---:|" * len(names)]
    for run in results["cosine"]["losses"]:
        lines.append(f"| {run} | " + " | ".join(f"{results[n]['losses'][run]:.4f}" for n in names) + " |")
    for label, key, fmt in (("tokens trained", "tokens", "{:,.0f}"), ("CPU s", "cpu_s", "{:.0f}"),
                            ("wall s", "wall_s", "{:.0f}")):
        lines.append(f"| {label} | " + " | ".join(fmt.format(results[n][key]) for n in names) + " |")
    for param in ("E", "alpha", "beta"):
        lines.append(f"| fit {param} | " + " | ".join(f"{results[n]['fit']['fit'][param]:.3f}" for n in names)
                     + " |")
    lines.append("| N_opt ∝ C^a, a | " + " | ".join(
        f"{results[n]['fit']['optimal_allocation']['N_opt ~ C^a']:.2f}" for n in names) + " |")
    same = results["wsd alone"]["losses"] == results["wsd forked"]["losses"]
    lines.append(f"\nforked cooldowns equal the WSD runs trained alone: {'yes, every run' if same else 'NO'}")
    table = "\n".join(lines)
    (out / "results.md").write_text(table + "\n")
    print(table)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
