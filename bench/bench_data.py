"""Input pipeline: images/s from pre-decoded shards vs decoding a PNG folder, and augmentation cost.

    pytest bench/bench_data.py --benchmark-only

Rows (images/s in extra_info['images_per_s']; ratio_to_reference > 1 = faster than the PNG row):
    test_png_folder_decode   ImageFolderDataset items, one core: PNG decode + grey + resize to 256
    test_shard_read          ShardDataset items, one core: memory-map read of the same images
    test_augment_batch       batch_augment on the device: uint8 [B,1,256,256] -> float [B,3,S,S]
    test_stream_shards       build_train_stream from shards, 2 workers, augmentation on the device:
                             what the model receives per second
At ~3k images/s per GPU (docs/architecture.md, compute budget) the loader must beat the step rate; decoding cannot
(~400 images/s per core), shards + device augmentation can.
"""

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from urfm_fast import prepare
from urfm_fast.augment import batch_augment
from urfm_fast.data import ImageFolderDataset, ShardDataset, build_train_stream

N_IMAGES = 128
SIDE = 256


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The same N_IMAGES synthetic ultrasound images as a PNG folder and as a shard folder."""
    root = tmp_path_factory.mktemp("data_bench")
    # Speckle-like texture (Rayleigh amplitude, smoothed like a point-spread function) compresses
    # about as badly as real B-mode, so PNG decode time is realistic.
    rng = np.random.default_rng(0)
    imgs = [np.asarray(Image.fromarray(rng.rayleigh(45, (SIDE, SIDE)).clip(0, 255).astype(np.uint8))
                       .filter(ImageFilter.BoxBlur(1))) for _ in range(N_IMAGES)]
    png = root / "png"
    png.mkdir()
    for k, im in enumerate(imgs):
        Image.fromarray(im).save(png / f"{k:04d}.png")
    shards = root / "shards"
    prepare.prepare([png], shards, short_side=SIDE, workers=2, progress=False)
    return png, shards


def _images_per_s(benchmark, n):
    s = benchmark.stats.stats.mean if benchmark.stats else None
    if s:
        benchmark.extra_info["images_per_s"] = round(n / s, 1)


def test_png_folder_decode(benchmark, measure, corpus):
    ds = ImageFolderDataset(corpus[0], short_side=SIDE)
    measure(benchmark, lambda: [ds[i] for i in range(len(ds))], items=len(ds))
    _images_per_s(benchmark, len(ds))


def test_shard_read(benchmark, measure, corpus):
    ds = ShardDataset(corpus[1])
    assert len(ds) == N_IMAGES
    read_all = lambda: [ds[i] for i in range(len(ds))]
    measure(benchmark, read_all, items=len(ds), reference="test_png_folder_decode")
    _images_per_s(benchmark, len(ds))


def test_augment_batch(benchmark, measure, device, batch_size, step_cfg):
    x = torch.randint(0, 256, (batch_size, 1, SIDE, SIDE), dtype=torch.uint8, device=device)
    seeds = torch.arange(batch_size, device=device)
    out = step_cfg.img_size
    measure(benchmark, lambda: batch_augment(x, out, seeds=seeds), items=batch_size)
    _images_per_s(benchmark, batch_size)
    benchmark.extra_info["batch"] = batch_size


def test_stream_shards(benchmark, measure, corpus, device, step_cfg):
    b, steps = 32, 8  # 2 epochs of the 128-image corpus per round
    stream = build_train_stream(corpus[1], img_size=step_cfg.img_size, batch_size=b, num_workers=2,
                                device=device, deterministic=True)

    it = iter(stream)  # one iterator: workers start once, as in training
    next(it)

    def run():
        for _ in range(steps):
            x, _ = next(it)
        return x

    measure(benchmark, run, items=b * steps, reference="test_png_folder_decode")
    _images_per_s(benchmark, b * steps)
