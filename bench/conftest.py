"""Shared set-up of the benchmark suite ``pytest bench/ --benchmark-only``.

Scale: the real ViT-B/16 URFM recipe on a CUDA device (batch 256, 224 px, 75 % mask, 768d8b
decoder, bf16 autocast), a tiny configuration on CPU (see ``TINY``). ``URFM_BENCH_SCALE=tiny|vitb``
forces one; ``URFM_BENCH_ROUNDS=N`` overrides the number of timed rounds; on CPU the rows use
``URFM_BENCH_THREADS`` intra-op threads (default 1, see below).

Files named ``bench_*.py`` in this folder are collected (pytest's default only takes ``test_*.py``);
inside them, benchmark functions are ``test_*`` as usual.

Fixtures (names are stable; other bench files rely on them):
    device        torch.device: cuda if available, else cpu                        (session)
    on_gpu        bool: device is CUDA                                             (session)
    scale         'vitb' | 'tiny'                                                   (session)
    step_cfg      URFMConfig of the training-step rows at this scale               (session)
    batch_size    images per step at this scale                                    (session)
    amp_dtype     torch.bfloat16 on GPU, None on CPU (fp32)                         (session)
    images01      float32 [batch_size, 3, H, W] in [0, 1] on ``device``, seeded       (session)
    peak          datasheet dense peak FLOP/s of the device for amp_dtype, or None   (session)
    rounds        timed rounds per row (5 on CPU, 10 on GPU, or URFM_BENCH_ROUNDS)  (session)
    ref_means     dict: benchmark name -> mean seconds of rows measured so far      (session)
    measure       measure(benchmark, fn, ...) -> mean s: warm-up, timing, physics   (function)

``measure(benchmark, fn, *, items=None, flops=None, nbytes=None, reference=None, warmup=1,
rounds=None, compiled=False)``:
    * runs ``fn`` ``warmup`` times outside the timed region (synchronised); when ``compiled`` is
      true, the warm-up wall time beyond ``warmup`` x the timed mean is recorded as
      ``extra_info['compile_s']`` (compile and any recompile), so compile never lands in the
      timed rounds and is reported apart;
    * times ``rounds`` calls with ``benchmark.pedantic``, each call followed by
      ``torch.cuda.synchronize`` inside the timed region;
    * fills ``benchmark.extra_info`` with physics from the mean time: ``items_per_s`` (images/s for
      steps), ``tflops`` (TFLOP/s from the analytic ``flops`` per call), ``mfu`` (against ``peak``),
      ``gbps`` (from ``nbytes`` moved per call, for memory-bound kernels) and, when ``reference``
      names a row already measured in this process, ``ratio_to_reference`` = reference mean /
      this mean (> 1: faster than the reference). The raw per-call counts are stored too
      (``flops_per_call``, ``items_per_call``, ``bytes_per_call``, ``reference``) so
      ``bench/report.py`` can recompute everything from the JSON.

Helpers importable as ``from bench.conftest import synchronize, fill_extra_info``.
"""

from __future__ import annotations

import fnmatch
import os
import time

import pytest
import torch

from urfm_fast import URFMConfig
from urfm_fast.model.flops import mfu, peak_flops

# On CPU one intra-op thread by default (URFM_BENCH_THREADS to change): on a small machine shared
# with other work, a 2-thread OpenMP region stalls at every barrier whenever one thread is
# descheduled, which made single steps up to 10x slower at random and the rows incomparable.
if not torch.cuda.is_available():
    torch.set_num_threads(int(os.environ.get("URFM_BENCH_THREADS", "1")))

# CPU: a ViT-Tiny student with a small decoder on 64-px images; the teacher stays ViT-B (that is
# what BiomedCLIP is), here on 1+16 tokens.
TINY = dict(img_size=64, decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4)
TINY_BATCH = 8
VITB_BATCH = 256


def pytest_collect_file(file_path, parent):
    """Collect bench_*.py as test modules unless pytest's own patterns already take them."""
    if file_path.suffix != ".py" or not file_path.name.startswith("bench_"):
        return None
    if parent.session.isinitpath(file_path):
        return None  # named on the command line: pytest collects it itself
    if any(fnmatch.fnmatch(file_path.name, pat) for pat in parent.config.getini("python_files")):
        return None
    return pytest.Module.from_parent(parent, path=file_path)


