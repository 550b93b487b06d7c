"""python -m urfm_fast.pretrain on one process: learning, the demo, checkpoint format, bad inputs.

Tiny shapes (ViT-tiny width, 2 blocks, 32-px images, a 64-wide 2-block decoder) with the real
BiomedCLIP architecture as a random teacher, so a run takes seconds on a 2-core CPU.
"""

import copy
import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import interpreter_only
from PIL import Image

from urfm_fast import URFM, URFMConfig, pretrain
from urfm_fast.data.dataset import DataError
from urfm_fast.train.schedule import lr_at

TINY = [
    "--model", "vit_tiny", "--depth", "2", "--img-size", "32", "--decoder-dim", "64", "--decoder-depth", "2",
    "--decoder-heads", "4", "--teacher", "random", "--num-workers", "0", "--warmup-steps", "3", "--lr", "1e-3",
]
SYNTH = ["--data", "synthetic", "--synthetic-images", "64"]  # one render chunk: cheap to generate
_TEACHERS = {}
_REAL_LOAD = None


@pytest.fixture(autouse=True)
def fast_random_teacher(monkeypatch):
    """In-process runs reuse one random BiomedCLIP instead of re-initialising 86M parameters each
    time. Honest: pretrain seeds the RNG before loading the teacher, so a fresh 'random' teacher has
    exactly these weights (checked below against a fresh build)."""
    from urfm_fast.model.teacher import BiomedCLIPTeacher

    global _REAL_LOAD
    real_load = _REAL_LOAD = _REAL_LOAD or BiomedCLIPTeacher.load.__func__

    def load(cls, source=None, target="tokens"):
        if str(source) != "random":
            return real_load(cls, source, target)
        key = (target, torch.initial_seed())
        if key not in _TEACHERS:
            _TEACHERS[key] = real_load(cls, "random", target)
        return copy.deepcopy(_TEACHERS[key])

    monkeypatch.setattr(BiomedCLIPTeacher, "load", classmethod(load))


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def run(args, env=None, cwd=None) -> subprocess.CompletedProcess:
    """The CLI in a subprocess, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "urfm_fast.pretrain", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=cwd, timeout=600)


def test_loss_goes_down(tmp_path):
    out = tmp_path / "run"
    rc = pretrain.main([*TINY, *SYNTH, "--batch-size", "8", "--steps", "30", "--log-every", "1", "--out", str(out)])
    assert rc == 0
    losses = [m["loss"] for m in metrics(out)]
    assert len(losses) == 30 and all(np.isfinite(losses))
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert last < 0.7 * first, (first, last)
    rec = metrics(out)[-1]
    for key in ("step", "loss", "lr", "images_per_s", "grad_norm", "peak_mem_gb"):
        assert key in rec
    # warm-up then cosine: peak after 3 steps, decaying to ~0 at the end
    lrs = [m["lr"] for m in metrics(out)]
    assert lrs[2] == pytest.approx(1e-3) and lrs[-1] < 1e-5 and lrs[0] < lrs[2]


def test_checkpoint_format(tmp_path):
    out = tmp_path / "run"
    assert pretrain.main([*TINY, *SYNTH, "--batch-size", "4", "--steps", "2", "--out", str(out)]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["kind"] == "urfm_fast.pretrain" and cfg["train"]["steps"] == 2 and cfg["model"]["depth"] == 2
    pth = out / "checkpoint-00000002.pth"
    obj = torch.load(pth, map_location="cpu", weights_only=True)  # no allow-list needed: args is a dict
    assert {"model", "ema_state_dict", "optimizer", "epoch", "step", "args"} <= set(obj)
    assert obj["step"] == 2 and isinstance(obj["args"], dict) and obj["args"]["batch_size"] == 4
    model = URFM(URFMConfig.from_dict(cfg["model"]))
    model.load_state_dict(obj["model"], strict=True)
    model.load_state_dict(obj["ema_state_dict"], strict=True)
    assert not torch.equal(obj["model"]["decoder_pred.weight"], obj["ema_state_dict"]["decoder_pred.weight"])
    # torch's AdamW layout (integer ids), loadable into a fresh optimizer
    opt = torch.optim.AdamW(model.param_groups(0.05), lr=1e-3, betas=(0.9, 0.95))
    opt.load_state_dict({k: v for k, v in obj["optimizer"].items() if k != "param_names"})
    assert opt.param_groups[0]["weight_decay"] == 0.05 and opt.param_groups[1]["weight_decay"] == 0.0
    # the resumable checkpoint is complete and the interop reader understands our .pth
    assert (out / "checkpoints" / "step_00000002" / "manifest.json").is_file()
    from urfm_fast.checkpoints.formats import load_checkpoint

    loaded = load_checkpoint(pth)
    assert loaded.config.depth == 2 and torch.equal(loaded.state_dict["cls_token"], obj["ema_state_dict"]["cls_token"])


def test_cli_demo(tmp_path):
    """The no-argument demo (with few steps) runs as a subprocess and says it is a demo first; with no
    BiomedCLIP in the (empty) Hugging Face cache it trains against EfficientNet-Lite0 and says so plainly."""
    r = run(["--steps", "3", "--batch-size", "4", "--synthetic-images", "64", "--out", str(tmp_path / "demo")],
            env={"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    assert lines[0].startswith("DEMO:")
    assert lines[2].startswith("Teacher: EfficientNet-Lite0 (ImageNet") and "not in the Hugging Face" in lines[2]
    assert "teacher: random" not in r.stdout.lower() and "meaningless" not in r.stdout.lower()
    assert "!!!" not in r.stdout and "WARNING" not in r.stdout  # no alarm for a meaningful teacher
    assert "teacher efficientnet_lite0" in r.stdout  # the run's summary line
    saved = json.loads((tmp_path / "demo" / "config.json").read_text())
    assert saved["train"]["teacher"] == saved["teacher_source"] == "efficientnet_lite0"
    assert saved["model"]["target_dim"] == 112  # Lite0's stride-16 channels: its targets, not a ViT's
    assert "Traceback" not in r.stderr
    pth = tmp_path / "demo" / "checkpoint-00000003.pth"
    assert pth.is_file()
    # it ends with the next three commands, on the real checkpoint; export and plot run as printed
    nxt = [shlex.split(line) for line in lines[-3:]]
    assert [c[:3] for c in nxt] == [["python", "-m", f"urfm_fast.{m}"] for m in ("export", "evaluate", "plot")]
    assert nxt[0][3] == str(pth) and nxt[1][4] == f"urfm={pth}" and nxt[2][3] == str(tmp_path / "demo")
    for cmd in (nxt[0], nxt[2]):
        done = subprocess.run([sys.executable, *cmd[1:]], capture_output=True, text=True, cwd=tmp_path, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "demo" / "export" / "model.safetensors").is_file() and (tmp_path / "demo" / "loss.png").is_file()


def _cache_biomedclip(hub: Path) -> None:
    """The layout huggingface_hub writes for BiomedCLIP (refs/main names a snapshot holding the file). The
    choice looks only for the file: loading it is test_teacher.py's test_hf_hub_id_uses_an_existing_cache."""
    repo = hub / "models--microsoft--BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "open_clip_pytorch_model.bin").write_bytes(b"weights")


