"""Train stream: epochs, ranks, resume, determinism across workers/ranks, image folders, bad input."""

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset

from urfm_fast.data.stream import (
    DataError,
    ImageFolderDataset,
    build_train_stream,
    epoch_permutation,
    mask_noise,
)


class Varied(Dataset):
    """n uint8 images [1,H,W] of varying sizes; pixel (0,0) encodes the index."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        h, w = 20 + i % 7, 24 + (3 * i) % 11
        x = torch.randint(0, 256, (1, h, w), dtype=torch.uint8, generator=g)
        x[0, 0, 0] = i
        return x


def take(stream, n):
    out = []
    for k, (x, idx) in enumerate(stream):
        out.append((x, idx))
        if k + 1 == n:
            break
    return out


def test_epochs_ranks_disjoint_and_drop_last():
    ds = Varied(23)
    seen = []
    for rank in range(2):
        s = build_train_stream(ds, img_size=8, batch_size=3, world_size=2, rank=rank, num_workers=0)
        assert s.steps_per_epoch == 3 and s.samples_per_epoch == 18
        batches = take(s, 4)  # one epoch and one batch of the next
        assert s.epoch == 1
        assert all(x.shape == (3, 3, 8, 8) for x, _ in batches)
        seen.append(torch.cat([i for _, i in batches[:3]]))
        torch.testing.assert_close(torch.cat([i for _, i in batches[3:]]),
                                   epoch_permutation(23, 0, 1)[6 * 0 + 3 * rank: 3 * rank + 3].long())
    both = torch.cat(seen)
    assert len(set(both.tolist())) == 18  # ranks never overlap
    assert set(both.tolist()) == set(epoch_permutation(23, 0, 0)[:18].tolist())


def test_epoch_permutation_is_int64s_permutation_in_int32():
    """The int32 order (half the memory at 10M entries) is the very permutation torch draws as int64, so runs
    keep their order (the golden curve depends on it)."""
    from urfm_fast.data.stream import mix_seed

    for n, seed, epoch in ((1, 0, 0), (23, 0, 1), (100_003, 7, 3)):
        perm = epoch_permutation(n, seed, epoch)
        g = torch.Generator().manual_seed(int(mix_seed(seed, epoch, 0x5EED)) & 0x7FFFFFFFFFFFFFFF)
        assert perm.dtype == torch.int32 and torch.equal(perm.long(), torch.randperm(n, generator=g))


def test_deterministic_independent_of_workers_and_ranks():
    ds = Varied(16)
    kw = dict(img_size=12, seed=7, deterministic=True)
    one = take(build_train_stream(ds, batch_size=4, num_workers=0, **kw), 4)
    two = take(build_train_stream(ds, batch_size=4, num_workers=2, **kw), 4)
    for (a, ia), (b, ib) in zip(one, two):
        assert torch.equal(ia, ib) and torch.equal(a, b)
    by_index = {int(i): x for xs, idx in one for x, i in zip(xs, idx)}
    # Same samples on 2 ranks of 2 -> same pixels per sample, up to float rounding: a batch's zero
    # padding size (largest image in it) enters grid_sample's normalised coordinates.
    for rank in range(2):
        s = build_train_stream(ds, batch_size=2, world_size=2, rank=rank, num_workers=0, **kw)
        for xs, idx in take(s, 4):
            for x, i in zip(xs, idx):
                torch.testing.assert_close(x, by_index[int(i)], atol=1e-5, rtol=0)


def test_resume_mid_epoch_continues_exactly():
    ds = Varied(10)
    kw = dict(img_size=8, batch_size=3, seed=3, num_workers=0)
    full = take(build_train_stream(ds, deterministic=True, **kw), 7)  # 3 steps/epoch: crosses 2 epochs
    s = build_train_stream(ds, deterministic=True, **kw)
    take(s, 2)
    state = s.state_dict()
    assert state["epoch"] == 0 and state["offset"] == 6
    r = build_train_stream(ds, deterministic=True, **kw)
    r.load_state_dict(state)
    rest = take(r, 5)
    for (a, ia), (b, ib) in zip(full[2:], rest):
        assert torch.equal(ia, ib) and torch.equal(a, b)
    # the non-deterministic stream restores its generator too
    s = build_train_stream(ds, **kw)
    take(s, 2)
    state = s.state_dict()
    want = take(s, 2)
    r = build_train_stream(ds, **kw)
    r.load_state_dict(state)
    got = take(r, 2)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(want, got))


def test_mask_noise_is_per_sample():
    idx = torch.tensor([4, 9, 2])
    n = mask_noise(0, 1, idx, 49)
    assert n.shape == (3, 49) and 0 <= n.min() and n.max() < 1
    torch.testing.assert_close(mask_noise(0, 1, idx[1:2], 49), n[1:2])
    assert not torch.equal(mask_noise(0, 2, idx, 49), n)  # new epoch, new mask
    s = build_train_stream(Varied(8), img_size=8, batch_size=4, num_workers=0, deterministic=True)
    _, i = next(iter(s))
    torch.testing.assert_close(s.mask_noise(i, 49), mask_noise(0, 0, i, 49))


def test_image_folder_counts_unreadable(tmp_path, caplog):
    root = tmp_path / "imgs"
    (root / "a b" / "c").mkdir(parents=True)
    for k in range(5):
        Image.fromarray(np.full((40 + k, 60), 30 * k, np.uint8)).save(root / "a b" / "c" / f"{k}.png")
    Image.fromarray(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16).save(root / "deep16.png")
    Image.fromarray(np.zeros((30, 30, 3), np.uint8)).save(root / "rgb.JPG")
    data = (root / "deep16.png").read_bytes()
    (root / "trunc.png").write_bytes(data[: len(data) // 2])
    (root / "notes.txt").write_text("not an image")
    ds = ImageFolderDataset(root, short_side=32)
    assert len(ds) == 8  # .txt is not listed
    s = build_train_stream(root, img_size=16, batch_size=4, num_workers=2, short_side=32)
    with caplog.at_level("WARNING"):
        take(s, 4)  # two epochs: the truncated file is met twice, logged and counted once
    assert s.source.skipped == 1 and "trunc.png" in s.source.bad
    assert sum("trunc.png" in r.message for r in caplog.records) == 1
    assert "1 unreadable skipped" in s.summary()
    img = ds[2]
    assert img.dtype == torch.uint8 and img.shape[0] == 1 and min(img.shape[1:]) == 32


def test_bad_sources_raise_one_line_data_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        build_train_stream(tmp_path / "nope", img_size=8, batch_size=2)
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match="no PNG/JPEG/BMP/TIFF images") as e:
        build_train_stream(tmp_path / "empty", img_size=8, batch_size=2)
    assert "\n" not in str(e.value) and isinstance(e.value, ValueError)
    with pytest.raises(DataError, match="fewer than one global batch"):
        build_train_stream(Varied(3), img_size=8, batch_size=2, world_size=2)


def test_synthetic_source():
    pytest.importorskip("urfm_fast.data.synthetic")
    s = build_train_stream("synthetic", img_size=32, batch_size=2, num_workers=0, synthetic_length=4)
    x, idx = next(iter(s))
    assert x.shape == (2, 3, 32, 32) and idx.shape == (2,)
    assert x.std() > 0.01


def test_synthetic_source_falls_back_to_lazy_rendering(monkeypatch, caplog):
    # If rendering up front fails (e.g. on a GPU), the demo still runs: workers render lazily.
    from urfm_fast.data.stream import SyntheticSource
    from urfm_fast.data.synthetic import SyntheticUltrasound

    def broken(self, device="cpu", batch=256):
        raise RuntimeError("no kernel image is available")

    monkeypatch.setattr(SyntheticUltrasound, "render_all", broken)
    with caplog.at_level("WARNING"):
        src = SyntheticSource(8, 32, seed=1)
    assert "workers render it on the CPU" in caplog.text
    assert src[3].shape == (1, 32, 32) and src[3].dtype == torch.uint8
