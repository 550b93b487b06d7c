"""Segmentation and UltraBench folders: the metrics against torchmetrics, per-pixel average precision
against a hand count and torchmetrics, the synthetic masks against the rendered lesions, the readers (task
detection, patient grouping, scan masks), each bad input as one line and exit 2, the linear probe's losses
on a small foreground, and the evaluate commands end to end at toy size (linear probe and smp's DPT)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from urfm_fast import evaluate
from urfm_fast.data import synthetic
from urfm_fast.eval import run as eval_run
from urfm_fast.eval.backbones import resolve_backbone
from urfm_fast.eval.config import EvalConfig, parse_config
from urfm_fast.eval.data import label_subset
from urfm_fast.eval.seg_data import load_mask_folder, load_ultrabench, task_candidates
from urfm_fast.eval.segmentation import (
    ap_metrics,
    average_precision,
    class_weights,
    confusion_matrix,
    extract_tokens,
    histogram_ap,
    linear_seg_probe,
    score_histogram,
    segmentation_metrics,
)

TOY = ["--backbone", "random", "--arch", "vit_tiny", "--img-size", "32", "--lp-epochs", "1", "--lp-min-steps", "2",
       "--threads", "2", "--quiet"]

# ---------------------------------------------------------------------------------------------
# metrics


def test_metrics_equal_torchmetrics_on_random_masks():
    tm = pytest.importorskip("torchmetrics.classification")
    g = torch.Generator().manual_seed(0)
    C = 4
    target = torch.randint(0, C, (6, 17, 13), generator=g)
    pred = torch.where(torch.rand(6, 17, 13, generator=g) < 0.6, target, torch.randint(0, C, (6, 17, 13), generator=g))
    m = segmentation_metrics(confusion_matrix(pred, target, C))
    dice = tm.MulticlassF1Score(C, average=None)(pred.flatten(), target.flatten())  # global Dice = pixel F1
    iou = tm.MulticlassJaccardIndex(C, average=None)(pred.flatten(), target.flatten())
    acc = tm.MulticlassAccuracy(C, average="micro")(pred.flatten(), target.flatten())
    np.testing.assert_allclose(m["dice_per_class"], dice.numpy(), rtol=1e-6)
    np.testing.assert_allclose(m["iou_per_class"], iou.numpy(), rtol=1e-6)
    assert m["dice"] == pytest.approx(float(dice[1:].mean()), rel=1e-6)
    assert m["iou"] == pytest.approx(float(iou[1:].mean()), rel=1e-6)
    assert m["pixel_accuracy"] == pytest.approx(float(acc), rel=1e-6)
    seg = pytest.importorskip("torchmetrics.segmentation")
    ref = seg.DiceScore(C, include_background=False, average="none", aggregation_level="global", input_format="index")
    np.testing.assert_allclose(m["dice_per_class"][1:], ref(pred, target).numpy(), rtol=1e-5)


def test_absent_class_is_nan_and_left_out_of_the_means():
    target = torch.tensor([[0, 0, 1, 1]])
    pred = torch.tensor([[0, 1, 1, 1]])
    m = segmentation_metrics(confusion_matrix(pred, target, 3))  # class 2: neither true nor predicted
    assert m["dice_per_class"][1] == pytest.approx(2 * 2 / (2 * 2 + 1))  # TP 2, FP 1, FN 0
    assert np.isnan(m["dice_per_class"][2]) and m["dice"] == pytest.approx(0.8)
    assert m["iou"] == pytest.approx(2 / 3) and m["pixel_accuracy"] == pytest.approx(0.75)


def test_average_precision_counts_ties_as_one_threshold():
    """By hand: thresholds 0.9 (P 1, R 1/3), 0.8 (a tie of a positive and a negative: P 2/3, R 2/3) and 0.5
    (P 1/2, R 1): AP = (1 + 2/3 + 1/2) / 3, as sklearn's average_precision_score counts it."""
    scores = torch.tensor([0.9, 0.8, 0.8, 0.5, 0.5, 0.5, 0.1])
    positive = torch.tensor([1, 1, 0, 0, 1, 0, 0]).bool()
    assert average_precision(scores, positive) == pytest.approx(13 / 18)
    assert np.isnan(average_precision(scores, torch.zeros(7, dtype=torch.bool)))  # no positives: undefined


