"""URFM model: MAE state-dict layout, timm interop, masked forward semantics."""

from functools import partial

import pytest
import timm
import torch
import torch.nn as nn
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block as TimmBlock

from urfm_fast import URFM, URFMConfig, ops
from urfm_fast.masking import split_ids
from urfm_fast.vit import sincos_pos_embed_2d


def tiny_cfg(**kw):
    base = dict(img_size=32, decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4, target_dim=48, depth=2)
    base.update(kw)
    return URFMConfig.preset("vit_tiny", **base)


class MAELayout(nn.Module):
    """facebookresearch/mae's MaskedAutoencoderViT parameter layout, built from timm parts."""

    def __init__(self, img, patch, dim, depth, heads, ddim, ddepth, dheads, out):
        super().__init__()
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.patch_embed = PatchEmbed(img, patch, 3, dim)
        n = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, dim), requires_grad=False)
        self.blocks = nn.ModuleList(TimmBlock(dim, heads, 4.0, qkv_bias=True, norm_layer=norm) for _ in range(depth))
        self.norm = norm(dim)
        self.decoder_embed = nn.Linear(dim, ddim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, ddim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, n + 1, ddim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            TimmBlock(ddim, dheads, 4.0, qkv_bias=True, norm_layer=norm) for _ in range(ddepth)
        )
        self.decoder_norm = norm(ddim)
        self.decoder_pred = nn.Linear(ddim, out)


def shapes(sd):
    return {k: tuple(v.shape) for k, v in sd.items()}


@pytest.mark.parametrize("preset", ["vit_tiny", "vit_base", "vit_large", "vit_huge"])
def test_state_dict_matches_mae_layout(preset):
    cfg = URFMConfig.preset(preset)
    with torch.device("meta"):  # no memory: ViT-H with its decoder is 690M parameters
        ours = URFM(cfg)
        mae = MAELayout(224, 16, cfg.embed_dim, cfg.depth, cfg.num_heads, 768, 8, 16, 768)
    assert shapes(ours.state_dict()) == shapes(mae.state_dict())


def test_default_is_urfm_base_dec768d8b():
    cfg = URFMConfig()
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads) == (768, 12, 12)
    assert (cfg.decoder_embed_dim, cfg.decoder_depth, cfg.decoder_num_heads, cfg.target_dim) == (768, 8, 16, 768)
    assert cfg.num_patches == 196 and cfg.num_visible == 49


def test_encoder_loads_strictly_into_timm_with_identical_features():
    cfg = tiny_cfg(img_size=224)
    model = URFM(cfg).eval()
    tm = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, depth=2).eval()
    tm.load_state_dict(model.encoder_state_dict(), strict=True)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad(), ops.use_backend("torch"):
        assert torch.allclose(model.forward_features(x), tm.forward_features(x), atol=1e-5)


def test_pos_embed_is_mae_sincos():
    # MAE: first half of the channels encodes the column (w), the second the row (h); CLS row zero.
    e = sincos_pos_embed_2d(16, 3)
    assert e.shape == (10, 16) and torch.equal(e[0], torch.zeros(16))
    col, row = 2, 1
    tok = e[1 + row * 3 + col]
    omega = 1.0 / 10000 ** (torch.arange(4, dtype=torch.float64) / 4.0)
    expect_w = torch.cat([(col * omega).sin(), (col * omega).cos()]).float()
    expect_h = torch.cat([(row * omega).sin(), (row * omega).cos()]).float()
    assert torch.allclose(tok, torch.cat([expect_w, expect_h]), atol=1e-6)


