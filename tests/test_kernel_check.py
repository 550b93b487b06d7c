"""The kernel self-check: kernels pass against torch, and a wrong kernel is switched to torch for the
run (with a warning) instead of training on wrong numbers. Under the Triton interpreter on CPU."""

import pytest
import torch

from urfm_fast import URFMConfig
from urfm_fast.kernels import attention as A
from urfm_fast.kernels import cosine_loss as C
from urfm_fast.model import kernel_check, ops
from urfm_fast.model.kernel_check import Shapes, check, choose_attention, verify_or_fall_back


@pytest.fixture(autouse=True)
def _restore():
    yield
    ops.enable_triton()
    ops.clear_sdpa_preferences()


def test_every_kernel_passes_in_fp32_and_fp16(kernel_device):
    for dtype in (torch.float32, torch.float16):
        rows = check(dtype, Shapes.preset("small"), kernel_device)
        assert {r["op"] for r in rows} == set(ops.OPS)
        assert all(r["ok"] for r in rows), [r for r in rows if not r["ok"]]


def test_shapes_of_a_run_cover_encoder_decoder_and_teacher_attention():
    cfg = URFMConfig()  # ViT-B/16 recipe
    shapes = Shapes.of_run(cfg, micro_batch=256)
    assert (shapes.N, shapes.K, shapes.D) == (196, 49, 768)
    assert shapes.attention == ((50, 12, 64), (197, 16, 48), (197, 12, 64))
    assert (shapes.B, shapes.micro_batch) == (4, 256)  # correctness at 4, attention speed at the run's batch
    # the prompting decoder's cross-attention runs on SDPA: no decoder shape to check or time
    assert Shapes.of_run(URFMConfig(decoder="prompting")).attention == ((50, 12, 64), (197, 12, 64))


def test_a_wrong_kernel_falls_back_to_torch(kernel_device, kernel_dtype, monkeypatch, caplog):
    real = A.attention
    off = 1.01 if kernel_dtype == torch.float32 else 1.1  # 1 % off in fp32 (10 % in bf16): must be caught
    monkeypatch.setattr(A, "attention", lambda q, k, v: real(q, k, v) * off)
    monkeypatch.setattr(C, "cosine_loss", lambda *a: (_ for _ in ()).throw(RuntimeError("no kernel image")))
    shapes = Shapes(2, 9, 3, 32, ((4, 2, 16),))
    with caplog.at_level("WARNING"):
        failed = verify_or_fall_back(shapes, kernel_device, kernel_dtype)
    assert failed == ["attention", "cosine_loss"]
    assert "attention falls back to torch" in caplog.text
    q = torch.randn(1, 2, 4, 16, device=kernel_device, dtype=kernel_dtype)
    with ops.use_backend("triton"):
        assert not ops.use_triton(q, "attention") and ops.use_triton(q, "gather_tokens")
        torch.testing.assert_close(ops.attention(q, q, q), A.attention_ref(q, q, q))
    with pytest.raises(ValueError, match="unknown op"):
        ops.disable_triton("softmax", "")


def test_attention_shapes_where_sdpa_is_faster_run_on_sdpa(kernel_device, kernel_dtype, monkeypatch, caplog):
    # scripted timings: Triton wins at 10 tokens, loses at 38; the losing shape goes to SDPA, logged
    def fake_time(fn, q, k, v, grad, reps=10):
        assert q.shape[0] == 6  # timed at the micro-batch, not the correctness batch
        triton = fn is A.attention
        return {10: 1.0, 38: 3.0}[q.shape[2]] if triton else 2.0

    monkeypatch.setattr(kernel_check, "time_fwd_bwd", fake_time)
    shapes = Shapes(3, 37, 9, 48, ((10, 2, 16), (38, 2, 16)), micro_batch=6)
    with caplog.at_level("WARNING"):
        rows = choose_attention(shapes, kernel_device, kernel_dtype)
    assert [r["choice"] for r in rows] == ["triton", "sdpa"]
    assert "attention N=38 H=2 Dh=16" in caplog.text and "runs on SDPA" in caplog.text
    assert ops.attention_on_sdpa(kernel_device.type, kernel_dtype, (6, 2, 38, 16))
    assert not ops.attention_on_sdpa(kernel_device.type, kernel_dtype, (6, 2, 10, 16))


def test_choose_attention_times_real_calls(kernel_device, kernel_dtype):
    # the real timer, one tiny shape (the interpreter is far slower than SDPA: SDPA is chosen on CPU)
    rows = choose_attention(Shapes(1, 4, 2, 16, ((5, 1, 16),)), kernel_device, kernel_dtype, reps=1)
    (row,) = rows
    assert row["sdpa_ms"] > 0 and row["triton_ms"] > 0 and row["choice"] in ("sdpa", "triton")
    assert ops.attention_on_sdpa(kernel_device.type, kernel_dtype, (1, 1, 5, 16)) == (row["choice"] == "sdpa")
