#!/usr/bin/env bash
# prepare's de-identification and Python-support tests on a second CPython, newest first (3.14, 3.13,
# ...): one found on PATH (python3.13 on Debian 13) or under pyenv, other than the interpreter of
# .ci/run's own venv. It gets prepare's own dependencies only (no torch: prepare never imports it); the
# tests that read shards back through torch are skipped there with that reason. No second CPython:
# skipped, with the reason printed.
set -euo pipefail
cd "$(dirname "$0")/.."
main=$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
py=""
for v in 3.14 3.13 3.12 3.11 3.10; do
  [ "$v" = "$main" ] && continue
  for cand in "$(command -v "python$v" || true)" "$(pyenv root 2>/dev/null || echo /nonexistent)"/versions/"$v"*/bin/python3; do
    if [ -x "$cand" ] && "$cand" -c 'import venv, ensurepip' 2>/dev/null; then py=$cand; break 2; fi
  done
done
if [ -z "$py" ]; then
  echo "other_python: skipped: no CPython 3.10-3.14 besides $main on PATH or under pyenv"
  exit 0
fi
echo "other_python: $("$py" --version) ($py)"
venv=$(mktemp -d)/venv
trap 'rm -rf "$(dirname "$venv")"' EXIT
"$py" -m venv "$venv"
# prepare's runtime requirements (pyproject.toml, torch and the torch-bound packages left out) and the
# test extra's pytest and real DICOM test files
reqs=$("$venv/bin/python" - <<'PY'
import re
try:
    import tomllib
except ImportError:
    from pip._vendor import tomli as tomllib
p = tomllib.load(open("pyproject.toml", "rb"))["project"]
torch_bound = {"torch", "torchvision", "timm", "open-clip-torch"}
name = lambda r: re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9._-]+", r).group(0)).lower()
test = [r for r in p["optional-dependencies"]["test"] if name(r) in {"pytest", "pydicom-data", "deid-data"}]
print("\n".join(r for r in p["dependencies"] + test if name(r) not in torch_bound))
PY
)
mapfile -t reqs <<< "$reqs"
"$venv/bin/pip" install --quiet --disable-pip-version-check "${reqs[@]}"
if "$venv/bin/python" -c 'import torch' 2>/dev/null; then echo "other_python: torch got installed" >&2; exit 1; fi
# --noconftest: tests/conftest.py sets up the torch kernels; these tests do not use them
PYTHONPATH="$PWD" "$venv/bin/python" -m pytest -q --noconftest -p no:cacheprovider tests/test_deid.py tests/test_python_support.py
