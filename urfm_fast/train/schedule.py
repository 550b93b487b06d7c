"""The schedules of a run, each a pure function of the step (a resumed run, on any number of ranks, gets
the same values without saving a scheduler): the learning rate (shared with fine-tuning) and the mask
ratio."""

from __future__ import annotations

import math


def lr_at(step: int, base_lr: float, min_lr: float, warmup: int, total: int) -> float:
    """Linear warm-up then half-cosine to min_lr (MAE's schedule, per step)."""
    if step < warmup:
        return base_lr * (step + 1) / warmup  # +1: the very first update is not wasted at lr 0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def mask_ratio_at(step: int, total: int, target: float, schedule: str = "constant", start: float = 0.0,
                  ramp: float = 0.5, levels: int = 8) -> float:
    """The mask ratio of step ``step`` of ``total``: ``target`` throughout (``constant``, URFM's), or a ramp
    from ``start`` to ``target`` over the first ``ramp`` of the run, ``linear`` or ``cosine`` (slow at both
    ends) in progress, then ``target``. The ramp moves in ``levels`` equal steps of progress, so a run sees at
    most ``levels + 1`` visible-token counts: each is one static shape that torch.compile and the Triton
    gather build once, instead of a new shape every step."""
    if schedule == "constant":
        return target
    ramp_steps = max(1, round(ramp * total))
    progress = math.floor(min(1.0, step / ramp_steps) * levels) / levels
    if schedule == "cosine":
        progress = 0.5 * (1.0 - math.cos(math.pi * progress))
    elif schedule != "linear":
        raise ValueError(f"unknown mask schedule {schedule!r}")
    return start + (target - start) * progress
