"""Analytic FLOP counts for URFM training, a table of GPU peaks, and MFU.

Conventions (those of PaLM / nanoGPT MFU accounting):
    * 1 multiply-accumulate (MAC) = 2 FLOP. Every count below is in FLOP.
    * Only matmul-like work is counted: the qkv / proj / MLP linears, the two attention matmuls
      (scores q k^T and the weighted sum A v, T^2 * D MACs each, whatever the head count), the patch
      embedding (a conv = one [P, C*p*p] x [C*p*p, D] matmul) and the decoder's linears.
    * Excluded: LayerNorm, softmax, GELU, residual adds, biases, position-embedding adds, gathers,
      the cosine loss and the optimizer. They are memory-bound and together well under 1 % of the
      FLOPs at ViT-B; MFU is "useful matmul work per second over peak", so leaving them out is the
      honest choice.
    * Training = forward + backward, with backward counted as 2x forward (grad w.r.t. inputs and
      w.r.t. weights), so a trained module costs 3x its forward. The frozen teacher costs 1x.
      (The patch embedding's input gradient is never needed, so 3x overcounts it by ~1x of a
      0.1 GMAC op; kept for the standard convention.)

Per 224-px ViT-B/16 image at 75 % masking (docs/architecture.md, compute budget): teacher 17.6 GMAC, encoder on
1+49 tokens 4.4 GMAC, 768d8b decoder on 1+196 tokens 11.7 GMAC; train ~132 GFLOP per image.

    >>> from urfm_fast.config import URFMConfig
    >>> round(train_flops_per_image(URFMConfig()) / 1e9)
    132
"""

from __future__ import annotations

import torch

from urfm_fast.config import URFMConfig


def linear_flops(rows: int, in_features: int, out_features: int) -> int:
    """[rows, in] @ [in, out]: 2 * rows * in * out FLOP (bias excluded)."""
    return 2 * rows * in_features * out_features


def patch_embed_flops(patches: int, embed_dim: int, patch_size: int = 16, in_chans: int = 3) -> int:
    """Conv with kernel = stride = patch: one matmul [patches, C*p*p] x [C*p*p, D]."""
    return linear_flops(patches, in_chans * patch_size * patch_size, embed_dim)


def block_forward_flops(embed_dim: int, tokens: int, mlp_ratio: float = 4.0) -> int:
    """One pre-norm transformer block on ``tokens`` tokens of width D (hidden = int(D * mlp_ratio)).

    qkv 3 D^2 T + scores T^2 D + AV T^2 D + proj D^2 T + MLP 2 D H T MACs. The attention terms do
    not depend on the head count: H heads of width D/H give H * T^2 * D/H = T^2 D.
    """
    D, T = embed_dim, tokens
    hidden = int(D * mlp_ratio)
    qkv = linear_flops(T, D, 3 * D)
    attn = 2 * (2 * T * T * D)  # scores + AV
    proj = linear_flops(T, D, D)
    mlp = linear_flops(T, D, hidden) + linear_flops(T, hidden, D)
    return qkv + attn + proj + mlp


def prompted_block_forward_flops(embed_dim: int, queries: int, prompts: int, mlp_ratio: float = 4.0) -> int:
    """One prompting-decoder block: M = ``queries`` tokens updated, P = ``prompts`` fixed keys/values.

    q, k, v of the queries 3 D^2 M + k, v of the prompts 2 D^2 P + scores and AV 2 M (P+M) D + proj
    D^2 M + MLP 2 D H M MACs: the prompts pay only their key/value projections.
    """
    D, M, P = embed_dim, queries, prompts
    hidden = int(D * mlp_ratio)
    qkv = linear_flops(M, D, 3 * D) + linear_flops(P, D, 2 * D)
    attn = 2 * (2 * M * (P + M) * D)  # scores + AV
    return qkv + attn + linear_flops(M, D, D) + linear_flops(M, D, hidden) + linear_flops(M, hidden, D)


def vit_forward_flops(
    embed_dim: int,
    depth: int,
    tokens: int,
    mlp_ratio: float = 4.0,
    heads: int | None = None,
    patches: int = 0,
    patch_size: int = 16,
    in_chans: int = 3,
) -> int:
    """Forward FLOP of ``depth`` blocks on ``tokens`` tokens, plus the patch embedding of ``patches``.

    ``patches`` = 0 for a trunk without a patch embedding (the MAE decoder). For the masked encoder
    the patch embedding runs on all N patches while the blocks see only 1+K tokens, so the two
    counts are separate arguments. ``heads`` is only validated: attention FLOPs do not depend on it.
    """
    if heads is not None and embed_dim % heads:
        raise ValueError(f"embed_dim {embed_dim} is not divisible by heads {heads}")
    flops = depth * block_forward_flops(embed_dim, tokens, mlp_ratio)
    if patches:
        flops += patch_embed_flops(patches, embed_dim, patch_size, in_chans)
    return flops


def teacher_forward_flops(cfg: URFMConfig, teacher_dim: int = 768, teacher_depth: int = 12) -> int:
    """Frozen BiomedCLIP trunk (timm vit_base_patch16_224) on the full view: 1+N tokens."""
    n = cfg.num_patches
    return vit_forward_flops(teacher_dim, teacher_depth, 1 + n, 4.0, patches=n, patch_size=cfg.patch_size,
                             in_chans=cfg.in_chans)


