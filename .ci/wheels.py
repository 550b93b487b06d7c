"""Do the runtime and `test` dependencies resolve to binary wheels on every CPython we claim?

    pip install uv && python .ci/wheels.py      # CPython 3.10-3.14 x x86_64, aarch64 Linux (< 1 min)
    python .ci/wheels.py --python 3.13 --arch aarch64

For each target, `uv pip compile --only-binary :all: --python-version X --python-platform ARCH-manylinux_2_28`
over the requirements in pyproject.toml: uv reads the package index and the wheels' metadata (PEP 658
files and HTTP range requests: no wheel is downloaded) and resolves as pip would on that interpreter
and machine, environment markers included (`tomli; python_version < "3.11"` is taken for 3.10 only).
torch, torchvision and triton are left out (an override with a marker that never holds): their own
projects publish their support matrix, and their wheels are GBs; timm and open_clip_torch are resolved
with all their other requirements. (pip's `--dry-run --python-version --platform` resolves too, but
evaluates markers for the interpreter running it, and took ~6 min for the ten targets on 2 busy cores.)

Limit: uv ignores upper bounds of Requires-Python, so a pure-Python wheel capped below a target
(`<3.13`) passes here; compiled wheels are held to their cpXY tags. The second-Python test leg of
.ci/run installs with pip, which honours them.

The index is PyPI, or UV_DEFAULT_INDEX. Exit status 1 when a target does not resolve (uv's reason is
printed), 2 when uv is not installed.
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

PYTHONS = ("3.10", "3.11", "3.12", "3.13", "3.14")
ARCHES = ("x86_64", "aarch64")
GLIBC = "manylinux_2_28"  # wheels for glibc 2.28 and older: Debian 10+, Ubuntu 20.04+, RHEL 8+
LEFT_OUT = ("torch", "torchvision", "triton")  # their projects' support matrix; GB-sized wheels
# Published as source only, and pure Python (no compiled code, builds on any CPython): checked to be on
# the index, not resolved as wheels (that would download it); its requirement (pydicom) is resolved.
SOURCE_ONLY = {"deid-data": "real DICOM test files, a 42 MB data package"}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def name_of(req):
    """Canonical project name of a requirement string ("open_clip_torch>=2.24" -> "open-clip-torch")."""
    return re.sub(r"[-_.]+", "-", re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req).group(1)).lower()


def requirements():
    """The runtime dependencies and the `test` extra of pyproject.toml, source-only packages aside."""
    try:
        import tomllib
    except ImportError:  # Python 3.10: the TOML parser pip vendors
        from pip._vendor import tomli as tomllib
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    reqs = project["dependencies"] + project["optional-dependencies"]["test"]
    return [r for r in dict.fromkeys(reqs) if name_of(r) not in SOURCE_ONLY]


def uv_binary():
    try:
        from uv import find_uv_bin

        return find_uv_bin()
    except ImportError:
        return shutil.which("uv")


def compile_for(uv, folder, python, arch):
    """One target -> (number of pinned packages, error lines)."""
    cmd = [uv, "pip", "compile", os.path.join(folder, "requirements.txt"), "--override",
           os.path.join(folder, "left_out.txt"), "--python-version", python, "--python-platform",
           f"{arch}-{GLIBC}", "--only-binary", ":all:", "--no-header", "--no-annotate", "--quiet"]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        return 0, [ln.strip() for ln in p.stderr.splitlines() if ln.strip()][:6]
    pins = [ln for ln in p.stdout.splitlines() if "==" in ln]
    taken = [ln for ln in pins if name_of(ln) in LEFT_OUT]
    return len(pins), [f"took in {taken}"] if taken else []


def on_index(name):
    """True when the package index lists a release of name (`pip index versions`: no download)."""
    p = subprocess.run([sys.executable, "-m", "pip", "index", "versions", name, "--disable-pip-version-check"],
                       capture_output=True, text=True)
    return p.returncode == 0 and name in p.stdout


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--python", nargs="+", default=PYTHONS, help="CPython versions (default: %(default)s)")
    ap.add_argument("--arch", nargs="+", default=ARCHES, help="Linux machines (default: %(default)s)")
    args = ap.parse_args(argv)
    uv = uv_binary()
    if uv is None:
        print("wheels: uv is not installed (pip install uv)", file=sys.stderr)
        return 2
    t0 = time.time()
    targets = [(p, a) for p in args.python for a in args.arch]
    with tempfile.TemporaryDirectory() as folder:
        with open(os.path.join(folder, "requirements.txt"), "w") as f:
            f.write("\n".join(requirements()) + "\n")
        with open(os.path.join(folder, "left_out.txt"), "w") as f:
            f.write("".join(f'{n} ; python_version < "0"\n' for n in LEFT_OUT))  # a marker that never holds
        with ThreadPoolExecutor(max_workers=4) as ex:  # uv waits on the index most of the time
            results = list(ex.map(lambda t: compile_for(uv, folder, *t), targets))
    failed = 0
    for n, why in SOURCE_ONLY.items():
        found = on_index(n)
        failed += not found
        print(f"  {n}: source only ({why}, pure Python): " + ("on the index" if found else "NOT on the index"))
    for (python, arch), (n, err) in zip(targets, results):
        print(f"  CPython {python:<5} {arch}-{GLIBC}: " + (f"{n} wheels" if not err else "FAILED: " + " | ".join(err)))
        failed += bool(err)
    print(f"wheels: {sum(not e for _, e in results)} of {len(targets)} targets resolve to binary wheels, "
          f"{'/'.join(LEFT_OUT)} left out ({time.time() - t0:.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
