"""Running an evaluation: the backbones and the data of an EvalConfig, every backbone x protocol x fraction x
seed (one row each), and the outputs. results.json and table.txt are rewritten after every row, so a killed or
interrupted run keeps the rows it finished and a rerun with the same settings and --out runs only the rest.
The command (urfm_fast.evaluate) parses the flags and calls ``evaluate``."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import signal
import sys
import time
from pathlib import Path

import torch

from urfm_fast.eval.attentive import attentive_probe
from urfm_fast.eval.backbones import Backbone, resolve_backbone
from urfm_fast.eval.config import SEG_PROTOCOLS, EvalConfig, cpu_demo_line, fit_machine, protocol_list
from urfm_fast.eval.data import Split, load_data, sweep, train_and_eval
from urfm_fast.eval.protocols import classification_metrics, extract_features, finetune, knn_classify, linear_probe
from urfm_fast.eval.report import format_table, plot, row_text, summarize, write_events, write_json
from urfm_fast.eval.segmentation import check_probe_layers, extract_tokens, run_segmentation

INTERRUPTED = "interrupted; rerun the same command to continue"
# settings that do not change a row's result: a rerun may differ in them and still continue
NOT_RESULTS = ("out", "force", "quiet", "threads")


def row_key(r: dict) -> tuple:
    return r["backbone"], r["protocol"], float(r["fraction"]), int(r["seed"])


def run(backbones: list[Backbone], splits: dict[str, Split], classes: list[str], protocols, fractions, seeds,
        device, cfg: EvalConfig | None = None, progress=print, done=(), on_record=None,
        show_progress: bool = False) -> list[dict]:
    """Every backbone x protocol x fraction x seed not in ``done`` (keys: row_key); one record per row, each
    handed to ``on_record`` as it finishes (default: its line to ``progress``)."""
    cfg = cfg or EvalConfig()
    train, eval_name, ev = train_and_eval(splits)
    C = len(classes)

    def features(bb, protocols):
        """Frozen pooled features (linear, knn) and patch tokens (attentive) of both splits, computed once."""
        wanted = {"features": bool({"linear", "knn"} & protocols), "tokens": "attentive" in protocols}
        out = {}
        for what, extract in (("features", extract_features), ("tokens", extract_tokens)):
            if not wanted[what]:
                continue
            t0 = time.perf_counter()
            model = bb.make()
            out[what] = tuple(extract(model, split.images, bb, device, cfg.batch_size, show_progress=show_progress)
                              for split in (train, ev))
            progress(f"[{bb.label}] {what} {tuple(out[what][0].shape)} + {tuple(out[what][1].shape)} "
                     f"in {time.perf_counter() - t0:.1f}s")
        return out

    def score(bb, protocol, seed, idx, prepared):
        feats, toks = prepared.get("features"), prepared.get("tokens")
        if protocol == "attentive":
            probs = attentive_probe(toks[0][idx], train.labels[idx], toks[1], C, seed, epochs=cfg.lp_epochs,
                                    min_steps=cfg.lp_min_steps)
        elif protocol == "linear":
            probs = linear_probe(feats[0][idx], train.labels[idx], feats[1], C, seed, epochs=cfg.lp_epochs,
                                 lr=cfg.lp_lr, min_steps=cfg.lp_min_steps)
        elif protocol == "knn":
            probs = knn_classify(feats[0][idx], train.labels[idx], feats[1], C, k=cfg.knn_k, temperature=cfg.knn_t)
        else:
            probs = finetune(bb, Split(train.images[idx], train.labels[idx]), ev.images, C, seed, device, cfg,
                             show_progress=show_progress)
        return classification_metrics(probs.float().numpy(), ev.labels.numpy(), C)

    return sweep(backbones, train, train.labels.numpy(), eval_name, len(ev.labels), protocols, fractions, seeds,
                 features, score, done, on_record or (lambda r: progress(row_text(r))))


# ---------------------------------------------------------------------------------------------
# Checks before the work


def check_task(task: str, protocols: list[str], backbones: list[Backbone] = (), probe_layers: int = 1) -> None:
    """What a task cannot run, as one line (ValueError), before any work."""
    frozen = [b for b in backbones if b.meta.get("trainable") is False]
    if frozen and "finetune" in protocols:
        raise ValueError(f"--protocol finetune: backbone {frozen[0].label!r} ({frozen[0].spec}) is a frozen "
                         "teacher; it can be probed (linear" + (")" if task == "segmentation" else ", knn)")
                         + ", not fine-tuned")
    if task != "segmentation":
        return
    bad = [p for p in protocols if p not in SEG_PROTOCOLS]
    if bad:
        raise ValueError(f"--protocol {bad[0]} is a classification protocol; segmentation runs "
                         f"{', '.join(SEG_PROTOCOLS)}")
    if "finetune" in protocols:
        if importlib.util.find_spec("segmentation_models_pytorch") is None:
            raise ValueError("--protocol finetune --task segmentation needs segmentation-models-pytorch: "
                             "pip install 'urfm_fast[seg]'")
    if probe_layers > 1 and "linear" in protocols:
        for b in backbones:
            check_probe_layers(b.make(), probe_layers, b.label)


def task_protocols(cfg: EvalConfig, task: str, protocols: list[str]) -> list[str]:
    """The protocols to run: the default list less those a segmentation task has no use for (knn)."""
    if task == "segmentation" and cfg.protocol == EvalConfig.protocol:
        return [p for p in protocols if p in SEG_PROTOCOLS]
    return protocols


def load_inputs(cfg: EvalConfig) -> tuple[list[Backbone], str, dict, list[str], int]:
    """The backbones and the data: (backbones, task, splits, classes, input size)."""
    from urfm_fast.eval.seg_data import load_task

    def resolve(size):
        return [resolve_backbone(s, cfg.arch, cfg.global_pool, size, cfg.weights, cfg.depth) for s in cfg.backbone]

    backbones = resolve(cfg.img_size)
    size = cfg.img_size or backbones[0].img_size
    if any(b.img_size != size for b in backbones):
        # Native sizes differ (e.g. a 64-px checkpoint beside a 224-px one): every backbone gets the
        # first one's input size (position embeddings resampled), as the data is read once at that size.
        print(f"backbones differ in input size; all run at {size}px (the first backbone's; set --img-size)")
        backbones = resolve(size)
    found = load_task(cfg.data, size, cfg.task, cfg.labels, cfg.synthetic_train, cfg.synthetic_val, cfg.label_key,
                      cfg.mask_key, cfg.scan_mask, cfg.num_classes)
    if found is None:
        if cfg.task == "segmentation":
            raise ValueError(f"{cfg.data}: --task segmentation needs masks: an UltraBench folder with a *_mask "
                             "field, images/ + masks/ folders, or synthetic-seg")
        found = ("classification", *load_data(cfg.data, size, cfg.labels, cfg.synthetic_train, cfg.synthetic_val,
                                              key=cfg.key))
    task, splits, classes = found
    if cfg.task != "auto" and task != cfg.task:
        raise ValueError(f"{cfg.data}: holds a {task} task, not {cfg.task} (--task)")
    return backbones, task, splits, classes, size


def settings(cfg: EvalConfig) -> dict:
    """The config as results.json records it (JSON types)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def finished_rows(cfg: EvalConfig) -> list[dict]:
    """The rows a results.json in --out already holds, when it was written with the same settings (a rerun
    continues it); none with --force. Another run's results.json is refused (ValueError)."""
    path = Path(cfg.out) / "results.json"
    if cfg.force or not path.exists():
        return []
    try:
        old = json.loads(path.read_text())
        old_args, runs = old["args"], old["runs"]
    except (OSError, ValueError, KeyError, TypeError):
        raise ValueError(f"{path} exists and is not evaluate's results; pass --force or another --out") from None
    now = settings(cfg)
    differ = [k for k in now if k not in NOT_RESULTS and old_args.get(k) != now[k]]
    if differ:
        flag = "--" + differ[0].replace("_", "-")
        raise ValueError(f"{path} exists from other settings ({flag} {old_args.get(differ[0])} there, "
                         f"{now[differ[0]]} now); pass --force or another --out")
    return runs


