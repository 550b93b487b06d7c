"""Softmax attention without a causal mask, for ViT token counts (1, 50, 197, 257 ...).

The torch reference is ``F.scaled_dot_product_attention``; ``attention_math_ref`` spells the
math out with an ``upcast`` flag so tests can build an fp32 ground truth.

The Triton version is flash-attention (online softmax, the N x N scores never reach memory) cut
for ViT: no causal mask, scale 1/sqrt(Dh), key masking so any N works (1, 50, 197, 257, primes),
and 32- to 128-wide tiles autotuned per (N, Dh, B*H bucket) so short sequences waste little. Forward
saves the per-row log-sum-exp; backward recomputes the probabilities from it in two kernels,
one owning key tiles (dK, dV) and one owning query tiles (dQ), so nothing needs atomics and the
result is deterministic. All accumulation is fp32.

Limits: self-attention only (q, k, v of one shape; ``urfm_fast.model.ops.attention`` sends queries and
keys of different lengths, the prompting decoder's, to ``F.scaled_dot_product_attention``); head
size Dh <= 128 (32/64/128 are the fast cases; others are padded to the next power of two); fp16,
bf16 or fp32 inputs with a unit stride along Dh (other strides free, so q/k/v views of a packed
qkv tensor need no copy; an input without it is copied). Outputs and gradients come back in the input dtype, contiguous.
fp32 inputs use full-precision (ieee, not tf32) dots, exact, under the interpreter only: on a GPU
those tiles spill registers and overflow shared memory, so the launcher refuses fp32 CUDA tensors
and ``urfm_fast.model.ops.attention`` sends fp32 to ``F.scaled_dot_product_attention``.

Caution: autotuning compiles and runs the first call of each (N, Dh, dtype, B*H bucket) several times; the
kernels only write their outputs, so this is safe, but time the second call, and do not make
that first call inside CUDA-graph capture.
Caution: triton's interpreter computes bf16 ``tl.dot`` wrongly; test bf16 on a GPU only.
"""

import contextlib
import math

import torch
import torch.nn.functional as F

from urfm_fast.kernels._triton import HAS_TRITON, INTERPRET, empty, launcher, next_power_of_2, tl, triton


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q, k, v [B,H,N,Dh] -> softmax(q k^T / sqrt(Dh)) v as [B,H,N,Dh]."""
    return F.scaled_dot_product_attention(q, k, v)


def attention_math_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, upcast: bool = True) -> torch.Tensor:
    """Explicit attention; with ``upcast`` computed in fp32 and cast back to q's dtype."""
    dtype = q.dtype
    if upcast:
        q, k, v = q.float(), k.float(), v.float()
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))  # (B, H, N, N)
    return (scores.softmax(dim=-1) @ v).to(dtype)


# --------------------------------------------------------------------------------------------
# Triton kernels. Tensors are [B,H,N,Dh] with any strides except a unit stride along Dh; the
# (b, h) base offsets are int64. Scores live in log2 units (scaled by log2(e)) so the softmax
# uses exp2; LSE is stored in the same units, [B*H, N] fp32, for the backward.
# The grid is one-dimensional, tiles of one (b, h) adjacent: B*H can exceed CUDA's 65535 limit
# on grid.y (ViT-H at a large batch) and neighbouring programs share that head's K/V in L2.
# Dots: bf16/fp16 operands on tensor cores with fp32 accumulation; fp32 operands with
# input_precision="ieee" (exact fp32 FMA, slower) so an fp32 run is a true fp32 check, not tf32.
# --------------------------------------------------------------------------------------------

LOG2E = 1.4426950408889634


@triton.jit
def _tile_and_head(N, BLOCK: tl.constexpr):
    """This program's tile index along N and its flat head index b * H + h."""
    n_tiles = tl.cdiv(N, BLOCK)
    pid = tl.program_id(0)
    return pid % n_tiles, pid // n_tiles


