"""Train a tiny URFM for 20 steps with the Triton kernels (interpreter on CPU) and with the torch
references, from the same weights, data and masks: the two loss curves must agree.

Tolerance: 1e-4 absolute per step on a loss near 1. Both runs are fp32; the kernels differ from
torch only in summation order (measured max difference over the 20 steps: ~1e-7), so 1e-4 leaves
room for other CPUs while still catching any wrong gradient (those move the curve by 1e-2 within
a few steps). One encoder and one decoder block keep the interpreter run near 20 s.

CPU only: the comparison needs both runs in exact fp32, and on a GPU fp32 attention is SDPA's in both
(the bf16 kernels are checked forward and backward by tests/test_kernels_*.py and
bench/check_kernels.py there).
"""

import torch
from conftest import interpreter_only

from urfm_fast import URFM, URFMConfig
from urfm_fast.model import ops

STEPS = 20


def _train(backend: str) -> list[float]:
    torch.manual_seed(0)
    cfg = URFMConfig.preset(
        "vit_tiny", img_size=48, depth=1, decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=2, target_dim=40
    )
    model = URFM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.05)
    gen = torch.Generator().manual_seed(1)
    imgs = torch.randn(2, 3, cfg.img_size, cfg.img_size, generator=gen)
    target = torch.randn(2, cfg.num_patches, cfg.target_dim, generator=gen)
    losses = []
    with ops.use_backend(backend):
        for _ in range(STEPS):
            ids_shuffle = torch.rand(2, cfg.num_patches, generator=gen).argsort(dim=1)
            loss, _, _ = model(imgs, target, ids_shuffle)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    return losses


@interpreter_only
def test_triton_and_torch_training_curves_agree():
    triton_losses = _train("triton")
    torch_losses = _train("torch")
    diffs = [abs(a - b) for a, b in zip(triton_losses, torch_losses, strict=True)]
    assert max(diffs) < 1e-4, list(zip(triton_losses, torch_losses, strict=True))
    assert torch_losses[-1] < torch_losses[0] - 0.05  # it does learn: the comparison means something
