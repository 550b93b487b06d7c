"""torchrun on CPU (gloo, 2 processes, tiny model): FSDP2 and DDP follow the one-process loss curve,
resume works across world sizes and after a preemption, NaNs stop every rank, FSDP + compile + AC run.

With ``--deterministic`` every sample's crop and mask come from (seed, epoch, index) and the global
batch is the same set of samples whatever the world size, so the curves agree up to float
summation order (all-reduce of gradients, batch-size-dependent matmul blocking): atol 1e-5.
"""

import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
from test_pretrain import fast_random_teacher  # noqa: F401 (autouse fixture for in-process runs)
from test_resume import REF_ARGS, STEPS, losses, reference_run

from urfm_fast import pretrain
from urfm_fast.checkpoints import runs as ckpt

ATOL = 1e-5
pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="gloo + torchrun on Linux/macOS")


def torchrun(args, nproc=2, env=None, timeout=600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "urfm_fast.pretrain", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


def test_fsdp_two_ranks_match_one_then_resume_on_one(tmp_path_factory, capsys):
    ref = losses(reference_run(tmp_path_factory))
    out = tmp_path_factory.mktemp("fsdp") / "run"
    r = torchrun([*REF_ARGS, "--dist", "fsdp", "--shard", "full", "--out", str(out)])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 rank(s) on cpu | fsdp/full" in r.stdout
    np.testing.assert_allclose(list(losses(out).values()), list(ref.values()), rtol=0, atol=ATOL)

    # resume the 2-rank sharded checkpoint of step 4 on one process: DCP reshards model, EMA, optimizer
    shutil.rmtree(out / "checkpoints" / "step_00000008")
    (out / "checkpoint-00000008.pth").unlink()
    assert pretrain.main(["--out", str(out), "--resume"]) == 0
    assert "step_00000004 at step 4" in capsys.readouterr().out
    got = losses(out)
    assert list(got) == list(range(1, STEPS + 1))
    np.testing.assert_allclose(list(got.values()), list(ref.values()), rtol=0, atol=ATOL)


def test_ddp_preempted_and_resumed_matches_one_rank(tmp_path_factory):
    ref = losses(reference_run(tmp_path_factory))
    out = tmp_path_factory.mktemp("ddp") / "run"
    # SIGTERM reaches rank 0 only; the flag is all-reduced so both ranks stop after the same step
    r = torchrun([*REF_ARGS, "--dist", "ddp", "--out", str(out)], env={"URFM_FAULTS": "sigterm@4"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "stopped by SIGTERM: step 5/8" in r.stdout
    r = torchrun(["--out", str(out), "--resume"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout and "ddp" in r.stdout
    got = losses(out)
    assert list(got) == list(range(1, STEPS + 1))
    np.testing.assert_allclose(list(got.values()), list(ref.values()), rtol=0, atol=ATOL)


def test_preemption_between_log_steps_stops_every_rank_at_the_next(tmp_path):
    """With several ranks the preemption flag is agreed on at log steps: SIGTERM to rank 0 after step 2
    stops both ranks after step 3 (--log-every 3), with one complete checkpoint of that step."""
    out = tmp_path / "run"
    r = torchrun([*REF_ARGS, "--dist", "fsdp", "--log-every", "3", "--out", str(out)], env={"URFM_FAULTS": "sigterm@1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "stopped by SIGTERM: step 3/8" in r.stdout
    assert [p.name for _, p in ckpt.list_checkpoints(out)] == ["step_00000003"]
    assert ckpt.validate(out / "checkpoints" / "step_00000003") is None


_EMA_LOCALS_SCRIPT = """
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

from urfm_fast.train.ema import EMA

dist.init_process_group("gloo")
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.LayerNorm(10), torch.nn.Linear(10, 3))
fully_shard(model[0])
fully_shard(model[2])
fully_shard(model)
opt = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=True)
ema = EMA(model, 0.5, warmup=False)  # a fixed decay, to compare with a plain lerp
ref = [s.to_local().clone() for s in ema.shadow]
seen = None
for i in range(4):
    model(torch.randn(5, 6)).square().mean().backward()
    opt.step()
    opt.zero_grad()
    now = [(id(p._local_tensor), p._local_tensor.untyped_storage().data_ptr()) for p in model.parameters()]
    assert seen is None or now == seen, f"step {i}: FSDP2 replaced a parameter's local tensor"
    seen = now
    ema.update(model)  # cached local tensors
    with torch.no_grad():  # the per-step lookup
        torch._foreach_lerp_(ref, [p.detach().to_local() for p in model.parameters()], 0.5)
    assert all(torch.equal(r, s.to_local()) for r, s in zip(ref, ema.shadow)), f"step {i}"
print("OK", flush=True)
# Both ranks done with every collective before the group goes away: tearing gloo down while the peer
# is still in a collective can abort the process at exit.
dist.barrier()
dist.destroy_process_group()
# No C++ static destructors at exit: under load, gloo's threads were once still joinable then, and
# std::terminate aborted a rank after its OK (what this test checks is above, not the teardown).
sys.stdout.flush()
os._exit(0)
"""


def test_fsdp2_local_tensors_are_stable_for_the_ema(tmp_path):
    """The EMA looks up the parameters' local shards once: FSDP2 (after its lazy init in the first
    forward) updates them in place, so the cached tensors give the per-step lookup's result exactly."""
    script = tmp_path / "ema_locals.py"
    script.write_text(_EMA_LOCALS_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("OK") == 2


def test_nan_streak_stops_every_rank(tmp_path):
    r = torchrun([*REF_ARGS, "--max-bad-steps", "2", "--out", str(tmp_path / "run")], env={"URFM_FAULTS": "nan@1-8"})
    assert r.returncode != 0
    for rank in (0, 1):
        assert f"[rank {rank}] stopping: 2 consecutive steps with NaN/Inf" in r.stderr


def test_a_dead_rank_fails_fast(tmp_path):
    """Rank 1 exits abruptly (``os._exit(1)``) at the start of step 4, while the step-2 checkpoint is
    still being written in the background (slowed by 2 s): rank 0, waiting in an FSDP all-gather, must
    stop at once with a message, not hang, and leave no partial checkpoint. What guarantees it
    (gloo's closed connection, the process-group timeout, torchrun's teardown) is listed in
    ``pretrain.fail_fast``."""
    out = tmp_path / "run"
    t0 = time.monotonic()
    r = torchrun([*REF_ARGS, "--save-every", "2", "--timeout", "0.3", "--out", str(out)],
                 env={"URFM_FAULTS": "die@3,slowsave@2"}, timeout=120)
    elapsed = time.monotonic() - t0
    assert r.returncode != 0
    assert elapsed < 90, f"{elapsed:.0f}s: a dead rank was waited for"
    assert "[rank 0] error: a collective failed at step 4" in r.stderr, r.stderr[-3000:]
    assert "Another rank died or hung" in r.stderr and "--resume" in r.stderr
    # no partial checkpoint: no temporary folder, and a folder that was renamed is complete
    root = out / "checkpoints"
    names = sorted(p.name for p in root.iterdir())
    assert all(n.startswith("step_") and ckpt.validate(root / n) is None for n in names), names
    if names:  # the write finished before the failure (a very slow machine): then it is named
        assert f"the last complete checkpoint is {root / names[-1]}" in r.stderr
    else:
        assert "no checkpoint was completed yet" in r.stderr


@pytest.mark.slow
def test_fsdp_compile_and_activation_checkpointing_on_cpu(tmp_path_factory):
    """torchtitan's order (AC -> per-block compile -> fully_shard blocks -> root) runs on gloo/CPU
    with inductor, and computes the same thing as the eager run."""
    ref = losses(reference_run(tmp_path_factory))
    out = tmp_path_factory.mktemp("compile") / "run"
    args = [*REF_ARGS, "--steps", "3", "--compile", "--ac", "--shard", "grad", "--out", str(out)]
    args[args.index("--save-every") + 1] = "0"
    r = torchrun(args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "compile True | ac True" in r.stdout
    got = list(losses(out).values())
    # inductor fuses and reorders float ops: close, not bit-equal (steps 1-3 share warm-up and schedule
    # with the 8-step reference only through step 3's learning rate, which is the same: warm-up)
    np.testing.assert_allclose(got, list(ref.values())[:3], rtol=0, atol=1e-4)


def test_fsdp_bf16_mixed_precision_follows_the_fp32_curve(tmp_path_factory):
    # The GPU default (bf16 parameters in compute, fp32 reductions and master weights) run on CPU gloo:
    # the curve stays within bf16 rounding of the fp32 one, and the checkpoint holds fp32 weights.
    import torch

    ref = losses(reference_run(tmp_path_factory))
    out = tmp_path_factory.mktemp("bf16") / "run"
    r = torchrun([*REF_ARGS, "--dist", "fsdp", "--precision", "bf16", "--out", str(out)])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "| bf16 |" in r.stdout
    got = losses(out)
    np.testing.assert_allclose(list(got.values()), list(ref.values()), rtol=0, atol=2e-2)
    assert list(got.values()) != list(ref.values())  # bf16 really ran
    sd = torch.load(out / f"checkpoint-{STEPS:08d}.pth", weights_only=True)
    assert all(v.dtype == torch.float32 for v in sd["model"].values() if v.is_floating_point())
