"""Every flag of every CLI, driven with wrong types, ranges and paths: a value is either accepted (and
then the run can be built from it) or refused in one line with exit status 2, never a traceback.

Property-based (hypothesis) over the parsers and their checks, in process, so hundreds of values take
seconds; a few subprocess runs prove what a user sees (exit 2, one line on stderr, no traceback).
"""

import dataclasses
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from urfm_fast import URFMConfig, evaluate, pretrain  # noqa: E402
from urfm_fast import prepare as P  # noqa: E402
from urfm_fast.cli_checks import FlagError  # noqa: E402
from urfm_fast.config import visible_count  # noqa: E402
from urfm_fast.data import convert, sources  # noqa: E402
from urfm_fast.eval import run as eval_run  # noqa: E402
from urfm_fast.eval.config import parse_config  # noqa: E402
from urfm_fast.eval.data import Split, check_classes  # noqa: E402
from urfm_fast.eval.report import json_safe  # noqa: E402
from urfm_fast.train.config import TrainConfig  # noqa: E402
from urfm_fast.train.schedule import lr_at, mask_ratio_at  # noqa: E402

SPECIAL = ["0", "-1", "-5", "1", "1.0", "0.5", "nan", "inf", "-inf", "1e309", "", " ", "x", "1,2", "9" * 30,
           "/nonexistent/path", ".", "/dev/null", "synthetic", "latest", "random", "\x00", "-0.1", "1e-300",
           "\n", "0\n1", "cuda\r"]
VALUES = st.one_of(
    st.sampled_from(SPECIAL),
    st.integers(-(2**70), 2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text(max_size=8),
)
FAST = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(autouse=True, scope="module")
def _in_a_scratch_folder(tmp_path_factory):
    """Relative paths the strategies invent (--out 0, --data x) resolve in a scratch folder."""
    old = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("cwd"))
    yield
    os.chdir(old)


def _flags(parser):
    """(option string, takes a value?) of every optional flag of an argparse parser, --help excluded."""
    out = []
    for action in parser._actions:
        opts = [o for o in action.option_strings if o.startswith("--") and o != "--help"]
        if opts:
            out.append((opts[0], action.nargs != 0))
    return out


def _argv(pairs, flags):
    argv = []
    for (name, takes), value in pairs:
        argv += [name, value] if takes else [name]
    return argv


def _refused_in_one_line(capsys, code=None) -> None:
    err = capsys.readouterr().err
    assert code in (None, 2), code
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 1, err


PRETRAIN_FLAGS = _flags(pretrain.build_parser())


@pytest.mark.parametrize("argv", [["--device", "cuda\nrm"], ["--config", "0\n"], ["--model", "\n"]])
def test_a_value_with_a_newline_is_refused_in_one_line(capsys, argv):
    try:
        pretrain.parse_config(argv)
    except SystemExit as e:
        return _refused_in_one_line(capsys, e.code)
    except FlagError as e:
        assert "\n" not in str(e) and "\\n" in str(e)
        return
    raise AssertionError("accepted")


