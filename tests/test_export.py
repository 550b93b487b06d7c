"""Export: timm loads the folder both documented ways, strictly, with the features of the checkpoint."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file
from test_checkpoint_io import make_official_checkpoint

import urfm_fast
from urfm_fast.checkpoints.formats import load_checkpoint
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


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_files_get_the_process_umask(exported, tmp_path, umask):
    """Both files are written as any other file of the process (safetensors alone writes 0600)."""
    import os

    old = os.umask(umask)
    try:
        assert main([str(exported[0]), "--out", str(tmp_path / "out")]) == 0
    finally:
        os.umask(old)
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "out" / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


def test_timm_loads_export_both_ways_with_identical_features(exported):
    ckpt, out, _ = exported
    a = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    b = _timm_by_name(out, "vit_tiny_patch16_224").eval()
    ref = urfm_fast.load_backbone(ckpt).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        fa, fb, fr = a.forward_features(x), b.forward_features(x), ref.forward_features(x)
    assert fa.shape == (2, 5, 192)
    assert torch.equal(fa, fb) and torch.equal(fa, fr)
    assert a.pretrained_cfg["input_size"] == (3, 32, 32)
    # timm's strict load would raise on any missing/unexpected key; check the key sets directly as well
    assert set(load_file(str(out / "model.safetensors"))) == set(a.state_dict())


def _timm_by_name(out, name, **kwargs):
    """docs/backbone.md's recipe under a timm name: the export's whole pretrained_cfg overlaid, plus the file."""
    cfg = json.loads((out / "config.json").read_text())
    overlay = dict(cfg["pretrained_cfg"], file=str(out / "model.safetensors"))
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)


@pytest.fixture(scope="module")
def exported_4_blocks_64px(tmp_path_factory):
    root = tmp_path_factory.mktemp("export4")
    ckpt = root / "mae_vit_tiny_patch16_dec768d8b_demo.pth"
    make_official_checkpoint(ckpt, depth=4, img_size=64)
    assert main([str(ckpt), "--out", str(root / "out")]) == 0
    return ckpt, root / "out"


@pytest.mark.parametrize("name, kwargs, error", [
    ("vit_tiny_patch16_224", {}, "Missing key(s)"),               # 12 blocks for a 4-block export
    ("vit_small_patch16_224", {"depth": 4}, "size mismatch"),      # 384 wide for a 192-wide export
    ("vit_tiny_patch16_224", {"depth": 6}, "Missing key(s)"),
])
def test_timm_name_recipe_refuses_a_mismatched_architecture(exported_4_blocks_64px, name, kwargs, error):
    _, out = exported_4_blocks_64px
    with pytest.raises(RuntimeError, match=re.escape(error)):
        _timm_by_name(out, name, **kwargs)


def test_file_only_overlay_is_the_silent_trap(exported_4_blocks_64px):
    """Why docs/backbone.md overlays the whole pretrained_cfg: with `file` alone timm's cfg keeps
    num_classes=1000, so num_classes=0 makes the load non-strict and blocks 4-11 stay random."""
    _, out = exported_4_blocks_64px
    m = timm.create_model("vit_tiny_patch16_224", pretrained=True, num_classes=0,
                          pretrained_cfg_overlay=dict(file=str(out / "model.safetensors")))
    assert len(m.blocks) == 12 and m.patch_embed.img_size == (224, 224)


def test_timm_recipes_load_the_4_block_64px_export_with_our_features(exported_4_blocks_64px):
    ckpt, out = exported_4_blocks_64px
    by_dir = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    by_name = _timm_by_name(out, "vit_tiny_patch16_224", depth=4).eval()
    ref = urfm_fast.load_backbone(ckpt).eval()
    assert len(by_name.blocks) == 4 and by_name.patch_embed.img_size == (64, 64) and by_name.num_classes == 0
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        fr = ref.forward_features(x)
        assert fr.shape == (2, 17, 192)
        assert torch.equal(by_dir.forward_features(x), fr) and torch.equal(by_name.forward_features(x), fr)


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


def test_an_export_cut_mid_write_leaves_no_file_that_looks_whole(exported, tmp_path, monkeypatch, capsys):
    import safetensors.torch

    ckpt, _, _ = exported
    out = tmp_path / "cut"

    def full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a header")  # what a full disk leaves of the file
        raise OSError(28, "No space left on device", filename)

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    assert main([str(ckpt), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "No space left" in err, err
    assert not list(out.iterdir())  # no model.safetensors that looks whole, no temporary file to remove by hand
    monkeypatch.undo()
    capsys.readouterr()
    assert main([str(ckpt), "--out", str(out)]) == 0  # the rerun with room: nothing in its way
    assert load_file(out / "model.safetensors")


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


def test_readme_recipe_as_written_raises_on_a_mismatched_name(exported_4_blocks_64px):
    """docs/backbone.md's timm block, run with its folder replaced by a 4-block 64-px ViT-T export and its timm
    name by vit_tiny_patch16_224 (same width, 12 blocks, 224 px): local-dir loads; the timm name raises
    instead of loading non-strictly (the old file-only overlay loaded it, blocks 4-11 random)."""
    from pathlib import Path

    _, out = exported_4_blocks_64px
    readme = (Path(__file__).parents[1] / "docs" / "backbone.md").read_text()
    block = next(b.split("\n", 1)[1] for b in readme.split("```python")[1:] if "local-dir:urfm_vitb" in b)
    code = block.split("```")[0].replace("urfm_vitb", str(out))
    assert '"vit_base_patch16_224"' in code
    code = code.replace('"vit_base_patch16_224"', '"vit_tiny_patch16_224"')
    with pytest.raises(RuntimeError, match=re.escape("Missing key(s)")):
        exec(code, {})
    runs = code.split("# or under a timm name")[0]
    scope = {}
    exec(runs, scope)  # the local-dir line alone loads
    assert len(scope["model"].blocks) == 4


def test_readme_backbone_snippet_runs_at_the_checkpoint_size(exported_4_blocks_64px):
    """README's load_backbone block, run as written on a 64-px checkpoint (the CPU demo's size): it feeds the
    model images of the checkpoint's own size, so it runs where a fixed 224 would fail."""
    from pathlib import Path

    ckpt, _ = exported_4_blocks_64px
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = next(b.split("\n", 1)[1] for b in readme.split("```python")[1:] if "load_backbone(" in b)
    code = block.split("```")[0].replace("runs/vitb/checkpoint-00001000.pth", str(ckpt))
    scope = {}
    exec(code, scope)
    assert scope["feats"].shape == (2, 1 + 16, 192)  # 64 px / patch 16 = 4 x 4 tokens + CLS
