"""Batch augmentation on the training device: RandomResizedCrop + horizontal flip + grey -> 3 channels.

Why here and not in DataLoader workers: at ~3k images/s per GPU the CPU cannot afford per-image
torchvision transforms, so workers only read uint8 pixels and the whole batch is cropped, resized
and flipped at once on the device with one `grid_sample` (on the CPU when there is no GPU).

- Crop parameters follow torchvision's `RandomResizedCrop.get_params` rule exactly (10 tries of
  area in `scale` and log-uniform aspect in `ratio`, first fitting try wins, else a centre crop
  clamped to `ratio`), evaluated for all samples at once.
- Resampling equals torchvision's `resized_crop(..., BILINEAR, antialias=False)`: the source
  coordinate of every output pixel is `j + (x + 0.5) * w / out - 0.5`, clamped to the crop, then
  bilinear interpolation (tests/test_augment.py checks this against torchvision on the CPU).
- No vertical flip: up/down is depth in ultrasound and flipping it hurts.
- Randomness comes either from a torch.Generator (fast, stream-like) or from per-sample int64
  seeds through a counter-based hash, so a sample's crop depends only on its seed — not on the
  batch it lands in, the number of workers or ranks (`--deterministic`).
"""

import math

import torch
import torch.nn.functional as F

_TRIES = 10  # torchvision's number of crop attempts
_M32 = 0xFFFFFFFF


_STATS: dict = {}


def normalize(x01, mean, std):
    """x01 [B,3,H,W] in [0,1] -> (x - mean) / std per channel (a new tensor)."""
    key = (tuple(mean), tuple(std), x01.dtype, x01.device)
    if key not in _STATS:
        # Built once per device: a fresh torch.tensor(..., device=cuda) every step is a blocking copy.
        m = torch.tensor(mean, dtype=x01.dtype, device=x01.device).view(1, -1, 1, 1)
        s = torch.tensor(std, dtype=x01.dtype, device=x01.device).view(1, -1, 1, 1)
        _STATS[key] = (m, s)
    m, s = _STATS[key]
    return (x01 - m) / s


# ---------------------------------------------------------------------------------------------
# Counter-based randomness: uniform numbers as a pure function of (seed, stream, counter)


def _fmix32(x):
    """murmur3's 32-bit finaliser on int64 tensors holding values in [0, 2^32).

    Products may wrap in int64, but two's complement keeps the low 32 bits exact, so the result
    is identical on every device."""
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & _M32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & _M32
    return x ^ (x >> 16)


def hash_uniform(seeds, n, stream=0):
    """seeds int64 [B] -> float32 [B, n] uniform in [0, 1), a pure function of (seed, stream, column).

    Used for crop/flip parameters (stream 0) and, through `urfm_fast.data.stream.mask_noise`, for the
    model's masking noise (another stream), so both derive from the same per-sample seed."""
    seeds = seeds.to(torch.int64)
    lo = (seeds & _M32).unsqueeze(1)  # (B, 1)
    hi = ((seeds >> 32) & _M32).unsqueeze(1)
    col = torch.arange(n, device=seeds.device, dtype=torch.int64).unsqueeze(0)  # (1, n)
    h = _fmix32((col + (stream & 0xFFFF) * 0x10000 + 0x9E3779B9) & _M32)
    h = _fmix32(h ^ hi)
    h = _fmix32((h + lo) & _M32)
    h = _fmix32(h ^ 0x5BD1E995)
    # top 24 bits -> exactly representable float32 in [0, 1)
    return (h >> 8).to(torch.float32) / float(1 << 24)


def mix_seed(*parts):
    """Combine python ints and int64 tensors into one int64 seed tensor (a deterministic hash)."""
    out = None
    for p in parts:
        p = torch.as_tensor(p, dtype=torch.int64)
        lo, hi = p & _M32, (p >> 32) & _M32
        if out is None:
            out = _fmix32((lo + 0x632BE5AB) & _M32) | (_fmix32((hi + 0x85157AF5) & _M32) << 32)
        else:
            a = _fmix32((out & _M32) ^ lo)
            b = _fmix32((((out >> 32) & _M32) + hi + a) & _M32)
            out = a | (b << 32)
    return out


