"""The mask ratio over a run (``--mask-schedule``), mask ratio 0 (feature distillation) and MAE's pixel target
(``--target pixels``): the ratio of every step, what a run records, exact resume mid-ramp, one process against
two, and the pixel target and loss against hand-written references."""

import json

import numpy as np
import pytest
import torch
from test_distributed import ATOL, torchrun
from test_pretrain import SYNTH, TINY, fast_random_teacher, metrics  # noqa: F401 (autouse fixture)
from test_resume import losses

from urfm_fast import URFM, URFMConfig, pretrain
from urfm_fast.config import visible_count
from urfm_fast.model.teacher.pixels import normalised_pixels
from urfm_fast.train.schedule import mask_ratio_at

# 64 px: 16 patches, so each level of the ramp is its own visible count
RAMP = [*TINY, *SYNTH, "--img-size", "64", "--batch-size", "8", "--steps", "8", "--log-every", "1",
        "--save-every", "4", "--deterministic", "--mask-schedule", "linear", "--mask-start", "0",
        "--mask-ramp", "0.5", "--mask-levels", "2"]
RAMP_RATIOS = [0.0, 0.0, 0.375, 0.375, 0.75, 0.75, 0.75, 0.75]  # steps 0-7: 4 ramp steps in 2 levels


def test_ratio_of_every_step():
    linear = [mask_ratio_at(s, 100, 0.75, "linear", 0.0, 0.5, 4) for s in range(100)]
    assert linear[:13] == [0.0] * 13  # progress below 1/4 of the 50 ramp steps
    assert linear[13] == linear[24] == pytest.approx(0.1875) and linear[25] == pytest.approx(0.375)
    assert linear[50:] == [0.75] * 50 and sorted(linear) == linear
    cosine = [mask_ratio_at(s, 100, 0.75, "cosine", 0.0, 0.5, 4) for s in range(100)]
    assert cosine[25] == pytest.approx(0.375) and cosine[13] == pytest.approx(0.75 * (1 - np.cos(np.pi / 4)) / 2)
    assert cosine[50:] == [0.75] * 50 and sorted(cosine) == cosine
    assert {mask_ratio_at(s, 100, 0.75) for s in range(100)} == {0.75}  # constant: URFM's
    from_half = [mask_ratio_at(s, 10, 0.75, "linear", 0.5, 1.0, 1) for s in range(10)]
    assert from_half == [0.5] * 10  # one level: the start ratio until the ramp's end (the run's end here)
    for levels in (1, 3, 8):  # at most levels + 1 visible counts, hence compiled shapes
        counts = {visible_count(196, mask_ratio_at(s, 1000, 0.75, "cosine", 0.0, 0.3, levels)) for s in range(1000)}
        assert len(counts) <= levels + 1 and max(counts) == 196 and min(counts) == 49


def test_a_ramped_run_records_its_ratios_and_resumes_mid_ramp_exactly(tmp_path, monkeypatch, capsys):
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert pretrain.main([*RAMP, "--out", str(full)]) == 0
    assert "mask linear 0.0 -> 0.75 over 50% of the run in 2 levels" in capsys.readouterr().out
    assert [m["mask_ratio"] for m in metrics(full)] == RAMP_RATIOS
    saved = json.loads((full / "config.json").read_text())["train"]
    schedule = tuple(saved[k] for k in ("mask_schedule", "mask_start", "mask_ramp", "mask_levels"))
    assert schedule == ("linear", 0, 0.5, 2)
    monkeypatch.setenv("URFM_FAULTS", "sigterm@2")  # stops after step 3, inside the ramp's second level
    assert pretrain.main([*RAMP, "--out", str(cut)]) == 0
    monkeypatch.delenv("URFM_FAULTS")
    assert pretrain.main(["--out", str(cut), "--resume"]) == 0  # the schedule comes from config.json
    assert [m["mask_ratio"] for m in metrics(cut)] == RAMP_RATIOS
    np.testing.assert_allclose(list(losses(cut).values()), list(losses(full).values()), rtol=0, atol=1e-6)


