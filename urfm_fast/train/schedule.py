"""The learning-rate schedule shared by pretraining and fine-tuning: linear warm-up, then half-cosine."""

from __future__ import annotations

import math


def lr_at(step: int, base_lr: float, min_lr: float, warmup: int, total: int) -> float:
    """Linear warm-up then half-cosine to min_lr (MAE's schedule, per step). Stateless in ``step``,
    so a resumed run gets the same rates without saving a scheduler."""
    if step < warmup:
        return base_lr * (step + 1) / warmup  # +1: the very first update is not wasted at lr 0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
