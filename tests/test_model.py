"""URFM model: MAE state-dict layout, timm interop, masked forward semantics."""

from functools import partial

import pytest
import timm
import torch
import torch.nn as nn
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block as TimmBlock

from urfm_fast import URFM, URFMConfig
from urfm_fast.model import ops
from urfm_fast.model.masking import split_ids
from urfm_fast.model.vit import sincos_pos_embed_2d


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


@pytest.mark.parametrize("bad, match", [
    (dict(img_size=30), "img_size 30 is not a multiple of patch_size 16"),
    (dict(mask_ratio=1.0), r"mask_ratio must be in \[0, 1\), got 1.0"),
    (dict(mask_type="grid"), "mask_type must be one of random, block, attention; got 'grid'"),
    (dict(loss_on="x"), "loss_on must be one of masked, all, all_cls; got 'x'"),
    (dict(decoder="cross"), "decoder must be one of standard, prompting; got 'cross'"),
])
def test_config_validation(bad, match):
    with pytest.raises(ValueError, match=match):
        tiny_cfg(**bad)


def test_preset_unknown_name():
    with pytest.raises(ValueError, match="unknown model"):
        URFMConfig.preset("vit_gigantic")


def test_split_ids_roundtrip():
    ids = torch.stack([torch.randperm(10) for _ in range(4)])
    keep, masked, restore = split_ids(ids, 3)
    assert torch.equal(torch.gather(ids, 1, restore), torch.arange(10).expand(4, 10))
    assert keep.shape == (4, 3) and masked.shape == (4, 7)


def test_prompting_decoder_updates_only_the_mask_tokens():
    """MILAN's prompting decoder: CLS and visible rows leave the blocks as they entered (only decoder_norm
    applies), the mask rows are updated; same parameter names as the standard decoder."""
    cfg = tiny_cfg(decoder="prompting")
    torch.manual_seed(0)
    model = URFM(cfg)
    assert shapes(model.state_dict()) == shapes(URFM(tiny_cfg()).state_dict())
    B, K = 3, cfg.num_visible
    ids = model.sample_ids(B)
    ids_keep, ids_mask, ids_restore = split_ids(ids, K)
    latent = model.forward_encoder(torch.randn(B, 3, 32, 32), ids_keep)
    out = model.forward_decoder(latent, ids_restore, ids)  # (B, 1+N, Dd)
    x = model.decoder_embed(latent)  # (B, 1+K, Dd)
    pos = model.decoder_pos_embed[0]
    entered = torch.cat([x[:, :1] + pos[0], x[:, 1:] + pos[1:][ids_keep]], dim=1)  # CLS + visible, with pos
    left = torch.cat([out[:, :1], torch.gather(out[:, 1:], 1, ids_keep[..., None].expand(-1, -1, out.shape[-1]))], 1)
    torch.testing.assert_close(left, model.decoder_norm(entered))
    masked_in = model.decoder_norm(model.mask_token + pos[1:][ids_mask])
    masked_out = torch.gather(out[:, 1:], 1, ids_mask[..., None].expand(-1, -1, out.shape[-1]))
    assert (masked_out - masked_in).abs().amax(-1).min() > 1e-3  # every mask row was updated
    # without ids_shuffle the decoder derives it from ids_restore
    torch.testing.assert_close(model.forward_decoder(latent, ids_restore), out)


def test_prompting_decoder_attention_over_all_tokens():
    """One prompting block against the explicit math: queries = mask tokens, keys/values = CLS, visible, masks."""
    from urfm_fast.model.vit import Block

    torch.manual_seed(0)
    blk, heads = Block(32, 4), 4
    prompts, queries = torch.randn(2, 5, 32), torch.randn(2, 7, 32)
    got = blk(queries, prompts=prompts)
    h = blk.norm1(torch.cat([prompts, queries], 1))
    q, k, v = blk.attn.qkv(h).reshape(2, 12, 3, heads, 8).permute(2, 0, 3, 1, 4)
    att = ((q[:, :, 5:] @ k.transpose(-2, -1)) / 8**0.5).softmax(-1) @ v  # (2, 4, 7, 8)
    y = queries + blk.attn.proj(att.transpose(1, 2).reshape(2, 7, 32))
    torch.testing.assert_close(got, y + blk.mlp(blk.norm2(y)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("decoder", ["standard", "prompting"])
def test_loss_on_all_cls_includes_the_cls_row(decoder):
    cfg = tiny_cfg(loss_on="all_cls", decoder=decoder)
    torch.manual_seed(0)
    model = URFM(cfg)
    B, N, T = 2, cfg.num_patches, cfg.target_dim
    imgs, target, cls_target = torch.randn(B, 3, 32, 32), torch.randn(B, N, T), torch.randn(B, T)
    ids = model.sample_ids(B)
    loss, pred, _ = model(imgs, target, ids, cls_target)
    assert pred.shape == (B, 1 + N, T)
    pred.retain_grad()
    loss.backward()
    assert pred.grad[:, 0].abs().sum() > 0  # the CLS row is in the loss
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
    cos = torch.nn.functional.cosine_similarity
    want = (1 - cos(pred.detach(), torch.cat([cls_target[:, None], target], 1), dim=-1)).mean()
    torch.testing.assert_close(loss.detach(), want, atol=1e-5, rtol=1e-5)
    model.cfg.loss_on = "all"  # the same weights on patches only: the CLS term is what differs
    loss_all, _, _ = model(imgs, target, ids)
    cls_term = (1 - cos(pred.detach()[:, 0], cls_target, dim=-1)).mean()
    torch.testing.assert_close(loss.detach(), (N * loss_all.detach() + cls_term) / (N + 1), atol=1e-5, rtol=1e-5)
    model.cfg.loss_on = "all_cls"
    with pytest.raises(ValueError, match="cls_target"):
        model(imgs, target, ids)


def test_milan_recipe_trains_with_attention_masks():
    cfg = tiny_cfg(mask_type="attention", decoder="prompting", loss_on="all_cls")
    torch.manual_seed(0)
    model = URFM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    imgs, target, cls_target = torch.randn(4, 3, 32, 32), torch.randn(4, 4, 48), torch.randn(4, 48)
    keep_prob = torch.tensor([0.7, 0.1, 0.1, 0.1]).expand(4, -1)
    losses = []
    for _ in range(15):
        ids = model.sample_ids(4, keep_prob=keep_prob)
        loss, _, _ = model(imgs, target, ids, cls_target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
