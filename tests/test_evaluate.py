"""evaluate: metrics against hand-computed values, stratified label fractions, each protocol end to end."""

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from test_checkpoint_io import make_official_checkpoint

from urfm_fast.evaluate import (
    classification_metrics,
    knn_classify,
    load_data,
    main,
    read_shard_labels,
    resolve_backbone,
    run,
    stratified_subset,
)

# ---------------------------------------------------------------------------------------------
# metrics


def test_metrics_by_hand():
    labels = np.array([0, 0, 1, 1, 2, 2])
    probs = np.array([[.8, .1, .1], [.4, .5, .1], [.2, .7, .1], [.1, .8, .1], [.1, .1, .8], [.6, .2, .2]])
    m = classification_metrics(probs, labels, 3)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["confusion"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    # per-class F1: c0 p=1/2 r=1/2 -> .5; c1 p=2/3 r=1 -> .8; c2 p=1 r=1/2 -> 2/3
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    # AUC c0: pos scores {.8,.4} vs neg {.2,.1,.1,.6}: pairs won 4 + 3 = 7 of 8; c1: pos {.7,.8} vs
    # {.1,.5,.1,.2}: 8/8; c2: pos {.8,.2} vs {.1,.1,.1,.1}: 8/8
    assert m["macro_auc"] == pytest.approx((7 / 8 + 1 + 1) / 3)


def test_auc_ties_and_missing_class():
    labels = np.array([0, 0, 1, 1])
    probs = np.array([[.5, .5], [.5, .5], [.5, .5], [.5, .5]])
    assert classification_metrics(probs, labels, 2)["macro_auc"] == pytest.approx(0.5)
    m = classification_metrics(np.eye(3)[[0, 1]], np.array([0, 1]), 3)  # class 2 absent everywhere
    assert m["accuracy"] == 1.0 and m["macro_f1"] == 1.0 and m["macro_auc"] == 1.0


# ---------------------------------------------------------------------------------------------
# label fractions


def test_fractions_stratified_nested_reproducible():
    labels = np.repeat([0, 1, 2, 3], [100, 50, 30, 20])
    for frac in (0.01, 0.1, 0.5, 1.0):
        idx = stratified_subset(labels, frac, seed=0)
        counts = np.bincount(labels[idx], minlength=4)
        assert counts.tolist() == [max(1, int(np.ceil(frac * n))) for n in (100, 50, 30, 20)]
        assert np.array_equal(idx, stratified_subset(labels, frac, seed=0))  # reproducible
    assert len(stratified_subset(labels, 1.0, 3)) == 200
    small, big = set(stratified_subset(labels, 0.1, 1)), set(stratified_subset(labels, 0.5, 1))
    assert small <= big  # nested for one seed
    assert not np.array_equal(stratified_subset(labels, 0.1, 0), stratified_subset(labels, 0.1, 1))
    with pytest.raises(ValueError):
        stratified_subset(labels, 0.0, 0)


def test_knn_votes():
    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    probs = knn_classify(train, torch.tensor([0, 0, 1]), torch.tensor([[1.0, 0.05], [0.1, 1.0]]), 2, k=2)
    assert probs.argmax(1).tolist() == [0, 1]
    torch.testing.assert_close(probs.sum(1), torch.ones(2))


# ---------------------------------------------------------------------------------------------
# end to end on a tiny separable ImageFolder


def _write_imagefolder(root, n_train=16, n_val=8, size=32):
    """Three classes a tiny random ViT separates: dark, bright, and a bright left half."""
    g = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        for c, name in enumerate(("dark", "bright", "half")):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                img = g.normal(60, 20, (size, size))
                if c == 1:
                    img += 120
                elif c == 2:
                    img[:, : size // 2] += 120
                Image.fromarray(img.clip(0, 255).astype(np.uint8), "L").save(root / split / name / f"{i}.png")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    _write_imagefolder(root / "data")
    make_official_checkpoint(root / "tiny.pth")  # 192-wide, 2 blocks, 32 px
    return root


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny shapes: more threads only add contention on a shared CPU
    yield
    torch.set_num_threads(n)


def test_each_protocol_separates_tiny_dataset(setup, one_thread):
    bb = resolve_backbone(f"tiny={setup / 'tiny.pth'}", "vit_tiny", "token", None)
    assert bb.img_size == 32 and bb.meta["weights"] == "ema"
    splits, classes = load_data(str(setup / "data"), 32)
    assert classes == ["bright", "dark", "half"] and splits["train"].images.shape == (48, 3, 32, 32)
    hp = dict(lp_epochs=50, ft_epochs=5, ft_min_steps=25, ft_batch_size=16)
    recs = run([bb], splits, classes, ["linear", "knn", "finetune"], [1.0], [0], torch.device("cpu"), hp,
               progress=lambda s: None)
    acc = {r["protocol"]: r["accuracy"] for r in recs}
    assert set(acc) == {"linear", "knn", "finetune"}
    assert all(a >= 0.9 for a in acc.values()), acc
    assert all(r["macro_auc"] >= 0.9 and r["n_eval"] == 24 for r in recs)


def test_cli_writes_results_table_plot(setup, capsys, one_thread):
    out = setup / "out"
    argv = ["--backbone", f"urfm={setup / 'tiny.pth'}", "--data", str(setup / "data"), "--protocol", "linear,knn",
            "--label-fractions", "0.25,1.0", "--seeds", "0,1", "--out", str(out), "--lp-epochs", "20"]
    assert main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    assert len(res["runs"]) == 2 * 2 * 2 and len(res["summary"]) == 4
    try:  # the tensorboard extra: the label-efficiency curves as scalars, x = labelled images
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        pass
    else:
        acc = EventAccumulator(str(out))
        acc.Reload()
        assert {"urfm/linear/accuracy", "urfm/knn/macro_auc"} <= set(acc.Tags()["scalars"])
        assert [e.step for e in acc.Scalars("urfm/linear/accuracy")] == [12, 48]
    assert {r["n_train"] for r in res["runs"]} == {12, 48}  # ceil(.25 * 16) = 4 per class
    assert (out / "label_efficiency.png").stat().st_size > 1000
    assert "±" in capsys.readouterr().out
    assert main(argv) == 2  # refuses to overwrite
    assert "--force" in capsys.readouterr().err


def test_cli_bad_backbone_one_line(setup, capsys):
    bad = setup / "bad.pth"
    bad.write_text("nope")
    assert main(["--backbone", str(bad), "--data", "synthetic", "--out", str(setup / "o2")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a PyTorch checkpoint" in err


def test_cli_backbones_of_different_sizes_share_first_size(setup, capsys, one_thread):
    # a 32-px checkpoint beside `random` (224 px by default) without --img-size: both run at 32 px
    out = setup / "o3"
    argv = ["--backbone", f"urfm={setup / 'tiny.pth'}", "random", "--arch", "vit_tiny", "--data",
            str(setup / "data"), "--protocol", "knn", "--label-fractions", "1.0", "--seeds", "0", "--out", str(out)]
    assert main(argv) == 0
    assert "all run at 32px" in capsys.readouterr().out
    res = json.loads((out / "results.json").read_text())
    assert {r["backbone"] for r in res["runs"]} == {"urfm", "random"}


# ---------------------------------------------------------------------------------------------
# shard folder + labels CSV


@pytest.fixture(scope="module")
def labelled_shards(tmp_path_factory):
    """python -m urfm_fast.prepare on a tiny labelled folder (flat files; labels only in the CSV)."""
    from urfm_fast import prepare

    root = tmp_path_factory.mktemp("shards")
    _write_imagefolder(root / "folder", n_train=8, n_val=4)
    src = root / "scans"  # a plain archive folder: the class is not in the layout
    src.mkdir()
    rows = []
    for p in sorted((root / "folder").rglob("*.png")):
        split, cls = p.parent.parent.name, p.parent.name
        name = f"{cls[0]}{split[0]}{p.stem}.png"
        p.rename(src / name)
        rows.append((name, cls, split))
    c = prepare.prepare([src], root / "out", short_side=32, workers=1, progress=False, path_map=root / "map.jsonl")
    assert c["images_total"] == 36 and c["files_skipped"] == 0
    paths = {r["id"]: r["path"] for r in prepare._read_jsonl(root / "map.jsonl")}
    return root / "out", rows, [paths[r["id"]] for r in prepare.read_index(root / "out")]


def _write_csv(path, header, rows):
    path.write_text(",".join(header) + "\n" + "".join(",".join(map(str, r)) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("key", ["path", "index"])
def test_cli_shard_folder_with_labels(labelled_shards, tmp_path, one_thread, key, capsys):
    out, rows, order = labelled_shards
    if key == "path":
        labels = _write_csv(tmp_path / "labels.csv", ["path", "label", "split"], rows)
    else:  # extra columns are ignored
        labels = _write_csv(tmp_path / "labels.csv", ["index", "split", "label", "note"],
                            [(order.index(p), sp, c, "x") for p, c, sp in rows])
    argv = ["--backbone", "random", "--arch", "vit_tiny", "--img-size", "32", "--data", str(out),
            "--labels", str(labels), "--protocol", "linear", "--label-fractions", "1.0", "--seeds", "0",
            "--lp-epochs", "30", "--out", str(tmp_path / "res")]
    assert main(argv) == 0
    assert "3 classes, train 24, val 12" in capsys.readouterr().out
    res = json.loads((tmp_path / "res" / "results.json").read_text())
    assert res["classes"] == ["bright", "dark", "half"]
    assert res["args"]["labels"] == str(labels)
    (run_,) = res["runs"]
    assert run_["protocol"] == "linear" and run_["fraction"] == 1.0 and run_["seed"] == 0
    assert run_["n_train"] == 24 and run_["n_eval"] == 12 and run_["eval_split"] == "val"
    assert run_["accuracy"] >= 0.9 and sum(map(sum, run_["confusion"])) == 12
    assert len(res["summary"]) == 1 and (tmp_path / "res" / "label_efficiency.png").exists()


def test_labels_csv_errors_one_line(labelled_shards, tmp_path, capsys):
    out, rows, _ = labelled_shards
    cases = {
        "is not in": (["index", "label", "split"], [(0, "a", "train"), (36, "b", "val")]),
        "'nope.png' is not in": (["path", "label", "split"], [(rows[0][0], "a", "train"), ("nope.png", "a", "val")]),
        "need train and val": (["path", "label", "split"], [(p, c, "train") for p, c, _ in rows]),
        "not one of train, val, test": (["index", "label", "split"], [(0, "a", "training")]),
        "expected index,label,split": (["file", "label", "split"], [(0, "a", "train")]),
        "labelled twice": (["index", "label", "split"], [(0, "a", "train"), (0, "a", "val")]),
    }
    for k, (want, (header, body)) in enumerate(cases.items()):
        labels = _write_csv(tmp_path / f"l{k}.csv", header, body)
        with pytest.raises(ValueError, match=re.escape(want)) as e:
            read_shard_labels(out, labels)
        assert "\n" not in str(e.value) and str(labels) in str(e.value)
    for k in (0, 2):  # through the command line: one line on stderr, exit status 2, nothing written
        argv = ["--backbone", "random", "--arch", "vit_tiny", "--img-size", "32", "--data", str(out),
                "--labels", str(tmp_path / f"l{k}.csv"), "--protocol", "linear", "--out", str(tmp_path / f"r{k}")]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and list(cases)[k] in err, err
        assert not (tmp_path / f"r{k}").exists()
    # a shard folder without --labels says what is missing
    assert main(["--backbone", "random", "--arch", "vit_tiny", "--img-size", "32", "--data", str(out)]) == 2
    assert "pass --labels" in capsys.readouterr().err
