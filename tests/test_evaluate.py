"""evaluate: metrics against hand-computed values, stratified label fractions, each protocol end to end."""

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from test_checkpoint_io import make_official_checkpoint

from urfm_fast.eval.backbones import resolve_backbone
from urfm_fast.eval.config import EvalConfig
from urfm_fast.eval.data import load_data, read_shard_labels, stratified_subset
from urfm_fast.eval.protocols import classification_metrics, knn_classify
from urfm_fast.eval.run import run
from urfm_fast.evaluate import main

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
    probs = knn_classify(train, torch.tensor([0, 0, 1]), torch.tensor([[1.0, 0.05], [0.1, 1.0]]), 2, k=2,
                         temperature=0.07)
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
    cfg = EvalConfig(lp_epochs=50, ft_epochs=5, ft_min_steps=25, ft_batch_size=16)
    recs = run([bb], splits, classes, ["linear", "knn", "finetune"], [1.0], [0], torch.device("cpu"), cfg,
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
    printed = capsys.readouterr().out
    assert "±" in printed and "[row 1/8," in printed and "[row 8/8," in printed and "estimate: about" in printed
    assert "±" in (out / "table.txt").read_text()
    assert main(argv) == 0  # the same command again: every row is done, none runs twice
    assert "8 of 8 rows already done" in capsys.readouterr().out
    assert main([*argv, "--lp-epochs", "21"]) == 2  # other settings: refuses to mix them into these results
    assert "--lp-epochs 20 there, 21 now); pass --force" in capsys.readouterr().err


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
    from urfm_fast.data import convert, shards

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
    c = convert.prepare([src], root / "out", short_side=32, workers=1, progress=False, path_map=root / "map.jsonl")
    assert c["images_total"] == 36 and c["files_skipped"] == 0
    paths = {r["id"]: r["path"] for r in shards.read_jsonl(root / "map.jsonl")}
    return root / "out", rows, [paths[r["id"]] for r in shards.read_index(root / "out")]


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


# ---------------------------------------------------------------------------------------------
# EvalConfig: the flags, --config files, the CPU sizing


def test_config_file_then_flags_given_win(tmp_path):
    from urfm_fast.eval.config import parse_config

    (tmp_path / "e.yaml").write_text("backbone: [a=random]\ndata: synthetic\nseeds: [3, 4]\nlabel-fractions: 0.5\n"
                                     "lp_epochs: 7\nquiet: true\nforce: false\n")
    (tmp_path / "e.json").write_text(json.dumps({"backbone": ["random"], "data": "synthetic", "knn_k": 5}))
    cfg, given = parse_config(["--config", str(tmp_path / "e.yaml"), "--lp-epochs", "9", "--out", str(tmp_path)])
    assert cfg.backbone == ["a=random"] and cfg.seeds == [3, 4] and cfg.label_fractions == [0.5]
    assert cfg.lp_epochs == 9 and cfg.quiet is True and cfg.knn_k == EvalConfig.knn_k  # the flag wins; defaults
    assert "knn_k" not in given and given["lp_epochs"] == 9
    cfg, _ = parse_config(["--config", str(tmp_path / "e.json"), "--out", str(tmp_path)])
    assert cfg.knn_k == 5 and cfg.seeds == EvalConfig.seeds
    for text, needle in (("seedz: 1\n", "unknown key 'seedz'"), ("knn_k: x\n", "invalid int value: 'x'"),
                         ("data: synthetic\n", "required: --backbone")):
        (tmp_path / "bad.yaml").write_text(text)
        with pytest.raises(ValueError, match=re.escape(needle)) as e:
            parse_config(["--config", str(tmp_path / "bad.yaml")])
        assert "\n" not in str(e.value)


def test_results_args_are_the_config_fields(setup, one_thread):
    import dataclasses

    out = setup / "fields"
    argv = ["--backbone", "random", "--arch", "vit_tiny", "--img-size", "32", "--data", str(setup / "data"),
            "--protocol", "knn", "--label-fractions", "1", "--seeds", "0", "--out", str(out)]
    assert main(argv) == 0
    args = json.loads((out / "results.json").read_text())["args"]
    assert list(args) == [f.name for f in dataclasses.fields(EvalConfig)]
    assert args["img_size"] == 32 and args["synthetic_train"] == EvalConfig.synthetic_train  # real data: no sizing


def test_built_in_data_on_a_cpu_runs_at_the_demo_size(tmp_path):
    from urfm_fast.eval.config import CPU_DEMO, cpu_demo_line, fit_machine, parse_config

    cfg, given = parse_config(["--backbone", "random", "--data", "synthetic", "--img-size", "32",
                               "--out", str(tmp_path)])
    sized, applied = fit_machine(cfg, given, on_cpu=True)
    assert sized.img_size == 32 and "img_size" not in applied  # a flag given wins
    assert sized.arch == "vit_tiny" and sized.depth == 4 and sized.ft_epochs == CPU_DEMO["ft_epochs"]
    assert applied and "\n" not in cpu_demo_line(applied) and "--arch vit_tiny" in cpu_demo_line(applied)
    assert fit_machine(cfg, given, on_cpu=False) == (cfg, {})  # a GPU keeps the full size
    real, given = parse_config(["--backbone", "random", "--data", str(tmp_path), "--out", str(tmp_path / "o")])
    assert fit_machine(real, given, on_cpu=True) == (real, {})  # real data keeps it too


# ---------------------------------------------------------------------------------------------
# Rows kept: interrupted runs keep what finished, a rerun continues


def _wait_for_rows(path, proc, timeout=300):
    import time

    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout and proc.poll() is None:
        try:
            if json.loads(path.read_text())["runs"]:
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.2)
    pytest.fail("no row written in time" if proc.poll() is None else f"evaluate ended: {proc.communicate()}")


