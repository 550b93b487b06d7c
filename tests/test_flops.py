"""The analytic FLOP counts of urfm_fast.model.flops: the ViT-B budget of docs/architecture.md, and exact agreement with
torch's FlopCounterMode (which counts matmuls and convs) on tiny models."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from urfm_fast import URFM, URFMConfig
from urfm_fast.kernels.attention import attention_math_ref
from urfm_fast.model import ops
from urfm_fast.model.flops import (
    block_forward_flops,
    mfu,
    patch_embed_flops,
    peak_flops,
    peak_flops_for_name,
    student_forward_flops,
    teacher_forward_flops,
    train_flops_per_image,
    vit_forward_flops,
)
from urfm_fast.model.vit import Block

GMAC = 2e9  # FLOP per giga multiply-accumulate


def test_vit_b_recipe_matches_design_budget():
    """docs/architecture.md, compute budget: teacher 17.6, encoder 4.4, decoder 11.7 GMAC forward; ~130 GFLOP train."""
    cfg = URFMConfig()
    assert cfg.num_visible == 49
    assert teacher_forward_flops(cfg) / GMAC == pytest.approx(17.6, rel=0.02)
    parts = student_forward_flops(cfg)
    assert parts["encoder"] / GMAC == pytest.approx(4.4, rel=0.02)
    assert (parts["decoder"] + parts["pred"]) / GMAC == pytest.approx(11.7, rel=0.02)
    assert train_flops_per_image(cfg) / 1e9 == pytest.approx(130, rel=0.03)
    # Without the online teacher only the 3x student part remains.
    assert train_flops_per_image(cfg, teacher=False) == 3 * sum(parts.values())


def test_attention_share_is_small_at_197_tokens():
    """docs/architecture.md: attention is ~4 % of the FLOPs of a ViT-B block at 197 tokens."""
    D, T = 768, 197
    share = 4 * T * T * D / block_forward_flops(D, T)
    assert 0.03 < share < 0.05


def test_heads_do_not_change_flops_but_are_validated():
    assert vit_forward_flops(768, 2, 50, heads=12) == vit_forward_flops(768, 2, 50, heads=3)
    with pytest.raises(ValueError):
        vit_forward_flops(768, 2, 50, heads=7)


def _count(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.fixture
def math_attention(monkeypatch):
    """Route attention through explicit matmuls: FlopCounterMode does not count CPU SDPA kernels."""
    monkeypatch.setattr(ops, "attention", lambda q, k, v: attention_math_ref(q, k, v, upcast=False))


@pytest.mark.parametrize("dim,heads,tokens,mlp_ratio", [(64, 4, 17, 4.0), (48, 3, 50, 2.0), (96, 2, 7, 4.0)])
def test_block_formula_is_exact(math_attention, dim, heads, tokens, mlp_ratio):
    block = Block(dim, heads, mlp_ratio)
    B = 3
    x = torch.randn(B, tokens, dim)
    assert _count(lambda: block(x)) == B * block_forward_flops(dim, tokens, mlp_ratio)


def _tiny_cfg(**kw) -> URFMConfig:
    fields = dict(img_size=64, depth=2, decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4, target_dim=48)
    fields.update(kw)
    return URFMConfig.preset("vit_tiny", **fields)


@pytest.mark.parametrize("loss_on, decoder", [("masked", "standard"), ("all", "standard"),
                                              ("masked", "prompting"), ("all_cls", "prompting")])
def test_student_forward_and_backward_are_exact(math_attention, loss_on, decoder):
    cfg = _tiny_cfg(loss_on=loss_on, decoder=decoder)
    torch.manual_seed(0)
    model = URFM(cfg)
    B = 2
    imgs = torch.randn(B, 3, cfg.img_size, cfg.img_size)
    target = torch.randn(B, cfg.num_patches, cfg.target_dim)
    cls_target = torch.randn(B, cfg.target_dim) if loss_on == "all_cls" else None
    expected_fwd = B * sum(student_forward_flops(cfg).values())
    assert _count(lambda: model(imgs, target, cls_target=cls_target)) == expected_fwd

    def step():
        loss, _, _ = model(imgs, target, cls_target=cls_target)
        loss.backward()

    # Backward = 2x forward, except that the images need no gradient: the patch embedding's
    # input-gradient conv is skipped (the documented ~1x overcount of that small op).
    skipped = B * patch_embed_flops(cfg.num_patches, cfg.embed_dim, cfg.patch_size, cfg.in_chans)
    assert _count(step) == 3 * expected_fwd - skipped


def test_teacher_formula_matches_timm_vit(math_attention):
    """The teacher term counts a full timm-style ViT on 1+N tokens (here a 2-block, 64-px one)."""
    from urfm_fast.model.vit import ViTEncoder

    enc = ViTEncoder(img_size=64, embed_dim=64, depth=2, num_heads=4)
    x = torch.randn(2, 3, 64, 64)
    n = 16
    expected = 2 * vit_forward_flops(64, 2, 1 + n, patches=n)
    assert _count(lambda: enc.forward_features(x)) == expected


def test_peak_table_and_mfu():
    assert peak_flops_for_name("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops_for_name("NVIDIA H200") == 989e12
    assert peak_flops_for_name("NVIDIA H100 PCIe") == 756e12
    assert peak_flops_for_name("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops_for_name("NVIDIA L40S") == 362e12
    assert peak_flops_for_name("NVIDIA A100-SXM4-80GB", torch.float32) == 156e12
    assert peak_flops_for_name("Some Future GPU") is None
    assert peak_flops("cpu") is None
    assert mfu(2500 * train_flops_per_image(URFMConfig()), 989e12) == pytest.approx(0.33, abs=0.01)
    assert mfu(1e12, None) is None


def test_peak_env_override(monkeypatch):
    monkeypatch.setenv("URFM_PEAK_TFLOPS", "100")
    assert peak_flops("cpu") == 100e12
