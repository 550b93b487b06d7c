"""Masked-token gather and the decoder's un-shuffle.

MAE-style masking keeps a fixed number K of the N patch tokens per image. The encoder input is
those K tokens (plus CLS) with their position embedding; the decoder input puts the encoder's
outputs back in image order with a shared ``mask_token`` at the masked positions, then adds the
decoder position embedding. The torch references below are what every CPU run executes and what
the kernels are tested against.

The Triton versions do each of the three in one pass over the rows, forward and backward:
- ``gather_tokens``: forward copies rows; backward is a scatter-add made deterministic by sorting
  the indices once (``torch.sort``, [B,K] integers) so every destination row is written by exactly
  one program as an fp32 sum of its sources, in a fixed order. No atomics, bit-reproducible, and
  rows nobody gathered are written as zeros rather than needing a memset first.
- ``gather_visible``: gather + ``pos`` add + CLS row in one write; backward is the same segmented
  sum, and the same program also reduces the position-embedding gradient over the batch.
- ``unshuffle``: one read of the encoder rows and one write of the decoder input; backward reads
  the upstream gradient once and produces the gradients of x, mask_token and pos together.

Limits: x's last dimension must be contiguous (other strides are free, so views work); indices
int64 (int32 is widened). Batch reductions (pos, cls, mask_token grads) accumulate in fp32 and
are split over at most a few dozen partial sums that torch adds up.

Caution: indices are bounds-checked only for CPU tensors; checking CUDA indices would need a
device sync, so an out-of-range index on GPU reads garbage or faults, as in a raw CUDA gather.
Caution: ``unshuffle`` requires ``ids_restore[b]`` to be a permutation of 0..N-1 (the argsort
of the masking noise, as in MAE). Its backward stores, rather than accumulates, the gradient of
each visible token (checked for CPU tensors only).
"""

import torch

from urfm_fast.kernels._triton import INTERPRET, empty, launcher, next_power_of_2, tl, triton

# --------------------------------------------------------------------------------------------
# torch references
# --------------------------------------------------------------------------------------------