def test_masked_forward_equals_explicit_mae_computation():
    torch.manual_seed(0)
    cfg = tiny_cfg()
    model = URFM(cfg).eval()
    B, N, K = 3, cfg.num_patches, cfg.num_visible
    imgs, target = torch.randn(B, 3, 32, 32), torch.randn(B, N, cfg.target_dim)
    ids = model.sample_ids(B)
    with torch.no_grad(), ops.use_backend("torch"):
        loss, pred, ids_out = model(imgs, target, ids)
        assert torch.equal(ids, ids_out) and pred.shape == (B, N - K, cfg.target_dim)

        # MAE's forward written out with torch.gather and torch.cat
        x = model.patch_embed(imgs) + model.pos_embed[:, 1:]
        keep = ids[:, :K]
        x = torch.gather(x, 1, keep[..., None].expand(-1, -1, x.shape[-1]))
        x = torch.cat([(model.cls_token + model.pos_embed[:, :1]).expand(B, -1, -1), x], 1)
        for blk in model.blocks:
            x = blk(x)
        x = model.decoder_embed(model.norm(x))
        masks = model.mask_token.expand(B, N - K, -1)
        restore = torch.argsort(ids, 1)
        y = torch.cat([x[:, 1:], masks], 1)
        y = torch.gather(y, 1, restore[..., None].expand(-1, -1, y.shape[-1]))
        y = torch.cat([x[:, :1], y], 1) + model.decoder_pos_embed
        for blk in model.decoder_blocks:
            y = blk(y)
        full_pred = model.decoder_pred(model.decoder_norm(y))[:, 1:]  # (B, N, T) image order
        masked = ids[:, K:]
        want_pred = torch.gather(full_pred, 1, masked[..., None].expand(-1, -1, cfg.target_dim))
        want_tgt = torch.gather(target, 1, masked[..., None].expand(-1, -1, cfg.target_dim))
        want_loss = (1 - nn.functional.cosine_similarity(want_pred, want_tgt, dim=-1)).mean()
    assert torch.allclose(pred, want_pred, atol=1e-5)
    assert torch.allclose(loss, want_loss, atol=1e-6)


def test_loss_on_all_tokens_and_gradients():
    cfg = tiny_cfg(loss_on="all", mask_type="block")
    model = URFM(cfg)
    imgs, target = torch.randn(2, 3, 32, 32), torch.randn(2, cfg.num_patches, cfg.target_dim)
    loss, pred, _ = model(imgs, target)
    assert pred.shape == (2, cfg.num_patches, cfg.target_dim)
    loss.backward()
    assert 0.0 < loss.item() < 2.0
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert model.mask_token.grad.abs().sum() > 0 and model.cls_token.grad.abs().sum() > 0
    assert not model.pos_embed.requires_grad and not model.decoder_pos_embed.requires_grad


def test_target_shape_is_checked():
    model = URFM(tiny_cfg())
    with pytest.raises(ValueError, match="target shape"):
        model(torch.randn(1, 3, 32, 32), torch.randn(1, 5, 48))


def test_param_groups_exclude_norms_biases_and_tokens():
    model = URFM(tiny_cfg())
    decay, no_decay = model.param_groups(0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.ndim == 2 or p.ndim == 4 for p in decay["params"])
    nd = {names[id(p)] for p in no_decay["params"]}
    assert {"cls_token", "mask_token", "norm.weight", "blocks.0.attn.qkv.bias"} <= nd
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0


@pytest.mark.parametrize("bad", [dict(img_size=30), dict(mask_ratio=1.0), dict(mask_type="grid"), dict(loss_on="x")])
def test_config_validation(bad):
    with pytest.raises(ValueError):
        tiny_cfg(**bad)


def test_preset_unknown_name():
    with pytest.raises(ValueError, match="unknown model"):
        URFMConfig.preset("vit_gigantic")


def test_split_ids_roundtrip():
    ids = torch.stack([torch.randperm(10) for _ in range(4)])
    keep, masked, restore = split_ids(ids, 3)
    assert torch.equal(torch.gather(ids, 1, restore), torch.arange(10).expand(4, 10))
    assert keep.shape == (4, 3) and masked.shape == (4, 7)
