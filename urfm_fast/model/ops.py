"""The URFM hot path behind one switch: Triton kernels or their torch references.

Every op is differentiable and keeps the signature of its torch reference in ``urfm_fast.kernels``.

    URFM_KERNELS=auto    Triton for CUDA tensors (sm80+, triton importable), torch otherwise
    URFM_KERNELS=triton  always Triton; with TRITON_INTERPRET=1 this runs on CPU tensors
    URFM_KERNELS=torch   always the torch references

Tests flip the backend with ``set_backend`` or the ``use_backend`` context manager. A single op can
be sent back to torch with ``disable_triton`` (training does this when a kernel fails its start-up
check on the GPU at hand, see urfm_fast.model.kernel_check). Attention has two more routes to
``F.scaled_dot_product_attention``: fp32 on a GPU always, and any shape for which ``prefer_sdpa``
was called (the start-up check does, where SDPA beats the Triton kernel at the run's batch).
"""

from __future__ import annotations

import contextlib
import logging
import os

import torch

# Each kernel file holds the torch reference and its Triton op side by side. Importing them does
# not need triton: urfm_fast.kernels._triton guards the import and HAS_TRITON says whether it worked.
from urfm_fast.kernels import attention as _attention
from urfm_fast.kernels import cosine_loss as _cosine_loss
from urfm_fast.kernels import gather as _gather
from urfm_fast.kernels._triton import HAS_TRITON
from urfm_fast.kernels.attention import attention_ref
from urfm_fast.kernels.cosine_loss import cosine_loss_ref
from urfm_fast.kernels.gather import gather_tokens_ref, gather_visible_ref, unshuffle_ref

log = logging.getLogger(__name__)

BACKENDS = ("auto", "triton", "torch")
OPS = ("gather_tokens", "gather_visible", "unshuffle", "attention", "cosine_loss")


def _backend_from_env() -> str:
    name = os.environ.get("URFM_KERNELS", "auto").lower()
    if name not in BACKENDS:
        raise ValueError(f"URFM_KERNELS={name!r}; expected one of {BACKENDS}")
    return name


# Resolved at import, not on first use: the first op call may happen inside a torch.compile'd
# block, where a lazy initialisation (and its log line) would become a permanent graph break.
_backend: str = _backend_from_env()
_logged = False


def get_backend() -> str:
    global _logged
    if not _logged and not torch.compiler.is_compiling():
        _logged = True
        # the default says nothing on every command's stderr; a chosen backend, or a DEBUG log, says which ran
        level = logging.DEBUG if _backend == "auto" else logging.INFO
        log.log(level, "urfm_fast kernels backend: %s (triton available: %s)", _backend, triton_available())
    return _backend


def set_backend(name: str) -> None:
    if name not in BACKENDS:
        raise ValueError(f"backend {name!r}; expected one of {BACKENDS}")
    global _backend
    _backend = name


@contextlib.contextmanager
def use_backend(name: str):
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def triton_available() -> bool:
    return HAS_TRITON


def _cuda_sm80(device_index: int) -> bool:
    # Device properties are constants to torch.compile, so this check does not break a graph.
    return torch.cuda.get_device_properties(device_index).major >= 8


# Ops switched to torch for this process because their kernel failed a check on this machine
# (urfm_fast.model.kernel_check.verify_or_fall_back); set before any compile, so graphs see it as constant.
_disabled: set[str] = set()


def disable_triton(op: str, reason: str) -> None:
    """Run ``op`` on the torch reference from now on, whatever the backend says."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; expected one of {OPS}")
    if op not in _disabled:
        _disabled.add(op)
        log.warning("urfm_fast: %s falls back to torch: %s", op, reason)


def enable_triton(op: str | None = None) -> None:
    """Undo ``disable_triton`` for one op, or for all."""
    _disabled.difference_update(OPS if op is None else (op,))


def use_triton(t: torch.Tensor, op: str | None = None) -> bool:
    """Whether ``op`` on tensor ``t`` should run the Triton kernel."""
    backend = get_backend()
    if backend == "torch" or op in _disabled:
        return False
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("URFM_KERNELS=triton but triton cannot be imported")
        return True
    return t.is_cuda and triton_available() and _cuda_sm80(t.device.index or 0)


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [B,N,D], idx [B,K] int64 -> [B,K,D]."""
    if use_triton(x, "gather_tokens"):
        return _gather.gather_tokens(x, idx)
    return gather_tokens_ref(x, idx)


