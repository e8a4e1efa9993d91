"""Learning-rate schedules: linear warmup, then cosine, linear or constant to min_lr."""
from __future__ import annotations

import math


def lr_at(step: int, lr: float, min_lr: float, warmup: int, decay_steps: int, kind: str = "cosine") -> float:
    """The learning rate for optimizer step `step` (0-based), nanoGPT's shape for cosine."""
    if step < warmup:
        return lr * (step + 1) / (warmup + 1)
    if kind == "constant":
        return lr
    if step >= decay_steps:
        return min_lr
    ratio = (step - warmup) / max(1, decay_steps - warmup)
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio)) if kind == "cosine" else 1.0 - ratio
    return min_lr + coeff * (lr - min_lr)
