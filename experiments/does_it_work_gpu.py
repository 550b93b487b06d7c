"""Does the masked recipe win back its place once samples are cheap? The study's arms on one GPU in <= 300 s.

    bash experiments/gpu_method.sh                      # the one GPU command (teacher weights from one file)
    python experiments/does_it_work_gpu.py --plan       # the phases and their budgets; runs nothing

The arms, student and teacher of experiments/does_it_work.py (urfm, distill, schedule with the ramp the CPU
study chose on its validation split, pixel, random, and the teacher as the ceiling), each trained by the
product's trainer (``urfm_fast.train.trainer.pretrain``) on 65,536 synthetic images at 128 px (16x the CPU
study's), batch 256, lr 2e-3 (square-root scaling of the CPU's 1e-3 at 32, rounded down). Every arm takes the
same number of steps: a short calibration run of the slowest arm (distill: every patch through decoder and
loss) measures images/s, and the step count is what fills ``--budget-s`` at that rate. Each run writes a .pth
at every quarter (``--pth-every``); those at 1/4, 1/2 and the end are probed with evaluate's protocols (linear
and k-NN at 1 / 10 / 100 % of 2,000 labels, probe seeds 0-2, the test split), so the result is probe quality
against samples seen. The report is rewritten after every probe point: a kill keeps what finished.
torch.compile is off and attention runs on torch's SDPA: the method is measured here, the kernels by
bench/gpu_check.sh. Nothing here was tuned on a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch
from does_it_work import ARMS, RAMPS, RANDOM, TEACHER, classify, pooled, pretrain_run, rendered

from urfm_fast.data.stream import SyntheticSource
from urfm_fast.model import ops

RAMP = "cosine over 50 %"  # the CPU study's choice on its validation split (docs/does_it_work_study.md)
PROTOCOLS = ["linear", "knn"]
POINTS = (0.25, 0.5, 1.0)  # of the run's steps; every quarter is saved, these are probed
SIZES = dict(gpu=dict(img_size=128, images=65536, batch=256, lr="2e-3", eval_train=2000, eval_n=1000, workers=4,
                      calibrate=20, max_steps=None),
             smoke=dict(img_size=32, images=64, batch=8, lr="1e-3", eval_train=40, eval_n=20, workers=0,
                        calibrate=3, max_steps=8))
# Planned seconds of the phases around the arms' training (--plan); the measured ones go in the report.
PLAN = dict(startup=20, data=25, calibrate=15, setup=5, probe=5, margin=20)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default=TEACHER, help="pretrain --teacher spec (the GPU machine: timm:MODEL=FILE)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--budget-s", type=float, default=30.0, help="training seconds of the slowest arm")
    p.add_argument("--out", default="gpu_out", help="folder for does_it_work_gpu.{md,json}")
    p.add_argument("--work", default="runs/does_it_work_gpu", help="the runs (one folder each, with config.json)")
    p.add_argument("--probe-seeds", default="0,1,2")
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--smoke", action="store_true", help="toy sizes on the CPU: proves the command, not the method")
    p.add_argument("--plan", action="store_true", help="print the phases and their planned seconds; run nothing")
    return p


def arm_flags() -> dict[str, list[str]]:
    return {**ARMS, "schedule": RAMPS[RAMP]}


def plan_phases(a) -> list[tuple[str, float]]:
    trained = list(arm_flags())
    phases = [("start-up: python, torch, CUDA context", PLAN["startup"]),
              ("data: render the pretraining and probe images", PLAN["data"]),
              ("calibrate: steps of distill that fill the budget", PLAN["calibrate"]),
              ("probe teacher and random (references)", 2 * PLAN["probe"])]
    for arm in trained:
        phases += [(f"train {arm} (set-up, then the budget at most)", PLAN["setup"] + a.budget_s),
                   (f"probe {arm} at {len(POINTS)} points", len(POINTS) * PLAN["probe"])]
    return phases + [("write reports, margin", PLAN["margin"])]


def print_plan(a) -> int:
    phases = plan_phases(a)
    for name, sec in phases:
        print(f"{sec:6.0f} s  {name}")
    print(f"{sum(s for _, s in phases):6.0f} s  total")
    return 0


class Report:
    """does_it_work_gpu.{md,json}, rewritten (atomically) after every probe point."""

    def __init__(self, a, argv, out: Path, device: torch.device):
        self.a, self.out, self.t0 = a, out, time.perf_counter()
        self.cmd = "python experiments/does_it_work_gpu.py " + " ".join(sys.argv[1:] if argv is None else argv)
        self.device = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
        self.phases, self.runs, self.records, self.steps = [], {}, [], None

    def phase(self, name: str, seconds: float) -> None:
        self.phases.append(dict(phase=name, seconds=round(seconds, 1)))
        self.write()

    def point(self, arm: str, step: int, records: list[dict]) -> None:
        self.records += [{**r, "backbone": arm, "step": step} for r in records]
        self.write()

    def table(self) -> str:
        cols = [(p, f) for p in PROTOCOLS for f in (0.01, 0.1, 1.0)]
        lines = ["| arm | step | samples | " + " | ".join(f"{p} {f:.0%}" for p, f in cols) + " |",
                 "|---" * (3 + len(cols)) + "|"]
        for arm, step in dict.fromkeys((r["backbone"], r["step"]) for r in self.records):
            cell = {(s["protocol"], s["fraction"]): s for s in self.summary(arm, step)}
            fmt = lambda c: "-" if c is None else f"{100 * c['accuracy']:.1f} ± {100 * c['accuracy_std']:.1f}"  # noqa: E731
            lines.append(f"| {arm} | {step} | {step * self.batch()} | "
                         + " | ".join(fmt(cell.get(c)) for c in cols) + " |")
        return "\n".join(lines)

    def batch(self) -> int:
        return SIZES["smoke" if self.a.smoke else "gpu"]["batch"]

    def summary(self, arm=None, step=None) -> list[dict]:
        keys = dict.fromkeys((r["backbone"], r["step"]) for r in self.records)
        return [{**row, "step": k[1]} for k in keys if arm is None or k == (arm, step)
                for row in pooled([r for r in self.records if (r["backbone"], r["step"]) == k])]

    def write(self) -> None:
        minutes = (time.perf_counter() - self.t0) / 60
        versions = f"torch {torch.__version__}" + (f", CUDA {torch.version.cuda}" if self.device != "CPU" else "")
        phases = "\n".join(f"| {p['phase']} | {p['seconds']} |" for p in self.phases)
        runs = "\n".join(f"| {k} | {v['seconds']:.0f} | {v['loss_first']:.3f} -> {v['loss_last']:.3f} |"
                         for k, v in self.runs.items())
        md = (f"# Probe quality against samples seen ({self.device})\n\n`{self.cmd.strip()}`: {minutes:.1f} min so "
              f"far ({versions}); rewritten after every probe point.\n\nEvery arm trained by the product's trainer, "
              f"{self.steps} steps each (calibrated on distill to fill {self.a.budget_s:g} s); teacher "
              f"`{self.a.teacher}`. Accuracy in %, mean ± std over probe seeds {self.a.probe_seeds} (test split).\n\n"
              f"{self.table()}\n\n## Runs (seconds, loss first -> last logged)\n\n| run | s | loss |\n|---|---|---|\n"
              f"{runs}\n\n## Phases (seconds)\n\n| phase | seconds |\n|---|---|\n{phases}\n")
        data = dict(command=self.cmd.strip(), device=self.device, versions=versions, args=vars(self.a),
                    steps=self.steps, minutes=round(minutes, 2), phases=self.phases, runs=self.runs,
                    summary=self.summary(), records=self.records)
        for name, text in (("md", md), ("json", json.dumps(data, indent=1, default=str) + "\n")):
            path = self.out / f"does_it_work_gpu.{name}"
            path.with_name(path.name + ".tmp").write_text(text)
            os.replace(path.with_name(path.name + ".tmp"), path)


def images_per_s(run_dir: Path) -> float:
    """The last logged throughput of a run (the first step, compile and start-up, is timed apart)."""
    return json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])["images_per_s"]


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    if a.plan:
        return print_plan(a)
    device = torch.device("cpu" if a.smoke else a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"error: --device {a.device}: torch sees no CUDA device", file=sys.stderr)
        return 2
    torch.set_num_threads(a.threads)
    ops.set_backend("torch")  # the method, not the kernels (see the docstring)
    s = SIZES["smoke" if a.smoke else "gpu"]
    work, out = Path(a.work), Path(a.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    report, seeds = Report(a, argv, out, device), [int(x) for x in a.probe_seeds.split(",")]
    common = ["--device", device.type, "--teacher", a.teacher, "--lr", s["lr"], "--num-workers", str(s["workers"]),
              "--no-compile"]
    t0 = time.perf_counter()
    images = SyntheticSource(s["images"], s["img_size"], seed=0)  # rendered once, on the GPU where there is one
    train, test = (rendered(n, s[f"eval_{k}"], s["img_size"], work) for n, k in (("train", "train"), ("test", "n")))
    report.phase(f"data: {s['images']} + {s['eval_train'] + s['eval_n']} images rendered", time.perf_counter() - t0)

    t0 = time.perf_counter()
    cal = dict(s, steps=s["calibrate"], warmup=1)
    pretrain_run(cal, work, "calibrate", [*ARMS["distill"], *common], 0, images)
    rate = images_per_s(work / "calibrate")
    steps = max(4, int(a.budget_s * rate / s["batch"]) // 4 * 4)
    report.steps = steps = min(steps, s["max_steps"] or steps)
    report.phase(f"calibrate: distill at {rate:.0f} images/s -> {steps} steps per arm", time.perf_counter() - t0)

    t0 = time.perf_counter()
    random_pth, _ = pretrain_run(dict(s, steps=1, warmup=0), work, "random", [*common, *RANDOM], 0, images)
    report.point("teacher", 0, classify({}, train, test, "test", PROTOCOLS, seeds, a.teacher, device))
    report.point("random", 0, classify({"random": random_pth}, train, test, "test", PROTOCOLS, seeds, None, device))
    report.phase("probe teacher and random", time.perf_counter() - t0)
    run_s = dict(s, steps=steps, warmup=max(1, steps // 10))
    for arm, flags in arm_flags().items():
        t0 = time.perf_counter()
        flags = [*flags, *common, "--pth-every", str(steps // 4)]
        _, facts = pretrain_run(run_s, work, arm, flags, 0, images)
        report.runs[arm] = facts
        kept = out / "does_it_work_gpu_runs" / f"{arm}.json"  # the run's own config.json, beside the results
        kept.parent.mkdir(exist_ok=True)
        facts["config"] = str(shutil.copyfile(facts["config"], kept))
        report.phase(f"train {arm}: {steps} steps", time.perf_counter() - t0)
        t0 = time.perf_counter()
        for frac in POINTS:
            step = round(frac * steps)
            pth = work / arm / f"checkpoint-{step:08d}.pth"
            report.point(arm, step, classify({arm: pth}, train, test, "test", PROTOCOLS, seeds, None, device))
            print(f"{arm}: step {step} probed", flush=True)
        report.phase(f"probe {arm} at {len(POINTS)} points", time.perf_counter() - t0)
    print(f"wrote {out}/does_it_work_gpu.{{md,json}} in {(time.perf_counter() - report.t0) / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
