"""Plumbing shared by the kernel files: the guarded triton import and output allocation.

``triton`` is imported here and nowhere else. Where it is missing, ``triton.jit`` becomes a no-op
so the kernel files still import (their torch references stay usable) and ``HAS_TRITON`` is False;
``urfm_fast.model.ops`` then never calls a kernel. Whether the kernels run under the interpreter is
decided by triton when the kernel files are imported, so ``TRITON_INTERPRET=1`` must be set before
the first ``import urfm_fast``.

Caution: ``poison_outputs()`` is a test hook. Inside it, every buffer a launcher allocates for a
kernel to write is filled with NaN first, so an element the kernel forgets to write fails the
test instead of passing with whatever ``torch.empty`` happened to hold.
"""

from __future__ import annotations

import contextlib
import functools

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
    INTERPRET = bool(triton.knobs.runtime.interpret)
except ImportError:  # CPU-only install without triton: keep the definitions parseable

    class _NoTriton:
        constexpr = None  # used as an annotation only

        @staticmethod
        def jit(fn=None, **_):
            return fn if fn is not None else (lambda f: f)

    triton = tl = _NoTriton()
    HAS_TRITON = False
    INTERPRET = False

_poison = False


@contextlib.contextmanager
def poison_outputs():
    """Fill every kernel output buffer with NaN before launch (tests only)."""
    global _poison
    previous, _poison = _poison, True
    try:
        yield
    finally:
        _poison = previous


def empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.empty for a kernel to fill; NaN-filled inside ``poison_outputs``."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if _poison:
        out.fill_(float("nan"))
    return out


def next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def require_triton() -> None:
    if not HAS_TRITON:
        raise RuntimeError("this op needs triton, which cannot be imported here")


def launcher(fn):
    """Decorator for a kernel launcher whose first argument is a tensor: checks that triton is
    there and makes that tensor's GPU the current device while it runs. Triton launches on the
    current device, so without this, tensors on cuda:1 with cuda:0 current would fault."""

    @functools.wraps(fn)
    def wrapped(t: torch.Tensor, *args, **kwargs):
        require_triton()
        if t.is_cuda and t.device.index != torch.cuda.current_device():
            with torch.cuda.device(t.device):
                return fn(t, *args, **kwargs)
        return fn(t, *args, **kwargs)

    return wrapped
