"""What pyproject.toml promises about Pythons, and the requirement set .ci/wheels.py resolves (no
network here: the resolution itself runs in .ci/run)."""

import importlib.util
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHONS = ["3.10", "3.11", "3.12", "3.13", "3.14"]


def _load(rel):
    spec = importlib.util.spec_from_file_location(os.path.basename(rel)[:-3], os.path.join(ROOT, rel))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def wheels():
    return _load(".ci/wheels.py")


def _project():
    try:
        import tomllib
    except ImportError:
        from pip._vendor import tomli as tomllib
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["project"]


def test_classifiers_and_requires_python_match_what_ci_checks(wheels):
    p = _project()
    assert p["requires-python"] == ">=3.10"
    versions = [re.fullmatch(r"Programming Language :: Python :: (3\.\d+)", c) for c in p["classifiers"]]
    claimed = [m.group(1) for m in versions if m]
    assert claimed == PYTHONS == list(wheels.PYTHONS)


def test_no_requirement_is_limited_to_older_pythons():
    p = _project()
    reqs = p["dependencies"] + [r for extra in p["optional-dependencies"].values() for r in extra]
    capped = [r for r in reqs if re.search(r"python_(full_)?version\s*<", r)]
    assert capped == []
    assert not any(r.startswith("rapidocr-onnxruntime") for r in reqs)  # wheels up to Python 3.12 only


def test_wheel_check_requirements(wheels):
    names = [wheels.name_of(r) for r in wheels.requirements()]
    assert {"rapidocr", "onnxruntime", "opencv-python-headless", "pytest", "timm", "open-clip-torch"} <= set(names)
    assert "deid-data" not in names  # source only: checked to be on the index instead
    assert "torch" in names and "torchvision" in names  # left out by the override file, not dropped here
    assert wheels.name_of("open_clip_torch>=2.24") == "open-clip-torch"
    assert wheels.name_of("Pillow ; python_version >= '3.10'") == "pillow"


def test_detector_model_is_pp_ocrv6_from_rapidocr():
    from urfm_fast.data import deid

    assert deid.DET_MODEL == ("rapidocr", "models/PP-OCRv6_det_small.onnx")
    try:
        path = deid.model_path()
    except deid.DetectorUnavailable:
        pytest.skip("rapidocr is not installed")
    assert os.path.getsize(path) > 1 << 20