def gather_visible(x: torch.Tensor, idx: torch.Tensor, pos: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
    """Encoder input: x [B,N,D], idx [B,K], pos [1+N,D], cls [D] -> [B,1+K,D] (CLS first, pos added)."""
    if use_triton(x, "gather_visible"):
        return _gather.gather_visible(x, idx, pos, cls)
    return gather_visible_ref(x, idx, pos, cls)


def unshuffle(x: torch.Tensor, mask_token: torch.Tensor, ids_restore: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Decoder input: x [B,1+K,D], mask_token [D], ids_restore [B,N], pos [1+N,D] -> [B,1+N,D]."""
    if use_triton(x, "unshuffle"):
        return _gather.unshuffle(x, mask_token, ids_restore, pos)
    return unshuffle_ref(x, mask_token, ids_restore, pos)


# Attention shapes (N, H, Dh, dtype) that run on SDPA because the Triton kernel was slower there on
# this GPU (urfm_fast.model.kernel_check.choose_attention); set before any compile, like _disabled.
_sdpa_shapes: set[tuple] = set()


def prefer_sdpa(n_tokens: int, heads: int, head_dim: int, dtype: torch.dtype, reason: str) -> None:
    """Run attention of this shape on F.scaled_dot_product_attention from now on."""
    key = (n_tokens, heads, head_dim, dtype)
    if key not in _sdpa_shapes:
        _sdpa_shapes.add(key)
        log.warning("urfm_fast: attention N=%d H=%d Dh=%d %s runs on SDPA: %s", *key[:3], dtype, reason)


def clear_sdpa_preferences() -> None:
    _sdpa_shapes.clear()


def attention_on_sdpa(device_type: str, dtype: torch.dtype, shape: tuple) -> bool:
    """Whether attention of this kind goes to SDPA even where the Triton kernels are selected.

    fp32 on a GPU always does: exact (ieee) fp32 tiles spill and overflow shared memory, and SDPA's
    fp32 path is the faster one anyway. Under the interpreter (CPU) fp32 stays on the kernel: that
    is how the tests check it exactly.
    """
    if device_type == "cuda" and dtype == torch.float32:
        return True
    _, heads, n_tokens, head_dim = shape
    return (n_tokens, heads, head_dim, dtype) in _sdpa_shapes


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q [B,H,Lq,Dh], k and v [B,H,Lk,Dh] -> softmax(q k^T / sqrt(Dh)) v, [B,H,Lq,Dh].

    Lq != Lk (the prompting decoder: mask-token queries over all tokens) always runs on SDPA: the
    Triton kernel is self-attention only, and that call is the small part of a step (N-K queries in
    the decoder, none in the encoder), so a second kernel family would add autotuning and test surface
    for little time; SDPA's flash/efficient backends handle the unequal lengths on the GPU.
    """
    if q.shape[2] != k.shape[2]:
        return attention_ref(q, k, v)
    if use_triton(q, "attention") and not attention_on_sdpa(q.device.type, q.dtype, tuple(q.shape)):
        return _attention.attention(q, k, v)
    return attention_ref(q, k, v)


def cosine_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    target_norm: bool = False,
) -> torch.Tensor:
    """pred [M,D], target [M,D] -> scalar fp32 mean(1 - cos); no gradient to target."""
    if use_triton(pred, "cosine_loss"):
        return _cosine_loss.cosine_loss(pred, target, weight, target_norm)
    return cosine_loss_ref(pred, target, weight, target_norm)
