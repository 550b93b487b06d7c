"""load_checkpoint / load_backbone on files in every format we read, built here with tiny shapes.

The "official" checkpoint is built the way the released URFM files were: MAE's MaskedAutoencoderViT
layout from timm parts (timm PatchEmbed/Block + MAE's decoder names), saved with ``model``,
``ema_state_dict``, ``optimizer``, ``epoch``, ``scaler`` and ``args`` as an argparse.Namespace.
"""

import argparse

import pytest
import timm
import torch
import torch.nn as nn
from timm.models.vision_transformer import Block, PatchEmbed

import urfm_fast
from urfm_fast import URFM, URFMConfig
from urfm_fast.checkpoints.formats import CheckpointError, load_checkpoint
from urfm_fast.model.vit import sincos_pos_embed_2d

TINY = dict(img_size=32, patch_size=16, embed_dim=192, depth=2, num_heads=3, dec_dim=64, dec_depth=1, dec_heads=4)


class MaeOfficial(nn.Module):
    """MAE's MaskedAutoencoderViT parameter layout (models_mae.py), built from timm parts."""

    def __init__(self, img_size, patch_size, embed_dim, depth, num_heads, dec_dim, dec_depth, dec_heads, target=768):
        super().__init__()
        self.patch_embed = PatchEmbed(img_size, patch_size, 3, embed_dim)
        n = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.randn(1, 1, embed_dim) * 0.02)
        self.pos_embed = nn.Parameter(sincos_pos_embed_2d(embed_dim, img_size // patch_size)[None], requires_grad=False)
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, 4.0, qkv_bias=True) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.decoder_embed = nn.Linear(embed_dim, dec_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dec_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, n + 1, dec_dim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(Block(dec_dim, dec_heads, 4.0, qkv_bias=True) for _ in range(dec_depth))
        self.decoder_norm = nn.LayerNorm(dec_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(dec_dim, target)
        with torch.no_grad():  # non-trivial norms so a wrong key mapping shows in the features
            for m in self.modules():
                if isinstance(m, nn.LayerNorm):
                    m.weight.normal_(1.0, 0.1)
                    m.bias.normal_(0.0, 0.1)


def make_official_checkpoint(path, *, wrap_ema_with_module=True, **shape):
    """Write an official-format .pth; returns (live state dict, EMA state dict)."""
    shape = {**TINY, **shape}
    torch.manual_seed(0)
    model = MaeOfficial(**shape)
    ema = MaeOfficial(**shape)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss = sum(p.sum() for p in model.parameters() if p.requires_grad)
    loss.backward()
    opt.step()  # a real optimizer state (exp_avg, step tensors), as in the released files
    live_sd = {k: v.clone() for k, v in model.state_dict().items()}
    ema_sd = {k: v.clone() for k, v in ema.state_dict().items()}
    args = argparse.Namespace(model="mae_vit_tiny_patch16_dec768d8b", input_size=shape["img_size"], mask_ratio=0.75,
                              batch_size=256, blr=1.5e-4, norm_pix_loss=False, output_dir="./out", data_path=None)
    ema_saved = {f"module.{k}": v for k, v in ema_sd.items()} if wrap_ema_with_module else ema_sd
    torch.save(dict(model=live_sd, ema_state_dict=ema_saved, optimizer=opt.state_dict(), epoch=1199,
                    scaler={"scale": 65536.0, "growth_factor": 2.0}, args=args), path)
    return live_sd, ema_sd


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "mae_vit_tiny_patch16_dec768d8b_all_biomedclip_1199.pth"
    live, ema = make_official_checkpoint(path)
    return path, live, ema


def test_official_prefers_ema_and_infers_config(official):
    path, live, ema = official
    ck = load_checkpoint(path)
    assert ck.meta["format"] == "urfm_official" and ck.meta["weights"] == "ema" and ck.meta["epoch"] == 1199
    assert set(ck.state_dict) == set(ema)  # `module.` stripped, nothing dropped
    for k, v in ema.items():
        assert torch.equal(ck.state_dict[k], v), k
    c = ck.config
    assert (c.embed_dim, c.depth, c.num_heads, c.patch_size, c.img_size) == (192, 2, 3, 16, 32)
    assert (c.decoder_embed_dim, c.decoder_depth, c.decoder_num_heads, c.target_dim) == (64, 1, 16, 768)
    assert ck.has_decoder and ck.meta["args"]["model"] == "mae_vit_tiny_patch16_dec768d8b"

    live_ck = load_checkpoint(path, weights="live")
    assert live_ck.meta["weights"] == "model"
    assert torch.equal(live_ck.state_dict["blocks.0.attn.qkv.weight"], live["blocks.0.attn.qkv.weight"])
    assert not torch.equal(live_ck.state_dict["blocks.0.attn.qkv.weight"], ck.state_dict["blocks.0.attn.qkv.weight"])


def test_official_loads_strictly_into_urfm(official):
    ck = load_checkpoint(official[0])
    cfg = URFMConfig.from_dict({**ck.config.to_dict(), "decoder_num_heads": 4})  # heads don't change keys
    URFM(cfg).load_state_dict(ck.state_dict, strict=True)


def test_heads_from_args_then_width_table(tmp_path):
    # A width whose standard table entry differs from args: args win. Without args: the table.
    torch.manual_seed(0)
    ours = URFM(URFMConfig.preset("vit_small", img_size=32, depth=2, decoder_embed_dim=64, decoder_depth=1,
                                  decoder_num_heads=4, target_dim=32))
    torch.save({"model": ours.state_dict(), "step": 7, "epoch": 0,
                "args": {"model": "vit_small", "num_heads": 8, "decoder_num_heads": 4}}, tmp_path / "a.pth")
    ck = load_checkpoint(tmp_path / "a.pth")
    assert ck.meta["format"] == "urfm_fast" and ck.meta["step"] == 7 and ck.meta["weights"] == "model"
    assert ck.config.num_heads == 8 and ck.config.decoder_num_heads == 4 and ck.config.target_dim == 32
    torch.save(ours.encoder_state_dict(), tmp_path / "b.pth")
    ck = load_checkpoint(tmp_path / "b.pth")
    assert ck.meta["format"] == "state_dict" and ck.config.num_heads == 6 and not ck.has_decoder


def test_compiled_and_ddp_prefixes_stripped(tmp_path):
    m = URFM(URFMConfig.preset("vit_tiny", img_size=32, depth=2, decoder_embed_dim=64, decoder_depth=1,
                               decoder_num_heads=4))
    sd = {f"_orig_mod.module.{k}": v for k, v in m.state_dict().items()}
    sd = {k.replace("blocks.1.", "blocks.1._orig_mod."): v for k, v in sd.items()}  # per-block compile
    torch.save({"model": sd, "epoch": 3, "step": 10}, tmp_path / "c.pth")
    ck = load_checkpoint(tmp_path / "c.pth")
    assert set(ck.state_dict) == set(m.state_dict())
    for k, v in m.state_dict().items():  # each tensor under its own name: stripping renames, never swaps
        assert torch.equal(ck.state_dict[k], v), k


def test_dcp_folder(tmp_path):
    """A pretrain-style DCP folder: model/optimizer/ema tensors, config.json and trainer_rank0.pt beside."""
    import json
    import warnings

    dcp = pytest.importorskip("torch.distributed.checkpoint")
    cfg = URFMConfig.preset("vit_tiny", img_size=32, depth=2, decoder_embed_dim=64, decoder_depth=1,
                            decoder_num_heads=4, num_heads=4)  # heads only the config can tell
    m = URFM(cfg)
    # an EMA of trainable parameters only: the fixed sin-cos embeddings must come from the live model
    ema_sd = {n: p.detach() + 1.0 for n, p in m.named_parameters() if p.requires_grad}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no process group: single process" notice
        dcp.save({"model": m.state_dict(), "ema": ema_sd}, checkpoint_id=str(tmp_path / "dcp"))
    (tmp_path / "dcp" / "config.json").write_text(json.dumps({"model": cfg.to_dict(), "train": {}}))
    torch.save({"step": 5, "epoch": 2, "rng": {"cpu": torch.get_rng_state()}}, tmp_path / "dcp" / "trainer_rank0.pt")
    ck = load_checkpoint(tmp_path / "dcp")
    assert ck.meta["format"] == "dcp" and ck.meta["weights"] == "ema" and ck.meta["step"] == 5
    assert torch.equal(ck.state_dict["norm.weight"], ema_sd["norm.weight"])
    assert torch.equal(ck.state_dict["pos_embed"], m.pos_embed)
    assert (ck.config.embed_dim, ck.config.depth, ck.config.num_heads, ck.config.decoder_num_heads) == (192, 2, 4, 4)


@pytest.mark.parametrize("kind", ["truncated", "text", "resnet", "empty", "missing", "random_bytes", "list"])
def test_bad_files_one_line_errors(tmp_path, official, kind):
    p = tmp_path / f"{kind}.pth"
    if kind == "truncated":
        data = official[0].read_bytes()
        p.write_bytes(data[: len(data) // 2])
    elif kind == "text":
        p.write_text("this is not a checkpoint\n")
    elif kind == "resnet":
        torch.save(timm.create_model("resnet10t", num_classes=0).state_dict(), p)
    elif kind == "empty":
        p.write_bytes(b"")
    elif kind == "random_bytes":
        p.write_bytes(bytes(range(256)) * 8)
    elif kind == "list":
        torch.save([torch.zeros(1)], p)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(p)
    msg = str(e.value)
    assert "\n" not in msg and str(p) in msg
    expect = {"truncated": "corrupt or truncated", "text": "not a PyTorch checkpoint", "resnet": "not a ViT/URFM",
              "empty": "empty file", "missing": "no such file", "random_bytes": "not a PyTorch checkpoint",
              "list": "not a checkpoint dict"}[kind]
    assert expect in msg, msg
    assert isinstance(e.value, ValueError)


def test_pickled_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"model": {"w": torch.zeros(1)}, "args": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="weights_only"):
        load_checkpoint(tmp_path / "evil.pth")


def test_backbone_features_match_our_encoder(official):
    """timm ViT from load_backbone == our ViTEncoder on the same weights; avg pooling; grey folding."""
    ck = load_checkpoint(official[0])
    ours = URFM(URFMConfig.from_dict({**ck.config.to_dict(), "decoder_num_heads": 4})).eval()
    ours.load_state_dict(ck.state_dict)
    x = torch.randn(2, 3, 32, 32)
    bb = urfm_fast.load_backbone(official[0]).eval()
    with torch.no_grad():
        f_ours = ours.forward_features(x)
        f = bb.forward_features(x)
        torch.testing.assert_close(f, f_ours, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(bb(x), f_ours[:, 0], atol=2e-5, rtol=1e-5)
        avg = urfm_fast.load_backbone(official[0], global_pool="avg").eval()
        torch.testing.assert_close(avg(x), f_ours[:, 1:].mean(1), atol=2e-5, rtol=1e-5)
        inter = bb.forward_intermediates(x, indices=2, output_fmt="NCHW", intermediates_only=True)
        assert [tuple(t.shape) for t in inter] == [(2, 192, 2, 2)] * 2

        # grey: 1-channel model on (g - m)/s == 3-channel model on the replicated, per-channel-normalised g
        grey = urfm_fast.load_backbone(official[0], in_chans=1).eval()
        g = torch.rand(2, 1, 32, 32)
        m3, s3 = (torch.tensor(bb.pretrained_cfg[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
        m1, s1 = (torch.tensor(grey.pretrained_cfg[k]).view(1, 1, 1, 1) for k in ("mean", "std"))
        torch.testing.assert_close(grey((g - m1) / s1), bb((g.expand(-1, 3, -1, -1) - m3) / s3), atol=2e-5, rtol=1e-5)

        # another input size resamples the position embedding; a head adds logits
        big = urfm_fast.load_backbone(official[0], img_size=64, num_classes=4).eval()
        assert big(torch.randn(1, 3, 64, 64)).shape == (1, 4)


def test_timm_registration(official):
    import urfm_fast.checkpoints.backbone  # noqa: F401  (the module defining urfm_vit_* registers them)

    m = timm.create_model("urfm_vit_tiny_patch16_224", pretrained=True, img_size=32,
                          pretrained_cfg_overlay=dict(file=str(official[0])))
    ref = urfm_fast.load_backbone(official[0])
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(m.eval()(x), ref.eval()(x))
    assert m.pretrained_cfg["mean"] == (0.485, 0.456, 0.406)
    with pytest.raises(RuntimeError, match="no hosted weights"):
        timm.create_model("urfm_vit_base_patch16_224", pretrained=True)
    assert timm.create_model("urfm_vit_small_patch16_224", img_size=32).embed_dim == 384


def test_recipe_switches_load_strictly(tmp_path, official):
    """mask_type / decoder / loss_on come back from a checkpoint's args; an unknown value is refused in one
    line; the official layout (no such args) loads with MAE's defaults."""
    c = load_checkpoint(official[0]).config
    assert (c.mask_type, c.decoder, c.loss_on) == ("random", "standard", "masked")
    m = URFM(URFMConfig.preset("vit_tiny", img_size=32, depth=1, decoder_embed_dim=64, decoder_depth=1,
                               decoder_num_heads=4, decoder="prompting"))
    milan = dict(model="vit_tiny", mask_type="attention", decoder="prompting", loss_on="all_cls")
    torch.save({"model": m.state_dict(), "args": milan}, tmp_path / "milan.pth")
    c = load_checkpoint(tmp_path / "milan.pth").config
    assert (c.mask_type, c.decoder, c.loss_on) == ("attention", "prompting", "all_cls")
    for field, value in (("decoder", "cross"), ("mask_type", "grid"), ("loss_on", "cls")):
        torch.save({"model": m.state_dict(), "args": {**milan, field: value}}, tmp_path / "bad.pth")
        with pytest.raises(CheckpointError) as e:
            load_checkpoint(tmp_path / "bad.pth")
        assert "\n" not in str(e.value) and field in str(e.value) and value in str(e.value)
