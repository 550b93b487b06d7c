"""The phases of the GPU check (``bash bench/gpu_check.sh``), one per call, each saving as it goes.

    python bench/gpu_check.py PHASE --out DIR [--smoke]       run one phase
    python bench/gpu_check.py record PHASE STATUS --out DIR [--budget S] [--seconds S] [--note TEXT]
    python bench/gpu_check.py smoke --out DIR                 every phase at tiny shapes, one process

Phases, in the order of what they are worth:
    env           versions, device, datasheet and measured bf16 peak; exits 3 without CUDA
    correctness   attention in bf16 against an fp32 reference, forward and dQ/dK/dV, for EVERY
                  tile config the autotuner may pick at N=50 and 197 (ViT-B encoder, decoder,
                  teacher shapes); then every other kernel (urfm_fast.model.kernel_check, ViT-B shapes)
    kernel_speed  attention forward + backward at batch 256: Triton against SDPA's default and
                  each SDPA backend; gather / un-shuffle / cosine loss against torch
    e2e_eager     the ViT-B/16 recipe's full step at batch 256 in bf16 (teacher, student fwd/bwd,
                  fused AdamW, EMA): images/s and MFU for kernels on (after the start-up choice
                  between Triton and SDPA), kernels off, and the MAE/MILAN-style reference
    e2e_compiled  the same step with every transformer block compiled (as pretrain does); compile
                  time apart
    method        (--with-method; run by gpu_check.sh, not here) experiments/gpu_method.sh: the recipe's
                  probe-quality curve, its own report in DIR/does_it_work_gpu.md
Each result row is written to DIR/gpu_results.json (atomically, after every row) and
DIR/gpu_report.md is rendered again from it, so a phase killed by its time budget leaves every row
it finished. ``record`` notes a phase's end as the shell saw it (exit status, timeout).
``--smoke`` runs a phase at tiny shapes on this machine (CPU: the Triton interpreter in fp32, no
inductor), only to prove its code runs; its numbers mean nothing. Where Triton's interpreter cannot run
(triton < 3.7 with numpy >= 2.4), the phases made of kernels only (correctness, kernel_speed) say so in one
line and end with exit status 77, recorded as skipped; the compiled GPU path is unaffected.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import sys
import time
from pathlib import Path

PHASES = ("env", "correctness", "kernel_speed", "e2e_eager", "e2e_compiled", "gpu_tests", "method")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in map(os.path.realpath, sys.path):  # run as a script: make `bench` importable, behind the
    sys.path.append(str(ROOT))  # urfm_fast the caller put on the path (gpu_env.sh's links, or an install)

# -- results: JSON rewritten atomically after every row, markdown rendered from it -----------------


class Results:
    def __init__(self, out: Path):
        out.mkdir(parents=True, exist_ok=True)
        self.json_path, self.md_path = out / "gpu_results.json", out / "gpu_report.md"

    def load(self) -> dict:
        try:
            return json.loads(self.json_path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {"phases": {}}

    def update(self, phase: str, row: dict | None = None, **fields) -> None:
        data = self.load()
        entry = data["phases"].setdefault(phase, {"status": "running", "rows": []})
        entry.update(fields)
        if row is not None:
            entry["rows"].append(row)
        _write_atomic(self.json_path, json.dumps(data, indent=1, default=str))
        _write_atomic(self.md_path, render(data))


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    return "-" if v is None else str(v)


def render(data: dict) -> str:
    lines = ["# GPU check", "", "Written by `bash bench/gpu_check.sh` after every row; a phase cut by its budget",
             "shows the rows it finished.", ""]  # fmt: skip
    for name, entry in data["phases"].items():
        head = f"## {name}: {entry.get('status')}"
        if entry.get("seconds") is not None:
            head += f" ({entry['seconds']} s of {entry.get('budget', '?')} s)"
        lines += [head, ""]
        if entry.get("note"):
            lines += [str(entry["note"]), ""]
        rows = entry.get("rows") or []
        if rows:
            cols = list(dict.fromkeys(k for r in rows for k in r))
            lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
            lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
            lines.append("")
    return "\n".join(lines) + "\n"


# -- phases ---------------------------------------------------------------------------------------


def _device_and_dtype(smoke: bool):
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16
    if not smoke:
        raise SystemExit("no CUDA device")
    return torch.device("cpu"), torch.float32  # the interpreter's bf16 tl.dot is wrong


def _version(name: str) -> str:
    import importlib.metadata as md

    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "missing"


def _minor(version: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", version)[:2])  # "3.6.0+git" -> (3, 6)


def interpreter_fault(triton: str, numpy: str) -> str | None:
    """Why Triton's interpreter cannot run with these versions, or None. Triton before 3.7 converts
    1-element arrays to Python scalars, an error from numpy 2.4 on; compiled kernels are unaffected."""
    if "missing" in (triton, numpy) or _minor(triton) >= (3, 7) or _minor(numpy) < (2, 4):
        return None
    return f"triton {triton}'s interpreter breaks on numpy {numpy} (>= 2.4); the compiled GPU path is unaffected"


def _interpreter_skip(phase: str) -> str | None:
    """The reason to skip a phase that runs Triton kernels, when they would run under a broken interpreter."""
    if phase not in INTERPRETED or os.environ.get("TRITON_INTERPRET") != "1":
        return None
    fault = interpreter_fault(_version("triton"), _version("numpy"))
    return fault and f"skipped, it runs Triton kernels under the interpreter: {fault}"


def phase_env(res: Results, smoke: bool) -> int:
    import torch

    from urfm_fast.model.flops import measured_matmul_flops, peak_flops

    row = dict(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda)
    row.update({n: _version(n) for n in ("triton", "timm", "numpy", "onnxruntime", "pytest")})
    row["cuda_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        row.update(device=props.name, sm=f"{props.major}.{props.minor}", memory_gib=round(props.total_memory / 2**30))
        row["datasheet_bf16_tflops"] = (peak_flops(0) or 0) / 1e12 or None
        row["measured_bf16_matmul_tflops"] = round(measured_matmul_flops() / 1e12, 1)
    res.update("env", row)
    return 0 if torch.cuda.is_available() else 3


def _attention_shapes(smoke: bool):
    # (tokens, heads, head dim): ViT-B encoder, 768d8b decoder, BiomedCLIP teacher
    return ((10, 2, 16), (38, 2, 16)) if smoke else ((50, 12, 64), (197, 16, 48), (197, 12, 64))


def _max_err(a, b) -> float:
    return (a.double() - b.double()).abs().max().item()


def _out_and_grads(fn, tensors, device, dtype) -> list:
    """[out, dq, dk, dv] of fn(q, k, v) with upstream gradient ``do``; tensors = (q, k, v, do) on the CPU."""
    import torch

    *qkv, do = tensors
    xs = [t.to(device, dtype).requires_grad_() for t in qkv]
    out = fn(*xs)
    return [out.detach(), *torch.autograd.grad(out, xs, do.to(device, dtype))]


def _attention_config_rows(device, dtype, smoke: bool):
    """One row per (shape, tile config): max error of out/dq/dk/dv against fp32, flash-attention's rule."""
    import torch

    from urfm_fast.kernels import attention as A
    from urfm_fast.model.kernel_check import ATOL

    batch = 2 if smoke else 8
    for tokens, heads, head_dim in _attention_shapes(smoke):
        configs = {}  # every config any of the three kernels may time at this shape
        for loop_block, accumulators in A.TUNED.values():
            for c in A.prune_tiles(A.gpu_configs(), tokens, loop_block, A.block_d(head_dim), accumulators):
                configs[(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)] = c
        g = torch.Generator().manual_seed(0)
        qkv_do = [torch.randn(batch, heads, tokens, head_dim, generator=g) for _ in range(4)]
        run = lambda fn, dt, _t=qkv_do: _out_and_grads(fn, _t, device, dt)  # noqa: E731
        ref32 = run(lambda *a: A.attention_math_ref(*a, upcast=True), torch.float32)
        same = run(A.attention_ref, dtype)  # SDPA in the same dtype, as the start-up check compares
        for (bm, bn, w, s), config in configs.items():
            row = dict(shape=f"N={tokens} H={heads} Dh={head_dim}", tile=f"{bm}x{bn} w{w} s{s}")
            try:
                with A.forced_config(config):
                    got = run(A.attention, dtype)
            except Exception as e:  # a config that does not compile or launch is a failed row
                yield dict(row, ok=False, error=f"{type(e).__name__}: {str(e)[:160]}")
                continue
            ok = True
            for name, a, b, c in zip(("out", "dq", "dk", "dv"), got, same, ref32, strict=True):
                err, base = _max_err(a, c), _max_err(b, c)
                row[f"{name}_err"] = err
                ok &= bool(torch.isfinite(a).all()) and err <= 2 * base + ATOL[dtype] * c.abs().max().item()
            yield dict(row, ok=ok)