def student_forward_flops(cfg: URFMConfig) -> dict[str, int]:
    """Forward FLOP of the trained parts, by part: encoder, decoder (incl. decoder_embed), pred."""
    n, k = cfg.num_patches, cfg.num_visible
    encoder = vit_forward_flops(cfg.embed_dim, cfg.depth, 1 + k, cfg.mlp_ratio, cfg.num_heads, patches=n,
                                patch_size=cfg.patch_size, in_chans=cfg.in_chans)
    decoder = linear_flops(1 + k, cfg.embed_dim, cfg.decoder_embed_dim)
    if cfg.decoder == "prompting":
        decoder += cfg.decoder_depth * prompted_block_forward_flops(cfg.decoder_embed_dim, n - k, 1 + k, cfg.mlp_ratio)
    else:
        decoder += vit_forward_flops(cfg.decoder_embed_dim, cfg.decoder_depth, 1 + n, cfg.mlp_ratio,
                                     cfg.decoder_num_heads)
    # model/urfm.py predicts only the rows in the loss
    pred_rows = {"masked": n - k, "all": n, "all_cls": 1 + n}[cfg.loss_on]
    pred = linear_flops(pred_rows, cfg.decoder_embed_dim, cfg.target_dim)
    return {"encoder": encoder, "decoder": decoder, "pred": pred}


def train_flops_per_image(cfg: URFMConfig, teacher: bool = True, teacher_dim: int = 768) -> int:
    """FLOP per image of one URFM training step: teacher fwd + 3 x (encoder + decoder + pred) fwd.

    ``teacher=False`` for runs whose targets are precomputed. ``teacher_dim`` is the teacher width
    (BiomedCLIP's trunk is ViT-B: 768, 12 blocks).
    """
    student = sum(student_forward_flops(cfg).values())
    return 3 * student + (teacher_forward_flops(cfg, teacher_dim) if teacher else 0)


# Dense (no 2:4 sparsity) tensor-core peaks in FLOP/s from the vendors' datasheets, for bf16/fp16
# inputs with fp32 accumulation, and for TF32. First substring match of torch.cuda.get_device_name
# wins, so the more specific names come first.
PEAK_FLOPS: list[tuple[str, float, float | None]] = [
    # (name substring, bf16/fp16, tf32)
    ("H100 PCIe", 756e12, 378e12),
    ("H100 NVL", 835e12, 418e12),
    ("H200 NVL", 835e12, 418e12),
    ("GH200", 989e12, 494e12),
    ("H100", 989e12, 494e12),  # SXM5 ("NVIDIA H100 80GB HBM3")
    ("H200", 989e12, 494e12),  # SXM
    ("H800", 989e12, 494e12),
    ("H20", 148e12, 74e12),
    ("B200", 2250e12, 1100e12),
    ("A100", 312e12, 156e12),  # SXM4 and PCIe alike
    ("A800", 312e12, 156e12),
    ("L40S", 362e12, 183e12),
    ("L40", 181e12, 90.5e12),
    ("L4", 121e12, 60e12),
    ("A10", 125e12, 62.5e12),
    ("RTX 4090", 165e12, 82.6e12),
    ("RTX 3090", 71e12, 35.6e12),
    ("V100", 125e12, None),  # fp16 only; no bf16 tensor cores
    ("T4", 65e12, None),
]


def peak_flops(device: torch.device | str | int | None = None, dtype: torch.dtype = torch.bfloat16) -> float | None:
    """Datasheet dense peak (FLOP/s) of a CUDA device for ``dtype``; None on CPU or an unknown GPU.

    bf16/fp16 use the tensor-core peak; float32 uses the TF32 peak (what torch reaches with
    ``torch.backends.cuda.matmul.allow_tf32``). ``URFM_PEAK_TFLOPS`` overrides the table.
    """
    import os

    override = os.environ.get("URFM_PEAK_TFLOPS")
    if override:
        return float(override) * 1e12
    if device is None:
        if not torch.cuda.is_available():
            return None
        device = torch.cuda.current_device()
    if isinstance(device, str):
        device = torch.device(device)
    if isinstance(device, torch.device):
        if device.type != "cuda":
            return None
        device = device.index if device.index is not None else torch.cuda.current_device()
    name = torch.cuda.get_device_name(device)
    return peak_flops_for_name(name, dtype)


def peak_flops_for_name(name: str, dtype: torch.dtype = torch.bfloat16) -> float | None:
    """Table lookup on a device name such as 'NVIDIA H100 80GB HBM3'; None if unknown."""
    for key, half, tf32 in PEAK_FLOPS:
        if key in name:
            if dtype in (torch.bfloat16, torch.float16):
                return half
            if dtype == torch.float32:
                return tf32
            return None
    return None


def measured_matmul_flops(device: torch.device | str = "cuda", dtype: torch.dtype = torch.bfloat16,
                          n: int = 8192, iters: int = 20) -> float:
    """FLOP/s of a large square matmul on ``device``: the practical ceiling, for comparison with the
    datasheet (an H200 reaches ~790 of 989 TFLOP/s). Synchronises around the timed loop."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(device)
    start.record()
    for _ in range(iters):
        a @ b
    end.record()
    torch.cuda.synchronize(device)
    seconds = start.elapsed_time(end) / 1e3
    return 2 * n**3 * iters / seconds


def mfu(flops_per_s: float, peak: float | None) -> float | None:
    """Model FLOP utilisation as a fraction in [0, 1] (None if the peak is unknown)."""
    if not peak:
        return None
    return flops_per_s / peak
