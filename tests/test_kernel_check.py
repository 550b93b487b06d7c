"""The kernel self-check: kernels pass against torch, and a wrong kernel is switched to torch for the
run (with a warning) instead of training on wrong numbers. Under the Triton interpreter on CPU."""

import pytest
import torch

from urfm_fast import URFMConfig, ops
from urfm_fast.kernel_check import Shapes, check, verify_or_fall_back
from urfm_fast.kernels import attention as A
from urfm_fast.kernels import cosine_loss as C


@pytest.fixture(autouse=True)
def _restore():
    yield
    ops.enable_triton()


def test_every_kernel_passes_in_fp32_and_fp16(kernel_device):
    for dtype in (torch.float32, torch.float16):
        rows = check(dtype, Shapes.preset("small"), kernel_device)
        assert {r["op"] for r in rows} == set(ops.OPS)
        assert all(r["ok"] for r in rows), [r for r in rows if not r["ok"]]


def test_shapes_of_a_run_cover_encoder_decoder_and_teacher_attention():
    cfg = URFMConfig()  # ViT-B/16 recipe
    shapes = Shapes.of_run(cfg)
    assert (shapes.N, shapes.K, shapes.D) == (196, 49, 768)
    assert shapes.attention == ((50, 12, 64), (197, 16, 48), (197, 12, 64))


def test_a_wrong_kernel_falls_back_to_torch(kernel_device, monkeypatch, caplog):
    real = A.attention
    monkeypatch.setattr(A, "attention", lambda q, k, v: real(q, k, v) * 1.01)  # 1 % off: must be caught
    monkeypatch.setattr(C, "cosine_loss", lambda *a: (_ for _ in ()).throw(RuntimeError("no kernel image")))
    shapes = Shapes(2, 9, 3, 32, ((4, 2, 16),))
    with caplog.at_level("WARNING"):
        failed = verify_or_fall_back(shapes, kernel_device, torch.float32)
    assert failed == ["attention", "cosine_loss"]
    assert "attention falls back to torch" in caplog.text
    q = torch.randn(1, 2, 4, 16, device=kernel_device)
    with ops.use_backend("triton"):
        assert not ops.use_triton(q, "attention") and ops.use_triton(q, "gather_tokens")
        torch.testing.assert_close(ops.attention(q, q, q), A.attention_ref(q, q, q))
    with pytest.raises(ValueError, match="unknown op"):
        ops.disable_triton("softmax", "")
