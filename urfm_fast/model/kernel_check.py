"""Every ``urfm_fast.model.ops`` Triton kernel against its torch reference, forward and gradients.

For each op, the kernel and the torch reference in the same dtype are compared with an fp32 ground
truth (the torch reference on the same values upcast), by flash-attention's rule:
``max|kernel - ref32| <= 2 * max|torch_same_dtype - ref32| + atol * max|ref32|``.

Two users: ``bench/check_kernels.py`` prints the table on a GPU machine, and ``pretrain`` calls
``verify_or_fall_back`` once at start-up on CUDA, at the run's own shapes: an op whose kernel fails
to compile or disagrees with torch on this GPU is switched to torch for the run, with a warning,
instead of training on wrong numbers. On CUDA it then times the Triton attention against
``F.scaled_dot_product_attention`` (forward + backward) at the run's micro-batch for every attention
shape of the run (``choose_attention``): where SDPA is faster, that shape runs on SDPA, logged. The
timing also autotunes the kernels at the training batch before anything is compiled.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass

import torch

from urfm_fast.kernels import attention as _attention
from urfm_fast.model import ops

log = logging.getLogger(__name__)

ATOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-5}


@dataclass
class Shapes:
    """Token-level shapes of one run: batch, patches, visible patches, decoder width, attention cases."""

    B: int
    N: int
    K: int
    D: int
    attention: tuple[tuple[int, int, int], ...]  # (tokens, heads, head dim) per distinct attention call
    micro_batch: int = 0  # the run's per-rank batch, where attention speed is compared (0: B)

    @classmethod
    def preset(cls, scale: str) -> Shapes:
        if scale == "vitb":  # the URFM ViT-B/16 recipe: encoder 50 tokens, decoder and teacher 197
            return cls(64, 196, 49, 768, ((50, 12, 64), (197, 16, 48), (197, 12, 64), (37, 5, 64)))
        return cls(3, 37, 9, 48, ((10, 2, 16), (38, 2, 16), (38, 3, 16), (5, 5, 16)))

    @classmethod
    def of_run(cls, cfg, teacher_heads: int = 12, teacher_dim: int = 768, batch: int = 4, micro_batch: int = 0):
        """The shapes a URFMConfig trains at: correctness at a small ``batch`` (it is about tiles), speed
        at ``micro_batch`` (the grid size decides which tile and which implementation win)."""
        n, k = cfg.num_patches, cfg.num_visible
        attention = (
            (1 + k, cfg.num_heads, cfg.embed_dim // cfg.num_heads),
            (1 + n, cfg.decoder_num_heads, cfg.decoder_embed_dim // cfg.decoder_num_heads),
            (1 + n, teacher_heads, teacher_dim // teacher_heads),
        )
        if cfg.decoder == "prompting":  # its queries and keys differ in length: SDPA's (ops.attention), not ours
            attention = attention[::2]
        return cls(batch, n, k, cfg.decoder_embed_dim, tuple(dict.fromkeys(attention)), micro_batch)


def cases(shapes: Shapes, device):
    """(op name, label, fn, inputs: list of (tensor, needs_grad[, "keep32"])), fixed seed."""
    B, N, K, D = shapes.B, shapes.N, shapes.K, shapes.D
    g = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device)

    ids = torch.argsort(torch.rand(B, N, generator=g), dim=1).to(device)
    ids_restore = torch.argsort(ids, dim=1)
    M = B * (N - K)
    out = [
        ("gather_tokens", "gather_tokens", ops.gather_tokens, [(randn(B, 1 + N, D), True), (ids[:, K:] + 1, False)]),
        ("gather_visible", "gather_visible", ops.gather_visible,
         [(randn(B, N, D), True), (ids[:, :K], False), (randn(1 + N, D), True), (randn(D), True)]),
        ("unshuffle", "unshuffle", ops.unshuffle,
         [(randn(B, 1 + K, D), True), (randn(D), True), (ids_restore, False), (randn(1 + N, D), True)]),
        ("cosine_loss", "cosine_loss", ops.cosine_loss, [(randn(M, D), True), (randn(M, D), False)]),
        # As in training: low-precision predictions from autocast, fp32 teacher targets ("keep32").
        ("cosine_loss", "cosine_loss fp32 target", ops.cosine_loss,
         [(randn(M, D), True), (randn(M, D), False, "keep32")]),
    ]  # fmt: skip
    for tokens, heads, head_dim in shapes.attention:
        q, k, v = (randn(B, heads, tokens, head_dim) for _ in range(3))
        label = f"attention T={tokens} H={heads} Dh={head_dim}"
        out.append(("attention", label, ops.attention, [(q, True), (k, True), (v, True)]))
    return out


def _run(fn, inputs, dtype, backend, grad_out=None):
    xs = []
    for t, needs_grad, *keep32 in inputs:
        if t.is_floating_point() and not keep32:
            t = t.to(dtype).detach().requires_grad_(needs_grad)
        xs.append(t)
    with ops.use_backend(backend):
        out = fn(*xs)
        if grad_out is None:
            grad_out = torch.randn_like(out, dtype=torch.float32)
        wrt = [x for x in xs if x.is_floating_point() and x.requires_grad]
        grads = torch.autograd.grad(out, wrt, grad_out.to(out.dtype))
    return out.detach().float(), [gr.float() for gr in grads], grad_out


def _max_err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def check(dtype: torch.dtype, shapes: Shapes, device) -> list[dict]:
    """One row per (case, tensor): op, label, tensor, err, base, bound, ok (and error text on failure)."""
    rows = []
    for op, label, fn, inputs in cases(shapes, device):
        torch.manual_seed(1)
        try:
            ref32, g32, grad_out = _run(fn, inputs, torch.float32, "torch")
            same, g_same, _ = _run(fn, inputs, dtype, "torch", grad_out)
            out, g_out, _ = _run(fn, inputs, dtype, "triton", grad_out)
        except Exception as e:  # a kernel that does not compile or launch is a failed check, not a crash
            rows.append(dict(op=op, label=label, tensor="-", ok=False, error=f"{type(e).__name__}: {str(e)[:120]}"))
            continue
        grads = [(f"grad{i}", a, b, c) for i, (a, b, c) in enumerate(zip(g_out, g_same, g32))]
        for tensor, k_val, s_val, r_val in [("out", out, same, ref32), *grads]:
            err, base = _max_err(k_val, r_val), _max_err(s_val, r_val)
            # atol relative to the fp32 value's max, with no floor: cosine-loss gradients are ~1e-5,
            # so an absolute floor would pass almost any finite gradient.
            bound = 2 * base + ATOL[dtype] * r_val.abs().max().item()
            ok = bool(torch.isfinite(k_val).all()) and err <= bound
            rows.append(dict(op=op, label=label, tensor=tensor, err=err, base=base, bound=bound, ok=ok))
    return rows


def markdown(rows: list[dict], dtype: torch.dtype) -> list[str]:
    dt = str(dtype).removeprefix("torch.")
    lines = [
        "| op | dtype | tensor | max err kernel | max err torch same dtype | bound | ok |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['label']} | {dt} | - | {r['error'][:80]} | - | - | FAIL |")
        else:
            verdict = "ok" if r["ok"] else "FAIL"
            errs = f"{r['err']:.3g} | {r['base']:.3g} | {r['bound']:.3g}"
            lines.append(f"| {r['label']} | {dt} | {r['tensor']} | {errs} | {verdict} |")
    return lines


def time_fwd_bwd(fn, q, k, v, grad, reps: int = 10) -> float:
    """Median seconds of ``fn(q, k, v).backward(grad)`` after two untimed calls (the first autotunes)."""
    cuda = q.is_cuda

    def call():
        for t in (q, k, v):
            t.grad = None
        fn(q, k, v).backward(grad)

    call(), call()
    times = []
    for _ in range(reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            call()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def choose_attention(shapes: Shapes, device, dtype: torch.dtype, reps: int = 10) -> list[dict]:
    """Time Triton against SDPA per attention shape at the micro-batch; route SDPA's wins to SDPA.

    One row per shape: tokens, heads, head_dim, batch, triton_ms, sdpa_ms, choice ('triton' | 'sdpa').
    A kernel that raises counts as a loss (its error text goes into the row and the log).
    """
    batch = shapes.micro_batch or shapes.B
    g = torch.Generator(device="cpu").manual_seed(0)
    rows = []
    for tokens, heads, head_dim in shapes.attention:
        q, k, v, grad = (torch.randn(batch, heads, tokens, head_dim, generator=g).to(device, dtype) for _ in range(4))
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        row = dict(tokens=tokens, heads=heads, head_dim=head_dim, batch=batch, triton_ms=None)
        row["sdpa_ms"] = 1e3 * time_fwd_bwd(_attention.attention_ref, q, k, v, grad, reps)
        if ops.attention_on_sdpa(q.device.type, dtype, tuple(q.shape)):
            rows.append(dict(row, choice="sdpa"))  # fp32 on a GPU: SDPA by rule, nothing to time
            continue
        try:
            row["triton_ms"] = 1e3 * time_fwd_bwd(_attention.attention, q, k, v, grad, reps)
        except Exception as e:  # no kernel image, out of resources ...: SDPA it is
            row["error"] = f"{type(e).__name__}: {str(e)[:120]}"
        if row["triton_ms"] is None or row["triton_ms"] > row["sdpa_ms"]:
            row["choice"] = "sdpa"
            why = row.get("error") or f"{row['sdpa_ms']:.3f} ms against Triton's {row['triton_ms']:.3f} ms"
            ops.prefer_sdpa(tokens, heads, head_dim, dtype, f"{why} (forward + backward, batch {batch})")
        else:
            row["choice"] = "triton"
            log.info("urfm_fast: attention N=%d H=%d Dh=%d stays on Triton: %.3f ms against SDPA's %.3f ms",
                     tokens, heads, head_dim, row["triton_ms"], row["sdpa_ms"])  # fmt: skip
        rows.append(row)
    return rows


def verify_or_fall_back(shapes: Shapes, device, dtype: torch.dtype, compare_speed: bool | None = None) -> list[str]:
    """Check every kernel at these shapes; switch the failing ops to torch. Returns their names.

    Then, by default on CUDA only, ``choose_attention`` at ``shapes.micro_batch`` (if attention passed).
    """
    failed = sorted({r["op"] for r in check(dtype, shapes, device) if not r["ok"]})
    for op in failed:
        ops.disable_triton(op, f"its Triton kernel failed the start-up check on {device} in {dtype}")
    if compare_speed is None:
        compare_speed = torch.device(device).type == "cuda"
    if compare_speed and "attention" not in failed:
        choose_attention(shapes, device, dtype)
    return failed
