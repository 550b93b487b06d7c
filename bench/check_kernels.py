"""Correctness of every urfm_fast.ops kernel against its torch reference, forward and gradients.

    python bench/check_kernels.py [--dtype bfloat16] [--scale vitb|small] [-o kernels.md]

For each op the Triton kernel (``URFM_KERNELS=triton``) and the torch reference in the same dtype
are compared with an fp32 ground truth (the torch reference on the same values upcast), with
flash-attention's rule: ``max|kernel - ref32| <= 2 * max|torch_same_dtype - ref32| + atol``.
On a GPU this checks the compiled kernels in bf16 at ViT-B shapes; on CPU run it with
``TRITON_INTERPRET=1 --dtype float32 --scale small`` (the interpreter's bf16 ``tl.dot`` is wrong).
Writes a markdown table; exits 1 if any check fails.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from urfm_fast import ops

ATOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-5}


def _cases(scale: str, device):
    """(name, fn(*inputs) -> output, inputs: list of (tensor, needs_grad[, "keep32"]))."""
    if scale == "vitb":
        B, N, K, D, H, Dh = 64, 196, 49, 768, 12, 64
    else:
        B, N, K, D, H, Dh = 3, 37, 9, 48, 2, 16
    g = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device)

    def perm(b, n):
        return torch.argsort(torch.rand(b, n, generator=g), dim=1).to(device)

    ids = perm(B, N)
    ids_restore = torch.argsort(ids, dim=1)
    cases = [
        ("gather_tokens", ops.gather_tokens, [(randn(B, 1 + N, D), True), (ids[:, K:] + 1, False)]),
        ("gather_visible", ops.gather_visible,
         [(randn(B, N, D), True), (ids[:, :K], False), (randn(1 + N, D), True), (randn(D), True)]),
        ("unshuffle", ops.unshuffle,
         [(randn(B, 1 + K, D), True), (randn(D), True), (ids_restore, False), (randn(1 + N, D), True)]),
        ("cosine_loss", ops.cosine_loss, [(randn(B * (N - K), D), True), (randn(B * (N - K), D), False)]),
        # As in training: bf16 predictions from autocast, fp32 teacher targets ("keep32").
        ("cosine_loss fp32 target", ops.cosine_loss,
         [(randn(B * (N - K), D), True), (randn(B * (N - K), D), False, "keep32")]),
    ]  # fmt: skip
    for tokens, heads in ((1 + K, H), (1 + N, H), (1 + N, 16 if scale == "vitb" else 3)):
        q, k, v = (randn(B, heads, tokens, Dh) for _ in range(3))
        cases.append((f"attention T={tokens} H={heads}", ops.attention, [(q, True), (k, True), (v, True)]))
    odd = 37 if scale == "vitb" else 5
    q, k, v = (randn(3, 5, odd, Dh) for _ in range(3))
    cases.append((f"attention T={odd} (ragged)", ops.attention, [(q, True), (k, True), (v, True)]))
    return cases


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


def check(dtype: torch.dtype, scale: str, device) -> tuple[list[str], bool]:
    lines = [
        "| op | dtype | tensor | max err kernel | max err torch same dtype | bound | ok |",
        "|---|---|---|---|---|---|---|",
    ]
    ok_all = True
    for name, fn, inputs in _cases(scale, device):
        torch.manual_seed(1)
        try:
            ref32, g32, grad_out = _run(fn, inputs, torch.float32, "torch")
            same, g_same, _ = _run(fn, inputs, dtype, "torch", grad_out)
            out, g_out, _ = _run(fn, inputs, dtype, "triton", grad_out)
        except Exception as e:  # report the failure and go on with the other ops
            lines.append(f"| {name} | {dtype} | - | {type(e).__name__}: {str(e)[:80]} | - | - | FAIL |")
            ok_all = False
            continue
        grads = [(f"grad{i}", a, b, c) for i, (a, b, c) in enumerate(zip(g_out, g_same, g32))]
        pairs = [("out", out, same, ref32)] + grads
        for tensor, k_val, s_val, r_val in pairs:
            err, base = _max_err(k_val, r_val), _max_err(s_val, r_val)
            # atol relative to the fp32 value's max, with no floor: cosine-loss gradients are ~1e-5,
            # so an absolute floor would pass almost any finite gradient.
            atol = ATOL[dtype] * r_val.abs().max().item()
            bound = 2 * base + atol
            ok = bool(torch.isfinite(k_val).all()) and err <= bound
            ok_all &= ok
            dt = str(dtype).removeprefix("torch.")
            verdict = "ok" if ok else "FAIL"
            lines.append(f"| {name} | {dt} | {tensor} | {err:.3g} | {base:.3g} | {bound:.3g} | {verdict} |")
    return lines, ok_all


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--scale", default=None, choices=["vitb", "small"], help="default: vitb on CUDA, else small")
    p.add_argument("-o", "--output", type=Path)
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    scale = args.scale or ("vitb" if device.type == "cuda" else "small")
    lines, ok = check(getattr(torch, args.dtype), scale, device)
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu (Triton interpreter)"
    text = "\n".join([f"Kernel correctness on {name}, scale {scale}: {'all ok' if ok else 'FAILURES'}", "", *lines])
    if args.output:
        args.output.write_text(text + "\n")
    print(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