def pytest_benchmark_update_machine_info(config, machine_info):
    """Versions, device and scale in the JSON, for bench/report.py's header."""
    import importlib.metadata as md

    versions = {}
    for dist in ("torch", "triton", "timm", "open_clip_torch", "pytest-benchmark"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    if torch.cuda.is_available():
        versions["cuda"] = torch.version.cuda
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    machine_info["urfm"] = {
        "versions": versions,
        "device": device,
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "scale": os.environ.get("URFM_BENCH_SCALE", "vitb" if torch.cuda.is_available() else "tiny"),
    }


def pytest_benchmark_update_json(config, benchmarks, output_json):
    import sys

    output_json["urfm_command"] = " ".join(["pytest", *sys.argv[1:]])


# -- helpers ---------------------------------------------------------------------------------------


def synchronize(device: torch.device | str | None = None) -> None:
    """Wait for queued CUDA work (no-op on CPU): call it inside every timed region."""
    device = torch.device(device) if device is not None else None
    if (device is None and torch.cuda.is_available()) or (device is not None and device.type == "cuda"):
        torch.cuda.synchronize(device)


def fill_extra_info(
    benchmark,
    mean_s: float | None,
    *,
    items: float | None = None,
    flops: float | None = None,
    nbytes: float | None = None,
    peak: float | None = None,
    reference: str | None = None,
    reference_mean_s: float | None = None,
    compile_s: float | None = None,
) -> None:
    """Physics of one row from its mean time per call (see the module docstring)."""
    info = benchmark.extra_info
    if items is not None:
        info["items_per_call"] = items
    if flops is not None:
        info["flops_per_call"] = flops
    if nbytes is not None:
        info["bytes_per_call"] = nbytes
    if reference is not None:
        info["reference"] = reference
    if compile_s is not None:
        info["compile_s"] = round(compile_s, 3)
    if peak:
        info["peak_tflops"] = peak / 1e12
    if not mean_s:
        return
    if items is not None:
        info["items_per_s"] = items / mean_s
    if flops is not None:
        info["tflops"] = flops / mean_s / 1e12
        util = mfu(flops / mean_s, peak)
        if util is not None:
            info["mfu"] = util
    if nbytes is not None:
        info["gbps"] = nbytes / mean_s / 1e9
    if reference_mean_s:
        info["ratio_to_reference"] = reference_mean_s / mean_s


def _mean_seconds(benchmark) -> float | None:
    stats = getattr(benchmark, "stats", None)  # None with --benchmark-disable
    return stats.stats.mean if stats is not None else None


# -- fixtures --------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def on_gpu(device) -> bool:
    return device.type == "cuda"


@pytest.fixture(scope="session")
def scale(on_gpu) -> str:
    s = os.environ.get("URFM_BENCH_SCALE", "vitb" if on_gpu else "tiny")
    if s not in ("tiny", "vitb"):
        raise ValueError(f"URFM_BENCH_SCALE={s!r}; expected 'tiny' or 'vitb'")
    return s


@pytest.fixture(scope="session")
def step_cfg(scale) -> URFMConfig:
    return URFMConfig() if scale == "vitb" else URFMConfig.preset("vit_tiny", **TINY)


@pytest.fixture(scope="session")
def batch_size(scale) -> int:
    return VITB_BATCH if scale == "vitb" else TINY_BATCH


@pytest.fixture(scope="session")
def amp_dtype(on_gpu):
    return torch.bfloat16 if on_gpu else None


@pytest.fixture(scope="session")
def images01(device, step_cfg, batch_size) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch_size, step_cfg.in_chans, step_cfg.img_size, step_cfg.img_size, generator=g)
    return x.to(device)


@pytest.fixture(scope="session")
def peak(device, amp_dtype) -> float | None:
    return peak_flops(device, amp_dtype or torch.float32)


@pytest.fixture(scope="session")
def rounds(on_gpu) -> int:
    return int(os.environ.get("URFM_BENCH_ROUNDS", 10 if on_gpu else 5))


@pytest.fixture(scope="session")
def ref_means() -> dict[str, float]:
    return {}


@pytest.fixture
def measure(device, peak, rounds, ref_means):
    default_rounds = rounds

    def run(
        benchmark,
        fn,
        *,
        items: float | None = None,
        flops: float | None = None,
        nbytes: float | None = None,
        reference: str | None = None,
        warmup: int = 1,
        rounds: int | None = None,
        compiled: bool = False,
    ) -> float | None:
        warm_s = []
        for _ in range(warmup):
            t0 = time.perf_counter()
            fn()
            synchronize(device)
            warm_s.append(time.perf_counter() - t0)

        def timed():
            out = fn()
            synchronize(device)
            return out

        benchmark.pedantic(timed, rounds=rounds or default_rounds, iterations=1, warmup_rounds=0)
        mean_s = _mean_seconds(benchmark)
        if mean_s:
            ref_means[benchmark.name] = mean_s
        fill_extra_info(
            benchmark,
            mean_s,
            items=items,
            flops=flops,
            nbytes=nbytes,
            peak=peak,
            reference=reference,
            reference_mean_s=ref_means.get(reference) if reference else None,
            # Compile (and recompiles) = warm-up wall time beyond that of as many timed calls.
            compile_s=max(0.0, sum(warm_s) - len(warm_s) * mean_s) if compiled and mean_s else None,
        )
        benchmark.extra_info["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        return mean_s

    return run
