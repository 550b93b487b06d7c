"""One pretraining step of the CPU study (experiments/does_it_work.py) through the product's trainer, against
a bare step of the same model (what the study's own loop did before it moved onto the trainer), in one process.

Rows (group ``study_step``), on the same ViT-Ti (6 blocks, 128 px, 64 patches, decoder 128d2b), batch 32,
EfficientNet-Lite0 targets, mask 0.75:
    study_loop    normalise, forward with the targets given, backward, AdamW: nothing else (the baseline)
    product_step  Trainer.train_step with --augment none --cache-targets, the cache filled: the batch from the
                  data stream, lr schedule, grad-norm clipping and its NaN check, AdamW, EMA, metrics

    pytest bench/bench_study_step.py --benchmark-only
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BATCH = 32


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    from urfm_fast.data.stream import SyntheticSource
    from urfm_fast.train.config import parse_config
    from urfm_fast.train.distributed import init_distributed
    from urfm_fast.train.metrics import MetricsLogger
    from urfm_fast.train.plan import build_plan
    from urfm_fast.train.trainer import Trainer

    sys.path.insert(0, str(ROOT / "experiments"))
    from does_it_work import STUDENT

    out = tmp_path_factory.mktemp("study_step") / "run"
    cfg, _, _ = parse_config([*STUDENT, "--img-size", "128", "--batch-size", str(BATCH), "--steps", "1000",
                              "--warmup-steps", "50", "--synthetic-images", str(BATCH), "--out", str(out)])
    d = init_distributed(cfg)
    t = Trainer(build_plan(cfg, False, d), d, None, data=SyntheticSource(BATCH, 128, seed=0))
    t.batches = iter(t.stream)
    t.metrics = MetricsLogger(t.plan, d, t.model_cfg, t.out, 0, lambda *a: None)
    t.train_step()  # one epoch of BATCH images: every target is cached from here on
    yield t
    t.metrics.close()


def test_study_loop(benchmark, measure, trainer):
    from urfm_fast import URFM
    from urfm_fast.config import IMAGENET_MEAN, IMAGENET_STD
    from urfm_fast.data.augment import normalize

    model = URFM(trainer.model_cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.05)
    images01, _ = next(trainer.batches)
    targets = trainer.teacher(images01)
    ids = model.sample_ids(BATCH)

    def step():
        loss = model(normalize(images01, IMAGENET_MEAN, IMAGENET_STD), targets, ids)[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    measure(benchmark, step, items=BATCH)


def test_product_step(benchmark, measure, trainer):
    measure(benchmark, trainer.train_step, items=BATCH, reference="test_study_loop")