# ---------------------------------------------------------------------------------------------
# Crop parameters


def crop_params(sizes, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), u=None):
    """Per-sample RandomResizedCrop boxes by torchvision's rule.

    sizes int64 [B,2] = (H, W) of each image; u float [B, 4*10] uniforms (columns 4t..4t+3 for try
    t: area, log-aspect, top, left). Returns int64 [B,4] = (top i, left j, height h, width w)."""
    sizes = sizes.to(torch.int64)
    B = sizes.shape[0]
    H = sizes[:, 0:1].to(torch.float64)  # (B, 1)
    W = sizes[:, 1:2].to(torch.float64)
    u = u.to(torch.float64).view(B, _TRIES, 4)
    area = H * W
    target = area * (scale[0] + (scale[1] - scale[0]) * u[..., 0])  # (B, T)
    lr0, lr1 = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(lr0 + (lr1 - lr0) * u[..., 1])
    w = torch.round(torch.sqrt(target * aspect))  # round half to even, as python's round()
    h = torch.round(torch.sqrt(target / aspect))
    ok = (w > 0) & (w <= W) & (h > 0) & (h <= H)  # (B, T)
    i = torch.floor(u[..., 2] * (H - h + 1)).clamp(min=0)
    j = torch.floor(u[..., 3] * (W - w + 1)).clamp(min=0)
    first = torch.argmax(ok.to(torch.int8), dim=1, keepdim=True)  # first fitting try (0 if none)
    pick = lambda t: t.gather(1, first).squeeze(1)
    i, j, h, w = pick(i), pick(j), pick(h), pick(w)
    # fallback: centre crop with the aspect clamped to `ratio`
    Hs, Ws = H.squeeze(1), W.squeeze(1)
    in_ratio = Ws / Hs
    fw = torch.where(in_ratio > ratio[1], torch.round(Hs * ratio[1]), Ws)
    fh = torch.where(in_ratio < ratio[0], torch.round(Ws / ratio[0]), Hs)
    fi, fj = torch.div(Hs - fh, 2, rounding_mode="floor"), torch.div(Ws - fw, 2, rounding_mode="floor")
    none = ~ok.any(dim=1)
    out = torch.stack(
        [torch.where(none, a, b) for a, b in ((fi, i), (fj, j), (fh, h), (fw, w))], dim=1
    )
    return out.to(torch.int64)


# ---------------------------------------------------------------------------------------------
# Resampling


def _axis_coords(start, length, out_size, full):
    """Source pixel coordinates (float [B, out]) of a crop [start, start+length) resized to out_size,
    as F.interpolate(bilinear, align_corners=False) computes them, clamped to the crop; then mapped
    to grid_sample's normalised [-1, 1] space of an axis of `full` pixels."""
    x = torch.arange(out_size, device=start.device, dtype=torch.float32).unsqueeze(0)  # (1, out)
    length = length.to(torch.float32).unsqueeze(1)  # (B, 1)
    src = (x + 0.5) * (length / out_size) - 0.5  # in crop pixels
    src = torch.minimum(src.clamp(min=0.0), length - 1)
    src = src + start.to(torch.float32).unsqueeze(1)  # absolute pixels
    return (2 * src + 1) / full - 1  # align_corners=False convention


