"""experiments/label_efficiency.py's arms, seeds and the curve's training loop, in process on tiny models:
the distill arm and the mask-ratio sweep, the order arms run in, the pooling over pretraining seeds (against
hand-computed values), and the time-budget loop that probes the encoder along the way."""

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from urfm_fast import URFMConfig

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("label_efficiency", ROOT / "experiments" / "label_efficiency.py")
le = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(le)


def test_arms_recipes_and_order():
    a = le.parse_args(["--arms", "urfm,pixel,random", "--mask-ratios", "0,0.25,0.75", "--pretrain-seeds", "0,1"])
    assert le.arm_names(a) == ["urfm", "pixel", "random", "distill", "urfm_m0.25"]  # 0.75 is --mask-ratio: urfm
    assert le.arm_recipe("distill", a) == dict(mask_ratio=0.0, loss_on="all")
    assert le.arm_recipe("urfm_m0.25", a) == dict(mask_ratio=0.25) and le.arm_recipe("pixel", a) == {}
    assert [le.teacher_arm(x) for x in le.arm_names(a)] == [True, False, False, True, True]
    assert le.jobs(a) == [(0, "urfm"), (0, "pixel"), (0, "random"), (1, "urfm"), (1, "pixel"), (1, "random"),
                          (0, "distill"), (0, "urfm_m0.25"), (1, "distill"), (1, "urfm_m0.25")]
    assert le.arm_label("urfm", 1, a) == "urfm@s1"
    single = le.parse_args([])
    assert le.pretrain_seeds(single) == [0] and le.arm_label("urfm", 0, single) == "urfm"


def test_pooled_summary_over_pretraining_seeds():
    acc = {("urfm@s0", 0): 0.30, ("urfm@s0", 1): 0.34, ("urfm@s1", 0): 0.40, ("urfm@s1", 1): 0.44}
    records = [dict(backbone=b, protocol="linear", fraction=1.0, seed=s, n_train=10, accuracy=v, macro_auc=v,
                    macro_f1=v) for (b, s), v in acc.items()]
    (row,) = le.pooled_summary(records)
    assert row["backbone"] == "urfm" and row["seeds"] == 4 and row["pretrain_seeds"] == 2
    assert row["accuracy"] == pytest.approx(0.37)
    assert row["accuracy_std"] == pytest.approx(math.sqrt((0.07**2 + 0.03**2 + 0.03**2 + 0.07**2) / 3))
    assert row["accuracy_seed_std"] == pytest.approx(math.sqrt(2 * 0.05**2))  # means 0.32 and 0.42


def test_preset_gpu_defaults_and_flags_that_win():
    a = le.parse_args(["--preset", "gpu", "--batch", "8"])
    assert a.device == "cuda" and a.amp and a.budget_s == 50 and a.batch == 8 and a.kernels == "torch"
    total = sum(s for _, s in le.plan_phases(a))
    assert total <= 300 and a.deadline_s + le.PLAN_STARTUP_S <= total


def test_time_budget_loop_probes_along_the_way_in_bf16():
    a = le.parse_args(["--budget-s", "0.6", "--probe-points", "0.25,0.5", "--batch", "4", "--amp"])
    cfg = URFMConfig.preset("vit_tiny", img_size=32, patch_size=8, depth=1, decoder_embed_dim=32, decoder_depth=1,
                            decoder_num_heads=2, mask_ratio=0.0, loss_on="all", target_dim=5)
    torch.manual_seed(0)
    model = le.URFM(cfg)
    images = torch.randint(0, 256, (16, 1, 32, 32), dtype=torch.uint8)  # the device store's format
    targets = torch.randn(16, cfg.num_patches, 5)
    seen = []
    losses = le.pretrain("distill", model, images, targets, a, 0, on_point=lambda *p: seen.append(p))
    assert [p[0] for p in seen] == [0.25, 0.5, 1.0] and seen[-1][1] == len(losses) >= 1
    assert all(math.isfinite(x) for x in losses)
    times = [p[2] for p in seen]
    assert times == sorted(times) and times[-1] >= 0.6  # training seconds, probes excluded
    half = type("Clock", (), {"spent": 0.3})()  # half the budget: 4/9 of the cosine after the 10 % warm-up
    assert le.lr_factor(0, a, half) == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 9)))
