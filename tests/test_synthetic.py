import math

import pytest
import torch
from PIL import Image

from urfm_fast.data import synthetic
from urfm_fast.data.synthetic import CHUNK, CLASSES, SyntheticUltrasound, generate, save_grid, speckle_envelope


def test_shapes_and_dtypes():
    images, labels = generate(6, size=48, seed=1)
    assert images.shape == (6, 1, 48, 48) and images.dtype == torch.uint8
    assert labels.shape == (6,) and labels.dtype == torch.int64
    assert labels.min() >= 0 and labels.max() < len(CLASSES)
    assert images.float().std() > 10  # not blank
    empty, none = generate(0, size=32)
    assert empty.shape == (0, 1, 32, 32) and none.shape == (0,)


def test_deterministic_and_seed_dependent():
    a, la = generate(8, size=32, seed=7)
    b, lb = generate(8, size=32, seed=7)
    c, _ = generate(8, size=32, seed=8)
    assert torch.equal(a, b) and torch.equal(la, lb)
    assert (a != c).float().mean() > 0.5


def test_image_depends_only_on_seed_and_index():
    n = CHUNK + 6  # spans two chunks
    big, big_labels = generate(n, size=32, seed=3)
    small, small_labels = generate(5, size=32, seed=3)
    assert torch.equal(big[:5], small) and torch.equal(big_labels[:5], small_labels)
    for j in (3, CHUNK - 1, CHUNK, n - 1):  # rendered alone vs inside a chunk
        alone, _, label = synthetic._generate_range(j, j + 1, 32, 3)
        assert torch.equal(alone[0], big[j]) and label[0] == big_labels[j]


def test_dataset_matches_generate_and_caches():
    n = CHUNK + 3
    ds = SyntheticUltrasound(n, size=32, seed=5)
    images, labels = generate(n, size=32, seed=5)
    assert len(ds) == n
    for i in (0, 1, CHUNK - 1, CHUNK, n - 1, -1):
        image, label = ds[i]
        assert image.shape == (1, 32, 32) and image.dtype == torch.uint8 and isinstance(label, int)
        assert torch.equal(image, images[i]) and label == labels[i]
    assert len(ds._cache) == 2  # one entry per chunk, reused
    with pytest.raises(IndexError):
        ds[n]


def test_default_labels_balanced_but_not_periodic():
    _, labels = generate(400, size=16, seed=0)
    assert torch.equal(torch.bincount(labels, minlength=4), torch.full((4,), 100))
    blocks = labels.view(100, 4)  # every aligned block of 4 holds each class once
    assert torch.equal(blocks.sort(1).values, torch.arange(4).expand(100, 4))
    assert len({tuple(b.tolist()) for b in blocks}) > 10  # the order changes from block to block


def test_forced_labels_change_only_the_lesion():
    forced = torch.tensor([0, 1, 2, 3, 1])
    images, labels = generate(5, size=48, seed=2, labels=forced)
    assert torch.equal(labels, forced)
    normal, _ = generate(5, size=48, seed=2, labels=[0] * 5)
    assert torch.equal(images[0], normal[0])
    # The same anatomy with and without a lesion: they differ, but in a minority of the pixels.
    changed = (images[1:].int() - normal[1:].int()).abs() > 0
    assert 0 < changed.float().mean() < 0.5


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n": -1}, "n must be an int >= 0, got -1"), ({"n": 2.0}, "n must be an int >= 0, got 2.0"),
        ({"n": True}, "n must be an int >= 0, got True"), ({"n": 2, "size": 8}, "size must be an int >= 16, got 8"),
        ({"n": 2, "seed": 1.5}, "seed must be an int, got 1.5"),
        ({"n": 2, "probe": "curved"}, "probe must be .*'curved'"),
        ({"n": 2, "labels": [0]}, r"labels must be 2 integer class ids, got \(1,\)"),
        ({"n": 2, "labels": [0, 4]}, r"labels must lie in 0\.\.3"),
        ({"n": 2, "labels": [0.0, 1.0]}, "labels must be 2 integer class ids"),
    ],
)
def test_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=f"^synthetic: {match}"):
        generate(**kwargs)


