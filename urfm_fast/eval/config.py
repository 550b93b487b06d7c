"""The evaluation config: one dataclass, the single source of evaluate's defaults. Its fields generate the
flags (urfm_fast.config.add_config_flags, as pretrain's TrainConfig does), ``--config FILE`` reads the same
names from YAML or JSON, and the protocols receive it. On a CPU the built-in data runs at the demo's size
(``CPU_DEMO``) unless a flag says otherwise. This module imports neither torch nor timm, so ``--help`` and a
bad flag answer at once."""

from __future__ import annotations

import argparse
import dataclasses
import re
from dataclasses import dataclass

from urfm_fast.cli_checks import FlagError, check_writable_now, existing, float_in, int_in, writable_dir
from urfm_fast.config import add_config_flags, config_field, read_config_values

PROTOCOLS = ("linear", "knn", "finetune", "attentive")
SEG_PROTOCOLS = ("linear", "finetune")
SEG_LOSSES = ("ce", "ce_dice", "weighted_ce")
DEFAULT_PROTOCOLS = "linear,knn,finetune"
BUILT_IN_DATA = ("synthetic", "synthetic-seg")


def floats(s: str) -> list[float]:
    return [float(v) for v in s.split(",") if v]


def ints(s: str) -> list[int]:
    return [int(v) for v in s.split(",") if v]


@dataclass
class EvalConfig:
    backbone: list[str] | None = config_field(
        None, "[label=]checkpoint|mae:FILE|random|timm:MODEL=FILE|teacher:SPEC|timm:NAME (below)", nargs="+")
    data: str | None = config_field(None, "ImageFolder root, shard folder (with --labels), UltraBench folder, "
                                          "images/ + masks/ folders, 'synthetic' or 'synthetic-seg'")
    task: str = config_field("auto", "auto: segmentation when --data holds masks (or --mask-key), else "
                                     "classification", choices=["auto", "classification", "segmentation"])
    label_key: str | None = config_field(None, "UltraBench: the class field of the records (e.g. pathology)",
                                         metavar="KEY")
    mask_key: str | None = config_field(None, "UltraBench: the mask field of the records (e.g. tumor_mask)",
                                        metavar="KEY")
    scan_mask: bool = config_field(True, "UltraBench: set the pixels outside each record's scan_mask to 0")
    num_classes: int | None = config_field(None, "segmentation: classes incl. background (default: the largest "
                                                 "class id in the masks + 1; a larger id is an error)")
    probe_layers: int = config_field(1, "segmentation linear probe: patch tokens of the last block, or of the "
                                        "last four concatenated (DINOv2)", choices=[1, 4])
    seg_loss: str = config_field(
        "weighted_ce", "segmentation linear probe's loss: ce (per-pixel cross-entropy), ce_dice (+ soft Dice, as "
                       "the DPT fine-tune) or weighted_ce (class weights f ** -1/2 of the training masks' pixel "
                       "frequencies f). Plain ce lets a small foreground vanish into the background; weighted_ce "
                       "had the best lesion Dice on synthetic-seg validation data (docs/evaluation_segmentation.md)",
        choices=list(SEG_LOSSES))
    labels: str | None = config_field(None, "labels of a shard folder: CSV path,label,split[,frame] or "
                                            "index,label,split (format below)", metavar="CSV")
    key: str | None = config_field(None, "the key of the shard folder, for --labels that name files by path "
                                         "(default: DATA.key beside the folder, as prepare writes it)", metavar="FILE")
    protocol: str = config_field(DEFAULT_PROTOCOLS, "comma list of linear, knn, finetune, attentive "
                                                    "(segmentation: linear and finetune only)")
    label_fractions: tuple[float, ...] = config_field(
        (0.01, 0.1, 1.0), "fractions of the labelled training images, each in (0, 1]", type=floats,
        metavar="F,F,...")
    seeds: tuple[int, ...] = config_field((0, 1, 2), "seeds of the label subsets and the trained heads", type=ints,
                                          metavar="S,S,...")
    out: str = config_field("runs/evaluate", "folder for results.json, label_efficiency.png and, with tensorboard "
                                             "installed, its event files")
    force: bool = config_field(False, "overwrite results already in --out", action="store_true")
    weights: str = config_field("auto", "checkpoint weights: auto = the EMA once it has had >= 1/(1-decay) "
                                        "updates, else live", choices=["auto", "ema", "live"])
    arch: str = config_field("vit_base", "architecture of --backbone random")
    depth: int | None = config_field(None, "blocks of --backbone random (default: --arch's; 4 at the CPU demo's "
                                           "size, as pretrain's demo)")
    img_size: int | None = config_field(None, "input size (default: the backbone's)")
    global_pool: str = config_field("token", "pooled feature: CLS token or mean of the patch tokens",
                                    choices=["token", "avg"])
    device: str = config_field("auto", "auto | cpu | cuda | cuda:N | mps")
    batch_size: int = config_field(256, "feature-extraction batch")
    lp_epochs: int = config_field(100, "linear-probe epochs")
    lp_lr: float = config_field(0.1, "linear-probe learning rate (SGD)")
    lp_min_steps: int = config_field(300, "linear-probe steps at least (tiny fractions)")
    knn_k: int = config_field(20, "neighbours of the k-NN vote")
    knn_t: float = config_field(0.07, "temperature of the k-NN vote weights")
    ft_epochs: int = config_field(30, "fine-tuning epochs")
    ft_min_steps: int = config_field(100, "fine-tuning steps at least (tiny fractions)")
    ft_batch_size: int = config_field(64, "fine-tuning batch")
    ft_blr: float = config_field(1e-3, "fine-tuning base lr: lr = blr * batch / 256 (MAE)")
    synthetic_train: int = config_field(2000, "training images of --data synthetic")
    synthetic_val: int = config_field(1000, "evaluation images of --data synthetic")
    threads: int | None = config_field(None, "torch CPU threads (default: torch's choice)")
    quiet: bool = config_field(False, "no progress bars (also off when stderr is not a terminal)",
                               action="store_true")


