"""Test-session setup shared by every test file.

The Triton kernels run under triton's interpreter on CPU tensors when no GPU is present. Triton
decides that when a kernel is defined (at ``import urfm_fast``), so the variable is set here,
before any test module imports the package. On a CUDA machine the kernels compile for the GPU
instead; export TRITON_INTERPRET=1 to force the interpreter there too.

On a CUDA machine every test runs: the kernel tests on the GPU (``kernel_device``), in bf16 where a
CPU run uses fp32 (``kernel_dtype``: the interpreter's bf16 ``tl.dot`` is wrong, and fp32 attention
on a GPU is SDPA's, not the kernel's), and a test that only makes sense under the interpreter is
marked ``interpreter_only`` and skipped there.
"""

import os
import signal

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# A suite started in the background by a non-interactive shell (`cmd &`, nohup) inherits SIGINT ignored, and
# so does every process a test starts (an ignored signal survives exec): the Ctrl-C tests would then wait for
# a run that never stops, or skip. Ctrl-C here is what it is in a terminal.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

import pytest  # noqa: E402

INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
interpreter_only = pytest.mark.skipif(not INTERPRETER, reason="CPU-only: checks the kernels under the interpreter")


@pytest.fixture
def kernel_device() -> torch.device:
    """Where the Triton kernels under test run: the GPU, or the CPU under the interpreter."""
    return torch.device("cpu" if INTERPRETER else "cuda")


@pytest.fixture
def kernel_dtype() -> torch.dtype:
    """The dtype a kernel test runs in: fp32 under the interpreter (exact), bf16 on a GPU (training's)."""
    return torch.float32 if INTERPRETER else torch.bfloat16


@pytest.fixture
def close_to_fp32():
    """flash-attention's rule: max|out - ref32| <= 2 * max|ref_same_dtype - ref32| + atol.

    ``ref_same`` is the torch reference run in the kernel's dtype, ``ref32`` the same in fp32; so
    the kernel may be at most twice as wrong as torch itself is at that precision.
    """

    def check(out: torch.Tensor, ref_same: torch.Tensor, ref32: torch.Tensor, atol: float, name: str = ""):
        assert out.shape == ref32.shape, (name, out.shape, ref32.shape)
        assert torch.isfinite(out).all(), f"{name}: non-finite values"
        err = (out.double() - ref32.double()).abs().max().item() if out.numel() else 0.0
        base = (ref_same.double() - ref32.double()).abs().max().item() if out.numel() else 0.0
        assert err <= 2 * base + atol, f"{name}: max err {err:.3g} > 2 * {base:.3g} + {atol:g}"

    return check
