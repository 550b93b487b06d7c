"""Several shard folders as one weighted stream: the order's properties (shares in every stretch,
passes without repeats, a pure function of seed and epoch), rank slices, exact resume, the pretrain
flags and their bad values, and a run's config.json and metrics."""

import json
import sys

import numpy as np
import pytest
from test_pretrain import TINY, fast_random_teacher, metrics  # noqa: F401 (autouse fixture)
from test_shard_index import make_shard_folder

from urfm_fast import pretrain
from urfm_fast.data import index_bin
from urfm_fast.data.mixture import MixtureDataset, folder_of_positions, mixture_order, resolve_weights
from urfm_fast.data.stream import DataError, TrainStream, open_source

SIZES = [40, 24]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixture")
    a, b = make_shard_folder(root / "a", n=SIZES[0], seed=1), make_shard_folder(root / "b", n=SIZES[1], seed=2)
    index_bin.write_index_bin(a), index_bin.write_index_bin(b)
    return a, b


def test_weights():
    np.testing.assert_allclose(resolve_weights(None, [30, 10]), [0.75, 0.25])
    np.testing.assert_allclose(resolve_weights("equal", [30, 10]), [0.5, 0.5])
    np.testing.assert_allclose(resolve_weights([4, 0, 1], [3, 3, 3]), [0.8, 0.0, 0.2])
    for bad in ([1.0], [-1, 2], [0, 0], [float("nan"), 1]):
        with pytest.raises(ValueError):
            resolve_weights(bad, [30, 10])


def test_every_stretch_holds_the_weights():
    """The folder of each position: in every window of the run (across epochs too), each folder's count
    is within 4 samples of weight * length; independent draws would stray by sqrt(length)."""
    w = resolve_weights([0.5, 0.3, 0.2], [1, 1, 1])
    folder = folder_of_positions(np.arange(20000), w, seed=3)
    for k in range(3):
        c = np.concatenate([[0], np.cumsum(folder == k)])
        for length in (50, 1000, 20000):
            got = c[length:] - c[:-length]
            assert np.abs(got - w[k] * length).max() <= 4, (k, length)
    assert not np.array_equal(folder, folder_of_positions(np.arange(20000), w, seed=4))


def test_epoch_order_passes_and_determinism():
    w = resolve_weights([0.8, 0.2], SIZES)  # folder a (40) drawn 0.8 * 64: over one pass; b (24) 0.2 * 64: a subset
    total, length = sum(SIZES), 64
    order = mixture_order(SIZES, w, seed=0, epoch=5, length=length)
    np.testing.assert_array_equal(order, mixture_order(SIZES, w, seed=0, epoch=5, length=length))
    assert len(set(order.tolist())) == length  # a key names one draw: unique within the epoch
    entry, q = order % total, order // total
    folder = (entry >= SIZES[0]).astype(int)
    np.testing.assert_array_equal(folder, folder_of_positions(5 * length + np.arange(length), w, 0))
    a_first = entry[(folder == 0) & (q == 0)]
    assert sorted(a_first.tolist()) == list(range(40))  # the first pass over a is a permutation of a
    a_second = entry[(folder == 0) & (q == 1)]
    assert len(set(a_second.tolist())) == len(a_second) == (folder == 0).sum() - 40  # no repeat within a pass
    b_draws = entry[folder == 1]
    assert (q[folder == 1] == 0).all() and len(set(b_draws.tolist())) == len(b_draws) < 24
    other = mixture_order(SIZES, w, seed=0, epoch=6, length=length)
    assert set(b_draws.tolist()) != set((other % total)[other % total >= 40].tolist())  # another subset


def _stream(ds, world=1, rank=0, batch=8):
    return TrainStream(ds, img_size=16, batch_size=batch, seed=7, rank=rank, world_size=world, num_workers=0,
                       deterministic=True)


def _indices(stream, n):
    it = iter(stream)
    return [next(it)[1].tolist() for _ in range(n)]


def test_ranks_and_resume(folders):
    ds = open_source([str(f) for f in folders], weights=[0.8, 0.2])
    assert isinstance(ds, MixtureDataset) and len(ds) == 64
    one = _indices(_stream(ds, batch=8), 20)  # 20 global batches of 8: 2.5 epochs of 64
    r0, r1 = _indices(_stream(ds, 2, 0, 4), 20), _indices(_stream(ds, 2, 1, 4), 20)
    assert [a + b for a, b in zip(r0, r1)] == one  # each rank its slice of the same global batches
    s = _stream(ds, batch=8)
    first = _indices(s, 11)  # stop mid-epoch (epoch 1, batch 3)
    state = s.state_dict()
    assert state["epoch"] == 1 and state["offset"] == 24
    resumed = _stream(ds, batch=8)
    resumed.load_state_dict(state)
    assert first + _indices(resumed, 9) == one
    assert resumed.source_counts.sum() == 160 and s.source_counts.tolist() == state["source_counts"]
    items = [ds[k] for k in one[0]]  # a key reads its folder's image
    assert all(x.shape[0] == 1 and x.shape[1] == 8 for x in items)