@pytest.mark.parametrize("sig, code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_interrupted_run_keeps_its_rows_and_a_rerun_skips_them(tmp_path, monkeypatch, capsys, sig, code):
    import signal
    import subprocess
    import sys

    from urfm_fast.eval import run as eval_run

    out = tmp_path / "o"
    argv = ["--backbone", "random", "--arch", "vit_tiny", "--depth", "1", "--img-size", "32", "--data", "synthetic",
            "--synthetic-train", "40", "--synthetic-val", "20", "--protocol", "linear", "--label-fractions", "1",
            "--seeds", ",".join(map(str, range(40))), "--lp-min-steps", "2000", "--threads", "1", "--out", str(out)]
    proc = subprocess.Popen([sys.executable, "-m", "urfm_fast.evaluate", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _wait_for_rows(out / "results.json", proc)
    proc.send_signal(getattr(signal, sig))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code and err.strip() == eval_run.INTERRUPTED, err
    kept = json.loads((out / "results.json").read_text())["runs"]
    assert 1 <= len(kept) < 40 and [r["seed"] for r in kept] == list(range(len(kept)))
    # the same command again runs only the rows left (the probe replaced by a quick stand-in)
    ran = []

    def quick(train_f, train_y, eval_f, num_classes, seed, **kw):
        ran.append(seed)
        return torch.full((len(eval_f), num_classes), 1.0 / num_classes)

    monkeypatch.setattr(eval_run, "linear_probe", quick)
    capsys.readouterr()
    assert main(argv) == 0
    assert f"{len(kept)} of 40 rows already done" in capsys.readouterr().out
    assert ran == list(range(len(kept), 40))
    res = json.loads((out / "results.json").read_text())
    assert [r["seed"] for r in res["runs"]] == list(range(40)) and res["runs"][: len(kept)] == kept


# ---------------------------------------------------------------------------------------------
# attentive probe


def test_attentive_head_matches_a_hand_written_forward():
    import math

    import torch.nn.functional as F

    from urfm_fast.eval.attentive import AttentiveHead

    torch.manual_seed(0)
    head = AttentiveHead(32, 3, num_heads=4).eval()
    for p in head.parameters():  # no zero biases or unit norms: every term shows
        torch.nn.init.normal_(p, std=0.3)
    tokens = torch.randn(5, 7, 32)
    x = F.layer_norm(tokens, (32,), head.norm_kv.weight, head.norm_kv.bias, 1e-6)
    q = head.query[0, 0] @ head.q.weight.T + head.q.bias  # (32,)
    kv = x @ head.kv.weight.T + head.kv.bias  # (5, 7, 64)
    k, v = kv[..., :32], kv[..., 32:]
    heads = []
    for h in range(4):
        s = slice(8 * h, 8 * (h + 1))
        att = torch.softmax((k[..., s] @ q[s]) / math.sqrt(8), dim=-1)  # (5, 7)
        heads.append((att[..., None] * v[..., s]).sum(1))  # (5, 8)
    o = torch.cat(heads, -1) @ head.proj.weight.T + head.proj.bias
    want = F.layer_norm(o, (32,), head.norm.weight, head.norm.bias, 1e-6) @ head.fc.weight.T + head.fc.bias
    torch.testing.assert_close(head(tokens), want, atol=1e-5, rtol=1e-5)


def _marked_patch_toy(n, seed):
    """Tokens [n, 16, 32]: every patch holds a class code (dims 0-3) and a position code (dims 8-31); the label
    is the class of the one marked patch (dim 4), at a random position. Pooling mixes it with 15 distractors."""
    g = torch.Generator().manual_seed(seed)
    pos = torch.randn(16, 24, generator=torch.Generator().manual_seed(99))
    codes = torch.randint(0, 4, (n, 16), generator=g)
    marked = torch.randint(0, 16, (n,), generator=g)
    t = torch.zeros(n, 16, 32)
    t[..., :4] = torch.nn.functional.one_hot(codes, 4).float()
    t[..., 8:] = pos
    t[torch.arange(n), marked, 4] = 3.0
    t += 0.05 * torch.randn(t.shape, generator=g)
    return t, codes[torch.arange(n), marked]


def test_attentive_probe_finds_the_marked_patch_that_pooling_loses(one_thread):
    from urfm_fast.eval.attentive import attentive_probe
    from urfm_fast.eval.protocols import linear_probe

    (tt, ty), (et, ey) = _marked_patch_toy(512, 0), _marked_patch_toy(256, 1)
    att = attentive_probe(tt, ty, et, 4, 0, epochs=100, min_steps=300).argmax(1)
    lin = linear_probe(tt.mean(1), ty, et.mean(1), 4, 0, epochs=100, lr=0.1, min_steps=300).argmax(1)
    acc_att, acc_lin = (float((p == ey).float().mean()) for p in (att, lin))
    assert acc_att > 0.9 and acc_att > acc_lin + 0.3, (acc_att, acc_lin)


def test_attentive_protocol_end_to_end(setup, one_thread):
    bb = resolve_backbone(f"tiny={setup / 'tiny.pth'}", "vit_tiny", "token", None)
    splits, classes = load_data(str(setup / "data"), 32)
    recs = run([bb], splits, classes, ["attentive"], [1.0], [0], torch.device("cpu"),
               EvalConfig(lp_epochs=20, lp_min_steps=50), progress=lambda s: None)
    assert [r["protocol"] for r in recs] == ["attentive"] and recs[0]["accuracy"] >= 0.9, recs
