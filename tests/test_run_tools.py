"""Around a run: --config files, TensorBoard event files, the plot command, help texts, and the pointer
to prepare for a folder of DICOM files."""

import json
import sys

import pytest
from test_pretrain import SYNTH, TINY, fast_random_teacher, metrics  # noqa: F401 (fixture)

from urfm_fast import evaluate, plot, pretrain
from urfm_fast.cli_checks import FlagError

# TINY as a config file: the same field names as the flags
TINY_CONFIG = dict(model="vit_tiny", depth=2, img_size=32, decoder_dim=64, decoder_depth=2, decoder_heads=4,
                   teacher="random", num_workers=0, warmup_steps=3, lr=1e-3, data="synthetic", synthetic_images=64,
                   batch_size=4, steps=5, log_every=1, save_every=0, compile=None)


def _write_yaml(path, values: dict):
    path.write_text("".join(f"{k}: {'null' if v is None else v}\n" for k, v in values.items()))
    return path


# ---------------------------------------------------------------------------------------------
# --config


@pytest.mark.parametrize("fmt", ["yaml", "json"])
def test_config_file_then_flags_given_win(tmp_path, fmt):
    file = tmp_path / f"recipe.{fmt}"
    if fmt == "json":
        file.write_text(json.dumps({**TINY_CONFIG, "ac": True}))
    else:
        _write_yaml(file, {**TINY_CONFIG, "ac": True, "mask-ratio": 0.5})  # a flag's spelling is accepted too
    cfg, given, demo = pretrain.parse_config(["--config", str(file), "--steps", "7", "--no-ac"])
    assert not demo and cfg.data == "synthetic"  # --data from the file: a real run, not the demo
    assert cfg.steps == 7 and cfg.ac is False  # the command line wins
    assert cfg.batch_size == 4 and cfg.lr == 1e-3 and cfg.model == "vit_tiny" and cfg.compile is None
    assert cfg.mask_ratio == (0.5 if fmt == "yaml" else 0.75)
    assert isinstance(cfg.lr, float) and isinstance(cfg.depth, int)  # typed as the flags are ("1e-3" in YAML)


