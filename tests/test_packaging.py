"""kernels/ ships as urfm_fast.kernels, never as a top-level `kernels` (a PyPI package of that name exists)."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import urfm_fast.kernels

ROOT = Path(__file__).resolve().parents[1]


def test_installed_package_maps_kernels_folder(tmp_path):
    assert Path(urfm_fast.kernels.__file__).resolve() == ROOT / "kernels" / "__init__.py"
    # What the install provides, in a fresh interpreter outside the checkout (other tests may have put the
    # checkout itself on this process's sys.path, where the folder is found as a plain directory).
    probe = ("import importlib.util, urfm_fast.kernels; s = importlib.util.find_spec('kernels'); "
             "print(urfm_fast.kernels.__file__); print(s.origin if s else '')")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert Path(out[0]).resolve() == ROOT / "kernels" / "__init__.py"
    assert not out[1].startswith(str(ROOT))  # a top-level `kernels` may be the unrelated PyPI package, never ours


def test_wheel_contains_kernels_under_urfm_fast_only(tmp_path):
    # The non-editable install is what the wheel holds.
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), ROOT],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("urfm_fast-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "urfm_fast/kernels/__init__.py" in names and "urfm_fast/kernels/gather.py" in names
    assert not any(n.startswith("kernels/") for n in names)
    # every module of every wing is in the wheel (a wing missing from pyproject's package list is not)
    ours = {str(f.relative_to(ROOT)) for f in (ROOT / "urfm_fast").rglob("*.py")}
    assert ours <= set(names), sorted(ours - set(names))

    # Installed from the wheel (not editable), the package imports its kernels from the install.
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    probe = "import urfm_fast.kernels.gather as g, importlib.util as u; print(g.__file__, u.find_spec('kernels'))"
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(target)}).stdout.split()
    assert out[0] == str(target / "urfm_fast" / "kernels" / "gather.py")
    assert out[1] == "None"  # no top-level `kernels` package was installed
    # the console commands pip writes for the wheel run, with their flags from sys.argv
    plot = subprocess.run([str(target / "bin" / "urfm-plot"), "--help"], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(target)}, timeout=120)
    assert plot.returncode == 0 and plot.stdout.startswith("usage:"), plot.stderr
    assert all((target / "bin" / name).is_file() for name in ("urfm-pretrain", "urfm-prepare", "urfm-evaluate",
                                                              "urfm-export"))


def _fresh(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT,
                          timeout=120).stdout.strip()


def test_package_imports_lazily_and_registers_with_timm_where_defined():
    """prepare (and its --help) start without torch; the module defining urfm_vit_* registers them on import,
    before timm or after it, and ``from urfm_fast import load_backbone`` is that import."""
    assert _fresh("import sys, urfm_fast.prepare; print(sorted({'torch', 'timm'} & set(sys.modules)))") == "[]"
    # the data wing's face too: no lazy binding, and still no torch until an item is read
    assert _fresh("import sys; from urfm_fast.data import ShardDataset; "
                  "print(sorted({'torch', 'timm'} & set(sys.modules)))") == "[]"
    make = "print(timm.create_model('urfm_vit_tiny_patch16_224', img_size=32).embed_dim)"
    assert _fresh(f"import timm, urfm_fast.checkpoints.backbone; {make}") == "192"
    assert _fresh(f"from urfm_fast import load_backbone; import timm; {make}") == "192"
    # nothing imports timm or torch behind the user's back: a bare ``import urfm_fast`` registers nothing
    assert _fresh("import sys, urfm_fast; print(sorted({'torch', 'timm'} & set(sys.modules)))") == "[]"


def test_one_checkpoint_error():
    from urfm_fast import CheckpointError
    from urfm_fast.checkpoints import formats as checkpoint_io
    from urfm_fast.checkpoints import runs as checkpoint

    assert checkpoint.CheckpointError is checkpoint_io.CheckpointError is CheckpointError
    assert issubclass(CheckpointError, ValueError)


@pytest.mark.parametrize("cli", ["pretrain", "evaluate", "export", "prepare", "plot"])
def test_help_starts_without_torch(cli):
    """``python -m urfm_fast.<cli> --help`` prints its help and exits before torch or timm is imported."""
    code = ("import runpy, sys\n"
            f"sys.argv = ['urfm_fast.{cli}', '--help']\n"
            "try:\n"
            f"    runpy.run_module('urfm_fast.{cli}', run_name='__main__')\n"
            "except SystemExit as e:\n"
            "    code = e.code\n"
            "else:\n"
            "    code = 'no exit'\n"
            "print('RESULT', code, sorted({'torch', 'timm'} & set(sys.modules)))\n")
    out = _fresh(code)
    assert "usage:" in out and "--help" in out
    assert out.splitlines()[-1] == "RESULT 0 []"


def test_console_scripts_are_declared_and_run_with_sys_argv(monkeypatch, capsys):
    import importlib

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) == {"urfm-pretrain", "urfm-prepare", "urfm-evaluate", "urfm-export", "urfm-plot"}
    for name, target in scripts.items():
        module, _, attr = target.partition(":")
        main = getattr(importlib.import_module(module), attr)
        assert callable(main), target
        # a console script calls main() with no arguments: the flags come from sys.argv
        monkeypatch.setattr(sys, "argv", [name, "--help"])
        with pytest.raises(SystemExit) as e:
            main()
        assert e.value.code == 0 and "usage:" in capsys.readouterr().out, name
