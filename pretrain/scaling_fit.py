"""Fit L(N, D) = E + A / N^α + B / D^β to final losses, Chinchilla-style (Hoffmann et al. 2022, App. D.2).

The fit is on log-loss: log L̂ = LSE(a − α log N, b − β log D, e) with A = eᵃ, B = eᵇ, E = eᵉ, minimising
the Huber loss (δ = 1e-3) of log L̂ − log L, which keeps one bad run from pulling the exponents. The
surface has many local minima, so L-BFGS starts from the best points of a grid; confidence intervals
come from refitting bootstrap resamples of the runs. Compute-optimal allocation for C ≈ 6ND follows in
closed form: N_opt = G (C/6)^(β/(α+β)), G = (αA / (βB))^(1/(α+β)).
"""

from __future__ import annotations

import itertools
import math
import sys
from dataclasses import asdict, dataclass

import numpy as np
import torch

PARAMS = ("E", "A", "alpha", "B", "beta")
# Chinchilla's grid (α, β: 0..2 by 0.5; e: -1..1.5 by 0.5; a, b: 0..25 by 5), in (a, alpha, b, beta, e)
GRID = list(itertools.product(range(0, 30, 5), np.arange(0, 2.01, 0.5), range(0, 30, 5),
                              np.arange(0, 2.01, 0.5), np.arange(-1, 1.51, 0.5)))


@dataclass
class Fit:
    E: float
    A: float
    alpha: float
    B: float
    beta: float
    objective: float = math.nan  # the Huber loss at the optimum (sum over runs)

    def predict(self, n: np.ndarray | float, d: np.ndarray | float) -> np.ndarray:
        return self.E + self.A / np.power(n, self.alpha) + self.B / np.power(d, self.beta)

    def optimal_n(self, compute: np.ndarray | float) -> np.ndarray:
        """The loss-minimising parameter count for a compute budget C = 6ND."""
        g = (self.alpha * self.A / (self.beta * self.B)) ** (1 / (self.alpha + self.beta))
        return g * np.power(np.asarray(compute) / 6, self.beta / (self.alpha + self.beta))

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def huber(x: torch.Tensor, delta: float) -> torch.Tensor:
    return torch.where(x.abs() <= delta, 0.5 * x**2, delta * (x.abs() - 0.5 * delta))


def objective(theta: torch.Tensor, log_n: torch.Tensor, log_d: torch.Tensor, log_l: torch.Tensor,
              delta: float) -> torch.Tensor:
    """Summed Huber loss of each parameter row (a, alpha, b, beta, e) of theta: shape (..., 5) → (...)."""
    a, alpha, b, beta, e = theta.unbind(-1)
    terms = torch.stack([a[..., None] - alpha[..., None] * log_n, b[..., None] - beta[..., None] * log_d,
                         e[..., None].expand(*e.shape, log_n.shape[-1])], dim=-1)
    return huber(torch.logsumexp(terms, dim=-1) - log_l, delta).sum(-1)


def _lbfgs(start: torch.Tensor, data: tuple[torch.Tensor, ...], delta: float) -> tuple[torch.Tensor, float]:
    theta = start.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([theta], lr=1, max_iter=200, tolerance_grad=1e-12, tolerance_change=1e-15,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = objective(theta, *data, delta)
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        value = objective(theta, *data, delta).item()
    return theta.detach(), value


LOG_FLOAT_MAX = math.log(sys.float_info.max)


def fit(n: np.ndarray, d: np.ndarray, loss: np.ndarray, delta: float = 1e-3, starts: int = 16,
        extra_starts: list[np.ndarray] | None = None) -> Fit:
    """The best L-BFGS optimum from the `starts` best grid points (and any extra starting points)."""
    n, d, loss = (np.asarray(x, dtype=np.float64) for x in (n, d, loss))
    if not (len(n) == len(d) == len(loss)) or len(n) < 3:
        raise ValueError(f"a fit needs at least 3 runs with N, D and loss each; got {len(n)}, {len(d)}, "
                         f"{len(loss)}")
    if (n <= 0).any() or (d <= 0).any() or (loss <= 0).any():
        raise ValueError("N, D and the losses must be positive")
    data = tuple(torch.tensor(np.log(x), dtype=torch.float64) for x in (n, d, loss))
    grid = torch.tensor(GRID, dtype=torch.float64)
    grid_values = objective(grid, *data, delta)
    best = [grid[i] for i in torch.argsort(grid_values)[:starts]]
    best += [torch.tensor(s, dtype=torch.float64) for s in extra_starts or []]
    results = [_lbfgs(s, data, delta) for s in best]
    # an optimum whose A, B or E overflows a float is a diverged fit (an unidentifiable term), not a fit
    usable = [r for r in results if math.isfinite(r[1]) and max(r[0][[0, 2, 4]].tolist()) < LOG_FLOAT_MAX]
    if not usable:
        raise ValueError(f"the fit diverged from every start ({len(n)} runs): too few distinct runs?")
    theta, value = min(usable, key=lambda r: r[1])
    a, alpha, b, beta, e = theta.tolist()
    return Fit(E=math.exp(e), A=math.exp(a), alpha=alpha, B=math.exp(b), beta=beta, objective=value)


def as_start(f: Fit) -> np.ndarray:
    return np.array([math.log(f.A), f.alpha, math.log(f.B), f.beta, math.log(f.E)])


def bootstrap(n: np.ndarray, d: np.ndarray, loss: np.ndarray, best: Fit, samples: int = 200,
              seed: int = 0, delta: float = 1e-3, level: float = 0.9) -> dict[str, tuple[float, float]]:
    """Percentile intervals of each parameter over fits to resamples (with replacement) of the runs,
    each started from the full fit and the two best grid points."""
    rng = np.random.default_rng(seed)
    n, d, loss = (np.asarray(x, dtype=np.float64) for x in (n, d, loss))
    fits = []
    for _ in range(samples):
        idx = rng.integers(0, len(n), len(n))
        if len(set(zip(n[idx], d[idx]))) < 3:  # too few distinct runs to say anything
            continue
        try:
            fits.append(fit(n[idx], d[idx], loss[idx], delta, starts=2, extra_starts=[as_start(best)]))
        except ValueError:  # a resample that does not pin down every term: no interval information
            continue
    lo, hi = (1 - level) / 2 * 100, (1 + level) / 2 * 100
    return {p: (float(np.percentile([getattr(f, p) for f in fits], lo)),
                float(np.percentile([getattr(f, p) for f in fits], hi))) for p in PARAMS} if fits else {}
