"""Exact resume on one process: a run stopped by SIGTERM, or resumed past a corrupt checkpoint,
follows the uninterrupted run's loss curve step for step; the tiny CPU curve matches the golden file.

Faults are injected with the test hook ``URFM_FAULTS`` (see ``train/faults.py``): the real
signal handler and checkpoint code run, only the moment is chosen by the test.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from test_pretrain import SYNTH, TINY, fast_random_teacher, metrics, run  # noqa: F401 (autouse fixture)

from urfm_fast import pretrain
from urfm_fast.checkpoints import runs as ckpt

GOLDEN = Path(__file__).parent / "golden" / "pretrain_tiny_cpu.json"
STEPS = 8
# --deterministic: per-sample crops and masks from (seed, epoch, index), so the curve is also
# independent of the number of ranks (tests/test_distributed.py reuses this run).
REF_ARGS = [*TINY, *SYNTH, "--batch-size", "8", "--steps", str(STEPS),
            "--log-every", "1", "--save-every", "4", "--keep", "5", "--deterministic"]


def reference_run(tmp_path_factory) -> Path:
    """The uninterrupted run, computed once per test session and shared by the resume tests."""
    out = tmp_path_factory.getbasetemp() / "reference_run"
    if not (out / "checkpoint-00000008.pth").exists():
        shutil.rmtree(out, ignore_errors=True)
        assert pretrain.main([*REF_ARGS, "--out", str(out)]) == 0
    return out


def losses(out: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in metrics(out)}


def test_golden_curve(tmp_path_factory):
    """torchtitan-style: the whole tiny-config curve is compared with a committed file.

    A change detector, not a proof of correctness: the file holds whatever the code computed when it was
    made. It catches an unintended change of the recipe, data order or numerics; whether the numbers are
    right is for the tests against references (kernels, model, teacher, masking, loss)."""
    ref = losses(reference_run(tmp_path_factory))
    golden = json.loads(GOLDEN.read_text())
    assert golden["args"] == REF_ARGS, "the golden file was made with other flags: regenerate it"
    assert [int(s) for s in golden["loss"]] == list(ref)
    # fp32 on CPU; the tolerance allows other CPUs' SIMD summation orders, not a changed recipe
    np.testing.assert_allclose(list(ref.values()), list(golden["loss"].values()), rtol=2e-3, atol=2e-4)


def test_sigterm_then_resume_follows_the_same_curve(tmp_path_factory, monkeypatch, capsys):
    ref = losses(reference_run(tmp_path_factory))
    out = tmp_path_factory.mktemp("killed") / "run"
    monkeypatch.setenv("URFM_FAULTS", "sigterm@2")  # preemption notice during step 3
    assert pretrain.main([*REF_ARGS, "--pth-every", "2", "--out", str(out)]) == 0  # exit 0 with a message
    printed = capsys.readouterr().out
    assert "stopped by SIGTERM: step 3/8" in printed and "--resume" in printed
    assert [p.name for _, p in ckpt.list_checkpoints(out)] == ["step_00000003"]
    # URFM-format .pth: every --pth-every steps, and on preemption too
    assert sorted(p.name for p in out.glob("*.pth")) == ["checkpoint-00000002.pth", "checkpoint-00000003.pth"]
    assert f"URFM-format checkpoint: {out / 'checkpoint-00000003.pth'}" in printed
    monkeypatch.delenv("URFM_FAULTS")
    assert pretrain.main(["--out", str(out), "--resume"]) == 0  # settings come from the run folder
    assert "resumed from" in capsys.readouterr().out
    got = losses(out)
    assert list(got) == list(range(1, STEPS + 1))  # no duplicated or missing records
    np.testing.assert_allclose(list(got.values()), list(ref.values()), rtol=0, atol=1e-6)


def test_sigterm_resume_without_deterministic(tmp_path, monkeypatch):
    """Exactness also holds for the default (generator-driven) randomness: RNG states are restored."""
    args = [a for a in REF_ARGS if a != "--deterministic"]
    args[args.index("--steps") + 1] = "6"
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert pretrain.main([*args, "--out", str(full)]) == 0
    monkeypatch.setenv("URFM_FAULTS", "sigterm@2")
    assert pretrain.main([*args, "--out", str(cut)]) == 0
    monkeypatch.delenv("URFM_FAULTS")
    assert pretrain.main(["--out", str(cut), "--resume"]) == 0
    np.testing.assert_allclose(list(losses(cut).values()), list(losses(full).values()), rtol=0, atol=1e-6)


def test_corrupt_or_partial_checkpoint_falls_back(tmp_path_factory, capsys):
    ref_dir = reference_run(tmp_path_factory)
    ref = losses(ref_dir)
    out = tmp_path_factory.mktemp("corrupt") / "run"
    shutil.copytree(ref_dir, out)
    (out / "checkpoint-00000008.pth").unlink()
    # the newest checkpoint lost half of a shard file (a crash during a copy, a full disk) ...
    shard = next((out / "checkpoints" / "step_00000008").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    # ... and a save that was killed half-way left a temporary folder behind
    (out / "checkpoints" / ".tmp-step_00000012").mkdir()
    assert pretrain.main(["--out", str(out), "--resume"]) == 0
    printed = capsys.readouterr().out
    assert "step_00000008 is incomplete or corrupt" in printed
    assert "resumed from" in printed and "step_00000004 at step 4" in printed
    got = losses(out)
    assert list(got) == list(range(1, STEPS + 1))
    np.testing.assert_allclose(list(got.values()), list(ref.values()), rtol=0, atol=1e-6)


def test_async_save_trains_while_writing_and_preemption_waits(tmp_path_factory, monkeypatch, capsys):
    """The step-4 checkpoint is written in the background (slowed by 2 s): step 5 trains meanwhile, the
    SIGTERM after step 5 waits for it before the final save, and resuming from it is exact, so the
    state was copied when the save began, not when the write happened."""
    ref = losses(reference_run(tmp_path_factory))
    out = tmp_path_factory.mktemp("async") / "run"
    monkeypatch.setenv("URFM_FAULTS", "slowsave@4,sigterm@4")
    assert pretrain.main([*REF_ARGS, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "checkpoint step_00000004 complete (written in the background while 1 step(s) trained; " \
           "waited for the rest)" in printed
    assert printed.index("step_00000004 complete") < printed.index("stopped by SIGTERM: step 5/8")
    assert [p.name for _, p in ckpt.list_checkpoints(out)] == ["step_00000004", "step_00000005"]
    assert all(ckpt.validate(p) is None for _, p in ckpt.list_checkpoints(out))
    monkeypatch.delenv("URFM_FAULTS")
    shutil.rmtree(out / "checkpoints" / "step_00000005")
    assert pretrain.main(["--out", str(out), "--resume"]) == 0
    assert "step_00000004 at step 4" in capsys.readouterr().out
    np.testing.assert_allclose(list(losses(out).values()), list(ref.values()), rtol=0, atol=1e-6)


def test_killed_during_async_save_leaves_no_renamed_partial(tmp_path_factory, capsys):
    """The process dies (``os._exit``, as under kill -9) while step 4's checkpoint is still being
    written (slowed by 60 s, so no machine load lets it finish first): only its temporary folder exists,
    the run resumes from step 2 and follows the curve."""
    ref = losses(reference_run(tmp_path_factory))
    out = tmp_path_factory.mktemp("killed_async") / "run"
    r = run([*REF_ARGS, "--save-every", "2", "--out", str(out)],
            env={"URFM_FAULTS": "slowsave@4,die@5", "URFM_SLOWSAVE_S": "60"})
    assert r.returncode == 1, r.stderr[-3000:]
    assert max(losses(out)) == 5  # step 5 trained while the step-4 write was pending
    root = out / "checkpoints"
    assert (root / ".tmp-step_00000004").is_dir() and not (root / "step_00000004").exists()
    assert [p.name for _, p in ckpt.list_checkpoints(out)] == ["step_00000002"]
    assert ckpt.validate(root / "step_00000002") is None
    assert pretrain.main(["--out", str(out), "--resume"]) == 0
    assert "step_00000002 at step 2" in capsys.readouterr().out
    assert not (root / ".tmp-step_00000004").exists()
    np.testing.assert_allclose(list(losses(out).values()), list(ref.values()), rtol=0, atol=1e-6)


def test_resume_from_pth(tmp_path_factory, capsys):
    """The URFM-format .pth carries the trainer state too, so it also resumes exactly."""
    ref_dir = reference_run(tmp_path_factory)
    out = tmp_path_factory.mktemp("frompth") / "run"
    assert pretrain.main([*REF_ARGS, "--steps", "4", "--save-every", "0", "--out", str(out)]) == 0
    shutil.rmtree(out / "checkpoints")
    assert pretrain.main(["--out", str(out), "--resume", str(out / "checkpoint-00000004.pth"), "--steps", "8"]) == 0
    assert "resumed from" in capsys.readouterr().out
    np.testing.assert_allclose(list(losses(out).values()), list(losses(ref_dir).values()), rtol=0, atol=1e-6)


@pytest.mark.parametrize("bad", ["missing"])
def test_resume_path_errors(tmp_path, capsys, bad):
    assert pretrain.main(["--out", str(tmp_path / "x"), "--resume", str(tmp_path / "nowhere")]) == 2
    assert "no such checkpoint" in capsys.readouterr().err