@FAST
@given(st.lists(st.tuples(st.sampled_from(PRETRAIN_FLAGS), VALUES), min_size=1, max_size=4))
def test_pretrain_any_value_is_accepted_or_refused_in_one_line(capsys, tmp_path_factory, pairs):
    argv = _argv(pairs, PRETRAIN_FLAGS)
    if not any(f == "--out" for (f, _), _ in pairs):
        argv += ["--out", str(tmp_path_factory.getbasetemp() / "never_created")]
    try:
        cfg, _, _ = pretrain.parse_config(argv)
    except SystemExit as e:
        return _refused_in_one_line(capsys, e.code)
    except FlagError as e:
        assert "\n" not in str(e) and str(e).startswith("--")
        return
    # accepted: every derived quantity is well-defined, so the run can be built from it
    model_cfg = URFMConfig.preset(cfg.model, img_size=cfg.img_size, mask_ratio=cfg.mask_ratio,
                                  mask_type=cfg.mask_type, decoder_embed_dim=cfg.decoder_dim,
                                  decoder_depth=cfg.decoder_depth, decoder_num_heads=cfg.decoder_heads,
                                  **({"depth": cfg.depth} if cfg.depth else {}))
    assert 1 <= model_cfg.num_visible <= model_cfg.num_patches
    assert cfg.batch_size >= 1 and cfg.log_every >= 1
    assert cfg.micro_batch == 0 or cfg.batch_size % cfg.micro_batch == 0
    base = cfg.lr if cfg.lr is not None else cfg.blr * cfg.batch_size / 256
    total = cfg.steps or cfg.epochs * 10
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else round(cfg.warmup_epochs * 10)
    assert total >= 1 and warmup >= 0
    for step in (0, warmup // 2, warmup, total - 1):
        assert math.isfinite(lr_at(step, base, cfg.min_lr, warmup, total))
    for step in (0, total // 2, total - 1):  # every ratio of the mask schedule is a valid visible count
        assert 1 <= visible_count(model_cfg.num_patches, mask_ratio_at(
            step, total, cfg.mask_ratio, cfg.mask_schedule, cfg.mask_start, cfg.mask_ramp, cfg.mask_levels)) \
            <= model_cfg.num_patches


@pytest.mark.parametrize("argv, needle", [
    (["--batch-size", "0"], "--batch-size 0: must be an integer in [1, "),
    (["--batch-size", "-4"], "--batch-size -4"),
    (["--mask-ratio", "1.0"], "--mask-ratio 1.0: must be a finite number in [0, 1)"),
    (["--mask-start", "1"], "--mask-start 1.0: must be a finite number in [0, 1)"),
    (["--mask-ramp", "0"], "--mask-ramp 0.0: must be a finite number in (0, 1]"),
    (["--mask-levels", "0"], "--mask-levels 0: must be an integer in [1, 1024]"),
    (["--decoder", "prompting", "--mask-ratio", "0"], "--decoder prompting: updates only mask tokens"),
    (["--decoder", "prompting", "--mask-schedule", "linear"], "--decoder prompting: updates only mask tokens"),
    (["--target", "pixels", "--loss-on", "all_cls"], "--target pixels: has no teacher CLS"),
    (["--mask-ratio", "-0.1"], "--mask-ratio -0.1"),
    (["--img-size", "50"], "--img-size 50: must be a multiple of the patch size 16"),
    (["--lr", "nan"], "--lr nan: must be a finite number"),
    (["--warmup-steps", "-5"], "--warmup-steps -5"),
    (["--steps", "-1"], "--steps -1"),
    (["--micro-batch", "-1"], "--micro-batch -1"),
    (["--depth", "-1"], "--depth -1"),
    (["--log-every", "0"], "--log-every 0"),
    (["--decoder-heads", "0"], "--decoder-heads 0"),
    (["--decoder-heads", "5"], "--decoder-heads 5: must divide --decoder-dim"),
    (["--data", "/nonexistent/x"], "--data /nonexistent/x: does not exist"),
    (["--init", "/nonexistent/x"], "--init /nonexistent/x: does not exist"),
    (["--out", "/dev/null"], "--out /dev/null: exists and is not a folder"),
])
def test_pretrain_attacks_of_the_issue_are_refused(argv, needle):
    with pytest.raises(FlagError) as e:
        pretrain.parse_config(argv)
    assert needle in str(e.value)


def test_a_warmup_longer_than_the_run_is_shortened_and_said():
    from urfm_fast.train.plan import resolve_warmup

    cfg, _, _ = pretrain.parse_config(["--steps", "10", "--warmup-steps", "20"])
    n, note = resolve_warmup(cfg, steps_per_epoch=4, total=10)
    assert n == 1 and "warning: the warm-up (20 steps, --warmup-steps 20) is longer than the run (10 steps)" in note
    cfg, _, _ = pretrain.parse_config(["--steps", "10", "--warmup-steps", "10"])
    assert resolve_warmup(cfg, steps_per_epoch=4, total=10) == (10, None)


EVAL_PARSER = evaluate.build_parser()
EVAL_FLAGS = [f for f in _flags(EVAL_PARSER) if f[0] not in ("--backbone", "--data")]


@FAST
@given(st.lists(st.tuples(st.sampled_from(EVAL_FLAGS), VALUES), min_size=1, max_size=3))
def test_evaluate_any_value_is_accepted_or_refused_in_one_line(capsys, tmp_path_factory, pairs):
    argv = ["--backbone", "random", "--data", "synthetic", *_argv(pairs, EVAL_FLAGS)]
    if not any(f == "--out" for (f, _), _ in pairs):
        argv += ["--out", str(tmp_path_factory.getbasetemp() / "eval_out")]
    try:
        a, _ = parse_config(argv)  # parsed and checked
    except SystemExit as e:
        return _refused_in_one_line(capsys, e.code)
    except FlagError as e:
        assert "\n" not in str(e)
        return
    assert all(0 < f <= 1 for f in a.label_fractions) and a.seeds
    assert a.batch_size >= 1 and a.knn_k >= 1 and a.knn_t > 0 and math.isfinite(a.lp_lr)


@FAST
@given(VALUES, VALUES, VALUES)
def test_prepare_any_number_is_accepted_or_refused_in_one_line(capsys, short_side, stride, workers):
    parser_args = ["--short-side", short_side, "--frame-stride", stride, "--workers", workers]
    try:
        ints = [int(v) for v in (short_side, stride, workers)]
    except ValueError:
        with pytest.raises(SystemExit) as e:
            P.main(["/nonexistent", "--out", "/nonexistent", *parser_args])
        return _refused_in_one_line(capsys, e.value.code)
    try:
        convert.check_options(*ints)
    except sources.PrepareError as e:
        assert "\n" not in str(e) and "must be an integer in" in str(e)
        return
    assert 16 <= ints[0] and ints[1] >= 1 and ints[2] >= 1


def test_evaluate_results_are_strict_json_and_single_class_is_refused(tmp_path, capsys):
    import json

    rec = {"accuracy": 1.0, "macro_auc": float("nan"), "summary": [{"macro_auc_std": float("inf")}]}
    text = json.dumps(json_safe(rec), allow_nan=False)
    back = json.loads(text)
    assert back["macro_auc"] is None and "single-class" in back["macro_auc_null_reason"]
    assert back["summary"][0]["macro_auc_std"] is None
    one = Split(torch.zeros(4, 3, 8, 8, dtype=torch.uint8), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="at least two"):
        check_classes("x", {"train": one, "val": one}, ["a"])


def test_evaluate_read_only_output_is_refused_before_any_work(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as a user who can write anywhere")
        assert evaluate.main(["--backbone", "random", "--data", "synthetic", "--out", str(ro / "res")]) == 2
        err = capsys.readouterr().err
        assert "not writable" in err and len(err.strip().splitlines()) == 1
    finally:
        ro.chmod(0o700)


def test_evaluate_full_disk_is_found_before_any_work(tmp_path, monkeypatch, capsys):
    """Permission bits do not stop root: the probe write is what finds a full or read-only disk, before
    the backbones and data are loaded (results.json is written with write_text, untouched here)."""

    def full(self, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", full)
    monkeypatch.setattr(eval_run, "load_data", lambda *a, **k: pytest.fail("work started"))
    argv = ["--backbone", "random", "--arch", "vit_tiny", "--img-size", "32", "--data", "synthetic",
            "--protocol", "knn", "--seeds", "0", "--label-fractions", "1", "--out", str(tmp_path / "o")]
    assert evaluate.main(argv) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and len(err.strip().splitlines()) == 1


def test_clis_print_one_line_and_exit_2(tmp_path):
    """What a user sees, in subprocesses (run side by side: each imports torch)."""
    cases = [
        ("urfm_fast.pretrain", ["--batch-size", "-4"], "--batch-size -4"),
        ("urfm_fast.prepare", [str(tmp_path), "--out", str(tmp_path / "o"), "--short-side", "-5"], "--short-side -5"),
        ("urfm_fast.evaluate", ["--backbone", "random", "--data", "synthetic", "--knn-k", "0"], "--knn-k 0"),
        ("urfm_fast.export", [str(tmp_path / "missing.pth"), "--out", str(tmp_path / "e")], "no such file"),
    ]
    procs = [(subprocess.Popen([sys.executable, "-m", mod, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, cwd=tmp_path), needle) for mod, args, needle in cases]
    for p, needle in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 2 and needle in err, err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_every_pretrain_field_is_checked():
    """A new TrainConfig field without a range check would slip through: name each one here."""
    from urfm_fast.train import checks
    from urfm_fast.train.checks import CHECKED_ELSEWHERE

    source = Path(checks.__file__).read_text()
    unchecked = [f.name for f in dataclasses.fields(TrainConfig)
                 if f'"{f.name}"' not in source and f"cfg.{f.name}" not in source and f.name not in CHECKED_ELSEWHERE]
    assert not unchecked, f"TrainConfig fields without a check in urfm_fast/train/checks.py: {unchecked}"


def test_single_class_evaluation_split_is_reported_as_null_in_strict_json(tmp_path, monkeypatch):
    import json

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 255, (6, 3, 32, 32), dtype=torch.uint8, generator=g)
    train = Split(images, torch.tensor([0, 0, 0, 1, 1, 1]))
    val = Split(images[:3], torch.tensor([0, 0, 0]))  # one class: no AUC exists
    monkeypatch.setattr(eval_run, "load_data", lambda *a, **k: ({"train": train, "val": val}, ["a", "b"]))
    out = tmp_path / "o"
    assert evaluate.main(["--backbone", "random", "--arch", "vit_tiny", "--img-size", "32", "--data", "synthetic",
                          "--protocol", "knn", "--seeds", "0", "--label-fractions", "1", "--out", str(out)]) == 0

    def no_nan(token):
        raise AssertionError(f"bare {token} in results.json")

    res = json.loads((out / "results.json").read_text(), parse_constant=no_nan)
    run = res["runs"][0]
    assert run["macro_auc"] is None and "single-class" in run["macro_auc_null_reason"]
