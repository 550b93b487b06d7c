"""Compile every Triton kernel configuration for sm_90 (H100/H200) without a GPU, and read its resources.

    python bench/sm90_compile.py [--all] [--jobs N] [--json FILE]

Each kernel of ``urfm_fast.kernels`` is compiled with ``triton.compile(ASTSource(...),
target=GPUTarget("cuda", 90, 32))`` down to a cubin (triton runs the ptxas it ships), and
``cuobjdump -res-usage`` (also in the triton wheel) reads its registers, static shared memory,
stack frame and local memory; triton's metadata gives the dynamic shared memory it will request at
launch. A configuration passes when its stack frame and local memory are empty (triton inlines
every call, so any stack is register spills: the fp32 ieee attention tiles show ~10-16 KB there)
and its shared memory fits the 227 KB per block that sm_90 allows. Two control kernels, one built
to spill and one to overflow shared memory, must fail the same check, so a check that stopped
seeing either would be noticed. Prints a markdown table; exits 1 if any configuration fails or the control passes.

What is compiled (the launch space follows the code, nothing is copied from it):
  * attention: the forward and both backward kernels, every autotune config that ``prune_tiles``
    keeps at some token count (50, 197 or long), at the head sizes of the model presets and the
    decoder (48 and 64 use BLOCK_D 64, ViT-H's 80 uses 128), bf16; ``--all`` adds fp16 (the same
    tile shapes and MMA instructions as bf16) and head size 32 (MAE's 512-wide decoder).
    fp32 is not compiled: on a GPU it goes to SDPA (see urfm_fast/ops.py).
  * the backward's rowsum kernel, the gather / un-shuffle kernels and the cosine loss at ViT-B's
    width (their widest BLOCK_D); ``--all`` adds every preset width and the cosine loss's maximum D.
Pointers and strides are compiled as 16-aligned (what a contiguous or packed-qkv bf16 tensor
gives), token counts unaligned. Nothing is cached between runs (a fresh TRITON_CACHE_DIR), so each
run compiles with the triton installed. Run it without TRITON_INTERPRET (the kernels must be JIT
functions, not interpreted ones).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import importlib
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHARED_LIMIT = 227 * 1024  # bytes of shared memory one block may use on sm_90 (opt-in maximum)
# encoder (1 + 49 visible), decoder / teacher (1 + 196), and a long sequence (every tile and stage
# count allowed): together every config the pruning can leave at any token count
TOKEN_COUNTS = (50, 197, 4096)
FLOAT_ARGS = {"qk_scale", "sm_scale", "inv_m", "eps", "ln_eps"}
# pointer element types that do not follow the run's dtype
POINTER_TYPES = {
    "lse_ptr": "fp32", "delta_ptr": "fp32", "colsum_ptr": "fp32", "dpos_ptr": "fp32", "dmask_ptr": "fp32",
    "loss_ptr": "fp32", "wsum_ptr": "fp32", "weight_ptr": "fp32", "target_ptr": "fp32",
    "idx_ptr": "i64", "ids_ptr": "i64", "order_ptr": "i64", "bounds_ptr": "i64",
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Job:
    """One kernel specialisation to compile: the kernel by module and attribute, and its launch."""

    label: str
    module: str
    kernel: str
    dtype: str  # triton type name of the data pointers: bf16 | fp16
    constexprs: tuple  # ((name, value), ...)
    num_warps: int
    num_stages: int


def control_jobs() -> list[Job]:
    """Two kernels that must fail the check, one for each reason: a 32 x 256 fp32 tile held by one
    warp (256 values per thread: spills), and a 128^3 fp16 dot pipelined over 4 stages (4 x 64 KB of
    operand buffers: over the shared-memory limit, without spilling)."""
    return [
        Job("control: spills", __name__, "_control_spill", "fp32", (("R", 32), ("C", 256)), 1, 1),
        Job("control: shared memory", __name__, "_control_shared", "fp16", (("B", 128),), 8, 4),
    ]


def _define_controls():
    import triton
    import triton.language as tl

    @triton.jit
    def _control_spill(x_ptr, y_ptr, R: tl.constexpr, C: tl.constexpr):
        tile = tl.arange(0, R)[:, None] * C + tl.arange(0, C)[None, :]
        x = tl.load(x_ptr + tile)
        tl.store(y_ptr + tile, x * tl.sum(x, axis=1)[:, None] + tl.sum(x, axis=0)[None, :])

    @triton.jit
    def _control_shared(a_ptr, b_ptr, c_ptr, stride_a, B: tl.constexpr):
        offs = tl.arange(0, B)
        acc = tl.zeros([B, B], dtype=tl.float32)
        for k in range(0, stride_a, B):
            a = tl.load(a_ptr + offs[:, None] * stride_a + (k + offs)[None, :])
            b = tl.load(b_ptr + (k + offs)[:, None] * B + offs[None, :])
            acc += tl.dot(a, b)
        tl.store(c_ptr + offs[:, None] * B + offs[None, :], acc)

    globals().update(_control_spill=_control_spill, _control_shared=_control_shared)


def _jit_function(job: Job):
    from triton.runtime.autotuner import Autotuner

    fn = getattr(importlib.import_module(job.module), job.kernel)
    return fn.fn if isinstance(fn, Autotuner) else fn  # an Autotuner wraps the JITFunction


def _source(job: Job):
    from triton.compiler import ASTSource

    fn = _jit_function(job)
    constexprs = dict(job.constexprs)
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*" + POINTER_TYPES.get(name, job.dtype)
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in FLOAT_ARGS:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if "stride" in name or re.fullmatch(r"s[qkv][bhn]", name):  # strides: 16-aligned
                attrs[(i,)] = [["tt.divisibility", 16]]
    constants = {(fn.arg_names.index(k),): v for k, v in constexprs.items()}
    return ASTSource(fn, signature, constants, attrs)


def _cuobjdump() -> str:
    import triton.backends.nvidia as nvidia

    return str(Path(nvidia.__file__).parent / "bin" / "cuobjdump")


def compile_job(job: Job) -> dict:
    """Compile one job for sm_90 -> dict(label, regs, spill/local bytes, shared bytes, seconds, ok[, error])."""
    import triton
    from triton.backends.compiler import GPUTarget

    row = dict(label=job.label, num_warps=job.num_warps, num_stages=job.num_stages)
    t0 = time.perf_counter()
    try:
        kernel = triton.compile(_source(job), target=GPUTarget("cuda", 90, 32),
                                options=dict(num_warps=job.num_warps, num_stages=job.num_stages))  # fmt: skip
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(kernel.asm["cubin"])
            f.flush()
            usage = subprocess.run([_cuobjdump(), "-res-usage", f.name], capture_output=True, text=True, check=True)
        m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage.stdout)
        if m is None:
            raise RuntimeError(f"no resource line in cuobjdump output: {usage.stdout[-200:]!r}")
        regs, stack, static_shared, local = map(int, m.groups())
        shared = static_shared + kernel.metadata.shared
        row.update(regs=regs, spill=stack + local, shared=shared)
        row["ok"] = stack + local == 0 and shared <= SHARED_LIMIT
    except Exception as e:  # one broken configuration is a failed row, not a crash of the whole sweep
        row.update(ok=False, error=f"{type(e).__name__}: {str(e)[:300]}")
    row["seconds"] = round(time.perf_counter() - t0, 2)
    return row


def _head_dims(all_configs: bool) -> list[int]:
    from urfm_fast.config import VIT_PRESETS, URFMConfig

    cfg = URFMConfig()
    dims = {d // h for d, _, h in VIT_PRESETS.values()} | {cfg.decoder_embed_dim // cfg.decoder_num_heads}
    if all_configs:
        dims.add(32)  # MAE's 512-wide, 16-head decoder
    return sorted(dims)


def _widths(all_configs: bool) -> list[int]:
    from urfm_fast.config import VIT_PRESETS, URFMConfig

    if all_configs:
        return sorted({d for d, _, _ in VIT_PRESETS.values()} | {URFMConfig().decoder_embed_dim})
    return [URFMConfig().embed_dim]


def attention_jobs(all_configs: bool) -> list[Job]:
    from urfm_fast.kernels import attention as A

    mod = "urfm_fast.kernels.attention"
    dtypes = ["bf16", "fp16"] if all_configs else ["bf16"]
    jobs = []
    for kind, (loop_block, accumulators) in A.TUNED.items():
        kernel = f"_{kind}"
        for dtype, dh in [(dt, dh) for dt in dtypes for dh in _head_dims(all_configs)]:
            configs = {}  # what the autotuner may time at any token count
            for n in TOKEN_COUNTS:
                for c in A.prune_tiles(getattr(A, kernel).configs, n, loop_block, A.block_d(dh), accumulators):
                    configs[(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)] = c
            for (bm, bn, w, s), c in configs.items():
                const = dict(HEAD_DIM=dh, BLOCK_D=A.block_d(dh), DOT_PRECISION="tf32", **c.kwargs)
                label = f"attention_{kind} {dtype} Dh={dh} M{bm} N{bn} w{w} s{s}"
                jobs.append(Job(label, mod, kernel, dtype, tuple(const.items()), w, s))
    for dh in _head_dims(all_configs):
        const = dict(HEAD_DIM=dh, BLOCK_D=A.block_d(dh), BLOCK_M=A.DELTA_ROWS)
        jobs.append(Job(f"attention_bwd_delta bf16 Dh={dh}", mod, "_attn_bwd_delta_kernel", "bf16",
                        tuple(const.items()), 4, 3))  # fmt: skip
    return jobs


def row_jobs(all_configs: bool) -> list[Job]:
    """The gather / un-shuffle kernels and the cosine loss, as their launchers configure them."""
    from urfm_fast.kernels import cosine_loss as C
    from urfm_fast.kernels import gather as G

    jobs = []
    gm, cm = "urfm_fast.kernels.gather", "urfm_fast.kernels.cosine_loss"
    for d in _widths(all_configs):
        bd, w = G.copy_block_d(d), G.warps_for(G.copy_block_d(d))
        for head in (0, 1):
            const = (("HEAD", head), ("ROWS", G.ROWS_PER_PROGRAM), ("BLOCK_D", bd))
            jobs.append(Job(f"gather_fwd HEAD={head} D={d}", gm, "_gather_fwd_kernel", "bf16", const, w, 3))
        const = (("ROWS", G.ROWS_PER_PROGRAM), ("BLOCK_D", bd))
        jobs.append(Job(f"unshuffle_fwd D={d}", gm, "_unshuffle_fwd_kernel", "bf16", const, w, 3))
        for colsum in (0, 1):
            const = (("HAS_COLSUM", colsum), ("BLOCK_D", bd))
            jobs.append(Job(f"segment_sum COLSUM={colsum} D={d}", gm, "_segment_sum_kernel", "bf16", const, 4, 3))
        jobs.append(Job(f"unshuffle_bwd D={d}", gm, "_unshuffle_bwd_kernel", "bf16", (("BLOCK_D", bd),), 4, 3))
    for d in _widths(all_configs) + ([C.MAX_D] if all_configs else []):
        bd, rows, w = C.launch_shape(d)
        const = (("HAS_WEIGHT", 0), ("TARGET_NORM", 0), ("WITH_GRAD", 1), ("ROWS", rows), ("BLOCK_D", bd))
        jobs.append(Job(f"cosine_loss D={d}", cm, "_cosine_loss_kernel", "bf16", const, w, 3))
    return jobs


def run(jobs: list[Job], workers: int) -> list[dict]:
    # fresh cache: every run compiles with the triton at hand; fork keeps the workers' start cheap
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="sm90_triton_cache_")
    if workers <= 1:
        return [compile_job(j) for j in jobs]
    with cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        return list(pool.map(compile_job, jobs))


def markdown(rows: list[dict]) -> list[str]:
    lines = ["| kernel config (sm_90) | regs | spill (stack + local) B | shared B | ok |", "|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['label']} | - | - | - | FAIL: {r['error'][:100]} |")
        else:
            verdict = "ok" if r["ok"] else "FAIL"
            lines.append(f"| {r['label']} | {r['regs']} | {r['spill']} | {r['shared']} | {verdict} |")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--all", action="store_true", help="also fp16, every preset width and head size 32")
    p.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1), help="compile processes")
    p.add_argument("--json", type=Path, help="write the rows as JSON here")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: the kernels must be compiled, not interpreted", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    _define_controls()
    controls = control_jobs()
    results = run([*controls, *attention_jobs(args.all), *row_jobs(args.all)], args.jobs)
    controls, rows = results[: len(controls)], results[len(controls) :]
    took = time.perf_counter() - t0
    if args.json:
        args.json.write_text(json.dumps(dict(rows=rows, controls=controls, seconds=round(took, 1)), indent=1))
    print("\n".join(markdown(rows)))
    bad = [r for r in rows if not r["ok"]]
    print(f"\n{len(rows)} configurations compiled for sm_90 in {took:.0f} s ({args.jobs} processes): "
          f"{len(bad)} failed")  # fmt: skip
    blind = [c for c in controls if c["ok"] or "error" in c]
    for c in controls:
        verdict = "NOT FLAGGED: the check is blind" if c in blind else "flagged"
        print(f"{c['label']} (must fail): spill {c.get('spill')} B, shared {c.get('shared')} B: {verdict}")
    return 1 if bad or blind else 0


if __name__ == "__main__":
    sys.exit(main())
