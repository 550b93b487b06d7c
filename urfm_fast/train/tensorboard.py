"""TensorBoard event files beside a run's own records, when the ``tensorboard`` package is installed.

    pip install 'urfm_fast[tensorboard]'
    tensorboard --logdir runs        # every pretraining run and evaluation under runs/

Optional: without tensorboard, pretrain and evaluate write their JSON records only and say so once.
"""

from __future__ import annotations

import math
from pathlib import Path

NOTE = "note: tensorboard is not installed, so no event files (pip install 'urfm_fast[tensorboard]')"


def summary_writer(log_dir: Path, say=print):
    """torch's SummaryWriter writing into ``log_dir``, or None (after one note) without tensorboard."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        say(NOTE)
        return None
    return SummaryWriter(log_dir=str(log_dir))


def add_scalars(writer, prefix: str, record: dict, step: int, keys) -> None:
    """The finite numbers of ``record`` under ``keys`` as ``prefix/key`` at ``step``."""
    for key in keys:
        value = record.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            writer.add_scalar(f"{prefix}/{key}", value, step)
