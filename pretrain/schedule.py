"""The learning-rate schedule: linear warmup, a constant stretch, then a decay of a chosen shape.

`train.lr_decay_fraction` = 1 decays from the end of warmup (the usual cosine schedule); below 1 the lr
stays at its peak until the last fraction of the steps (warmup-stable-decay, WSD: Hu et al. 2024,
MiniCPM; Hägele et al. 2024). Up to the start of its decay a WSD run is the same run whatever its
length, so a checkpoint taken there can be cooled down to a shorter budget: one long run per model size
gives every budget of a scaling study (pretrain/scaling.py).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the config module checks train.lr_decay against DECAY_SHAPES
    from pretrain.config import TrainConfig

# multiplier of (lr - min lr) over the decay's progress p in [0, 1]: 1 at its start, 0 at its end
DECAY_SHAPES = {
    "cosine": lambda p: 0.5 * (1 + math.cos(math.pi * p)),
    "linear": lambda p: 1 - p,
    "sqrt": lambda p: 1 - math.sqrt(p),  # "1 - sqrt", the cooldown Hägele et al. found best for WSD
    "none": lambda p: 1.0,  # constant after warmup
}


def decay_start(t: TrainConfig) -> int:
    """The first step of the decay: the last `lr_decay_fraction` of the steps, not before warmup ends."""
    return max(t.warmup_steps, t.steps - round(t.lr_decay_fraction * t.steps))


def lr_at(step: int, t: TrainConfig) -> float:
    """The learning rate of optimizer step `step` (0-based)."""
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    start = decay_start(t)
    progress = min(1.0, max(0, step - start) / max(1, t.steps - start))
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * DECAY_SHAPES[t.lr_decay](progress))


def stable_end(t: TrainConfig) -> int:
    """A warmup-stable-decay run's last step at the peak rate (where its cooldown starts): the point a
    shorter run of the same schedule forks from, and a longer one continues from; 0 when the lr decays from
    the end of warmup (or there is no stable stretch)."""
    return decay_start(t) if t.lr_decay_fraction < 1 else 0
