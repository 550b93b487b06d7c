"""GPU-side batch augmentation against torchvision's per-image transforms on the CPU."""

import math

import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from urfm_fast.config import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD
from urfm_fast.data.augment import (
    batch_augment,
    crop_params,
    hash_uniform,
    normalize,
    pad_batch,
    resized_crop,
)


def torchvision_rule(H, W, u, scale, ratio):
    """torchvision RandomResizedCrop.get_params, line for line, with its random draws taken from u."""
    area = H * W
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for t in range(10):
        a, r, ui, uj = (float(v) for v in u[4 * t : 4 * t + 4])
        target_area = area * (scale[0] + (scale[1] - scale[0]) * a)
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * r)
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= W and 0 < h <= H:
            return int(ui * (H - h + 1)), int(uj * (W - w + 1)), h, w
    in_ratio = W / H
    if in_ratio < min(ratio):
        w, h = W, int(round(W / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = H, int(round(H * max(ratio)))
    else:
        w, h = W, H
    return (H - h) // 2, (W - w) // 2, h, w


@pytest.mark.parametrize("scale", [(0.2, 1.0), (0.08, 1.0), (1.5, 2.0)])  # last: always the fallback
def test_crop_params_follow_torchvision_rule(scale):
    g = torch.Generator().manual_seed(0)
    sizes = torch.tensor([[37, 91], [256, 256], [300, 41], [17, 19], [64, 200]] * 20)
    u = torch.rand((len(sizes), 40), generator=g)
    got = crop_params(sizes, scale, (3 / 4, 4 / 3), u)
    for k in range(len(sizes)):
        H, W = sizes[k].tolist()
        want = torchvision_rule(H, W, u[k].double(), scale, (3 / 4, 4 / 3))
        assert tuple(got[k].tolist()) == want, (k, H, W)
        i, j, h, w = want
        assert 0 <= i and i + h <= H and 0 <= j and j + w <= W


def test_resized_crop_matches_torchvision_pixels():
    g = torch.Generator().manual_seed(1)
    images = [torch.randint(0, 256, (1, h, w), dtype=torch.uint8, generator=g) for h, w in
              [(40, 53), (31, 31), (64, 29), (23, 71)]]
    padded, sizes = pad_batch(images)
    u = torch.rand((4, 40), generator=g)
    boxes = crop_params(sizes, (0.05, 1.0), (3 / 4, 4 / 3), u)
    flip = torch.tensor([False, True, False, True])
    for out in (16, 37):  # downscale and upscale
        got = resized_crop(padded, boxes, out, flip=flip)
        for k, im in enumerate(images):
            i, j, h, w = boxes[k].tolist()
            ref = TF.resized_crop(im.float() / 255, i, j, h, w, [out, out],
                                  interpolation=TF.InterpolationMode.BILINEAR, antialias=False)
            if flip[k]:
                ref = TF.horizontal_flip(ref)
            torch.testing.assert_close(got[k], ref, atol=2e-5, rtol=0)


def test_batch_augment_seeded_per_sample():
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, 256, (6, 1, 48, 64), dtype=torch.uint8, generator=g)
    seeds = torch.arange(100, 106)
    y = batch_augment(x, 24, seeds=seeds)
    assert y.shape == (6, 3, 24, 24) and y.dtype == torch.float32
    assert 0 <= y.min() and y.max() <= 1
    assert torch.equal(y[:, 0], y[:, 1]) and torch.equal(y[:, 0], y[:, 2])  # grey -> 3 channels
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    # a sample's crop depends on its seed only, not on the batch it is in
    torch.testing.assert_close(batch_augment(x[perm], 24, seeds=seeds[perm]), y[perm], atol=1e-6, rtol=0)
    torch.testing.assert_close(batch_augment(x[2:3], 24, seeds=seeds[2:3]), y[2:3], atol=1e-6, rtol=0)
    assert not torch.allclose(batch_augment(x, 24, seeds=seeds + 1), y)


def test_batch_augment_generator_and_flip_rate():
    x = torch.arange(32, dtype=torch.uint8).view(1, 1, 1, 32).expand(256, 1, 32, 32).contiguous()
    a = batch_augment(x, 8, scale=(1.0, 1.0), ratio=(1.0, 1.0), generator=torch.Generator().manual_seed(0))
    b = batch_augment(x, 8, scale=(1.0, 1.0), ratio=(1.0, 1.0), generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    flipped = (a[:, 0, 0, 0] > a[:, 0, 0, -1]).float().mean().item()  # a left-right ramp, mirrored or not
    assert 0.35 < flipped < 0.65
    no_flip = batch_augment(x, 8, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=False)
    assert (no_flip[:, 0, 0, 0] < no_flip[:, 0, 0, -1]).all()
    assert torch.equal(no_flip[:, :, 0], no_flip[:, :, -1])  # rows untouched: never a vertical flip


def test_list_input_and_bad_shape():
    ims = [torch.full((1, 20, 30), 7, dtype=torch.uint8), torch.full((1, 50, 25), 200, dtype=torch.uint8)]
    y = batch_augment(ims, 12, seeds=torch.tensor([1, 2]))
    torch.testing.assert_close(y[0], torch.full((3, 12, 12), 7 / 255), atol=1e-6, rtol=0)  # padding unseen
    torch.testing.assert_close(y[1], torch.full((3, 12, 12), 200 / 255), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="grey"):
        batch_augment(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), 4)


def test_hash_uniform_and_normalize():
    u = hash_uniform(torch.arange(1000), 64)
    assert u.shape == (1000, 64) and 0 <= u.min() and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.01
    assert not torch.equal(u, hash_uniform(torch.arange(1000), 64, stream=1))
    assert torch.equal(hash_uniform(torch.tensor([5]), 64), u[5:6])
    x = torch.rand(2, 3, 4, 4)
    for mean, std in ((IMAGENET_MEAN, IMAGENET_STD), (CLIP_MEAN, CLIP_STD)):
        want = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
        torch.testing.assert_close(normalize(x, mean, std), want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    x = torch.randint(0, 256, (8, 1, 96, 128), dtype=torch.uint8)
    seeds = torch.arange(8)
    cpu = batch_augment(x, 64, seeds=seeds)
    gpu = batch_augment(x.cuda(), 64, seeds=seeds.cuda())
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=0)
