"""Full URFM training step: teacher forward + student forward/backward + AdamW + EMA, images/s.

Rows (group ``step``), all measured in one process on the same images:
    reference            bench/reference.py: MAE/MILAN-style eager step (the baseline)
    ours_torch           urfm_fast.URFM + BiomedCLIPTeacher, kernels off (URFM_KERNELS=torch)
    paired_ours_torch    ours_torch again, with a reference step run right before each timed call:
                         ``x ref (paired)`` is the median over rounds of reference time / our time
                         for adjacent calls, the ratio least disturbed by other load on the machine
    ours_kernels         the same with kernels on (``auto``: Triton on CUDA); GPU only, since on CPU
                         ``auto`` is the torch path and the row would repeat ours_torch
    ours_compile_blocks  kernels on + torch.compile of every transformer block (student and teacher)
    ours_compile_model   kernels on + torch.compile of the whole student and teacher forward
Compile rows run on GPU; on CPU they are skipped (inductor needs minutes on 2 cores) unless
``URFM_BENCH_COMPILE=1``. Compile time is measured apart (``extra_info['compile_s']``).

Physics per row: images/s, TFLOP/s from ``urfm_fast.model.flops.train_flops_per_image`` (teacher forward
+ 3x student forward, attention included), MFU against the device's datasheet peak, and the ratio
to the reference row (reference time / row time; > 1 = faster).
"""

from __future__ import annotations

import gc
import os
import statistics
import time

import pytest
import torch

from bench.conftest import fill_extra_info, synchronize
from bench.reference import ReferenceStep
from bench.train_step import OurStep
from urfm_fast.model import ops
from urfm_fast.model.flops import train_flops_per_image

REFERENCE = "test_step_reference"


def _release():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@pytest.fixture
def step_flops(step_cfg, batch_size) -> int:
    return train_flops_per_image(step_cfg) * batch_size


def _run(benchmark, measure, step, images01, batch_size, step_flops, compiled=False, warmup=1):
    benchmark.group = "step"
    benchmark.extra_info["batch"] = batch_size
    mean = measure(
        benchmark,
        lambda: step(images01),
        items=batch_size,
        flops=step_flops,
        reference=None if isinstance(step, ReferenceStep) else REFERENCE,
        warmup=warmup,
        compiled=compiled,
    )
    return mean


def test_step_reference(benchmark, measure, step_cfg, device, amp_dtype, images01, batch_size, step_flops):
    torch.manual_seed(0)
    step = ReferenceStep(step_cfg, device, amp_dtype)
    _run(benchmark, measure, step, images01, batch_size, step_flops)
    del step
    _release()


def _run_ours(benchmark, measure, args, backend: str, compile_mode: str | None = None):
    step_cfg, device, amp_dtype, images01, batch_size, step_flops = args
    torch.manual_seed(0)
    if compile_mode:
        torch._dynamo.reset()
    with ops.use_backend(backend):
        step = OurStep(step_cfg, device, amp_dtype, compile_mode=compile_mode)
        # Compiled: three warm-up calls; the first compiles forward and backward, the next ones take
        # any recompile (seen on CPU at the second call) before timing.
        _run(benchmark, measure, step, images01, batch_size, step_flops, compiled=bool(compile_mode),
             warmup=3 if compile_mode else 1)  # fmt: skip
    del step
    _release()


@pytest.fixture
def step_args(step_cfg, device, amp_dtype, images01, batch_size, step_flops):
    return step_cfg, device, amp_dtype, images01, batch_size, step_flops


def test_step_ours_torch(benchmark, measure, step_args):
    _run_ours(benchmark, measure, step_args, "torch")


def test_step_ours_kernels(benchmark, measure, on_gpu, step_args):
    if not on_gpu:
        pytest.skip("URFM_KERNELS=auto is the torch path on CPU: same as ours_torch")
    _run_ours(benchmark, measure, step_args, "auto")


@pytest.mark.parametrize("mode", ["blocks", "model"])
def test_step_ours_compile(benchmark, measure, on_gpu, mode, step_args):
    if not on_gpu and os.environ.get("URFM_BENCH_COMPILE") != "1":
        pytest.skip("compile rows run on GPU (set URFM_BENCH_COMPILE=1 to run them on CPU)")
    _run_ours(benchmark, measure, step_args, "auto", compile_mode=mode)


def test_step_paired_ours_torch(benchmark, step_args, rounds, peak):
    step_cfg, device, amp_dtype, images01, batch_size, step_flops = step_args
    benchmark.group = "step"
    benchmark.extra_info["batch"] = batch_size
    torch.manual_seed(0)
    ref = ReferenceStep(step_cfg, device, amp_dtype)
    with ops.use_backend("torch"):
        ours = OurStep(step_cfg, device, amp_dtype)
        ref_s, ours_s = [], []

        def call(step, times):
            t0 = time.perf_counter()
            step(images01)
            synchronize(device)
            times.append(time.perf_counter() - t0)

        call(ref, []), call(ours, [])  # warm-up
        benchmark.pedantic(lambda: call(ours, ours_s), setup=lambda: call(ref, ref_s), rounds=rounds, iterations=1)
    mean = statistics.mean(ours_s)
    fill_extra_info(benchmark, mean, items=batch_size, flops=step_flops, peak=peak)
    benchmark.extra_info["ratio_paired_median"] = statistics.median(r / o for r, o in zip(ref_s, ours_s))
    benchmark.extra_info["reference_paired_s"] = ref_s
    benchmark.extra_info["ours_paired_s"] = ours_s
    ref = ours = None  # free both models before the next row
    _release()