def phase_correctness(res: Results, smoke: bool) -> int:
    import torch

    from urfm_fast.model import ops
    from urfm_fast.model.kernel_check import Shapes, check

    device, dtype = _device_and_dtype(smoke)
    failed = 0
    with ops.use_backend("triton"):
        for row in _attention_config_rows(device, dtype, smoke):
            failed += not row["ok"]
            res.update("correctness", row)
        for r in check(dtype, Shapes.preset("small" if smoke else "vitb"), device):
            failed += not r["ok"]
            res.update("correctness", dict(shape=r["label"], tile="autotuned", tensor=r["tensor"], err=r.get("err"),
                                           bound=r.get("bound"), ok=r["ok"], error=r.get("error")))  # fmt: skip
    res.update("correctness", note=f"{failed} failed rows; dtype {str(dtype).removeprefix('torch.')}")
    torch.cuda.empty_cache() if device.type == "cuda" else None
    return 1 if failed else 0


def phase_kernel_speed(res: Results, smoke: bool) -> int:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from urfm_fast.kernels import attention as A
    from urfm_fast.model.kernel_check import time_fwd_bwd

    device, dtype = _device_and_dtype(smoke)
    batch, reps = (2, 2) if smoke else (256, 10)
    backends = {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
                "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa_math": SDPBackend.MATH}  # fmt: skip
    for tokens, heads, head_dim in _attention_shapes(smoke):
        q, k, v, grad = (torch.randn(batch, heads, tokens, head_dim, device=device, dtype=dtype) for _ in range(4))
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        flops = 3.5 * 4 * batch * heads * tokens * tokens * head_dim  # fwd 2 matmuls + bwd 5 (no recompute)
        impls = {"sdpa_default": F.scaled_dot_product_attention, "triton": A.attention}  # the baseline first
        for name, backend in backends.items():
            impls[name] = lambda *a, _b=backend: _with_sdpa_backend(_b, sdpa_kernel, F, *a)
        sdpa_ms = None
        for name, fn in impls.items():
            row = dict(op="attention fwd+bwd", shape=f"B={batch} N={tokens} H={heads} Dh={head_dim}", impl=name)
            try:
                ms = 1e3 * time_fwd_bwd(fn, q, k, v, grad, reps)
            except Exception as e:  # a backend not built for this GPU / shape
                res.update("kernel_speed", dict(row, error=f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"))
                continue
            sdpa_ms = ms if name == "sdpa_default" else sdpa_ms
            row.update(ms=ms, tflops=flops / ms / 1e9, x_sdpa_default=(sdpa_ms / ms) if sdpa_ms else None)
            res.update("kernel_speed", row)
    _row_kernel_speed(res, device, dtype, batch, reps, smoke)
    return 0


def _with_sdpa_backend(backend, sdpa_kernel, F, q, k, v):
    with sdpa_kernel([backend]):
        return F.scaled_dot_product_attention(q, k, v)


def _row_kernel_speed(res: Results, device, dtype, batch: int, reps: int, smoke: bool) -> None:
    """gather_visible / unshuffle / cosine loss, forward + backward: Triton against torch."""
    import torch

    from urfm_fast.kernels import cosine_loss as C
    from urfm_fast.kernels import gather as G
    from urfm_fast.model.kernel_check import time_fwd_bwd

    N, K, D = (16, 4, 32) if smoke else (196, 49, 768)
    g = torch.Generator().manual_seed(0)
    idx = torch.rand(batch, N, generator=g).argsort(dim=1).to(device)
    randn = lambda *s: torch.randn(*s, generator=g).to(device, dtype)  # noqa: E731
    cases = {
        "gather_visible": ((G.gather_visible, G.gather_visible_ref), randn(batch, N, D), idx[:, :K], randn(1 + N, D),
                           randn(D), randn(batch, 1 + K, D)),
        "unshuffle": ((G.unshuffle, G.unshuffle_ref), randn(batch, 1 + K, D), randn(D), idx.argsort(dim=1),
                      randn(1 + N, D), randn(batch, 1 + N, D)),
        "cosine_loss": ((C.cosine_loss, C.cosine_loss_ref), randn(batch * (N - K), D), randn(batch * (N - K), D),
                        None, None, torch.ones((), device=device)),
    }  # fmt: skip
    for name, ((kernel, ref), a, b, c, d, grad) in cases.items():
        args = [x for x in (b, c, d) if x is not None]
        x = a.requires_grad_()
        times = {}
        for impl, fn in (("torch", ref), ("triton", kernel)):
            # time_fwd_bwd takes (q, k, v): the first is the differentiable input, the rest pass through
            call = lambda x_, *_, _fn=fn, _args=args: _fn(x_, *_args)  # noqa: E731
            times[impl] = 1e3 * time_fwd_bwd(call, x, x, x, grad, reps)
        res.update("kernel_speed", dict(op=f"{name} fwd+bwd", shape=f"B={batch} N={N} K={K} D={D}", impl="triton",
                                        ms=times["triton"], x_torch=times["torch"] / times["triton"]))  # fmt: skip


def _step_rows(res: Results, phase: str, smoke: bool, compile_mode: str | None) -> int:
    import torch

    from bench.reference import ReferenceStep
    from bench.train_step import OurStep
    from urfm_fast import URFMConfig
    from urfm_fast.model import ops
    from urfm_fast.model.flops import peak_flops, train_flops_per_image
    from urfm_fast.model.kernel_check import Shapes, choose_attention

    device, dtype = _device_and_dtype(smoke)
    tiny = dict(img_size=32, depth=1, decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=2)
    cfg = URFMConfig.preset("vit_tiny", **tiny) if smoke else URFMConfig()
    batch, warmup, steps = (2, 1, 1) if smoke else (256, 2, 8)
    amp = dtype if device.type == "cuda" else None
    images = torch.rand(batch, 3, cfg.img_size, cfg.img_size, generator=torch.Generator().manual_seed(0)).to(device)
    flops = train_flops_per_image(cfg) * batch
    peak = peak_flops(device) if device.type == "cuda" else None
    # the start-up choice pretrain makes at this batch; its rows say which attention runs where
    for r in choose_attention(Shapes.of_run(cfg, micro_batch=batch), device, dtype, reps=1 if smoke else 10):
        res.update(phase, dict(row=f"attention choice N={r['tokens']} H={r['heads']} Dh={r['head_dim']}",
                               triton_ms=r["triton_ms"], sdpa_ms=r["sdpa_ms"], choice=r["choice"]))  # fmt: skip
    rows = [("ours, kernels on", "auto")]
    if not compile_mode:
        rows += [("ours, kernels off", "torch"), ("reference", None)]
    for label, backend in rows:
        torch.manual_seed(0)
        t0 = time.perf_counter()
        with ops.use_backend(backend or "torch"):
            if backend is None:
                step = ReferenceStep(cfg, device, amp)
            else:
                step = OurStep(cfg, device, amp, compile_mode=compile_mode,
                               compile_backend="aot_eager" if smoke else "inductor")  # fmt: skip
            first_s = _sync_time(step, images, device, 1)
            res.update(phase, note=f"{label}: first step (compile, autotuning) {first_s:.1f} s")  # kept if cut
            _sync_time(step, images, device, warmup)  # autotuning at this batch, any recompile
            mean_s = _sync_time(step, images, device, steps) / steps
        row = dict(row=f"{label}{', compiled blocks' if compile_mode else ''}", batch=batch, step_ms=1e3 * mean_s,
                   images_per_s=batch / mean_s, tflops=flops / mean_s / 1e12,
                   mfu=(flops / mean_s / peak) if peak else None, first_step_s=first_s,
                   setup_s=time.perf_counter() - t0, peak_mem_gib=_peak_mem(device))  # fmt: skip
        res.update(phase, row)
        del step
        _release(device)
    return 0


def _sync_time(step, images, device, n: int) -> float:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        step(images)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def _peak_mem(device):
    import torch

    if device.type != "cuda":
        return None
    gib = torch.cuda.max_memory_allocated() / 2**30
    torch.cuda.reset_peak_memory_stats()
    return round(gib, 1)


def _release(device) -> None:
    import gc

    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def phase_e2e_eager(res: Results, smoke: bool) -> int:
    return _step_rows(res, "e2e_eager", smoke, None)


def phase_e2e_compiled(res: Results, smoke: bool) -> int:
    return _step_rows(res, "e2e_compiled", smoke, "blocks")


RUNNERS = {"env": phase_env, "correctness": phase_correctness, "kernel_speed": phase_kernel_speed,
           "e2e_eager": phase_e2e_eager, "e2e_compiled": phase_e2e_compiled}  # fmt: skip
INTERPRETED = ("correctness", "kernel_speed")  # nothing but Triton kernels (e2e falls back to SDPA when one fails)
SKIPPED = 77  # a phase that did not run (automake's skip status; gpu_check.sh records "skipped")


def smoke_all(out: Path) -> int:
    """Every phase at tiny shapes in this one process (CPU: interpreter, no inductor): a typo check."""
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before urfm_fast is imported
    res = Results(out)
    failed = []
    for name, runner in RUNNERS.items():
        if skip := _interpreter_skip(name):
            print(f"gpu_check: {name} {skip}")
            res.update(name, status="skipped", note=skip)
            continue
        res.update(name, status="running")
        rc = runner(res, smoke=True)
        res.update(name, status="smoke ok" if rc in (0, 3) else f"smoke exit {rc}")
        failed += [name] if rc not in (0, 3) else []  # env: 3 = no CUDA, expected here
    print(f"smoke run of {len(RUNNERS)} phases: {', '.join(failed) or 'none'} failed; report in {res.md_path}")
    return 1 if failed else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("phase", choices=[*RUNNERS, "record", "smoke"])
    p.add_argument("args", nargs="*", help="record: PHASE STATUS")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--smoke", action="store_true", help="tiny shapes on this machine, to prove the code runs")
    p.add_argument("--budget", type=float)
    p.add_argument("--seconds", type=float)
    p.add_argument("--note", default=None)
    a = p.parse_args(argv)
    if a.phase == "smoke":
        return smoke_all(a.out)
    res = Results(a.out)
    if a.phase == "record":
        if len(a.args) != 2 or a.args[0] not in PHASES:
            p.error(f"record needs PHASE STATUS, PHASE one of {PHASES}")
        fields = dict(status=a.args[1], budget=a.budget, seconds=a.seconds)
        res.update(a.args[0], **({**fields, "note": a.note} if a.note else fields))
        return 0
    if a.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before urfm_fast is imported
    if skip := _interpreter_skip(a.phase):
        print(f"gpu_check: {a.phase} {skip}")
        res.update(a.phase, status="skipped", budget=a.budget, note=skip)
        return SKIPPED
    res.update(a.phase, status="running", budget=a.budget)
    return RUNNERS[a.phase](res, a.smoke)


if __name__ == "__main__":
    sys.exit(main())
