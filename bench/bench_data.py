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
    test_index_open_bin_10m  the same on 10,000,000 entries (a 400 MB index.bin alone): open, checksum,
                             the epoch's permutation, rank 0's 156,160 look-ups; extra_info splits the
                             time and gives the rank's private memory and its share of the mapping
At ~3k images/s per GPU (docs/architecture.md, compute budget) the loader must beat the step rate; decoding cannot
(~400 images/s per core), shards + device augmentation can.
"""

import os

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from urfm_fast.data import convert, index_bin, shards
from urfm_fast.data.augment import batch_augment
from urfm_fast.data.dataset import ImageFolderDataset, ShardDataset
from urfm_fast.data.stream import build_train_stream, epoch_permutation

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
    convert.prepare([png], shards, short_side=SIDE, workers=2, progress=False)
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
    index_bin.write_index_bin(root)
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
    benchmark.extra_info["bin_bytes"] = os.path.getsize(big_index / index_bin.INDEX_BIN)


# ---------------------------------------------------------------------------------------------
# 10 million entries (many archives, many machines)

BIG_ENTRIES = 10_000_000


@pytest.fixture(scope="module")
def huge_index(tmp_path_factory):
    """A shard folder holding index.bin alone with BIG_ENTRIES entries (400 MB), laid out as prepare
    writes them (1 GiB shards of 256 x 320 frames), built with numpy: a folder of index.bin only is
    read from it (what a prepared and merged folder is to a reader)."""
    root = tmp_path_factory.mktemp("huge_index")
    (root / shards.MARKER).write_text('{"format": "urfm-shards", "version": 1, "short_side": 256}\n')
    per_shard = shards.SHARD_BYTES // (256 * 320) + 1
    arr = np.zeros(BIG_ENTRIES, dtype=index_bin.RECORD)
    i = np.arange(BIG_ENTRIES, dtype=np.int64)
    arr["shard"], arr["offset"] = i // per_shard, (i % per_shard) * 256 * 320
    arr["h"], arr["w"], arr["frame"] = 256, 320, i % 31
    arr["src_id"], arr["path_id"] = i % 977, i // 31
    del i
    index_bin.write_index_bin(root, arr, None)
    del arr
    return root


def _rank_lookups(ds, n):
    """The stream's work for rank 0 of WORLD at the start of an epoch: the epoch's permutation (every
    rank computes it whole) and this rank's entries of it, looked up in the memory-mapped index."""
    mine = _rank_entries(n)
    rec = ds.index[mine]
    return rec["offset"], np.stack([rec["h"], rec["w"]], 1)


def _rss_mb():
    """(RssAnon, RssFile) of this process in MB (Linux /proc; zeros elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            kb = dict(line.split(":", 1) for line in f if line.startswith(("RssAnon", "RssFile")))
    except OSError:
        return 0.0, 0.0
    return int(kb["RssAnon"].split()[0]) / 1024, int(kb["RssFile"].split()[0]) / 1024


def test_index_open_bin_10m(benchmark, measure, huge_index):
    """One rank's start-up on 10M entries: ShardDataset (open, header, CRC32 of 400 MB) + lookups."""
    import time

    def start():
        ds = ShardDataset(huge_index)
        return _rank_lookups(ds, len(ds))

    measure(benchmark, start, items=BIG_ENTRIES, rounds=3)
    # The split of one more call: wall seconds, and CPU seconds of this process (on a shared machine
    # the wall time includes waiting for the core; the CPU time is the work).
    parts, clock = {}, lambda: (time.perf_counter(), time.process_time())
    t = clock()
    ds = ShardDataset(huge_index)
    t1 = clock()
    mine = _rank_entries(len(ds))
    t2 = clock()
    ds.index[mine]
    t3 = clock()
    for name, (a, b) in {"open_crc": (t, t1), "permutation": (t1, t2), "lookups": (t2, t3), "total": (t, t3)}.items():
        parts[f"{name}_s"], parts[f"{name}_cpu_s"] = b[0] - a[0], b[1] - a[1]
    rank_entries = len(mine)
    del ds, mine
    # memory of one rank: private (anonymous) pages at their peak (the whole permutation alive) vs the
    # shared, read-only page-cache mapping of index.bin
    before = _rss_mb()
    ds = ShardDataset(huge_index)
    perm = epoch_permutation(len(ds), 0, 0)
    kept = _rank_lookups(ds, len(ds))
    after = _rss_mb()
    parts["private_peak_mb"], parts["mapped_file_mb"] = after[0] - before[0], after[1] - before[1]
    del perm, kept, ds
    benchmark.extra_info.update({k: round(v, 4) for k, v in parts.items()}, entries=BIG_ENTRIES,
                                rank_entries=rank_entries, bin_bytes=os.path.getsize(huge_index / index_bin.INDEX_BIN))