def resized_crop(images, boxes, out_size, flip=None):
    """Crop boxes (int64 [B,4] = i, j, h, w) out of images and resize to out_size x out_size.

    images: uint8 or float [B,1,Hp,Wp] (zero-padded; boxes lie inside each real image) -> float32
    [B,1,out,out] in [0,1] (uint8 scaled by 1/255). flip: bool [B], mirror left-right."""
    B, _, Hp, Wp = images.shape
    dev = images.device
    boxes = boxes.to(dev)
    x = images.to(torch.float32)
    if images.dtype == torch.uint8:
        x = x.mul_(1.0 / 255)
    gy = _axis_coords(boxes[:, 0], boxes[:, 2], out_size, Hp)  # (B, out)
    gx = _axis_coords(boxes[:, 1], boxes[:, 3], out_size, Wp)
    if flip is not None:
        gx = torch.where(flip.to(dev).unsqueeze(1), gx.flip(1), gx)
    grid = torch.stack(
        [gx.unsqueeze(1).expand(B, out_size, out_size), gy.unsqueeze(2).expand(B, out_size, out_size)], dim=-1
    )  # (B, out, out, 2) as (x, y)
    # Coordinates are clamped inside each real image, so padding is never sampled.
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def pad_batch(images):
    """List of uint8 [1,H,W] of different sizes -> (uint8 [B,1,Hmax,Wmax] zero-padded, int64 [B,2] sizes)."""
    sizes = torch.tensor([[im.shape[-2], im.shape[-1]] for im in images], dtype=torch.int64)
    if bool((sizes == sizes[0]).all()):
        return torch.stack(list(images)), sizes  # all one size (synthetic, square shards): no padding
    Hm, Wm = int(sizes[:, 0].max()), int(sizes[:, 1].max())
    out = images[0].new_zeros((len(images), 1, Hm, Wm))
    for k, im in enumerate(images):
        out[k, :, : im.shape[-2], : im.shape[-1]] = im
    return out, sizes


def random_resized_crop(images, out_size, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), hflip=True, seeds=None,
                        generator=None, sizes=None):
    """RandomResizedCrop + random horizontal flip of a batch of any channel count, on its device.

    images: uint8 or float [B,C,H,W] (optionally zero-padded, with ``sizes`` int64 [B,2] the real H, W);
    randomness from per-sample int64 ``seeds`` or from ``generator`` (see ``batch_augment``).
    Returns float32 [B,C,out,out] (uint8 scaled to [0,1])."""
    B, _, H, W = images.shape
    dev = images.device
    if sizes is None:
        sizes = torch.tensor([[H, W]], dtype=torch.int64).expand(B, 2)
    sizes = sizes.to(dev, non_blocking=True)  # pinned by the loader: no host sync
    ncol = 4 * _TRIES + 1  # 4 per crop try + 1 for the flip
    if seeds is not None:
        u = hash_uniform(seeds.to(dev), ncol, stream=0)
    else:
        u = torch.rand((B, ncol), generator=generator, device=dev)
    boxes = crop_params(sizes, scale, ratio, u[:, : 4 * _TRIES])
    flip = (u[:, -1] < 0.5) if hflip else None
    return resized_crop(images, boxes, out_size, flip=flip)


def batch_augment(
    images,
    out_size,
    scale=(0.2, 1.0),
    ratio=(3 / 4, 4 / 3),
    hflip=True,
    seeds=None,
    generator=None,
    sizes=None,
):
    """RandomResizedCrop + random horizontal flip + grey -> 3 channels for a whole batch on its device.

    images: uint8 [B,1,H,W] (optionally zero-padded, with `sizes` int64 [B,2] the real H, W) or a
    list of differently sized uint8 [1,H,W]. seeds: int64 [B] per-sample seeds (deterministic mode)
    or None to draw from `generator` (a torch.Generator on the images' device, or the default one).
    Returns float32 [B,3,out,out] in [0,1]; normalise afterwards with `normalize`."""
    if isinstance(images, (list, tuple)):
        images, sizes = pad_batch(images)
    if images.dim() != 4 or images.shape[1] != 1:
        raise ValueError(f"batch_augment expects grey images [B,1,H,W], got {tuple(images.shape)}")
    out = random_resized_crop(images, out_size, scale, ratio, hflip, seeds, generator, sizes)  # (B, 1, S, S)
    B = images.shape[0]
    return out.expand(B, 3, out_size, out_size).contiguous()