def gather_tokens_ref(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [B,N,D], idx [B,K] int64 -> x[b, idx[b,k]] as [B,K,D]. Backward scatter-adds."""
    return torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def gather_visible_ref(x: torch.Tensor, idx: torch.Tensor, pos: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
    """Encoder input. x [B,N,D] patch tokens, idx [B,K] visible ids, pos [1+N,D], cls [D] -> [B,1+K,D].

    out[:, 0] = cls + pos[0];  out[b, 1+k] = x[b, idx[b,k]] + pos[1 + idx[b,k]].
    """
    B = x.shape[0]
    vis = gather_tokens_ref(x + pos[1:], idx)  # (B, K, D)
    head = (cls + pos[0]).expand(B, 1, -1)  # (B, 1, D)
    return torch.cat([head, vis], dim=1)


def unshuffle_ref(
    x: torch.Tensor, mask_token: torch.Tensor, ids_restore: torch.Tensor, pos: torch.Tensor
) -> torch.Tensor:
    """Decoder input. x [B,1+K,D] (CLS first), mask_token [D], ids_restore [B,N], pos [1+N,D] -> [B,1+N,D].

    out[:, 0] = x[:, 0] + pos[0]; for r = ids_restore[b,n]:
    out[b, 1+n] = (x[b, 1+r] if r < K else mask_token) + pos[1+n].
    """
    B, K1, D = x.shape
    N = ids_restore.shape[1]
    masked = mask_token.to(x.dtype).expand(B, N - (K1 - 1), D)  # (B, N-K, D)
    full = torch.cat([x[:, 1:], masked], dim=1)  # (B, N, D) in shuffled order
    full = gather_tokens_ref(full, ids_restore)  # (B, N, D) in image order
    return torch.cat([x[:, :1], full], dim=1) + pos.to(x.dtype)


# --------------------------------------------------------------------------------------------
# Triton kernels. Every program handles ROWS output rows x BLOCK_D columns; offsets that scale
# with the batch are int64 so B*N*D beyond 2**31 elements stays correct.
# --------------------------------------------------------------------------------------------


@triton.jit
def _gather_fwd_kernel(
    x_ptr,  # [B, N, D] strides (stride_xb, stride_xn, 1)
    idx_ptr,  # [B, K] int64, contiguous
    pos_ptr,  # [1+N, D] strides (stride_pn, 1) (read only if HEAD)
    cls_ptr,  # [D] (read only if HEAD)
    out_ptr,  # [B, HEAD+K, D] contiguous
    n_rows,  # B * (HEAD + K)
    K,
    D,
    stride_xb,
    stride_xn,
    stride_pn,
    HEAD: tl.constexpr,  # 0: plain gather; 1: CLS row first and pos added (encoder input)
    ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # flat b * (HEAD+K) + j
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < n_rows
    col_ok = cols < D
    mask = row_ok[:, None] & col_ok[None, :]
    b = rows // (K + HEAD)
    k = rows % (K + HEAD) - HEAD  # position in idx; -1 on the CLS row
    is_tok = row_ok & (k >= 0)
    src = tl.load(idx_ptr + b * K + k, mask=is_tok, other=0)  # masked on CLS rows: K may be 0
    x_rows = x_ptr + b * stride_xb + src * stride_xn
    tok = tl.load(x_rows[:, None] + cols[None, :], mask=is_tok[:, None] & col_ok[None, :], other=0.0)
    if HEAD:
        cls = tl.load(cls_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        tok = tl.where((k < 0)[:, None], cls[None, :], tok.to(tl.float32))
        pos_row = tl.where(k < 0, 0, 1 + src)
        tok += tl.load(pos_ptr + (pos_row * stride_pn)[:, None] + cols[None, :], mask=mask).to(tl.float32)
    tl.store(out_ptr + rows[:, None] * D + cols[None, :], tok.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _unshuffle_fwd_kernel(
    x_ptr,  # [B, 1+K, D] strides (stride_xb, stride_xn, 1); row 0 is CLS
    mask_ptr,  # [D] mask_token
    ids_ptr,  # [B, N] int64 ids_restore, contiguous
    pos_ptr,  # [1+N, D] strides (stride_pn, 1)
    out_ptr,  # [B, 1+N, D] contiguous
    n_rows,  # B * (1 + N)
    N,
    K,
    D,
    stride_xb,
    stride_xn,
    stride_pn,
    ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # flat b * (1+N) + j
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < n_rows
    col_ok = cols < D
    b = rows // (N + 1)
    j = rows % (N + 1)
    r = tl.load(ids_ptr + b * N + j - 1, mask=row_ok & (j > 0), other=0)  # CLS row: nothing to read
    src = tl.where(j == 0, 0, 1 + r)  # row of x, when the token is not masked
    from_x = (j == 0) | (r < K)
    tok = tl.load(
        x_ptr + (b * stride_xb + src * stride_xn)[:, None] + cols[None, :],
        mask=(row_ok & from_x)[:, None] & col_ok[None, :],
        other=0.0,
    ).to(tl.float32)
    # the reference casts mask_token to x's dtype before adding
    mtok = tl.load(mask_ptr + cols, mask=col_ok, other=0.0).to(x_ptr.dtype.element_ty).to(tl.float32)
    tok = tl.where(from_x[:, None], tok, mtok[None, :])
    mask = row_ok[:, None] & col_ok[None, :]
    p = tl.load(pos_ptr + (j * stride_pn)[:, None] + cols[None, :], mask=mask)
    tok += p.to(x_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + rows[:, None] * D + cols[None, :], tok.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _segment_sum_kernel(
    g_ptr,  # [B, K, D] upstream gradient rows, strides (stride_gb, stride_gk, 1)
    order_ptr,  # [B, K] int64: argsort of idx along K (stable)
    bounds_ptr,  # [B, R+1] int64: sources of row r are order[b, bounds[b,r] : bounds[b,r+1]]
    dx_ptr,  # [B, R, D] contiguous, written in full
    colsum_ptr,  # [S, R, D] fp32: sum over this split's batch rows of dx (only if HAS_COLSUM)
    B,
    K,
    R,
    D,
    stride_gb,
    stride_gk,
    b_per_split,
    HAS_COLSUM: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # grid (splits * R, D tiles): without colsum there is one split per batch row, and B can
    # exceed grid.z's 65535
    r = tl.program_id(0) % R
    split = tl.program_id(0) // R
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    col_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    b_lo = split * b_per_split
    for b in range(b_lo, tl.minimum(b_lo + b_per_split, B)):
        b64 = tl.cast(b, tl.int64)
        lo = tl.load(bounds_ptr + b64 * (R + 1) + r)
        hi = tl.load(bounds_ptr + b64 * (R + 1) + r + 1)
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for t in range(lo, hi):  # fixed order: deterministic sums for duplicate indices
            k = tl.load(order_ptr + b64 * K + t)
            acc += tl.load(g_ptr + b64 * stride_gb + k * stride_gk + cols, mask=col_ok).to(tl.float32)
        tl.store(dx_ptr + (b64 * R + r) * D + cols, acc.to(dx_ptr.dtype.element_ty), mask=col_ok)
        col_acc += acc
    if HAS_COLSUM:
        tl.store(colsum_ptr + (split.to(tl.int64) * R + r) * D + cols, col_acc, mask=col_ok)


@triton.jit
def _unshuffle_bwd_kernel(
    g_ptr,  # [B, 1+N, D] upstream gradient, strides (stride_gb, stride_gn, 1)
    ids_ptr,  # [B, N] int64 ids_restore, contiguous
    dx_ptr,  # [B, 1+K, D] contiguous; every row written once (ids_restore is a permutation)
    dpos_ptr,  # [S, 1+N, D] fp32 partial batch sums of g
    dmask_ptr,  # [S, 1+N, D] fp32 partial batch sums of g at masked positions
    B,
    N,
    K,
    D,
    stride_gb,
    stride_gn,
    b_per_split,
    BLOCK_D: tl.constexpr,
):
    j = tl.program_id(0)  # decoder row, 0 = CLS
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    split = tl.program_id(2)
    col_ok = cols < D
    pos_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    mask_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    b_lo = split * b_per_split
    for b in range(b_lo, tl.minimum(b_lo + b_per_split, B)):
        b64 = tl.cast(b, tl.int64)
        g = tl.load(g_ptr + b64 * stride_gb + j.to(tl.int64) * stride_gn + cols, mask=col_ok, other=0.0)
        r = tl.load(ids_ptr + b64 * N + j - 1, mask=j > 0, other=0)  # CLS row: nothing to read
        to_x = (j == 0) | (r < K)
        dst = tl.where(j == 0, 0, 1 + r)
        tl.store(dx_ptr + (b64 * (K + 1) + dst) * D + cols, g.to(dx_ptr.dtype.element_ty), mask=col_ok & to_x)
        g = g.to(tl.float32)
        pos_acc += g
        mask_acc += tl.where(to_x, 0.0, g)
    out = (split.to(tl.int64) * (N + 1) + j) * D + cols
    tl.store(dpos_ptr + out, pos_acc, mask=col_ok)
    tl.store(dmask_ptr + out, mask_acc, mask=col_ok)


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------

ROWS_PER_PROGRAM = 4  # rows per program in the forward copies


def copy_block_d(D: int) -> int:
    return min(next_power_of_2(D), 1024)


def warps_for(block_d: int) -> int:
    return 8 if block_d >= 1024 else 4


def _check_rows(name: str, t: torch.Tensor, ndim: int) -> torch.Tensor:
    if t.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be floating point, got {t.dtype}")
    return t if t.stride(-1) == 1 else t.contiguous()


def _check_index(name: str, idx: torch.Tensor, B: int, n_valid: int, device: torch.device) -> torch.Tensor:
    if idx.ndim != 2 or idx.shape[0] != B:
        raise ValueError(f"{name} must be [B={B}, K], got shape {tuple(idx.shape)}")
    if idx.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{name} must be int64 (or int32), got {idx.dtype}")
    if idx.device != device:
        raise ValueError(f"{name} is on {idx.device}, the tokens on {device}")
    if idx.device.type == "cpu" and idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n_valid):
        raise ValueError(f"{name} values must lie in [0, {n_valid})")
    return idx.to(torch.int64).contiguous()


def _check_vec(name: str, t: torch.Tensor, shape: tuple, device: torch.device) -> torch.Tensor:
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, the tokens on {device}")
    return t if t.stride(-1) == 1 else t.contiguous()


def _batch_splits(B: int, programs: int) -> int:
    """How many partial sums a batch reduction uses: enough programs to fill a GPU."""
    if INTERPRET:
        return min(B, 2)  # still exercises the split path, cheaply
    return max(1, min(B, 64, triton.cdiv(1024, programs)))


def _segments(idx: torch.Tensor, n_dest: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort idx [B,K] by destination: (order [B,K], bounds [B,n_dest+1]) for _segment_sum_kernel."""
    sorted_idx, order = torch.sort(idx, dim=1, stable=True)
    dest = torch.arange(n_dest + 1, device=idx.device, dtype=idx.dtype).expand(idx.shape[0], -1)
    bounds = torch.searchsorted(sorted_idx, dest.contiguous())  # (B, n_dest+1) left edges
    return order.contiguous(), bounds.contiguous()


def _segment_sum(g: torch.Tensor, idx: torch.Tensor, n_dest: int, colsum: bool, dtype: torch.dtype):
    """dx[b, r] = sum of g[b, k] over idx[b, k] == r, as [B, n_dest, D]; optionally also dx.sum(0) in fp32."""
    B, K, D = g.shape
    order, bounds = _segments(idx, n_dest)
    dx = empty((B, n_dest, D), dtype, g.device)
    block_d = copy_block_d(D)
    n_d = triton.cdiv(D, block_d)
    splits = _batch_splits(B, n_dest * n_d) if colsum else B
    b_per_split = triton.cdiv(B, splits)
    splits = triton.cdiv(B, b_per_split)
    parts = empty((splits, n_dest, D), torch.float32, g.device) if colsum else dx
    if n_dest:
        _segment_sum_kernel[(splits * n_dest, n_d)](
            g, order, bounds, dx, parts, B, K, n_dest, D, g.stride(0), g.stride(1), b_per_split,
            HAS_COLSUM=colsum, BLOCK_D=block_d, num_warps=4,
        )  # fmt: skip
    return dx, (parts.sum(0) if colsum else None)


@launcher
def gather_tokens_fwd(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    x = _check_rows("x", x, 3)
    B, N, D = x.shape
    idx = _check_index("idx", idx, B, N, x.device)
    K = idx.shape[1]
    out = empty((B, K, D), x.dtype, x.device)
    if out.numel():
        block_d = copy_block_d(D)
        grid = (triton.cdiv(B * K, ROWS_PER_PROGRAM), triton.cdiv(D, block_d))
        _gather_fwd_kernel[grid](
            x, idx, x, x, out, B * K, K, D, x.stride(0), x.stride(1), 0,  # no pos, no cls
            HEAD=0, ROWS=ROWS_PER_PROGRAM, BLOCK_D=block_d, num_warps=warps_for(block_d),
        )  # fmt: skip
    return out


@launcher
def gather_tokens_bwd(grad: torch.Tensor, idx: torch.Tensor, N: int) -> torch.Tensor:
    grad = _check_rows("grad", grad, 3)
    return _segment_sum(grad, _check_index("idx", idx, grad.shape[0], N, grad.device), N, False, grad.dtype)[0]


@launcher
def gather_visible_fwd(x: torch.Tensor, idx: torch.Tensor, pos: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
    x = _check_rows("x", x, 3)
    B, N, D = x.shape
    idx = _check_index("idx", idx, B, N, x.device)
    pos = _check_vec("pos", pos, (N + 1, D), x.device)
    cls = _check_vec("cls", cls.reshape(-1), (D,), x.device)  # [D] or MAE's [1,1,D]
    K = idx.shape[1]
    out = empty((B, K + 1, D), torch.promote_types(torch.promote_types(x.dtype, pos.dtype), cls.dtype), x.device)
    if out.numel():
        block_d = copy_block_d(D)
        grid = (triton.cdiv(B * (K + 1), ROWS_PER_PROGRAM), triton.cdiv(D, block_d))
        _gather_fwd_kernel[grid](
            x, idx, pos, cls, out, B * (K + 1), K, D, x.stride(0), x.stride(1), pos.stride(0),
            HEAD=1, ROWS=ROWS_PER_PROGRAM, BLOCK_D=block_d, num_warps=warps_for(block_d),
        )  # fmt: skip
    return out


@launcher
def gather_visible_bwd(
    grad: torch.Tensor, idx: torch.Tensor, x_dtype: torch.dtype, pos: torch.Tensor, cls: torch.Tensor
):
    """grad [B,1+K,D] -> (dx [B,N,D] in x_dtype, dpos like pos, dcls like cls)."""
    grad = _check_rows("grad", grad, 3)
    N = pos.shape[0] - 1
    idx = _check_index("idx", idx, grad.shape[0], N, grad.device)
    dx, dpos_rest = _segment_sum(grad[:, 1:], idx, N, True, x_dtype)
    dhead = grad[:, 0].sum(0, dtype=torch.float32)  # (D,) tiny: cls and pos[0] both get it
    dpos = torch.cat([dhead[None], dpos_rest]).to(pos.dtype)
    return dx, dpos, dhead.to(cls.dtype).reshape(cls.shape)


@launcher
def unshuffle_fwd(
    x: torch.Tensor, mask_token: torch.Tensor, ids_restore: torch.Tensor, pos: torch.Tensor
) -> torch.Tensor:
    x = _check_rows("x", x, 3)
    B, K1, D = x.shape
    ids_restore = _check_ids_restore(ids_restore, B, x.device)
    N = ids_restore.shape[1]
    if not 1 <= K1 <= N + 1:
        raise ValueError(f"x must hold CLS + K <= N={N} tokens, got {K1} rows")
    mask_token = _check_vec("mask_token", mask_token.reshape(-1), (D,), x.device)  # [D] or [1,1,D]
    pos = _check_vec("pos", pos, (N + 1, D), x.device)
    out = empty((B, N + 1, D), x.dtype, x.device)
    if out.numel():
        block_d = copy_block_d(D)
        grid = (triton.cdiv(B * (N + 1), ROWS_PER_PROGRAM), triton.cdiv(D, block_d))
        _unshuffle_fwd_kernel[grid](
            x, mask_token, ids_restore, pos, out, B * (N + 1), N, K1 - 1, D,
            x.stride(0), x.stride(1), pos.stride(0),
            ROWS=ROWS_PER_PROGRAM, BLOCK_D=block_d, num_warps=warps_for(block_d),
        )  # fmt: skip
    return out


@launcher
def unshuffle_bwd(
    grad: torch.Tensor, ids_restore: torch.Tensor, K: int, mask_dtype: torch.dtype, pos_dtype: torch.dtype
):
    """grad [B,1+N,D] -> (dx [B,1+K,D], dmask [D], dpos [1+N,D])."""
    grad = _check_rows("grad", grad, 3)
    B, N1, D = grad.shape
    ids_restore = _check_ids_restore(ids_restore, B, grad.device)
    dx = empty((B, K + 1, D), grad.dtype, grad.device)
    block_d = copy_block_d(D)
    n_d = triton.cdiv(D, block_d)
    b_per_split = triton.cdiv(B, _batch_splits(B, N1 * n_d))
    splits = triton.cdiv(B, b_per_split)
    dpos = empty((splits, N1, D), torch.float32, grad.device)
    dmask = empty((splits, N1, D), torch.float32, grad.device)
    if B:
        _unshuffle_bwd_kernel[(N1, n_d, splits)](
            grad, ids_restore, dx, dpos, dmask, B, N1 - 1, K, D, grad.stride(0), grad.stride(1), b_per_split,
            BLOCK_D=block_d, num_warps=4,
        )  # fmt: skip
        return dx, dmask.sum((0, 1)).to(mask_dtype), dpos.sum(0).to(pos_dtype)
    return dx, grad.new_zeros(D, dtype=mask_dtype), grad.new_zeros((N1, D), dtype=pos_dtype)


def _check_ids_restore(ids: torch.Tensor, B: int, device: torch.device) -> torch.Tensor:
    N = ids.shape[-1] if ids.ndim == 2 else 0
    ids = _check_index("ids_restore", ids, B, N, device)
    if ids.device.type == "cpu":
        ref = torch.arange(N, dtype=ids.dtype).expand(B, -1)
        if not torch.equal(ids.sort(dim=1).values, ref):
            raise ValueError("ids_restore rows must be permutations of 0..N-1")
    return ids


# --------------------------------------------------------------------------------------------
# torch.library ops: traced by torch.compile as single nodes, differentiable through
# register_autograd (the backward launches kernels too, through its own op).
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("urfm_fast::gather_tokens", mutates_args=())
def _gather_tokens_op(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return gather_tokens_fwd(x, idx)


@_gather_tokens_op.register_fake
def _(x, idx):
    return x.new_empty((x.shape[0], idx.shape[1], x.shape[2]))


@torch.library.custom_op("urfm_fast::gather_tokens_bwd", mutates_args=())
def _gather_tokens_bwd_op(grad: torch.Tensor, idx: torch.Tensor, N: int) -> torch.Tensor:
    return gather_tokens_bwd(grad, idx, N)


@_gather_tokens_bwd_op.register_fake
def _(grad, idx, N):
    return grad.new_empty((grad.shape[0], N, grad.shape[2]))


def _gather_tokens_setup(ctx, inputs, output):
    x, idx = inputs
    ctx.save_for_backward(idx)
    ctx.N = x.shape[1]


def _gather_tokens_backward(ctx, grad):
    (idx,) = ctx.saved_tensors
    return _gather_tokens_bwd_op(grad, idx, ctx.N), None


_gather_tokens_op.register_autograd(_gather_tokens_backward, setup_context=_gather_tokens_setup)


@torch.library.custom_op("urfm_fast::gather_visible", mutates_args=())
def _gather_visible_op(x: torch.Tensor, idx: torch.Tensor, pos: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
    return gather_visible_fwd(x, idx, pos, cls)


@_gather_visible_op.register_fake
def _(x, idx, pos, cls):
    dtype = torch.promote_types(torch.promote_types(x.dtype, pos.dtype), cls.dtype)
    return x.new_empty((x.shape[0], idx.shape[1] + 1, x.shape[2]), dtype=dtype)


@torch.library.custom_op("urfm_fast::gather_visible_bwd", mutates_args=())
def _gather_visible_bwd_op(
    grad: torch.Tensor, idx: torch.Tensor, x_dtype: torch.dtype, pos: torch.Tensor, cls: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return gather_visible_bwd(grad, idx, x_dtype, pos, cls)


@_gather_visible_bwd_op.register_fake
def _(grad, idx, x_dtype, pos, cls):
    dx = grad.new_empty((grad.shape[0], pos.shape[0] - 1, grad.shape[2]), dtype=x_dtype)
    return dx, pos.new_empty(pos.shape), cls.new_empty(cls.shape)  # contiguous, as the real ones


def _gather_visible_setup(ctx, inputs, output):
    x, idx, pos, cls = inputs
    ctx.x_dtype = x.dtype
    # pos and cls are parameters (kept alive anyway); they only carry shape/dtype here
    ctx.save_for_backward(idx, pos, cls)


def _gather_visible_backward(ctx, grad):
    idx, pos, cls = ctx.saved_tensors
    dx, dpos, dcls = _gather_visible_bwd_op(grad, idx, ctx.x_dtype, pos, cls)
    return dx, None, dpos, dcls


_gather_visible_op.register_autograd(_gather_visible_backward, setup_context=_gather_visible_setup)


@torch.library.custom_op("urfm_fast::unshuffle", mutates_args=())
def _unshuffle_op(
    x: torch.Tensor, mask_token: torch.Tensor, ids_restore: torch.Tensor, pos: torch.Tensor
) -> torch.Tensor:
    return unshuffle_fwd(x, mask_token, ids_restore, pos)


@_unshuffle_op.register_fake
def _(x, mask_token, ids_restore, pos):
    return x.new_empty((x.shape[0], ids_restore.shape[1] + 1, x.shape[2]))


@torch.library.custom_op("urfm_fast::unshuffle_bwd", mutates_args=())
def _unshuffle_bwd_op(
    grad: torch.Tensor, ids_restore: torch.Tensor, K: int, mask_dtype: torch.dtype, pos_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return unshuffle_bwd(grad, ids_restore, K, mask_dtype, pos_dtype)


@_unshuffle_bwd_op.register_fake
def _(grad, ids_restore, K, mask_dtype, pos_dtype):
    B, N1, D = grad.shape
    grad_x = grad.new_empty((B, K + 1, D))
    return grad_x, grad.new_empty((D,), dtype=mask_dtype), grad.new_empty((N1, D), dtype=pos_dtype)


def _unshuffle_setup(ctx, inputs, output):
    x, mask_token, ids_restore, pos = inputs
    ctx.save_for_backward(ids_restore)
    ctx.K, ctx.mask_shape, ctx.mask_dtype, ctx.pos_dtype = x.shape[1] - 1, mask_token.shape, mask_token.dtype, pos.dtype


def _unshuffle_backward(ctx, grad):
    (ids_restore,) = ctx.saved_tensors
    dx, dmask, dpos = _unshuffle_bwd_op(grad, ids_restore, ctx.K, ctx.mask_dtype, ctx.pos_dtype)
    return dx, dmask.reshape(ctx.mask_shape), None, dpos


_unshuffle_op.register_autograd(_unshuffle_backward, setup_context=_unshuffle_setup)


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Triton version of ``gather_tokens_ref``."""
    return _gather_tokens_op(x, idx)


def gather_visible(x: torch.Tensor, idx: torch.Tensor, pos: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
    """Triton version of ``gather_visible_ref``."""
    return _gather_visible_op(x, idx, pos, cls)


def unshuffle(x: torch.Tensor, mask_token: torch.Tensor, ids_restore: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Triton version of ``unshuffle_ref``."""
    return _unshuffle_op(x, mask_token, ids_restore, pos)