def test_average_precision_equals_torchmetrics_with_ties():
    tm = pytest.importorskip("torchmetrics.functional.classification")
    g = torch.Generator().manual_seed(0)
    scores = (torch.rand(5000, generator=g) * 50).round() / 50  # 51 distinct values: ties everywhere
    positive = torch.rand(5000, generator=g) < 0.1 + 0.5 * scores
    ref = float(tm.binary_average_precision(scores, positive.long()))  # sklearn's rule
    assert average_precision(scores, positive) == pytest.approx(ref, abs=1e-6)


def test_histogram_ap_matches_the_exact_ap():
    g = torch.Generator().manual_seed(1)
    target = torch.randint(0, 3, (4, 40, 40), generator=g)
    logits = 2 * torch.randn(4, 3, 40, 40, generator=g) + torch.nn.functional.one_hot(target, 3).permute(0, 3, 1, 2)
    prob = logits.softmax(1)
    hist = score_histogram(prob[:2], target[:2]) + score_histogram(prob[2:], target[2:])  # summed over batches
    exact = [average_precision(prob[:, c], target == c) for c in range(3)]
    np.testing.assert_allclose(histogram_ap(hist), exact, atol=1e-3)


def test_a_class_without_pixels_has_no_ap_and_is_left_out_of_the_mean():
    target = torch.tensor([[[0, 0, 1, 1]]])  # class 2: no pixel
    prob = torch.tensor([[[[0.9, 0.6, 0.2, 0.3]], [[0.05, 0.3, 0.7, 0.6]], [[0.05, 0.1, 0.1, 0.1]]]])
    m = ap_metrics(score_histogram(prob, target))
    assert m["ap_per_class"][1] == pytest.approx(1.0) and np.isnan(m["ap_per_class"][2])
    assert m["mean_ap"] == pytest.approx(1.0)
    assert np.isnan(ap_metrics(score_histogram(prob, torch.zeros_like(target)))["mean_ap"])


# ---------------------------------------------------------------------------------------------
# synthetic masks


def test_synthetic_masks_follow_the_rendered_lesions():
    labels = torch.tensor([0, 1, 2, 3] * 4)
    x0, y0 = synthetic.generate(16, size=64, seed=7, labels=labels)
    x, y, m = synthetic.generate(16, size=64, seed=7, labels=labels, masks=True)
    assert torch.equal(x, x0) and torch.equal(y, y0)  # the masks change no pixel
    assert m.shape == (16, 64, 64) and m.dtype == torch.uint8
    for i in range(16):
        ids = set(m[i].unique().tolist())
        assert ids == ({0} if y[i] == 0 else {0, int(y[i])}), (i, ids)
    # a cyst is anechoic: darker inside its mask than in the band just around it; a hyperechoic lesion brighter
    grown = torch.nn.functional.max_pool2d(m[:, None].float(), 7, 1, 3)[:, 0] > 0
    for i in range(16):
        if y[i] in (1, 3):
            inside, ring = x[i, 0][m[i] > 0].float().mean(), x[i, 0][grown[i] & (m[i] == 0)].float().mean()
            assert (inside < 0.7 * ring) if y[i] == 1 else (inside > ring), (i, float(inside), float(ring))
    _, info, _ = synthetic._generate_range(0, 16, 64, 7, labels=labels)
    for i in (k for k in range(16) if y[k] > 0):  # the mask's centroid is the lesion's centre
        rows, cols = torch.nonzero(m[i], as_tuple=True)
        centre = torch.stack([cols.float().mean(), rows.float().mean()])
        assert torch.dist(centre, info["lesion_xy"][i]) < 0.5 * float(info["lesion_r"][i]) + 1.5


# ---------------------------------------------------------------------------------------------
# UltraBench folders, written here


def _png(path: Path, a: np.ndarray) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path)
    return str(path.relative_to(path.parents[1]))