def test_a_ramped_run_on_two_processes_follows_one(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    assert pretrain.main([*RAMP, "--out", str(one)]) == 0
    r = torchrun([*RAMP, "--dist", "ddp", "--out", str(two)])
    assert r.returncode == 0, r.stderr[-3000:]
    assert [m["mask_ratio"] for m in metrics(two)] == RAMP_RATIOS
    np.testing.assert_allclose(list(losses(two).values()), list(losses(one).values()), rtol=0, atol=ATOL)


def _model(**kw):
    cfg = URFMConfig.preset("vit_tiny", img_size=64, depth=2, decoder_embed_dim=64, decoder_depth=1,
                            decoder_num_heads=4, target_dim=24, **kw)
    torch.manual_seed(0)
    return URFM(cfg).eval()


def test_nothing_masked_is_feature_distillation():
    """At K = N the masked-patch loss has no rows: it takes every patch, as loss_on='all' does."""
    imgs, target = torch.randn(3, 3, 64, 64), torch.randn(3, 16, 24)
    ids = torch.argsort(torch.rand(3, 16), dim=1)
    masked, _, _ = _model(loss_on="masked")(imgs, target, ids, num_visible=16)
    every, pred, _ = _model(loss_on="all")(imgs, target, ids, num_visible=16)
    assert torch.isfinite(masked) and torch.equal(masked, every) and pred.shape == (3, 16, 24)
    at_zero, _, _ = _model(loss_on="masked", mask_ratio=0.0)(imgs, target, ids)
    assert torch.equal(at_zero, every)
    # another K than the config's: the encoder sees 1 + K tokens, the loss the N - K masked rows
    _, pred, _ = _model(loss_on="masked")(imgs, target, ids, num_visible=9)
    assert pred.shape == (3, 7, 24)


def test_pixel_target_is_maes_norm_pix():
    imgs = torch.randn(2, 3, 32, 32)
    got = normalised_pixels(imgs, 16)
    for b in range(2):
        for i in range(2):
            for j in range(2):  # MAE's patchify: (row, column, channel) inside a patch
                patch = imgs[b, :, 16 * i:16 * i + 16, 16 * j:16 * j + 16].permute(1, 2, 0).reshape(-1)
                want = (patch - patch.mean()) / (patch.var() + 1e-6) ** 0.5
                torch.testing.assert_close(got[b, 2 * i + j], want)
    model = _model(loss="mse", loss_on="masked")
    target = torch.randn(2, 16, 24)
    ids = torch.argsort(torch.rand(2, 16), dim=1)
    loss, pred, _ = model(torch.randn(2, 3, 64, 64), target, ids)
    k = model.cfg.num_visible
    want = ((pred - target.gather(1, ids[:, k:, None].expand(-1, -1, 24))) ** 2).mean()
    torch.testing.assert_close(loss, want)


def test_a_pixel_run_trains_without_a_teacher(tmp_path, capsys):
    out = tmp_path / "pixels"
    rc = pretrain.main([*TINY, *SYNTH, "--target", "pixels", "--batch-size", "8", "--steps", "20", "--log-every",
                        "5", "--out", str(out)])
    assert rc == 0
    assert "target pixels (MAE's per-patch normalised pixels, no teacher)" in capsys.readouterr().out
    run = json.loads((out / "config.json").read_text())
    assert run["model"]["loss"] == "mse" and run["model"]["target_dim"] == 768
    curve = [m["loss"] for m in metrics(out)]
    assert curve[-1] < curve[0], curve


def test_cached_targets_give_the_uncached_curve(tmp_path, capsys):
    """--augment none: the same pixels every epoch, so targets computed at an image's first batch serve the
    later epochs; 64 images in batches of 8 make 8 steps an epoch, and 12 steps read the cache from step 9."""
    args = [*TINY, *SYNTH, "--augment", "none", "--batch-size", "8", "--steps", "12", "--log-every", "1",
            "--save-every", "0"]
    assert pretrain.main([*args, "--out", str(tmp_path / "plain")]) == 0
    assert pretrain.main([*args, "--cache-targets", "--out", str(tmp_path / "cached")]) == 0
    assert "computed once per image and cached" in capsys.readouterr().out
    np.testing.assert_allclose(list(losses(tmp_path / "cached").values()), list(losses(tmp_path / "plain").values()),
                               rtol=0, atol=1e-5)
    with pytest.raises(Exception, match="--cache-targets: targets are the same for every epoch only without"):
        pretrain.parse_config([*TINY, *SYNTH, "--cache-targets"])
