"""Training curves of one or several pretraining runs, from their ``metrics.jsonl``, in one PNG.

    python -m urfm_fast.plot runs/a runs/b --out curves.png

One panel per quantity a run logged: loss, learning rate, gradient norm and images/s (a panel is left
out when no run has it), x = optimizer step, one line per run (labelled by its folder name, or
``label=RUN``). Needs only matplotlib (no torch): it runs on a laptop beside a copied run folder.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from urfm_fast.cli_checks import FlagError, OneLineParser, writable_dir

METRICS_FILE = "metrics.jsonl"  # as urfm_fast.checkpoints.runs writes it (that module imports torch)
PANELS = (("loss", "loss", "log"), ("lr", "learning rate", "linear"), ("grad_norm", "gradient norm", "log"),
          ("images_per_s", "images/s", "linear"))


def read_metrics(run: str) -> list[dict]:
    """The records of a run folder (or of a metrics.jsonl file itself); FlagError when there are none."""
    path = Path(run).expanduser()
    path = path / METRICS_FILE if path.is_dir() else path
    if not path.is_file():
        raise FlagError(f"{run}: no {METRICS_FILE} (give a run folder of python -m urfm_fast.pretrain)")
    records = []
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise FlagError(f"{path}: cannot read it ({e})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            if n == len(lines):  # a run killed mid-write leaves a partial last line: ignore it
                continue
            raise FlagError(f"{path}:{n}: not a JSON record") from None
        if isinstance(rec, dict) and isinstance(rec.get("step"), (int, float)):
            records.append(rec)
    if not records:
        raise FlagError(f"{path}: no records with a step (has the run logged yet? see --log-every)")
    return records


def _series(records: list[dict], key: str) -> tuple[list, list]:
    """(steps, values) of the finite values of ``key``; a resumed run's repeated steps keep the last record."""
    by_step = {}
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            by_step[r["step"]] = v
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def _label(spec: str) -> tuple[str, str]:
    """``label=RUN`` or ``RUN`` -> (label, run); a bare run is named by its folder."""
    if "=" in spec and not Path(spec).exists():
        label, _, run = spec.partition("=")
        return label, run
    path = Path(spec).expanduser().resolve()
    return (path.parent.name if path.name == METRICS_FILE else path.name), spec


def plot_runs(runs: dict[str, list[dict]], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    panels = [p for p in PANELS if any(_series(recs, p[0])[0] for recs in runs.values())]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (key, title, scale) in zip(axes[0], panels):
        for label, recs in runs.items():
            steps, values = _series(recs, key)
            if steps:
                ax.plot(steps, values, label=label, marker="." if len(steps) < 30 else None)
        if scale == "log" and all(v > 0 for recs in runs.values() for v in _series(recs, key)[1]):
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(prog="python -m urfm_fast.plot", description=__doc__.split("\n\n")[0],
                      formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("runs", nargs="+", metavar="RUN", help="[label=]run folder (or its metrics.jsonl)")
    p.add_argument("--out", required=True, metavar="FILE.png", help="the picture to write")
    p.add_argument("--force", action="store_true", help="overwrite --out when it exists")
    a = p.parse_args(argv)
    out = Path(a.out).expanduser()
    try:
        if out.exists() and not a.force:
            raise FlagError(f"--out {a.out}: exists; pass --force or another --out")
        writable_dir("out", str(out.parent))
        runs = {}
        for spec in a.runs:
            label, run = _label(spec)
            while label in runs:  # two runs of the same folder name stay apart
                label += "'"
            runs[label] = read_metrics(run)
        out.parent.mkdir(parents=True, exist_ok=True)
        plot_runs(runs, out)
    except FlagError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: --out {a.out}: cannot write there ({e.strerror or e})", file=sys.stderr)
        return 2
    print(f"wrote {out} ({', '.join(f'{k}: {len(v)} records' for k, v in runs.items())})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