COMMA_LISTS = ("label_fractions", "seeds")  # a list in a --config file is one comma list
# The built-in data on a CPU (no GPU in use): the demo's size, as pretrain's demo (train/config.py DEMO_CPU)
# sizes itself, so `--backbone random --data synthetic` finishes in minutes on two cores. Flags given win.
CPU_DEMO = dict(arch="vit_tiny", depth=4, img_size=64, synthetic_train=320, synthetic_val=160, lp_epochs=10,
                lp_min_steps=50, ft_epochs=1, ft_min_steps=10, ft_batch_size=16)
CPU_DEMO_SEG = dict(CPU_DEMO, synthetic_train=160, synthetic_val=80, ft_batch_size=8)  # DPT's full-size decoder


def cpu_demo_line(applied: dict) -> str:
    """One line: what the CPU sizing set (only the values it did set)."""
    shown = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in applied.items())
    return (f"CPU and built-in data: running at the demo's size ({shown}); any of these flags given wins, "
            "and a GPU runs the full size")


def build_parser(doc: str = "") -> argparse.ArgumentParser:
    """evaluate's flags, one per EvalConfig field; ``doc`` (the command's docstring) gives the description
    and the epilog of --help."""
    from urfm_fast.cli_checks import DefaultsHelpFormatter, OneLineParser

    head, _, tail = doc.partition("\n\n")
    p = OneLineParser(prog="python -m urfm_fast.evaluate", description=head, epilog=tail,
                      formatter_class=DefaultsHelpFormatter,
                      argument_default=argparse.SUPPRESS)  # so we know which flags were given
    p.add_argument("--config", metavar="FILE", help="a YAML or JSON file of flag values, keyed by the field names "
                   "below (batch_size: 256; lists as [0.1, 1.0] or 0.1,1.0); flags given on the command line win; "
                   "results.json holds the resolved values")
    add_config_flags(p, EvalConfig, hide_false=True)
    return p


