"""Correctness of every urfm_fast.model.ops kernel against its torch reference, forward and gradients.

    python bench/check_kernels.py [--dtype bfloat16] [--scale vitb|small] [-o kernels.md]

For each op the Triton kernel (``URFM_KERNELS=triton``) and the torch reference in the same dtype
are compared with an fp32 ground truth (the torch reference on the same values upcast), with
flash-attention's rule: ``max|kernel - ref32| <= 2 * max|torch_same_dtype - ref32| + atol``.
On a GPU this checks the compiled kernels in bf16 at ViT-B shapes; on CPU run it with
``TRITON_INTERPRET=1 --dtype float32 --scale small`` (the interpreter's bf16 ``tl.dot`` is wrong).
Writes a markdown table; exits 1 if any check fails. The checks live in ``urfm_fast.model.kernel_check``,
which training also runs once at start-up on a GPU.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from urfm_fast.model.kernel_check import Shapes, check, markdown


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--scale", default=None, choices=["vitb", "small"], help="default: vitb on CUDA, else small")
    p.add_argument("-o", "--output", type=Path)
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    scale = args.scale or ("vitb" if device.type == "cuda" else "small")
    dtype = getattr(torch, args.dtype)
    rows = check(dtype, Shapes.preset(scale), device)
    ok = all(r["ok"] for r in rows)
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu (Triton interpreter)"
    header = f"Kernel correctness on {name}, scale {scale}: {'all ok' if ok else 'FAILURES'}"
    text = "\n".join([header, "", *markdown(rows, dtype)])
    if args.output:
        args.output.write_text(text + "\n")
    print(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
