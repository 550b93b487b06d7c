"""Synthetic B-mode ultrasound with lesion labels: the built-in data of urfm_fast.

Each image is formed the way a scanner forms it, in beam space (depth x scan line):

    echogenicity map (tissue layers, bright interfaces, smooth texture, maybe a vessel, the lesion)
    -> circular complex Gaussian scatterers scaled by it (fully developed speckle)
    -> point-spread function: Gaussian axial x Gaussian lateral, per image (probe frequency, focus)
    -> round-trip attenuation integrated along each beam, so a lesion brightens (cyst) or shadows
       (solid) everything behind it, + electronic noise
    -> time-gain compensation (imperfect, with slider bumps and a focal gain) and overall gain
    -> envelope magnitude, log compression to a random dynamic range, grey map
    -> scan conversion to a square Cartesian image: a fan for convex/phased probes, a rectangle for
       linear ones, black outside the field of view.

The simulation runs at baseband (IQ): the PSF is the Gaussian envelope of the Gaussian-modulated
transmit pulse. For circular Gaussian scatterers this has the same envelope statistics as RF lines
followed by a Hilbert transform, with 4x fewer depth samples.

Classes: 0 normal (no lesion), 1 anechoic cyst with posterior enhancement, 2 hypoechoic solid lesion
with posterior shadowing, 3 hyperechoic lesion. Position, size, shape, contrast, margin, posterior
effect, depth, gain and probe vary per image, and any class may show a vessel (an anechoic tube), so
the classes are separable but not trivially. ``generate(..., masks=True)`` adds exact per-pixel masks
(SEG_CLASSES: background and the three lesion classes) from the geometry that renders the lesion.

Image i depends only on (seed, i, size) and its label: its parameters and noise come from a
torch.Generator seeded by a hash of (seed, i); everything after that is vectorised over a chunk.
Every operation acts on each image alone (batched matmuls, a float64 cumulative sum), so neither
chunking nor the thread count changes a single pixel.
Caution: CPU and CUDA outputs agree only up to rounding (a grey level here and there).
"""

import math
import numbers
from collections import OrderedDict

import torch
import torch.nn.functional as F

__all__ = ["CLASSES", "SEG_CLASSES", "PROBES", "generate", "SyntheticUltrasound", "save_grid", "speckle_envelope"]

CLASSES = ("normal", "cyst", "hypoechoic_solid", "hyperechoic")
SEG_CLASSES = ("background", "cyst", "hypoechoic_solid", "hyperechoic")  # the masks' class ids
PROBES = ("linear", "convex", "phased")
CHUNK = 64  # images rendered together; chunks start at multiples of CHUNK
_N_PARAMS = 128  # uniforms drawn per image (about 75 used): a fixed count, with room for new ones
_M64 = (1 << 64) - 1
_RENDER_PIXELS = 1 << 17  # pixels rendered at once on CPU


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def _stream_seed(seed: int, index: int, stream: int) -> int:
    # Hash rather than seed + index: neighbouring seeds must not share images.
    return _splitmix64(_splitmix64(_splitmix64(seed & _M64) ^ index) ^ stream) >> 1


