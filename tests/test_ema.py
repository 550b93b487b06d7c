"""EMA warm-up and its update count; which weights evaluate/export/load_backbone take (auto | ema | live)."""

import pytest
import torch

from urfm_fast import URFM, URFMConfig
from urfm_fast.checkpoints.formats import CheckpointError, load_checkpoint, trustworthy
from urfm_fast.train.ema import EMA, warmup_decay


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))


def test_warmup_decay_schedule():
    assert warmup_decay(0.9999, 0) == pytest.approx(0.1)
    assert warmup_decay(0.9999, 60) == pytest.approx(61 / 70)
    assert warmup_decay(0.9, 10**6) == 0.9 and warmup_decay(0.9, 0, warmup=False) == 0.9
    n = torch.tensor([0.0, 60.0, 1e6])
    torch.testing.assert_close(warmup_decay(0.99, n), torch.tensor([0.1, 61 / 70, 0.99]))
    assert not trustworthy(60, 0.9999) and trustworthy(10_000, 0.9999) and trustworthy(None, None)


def test_ema_follows_the_warmed_decay_and_counts_updates():
    model = _model()
    ema = EMA(model, decay=0.9999)
    expect = [p.detach().clone() for p in model.parameters()]
    for n in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update(model)
        d = min(0.9999, (1 + n) / (10 + n))
        expect = [d * e + (1 - d) * p.detach() for e, p in zip(expect, model.parameters())]
        assert ema.num_updates == n + 1
    for e, s in zip(expect, ema.shadow):
        torch.testing.assert_close(s, e)


def test_device_side_skip_counts_only_applied_updates():
    """The skip path (a device tensor count) gives the plain path's numbers; skipped steps are not counted."""
    a_model, b_model = _model(), _model()
    a, b = EMA(a_model, 0.999), EMA(b_model, 0.999)
    for step in range(6):
        torch.manual_seed(step)
        for m in (a_model, b_model):
            with torch.no_grad():
                for p in m.parameters():
                    p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(step)))
        a.update(a_model)
        b.update(b_model, skip=torch.tensor(False))
        b.update(b_model, skip=torch.tensor(True))  # a skipped step: no change, not counted
    assert a.num_updates == b.num_updates == 6
    for x, y in zip(a.shadow, b.shadow):
        torch.testing.assert_close(x, y)
    b.num_updates = 2
    assert b.num_updates == 2


def _save(path, updates, decay=0.9999):
    cfg = URFMConfig.preset("vit_tiny", img_size=32, depth=1, decoder_embed_dim=32, decoder_depth=1,
                            decoder_num_heads=2)
    torch.manual_seed(0)
    live = URFM(cfg).state_dict()
    ema = {k: v + 1.0 for k, v in live.items()}
    obj = {"model": live, "ema_state_dict": ema, "step": 5, "epoch": 0, "config": cfg.to_dict(),
           "args": {"ema_decay": decay}}
    if updates is not None:
        obj["ema_updates"] = updates
    torch.save(obj, path)
    return live, ema


@pytest.mark.parametrize("updates, decay, auto_takes", [(60, 0.9999, "model"), (10_000, 0.9999, "ema"),
                                                        (60, 0.9, "ema"), (None, 0.9999, "ema")])
def test_weight_choice(tmp_path, updates, decay, auto_takes):
    path = tmp_path / "c.pth"
    live, ema = _save(path, updates, decay)
    auto = load_checkpoint(path, weights="auto")
    assert auto.meta["weights"] == auto_takes and "auto" in auto.meta["weights_reason"]
    want = live if auto_takes == "model" else ema
    assert torch.equal(auto.state_dict["cls_token"], want["cls_token"])
    assert load_checkpoint(path, weights="ema").meta["weights"] == "ema"
    assert load_checkpoint(path, weights="live").meta["weights"] == "model"
    with pytest.raises(CheckpointError, match="weights must be"):
        load_checkpoint(path, weights="best")
