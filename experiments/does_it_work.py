"""Does URFM pretraining work at CPU scale? Every arm is trained by the product's own trainer and probed by
its own evaluate: this script only chooses the arms, renders the images once and writes the table.

    pip install -e ".[experiments]"
    python experiments/does_it_work.py --out docs          # docs/does_it_work_study.{md,json} (see its header)
    python experiments/does_it_work.py --smoke --out /tmp/s  # the same pipeline at toy size (tests/test_experiments.py)
    bash experiments/gpu_method.sh                          # the same arms on one GPU (does_it_work_gpu.py)

Arms, each a ``python -m urfm_fast.pretrain`` run (its library entry ``urfm_fast.train.trainer.pretrain``) with
the flags in ``ARMS``, on
the same 4,096 synthetic images (the product's synthetic source, rendered once and passed to every run),
``--augment none --cache-targets`` (the same pixels every epoch, so each image's teacher targets are computed
once), teacher EfficientNet-Lite0 (ImageNet weights, installed with the package) at 128 px:
- ``urfm``: URFM's recipe, mask 0.75, the loss on the masked patches;
- ``distill``: mask 0, the loss on every patch (feature distillation);
- ``schedule``: the mask ratio ramped from 0 to 0.75 (``--mask-schedule``); which ramp of ``RAMPS`` is chosen
  on the validation split (linear probe, pretraining seed 0), never on the test split;
- ``pixel``: MAE's objective (``--target pixels``);
- ``random``: the initial weights (one step at learning rate 0 writes them in the product's format);
- ``teacher``: the teacher's own feature map (``teacher:efficientnet_lite0`` in evaluate), the ceiling.
Probes (urfm_fast.evaluate's protocols): linear (CLS token), attentive (a cross-attention block with a learned
query on the frozen patch tokens) and k-NN at 1 / 10 / 100 % of 2,000 labelled images, over probe seeds 0-2,
every pretrained arm over ``--pretrain-seeds``; the dense probe (evaluate's linear segmentation probe) on 500
labelled masks. Scored on the test split (seed 2000); the validation split (seed 3000) serves the choice of
ramp and the schedule rule of docs/training.md. Every run's own config.json stays in ``--work``.
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

from urfm_fast.data import synthetic
from urfm_fast.data.stream import SyntheticSource
from urfm_fast.eval.backbones import resolve_backbone
from urfm_fast.eval.config import EvalConfig
from urfm_fast.eval.data import Split
from urfm_fast.eval.report import format_table, json_safe, row_text, summarize
from urfm_fast.eval.run import row_key, run
from urfm_fast.eval.seg_data import SegSplit
from urfm_fast.eval.segmentation import run_segmentation
from urfm_fast.train.config import parse_config
from urfm_fast.train.trainer import pretrain

TEACHER = "efficientnet_lite0"
STUDENT = ["--model", "vit_tiny", "--depth", "6", "--decoder-dim", "128", "--decoder-depth", "2",
           "--decoder-heads", "4", "--teacher", TEACHER, "--teacher-size", "128", "--lr", "1e-3",
           "--augment", "none", "--cache-targets", "--data", "synthetic", "--num-workers", "0", "--save-every", "0",
           "--device", "cpu"]
ARMS = {"urfm": [], "distill": ["--mask-ratio", "0"], "pixel": ["--target", "pixels"]}
RAMPS = {  # candidates of the schedule arm: 0 -> 0.75 over part of the run
    "linear over 50 %": ["--mask-schedule", "linear", "--mask-ramp", "0.5"],
    "linear over 80 %": ["--mask-schedule", "linear", "--mask-ramp", "0.8"],
    "cosine over 50 %": ["--mask-schedule", "cosine", "--mask-ramp", "0.5"],
}
RANDOM = ["--steps", "1", "--lr", "0", "--warmup-steps", "0"]  # the initial weights, in the product's format
EVAL_SEEDS = {"train": 1000, "test": 2000, "val": 3000}
FRACTIONS = [0.01, 0.1, 1.0]
SIZES = dict(full=dict(img_size=128, images=4096, steps=1000, batch=32, eval_train=2000, eval_n=1000, seg_train=500,
                       seg_n=250, warmup=50),
             smoke=dict(img_size=32, images=64, steps=4, batch=8, eval_train=40, eval_n=20, seg_train=20, seg_n=12,
                        warmup=1))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="docs", help="folder for does_it_work_study.{md,json}")
    p.add_argument("--work", default="runs/does_it_work", help="the runs (one folder each, with config.json)")
    p.add_argument("--pretrain-seeds", default="0,1", help="pretraining seeds of the headline arms")
    p.add_argument("--probe-seeds", default="0,1,2")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--smoke", action="store_true", help="toy sizes: the pipeline end to end in about a minute")
    return p


def rendered(name: str, n: int, size: int, work: Path, masks: bool = True):
    """Synthetic labelled images (and lesion masks) of split ``name``, rendered once into ``work``."""
    path = work / f"{name}_{n}x{size}.pt"
    if path.exists():
        return torch.load(path, weights_only=True)
    x, y, m = synthetic.generate(n, size=size, seed=EVAL_SEEDS[name], masks=True)
    torch.save((x, y, m), path)
    return x, y, m


def pretrain_run(s: dict, work: Path, label: str, flags: list[str], seed: int, images) -> tuple[Path, dict]:
    """One product run (skipped when its folder holds a finished run of the same flags) -> (.pth, facts)."""
    out = work / label
    argv = [*STUDENT, "--img-size", str(s["img_size"]), "--batch-size", str(s["batch"]), "--steps", str(s["steps"]),
            "--warmup-steps", str(s["warmup"]), "--log-every", str(max(1, s["steps"] // 20)),
            "--synthetic-images", str(s["images"]), *flags, "--seed", str(seed), "--out", str(out)]
    facts_file = out / "facts.json"
    if not (facts_file.is_file() and json.loads(facts_file.read_text())["argv"] == argv):
        if (out / "config.json").is_file():  # a run of other flags, or one cut short: this script's own folder
            shutil.rmtree(out)
        t0 = time.perf_counter()
        cfg, _, _ = parse_config(argv)
        if pretrain(cfg, demo=False, data=images) != 0:
            raise SystemExit(f"error: the run {label} failed; its folder is {out}")
        facts_file.write_text(json.dumps(dict(argv=argv, seconds=time.perf_counter() - t0)) + "\n")
    done = sorted(out.glob("checkpoint-*.pth"))
    facts = json.loads((out / "facts.json").read_text())
    curve = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    return done[-1], dict(facts, loss_first=curve[0], loss_last=curve[-1], config=str(out / "config.json"))


class Ledger:
    """Probe rows kept beside the run they score (``<run>/<name>.jsonl``; the teacher's in ``<work>/teacher``):
    a stopped study reruns only the rows it had not finished, and a run trained again with other flags (its
    folder made anew) takes its old rows with it."""

    def __init__(self, folders: dict[str, Path], name: str):
        self.files = {label: Path(folder) / f"{name}.jsonl" for label, folder in folders.items()}
        self.records = []
        for label, file in self.files.items():
            for line in file.read_text().splitlines() if file.is_file() else []:
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:  # the line a kill cut short: that row runs again
                    continue
                if r["backbone"] == label:
                    self.records.append(r)

    def done(self) -> set:
        return {row_key(r) for r in self.records}

    def add(self, r: dict) -> None:
        self.files[r["backbone"]].parent.mkdir(parents=True, exist_ok=True)
        with self.files[r["backbone"]].open("a") as f:
            f.write(json.dumps(json_safe(r), default=float) + "\n")
        self.records.append(r)
        print(row_text(r), flush=True)

    def rows(self, protocols, seeds) -> list[dict]:
        return [r for r in self.records if r["protocol"] in protocols and r["seed"] in seeds]


def ledger(arms: dict[str, Path], teacher: str | None, keep: Path | None, name: str) -> Ledger | None:
    """The ledger of these arms' runs (the folder of each .pth) and the teacher's, or None (``keep`` None)."""
    if keep is None:
        return None
    return Ledger({**{label: pth.parent for label, pth in arms.items()}, **({"teacher": keep / "teacher"}
                                                                         if teacher else {})}, name)


def classify(arms: dict[str, Path], train, ev, ev_name, protocols, seeds, teacher: str | None,
             device="cpu", keep: Path | None = None) -> list[dict]:
    """Each arm's student (and ``teacher``, a pretrain --teacher spec, as the ceiling) probed on ``ev``; with
    ``keep`` (the work folder) every row is kept as it finishes, and the rows a rerun finds are not run again."""
    backbones = [resolve_backbone(f"{label}={pth}", "vit_tiny", "token", None) for label, pth in arms.items()]
    if teacher:
        backbones.append(resolve_backbone(f"teacher=teacher:{teacher}", "vit_tiny", "avg", train[0].shape[-1]))
    splits = {"train": Split(train[0].expand(-1, 3, -1, -1).contiguous(), train[1]),
              ev_name: Split(ev[0].expand(-1, 3, -1, -1).contiguous(), ev[1])}
    kept = ledger(arms, teacher, keep, f"probes_{ev_name}")
    records = run(backbones, splits, list(synthetic.CLASSES), protocols, FRACTIONS, seeds, torch.device(device),
                  progress=lambda line: print(line, flush=True), done=kept.done() if kept else (),
                  on_record=kept.add if kept else None)
    return kept.rows(protocols, seeds) if kept else records


def segment(arms: dict[str, Path], train, ev, s: dict, seeds, keep: Path) -> list[dict]:
    backbones = [resolve_backbone(f"{label}={pth}", "vit_tiny", "token", None) for label, pth in arms.items()]
    backbones.append(resolve_backbone(f"teacher=teacher:{TEACHER}", "vit_tiny", "token", s["img_size"]))
    cut = lambda split, n: SegSplit(split[0][:n].expand(-1, 3, -1, -1).contiguous(), split[2][:n])  # noqa: E731
    splits = {"train": cut(train, s["seg_train"]), "test": cut(ev, s["seg_n"])}
    cfg = EvalConfig(lp_epochs=40, lp_min_steps=300, lp_lr=0.1, batch_size=64)
    kept = ledger(arms, TEACHER, keep, "dense_test")
    run_segmentation(backbones, splits, list(synthetic.SEG_CLASSES), ["linear"], FRACTIONS, seeds,
                     torch.device("cpu"), cfg, progress=lambda line: print(line, flush=True), probe_batch=32,
                     done=kept.done(), on_record=kept.add)
    return kept.rows(["linear"], seeds)


def pooled(records: list[dict]) -> list[dict]:
    """Mean ± std over every pretraining x probe seed of an arm (``urfm@s0`` and ``urfm@s1`` -> ``urfm``)."""
    return summarize([{**r, "backbone": r["backbone"].partition("@")[0]} for r in records])


def choose_ramp(s, work, images, train, val, seeds) -> tuple[str, list[dict], dict]:
    """The ramp whose student probes best on the validation split (linear, mean over the label fractions)."""
    runs = {f"schedule[{name}]@s0": pretrain_run(s, work, f"ramp-{i}@s0", flags, 0, images)
            for i, (name, flags) in enumerate(RAMPS.items())}
    records = classify({k: v[0] for k, v in runs.items()}, train, val, "val", ["linear"], seeds, None, keep=work)
    score = {name: sum(r["accuracy"] for r in records if r["backbone"] == f"schedule[{name}]@s0") for name in RAMPS}
    facts = {f"ramp-{i}@s0": v[1] for i, v in enumerate(runs.values())}  # the run folders' names
    return max(score, key=score.get), records, facts


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    torch.set_num_threads(a.threads)
    s = SIZES["smoke" if a.smoke else "full"]
    work, out = Path(a.work), Path(a.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    t_start, cpu_start = time.perf_counter(), sum(os.times()[:2])
    pre_seeds, seeds = [int(x) for x in a.pretrain_seeds.split(",")], [int(x) for x in a.probe_seeds.split(",")]
    images = SyntheticSource(s["images"], s["img_size"], seed=0)  # the pretraining set, rendered once
    train = rendered("train", s["eval_train"], s["img_size"], work)
    val, test = (rendered(n, s["eval_n"], s["img_size"], work) for n in ("val", "test"))
    ramp, ramp_records, ramp_facts = choose_ramp(s, work, images, train, val, seeds)
    print(f"schedule: {ramp} (validation split)", flush=True)
    arms, facts = {}, {}
    for seed in pre_seeds:
        for arm, flags in {**ARMS, "schedule": RAMPS[ramp], "random": RANDOM}.items():
            label = f"{arm}@s{seed}"
            run_dir = f"ramp-{list(RAMPS).index(ramp)}@s{seed}" if arm == "schedule" else label
            arms[label], facts[label] = pretrain_run(s, work, run_dir, flags, seed, images)
    val_records = classify(arms, train, val, "val", ["linear", "knn"], seeds, None, keep=work)
    test_records = classify(arms, train, test, "test", ["linear", "attentive", "knn"], seeds, TEACHER, keep=work)
    seg_records = segment(arms, train, test, s, seeds, work)
    minutes, cpu = (time.perf_counter() - t_start) / 60, (sum(os.times()[:2]) - cpu_start) / 60
    keep_configs(out, {**ramp_facts, **facts})
    write(out, a, argv, s, ramp, facts, ramp_records, val_records, test_records, seg_records, minutes, cpu)
    return 0


def headline(summary: list[dict], protocols, key="accuracy") -> str:
    cell = {(r["backbone"], r["protocol"], r["fraction"]): r for r in summary}
    cols = [(p, f) for p in protocols for f in FRACTIONS]
    head = "| arm | " + " | ".join(f"{p} {f:.0%}" for p, f in cols) + " |"
    fmt = lambda r: "-" if r is None else f"{100 * r[key]:.1f} ± {100 * r[key + '_std']:.1f}"  # noqa: E731
    rows = [f"| {arm} | " + " | ".join(fmt(cell.get((arm, p, f))) for p, f in cols) + " |"
            for arm in dict.fromkeys(r["backbone"] for r in summary)]
    return "\n".join([head, "|---" * (len(cols) + 1) + "|", *rows])


def keep_configs(out: Path, facts: dict) -> None:
    """Each run's config.json, as its trainer wrote it, beside the results (does_it_work_runs/<arm@seed>.json)."""
    folder = out / "does_it_work_runs"
    folder.mkdir(exist_ok=True)
    for label, v in facts.items():
        shutil.copyfile(v["config"], folder / f"{label}.json")


def write(out: Path, a, argv, s, ramp, facts, ramp_records, val_records, test_records, seg_records, minutes, cpu):
    cmd = "python experiments/does_it_work.py " + " ".join(sys.argv[1:] if argv is None else argv)
    test, val, seg = pooled(test_records), pooled(val_records), pooled(seg_records)
    arm_flags = ", ".join(f"{k}: `{' '.join(v) or 'none'}`" for k, v in ARMS.items())
    runs = "\n".join(f"| {k} | {v['seconds']:.0f} | {v['loss_first']:.3f} -> {v['loss_last']:.3f} |"
                     for k, v in facts.items())
    (out / "does_it_work_study.md").write_text(
        f"# Does it work? The study through the product\n\n`{cmd.strip()}`: {minutes:.1f} min, {cpu:.1f} CPU-minutes "
        f"(user + system), load average {os.getloadavg()[1]:.1f} over the last 5 minutes.\n\n"
        f"Every arm: `python -m urfm_fast.pretrain` with `{' '.join(STUDENT)} --img-size {s['img_size']} "
        f"--batch-size {s['batch']} --steps {s['steps']} --warmup-steps {s['warmup']}` on {s['images']} synthetic "
        f"images, plus the arm's flags ({arm_flags}, "
        f"schedule: `{' '.join(RAMPS[ramp])}`, chosen on validation, random: one step at lr 0). Probes on "
        f"{s['eval_train']} labelled / {s['eval_n']} test images, seeds {a.probe_seeds}; pretraining seeds "
        f"{a.pretrain_seeds}. Mean ± std over all pretraining x probe seeds, in %.\n\n"
        f"## Test split: accuracy\n\n{headline(test, ['linear', 'attentive', 'knn'])}\n\n"
        f"## Test split: dense probe (linear, mean over the lesion classes)\n\nDice:\n\n"
        f"{headline(seg, ['linear'], 'dice')}\n\nPixel average precision (threshold-free):\n\n"
        f"{headline(seg, ['linear'], 'mean_ap')}\n\n"
        f"## Validation split: accuracy (the schedule rule)\n\n{headline(val, ['linear', 'knn'])}\n\n"
        f"## Choice of ramp (validation, linear probe, pretraining seed 0)\n\n"
        f"{headline(summarize(ramp_records), ['linear'])}\n\nChosen: {ramp}.\n\n"
        f"## Runs (seconds, loss first -> last logged)\n\n| run | s | loss |\n|---|---|---|\n{runs}\n\n"
        f"## Every metric (test)\n\n{format_table(test, markdown=True)}\n\n"
        f"## Every metric (dense probe, test)\n\n{format_table(seg, markdown=True)}\n")
    (out / "does_it_work_study.json").write_text(json.dumps(json_safe(dict(
        command=cmd.strip(), minutes=round(minutes, 2), cpu_minutes=round(cpu, 2), sizes=s, ramp=ramp, runs=facts,
        load_average=[round(x, 2) for x in os.getloadavg()], test=test, val=val, dense=seg,
        ramps=summarize(ramp_records), records=test_records + val_records + seg_records + ramp_records)),
        indent=1, default=str) + "\n")
    print(f"wrote {out}/does_it_work_study.{{md,json}} in {minutes:.1f} min", flush=True)


if __name__ == "__main__":
    sys.exit(main())