def test_teacher_choice_order(tmp_path, monkeypatch, capsys):
    """Demo: BiomedCLIP where its weights are cached > EfficientNet-Lite0; random only when asked for. A real
    run (--data) without --teacher wants BiomedCLIP and stops without it: never a substitute."""
    import huggingface_hub.constants

    from urfm_fast.config import EFFICIENTNET_LITE0, HF_HUB_ID

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    i = TINY.index("--teacher")
    real = [*TINY[:i], *TINY[i + 2 :], *SYNTH, "--batch-size", "4", "--steps", "1"]  # no --teacher
    assert pretrain.parse_config([])[0].teacher == EFFICIENTNET_LITE0  # nothing cached
    assert pretrain.parse_config(["--teacher", "random"])[0].teacher == "random"
    assert pretrain.parse_config(real)[0].teacher == HF_HUB_ID
    assert pretrain.main([*real, "--out", str(tmp_path / "real")]) == 2
    err = capsys.readouterr().err
    assert "not in the Hugging Face cache" in err and "--teacher efficientnet_lite0" in err
    assert not (tmp_path / "real" / "checkpoint-00000001.pth").exists()

    _cache_biomedclip(tmp_path / "hub")
    assert pretrain.parse_config([])[0].teacher == HF_HUB_ID
    assert pretrain.parse_config(["--teacher", EFFICIENTNET_LITE0])[0].teacher == EFFICIENTNET_LITE0
    assert pretrain.parse_config(real)[0].teacher == HF_HUB_ID


