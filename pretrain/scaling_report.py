"""What a scaling sweep leaves behind: the table (results.md, results.csv), the fit (fit.json) and the plot
(scaling.png: loss against compute C = 6ND, each size's fitted curve, the compute-optimal frontier)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pretrain.scaling_fit import PARAMS, Fit, bootstrap, fit

if TYPE_CHECKING:
    from pretrain.scaling import Run


def write_table(runs: list[Run], losses: list[float], best: Fit, out: Path) -> None:
    header = ["run", "N (non-embedding)", "D (tokens)", "C = 6ND (FLOPs)", "steps", "val loss", "fit",
              "residual"]
    rows = []
    for run, loss in zip(runs, losses):
        predicted = float(best.predict(run.n_params, run.tokens))
        rows.append([run.name, run.n_params, run.tokens, f"{6 * run.n_params * run.tokens:.3e}", run.steps,
                     f"{loss:.4f}", f"{predicted:.4f}", f"{loss - predicted:+.4f}"])
    with open(out / "results.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([header] + rows)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(f"{v:,}" if isinstance(v, int) else str(v) for v in row) + " |"
              for row in rows]
    (out / "results.md").write_text("\n".join(lines) + "\n")


def plot(runs: list[Run], losses: list[float], best: Fit, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n, d = np.array([r.n_params for r in runs], float), np.array([r.tokens for r in runs], float)
    compute = 6 * n * d
    span = np.geomspace(compute.min() / 3, compute.max() * 3, 200)
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=100)
    sizes = sorted(set(n))
    colours = plt.cm.viridis(np.linspace(0, 0.85, len(sizes)))
    for size, colour in zip(sizes, colours):
        ax.plot(span, best.predict(size, span / (6 * size)), color=colour, lw=1, label=f"fit, N={size:,.0f}")
        mine = n == size
        ax.scatter(compute[mine], np.array(losses)[mine], color=colour, zorder=3, s=25)
    n_opt = best.optimal_n(span)
    ax.plot(span, best.predict(n_opt, span / (6 * n_opt)), "k--", lw=1.2, label="compute-optimal frontier")
    ax.set(xscale="log", xlabel="training compute C = 6ND (FLOPs)",
           ylabel="final validation loss (nats/token)",
           title=f"L = {best.E:.2f} + {best.A:.3g}/N^{best.alpha:.2f} + {best.B:.3g}/D^{best.beta:.2f}")
    ax.set_ylim(min(losses) - 0.3 * np.ptp(losses) - 0.05, max(losses) + 0.6 * np.ptp(losses) + 0.05)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def report(runs: list[Run], losses: list[float], out: Path, samples: int = 200) -> list[str]:
    """Fit, bootstrap, write the four files; returns a few lines to print."""
    n = np.array([r.n_params for r in runs], float)
    d = np.array([r.tokens for r in runs], float)
    loss = np.array(losses, float)
    best = fit(n, d, loss)
    intervals = bootstrap(n, d, loss, best, samples=samples) if samples else {}
    write_table(runs, losses, best, out)
    a, b = best.beta / (best.alpha + best.beta), best.alpha / (best.alpha + best.beta)
    (out / "fit.json").write_text(json.dumps({
        "law": "L(N, D) = E + A / N^alpha + B / D^beta", "fit": best.to_dict(),
        "interval_90": intervals, "bootstrap_samples": samples, "runs": len(runs),
        "huber_delta": 1e-3, "optimal_allocation": {"N_opt ~ C^a": a, "D_opt ~ C^b": b},
    }, indent=1))
    plot(runs, losses, best, out / "scaling.png")
    lines = [f"fit of {len(runs)} runs: " + ", ".join(f"{p} = {getattr(best, p):.4g}" for p in PARAMS)]
    if intervals:
        lines.append("90% bootstrap intervals: " + ", ".join(
            f"{p} [{lo:.3g}, {hi:.3g}]" for p, (lo, hi) in intervals.items()))
    lines.append(f"compute-optimal: N_opt ~ C^{a:.2f}, D_opt ~ C^{b:.2f}")
    lines.append(f"wrote {out / 'results.md'}, results.csv, fit.json, scaling.png")
    return lines
