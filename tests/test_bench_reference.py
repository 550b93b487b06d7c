"""The benchmark baseline (bench/reference.py) computes what urfm_fast.URFM computes, with the same
parameters and FLOPs, so the speed ratio in bench/RESULTS.md compares like with like."""

import importlib.util
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from urfm_fast import URFM, URFMConfig
from urfm_fast.kernels.attention import attention_math_ref
from urfm_fast.model import ops
from urfm_fast.model.flops import linear_flops, student_forward_flops

ROOT = Path(__file__).resolve().parents[1]


def _load_reference():
    spec = importlib.util.spec_from_file_location("bench_reference", ROOT / "bench" / "reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def reference():
    return _load_reference()


def _cfg():
    return URFMConfig.preset("vit_tiny", img_size=64, depth=2, decoder_embed_dim=64, decoder_depth=2,
                             decoder_num_heads=4, target_dim=48)  # fmt: skip


def test_same_parameters_loss_and_gradients(reference):
    cfg = _cfg()
    torch.manual_seed(0)
    ours = URFM(cfg)
    ref = reference.ReferenceURFM.from_config(cfg)
    # Same state-dict keys (MAE's names) and shapes: loads strictly both ways.
    ref.load_state_dict(ours.state_dict(), strict=True)
    # The reference's numpy sin-cos embeddings equal ours.
    fresh = reference.ReferenceURFM.from_config(cfg)
    torch.testing.assert_close(fresh.pos_embed, ours.pos_embed)
    torch.testing.assert_close(fresh.decoder_pos_embed, ours.decoder_pos_embed)

    B = 3
    imgs = torch.randn(B, 3, cfg.img_size, cfg.img_size)
    target = torch.randn(B, cfg.num_patches, cfg.target_dim)
    noise = torch.rand(B, cfg.num_patches)
    with ops.use_backend("torch"):
        loss_ours, _, _ = ours(imgs, target, ids_shuffle=torch.argsort(noise, dim=1))
    loss_ref, _, mask = ref(imgs, target, mask_ratio=cfg.mask_ratio, noise=noise)
    assert mask.sum().item() == B * (cfg.num_patches - cfg.num_visible)
    torch.testing.assert_close(loss_ours, loss_ref, rtol=1e-5, atol=1e-6)

    loss_ours.backward()
    loss_ref.backward()
    ref_params = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        if p.grad is None:
            assert ref_params[name].grad is None, name
            continue
        torch.testing.assert_close(p.grad, ref_params[name].grad, rtol=1e-4, atol=1e-6, msg=name)


def test_same_flops_except_prediction_rows(reference, monkeypatch):
    """Identical matmul work, except MAE's decoder_pred on all 1+N rows (ours: the N-K masked)."""
    import timm.layers

    cfg = _cfg()
    monkeypatch.setattr(ops, "attention", lambda q, k, v: attention_math_ref(q, k, v, upcast=False))
    ref = reference.ReferenceURFM.from_config(cfg)
    for blk in [*ref.blocks, *ref.decoder_blocks]:
        blk.attn.fused_attn = False  # explicit matmuls, which FlopCounterMode counts on CPU
    assert isinstance(ref.blocks[0].attn, timm.layers.Attention)
    ours = URFM(cfg)
    B = 2
    imgs = torch.randn(B, 3, cfg.img_size, cfg.img_size)
    target = torch.randn(B, cfg.num_patches, cfg.target_dim)

    def count(fn):
        with FlopCounterMode(display=False) as c:
            fn()
        return c.get_total_flops()

    f_ours = count(lambda: ours(imgs, target))
    f_ref = count(lambda: ref(imgs, target, mask_ratio=cfg.mask_ratio))
    assert f_ours == B * sum(student_forward_flops(cfg).values())
    extra_rows = (1 + cfg.num_patches) - (cfg.num_patches - cfg.num_visible)
    assert f_ref - f_ours == B * linear_flops(extra_rows, cfg.decoder_embed_dim, cfg.target_dim)
