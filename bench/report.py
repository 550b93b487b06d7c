"""Turn a pytest-benchmark JSON file into the markdown tables of bench/RESULTS.md.

    pytest bench/ --benchmark-only --benchmark-json=bench.json
    python bench/report.py bench.json [-o table.md] [--command "..."] [--title "..."]

One table per benchmark group, one line per row. Every number is recomputed from the JSON: the
mean / min time of the row and the per-call counts that ``bench/conftest.py`` stores in
``extra_info`` (``items_per_call``, ``flops_per_call``, ``bytes_per_call``, ``peak_tflops``,
``reference``). ``x ref`` columns are the reference row's time over this row's time (> 1: faster
than the reference), from the means and from the minima (the minimum is the least disturbed by
other processes on a shared machine); ``x ref (paired)`` is the median ratio over adjacent
reference/row calls of a paired row (``ratio_paired_median``). Rows with no such counts show a dash.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

COLUMNS = ("row", "rounds", "mean ms", "min ms", "images/s", "TFLOP/s", "MFU", "GB/s", "x ref (mean)",
           "x ref (min)", "x ref (paired)", "compile s")  # fmt: skip


def _fmt(x, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    if x == 0:
        return "0"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


def row_values(bench: dict, by_name: dict[str, dict]) -> dict[str, str]:
    stats, info = bench["stats"], bench.get("extra_info", {})
    mean, fastest = stats["mean"], stats["min"]
    items, flops, nbytes = info.get("items_per_call"), info.get("flops_per_call"), info.get("bytes_per_call")
    peak = info.get("peak_tflops")
    ref = by_name.get(info.get("reference") or "")
    tflops = flops / mean / 1e12 if flops else None
    if "step_s" in info:
        # A whole torchrun training run timed once: its rates are the median logged step after warm-up
        # (bench_distributed.py), not the wall time of the run.
        vals = {c: "-" for c in COLUMNS}
        vals.update({"row": bench["name"].removeprefix("test_"), "rounds": "1 run",
                     "mean ms": _fmt(info["step_s"] * 1e3) + " (median step)",
                     "images/s": _fmt(info.get("images_per_s")),
                     "MFU": f"{100 * info['mfu']:.1f} %" if info.get("mfu") else "-"})
        return vals
    return {
        "row": bench["name"].removeprefix("test_"),
        "rounds": str(stats["rounds"]),
        "mean ms": _fmt(mean * 1e3),
        "min ms": _fmt(fastest * 1e3),
        "images/s": _fmt(items / mean if items else None),
        "TFLOP/s": _fmt(tflops),
        "MFU": f"{100 * tflops / peak:.1f} %" if tflops and peak else "-",
        "GB/s": _fmt(nbytes / mean / 1e9 if nbytes else None),
        "x ref (mean)": _fmt(ref["stats"]["mean"] / mean, 3) if ref else "-",
        "x ref (min)": _fmt(ref["stats"]["min"] / fastest, 3) if ref else "-",
        "x ref (paired)": _fmt(info.get("ratio_paired_median"), 3),
        "compile s": _fmt(info.get("compile_s")),
    }


def render(data: dict, command: str | None = None, title: str | None = None) -> str:
    benches = data.get("benchmarks", [])
    by_name = {b["name"]: b for b in benches}
    mi = data.get("machine_info", {})
    cpu = mi.get("cpu", {})
    urfm = mi.get("urfm", {})
    lines = []
    if title:
        lines += [f"### {title}", ""]
    lines.append(f"- date: {data.get('datetime', '?')}")
    cores = urfm.get("cpu_cores") or cpu.get("count", "?")
    cpu_name = cpu.get("brand_raw", mi.get("processor", "?"))
    lines.append(f"- machine: {cpu_name}, {cores} cores; device: {urfm.get('device', 'cpu')}")
    versions = ", ".join(f"{k} {v}" for k, v in urfm.get("versions", {}).items())
    lines.append(f"- python {mi.get('python_version', '?')}" + (f", {versions}" if versions else ""))
    if urfm.get("scale"):
        lines.append(f"- scale: {urfm['scale']}")
    cmd = command or data.get("urfm_command")
    if cmd:
        lines.append(f"- command: `{cmd}`")
    commit = data.get("commit_info", {})
    if commit.get("id"):
        lines.append(f"- commit: {commit['id'][:12]}{' (dirty tree)' if commit.get('dirty') else ''}")
    lines.append("")
    groups: dict[str, list[dict]] = {}
    for b in benches:
        # Rows without a group are grouped by their file: bench/bench_data.py -> "data".
        module = b.get("fullname", "").split("::")[0].rsplit("/", 1)[-1].removesuffix(".py").removeprefix("bench_")
        groups.setdefault(b.get("group") or module or "ungrouped", []).append(b)
    for group, rows in groups.items():
        lines += [f"#### {group}", "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        for b in rows:
            vals = row_values(b, by_name)
            lines.append("| " + " | ".join(vals[c] for c in COLUMNS) + " |")
        lines.append("")
    if not benches:
        lines.append("(no benchmark rows in this file)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("json", type=Path, help="pytest-benchmark --benchmark-json output")
    p.add_argument("-o", "--output", type=Path, help="write the markdown here (default: stdout)")
    p.add_argument("--command", help="the exact command that produced the JSON")
    p.add_argument("--title", help="heading of the table block")
    args = p.parse_args(argv)
    text = render(json.loads(args.json.read_text()), args.command, args.title)
    if args.output:
        args.output.write_text(text + "\n")
    else:
        sys.stdout.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
