"""Export: timm loads the folder both documented ways, strictly, with the features of the checkpoint."""

import json
import subprocess
import sys

import pytest
import timm
import torch
from safetensors.torch import load_file
from test_checkpoint_io import make_official_checkpoint

import urfm_fast
from urfm_fast.checkpoint_io import load_checkpoint
from urfm_fast.export import main


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    ckpt = root / "mae_vit_tiny_patch16_dec768d8b_all_biomedclip_1199.pth"
    _, ema = make_official_checkpoint(ckpt, depth=12, img_size=32)  # timm's vit_tiny shape, at 32 px
    assert main([str(ckpt), "--out", str(root / "out")]) == 0
    return ckpt, root / "out", ema


def test_files_and_keys(exported):
    ckpt, out, ema = exported
    sd = load_file(str(out / "model.safetensors"))
    assert not any(k.startswith(("decoder", "mask_token")) for k in sd)
    for k, v in sd.items():
        assert torch.equal(v, ema[k]), k  # the EMA weights, bit for bit
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architecture"] == "vit_tiny_patch16_224" and cfg["num_classes"] == 0
    assert cfg["pretrained_cfg"]["input_size"] == [3, 32, 32]
    assert cfg["pretrained_cfg"]["mean"] == [0.485, 0.456, 0.406]
    assert cfg["urfm"]["weights"] == "ema" and cfg["urfm"]["epoch"] == 1199


def test_timm_loads_export_both_ways_with_identical_features(exported):
    ckpt, out, _ = exported
    a = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    b = timm.create_model("vit_tiny_patch16_224", pretrained=True, num_classes=0, img_size=32,
                          pretrained_cfg_overlay=dict(file=str(out / "model.safetensors"))).eval()
    ref = urfm_fast.load_backbone(ckpt).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        fa, fb, fr = a.forward_features(x), b.forward_features(x), ref.forward_features(x)
    assert fa.shape == (2, 5, 192)
    assert torch.equal(fa, fb) and torch.equal(fa, fr)
    assert a.pretrained_cfg["input_size"] == (3, 32, 32)
    # timm's strict load would raise on any missing/unexpected key; check the key sets directly as well
    assert set(load_file(str(out / "model.safetensors"))) == set(a.state_dict())


def test_export_reloads_through_load_checkpoint(exported):
    ckpt, out, ema = exported
    ck = load_checkpoint(out)
    assert ck.meta["format"] == "export" and not ck.has_decoder
    assert ck.config.num_heads == 3 and ck.config.img_size == 32


def test_refuses_to_overwrite(exported, tmp_path, capsys):
    ckpt, out, _ = exported
    before = (out / "model.safetensors").stat().st_mtime_ns
    assert main([str(ckpt), "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert (out / "model.safetensors").stat().st_mtime_ns == before
    assert main([str(ckpt), "--out", str(out), "--force", "--live"]) == 0
    assert json.loads((out / "config.json").read_text())["urfm"]["weights"] == "model"
    main([str(ckpt), "--out", str(out), "--force"])  # restore the EMA export for other tests


def test_cli_bad_checkpoint_one_line(tmp_path):
    bad = tmp_path / "notes.pth"
    bad.write_text("hello")
    r = subprocess.run([sys.executable, "-m", "urfm_fast.export", str(bad), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "not a PyTorch checkpoint" in r.stderr
    assert not (tmp_path / "o").exists()


def test_custom_depth_keeps_its_family_name_and_loads(tmp_path):
    ckpt = tmp_path / "mae_vit_tiny_patch16_dec768d8b_custom.pth"
    make_official_checkpoint(ckpt, depth=2, img_size=32)
    assert main([str(ckpt), "--out", str(tmp_path / "out")]) == 0
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["architecture"] == "vit_tiny_patch16_224" and cfg["model_args"]["depth"] == 2
    model = timm.create_model(f"local-dir:{tmp_path / 'out'}", pretrained=True).eval()
    assert len(model.blocks) == 2 and model.forward_features(torch.randn(1, 3, 32, 32)).shape == (1, 5, 192)
