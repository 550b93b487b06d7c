"""Which of MILAN's three ingredients help URFM here? One ablation in the label-efficiency harness.

    python experiments/milan_ablation.py --out docs   # the committed run (docs/milan_ablation.md)

Variants of the ``urfm`` arm of experiments/label_efficiency.py (same ViT, common initial weights,
images, batches, mask noise, optimizer and steps; only the recipe switch differs):
``default`` (random masking, standard decoder, loss on the masked patches), ``attention``
(``mask_type=attention``), ``prompting`` (``decoder=prompting``), ``all_cls`` (``loss_on=all_cls``)
and ``milan`` (all three). ``random`` (the common initial weights, no pretraining) is scored with them
as the floor. The teacher runs once per image; its patch targets, CLS feature and saliency are
cached and shared by every variant. Every score is on the validation split (``--eval-split val``):
choosing a recipe never looks at the test split. Linear probe and k-NN at 1 %, 10 %, 100 % of the
labels over ``--seeds``; no fine-tuning. Writes ``milan_ablation.{md,json}`` to ``--out``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import label_efficiency as le  # noqa: E402  (the harness this ablation runs in)

from urfm_fast import URFM, URFMConfig
from urfm_fast.data import synthetic  # noqa: E402
from urfm_fast.eval.backbones import resolve_backbone  # noqa: E402
from urfm_fast.eval.data import Split  # noqa: E402
from urfm_fast.eval.report import format_table, summarize  # noqa: E402
from urfm_fast.eval.run import run  # noqa: E402

VARIANTS = {
    "default": {},
    "attention": dict(mask_type="attention"),
    "prompting": dict(decoder="prompting"),
    "all_cls": dict(loss_on="all_cls"),
    "milan": dict(mask_type="attention", decoder="prompting", loss_on="all_cls"),
}


def build_parser():
    p = le.build_parser()
    p.description = __doc__.split("\n\n")[0]
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"subset of {', '.join(VARIANTS)}")
    p.set_defaults(eval_split="val", no_finetune=True, ckpt_dir="runs/milan_ablation")
    return p


def tail_mean(curve: list[float], n: int = 20) -> float:
    return sum(curve[-n:]) / len(curve[-n:])


def pretrain_variants(a, base: URFMConfig, targets, images01: torch.Tensor, ckpt_dir: Path) -> dict:
    torch.manual_seed(a.seed)
    init = URFM(base).state_dict()  # the common starting point
    out = {"random": dict(path=ckpt_dir / "random.pth", curve=[], seconds=0.0)}
    torch.save({"model": init, "epoch": 0, "step": 0, "args": {"model": "vit_tiny"}, "config": base.to_dict()},
               out["random"]["path"])
    for name in a.variants.split(","):
        t0 = time.perf_counter()
        cfg = URFMConfig.from_dict({**base.to_dict(), **VARIANTS[name]})
        model = le.build_student(cfg, init)
        curve = le.pretrain("urfm", model, images01, targets, a)
        path = ckpt_dir / f"{name}.pth"
        torch.save({"model": model.state_dict(), "epoch": 0, "step": len(curve), "args": {"model": "vit_tiny"},
                    "config": cfg.to_dict(), "pretrain_loss": curve}, path)
        out[name] = dict(path=path, curve=curve, seconds=time.perf_counter() - t0)
        print(f"{name}: {out[name]['seconds']:.0f}s, loss {curve[0]:.3f} -> {tail_mean(curve):.3f}", flush=True)
    return out


def evaluate_variants(a, variants: dict, seeds: list[int]) -> list[dict]:
    x, y = synthetic.generate(a.eval_train, size=a.img_size, seed=le.EVAL_SEEDS["train"])
    xe, ye = synthetic.generate(a.eval_n, size=a.img_size, seed=le.EVAL_SEEDS[a.eval_split])
    splits = {"train": Split(x.expand(-1, 3, -1, -1).contiguous(), y),
              a.eval_split: Split(xe.expand(-1, 3, -1, -1).contiguous(), ye)}
    backbones = [resolve_backbone(f"{name}={v['path']}", "vit_tiny", a.pool, None) for name, v in variants.items()]
    return run(backbones, splits, list(synthetic.CLASSES), ["linear", "knn"], [0.01, 0.1, 1.0], seeds,
               torch.device("cpu"))


def write_outputs(a, argv, out: Path, variants: dict, summary: list[dict], records: list[dict], minutes: float):
    cmd = "python experiments/milan_ablation.py " + " ".join(argv if argv is not None else sys.argv[1:])
    losses = ", ".join(f"{k} {v['curve'][0]:.3f} -> {tail_mean(v['curve']):.3f}"
                       for k, v in variants.items() if v["curve"])
    (out / "milan_ablation.md").write_text(
        f"# MILAN's ingredients, ablated (teacher: {a.teacher})\n\n"
        f"`{cmd.strip()}`: {minutes:.1f} min with {a.threads} CPU threads.\n\n"
        f"Pretraining per variant: {a.pretrain_images} synthetic images, {a.steps} steps x {a.batch}, AdamW lr {a.lr}, "
        f"mask {a.mask_ratio}, ViT-Ti x {a.depth} blocks, {a.img_size}px, patch {a.patch}, decoder "
        f"{a.decoder_dim}d{a.decoder_depth}b. Loss (first step -> mean of the last 20; the losses of different "
        f"`loss_on` are not comparable): {losses}.\n\nEvaluation on the `{a.eval_split}` split: {a.eval_train} "
        f"labelled train / {a.eval_n} images, linear probe and k-NN over seeds {a.seeds}, no fine-tuning. "
        "Accuracy etc. in %, mean ± std.\n\n" + format_table(summary, markdown=True) + "\n")
    (out / "milan_ablation.json").write_text(json.dumps(dict(
        command=cmd.strip(), args=vars(a), minutes=round(minutes, 2), variants=VARIANTS, summary=summary,
        runs=records, pretrain_seconds={k: round(v["seconds"], 1) for k, v in variants.items()},
        pretrain_loss={k: v["curve"][::10] for k, v in variants.items()}), indent=1) + "\n")
    print(f"wrote {out}/milan_ablation.{{md,json}} in {minutes:.1f} min")


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    unknown = set(a.variants.split(",")) - set(VARIANTS)
    if unknown:
        print(f"error: --variants: unknown {', '.join(sorted(unknown))}; choose from {', '.join(VARIANTS)}",
              file=sys.stderr)
        return 2
    torch.set_num_threads(a.threads)
    out, ckpt_dir = Path(a.out), Path(a.ckpt_dir)
    t_start = time.perf_counter()
    base = le.student_config(a)  # the recipe flags at their defaults; each variant sets its own
    teacher = le.pretrained_teacher(a, base.grid_size)
    if teacher is None:
        return 2
    out.mkdir(parents=True, exist_ok=True)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    base = URFMConfig.from_dict({**base.to_dict(), "target_dim": teacher.out_dim})
    images01, _ = le.synthetic01(a.pretrain_images, a.img_size, a.seed)  # labels never used
    t0 = time.perf_counter()
    targets = le.teacher_targets(teacher, images01, base.grid_size, cls=True, saliency=True)
    targets = le.apply_stats(targets, le.target_stats(targets, a.target_center, a.target_std))
    print(f"{len(images01)} images, teacher targets, CLS and saliency in {time.perf_counter() - t0:.0f}s", flush=True)
    variants = pretrain_variants(a, base, targets, images01, ckpt_dir)
    records = evaluate_variants(a, variants, [int(s) for s in a.seeds.split(",")])
    summary = summarize(records)
    write_outputs(a, argv, out, variants, summary, records, (time.perf_counter() - t_start) / 60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