def test_cached_random_teacher_is_the_fresh_one():
    from urfm_fast.model.teacher import BiomedCLIPTeacher

    torch.manual_seed(0)
    cached = BiomedCLIPTeacher.load("random")
    torch.manual_seed(0)
    fresh = _REAL_LOAD(BiomedCLIPTeacher, "random")
    for (k, a), b in zip(cached.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), k


def test_help_lists_every_flag():
    help_text = pretrain.build_parser().format_help()
    for flag in ("--model", "--img-size", "--batch-size", "--steps", "--epochs", "--lr", "--blr", "--mask-ratio",
                 "--teacher", "--data", "--out", "--seed", "--save-every", "--log-every", "--resume", "--init",
                 "--dist", "--shard", "--compile", "--ac", "--deterministic", "--micro-batch", "--mask-schedule",
                 "--mask-start", "--mask-ramp", "--mask-levels", "--target", "--augment", "--cache-targets"):
        assert flag in help_text
    # flags with a fixed set of values name them
    for values in ("vit_base,vit_huge,vit_large,vit_small,vit_tiny", "random,block,attention", "standard,prompting",
                   "masked,all,all_cls", "tokens,proj,pixels", "fsdp,ddp", "constant,linear,cosine", "crop,none"):
        assert "{" + values + "}" in help_text, values


def test_lr_schedule():
    lrs = [lr_at(s, 1.0, 0.1, 10, 110) for s in range(110)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.55, abs=1e-6)  # halfway through the cosine
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))


# -- bad inputs: one clear line, an exit code, no traceback ---------------------------------------


def test_missing_and_empty_data(tmp_path, capsys):
    assert pretrain.main([*TINY, "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "a")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert pretrain.main([*TINY, "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "b")]) == 2
    assert "no PNG/JPEG/BMP/TIFF images" in capsys.readouterr().err


def test_unreadable_images_are_skipped_and_counted(tmp_path, capsys):
    data = tmp_path / "imgs" / "nested"
    data.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(10):
        Image.fromarray(rng.integers(0, 255, (40, 48), dtype=np.uint8)).save(data / f"im{i}.png")
    (data / "broken.png").write_bytes(b"not a png")
    (data / "truncated.jpg").write_bytes(b"\xff\xd8\xff\xe0garbage")
    # 12 files, one epoch of 2 x 6: every file is met once
    rc = pretrain.main([*TINY, "--data", str(tmp_path / "imgs"), "--batch-size", "6", "--steps", "2",
                        "--out", str(tmp_path / "run")])
    assert rc == 0
    assert "unreadable images skipped: 2" in capsys.readouterr().out