def _default_labels(seed: int, lo: int, hi: int) -> torch.Tensor:
    # Every aligned block of 4 indices holds each class once, in a random order: balanced at any
    # length that is a multiple of 4, yet the label is not a function of i % 4.
    out = []
    for block in range(lo // 4, (hi + 3) // 4):
        g = torch.Generator().manual_seed(_stream_seed(seed, block, 1))
        perm = torch.randperm(4, generator=g)
        out += [int(perm[i - 4 * block]) for i in range(max(lo, 4 * block), min(hi, 4 * block + 4))]
    return torch.tensor(out, dtype=torch.int64)


def _draw(seed: int, lo: int, hi: int, size: int):
    """Per-image uniforms [n, _N_PARAMS] and unit normals [n, 2, size, size] (I, Q of the scatterers)."""
    u, z = [], []
    for i in range(lo, hi):
        g = torch.Generator().manual_seed(_stream_seed(seed, i, 0))
        u.append(torch.rand(_N_PARAMS, generator=g, dtype=torch.float64))
        z.append(torch.randn(2, size, size, generator=g))
    return torch.stack(u), torch.stack(z)


class _Params:
    """Hands out the per-image uniform columns in a fixed order, mapped to ranges ([B] each)."""

    def __init__(self, u: torch.Tensor):
        self.u, self.k = u, 0

    def uniform(self, lo=0.0, hi=1.0) -> torch.Tensor:
        if self.k >= self.u.shape[1]:
            raise RuntimeError("synthetic: raise _N_PARAMS, the parameter draws ran out")
        self.k += 1
        return (lo + (hi - lo) * self.u[:, self.k - 1]).float()

    def log_uniform(self, lo, hi) -> torch.Tensor:
        return torch.exp(self.uniform(math.log(lo), math.log(hi)))


def _gaussian_matrix(n: int, sigma: torch.Tensor) -> torch.Tensor:
    """[B, n, n] banded matrices: a Gaussian blur of width sigma [B] (samples), unit energy per row,
    so white complex noise keeps its power and the speckle's mean power equals the echo power."""
    i = torch.arange(n, device=sigma.device, dtype=torch.float32)
    s = sigma[:, None, None]
    w = torch.exp(-0.5 * ((i[:, None] - i[None, :]) / s) ** 2)  # [B, n, n]
    k = torch.arange(-n + 1, n, device=sigma.device, dtype=torch.float32)
    energy = torch.exp(-((k / s) ** 2)).sum(-1, keepdim=True)  # sum of w^2 over a full row: [B, 1, 1]
    return w / energy.sqrt()


def speckle_envelope(amplitude, normals, sigma_axial, sigma_lateral) -> torch.Tensor:
    """Envelope of PSF-filtered complex scatterers: amplitude [B, D, L] scales unit normals
    [B, 2, D, L] (I, Q); sigmas [B] are the axial and lateral PSF widths in samples. Returns [B, D, L].
    Where the amplitude is constant the envelope is Rayleigh with E[A^2] = amplitude^2 (fully
    developed speckle)."""
    iq = normals * (amplitude[:, None] * math.sqrt(0.5))  # unit complex variance: [B, 2, D, L]
    iq = _gaussian_matrix(iq.shape[2], sigma_axial)[:, None] @ iq  # axial blur
    iq = iq @ _gaussian_matrix(iq.shape[3], sigma_lateral).transpose(1, 2)[:, None]  # lateral blur
    return iq.square().sum(1).sqrt()


def _beam_to_xz(dd, uu, linear, width, radius, half):
    """Beam coordinates (depth fraction dd in [0, 1], line uu in [-1, 1]) -> physical (x, z), in units
    of the imaging depth, z down, z = 0 at the centre of the probe face. Parameters broadcast."""
    theta = uu * half
    r = radius + dd
    x = torch.where(linear, uu * width / 2, r * torch.sin(theta))
    z = torch.where(linear, dd + 0 * uu, r * torch.cos(theta) - radius)
    return x, z


def _col(t: torch.Tensor) -> torch.Tensor:
    return t[:, None, None]  # [B] -> [B, 1, 1], against [B, D, L] maps


def _grey_levels(p: _Params, echo: torch.Tensor, alpha_extra: torch.Tensor, normals: torch.Tensor,
                 dd: torch.Tensor) -> torch.Tensor:
    """Echogenicity [B, D, L] -> displayed grey level in [0, 1]: attenuation, receiver noise, speckle,
    TGC, log compression and the grey map (the draws of ``p`` in the order _render always made them)."""
    S, col = normals.shape[-1], _col
    sig_ax = torch.clamp(p.uniform(0.003, 0.007) * S, min=0.6)
    sig_lat = torch.clamp(p.uniform(0.006, 0.014) * S, min=0.9)
    alpha_bg = p.uniform(15, 50)  # round-trip dB over the imaging depth
    atten_db = torch.cumsum((col(alpha_bg) + alpha_extra).double(), dim=1).float() / S  # along beams
    # TGC undoes the background attenuation only roughly; slider bumps and the focal zone remain.
    tgc_slope, s1, s2 = p.uniform(0.75, 1.15), p.uniform(-2.5, 2.5), p.uniform(-2.5, 2.5)
    focus, focus_gain = p.uniform(0.3, 0.7), p.uniform(0, 3)
    tgc_db = (col(tgc_slope * alpha_bg) * dd + col(s1) * torch.cos(math.pi * dd)
              + col(s2) * torch.cos(2 * math.pi * dd)
              + col(focus_gain) * torch.exp(-(((dd - col(focus)) / 0.15) ** 2)))  # [B, D, 1]
    noise_amp = 10 ** (p.uniform(-50, -30) / 20)
    # Tissue echo and receiver noise are independent complex Gaussians, so their sum is one with the
    # powers added: one field of scatterers carries both.
    amplitude = torch.sqrt((echo * 10 ** (-atten_db / 20)) ** 2 + col(noise_amp) ** 2)
    env = speckle_envelope(amplitude, normals, sig_ax, sig_lat) * 10 ** (tgc_db / 20)

    # Log compression and grey map.
    gain, dyn, mid, gamma = p.uniform(-5, 5), p.uniform(45, 70), p.uniform(0.32, 0.52), p.uniform(0.8, 1.25)
    db = 20 * torch.log10(env + 1e-6)
    return torch.clamp(col(mid) + (db + col(gain)) / col(dyn), 0, 1) ** col(gamma)


def _display_xz(S: int, top: torch.Tensor, side: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Physical (x [B, 1, W], z [B, H, 1]) of each display pixel's centre: the square holds the field of
    view, ``side`` wide, its top row at depth ``top`` ([B] each)."""
    pix = (torch.arange(S, device=top.device) + 0.5) / S
    return _col(-side / 2) + _col(side) * pix[None, None, :], _col(top) + _col(side) * pix[None, :, None]


def _scan_convert(v: torch.Tensor, linear, width, radius, half):
    """Beam space -> a square display holding the whole field of view, top-aligned.
    -> (uint8-ready image [B, 1, S, S] in [0, 1], field-of-view mask [B, S, S], top, side)."""
    S, col = v.shape[-1], _col
    top = torch.where(linear, torch.zeros_like(radius), radius * torch.cos(half) - radius)
    side = torch.where(linear, torch.ones_like(radius),
                       torch.maximum(1 - top, 2 * (radius + 1) * torch.sin(half)))
    X, Z = _display_xz(S, top, side)
    r = torch.sqrt(X**2 + (Z + col(radius)) ** 2)
    gu = torch.where(col(linear), 2 * X / col(width), torch.atan2(X, Z + col(radius)) / col(half))
    gd = torch.where(col(linear), Z + 0 * X, r - col(radius))  # [B, H, W] both
    grid = torch.stack([gu, 2 * gd - 1], dim=-1)  # [B, H, W, 2] as (x = line, y = depth)
    img = F.grid_sample(v[:, None], grid, mode="bilinear", padding_mode="border", align_corners=False)
    fov = (gu.abs() <= 1) & (gd >= 0) & (gd <= 1)
    img = torch.where(fov[:, None], img, 0.0)
    return img, fov, top, side


def _add_vessel(p: _Params, echo, alpha_extra, x, z, les_d, probe_geometry):
    """A vessel in any class: an anechoic tube with bright walls, away from the lesion's depth.
    -> (echo, alpha_extra) with it; ``probe_geometry`` = (linear, width, radius, half)."""
    col = _col
    linear, width, radius, half = probe_geometry
    has_vessel = (p.uniform() < 0.35).float()
    off = p.uniform(0.22, 0.35)
    ves_d = torch.where(les_d + off < 0.85, les_d + off, les_d - off)
    xv, zv = _beam_to_xz(ves_d, p.uniform(-0.5, 0.5), linear, width, radius, half)
    tilt, t = p.uniform(-0.35, 0.35), p.uniform(0.025, 0.06)
    dist = torch.abs(-(x - col(xv)) * col(torch.sin(tilt)) + (z - col(zv)) * col(torch.cos(tilt)))
    lumen = torch.sigmoid((col(t) - dist) / 0.004) * col(has_vessel)
    echo = echo * (1 - 0.97 * lumen)
    echo = echo + col(has_vessel * p.uniform(0.3, 1.5)) * torch.exp(-(((dist - col(t)) / 0.006) ** 2))
    alpha_extra = alpha_extra - col(p.uniform(0, 3) / (2 * t)) * lumen
    return echo, alpha_extra


_LOBES = (2, 3, 5)  # harmonics of the lesion margin


def _lesion_rho(x: torch.Tensor, z: torch.Tensor, shape) -> torch.Tensor:
    """Normalised radius of physical points (x, z) ([B, ., .], broadcasting) in the lesion ``shape`` =
    (centre x, centre z, semi-axes a, b, rotation, [(amplitude, phase)] of the margin's harmonics), each [B]:
    < 1 inside, 1 on the margin. The renderer and the masks both call this, so they cannot disagree."""
    xc, zc, a, b, rot, lobes = shape
    dx, dz = x - _col(xc), z - _col(zc)
    xr = dx * _col(torch.cos(rot)) + dz * _col(torch.sin(rot))
    zr = -dx * _col(torch.sin(rot)) + dz * _col(torch.cos(rot))
    ang = torch.atan2(zr / _col(b), xr / _col(a))
    margin = torch.ones_like(ang)
    for m, (amp, phase) in zip(_LOBES, lobes):
        margin = margin + _col(amp) * torch.cos(m * ang + _col(phase))
    return torch.sqrt((xr / _col(a)) ** 2 + (zr / _col(b)) ** 2) / margin


def _render(u: torch.Tensor, normals: torch.Tensor, labels: torch.Tensor, probe: str | None):
    """Vectorised image formation for one chunk. Returns uint8 [B, 1, S, S] and an info dict."""
    B, S, dev = u.shape[0], normals.shape[-1], normals.device
    p = _Params(u)
    col = _col
    dd = ((torch.arange(S, device=dev) + 0.5) / S)[None, :, None]  # depth of each sample: [1, D, 1]
    uu = (-1 + (2 * torch.arange(S, device=dev) + 1) / S)[None, None, :]  # scan line: [1, 1, L]

    # Probe: linear 40 %, convex 35 %, phased 25 % unless forced.
    pick_probe, pick_sector = p.uniform(), p.uniform()
    kind = (pick_probe > 0.40).long() + (pick_probe > 0.75).long()  # index into PROBES: [B]
    if probe == "sector":
        kind = 1 + (pick_sector > 0.58).long()
    elif probe is not None:
        kind = torch.full_like(kind, PROBES.index(probe))
    linear, convex = kind == 0, kind == 1
    width = p.uniform(0.6, 1.0)  # linear aperture / depth
    radius = torch.where(convex, p.uniform(0.35, 0.9), p.uniform(0.02, 0.08))  # phased: virtual apex
    half = torch.where(convex, p.uniform(0.40, 0.55), p.uniform(0.55, 0.72))  # half opening angle, rad
    x, z = _beam_to_xz(dd, uu, col(linear), col(width), col(radius), col(half))  # [B, D, L] each

    # Tissue layers, following the probe face (beam depth), with bright fascia at the boundaries.
    echo = col(p.log_uniform(0.4, 1.2)).expand(B, S, S)
    echo = echo + 2.0 * torch.exp(-((dd / 0.012) ** 2))  # skin / probe-face line
    for k in range(3):
        centre = p.uniform(0.05 + 0.18 * k, 0.16 + 0.2 * k)
        wave = p.uniform(0, 0.03)
        freq, phase = p.uniform(0.3, 1.5), p.uniform(0, 2 * math.pi)
        level, fascia, thick = p.log_uniform(0.4, 1.6), p.uniform(0, 2.5), p.uniform(0.003, 0.01)
        boundary = col(centre) + col(wave) * torch.sin(math.pi * col(freq) * uu + col(phase))  # [B, 1, L]
        echo = torch.lerp(echo, col(level).expand_as(echo), torch.sigmoid((dd - boundary) / 0.004))
        echo = echo + col(fascia) * torch.exp(-(((dd - boundary) / col(thick)) ** 2))
    # Parenchymal heterogeneity: a smooth multiplicative field in physical space.
    texture = torch.zeros_like(echo)
    for _ in range(3):
        kmag, kdir = p.uniform(4, 14), p.uniform(0, math.pi)
        amp, phase = p.uniform(0, 0.25), p.uniform(0, 2 * math.pi)
        arg = col(kmag * torch.cos(kdir)) * x + col(kmag * torch.sin(kdir)) * z + col(phase)
        texture = texture + col(amp) * torch.cos(arg)
    echo = echo * torch.exp(texture)

    # Lesion geometry, drawn for every image (also normal ones) so the layout of the draws is fixed.
    les_d, les_u = p.uniform(0.22, 0.62), p.uniform(-0.55, 0.55)
    xc, zc = _beam_to_xz(les_d, les_u, linear, width, radius, half)  # [B] each
    a = p.uniform(0.05, 0.15)
    b = a * p.uniform(0.6, 1.1)
    rot = p.uniform(-0.4, 0.4)
    is_cyst, is_solid, is_hyper = labels == 1, labels == 2, labels == 3
    pick = lambda cyst, solid, hyper: torch.where(is_cyst, cyst, torch.where(is_solid, solid, hyper))
    irregular = pick(torch.full_like(a, 0.02), p.uniform(0.04, 0.16), p.uniform(0.02, 0.10))
    # lobulated or spiculated margins for solid lesions, near-round cysts: (amplitude, phase) of harmonics 2, 3, 5
    lobes = [(irregular * p.uniform(), p.uniform(0, 2 * math.pi)) for _ in _LOBES]
    shape = (xc, zc, a, b, rot, lobes)
    rho = _lesion_rho(x, z, shape)  # 1 on the margin
    edge = pick(torch.full_like(a, 0.03), p.uniform(0.05, 0.2), p.uniform(0.06, 0.2))
    inside = torch.sigmoid((1 - rho) / col(edge)) * col((labels > 0).float())  # [B, D, L] in [0, 1]
    contrast = pick(p.uniform(0.0, 0.08), p.log_uniform(0.2, 0.6), p.log_uniform(1.9, 4.5))
    echo = echo * (1 + col(contrast - 1) * inside)
    halo = (is_hyper & (p.uniform() < 0.4)).float() * 0.6  # thin hypoechoic rim around some hyperechoic
    echo = echo * (1 - col(halo) * torch.exp(-(((rho - 1.1) / 0.08) ** 2)))
    # Posterior effect (dB, + = brighter behind), spread as extra attenuation over the lesion's height.
    posterior = pick(p.uniform(3, 10), -p.uniform(2, 14), p.uniform(-3, 3))
    height = 2 * torch.sqrt((a * torch.sin(rot)) ** 2 + (b * torch.cos(rot)) ** 2)
    alpha_extra = col(-posterior / height) * inside

    echo, alpha_extra = _add_vessel(p, echo, alpha_extra, x, z, les_d, (linear, width, radius, half))
    v = _grey_levels(p, echo, alpha_extra, normals, dd)  # [B, D, L] in [0, 1], beam space
    img, fov, top, side = _scan_convert(v, linear, width, radius, half)
    img = (img * 255).round().clamp(0, 255).to(torch.uint8)  # [B, 1, S, S]

    # lesion centre (column, row) and smaller semi-axis, in output pixels
    lesion_xy = torch.stack([(xc + side / 2) / side * S - 0.5, (zc - top) / side * S - 0.5], 1)
    # The lesion's exact extent in the display: the margin (rho = 1, where the rendered echo change is half
    # way) evaluated at each display pixel's own physical position, inside the field of view.
    X, Z = _display_xz(S, top, side)
    lesion = (_lesion_rho(X, Z, shape) < 1) & fov & col(labels > 0)
    mask = torch.where(lesion, col(labels), 0).to(torch.uint8)  # [B, S, S] class ids of SEG_CLASSES
    return img, {"probe": kind, "fov": fov, "lesion_xy": lesion_xy, "lesion_r": torch.minimum(a, b) / side * S,
                 "mask": mask}


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _check(n, size, seed):
    if not _is_int(n) or n < 0:
        raise ValueError(f"synthetic: n must be an int >= 0, got {n!r}")
    if not _is_int(size) or size < 16:
        raise ValueError(f"synthetic: size must be an int >= 16, got {size!r}")
    if not _is_int(seed):
        raise ValueError(f"synthetic: seed must be an int, got {seed!r}")
    return int(n), int(size), int(seed)


@torch.no_grad()
def _generate_range(lo, hi, size, seed, device="cpu", labels=None, probe=None):
    """Images lo..hi-1 of the stream (seed, size): uint8 [n, 1, S, S], int64 labels [n], info."""
    u, normals = _draw(seed, lo, hi, size)
    labels = _default_labels(seed, lo, hi) if labels is None else labels
    # Render a few images at a time on CPU so the [B, D, L] maps stay in cache (1.3x faster at 224 px).
    step = hi - lo if torch.device(device).type != "cpu" else max(1, _RENDER_PIXELS // size**2)
    parts = [_render(u[j:j + step].to(device), normals[j:j + step].to(device),
                     labels[j:j + step].to(device), probe) for j in range(0, hi - lo, step)]
    images = torch.cat([img for img, _ in parts])
    info = {k: torch.cat([inf[k] for _, inf in parts]) for k in parts[0][1]}
    return images, info, labels


@torch.no_grad()
def generate(n, size=64, seed=0, *, device="cpu", labels=None, probe=None, masks=False):
    """n synthetic B-mode images and their classes (indices into CLASSES).

    Returns (uint8 [n, 1, size, size], int64 [n]) on `device`. Image i depends only on (seed, i, size)
    and its label, never on n. labels: None draws a balanced random class per index (each aligned
    block of 4 indices holds every class once); a sequence or tensor of n class ids forces them.
    probe: None (random per image: linear, convex or phased), "linear", "convex", "phased" or
    "sector" (convex or phased). masks: also return uint8 [n, size, size] per-pixel class ids of
    SEG_CLASSES (0 background, else the image's lesion class on the pixels inside the lesion's margin),
    computed from the geometry that renders the lesion; the images are the same either way.
    """
    n, size, seed = _check(n, size, seed)
    if probe is not None and probe not in PROBES + ("sector",):
        raise ValueError(f"synthetic: probe must be None, 'sector' or one of {PROBES}, got {probe!r}")
    if labels is not None:
        labels = torch.as_tensor(labels).cpu()
        if labels.shape != (n,) or labels.is_floating_point() or labels.is_complex():
            raise ValueError(f"synthetic: labels must be {n} integer class ids, got {tuple(labels.shape)}")
        if n and (labels.min() < 0 or labels.max() >= len(CLASSES)):
            raise ValueError(f"synthetic: labels must lie in 0..{len(CLASSES) - 1}")
        labels = labels.long()
    images, classes, seg = [], [], []
    for lo in range(0, n, CHUNK):
        hi = min(lo + CHUNK, n)
        forced = None if labels is None else labels[lo:hi]
        img, info, lab = _generate_range(lo, hi, size, seed, device, forced, probe)
        images.append(img)
        classes.append(lab)
        seg.append(info["mask"])
    if not images:
        out = (torch.empty(0, 1, size, size, dtype=torch.uint8, device=device),
               torch.empty(0, dtype=torch.int64, device=device))
        return out + (torch.empty(0, size, size, dtype=torch.uint8, device=device),) if masks else out
    out = (torch.cat(images), torch.cat(classes).to(device))
    return out + (torch.cat(seg),) if masks else out


class SyntheticUltrasound(torch.utils.data.Dataset):
    """`length` synthetic images; item i = (uint8 [1, size, size], label) equal to generate()'s image i.

    Rendered lazily, CHUNK images at a time, and cached (least recently used chunks are dropped past
    about 1 GiB), so sequential or shuffled epochs after the first cost no rendering.
    """

    max_cache_bytes = 1 << 30

    def __init__(self, length, size=64, seed=0):
        length, size, seed = _check(length, size, seed)
        self.length, self.size, self.seed = length, size, seed
        self._cache = OrderedDict()

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        if not isinstance(i, int):
            i = int(i)
        if i < 0:
            i += self.length
        if not 0 <= i < self.length:
            raise IndexError(f"index {i} out of range for {self.length} images")
        k = i // CHUNK
        if k in self._cache:
            self._cache.move_to_end(k)
        else:
            lo = k * CHUNK
            img, _, lab = _generate_range(lo, min(lo + CHUNK, self.length), self.size, self.seed)
            self._cache[k] = (img, lab)
            if len(self._cache) * CHUNK * self.size**2 > self.max_cache_bytes:
                self._cache.popitem(last=False)
        img, lab = self._cache[k]
        return img[i % CHUNK].clone(), int(lab[i % CHUNK])

    def render_all(self, device="cpu", batch=4 * CHUNK) -> bool:
        """Render every image now (on ``device``, e.g. a GPU) into the cache; False if it would not fit.

        Training reads shuffled indices, so lazily rendered chunks are each touched by every
        DataLoader worker in the first epoch; rendering once before the workers fork lets them all
        share the result. GPU and CPU renderings agree up to float rounding, not bit for bit.
        """
        if self.length * self.size**2 > self.max_cache_bytes:
            return False
        batch = max(CHUNK, batch // CHUNK * CHUNK)  # whole chunks per rendering
        for lo in range(0, self.length, batch):
            hi = min(lo + batch, self.length)
            img, _, lab = _generate_range(lo, hi, self.size, self.seed, device)
            img, lab = img.cpu(), lab.cpu()
            for k in range(lo // CHUNK, (hi + CHUNK - 1) // CHUNK):
                a, b = k * CHUNK - lo, min((k + 1) * CHUNK, hi) - lo
                self._cache[k] = (img[a:b].clone(), lab[a:b].clone())
        return True


def save_grid(path, n=16, size=128, seed=0):
    """Write a PNG grid of n images with their class and probe as captions."""
    from PIL import Image, ImageDraw

    n, size, seed = _check(n, size, seed)
    if n < 1:
        raise ValueError("synthetic: save_grid needs n >= 1")
    if n > 256:
        raise ValueError(f"synthetic: save_grid shows at most 256 images, got {n}")
    images, info, labels = _generate_range(0, n, size, seed)
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    cap, pad = 14, 2
    sheet = Image.new("L", (cols * (size + pad) + pad, rows * (size + cap + pad) + pad), 40)
    draw = ImageDraw.Draw(sheet)
    for j in range(n):
        x, y = pad + (j % cols) * (size + pad), pad + (j // cols) * (size + cap + pad)
        sheet.paste(Image.fromarray(images[j, 0].numpy()), (x, y))
        caption = f"{CLASSES[labels[j]]} / {PROBES[info['probe'][j]]}"
        draw.text((x + 2, y + size + 1), caption, fill=235)
    sheet.save(path, optimize=True)