# ---------------------------------------------------------------------------------------------
# Rows: progress, estimate, results after every row


class Rows:
    """The rows of a run: prints each as it finishes with the count and the time left (from the rows of the same
    protocol so far, else all rows so far), and rewrites results.json and table.txt."""

    def __init__(self, planned: list[tuple], previous: list[dict], out: Path, header: dict):
        self.planned, self.records, self.out, self.header = planned, list(previous), out, header
        self.wall: dict[str, list[float]] = {}
        self.t0 = self.last = time.perf_counter()

    def left_s(self) -> float:
        done = {row_key(r) for r in self.records}
        every = [s for v in self.wall.values() for s in v]
        per = {p: sum(v) / len(v) for p, v in self.wall.items()}
        return sum(per.get(k[1], sum(every) / len(every)) for k in self.planned if k not in done)

    def add(self, rec: dict) -> None:
        now = time.perf_counter()
        self.wall.setdefault(rec["protocol"], []).append(now - self.last)  # features and loading included
        self.last = now
        self.records.append(rec)
        self.write()
        n, left = len(self.records), self.left_s()
        print(f"{row_text(rec)}  [row {n}/{len(self.planned)}, {now - self.t0:.0f}s, ~{minutes(left)} left]",
              flush=True)
        if len(self.wall) == 1 and len(self.wall[rec["protocol"]]) == 1 and n < len(self.planned):
            print(f"estimate: about {minutes(left)} for the {len(self.planned) - n} rows left (from this row; "
                  "refined as each protocol runs, fine-tuning rows take longest)", flush=True)

    def write(self) -> list[dict]:
        summary = summarize(self.records)
        self.out.mkdir(parents=True, exist_ok=True)
        write_json(self.out / "results.json", dict(self.header, summary=summary, runs=self.records))
        tmp = self.out / "table.txt.tmp"
        tmp.write_text(format_table(summary) + "\n")
        tmp.replace(self.out / "table.txt")
        return summary


