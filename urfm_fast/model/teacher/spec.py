"""The ``--teacher`` spec (``TEACHER_HELP`` in urfm_fast.config) -> a frozen teacher, in one place."""

from __future__ import annotations

import os
from pathlib import Path

import torch.nn as nn

from urfm_fast.config import EFFICIENTNET_LITE0, HF_HUB_ID
from urfm_fast.model.teacher.base import TeacherUnavailable
from urfm_fast.model.teacher.biomedclip import BiomedCLIPTeacher
from urfm_fast.model.teacher.efficientnet_lite import efficientnet_lite0
from urfm_fast.model.teacher.open_clip_model import open_clip_teacher
from urfm_fast.model.teacher.timm_model import timm_teacher


def load_teacher(spec: str | os.PathLike = HF_HUB_ID, target: str = "tokens", grid: int | None = None,
                 input_size: int | None = None) -> nn.Module:
    """Build the teacher named by ``spec`` (see ``TEACHER_HELP``); ``grid``: the student's patches per side."""
    spec = str(spec)
    kind, _, rest = spec.partition(":")
    try:
        if spec in (EFFICIENTNET_LITE0, "efficientnet-lite0"):
            t = timm_teacher("tf_efficientnet_lite0", None, grid, input_size, model=efficientnet_lite0())
            t.source = EFFICIENTNET_LITE0
            return t
        if kind in ("timm", "open_clip") and rest:
            name, _, path = rest.partition("=")
            if not path or not Path(path).expanduser().is_file():
                raise TeacherUnavailable(f"expected {kind}:MODEL=FILE with an existing weights file")
            make = timm_teacher if kind == "timm" else open_clip_teacher
            return make(name, Path(path).expanduser(), grid=grid, input_size=input_size)
    except (TeacherUnavailable, ValueError, KeyError, RuntimeError) as e:  # one line, not a traceback
        raise TeacherUnavailable(f"--teacher {spec}: {e}") from e
    return BiomedCLIPTeacher.load(spec, target=target)
