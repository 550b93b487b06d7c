"""Input pipeline: images/s from pre-decoded shards vs decoding a PNG folder, and augmentation cost.

    pytest bench/bench_data.py --benchmark-only

Rows (images/s in extra_info['images_per_s']; ratio_to_reference > 1 = faster than the PNG row):
    test_png_folder_decode   ImageFolderDataset items, one core: PNG decode + grey + resize to 256
    test_shard_read          ShardDataset items, one core: memory-map read of the same images
    test_augment_batch       batch_augment on the device: uint8 [B,1,256,256] -> float [B,3,S,S]
    test_stream_shards       build_train_stream from shards, 2 workers, augmentation on the device:
                             what the model receives per second
    test_index_open_jsonl    start-up of one rank on a 1,000,000-entry shard index, the old way: parse
                             index.jsonl whole, then look up the rank's entries of one epoch (rank 0 of
                             64, batch 256 per rank)
    test_index_open_bin      the same through the memory-mapped index.bin (ShardDataset's way): open,
                             checksum, look up the same entries (ratio_to_reference: x faster)
At ~3k images/s per GPU (docs/architecture.md, compute budget) the loader must beat the step rate; decoding cannot
(~400 images/s per core), shards + device augmentation can.
"""

import os

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from urfm_fast import prepare
from urfm_fast.data import shards
from urfm_fast.data.augment import batch_augment
from urfm_fast.data.stream import ImageFolderDataset, ShardDataset, build_train_stream, epoch_permutation

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


INDEX_ENTRIES, WORLD, RANK_BATCH = 1_000_000, 64, 256


@pytest.fixture(scope="module")
def big_index(tmp_path_factory):
    """A shard folder's index of INDEX_ENTRIES entries (index.jsonl and index.bin; no pixels: opening
    an index never reads the shards), laid out as prepare writes them: 1 GiB shards of 256 x 320 frames."""
    root = tmp_path_factory.mktemp("big_index")
    (root / shards.MARKER).write_text('{"format": "urfm-shards", "version": 1, "short_side": 256}\n')
    per_shard = shards.SHARD_BYTES // (256 * 320) + 1
    with open(root / shards.INDEX, "w") as f:
        for i in range(INDEX_ENTRIES):
            k, j = divmod(i, per_shard)
            f.write(f'{{"shard": {k}, "offset": {j * 256 * 320}, "h": 256, "w": 320, "id": "{i % 977:08x}'
                    f'{i // 31:016x}", "frame": {i % 31}, "crop": "regions", "roi": [12, 600, 80, 880]}}\n')
    shards.write_index_bin(root)
    return root


def _rank_entries(n):
    """Positions of rank 0's samples in one epoch, as the data stream draws them."""
    gb = RANK_BATCH * WORLD
    perm = epoch_permutation(n, 0, 0)[: n // gb * gb].view(-1, WORLD, RANK_BATCH)
    return perm[:, 0].reshape(-1).numpy()


def test_index_open_jsonl(benchmark, measure, big_index):
    def start():
        recs = shards.read_index(big_index)
        offset = np.array([r["offset"] for r in recs], dtype=np.int64)
        hw = np.array([[r["h"], r["w"]] for r in recs], dtype=np.int32)
        mine = _rank_entries(len(recs))
        return offset[mine], hw[mine]

    measure(benchmark, start, items=INDEX_ENTRIES, rounds=2, warmup=0)
    benchmark.extra_info["entries"] = INDEX_ENTRIES


def test_index_open_bin(benchmark, measure, big_index):
    def start():
        ds = ShardDataset(big_index)
        assert isinstance(ds.index, np.memmap)
        mine = ds.index[_rank_entries(len(ds))]
        return mine["offset"], np.stack([mine["h"], mine["w"]], 1)

    measure(benchmark, start, items=INDEX_ENTRIES, reference="test_index_open_jsonl")
    benchmark.extra_info["entries"] = INDEX_ENTRIES
    benchmark.extra_info["bin_bytes"] = os.path.getsize(big_index / shards.INDEX_BIN)
