"""experiments/label_efficiency.py's target transforms: centring removes the layout every image shares,
standardising gives unit channels, and the held-out targets get the pretraining set's statistics."""

import importlib.util
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# by path: `pytest` (unlike `python -m pytest`) does not put the repository root on sys.path
_spec = importlib.util.spec_from_file_location("label_efficiency", ROOT / "experiments" / "label_efficiency.py")
le = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(le)


def _targets(n=64, positions=4, dim=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    layout = torch.rand(positions, dim, generator=g) * 10  # shared by every image, dominates the norm
    return (layout + torch.randn(n, positions, dim, generator=g)).relu()


def test_centring_removes_the_shared_layout():
    tg = _targets()
    assert le.target_stats(tg, center=False, std=False) is None
    assert le.apply_stats(tg, None) is tg
    shift, scale = le.target_stats(tg, center=True, std=False)
    assert shift.shape == tg.shape[1:] and torch.equal(scale, torch.ones(3))
    centred = le.apply_stats(tg, (shift, scale))
    assert centred.mean(0).abs().max() < 1e-5  # every position's mean is zero
    # raw targets of two different images point the same way; centred ones do not
    cos = torch.nn.functional.cosine_similarity
    assert cos(tg[0].flatten(), tg[1].flatten(), dim=0) > 0.9
    assert cos(centred[0].flatten(), centred[1].flatten(), dim=0) < 0.9


def test_standardising_and_held_out_use_pretraining_statistics():
    tg, held = _targets(seed=0), _targets(seed=1)
    stats = le.target_stats(tg, center=True, std=True)
    z = le.apply_stats(tg, stats)
    assert torch.allclose(z.std((0, 1)), torch.ones(3), atol=1e-3)
    # the held-out set is shifted by the pretraining mean, not by its own
    assert torch.allclose(le.apply_stats(held, stats), (held - stats[0]) / stats[1])
    shift, _ = le.target_stats(tg, center=False, std=True)
    assert shift.shape == (3,)  # without centring: one mean per channel (the earlier --target-std)
    assert "--target-center" in le.build_parser().format_help()