def _region_contrast(label, n=32, size=64):
    """Per image: lesion interior minus background at the same depth, and the region just behind the
    lesion minus the same depth band away from it (grey levels), on linear-probe images."""
    labels = torch.full((n,), label)
    images, info, _ = synthetic._generate_range(0, n, size, 11, labels=labels, probe="linear")
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    inside, behind = [], []
    for img, (cx, cy), r, fov in zip(images[:, 0].float(), info["lesion_xy"], info["lesion_r"], info["fov"]):
        lateral, below = (xx - cx).abs(), yy - cy
        core = ((xx - cx) ** 2 + (yy - cy) ** 2).sqrt() < 0.6 * r
        beside = (below.abs() < 0.6 * r) & (lateral > 2.5 * r) & fov
        band = (below > 1.6 * r) & (below < 1.6 * r + 8) & fov
        inside.append(img[core].mean() - img[beside].mean())
        behind.append(img[band & (lateral < 0.5 * r)].mean() - img[band & (lateral > 2.5 * r)].mean())
    inside, behind = torch.stack(inside), torch.stack(behind)
    return inside[~inside.isnan()].mean().item(), behind[~behind.isnan()].mean().item()


def test_classes_differ_as_in_real_ultrasound():
    normal, cyst, solid, hyper = (_region_contrast(label) for label in range(4))
    assert abs(normal[0]) < 8 and abs(normal[1]) < 8  # no lesion: nothing to find there
    assert cyst[0] < -40 and cyst[1] > 8  # anechoic, posterior acoustic enhancement
    assert cyst[0] < solid[0] < -15 and solid[1] < -8  # hypoechoic, posterior shadowing
    assert hyper[0] > 15 and abs(hyper[1]) < 10  # hyperechoic, little posterior effect


@pytest.mark.parametrize("probe", ["convex", "phased"])
def test_sector_probes_are_black_outside_the_fan(probe):
    images, info, _ = synthetic._generate_range(0, 12, 48, 4, probe=probe)
    fov = info["fov"]
    assert torch.all(info["probe"] == synthetic.PROBES.index(probe))
    assert torch.all(images[:, 0][~fov] == 0)
    assert torch.all(images[:, 0, 0, 0] == 0) and torch.all(images[:, 0, 0, -1] == 0)  # top corners
    assert 0.3 < fov.float().mean() < 0.9  # a fan, not the full square
    assert (images[:, 0][fov] > 0).float().mean() > 0.97  # inside it, tissue
    public, _ = generate(12, size=48, seed=4, probe=probe)
    assert torch.equal(public, images)


def test_speckle_is_rayleigh_before_log_compression():
    g = torch.Generator().manual_seed(0)
    normals = torch.randn(4, 2, 128, 128, generator=g)
    sigma = torch.tensor([0.8, 1.5, 1.0, 2.0])
    env = speckle_envelope(torch.full((4, 128, 128), 2.0), normals, sigma, sigma.flip(0))
    a = env[:, 16:-16, 16:-16]  # away from the edges, where the PSF is cut
    assert a.square().mean().sqrt().item() == pytest.approx(2.0, rel=0.05)  # E[A^2] = amplitude^2
    # Rayleigh: mean^2 / E[A^2] = pi / 4 and mean / std = 1.91, whatever the PSF.
    assert (a.mean() ** 2 / a.square().mean()).item() == pytest.approx(math.pi / 4, abs=0.02)
    assert (a.mean() / a.std()).item() == pytest.approx(1.91, abs=0.1)
    # The PSF correlates neighbours; white noise would not.
    x = a[0] - a[0].mean()
    assert (x[:, 1:] * x[:, :-1]).mean() / x.square().mean() > 0.3


def test_save_grid(tmp_path):
    path = tmp_path / "grid.png"
    save_grid(path, n=6, size=32, seed=0)
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width >= 3 * 32 and im.height > 2 * 32


def test_render_all_fills_the_cache_with_the_same_images():
    from urfm_fast.data.synthetic import CHUNK, SyntheticUltrasound

    eager = SyntheticUltrasound(CHUNK + 7, size=32, seed=5)
    assert eager.render_all(batch=48)  # rounded to whole chunks
    assert len(eager._cache) == 2
    lazy = SyntheticUltrasound(CHUNK + 7, size=32, seed=5)
    for i in (0, CHUNK - 1, CHUNK, CHUNK + 6):
        assert torch.equal(eager[i][0], lazy[i][0]) and eager[i][1] == lazy[i][1]
    too_big = SyntheticUltrasound(10, size=32, seed=0)
    too_big.max_cache_bytes = 100
    assert not too_big.render_all() and not too_big._cache
