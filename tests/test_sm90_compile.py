"""Every Triton kernel configuration the autotuner may pick compiles for sm_90 (H100/H200) on this CPU,
with no register spills and within the 227 KB of shared memory a block may use.

Runs ``bench/sm90_compile.py`` in a subprocess without TRITON_INTERPRET (the kernels must be JIT
functions there, not interpreted ones): triton compiles each configuration to a cubin with the
ptxas in its wheel, and the wheel's cuobjdump reads the resources. Nothing is cached between runs.
The sweep covers bf16 at the head sizes of the model presets (see the script's docstring for what
``--all`` adds); about 80 compiles, ~1.5 minutes on 2 busy cores.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from urfm_fast.kernels import attention as A

ROOT = Path(__file__).resolve().parents[1]
SHARED_LIMIT = 227 * 1024


def _toolchain_missing() -> str | None:
    try:
        import triton.backends.nvidia as nvidia
    except ImportError:
        return "triton with its CUDA backend is not installed"
    bin_dir = Path(nvidia.__file__).parent / "bin"
    if not all((bin_dir / tool).exists() for tool in ("ptxas", "cuobjdump")):
        return f"no ptxas / cuobjdump in {bin_dir}"
    return None


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> dict:
    missing = _toolchain_missing()
    if missing:
        pytest.skip(missing)
    out = tmp_path_factory.mktemp("sm90") / "sm90.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    jobs = str(min(4, os.cpu_count() or 1))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "sm90_compile.py"), "--jobs", jobs, "--json", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    result["returncode"], result["stdout"] = proc.returncode, proc.stdout
    return result


@pytest.mark.slow
def test_every_config_compiles_without_spills_within_shared_memory(sweep):
    bad = [r for r in sweep["rows"] if not r["ok"]]
    assert not bad, bad
    assert all(r["spill"] == 0 and r["shared"] <= SHARED_LIMIT for r in sweep["rows"])
    assert sweep["returncode"] == 0, sweep["stdout"][-2000:]


@pytest.mark.slow
def test_the_check_sees_spills_and_shared_memory_overflow(sweep):
    # controls built to fail: a check that stopped seeing either failure would pass everything
    spill, shared = sweep["controls"]
    assert not spill["ok"] and spill["spill"] > 0, spill
    assert not shared["ok"] and shared["shared"] > SHARED_LIMIT, shared


@pytest.mark.slow
def test_the_sweep_covers_what_the_autotuner_times_at_vit_shapes(sweep):
    labels = {r["label"] for r in sweep["rows"]}
    for kind, (loop_block, accumulators) in A.TUNED.items():
        for head_dim in (48, 64, 80):  # decoder, ViT-B/L and teacher, ViT-H
            for n in (50, 197):
                for c in A.prune_tiles(A.gpu_configs(), n, loop_block, A.block_d(head_dim), accumulators):
                    tile = f"M{c.kwargs['BLOCK_M']} N{c.kwargs['BLOCK_N']} w{c.num_warps} s{c.num_stages}"
                    assert f"attention_{kind} bf16 Dh={head_dim} {tile}" in labels
    for kernel in ("gather_fwd", "unshuffle_fwd", "segment_sum", "unshuffle_bwd", "cosine_loss", "attention_bwd_delta"):
        assert any(label.startswith(kernel) for label in labels), kernel