def test_nan_steps_are_skipped_then_stop(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("URFM_FAULTS", "nan@1-2")
    out = tmp_path / "skip"
    assert pretrain.main([*TINY, *SYNTH, "--batch-size", "4", "--steps", "5", "--log-every", "1",
                          "--out", str(out)]) == 0
    assert "skipped NaN/Inf steps: 2" in capsys.readouterr().out
    assert [m["skipped"] for m in metrics(out)] == [0, 1, 2, 2, 2]
    assert all(np.isfinite(m["loss"]) for m in metrics(out) if m["step"] not in (2, 3))

    monkeypatch.setenv("URFM_FAULTS", "nan@3-100")
    rc = pretrain.main([*TINY, *SYNTH, "--batch-size", "4", "--steps", "20", "--save-every", "2",
                        "--max-bad-steps", "3", "--out", str(tmp_path / "stop")])
    err = capsys.readouterr().err
    assert rc == 1 and "3 consecutive steps with NaN/Inf" in err
    assert "step_00000002" in err  # names the last good checkpoint


def test_nan_steps_skipped_on_the_device(tmp_path, capsys, monkeypatch):
    """The device-side skip (the default on CUDA: no host sync per step), run on CPU: the same counts,
    log records and stop as the host-side check, and the same curve."""
    monkeypatch.setenv("URFM_FAULTS", "nan@1-2")
    args = [*TINY, *SYNTH, "--batch-size", "4", "--steps", "5", "--log-every", "1"]
    assert pretrain.main([*args, "--out", str(tmp_path / "host")]) == 0
    host_out = capsys.readouterr().out
    monkeypatch.setenv("URFM_FAULTS", "nan@1-2,device-skip")
    assert pretrain.main([*args, "--out", str(tmp_path / "dev")]) == 0
    dev_out = capsys.readouterr().out
    for line in ("skipped NaN/Inf steps: 2", "step 1: non-finite loss or gradients (grad norm nan); update skipped "
                 "(1 in a row, 1 in all)", "step 2: non-finite loss or gradients (grad norm nan); update skipped "
                 "(2 in a row, 2 in all)"):
        assert line in host_out and line in dev_out, line
    host, dev = metrics(tmp_path / "host"), metrics(tmp_path / "dev")
    assert [m["skipped"] for m in dev] == [m["skipped"] for m in host] == [0, 1, 2, 2, 2]
    # fused AdamW (device path) and foreach AdamW (host path) round differently, nothing more
    np.testing.assert_allclose([m["loss"] for m in dev], [m["loss"] for m in host], rtol=0, atol=1e-5)
    np.testing.assert_allclose([m["grad_norm"] for m in dev], [m["grad_norm"] for m in host], rtol=1e-4)

    # a streak stops at the same step, with the same message; log steps are not the only reads
    monkeypatch.setenv("URFM_FAULTS", "nan@3-100,device-skip")
    rc = pretrain.main([*TINY, *SYNTH, "--batch-size", "4", "--steps", "20", "--save-every", "2", "--log-every", "7",
                        "--max-bad-steps", "3", "--out", str(tmp_path / "stop")])
    err = capsys.readouterr().err
    assert rc == 1 and "stopping: 3 consecutive steps with NaN/Inf loss or gradients (step 6)" in err
    assert "step_00000002" in err


def test_device_side_skip_leaves_state_unchanged():
    """A skipped step on the device path: parameters, AdamW state (moments and step counts) and EMA are
    bit-identical afterwards; a good step then updates as usual."""
    from urfm_fast.train.ema import EMA

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    ema = EMA(model, 0.9)

    def step(bad_value: float):
        loss = model(torch.randn(3, 4)).square().mean() * bad_value
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        bad = ~torch.isfinite(norm)
        opt.found_inf = bad.to(torch.float32)
        opt.step()
        ema.update(model, skip=bad)
        opt.zero_grad(set_to_none=True)

    def snapshot():
        return ([p.detach().clone() for p in model.parameters()],
                {k: v.clone() for st in opt.state.values() for k, v in st.items()},
                [s.clone() for s in ema.shadow])

    step(1.0)
    before = snapshot()
    opt_before = copy.deepcopy(opt.state_dict()["state"])
    step(float("nan"))
    step(float("inf"))
    after = snapshot()
    for a, b in zip(before[0] + before[2], after[0] + after[2]):
        assert torch.equal(a, b)
    opt_after = opt.state_dict()["state"]
    for i, st in opt_before.items():
        for k, v in st.items():
            assert torch.equal(v, opt_after[i][k]), (i, k)
    assert all(int(st["step"]) == 1 for st in opt_after.values())
    step(1.0)
    assert all(int(st["step"]) == 2 for st in opt.state_dict()["state"].values())
    assert not torch.equal(before[0][0], next(model.parameters()))
    assert not torch.equal(before[2][0], ema.shadow[0])


def test_no_clipping_only_computes_the_norm(tmp_path, capsys):
    """--clip-grad 0 logs the same norm and trains the same as a clip that never bites; the first step is
    timed apart from the throughput windows."""
    args = [*TINY, *SYNTH, "--batch-size", "4", "--steps", "3", "--log-every", "1"]
    assert pretrain.main([*args, "--clip-grad", "0", "--out", str(tmp_path / "none")]) == 0
    assert "first step (compile, autotuning, data start-up)" in capsys.readouterr().out
    assert pretrain.main([*args, "--clip-grad", "1e9", "--out", str(tmp_path / "huge")]) == 0
    none, huge = metrics(tmp_path / "none"), metrics(tmp_path / "huge")
    assert [(m["loss"], m["grad_norm"]) for m in none] == [(m["loss"], m["grad_norm"]) for m in huge]
    assert all(np.isfinite(m["grad_norm"]) and m["images_per_s"] > 0 for m in none)


def test_out_folder_is_never_overwritten(tmp_path, capsys):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("precious")
    assert pretrain.main([*TINY, *SYNTH, "--steps", "1", "--batch-size", "4", "--out", str(user)]) == 2
    assert "not a urfm_fast run folder" in capsys.readouterr().err
    assert pretrain.main([*TINY, *SYNTH, "--steps", "1", "--batch-size", "4", "--out", str(user), "--resume"]) == 2
    assert (user / "notes.txt").read_text() == "precious" and sorted(os.listdir(user)) == ["notes.txt"]

    run_dir = tmp_path / "run"
    assert pretrain.main([*TINY, *SYNTH, "--steps", "1", "--batch-size", "4", "--out", str(run_dir)]) == 0
    capsys.readouterr()
    assert pretrain.main([*TINY, *SYNTH, "--steps", "1", "--batch-size", "4", "--out", str(run_dir)]) == 2
    assert "pass --resume" in capsys.readouterr().err


def test_real_run_without_teacher_weights_stops(tmp_path, capsys):
    args = list(TINY)
    args[args.index("--teacher") + 1] = str(tmp_path / "no_such_open_clip_pytorch_model.bin")
    assert pretrain.main([*args, *SYNTH, "--batch-size", "4", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "--teacher PATH" in err and "--teacher random" in err


def test_init_loads_weights_only(tmp_path):
    """--init continues pretraining from a checkpoint's weights (EMA preferred), fresh optimizer and step."""
    a, b = tmp_path / "a", tmp_path / "b"
    assert pretrain.main([*TINY, *SYNTH, "--batch-size", "4", "--steps", "2", "--out", str(a)]) == 0
    # lr 0: AdamW leaves the weights as loaded, so b's result is exactly what --init read
    assert pretrain.main([*TINY, *SYNTH, "--batch-size", "4", "--steps", "1", "--lr", "0", "--ema-decay", "0",
                          "--init", str(a / "checkpoint-00000002.pth"), "--out", str(b)]) == 0
    src = torch.load(a / "checkpoint-00000002.pth", weights_only=True)["ema_state_dict"]
    got = torch.load(b / "checkpoint-00000001.pth", weights_only=True)
    assert got["step"] == 1
    for k, v in src.items():
        assert torch.equal(got["model"][k], v), k


@interpreter_only  # a 1 % error is within bf16's bound on a GPU
def test_a_kernel_failing_its_start_up_check_runs_on_torch(tmp_path, monkeypatch, capsys):
    # What a GPU run does before compiling: every kernel is checked at the run's shapes; a wrong one
    # (here attention, 1 % off) is switched to torch and the run trains on correct numbers.
    from urfm_fast.kernels import attention as A
    from urfm_fast.model import ops

    real = A.attention
    monkeypatch.setattr(A, "attention", lambda q, k, v: real(q, k, v) * 1.01)
    try:
        with ops.use_backend("triton"):  # the Triton interpreter on this CPU
            rc = pretrain.main([*TINY, *SYNTH, "--batch-size", "4", "--steps", "2", "--out", str(tmp_path / "r")])
        assert rc == 0
        assert "attention failed the start-up check and run on torch" in capsys.readouterr().out
        assert ops._disabled == {"attention"}
    finally:
        ops.enable_triton()


def test_short_demo_exports_trained_weights_and_resume_restores_the_count(tmp_path, capsys):
    """60 steps: load_backbone and export return the trained weights (the live ones; the warmed EMA is
    close to them too), never the initial ones; the EMA count survives a resume (.pth and DCP)."""
    from safetensors.torch import load_file

    from urfm_fast import load_backbone
    from urfm_fast.checkpoints.formats import load_checkpoint
    from urfm_fast.export import main as export_main

    out = tmp_path / "run"
    assert pretrain.main([*TINY, *SYNTH, "--batch-size", "4", "--steps", "60", "--out", str(out)]) == 0
    pth = out / "checkpoint-00000060.pth"
    obj = torch.load(pth, map_location="cpu", weights_only=True)
    assert obj["ema_updates"] == 60 and obj["trainer"]["ema_updates"] == 60
    cfg = URFMConfig.from_dict(json.loads((out / "config.json").read_text())["model"])
    torch.manual_seed(0)
    init = URFM(cfg).state_dict()
    key = "blocks.0.attn.qkv.weight"
    trained, start, ema = obj["model"][key], init[key], obj["ema_state_dict"][key]
    assert not torch.equal(trained, start)
    # warm-up: the EMA is near the trained weights, not 99.4 % the initial ones
    assert (ema - trained).norm() < 0.25 * (start - trained).norm()

    capsys.readouterr()
    model = load_backbone(pth)
    assert "live weights" in capsys.readouterr().out  # it says which weights it took
    assert torch.equal(model.state_dict()[key], trained)
    assert export_main([str(pth), "--out", str(tmp_path / "export")]) == 0
    assert "auto: live weights" in capsys.readouterr().out
    assert torch.equal(load_file(str(tmp_path / "export" / "model.safetensors"))[key], trained)
    dcp = load_checkpoint(out / "checkpoints" / "step_00000060", weights="auto")
    assert dcp.meta["weights"] == "model" and "60 updates" in dcp.meta["weights_reason"]

    for resume, run_dir in ((str(pth), tmp_path / "from_pth"), ("latest", out)):  # .pth, then the DCP folder
        args = [*TINY, *SYNTH, "--batch-size", "4", "--steps", "62", "--out", str(run_dir), "--resume", resume]
        assert pretrain.main(args) == 0
        final = torch.load(run_dir / "checkpoint-00000062.pth", map_location="cpu", weights_only=True)
        assert final["ema_updates"] == 62


def test_run_plan_resolves_the_derived_values_once():
    """Micro-batch, accumulation, lr and the schedule come from one frozen plan; the flags stay as given."""
    import dataclasses

    from urfm_fast.train.distributed import Dist
    from urfm_fast.train.plan import build_plan

    cfg, _, demo = pretrain.parse_config(["--data", "synthetic", "--model", "vit_tiny", "--batch-size", "16",
                                          "--micro-batch", "2", "--blr", "1e-3", "--out", "somewhere",
                                          "--epochs", "2", "--warmup-epochs", "0.5", "--device", "cpu"])
    plan = build_plan(cfg, demo, Dist(world=2))
    assert (plan.micro_batch, plan.accumulation, plan.mode, plan.bf16, plan.compile) == (2, 4, "single", False, False)
    assert plan.lr == pytest.approx(1e-3 * 16 / 256) and plan.shard == "grad"
    plan = plan.with_data(batches_per_epoch=20, num_images=80)  # 20 micro-batches of 2 per rank: 5 steps
    assert (plan.steps_per_epoch, plan.total_steps, plan.warmup_steps) == (5, 10, 2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.lr = 1.0
    saved = plan.run_config(URFMConfig.preset("vit_tiny"), "random")
    assert saved["train"] == dataclasses.asdict(cfg) and saved["accumulation"] == 4 and saved["total_steps"] == 10
    with pytest.raises(DataError, match="6 images are fewer than one global batch of 16: pass a smaller --batch-size"):
        plan.with_data(batches_per_epoch=3, num_images=6)


def test_a_warmup_longer_than_the_run_is_shortened_with_a_warning(tmp_path, capsys):
    """From --warmup-epochs (the recipe's 40 on a short --steps run) or --warmup-steps: a tenth of the run,
    said in one line naming both numbers and the flag to set; the learning rate then reaches its peak."""
    no_warmup = [a for a in TINY if a not in ("--warmup-steps", "3")]
    out = tmp_path / "epochs"
    assert pretrain.main([*no_warmup, *SYNTH, "--batch-size", "8", "--steps", "20", "--log-every", "1",
                          "--out", str(out)]) == 0
    err = capsys.readouterr().err
    line = "warning: the warm-up (320 steps, --warmup-epochs 40 of 8 steps) is longer than the run (20 steps)"
    assert line in err and "shortened to 2 steps" in err and "--warmup-steps" in err
    lrs = [m["lr"] for m in metrics(out)]
    assert lrs[1] == pytest.approx(1e-3) and lrs[0] == pytest.approx(5e-4)
    assert pretrain.main([*TINY, *SYNTH, "--batch-size", "8", "--steps", "2", "--warmup-steps", "30",
                          "--out", str(tmp_path / "steps")]) == 0
    err = capsys.readouterr().err
    assert "the warm-up (30 steps, --warmup-steps 30) is longer than the run (2 steps): shortened to 0" in err
    assert pretrain.main([*TINY, *SYNTH, "--batch-size", "8", "--steps", "3", "--out", str(tmp_path / "ok")]) == 0
    assert "warm-up" not in capsys.readouterr().err


def test_the_header_says_how_much_disk_the_checkpoints_take(tmp_path, capsys):
    """ViT-B's model, EMA and AdamW moments are ~2.3 GB a checkpoint: a run says so when the total passes 1 GB."""
    from urfm_fast.train.distributed import Dist
    from urfm_fast.train.plan import build_plan
    from urfm_fast.train.trainer import checkpoint_disk

    cfg, _, demo = pretrain.parse_config(["--data", "synthetic", "--steps", "5", "--device", "cpu", "--out", "x"])
    plan = build_plan(cfg, demo, Dist(world=1)).with_data(batches_per_epoch=32, num_images=8192)
    n = 143_000_000  # ViT-B + the 768d8b decoder, about
    disk, why = checkpoint_disk(plan, n, n)
    assert disk == pytest.approx(2 * 16 * n)  # the final resumable checkpoint and the final .pth
    assert why.startswith("1 resumable (--keep 3, --save-every 1000) and 1 .pth (--pth-every 0) of 2.3 GB each")
    cfg, _, demo = pretrain.parse_config(["--data", "synthetic", "--steps", "10000", "--keep", "0", "--pth-every",
                                          "5000", "--device", "cpu", "--out", "x"])
    plan = build_plan(cfg, demo, Dist(world=1)).with_data(batches_per_epoch=32, num_images=8192)
    assert checkpoint_disk(plan, n, n)[0] == pytest.approx((10 + 2) * 16 * n)
    assert pretrain.main([*TINY, *SYNTH, "--batch-size", "8", "--steps", "1", "--out", str(tmp_path / "r")]) == 0
    assert "disk:" not in capsys.readouterr().out  # a tiny run: no line


def test_a_folder_without_a_readable_image_is_refused_before_the_run_folder(tmp_path, capsys):
    data = tmp_path / "not images"
    data.mkdir()
    for i in range(40):
        (data / f"scan{i}.png").write_bytes(b"this is not a png")
    out = tmp_path / "run"
    rc = pretrain.main([*TINY, "--data", str(data), "--batch-size", "1", "--num-workers", "2", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "none of the first 32 of its 40 image files could be read" in err and "scan0.png" in err
    assert not out.exists()


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads the process table from /proc")
def test_ctrl_c_is_one_line_and_exit_130_without_stray_workers(tmp_path):
    """Ctrl-C reaches the whole process group (the DataLoader workers too), as in a terminal."""
    out = tmp_path / "run"
    err_file = tmp_path / "stderr"
    with err_file.open("w") as err:
        p = subprocess.Popen([sys.executable, "-m", "urfm_fast.pretrain", *TINY, *SYNTH, "--num-workers", "2",
                              "--batch-size", "4", "--steps", "100000", "--log-every", "1", "--save-every", "3",
                              "--out", str(out)], stdout=subprocess.PIPE, stderr=err, text=True,
                             start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            for line in p.stdout:
                if line.startswith("step") and "/100000" in line and int(line.split()[1].split("/")[0]) >= 8:
                    break
            workers = _children(p.pid)
            os.killpg(p.pid, signal.SIGINT)
            p.communicate(timeout=120)
            rc = p.returncode
        finally:
            if p.poll() is None:
                p.kill()
    lines = [x for x in err_file.read_text().splitlines() if not x.startswith("urfm_fast kernels backend:")]
    text = "\n".join(lines).strip()
    assert rc == 130, text[-2000:]
    assert "Traceback" not in text and len(text.splitlines()) == 1, text[-2000:]
    assert text.startswith("interrupted at step ") and "the last complete checkpoint is" in text, text
    assert text.endswith(f"continue with: python -m urfm_fast.pretrain --out {out} --resume"), text
    assert workers and not any(_alive(w) for w in workers)
    assert pretrain.main(["--out", str(out), "--resume", "--steps", "12"]) == 0  # the command it printed, shorter


def test_resume_from_another_models_run_names_the_folder_it_looked_in(tmp_path, capsys):
    a, b = tmp_path / "model_a", tmp_path / "model_b"
    assert pretrain.main([*TINY, *SYNTH, "--batch-size", "4", "--steps", "2", "--out", str(a)]) == 0
    capsys.readouterr()
    assert pretrain.main([*TINY, *SYNTH, "--depth", "3", "--batch-size", "4", "--steps", "3", "--out", str(b),
                          "--resume", str(a)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err)
    assert f"none of the 1 checkpoint(s) in {a} is usable" in err[-1] and str(b) not in err[-1], err


def test_milan_recipe_runs_and_is_saved_then_checked_on_resume(tmp_path, capsys):
    """--mask-type attention --decoder prompting --loss-on all_cls trains (deterministic masks: the noise
    path), lands in config.json and the .pth args, reloads; a config.json edited to an unknown value is refused."""
    from urfm_fast.checkpoints.formats import load_checkpoint

    out = tmp_path / "run"
    milan = ["--mask-type", "attention", "--decoder", "prompting", "--loss-on", "all_cls"]
    assert pretrain.main([*TINY, *SYNTH, *milan, "--deterministic", "--batch-size", "4", "--steps", "2",
                          "--log-every", "1", "--out", str(out)]) == 0
    assert all(np.isfinite(m["loss"]) for m in metrics(out))
    run_cfg = json.loads((out / "config.json").read_text())
    for where in (run_cfg["train"], run_cfg["model"]):
        assert (where["mask_type"], where["decoder"], where["loss_on"]) == ("attention", "prompting", "all_cls")
    c = load_checkpoint(out / "checkpoint-00000002.pth").config
    assert (c.mask_type, c.decoder, c.loss_on) == ("attention", "prompting", "all_cls")
    run_cfg["train"]["decoder"] = "cross"
    (out / "config.json").write_text(json.dumps(run_cfg))
    capsys.readouterr()
    assert pretrain.main(["--resume", "--out", str(out), "--steps", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--decoder cross" in err and len(err.splitlines()) == 1, err


def test_an_error_re_raised_from_a_loader_worker_is_its_own_last_line():
    text = ("Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
            '  File "x.py", line 1, in f\nurfm_fast.data.stream.DataError: 32 unreadable images in a row under d')
    assert pretrain._one_line(DataError(text)) == "32 unreadable images in a row under d"
    assert pretrain._one_line(DataError("one line\nmore")) == "one line"