def minutes(s: float) -> str:
    return f"{s:.0f}s" if s < 90 else f"{s / 60:.1f} min"


class Interrupted(BaseException):
    """SIGTERM, raised where the run is (as SIGINT raises KeyboardInterrupt)."""


def _on_sigterm(signum, frame):
    raise Interrupted(signum)


# ---------------------------------------------------------------------------------------------
# The command's one function


def evaluate(cfg: EvalConfig, given: dict, show_progress: bool = False) -> int:
    """Run the evaluation ``cfg`` describes (``given``: the values the user set; the CPU sizing keeps them).
    Returns the exit code: 0, 2 (bad input, one line), 130 (SIGINT) or 143 (SIGTERM)."""
    old = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return _evaluate(cfg, given, show_progress)
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr)
        return 130
    except Interrupted:
        print(INTERRUPTED, file=sys.stderr)
        return 143
    finally:
        signal.signal(signal.SIGTERM, old)


def _device(cfg: EvalConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def _evaluate(cfg: EvalConfig, given: dict, show_progress: bool) -> int:
    from urfm_fast.checkpoints.formats import CheckpointError

    device = _device(cfg)
    cfg, applied = fit_machine(cfg, given, device.type == "cpu")
    if applied:
        print(cpu_demo_line(applied))
    protocols = protocol_list(cfg)
    try:
        early = "segmentation" if cfg.data == "synthetic-seg" or cfg.mask_key else cfg.task
        check_task(early, task_protocols(cfg, early, protocols))
        previous = finished_rows(cfg)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        backbones, task, splits, classes, size = load_inputs(cfg)
        protocols = task_protocols(cfg, task, protocols)
        check_task(task, protocols, backbones, cfg.probe_layers)
    except (CheckpointError, ValueError, OSError, RuntimeError) as e:
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    print(f"data {cfg.data}: {task}, {len(classes)} classes, "
          + ", ".join(f"{k} {len(v.images)}" for k, v in splits.items()) + f", {size}px; device {device}")
    planned = [(b.label, p, float(f), int(s)) for b in backbones for p in protocols for f in cfg.label_fractions
               for s in cfg.seeds]
    previous = [r for r in previous if row_key(r) in set(planned)]
    if previous:
        print(f"continuing {Path(cfg.out) / 'results.json'}: {len(previous)} of {len(planned)} rows already done "
              "(skipped; --force starts over)")
    header = dict(args=settings(cfg), task=task, classes=classes, backbones={b.label: b.meta for b in backbones})
    rows = Rows(planned, previous, Path(cfg.out), header)
    runner = run_segmentation if task == "segmentation" else run
    runner(backbones, splits, classes, protocols, cfg.label_fractions, cfg.seeds, device, cfg,
           done={row_key(r) for r in previous}, on_record=rows.add, show_progress=show_progress)
    summary = rows.write()
    print(format_table(summary))
    out = Path(cfg.out)
    write_events(summary, out)
    png = plot(summary, out / "label_efficiency.png")
    print(f"wrote {out / 'results.json'} and {png}")
    return 0