def test_mixture_data_errors(folders, tmp_path):
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match="not a shard folder"):
        open_source([str(folders[0]), str(tmp_path / "plain")])
    with pytest.raises(DataError, match="--data-weights"):
        open_source([str(f) for f in folders], weights=[1, 2, 3])


def _run_args(folders, out, *more):
    return [*TINY, "--data", *map(str, folders), "--batch-size", "16", "--steps", "8", "--log-every", "1",
            "--save-every", "0", "--deterministic", "--out", str(out), *more]


WEIGHTED = ["--data-weights", "0.8,0.2"]


@pytest.fixture(scope="module")
def reference(folders, tmp_path_factory):
    """One process, two folders weighted 0.8/0.2: the run the others are compared with."""
    out = tmp_path_factory.mktemp("mixref") / "run"
    assert pretrain.main(_run_args(folders, out, *WEIGHTED)) == 0
    return out


def losses(out):
    return {m["step"]: m["loss"] for m in metrics(out)}


def test_bad_mixture_flags_are_one_line(folders, tmp_path, capsys):
    (tmp_path / "plain").mkdir()
    cases = [
        (["--data-weights", "0.5,0.3,0.2"], "3 weight(s) for 2 --data folder(s)"),
        (["--data-weights", "0.5,-1"], "not all zero"),
        (["--data-weights", "0,0"], "not all zero"),
        (["--data-weights", "lots"], "comma list of numbers"),
    ]
    for more, want in cases:
        assert pretrain.main(_run_args(folders, tmp_path / "r", *more)) == 2
        err = capsys.readouterr().err
        assert want in err and err.count("\n") == 1, err
    args = _run_args([folders[0], tmp_path / "plain"], tmp_path / "r")
    assert pretrain.main(args) == 2
    err = capsys.readouterr().err
    assert "not a shard folder" in err and err.count("\n") == 1
    assert pretrain.main(_run_args([folders[0], folders[0]], tmp_path / "r")) == 2
    assert "given twice" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_config_file_lists(folders, tmp_path):
    from urfm_fast.train.config import parse_config

    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(f"data: [{folders[0]}, {folders[1]}]\ndata_weights: [0.8, 0.2]\n")
    cfg, _, demo = parse_config(["--config", str(cfg_file), "--out", str(tmp_path / "r")])
    assert cfg.data == [str(folders[0]), str(folders[1])] and cfg.data_weights == "0.8,0.2" and not demo
    cfg, _, _ = parse_config(["--data", str(folders[0]), "--out", str(tmp_path / "r")])
    assert cfg.data == str(folders[0])  # one folder stays a string (config.json of older runs alike)


def test_run_records_folders_and_shares(folders, reference):
    cfg = json.loads((reference / "config.json").read_text())
    a, b = cfg["data_sources"]
    assert (a["path"], a["images"], a["weight"]) == (str(folders[0]), 40, pytest.approx(0.8))
    assert (b["path"], b["images"], b["weight"]) == (str(folders[1]), 24, pytest.approx(0.2))
    assert len(a["id"]) == 16 and a["id"] != b["id"] and a["id"] == index_bin.folder_id(folders[0])
    recs = metrics(reference)
    assert [sum(r["source_samples"]) for r in recs] == [16 * r["step"] for r in recs]
    for before, r in zip([{"source_samples": [0, 0]}] + recs, recs):  # each window's share: its own samples
        window = np.subtract(r["source_samples"], before["source_samples"])
        np.testing.assert_allclose(r["source_share"], window / 16)
    np.testing.assert_allclose(recs[-1]["source_share_run"], [0.8, 0.2], atol=0.02)


def test_sigterm_then_resume_follows_the_same_curve(folders, reference, tmp_path, monkeypatch, capsys):
    out = tmp_path / "cut"
    monkeypatch.setenv("URFM_FAULTS", "sigterm@5")  # mid-epoch: 4 steps of 16 per epoch of 64
    assert pretrain.main(_run_args(folders, out, *WEIGHTED)) == 0
    assert "stopped by SIGTERM: step 6/8" in capsys.readouterr().out
    monkeypatch.delenv("URFM_FAULTS")
    assert pretrain.main(["--out", str(out), "--resume"]) == 0
    assert list(losses(out)) == list(range(1, 9))
    np.testing.assert_allclose(list(losses(out).values()), list(losses(reference).values()), rtol=0, atol=1e-6)
    assert metrics(out)[-1]["source_samples"] == metrics(reference)[-1]["source_samples"]


@pytest.mark.skipif(sys.platform == "win32", reason="gloo + torchrun on Linux/macOS")
def test_two_ranks_follow_the_one_rank_curve(folders, reference, tmp_path):
    from test_distributed import ATOL, torchrun

    out = tmp_path / "two"
    r = torchrun(_run_args(folders, out, *WEIGHTED, "--dist", "ddp"))
    assert r.returncode == 0, r.stderr[-3000:]
    np.testing.assert_allclose(list(losses(out).values()), list(losses(reference).values()), rtol=0, atol=ATOL)
    recs = metrics(out)
    assert recs[-1]["source_samples"] == metrics(reference)[-1]["source_samples"]
    np.testing.assert_allclose(recs[-1]["source_share_run"], [0.8, 0.2], atol=0.02)
