"""Teacher forward: BiomedCLIP's ViT-B/16 trunk on the full view, patch targets for a batch.

Rows (group ``teacher``):
    reference         what open_clip users run: the tower's timm trunk (``TimmModel(...).trunk``, a timm
                      ``vit_base_patch16_224``; built directly with timm at image sizes other than 224,
                      or where open_clip is not installed), ``forward_features[:, 1:]`` under
                      ``torch.no_grad`` and bf16 autocast on GPU, CLIP normalisation included
    ours_torch        urfm_fast.model.teacher.BiomedCLIPTeacher, kernels off
    ours_kernels      the same, kernels on (GPU only: on CPU ``auto`` is the torch path)
    ours_compiled     kernels on + torch.compile of the teacher (GPU, or URFM_BENCH_COMPILE=1)
Physics: images/s and TFLOP/s from ``urfm_fast.model.flops.teacher_forward_flops`` (forward only).
"""

from __future__ import annotations

import contextlib
import os

import pytest
import timm
import torch

from bench.reference import CLIP_MEAN, CLIP_STD, normalize
from urfm_fast.model import ops
from urfm_fast.model.flops import teacher_forward_flops
from urfm_fast.model.teacher import BiomedCLIPTeacher

REFERENCE = "test_teacher_reference"


def _reference_trunk(img_size: int) -> torch.nn.Module:
    if img_size == 224:
        try:
            from open_clip.timm_model import TimmModel

            tower = TimmModel("vit_base_patch16_224", embed_dim=512, pool="", proj="linear", proj_bias=False)
            return tower.trunk
        except ImportError:
            pass
    return timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, img_size=img_size)


@pytest.fixture
def teacher_flops(step_cfg, batch_size) -> int:
    return teacher_forward_flops(step_cfg) * batch_size


def _run(benchmark, measure, fn, batch_size, flops, reference=REFERENCE, compiled=False, warmup=1):
    benchmark.group = "teacher"
    benchmark.extra_info["batch"] = batch_size
    return measure(benchmark, fn, items=batch_size, flops=flops, reference=reference, compiled=compiled,
                   warmup=warmup)  # fmt: skip


def test_teacher_reference(benchmark, measure, step_cfg, device, amp_dtype, images01, batch_size, teacher_flops):
    trunk = _reference_trunk(step_cfg.img_size).to(device).eval().requires_grad_(False)
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()

    def fn():
        with torch.no_grad(), autocast:
            return trunk.forward_features(normalize(images01, CLIP_MEAN, CLIP_STD))[:, 1:].float()

    _run(benchmark, measure, fn, batch_size, teacher_flops, reference=None)


def test_teacher_ours_torch(benchmark, measure, device, images01, batch_size, teacher_flops):
    teacher = BiomedCLIPTeacher.load("random").to(device)
    with ops.use_backend("torch"):
        _run(benchmark, measure, lambda: teacher(images01), batch_size, teacher_flops)


def test_teacher_ours_kernels(benchmark, measure, on_gpu, device, images01, batch_size, teacher_flops):
    if not on_gpu:
        pytest.skip("URFM_KERNELS=auto is the torch path on CPU: same as ours_torch")
    teacher = BiomedCLIPTeacher.load("random").to(device)
    with ops.use_backend("auto"):
        _run(benchmark, measure, lambda: teacher(images01), batch_size, teacher_flops)


def test_teacher_ours_compiled(benchmark, measure, on_gpu, device, images01, batch_size, teacher_flops):
    if not on_gpu and os.environ.get("URFM_BENCH_COMPILE") != "1":
        pytest.skip("compile rows run on GPU (set URFM_BENCH_COMPILE=1 to run them on CPU)")
    torch._dynamo.reset()
    teacher = BiomedCLIPTeacher.load("random").to(device)
    compiled = torch.compile(teacher)
    with ops.use_backend("auto"):
        _run(benchmark, measure, lambda: compiled(images01), batch_size, teacher_flops, compiled=True, warmup=2)