def parse_config(argv: list[str] | None, doc: str = "") -> tuple[EvalConfig, dict]:
    """-> (config, the values given: flags over a --config file's). Every value checked (one line)."""
    given = vars(build_parser(doc).parse_args(argv))
    if "config" in given:  # the file's values, then the flags given on the command line over them
        given = {**read_config_values(given.pop("config"), EvalConfig, build_parser, COMMA_LISTS), **given}
    missing = [f"--{name}" for name in ("backbone", "data") if given.get(name) is None]
    if missing:
        raise FlagError(f"the following arguments are required: {', '.join(missing)}")
    cfg = EvalConfig(**given)
    check_config(cfg)
    return cfg, given


def protocol_list(cfg: EvalConfig) -> list[str]:
    protocols = [p.strip() for p in cfg.protocol.split(",") if p.strip()]
    bad = [p for p in protocols if p not in PROTOCOLS] or ([] if protocols else ["(none)"])
    if bad:
        raise FlagError(f"unknown protocol {bad[0]!r}; choose from {', '.join(PROTOCOLS)}")
    return protocols


def check_config(cfg: EvalConfig) -> None:
    """Every value in range before any work (cli_checks.FlagError: one line, exit 2)."""
    protocol_list(cfg)
    if not cfg.label_fractions or not cfg.seeds:
        raise FlagError("--label-fractions and --seeds need at least one value each")
    for f in cfg.label_fractions:
        float_in("label_fractions", f, 0.0, 1.0, lo_open=True)
    for seed in cfg.seeds:
        int_in("seeds", seed, 0, 2**32 - 1)
    if cfg.img_size is not None:
        int_in("img_size", cfg.img_size, 16, 2048)
    if cfg.depth is not None:
        int_in("depth", cfg.depth, 1, 64)
    for name, lo, hi in (("batch_size", 1, 65536), ("lp_epochs", 1, 10**5), ("lp_min_steps", 0, 10**7),
                         ("knn_k", 1, 10**6), ("ft_epochs", 1, 10**4), ("ft_min_steps", 0, 10**7),
                         ("ft_batch_size", 1, 65536),
                         ("synthetic_train", 8, 10**6), ("synthetic_val", 4, 10**6)):
        int_in(name, getattr(cfg, name), lo, hi)
    if cfg.threads is not None:
        int_in("threads", cfg.threads, 1, 1024)
    for name, hi in (("lp_lr", 100.0), ("knn_t", 100.0), ("ft_blr", 10.0)):
        float_in(name, getattr(cfg, name), 0.0, hi, lo_open=True)
    if cfg.data not in BUILT_IN_DATA:
        existing("data", cfg.data, "dir")
    if cfg.num_classes is not None:
        int_in("num_classes", cfg.num_classes, 2, 256)
    if cfg.labels is not None:
        existing("labels", cfg.labels, "file")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", cfg.device):
        raise FlagError(f"--device {cfg.device}: must be auto, cpu, cuda, cuda:N or mps")
    check_writable_now(writable_dir("out", cfg.out))  # a read-only disk now, not after all the work


def fit_machine(cfg: EvalConfig, given: dict, on_cpu: bool) -> tuple[EvalConfig, dict]:
    """The built-in data on a CPU runs at CPU_DEMO's size, less the values given; -> (config, what was set)."""
    if not on_cpu or cfg.data not in BUILT_IN_DATA:
        return cfg, {}
    preset = CPU_DEMO_SEG if cfg.data == "synthetic-seg" else CPU_DEMO
    applied = {k: v for k, v in preset.items() if k not in given}
    return dataclasses.replace(cfg, **applied), applied