def make_ultrabench(root: Path, n=(8, 4, 4), size=(24, 20), classes=3, with_mask=True, with_label=True) -> Path:
    """train/validation/test JSON + PNG images, scan masks and task masks; 2 images per patient."""
    rng = np.random.default_rng(0)
    h, w = size
    for split, count in zip(("train", "validation", "test"), n):
        recs = []
        for i in range(count):
            stem = f"{split}_{i}"
            img = rng.integers(1, 255, (h, w), dtype=np.uint8)
            scan = np.ones((h, w), np.uint8)
            scan[:, : w // 4] = 0  # the left quarter is outside the scan
            rec = {"image": _png(root / "images" / f"{stem}.png", img),
                   "scan_mask": _png(root / "scan_masks" / f"{stem}.png", scan),
                   "patient": f"{split}-p{i // 2}", "dimensions": [w, h]}
            if with_mask:
                mask = np.zeros((h, w), np.uint8)
                mask[h // 4 : h // 2, w // 3 : 2 * w // 3] = 1 + i % (classes - 1)
                rec["tumor_mask"] = _png(root / "masks" / f"{stem}.png", mask)
            if with_label:
                rec["pathology"] = ["benign", "malignant"][i % 2]
            recs.append(rec)
        (root / f"{split}.json").write_text(json.dumps(recs))
    return root


def test_reader_task_detection_and_scan_mask(tmp_path):
    root = make_ultrabench(tmp_path / "ub")
    recs = json.loads((root / "train.json").read_text())
    assert task_candidates(recs) == (["pathology"], ["tumor_mask"])  # not patient, image paths or dimensions
    with pytest.raises(ValueError, match=r"several tasks \(label keys pathology; mask keys tumor_mask\)"):
        load_ultrabench(root, 16)
    task, splits, classes = load_ultrabench(root, 24, task="segmentation")
    assert task == "segmentation" and classes == ["background", "class_1", "class_2"]
    assert set(splits) == {"train", "val", "test"} and splits["train"].images.shape == (8, 3, 24, 24)
    kept = load_ultrabench(root, 24, mask_key="tumor_mask", scan_mask=False)[1]["train"].images[0, 0]
    blank = splits["train"].images[0, 0]
    assert (blank[:, :5] == 0).all() and (kept[:, :5] > 0).all()  # blanked outside the scan only by default
    task, splits, classes = load_ultrabench(root, 16, label_key="pathology")
    assert task == "classification" and classes == ["benign", "malignant"]
    assert splits["train"].groups.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]  # patients as small integers


def test_ultrabench_release_layouts(tmp_path):
    """Earlier releases (train_val.json), a class name beside its integer label, masks named *_mask_* and
    binary masks saved as 0/255."""
    root = tmp_path / "ub"
    recs = {"train_val": [], "test": []}
    for split, rs in recs.items():
        for i in range(4):
            mask = np.zeros((16, 16), np.uint8)
            mask[4:8, 4:8] = 255
            rs.append({"image": _png(root / "images" / f"{split}{i}.png", np.full((16, 16), 50 + i, np.uint8)),
                       "tumor_mask_binary": _png(root / "masks" / f"{split}{i}.png", mask),
                       "class": ["cyst", "solid"][i % 2], "label": i % 2, "patient": i})
        (root / f"{split}.json").write_text(json.dumps(rs))
    assert task_candidates(recs["test"]) == (["class"], ["tumor_mask_binary"])
    task, splits, classes = load_ultrabench(root, 16, task="segmentation")
    assert task == "segmentation" and classes == ["background", "class_1"] and set(splits) == {"train", "test"}
    assert splits["test"].masks.unique().tolist() == [0, 1]
    task, splits, classes = load_ultrabench(root, 16, task="classification")
    assert classes == ["cyst", "solid"] and splits["train"].labels.tolist() == [0, 1, 0, 1]


def test_patient_grouped_label_fractions():
    groups = np.repeat(np.arange(10), 3)  # 10 patients x 3 images
    strata = np.repeat(np.arange(10) % 2, 3)
    small, large = (label_subset(strata, f, 0, groups) for f in (0.2, 0.6))
    for idx in (small, large):
        chosen = set(groups[idx])
        assert set(np.flatnonzero(np.isin(groups, list(chosen)))) == set(idx)  # whole patients only
        assert len(idx) == 3 * len(chosen)
    assert set(small) <= set(large)  # nested
    assert sorted(set(strata[small])) == [0, 1]  # stratified over patients
    assert len(set(groups[small])) == 2 and len(set(groups[large])) == 6


def test_image_mask_folder_pairs(tmp_path):
    rng = np.random.default_rng(1)
    for split in ("train", "val"):
        for i in range(3):
            _png(tmp_path / split / "images" / f"s{i}.png", rng.integers(0, 255, (20, 20), dtype=np.uint8))
            _png(tmp_path / split / "masks" / f"s{i}.png", (np.arange(400).reshape(20, 20) % 3).astype(np.uint8))
    splits, classes = load_mask_folder(tmp_path, 20)
    assert classes == ["background", "class_1", "class_2"] and splits["val"].masks.shape == (3, 20, 20)
    assert np.array_equal(splits["train"].masks[0].numpy(), np.arange(400).reshape(20, 20) % 3)  # ids kept
    (tmp_path / "val" / "masks" / "s2.png").unlink()
    with pytest.raises(ValueError, match=r"s2.png: no mask"):
        load_mask_folder(tmp_path, 20)


# ---------------------------------------------------------------------------------------------
# bad input: one line naming the file or record, exit 2


def _break(root: Path, case: str) -> str:
    recs = json.loads((root / "test.json").read_text())
    if case == "size":
        _png(root / recs[1]["tumor_mask"], np.zeros((5, 5), np.uint8))
        return "test.json record 1: mask"
    if case == "class_id":
        _png(root / recs[2]["tumor_mask"], np.full((24, 20), 7, np.uint8))
        return "class id 7, but --num-classes is 3"
    if case == "not_integer":
        Image.fromarray(np.full((24, 20), 0.5, np.float32)).save(root / "masks" / "float.tiff")
        recs[0]["tumor_mask"] = "masks/float.tiff"
    if case == "colour":
        _png(root / recs[0]["tumor_mask"], np.dstack([np.zeros((24, 20), np.uint8), np.ones((24, 20), np.uint8),
                                                     np.zeros((24, 20), np.uint8)]))
        return "test.json record 0: mask"
    if case == "missing":
        (root / recs[3]["image"]).unlink()
        return "test.json record 3: file"
    if case == "no_key":
        del recs[2]["tumor_mask"]
    if case == "empty":
        recs = []
    (root / "test.json").write_text(json.dumps(recs))
    return {"not_integer": "record 0: mask", "no_key": "test.json record 2: no 'tumor_mask' field",
            "empty": "test.json: empty split"}[case]


@pytest.mark.parametrize("case", ["size", "class_id", "not_integer", "colour", "missing", "no_key", "empty"])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, case):
    root = make_ultrabench(tmp_path / "ub", with_label=False)
    needle = _break(root, case)
    extra = ["--num-classes", "3"] if case == "class_id" else []
    assert evaluate.main([*TOY, "--data", str(root), "--protocol", "linear", "--out", str(tmp_path / "o"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err and "Traceback" not in err, err


def test_ambiguous_task_lists_the_candidates(tmp_path, capsys):
    root = make_ultrabench(tmp_path / "ub")
    assert evaluate.main([*TOY, "--data", str(root), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "label keys pathology; mask keys tumor_mask" in err
    assert "--label-key" in err and "--mask-key" in err


def test_default_protocols_leave_knn_out_of_segmentation():
    a, _ = parse_config(["--backbone", "random", "--data", "synthetic-seg"])
    every = ["linear", "knn", "finetune"]
    assert eval_run.task_protocols(a, "segmentation", every) == ["linear", "finetune"]
    assert eval_run.task_protocols(a, "classification", every) == every
    a.protocol = "linear,knn"  # asked for by name: refused with one line (below), not dropped
    assert eval_run.task_protocols(a, "segmentation", ["linear", "knn"]) == ["linear", "knn"]


def test_segmentation_refusals(tmp_path, capsys, monkeypatch):
    argv = [*TOY, "--data", "synthetic-seg", "--out", str(tmp_path / "o")]
    assert evaluate.main([*argv, "--protocol", "knn"]) == 2
    assert "classification protocol" in capsys.readouterr().err
    real = eval_run.importlib.util.find_spec
    monkeypatch.setattr(eval_run.importlib.util, "find_spec",
                        lambda name, *a: None if name == "segmentation_models_pytorch" else real(name, *a))
    assert evaluate.main([*argv, "--protocol", "finetune"]) == 2
    assert "pip install 'urfm_fast[seg]'" in capsys.readouterr().err
    monkeypatch.undo()
    frozen = resolve_backbone("random", "vit_tiny", "token", 32)
    frozen.meta["trainable"] = False
    with pytest.raises(ValueError, match="frozen teacher; it can be probed \\(linear\\), not fine-tuned"):
        eval_run.check_task("segmentation", ["finetune"], [frozen])


# ---------------------------------------------------------------------------------------------
# end to end


def _check_results(out: Path, n_runs: int) -> dict:
    res = json.loads((out / "results.json").read_text(), parse_constant=lambda c: pytest.fail(f"bare {c}"))
    assert res["task"] == "segmentation" and len(res["runs"]) == n_runs
    for r in res["runs"]:
        assert {"dice", "iou", "dice_per_class", "iou_per_class", "pixel_accuracy", "mean_ap", "ap_per_class"} <= set(r)
        assert len(r["dice_per_class"]) == len(res["classes"]) == len(r["ap_per_class"])
        assert 0 <= r["pixel_accuracy"] <= 1 and (r["mean_ap"] is None or 0 <= r["mean_ap"] <= 1)
    assert res["args"]["seg_loss"] == EvalConfig.seg_loss
    assert "pixel AP" in (out / "table.txt").read_text()
    assert (out / "label_efficiency.png").is_file()
    return res


def test_linear_probe_on_an_ultrabench_folder(tmp_path):
    root = make_ultrabench(tmp_path / "ub", with_label=False)
    out = tmp_path / "o"
    assert evaluate.main([*TOY, "--data", str(root), "--task", "segmentation", "--protocol", "linear",
                          "--label-fractions", "0.1,1.0", "--seeds", "0,1", "--out", str(out)]) == 0
    res = _check_results(out, 4)
    assert {r["n_train"] for r in res["runs"]} == {2, 8}  # 10 % of 4 patients = 1 patient = 2 images
    assert res["runs"][0]["eval_split"] == "test"


def test_linear_probe_on_synthetic_seg(tmp_path):
    out = tmp_path / "o"
    assert evaluate.main([*TOY, "--data", "synthetic-seg", "--synthetic-train", "16", "--synthetic-val", "8",
                          "--protocol", "linear", "--label-fractions", "0.1,1.0", "--seeds", "0,1",
                          "--out", str(out)]) == 0
    assert _check_results(out, 4)["classes"] == list(synthetic.SEG_CLASSES)


def test_ultrabench_classification_runs_with_patient_groups(tmp_path):
    root = make_ultrabench(tmp_path / "ub", with_mask=False)
    out = tmp_path / "o"
    assert evaluate.main([*TOY, "--data", str(root), "--protocol", "linear,knn", "--label-fractions", "0.5",
                          "--seeds", "0", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["task"] == "classification" and res["classes"] == ["benign", "malignant"]
    assert {r["n_train"] for r in res["runs"]} == {4}  # half of 4 patients, 2 images each


def _tiny_checkpoint(path: Path) -> Path:
    """A 2-block, patch-8 URFM checkpoint: DPT at toy size in a few seconds."""
    from urfm_fast import URFM, URFMConfig

    cfg = URFMConfig.preset("vit_tiny", img_size=32, patch_size=8, depth=2, decoder_embed_dim=32, decoder_depth=1,
                            decoder_num_heads=2, target_dim=16)
    torch.manual_seed(0)
    torch.save({"model": URFM(cfg).state_dict(), "epoch": 0, "step": 0, "config": cfg.to_dict()}, path)
    return path


def test_dpt_finetune_at_toy_size(tmp_path):
    pytest.importorskip("segmentation_models_pytorch")
    from urfm_fast.eval.segmentation import build_dpt

    ckpt = _tiny_checkpoint(tmp_path / "tiny.pth")
    bb = resolve_backbone(f"tiny={ckpt}", "vit_tiny", "avg", None)
    dpt = build_dpt(bb, 4)
    src = bb.make(num_classes=0).state_dict()
    enc = dpt.encoder.model.state_dict()
    assert len(dpt.encoder.model.blocks) == 2 and dpt.encoder.model.patch_embed.patch_size == (8, 8)
    assert enc.keys() == src.keys() and all(torch.equal(enc[k], src[k]) for k in src)  # our weights, strictly
    assert dpt.eval()(torch.zeros(1, 3, 32, 32)).shape == (1, 4, 32, 32)
    out = tmp_path / "o"
    argv = ["--backbone", f"tiny={ckpt}", "--threads", "2", "--quiet", "--data", "synthetic-seg", "--synthetic-train",
            "8", "--synthetic-val", "4", "--protocol", "finetune", "--ft-epochs", "1", "--ft-min-steps", "2",
            "--ft-batch-size", "4", "--label-fractions", "1", "--seeds", "0", "--out", str(out)]
    assert evaluate.main(argv) == 0
    _check_results(out, 1)


def test_probe_layers_four_concatenates_the_last_blocks():
    bb = resolve_backbone("random", "vit_tiny", "token", 32)
    images = torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8)
    one, four = (extract_tokens(bb.make(), images, bb, torch.device("cpu"), layers=k) for k in (1, 4))
    assert one.shape == (2, 4, 192) and four.shape == (2, 4, 4 * 192)
    torch.testing.assert_close(four[..., -192:], one, atol=2e-3, rtol=0)  # the last block, after the final norm

    class NoIntermediates(torch.nn.Module):
        feature_grid = (2, 2)

        def forward_features(self, x):
            return x.new_zeros(len(x), 4, 8)

    with pytest.raises(ValueError, match="--probe-layers 1 only"):
        extract_tokens(NoIntermediates(), images, bb, torch.device("cpu"), layers=4)


def test_linear_probe_learns_a_separable_toy():
    """Tokens that carry the class of their patch: the probe must segment them almost perfectly."""
    g = torch.Generator().manual_seed(0)
    cls = torch.randint(0, 3, (40, 2, 2), generator=g)  # a class per patch of a 2x2 grid
    tokens = torch.nn.functional.one_hot(cls.flatten(1), 3).float() + 0.05 * torch.randn(40, 4, 3, generator=g)
    masks = cls.repeat_interleave(8, 1).repeat_interleave(8, 2)  # 16x16 masks
    cm, _ = linear_seg_probe(tokens[:30], masks[:30], tokens[30:], masks[30:], (2, 2), 3, seed=0, epochs=30,
                             lr=0.5, min_steps=60, loss="ce")
    assert segmentation_metrics(cm)["pixel_accuracy"] > 0.85


def test_class_weights_are_inverse_sqrt_frequencies():
    masks = torch.zeros(1, 10, 10, dtype=torch.long)
    masks[0, 0, :4] = 1  # 4 % of the pixels; class 2 absent
    w = class_weights(masks, 3)
    assert w[1] / w[0] == pytest.approx((96 / 4) ** 0.5) and w[2] == 0
    assert float(w[:2].mean()) == pytest.approx(1.0)


def _small_foreground(n: int, seed: int = 0, grid: int = 8, px: int = 4):
    """One foreground patch of 64 per image (1.6 % of the pixels), its token shifted by 2 noise stds."""
    g = torch.Generator().manual_seed(seed)
    fg = torch.zeros(n, grid * grid, dtype=torch.long)
    fg[torch.arange(n), torch.randint(0, grid * grid, (n,), generator=g)] = 1
    tokens = torch.randn(n, grid * grid, 8, generator=g)
    tokens[..., 0] += 2.0 * fg
    masks = fg.reshape(n, grid, grid).repeat_interleave(px, 1).repeat_interleave(px, 2)
    return tokens, masks


def test_the_default_loss_finds_a_small_foreground_that_plain_ce_misses():
    tokens, masks = _small_foreground(120)
    dice = {}
    for loss in ("ce", EvalConfig.seg_loss):
        cm, _ = linear_seg_probe(tokens[:80], masks[:80], tokens[80:], masks[80:], (8, 8), 2, seed=0, epochs=10,
                                 lr=0.1, min_steps=50, loss=loss, batch_size=16)
        dice[loss] = segmentation_metrics(cm)["dice"]
    assert dice[EvalConfig.seg_loss] > dice["ce"] + 0.1, dice


@pytest.mark.parametrize("how", ["flag", "config"])
def test_a_bad_seg_loss_is_refused_in_one_line(tmp_path, capsys, how):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"seg_loss": "dice"}))
    given = ["--seg-loss", "dice"] if how == "flag" else ["--config", str(cfg)]
    try:  # argparse exits on a bad flag; a bad --config value comes back as a FlagError, returned as 2
        code = evaluate.main([*TOY, "--data", "synthetic-seg", "--out", str(tmp_path / "o"), *given])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "--seg-loss" in err and "'dice'" in err, err