@pytest.mark.parametrize("text, needle", [
    ("batch_sise: 8\n", "unknown key 'batch_sise'"),
    ("ac: maybe\n", "ac: 'maybe' is not a value of --ac"),
    ("steps: null\n", "steps: None is not a value of --steps"),
    ("- 1\n- 2\n", "must hold a mapping"),
    ("steps: [1, 2\n", "not valid YAML"),
    ("lr: -1\n", "--lr -1.0: must be a finite number"),  # the file's values meet the flags' checks
    ("model: vit_giant\n", "argument --model: invalid choice: 'vit_giant'"),
    ("steps: 1.5\n", "argument --steps: invalid int value: '1.5'"),
])
def test_bad_config_file_is_one_line(tmp_path, text, needle):
    file = tmp_path / "c.yaml"
    file.write_text(text)
    with pytest.raises(FlagError) as e:
        pretrain.parse_config(["--config", str(file)])
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_unknown_config_key_exits_2_naming_it(tmp_path, capsys):
    file = tmp_path / "c.json"
    file.write_text('{"steps": 3, "learning_rate": 0.1}')
    assert pretrain.main(["--config", str(file), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --config") and "'learning_rate'" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()
    assert pretrain.main(["--config", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# A run from a config file: its saved config, TensorBoard events, the plot


def test_run_from_config_file_saves_it_resolved_logs_events_and_plots(tmp_path, capsys):
    config_run = tmp_path / "run_a"
    file = _write_yaml(tmp_path / "recipe.yaml", TINY_CONFIG)
    assert pretrain.main(["--config", str(file), "--steps", "4", "--out", str(config_run)]) == 0
    _check_events(config_run)
    _check_plot(config_run, tmp_path, capsys)


def _check_events(config_run):
    saved = json.loads((config_run / "config.json").read_text())["train"]
    assert saved["steps"] == 4 and saved["batch_size"] == 4 and saved["model"] == "vit_tiny"
    assert "config" not in saved  # the resolved values, not a pointer to a file that may change
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:  # the tensorboard extra (CI installs it with the test extra)
        return
    events = list(config_run.glob("events.out.tfevents.*"))
    assert len(events) == 1
    acc = EventAccumulator(str(config_run))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "train/images_per_s"} <= tags
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2, 3, 4]
    assert [e.value for e in loss] == pytest.approx([m["loss"] for m in metrics(config_run)], rel=1e-6)


def _check_plot(config_run, tmp_path, capsys):
    other = tmp_path / "run_b"
    other.mkdir()
    (other / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0 / s, "lr": 1e-3}) + "\n"
                                                 for s in range(1, 6)) + '{"step": 6, "lo')  # a cut last line
    png = tmp_path / "curves.png"
    capsys.readouterr()
    assert plot.main([str(config_run), f"b={other}", "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert "run_a: 4 records, b: 5 records" in capsys.readouterr().out
    # bad input: one line, exit 2, nothing overwritten
    assert plot.main([str(config_run), "--out", str(png)]) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    assert plot.main([str(tmp_path / "nope"), "--out", str(tmp_path / "x.png")]) == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text("")
    assert plot.main([str(empty), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "no metrics.jsonl" in err[0] and "no records" in err[1]
    assert not (tmp_path / "x.png").exists()


def test_without_tensorboard_a_run_still_works(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as when not installed
    out = tmp_path / "run"
    assert pretrain.main([*TINY, *SYNTH, "--batch-size", "4", "--steps", "2", "--log-every", "1",
                          "--out", str(out)]) == 0
    assert len(metrics(out)) == 2 and not list(out.glob("events.out.tfevents.*"))
    assert capsys.readouterr().out.count("tensorboard is not installed") == 1


# ---------------------------------------------------------------------------------------------
# Help texts and pointers


def test_one_default_per_help_line_and_evaluate_shows_defaults():
    for parser in (pretrain.build_parser(), evaluate.build_parser()):
        formatter = parser._get_formatter()
        for action in parser._actions:
            text = formatter._get_help_string(action) if action.help else ""
            assert text.count("(default") <= 1, text
    help_text = " ".join(evaluate.build_parser().format_help().split())
    for shown in ("(default: 0.01,0.1,1.0)", "(default: 0,1,2)", "(default: linear,knn,finetune)",
                  "(default: 100)", "(default: runs/evaluate)"):
        assert shown in help_text
    assert "(default: None)" not in help_text
    pretrain_help = " ".join(pretrain.build_parser().format_help().split())
    assert "(default: --blr * batch_size / 256) (default" not in pretrain_help
    assert "(default: --blr * batch_size / 256)" in pretrain_help


def test_dicom_only_folder_points_to_prepare(tmp_path, capsys):
    folder = tmp_path / "exam 1"
    (folder / "series").mkdir(parents=True)
    (folder / "a.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 64)
    (folder / "series" / "IM0001").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 64)  # no suffix: by its magic
    assert pretrain.main([*TINY, "--data", str(folder), "--steps", "4", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "2 DICOM files" in err
    assert f"python -m urfm_fast.prepare '{folder}' --out '{folder}_shards'" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert pretrain.main([*TINY, "--data", str(empty), "--steps", "4", "--out", str(tmp_path / "run2")]) == 2
    assert "no PNG/JPEG/BMP/TIFF images found" in capsys.readouterr().err


def test_evaluate_progress_bars_only_when_asked(capsys):
    import types

    import torch

    from urfm_fast.eval.protocols import extract_features

    bb = types.SimpleNamespace(label="tiny", mean=(0.5,) * 3, std=(0.5,) * 3)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4))
    images = torch.randint(0, 256, (10, 3, 8, 8), dtype=torch.uint8)
    quiet = extract_features(model, images, bb, torch.device("cpu"), batch_size=4)
    assert capsys.readouterr().err == ""
    shown = extract_features(model, images, bb, torch.device("cpu"), batch_size=4, show_progress=True)
    err = capsys.readouterr().err
    assert "[tiny] features" in err and "/10 " in err  # a bar over the 10 images
    assert torch.equal(quiet, shown)
    # the CLI: --quiet, or stderr not a terminal (as here, captured), turns them off
    args = evaluate.build_parser().parse_args(["--backbone", "random", "--data", "synthetic", "--quiet"])
    assert args.quiet