@triton.jit
def _head_base(ptr, bh, H, stride_b, stride_h):
    """ptr advanced to head (b, h) of a [B, H, N, Dh] tensor; int64 so B*H*N*Dh may pass 2**31."""
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    return ptr + b * stride_b + h * stride_h


@triton.jit
def _attn_fwd_kernel(
    q_ptr,  # [B, H, N, Dh] strides (sqb, sqh, sqn, 1)
    k_ptr,  # [B, H, N, Dh] strides (skb, skh, skn, 1)
    v_ptr,  # [B, H, N, Dh] strides (svb, svh, svn, 1)
    o_ptr,  # [B, H, N, Dh] contiguous
    lse_ptr,  # [B*H, N] fp32 contiguous, log2-sum-exp2 of the scaled scores
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
    H,
    N,
    qk_scale,  # log2(e) / sqrt(Dh)
    BH_BUCKET,  # B*H rounded up to a power of two: part of the autotune key, never read
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,  # HEAD_DIM rounded up to a power of two, >= 16
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m, bh = _tile_and_head(N, BLOCK_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    m_ok = offs_m < N
    q_base = _head_base(q_ptr, bh, H, sqb, sqh)
    k_base = _head_base(k_ptr, bh, H, skb, skh)
    v_base = _head_base(v_ptr, bh, H, svb, svh)
    # padded query rows (past N) load zeros: their scores are 0, finite, and they are not stored
    q = tl.load(q_base + offs_m[:, None] * sqn + offs_d[None, :], mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, N, BLOCK_N):
        n_idx = start_n + offs_n
        n_ok = n_idx < N
        kt = tl.load(k_base + n_idx[None, :] * skn + offs_d[:, None], mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N) fp32
        s = tl.where(n_ok[None, :], s, float("-inf"))  # after the scale: keys past N get no weight
        # finite: every tile holds at least one key (start_n < N), so no (-inf) - (-inf)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)  # 0 on the first tile (m_i = -inf)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + n_idx[:, None] * svn + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    acc = acc / l_i[:, None]  # l_i >= 1: the row maximum contributes exp2(0)
    o_rows = bh.to(tl.int64) * N + offs_m
    o_offs = o_rows[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(o_ptr + o_offs, acc.to(o_ptr.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    tl.store(lse_ptr + o_rows, m_i + tl.log2(l_i), mask=m_ok)


@triton.jit
def _attn_bwd_delta_kernel(
    o_ptr,  # [B*H*N, Dh] contiguous forward output
    do_ptr,  # [B*H*N, Dh] contiguous upstream gradient
    delta_ptr,  # [B*H*N] fp32: rowsum(o * do), the softmax backward's correction term
    n_rows,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (rows < n_rows)[:, None] & (offs_d < HEAD_DIM)[None, :]
    off = rows[:, None] * HEAD_DIM + offs_d[None, :]
    o = tl.load(o_ptr + off, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(do_ptr + off, mask=mask, other=0.0).to(tl.float32)
    tl.store(delta_ptr + rows, tl.sum(o * do, axis=1), mask=rows < n_rows)


@triton.jit
def _attn_bwd_tile(q, k, v, do, lse, delta, n_ok, qk_scale, DOT_PRECISION: tl.constexpr):
    """One (query tile, key tile) pair of the backward -> (p, ds), both (BLOCK_M, BLOCK_N) fp32.

    p is recomputed from the saved LSE; ds = p * (dp - delta) is d loss / d scores (before the
    1/sqrt(Dh) scale). Keys past N get p = 0 explicitly (their exp2 could overflow to inf when
    every real score is very negative); padded query rows have lse = +inf, so p = 0 there too.
    """
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    p = tl.where(n_ok[None, :], tl.exp2(s - lse[:, None]), 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    return p, p * (dp - delta[:, None])


@triton.jit
def _attn_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr,  # [B, H, N, Dh] strides as in the forward
    do_ptr,  # [B, H, N, Dh] contiguous
    lse_ptr,  # [B*H, N] fp32 from the forward
    delta_ptr,  # [B*H, N] fp32 rowsum(o * do)
    dk_ptr, dv_ptr,  # [B, H, N, Dh] contiguous outputs
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
    H,
    N,
    qk_scale,
    sm_scale,
    BH_BUCKET,  # autotune key only
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # one program owns BLOCK_N keys and sweeps every query block: dk, dv need no atomics
    pid_n, bh = _tile_and_head(N, BLOCK_N)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    n_ok = offs_n < N
    kv_mask = n_ok[:, None] & d_ok[None, :]
    k_base = _head_base(k_ptr, bh, H, skb, skh)
    v_base = _head_base(v_ptr, bh, H, svb, svh)
    q_base = _head_base(q_ptr, bh, H, sqb, sqh)
    k = tl.load(k_base + offs_n[:, None] * skn + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(v_base + offs_n[:, None] * svn + offs_d[None, :], mask=kv_mask, other=0.0)
    row0 = bh.to(tl.int64) * N
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for start_m in range(0, N, BLOCK_M):
        m_idx = start_m + offs_m
        m_ok = m_idx < N
        q_mask = m_ok[:, None] & d_ok[None, :]
        q = tl.load(q_base + m_idx[:, None] * sqn + offs_d[None, :], mask=q_mask, other=0.0)
        do = tl.load(do_ptr + (row0 + m_idx)[:, None] * HEAD_DIM + offs_d[None, :], mask=q_mask, other=0.0)
        lse = tl.load(lse_ptr + row0 + m_idx, mask=m_ok, other=float("inf"))
        delta = tl.load(delta_ptr + row0 + m_idx, mask=m_ok, other=0.0)
        p, ds = _attn_bwd_tile(q, k, v, do, lse, delta, n_ok, qk_scale, DOT_PRECISION)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PRECISION)
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PRECISION)
    out = (row0 + offs_n)[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(dk_ptr + out, (dk * sm_scale).to(dk_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptr + out, dv.to(dv_ptr.dtype.element_ty), mask=kv_mask)


@triton.jit
def _attn_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr,  # [B, H, N, Dh] strides as in the forward
    do_ptr,  # [B, H, N, Dh] contiguous
    lse_ptr,  # [B*H, N] fp32
    delta_ptr,  # [B*H, N] fp32
    dq_ptr,  # [B, H, N, Dh] contiguous output
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
    H,
    N,
    qk_scale,
    sm_scale,
    BH_BUCKET,  # autotune key only
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # one program owns BLOCK_M queries and sweeps every key block
    pid_m, bh = _tile_and_head(N, BLOCK_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    m_ok = offs_m < N
    q_mask = m_ok[:, None] & d_ok[None, :]
    row0 = bh.to(tl.int64) * N
    q_base = _head_base(q_ptr, bh, H, sqb, sqh)
    k_base = _head_base(k_ptr, bh, H, skb, skh)
    v_base = _head_base(v_ptr, bh, H, svb, svh)
    q = tl.load(q_base + offs_m[:, None] * sqn + offs_d[None, :], mask=q_mask, other=0.0)
    do = tl.load(do_ptr + (row0 + offs_m)[:, None] * HEAD_DIM + offs_d[None, :], mask=q_mask, other=0.0)
    lse = tl.load(lse_ptr + row0 + offs_m, mask=m_ok, other=float("inf"))
    delta = tl.load(delta_ptr + row0 + offs_m, mask=m_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, N, BLOCK_N):
        n_idx = start_n + offs_n
        n_ok = n_idx < N
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + n_idx[:, None] * skn + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + n_idx[:, None] * svn + offs_d[None, :], mask=kv_mask, other=0.0)
        _, ds = _attn_bwd_tile(q, k, v, do, lse, delta, n_ok, qk_scale, DOT_PRECISION)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    dq_offs = (row0 + offs_m)[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(dq_ptr + dq_offs, (dq * sm_scale).to(dq_ptr.dtype.element_ty), mask=q_mask)


# --------------------------------------------------------------------------------------------
# tile configs: autotuned on GPU, one small fixed tile under the interpreter so CPU tests stay
# quick. The autotune key is (N, head size, dot precision, BH_BUCKET): BH_BUCKET is B*H rounded
# up to a power of two (>= 16), an argument the kernels never read, so a choice made at a small
# batch (the start-up check's) is not reused at the training batch, where the grid is ~64x larger
# and another tile may win. prune_tiles drops what cannot win at ViT's 50 / 197 tokens and what
# would spill or overflow shared memory on sm_90; every config it can keep compiles for sm_90
# without spills and within 227 KB (tests/test_sm90_compile.py, on CPU). The kernels only write
# their outputs (no accumulation, no atomics), so autotuning's repeated launches need no reset.
# Every tile side is >= 32 and BLOCK_D >= 16, so every tl.dot operand meets the 16 minimum.
# --------------------------------------------------------------------------------------------

# (BLOCK_M, BLOCK_N, warps, stages)
GPU_TILES = [(32, 32, 4, 2), (32, 64, 4, 2), (64, 32, 4, 2), (64, 64, 4, 2), (64, 64, 4, 3),
             (128, 32, 8, 2), (128, 64, 8, 2), (128, 64, 8, 3)]  # fmt: skip


def gpu_configs():
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in GPU_TILES]


def prune_tiles(configs, n_tokens: int, loop_block: str, block_d: int = 64, accumulators: int = 1):
    """The configs worth timing at ``n_tokens`` for a kernel that loops over ``loop_block`` and keeps
    ``accumulators`` fp32 tiles of (its own tile side x ``block_d``) in registers.

    A tile side beyond N rounded up to a power of two (min 32) only adds masked rows; a third
    pipeline stage needs at least three loop iterations to overlap anything (N=50 with 64-wide
    tiles is one iteration). Two limits of sm_90 (tests/test_sm90_compile.py): more than 64
    accumulator values per thread leave too few of the 255 registers for the operand tiles and
    ptxas spills (seen: dK/dV at head size 80, 64-key tiles, 4 warps); the pipeline's buffers (two
    16-bit operand tiles per stage) must stay within 128 KB, since layout conversions take much of
    the rest of the 227 KB (seen: dK/dV at head size 80, 128-query tiles, 3 stages: 235 KB).
    Head size <= 64: 4 of the 8 configs at N=50; at N=197 all 8 (7 for dK/dV, whose 128-query
    loop has two iterations). Head size 80 (BLOCK_D 128) keeps 2-4 for dK/dV.
    """
    cap = max(32, next_power_of_2(n_tokens))
    own_block = "BLOCK_M" if loop_block == "BLOCK_N" else "BLOCK_N"

    def fits(c):
        acc_per_thread = accumulators * c.kwargs[own_block] * block_d // (32 * c.num_warps)
        pipeline_bytes = c.num_stages * 2 * c.kwargs[loop_block] * block_d * 2
        few_iters = triton.cdiv(n_tokens, c.kwargs[loop_block]) < 3
        return (
            c.kwargs["BLOCK_M"] <= cap
            and c.kwargs["BLOCK_N"] <= cap
            and not (c.num_stages > 2 and few_iters)
            and acc_per_thread <= 64
            and pipeline_bytes <= 128 * 1024
        )

    return [c for c in configs if fits(c)] or configs[:1]


def _pruner(loop_block: str, accumulators: int):
    def prune(configs, named_args, **kwargs):
        return prune_tiles(configs, named_args["N"], loop_block, kwargs["BLOCK_D"], accumulators)

    return prune


def bh_bucket(bh: int) -> int:
    """B*H rounded up to a power of two, at least 16: the batch part of the autotune key."""
    return max(16, next_power_of_2(bh))


# (kernel, the tile side it loops over, fp32 accumulator tiles it holds): forward and dQ own query
# tiles and loop over keys (o / dq), dK/dV own key tiles and loop over queries (dk and dv)
TUNED = {"fwd": ("BLOCK_N", 1), "dkdv": ("BLOCK_M", 2), "dq": ("BLOCK_N", 1)}


def _autotuned(kernel, kind: str):
    key = ["N", "HEAD_DIM", "DOT_PRECISION", "BH_BUCKET"]
    prune = {"early_config_prune": _pruner(*TUNED[kind])}
    return triton.autotune(gpu_configs(), key=key, prune_configs_by=prune)(kernel)


if INTERPRET or not HAS_TRITON:
    _fwd, _dkdv, _dq = _attn_fwd_kernel, _attn_bwd_dkdv_kernel, _attn_bwd_dq_kernel
else:
    _fwd = _autotuned(_attn_fwd_kernel, "fwd")
    _dkdv = _autotuned(_attn_bwd_dkdv_kernel, "dkdv")
    _dq = _autotuned(_attn_bwd_dq_kernel, "dq")

_INTERPRETER_TILE = {"BLOCK_M": 32, "BLOCK_N": 32}  # one small tile: quick CPU tests
_forced = None  # a triton.Config used instead of autotuning, inside forced_config()


@contextlib.contextmanager
def forced_config(config):
    """Launch every attention kernel with this one ``triton.Config`` instead of autotuning, so a
    check can verify each config the autotuner may pick (bench/gpu_check.py does, on a GPU)."""
    global _forced
    previous, _forced = _forced, config
    try:
        yield
    finally:
        _forced = previous


def _kernel(tuned, raw):
    """(kernel, its tile kwargs) for one launch: the autotuner, or the plain kernel with a fixed tile."""
    if _forced is not None:
        return raw, dict(_forced.kwargs, num_warps=_forced.num_warps, num_stages=_forced.num_stages)
    if tuned is raw:  # interpreter
        return raw, dict(_INTERPRETER_TILE)
    return tuned, {}


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------

MAX_HEAD_DIM = 128


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    if q.ndim != 4:
        raise ValueError(f"q must be [B,H,N,Dh], got shape {tuple(q.shape)}")
    if k.shape != q.shape or v.shape != q.shape:
        shapes = f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        raise ValueError(f"q, k, v must share one shape (self-attention), got {shapes}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"q, k, v must share one dtype among fp16/bf16/fp32, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError("q, k, v must be on one device")
    if not 1 <= q.shape[-1] <= MAX_HEAD_DIM:
        raise ValueError(f"head size {q.shape[-1]} must lie in [1, {MAX_HEAD_DIM}]")
    if q.dtype == torch.float32 and q.is_cuda:
        # exact fp32 (ieee) dots need 2-3x the registers and shared memory of bf16 tiles: the
        # kernels spill and several tiles exceed sm_90's 227 KB; urfm_fast.model.ops sends fp32 to SDPA
        raise ValueError("fp32 attention on a GPU runs on F.scaled_dot_product_attention; use bf16/fp16 here")
    # in-head offsets (row * stride along N) are int32 in the kernels; the (b, h) offsets are int64
    N = q.shape[2]
    return [t if t.stride(-1) == 1 and N * t.stride(2) < 2**31 else t.contiguous() for t in (q, k, v)]


def _strides(*ts):
    return [s for t in ts for s in t.stride()[:3]]


def block_d(head_dim: int) -> int:
    """The head size rounded up to a power of two, >= 16 (tl.dot's minimum)."""
    return max(16, next_power_of_2(head_dim))


DELTA_ROWS = 64  # rows per program of the backward's rowsum(o * do) kernel on a GPU


def _launch_args(q: torch.Tensor) -> dict:
    B, H, _, Dh = q.shape
    return dict(
        BH_BUCKET=bh_bucket(B * H),
        HEAD_DIM=Dh,
        BLOCK_D=block_d(Dh),
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # fp32 inputs stay exact
    )


def _grid(N: int, BH: int, block_key: str):
    # one dimension (limit 2**31 - 1): grid.y would cap B*H at 65535
    return lambda meta: (triton.cdiv(N, meta[block_key]) * BH,)


@launcher
def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (o [B,H,N,Dh] contiguous, lse [B*H, N] fp32 in log2 units)."""
    q, k, v = _check_qkv(q, k, v)
    B, H, N, Dh = q.shape
    o = empty((B, H, N, Dh), q.dtype, q.device)
    lse = empty((B * H, N), torch.float32, q.device)
    if o.numel():
        sm_scale = 1.0 / math.sqrt(Dh)
        kernel, tile = _kernel(_fwd, _attn_fwd_kernel)
        kernel[_grid(N, B * H, "BLOCK_M")](
            q, k, v, o, lse, *_strides(q, k, v), H, N, sm_scale * LOG2E, **_launch_args(q), **tile
        )  # fmt: skip
    return o, lse


@launcher
def attention_bwd(do, q, k, v, o, lse) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v = _check_qkv(q, k, v)
    B, H, N, Dh = q.shape
    # dense rows for the kernels; do in q's dtype, since tl.dot needs both operands in one dtype
    do, o, lse = do.to(q.dtype).contiguous(), o.contiguous(), lse.contiguous()
    dq, dk, dv = (empty((B, H, N, Dh), q.dtype, q.device) for _ in range(3))
    if not dq.numel():
        return dq, dk, dv
    delta = empty((B * H, N), torch.float32, q.device)
    rows = 16 if INTERPRET else DELTA_ROWS
    _attn_bwd_delta_kernel[(triton.cdiv(B * H * N, rows),)](
        o, do, delta, B * H * N, HEAD_DIM=Dh, BLOCK_D=block_d(Dh), BLOCK_M=rows
    )  # fmt: skip
    sm_scale = 1.0 / math.sqrt(Dh)
    args = (*_strides(q, k, v), H, N, sm_scale * LOG2E, sm_scale)
    kernel, tile = _kernel(_dkdv, _attn_bwd_dkdv_kernel)
    kernel[_grid(N, B * H, "BLOCK_N")](q, k, v, do, lse, delta, dk, dv, *args, **_launch_args(q), **tile)
    kernel, tile = _kernel(_dq, _attn_bwd_dq_kernel)
    kernel[_grid(N, B * H, "BLOCK_M")](q, k, v, do, lse, delta, dq, *args, **_launch_args(q), **tile)
    return dq, dk, dv


# --------------------------------------------------------------------------------------------
# torch.library op
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("urfm_fast::attention", mutates_args=())
def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return attention_fwd(q, k, v)


@_attention_op.register_fake
def _(q, k, v):
    B, H, N, Dh = q.shape
    return q.new_empty((B, H, N, Dh)), q.new_empty((B * H, N), dtype=torch.float32)


@torch.library.custom_op("urfm_fast::attention_bwd", mutates_args=())
def _attention_bwd_op(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return attention_bwd(do, q, k, v, o, lse)


@_attention_bwd_op.register_fake
def _(do, q, k, v, o, lse):
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape)


def _attention_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs, *output)


def _attention_backward(ctx, do, _dlse):
    q, k, v, o, lse = ctx.saved_tensors
    return _attention_bwd_op(do, q, k, v, o, lse)


_attention_op.register_autograd(_attention_backward, setup_context=_attention_setup)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Triton version of ``attention_ref``: q, k, v [B,H,N,Dh] -> [B,H,N,Dh]."""
    return _attention_op(q, k, v)[0]
