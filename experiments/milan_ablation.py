"""Which of MILAN's three ingredients help URFM here? The study's urfm arm with each switch, through the product.

    python experiments/milan_ablation.py --out docs          # docs/milan_ablation.{md,json}
    python experiments/milan_ablation.py --smoke --out /tmp/m  # toy size (tests/test_experiments.py)

Variants of the ``urfm`` arm of experiments/does_it_work.py (same student, teacher, images, steps and seed;
each a ``python -m urfm_fast.pretrain`` run through its library entry, only the recipe flag differs):
``default`` (random masking, standard decoder, loss on the masked patches), ``attention``
(``--mask-type attention``), ``prompting`` (``--decoder prompting``), ``all_cls`` (``--loss-on all_cls``)
and ``milan`` (all three). ``random`` (the initial weights) is scored with them as the floor. Every score is
on the validation split: choosing a recipe never looks at the test split. Linear probe and k-NN at 1 %,
10 %, 100 % of the labels over ``--probe-seeds``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from does_it_work import RANDOM, SIZES, classify, pretrain_run, rendered

from urfm_fast.data.stream import SyntheticSource
from urfm_fast.eval.report import format_table, json_safe, summarize

VARIANTS = {
    "default": [],
    "attention": ["--mask-type", "attention"],
    "prompting": ["--decoder", "prompting"],
    "all_cls": ["--loss-on", "all_cls"],
    "milan": ["--mask-type", "attention", "--decoder", "prompting", "--loss-on", "all_cls"],
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="docs", help="folder for milan_ablation.{md,json}")
    p.add_argument("--work", default="runs/milan_ablation", help="the runs (one folder each, with config.json)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"subset of {', '.join(VARIANTS)}")
    p.add_argument("--probe-seeds", default="0,1,2")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--smoke", action="store_true", help="toy sizes: the pipeline end to end in about a minute")
    return p


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    names = a.variants.split(",")
    unknown = set(names) - set(VARIANTS)
    if unknown:
        print(f"error: --variants: unknown {', '.join(sorted(unknown))}; choose from {', '.join(VARIANTS)}",
              file=sys.stderr)
        return 2
    torch.set_num_threads(a.threads)
    s = SIZES["smoke" if a.smoke else "full"]
    work, out = Path(a.work), Path(a.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    images = SyntheticSource(s["images"], s["img_size"], seed=0)
    train, val = (rendered(n, s[k], s["img_size"], work) for n, k in (("train", "eval_train"), ("val", "eval_n")))
    runs = {name: pretrain_run(s, work, name, flags, 0, images) for name, flags in
            {"random": RANDOM, **{n: VARIANTS[n] for n in names}}.items()}
    records = classify({k: v[0] for k, v in runs.items()}, train, val, "val", ["linear", "knn"],
                       [int(x) for x in a.probe_seeds.split(",")], None)
    write(a, argv, out, s, {k: v[1] for k, v in runs.items()}, records, (time.perf_counter() - t_start) / 60)
    return 0


def write(a, argv, out: Path, s: dict, facts: dict, records: list[dict], minutes: float) -> None:
    cmd = "python experiments/milan_ablation.py " + " ".join(sys.argv[1:] if argv is None else argv)
    summary = summarize(records)
    losses = ", ".join(f"{k} {v['loss_first']:.3f} -> {v['loss_last']:.3f}" for k, v in facts.items() if k != "random")
    flags = "; ".join(f"{k}: `{' '.join(v) or 'none'}`" for k, v in VARIANTS.items())
    (out / "milan_ablation.md").write_text(
        f"# MILAN's ingredients, ablated\n\n`{cmd.strip()}`: {minutes:.1f} min.\n\n"
        f"Every variant: the urfm arm of experiments/does_it_work.py ({s['steps']} steps x {s['batch']} on "
        f"{s['images']} synthetic images at {s['img_size']} px) with its flag ({flags}). "
        f"Loss (first -> last logged; losses of different `--loss-on` are not comparable): {losses}.\n\n"
        f"Evaluation on the validation split: {s['eval_train']} labelled train / {s['eval_n']} images, linear "
        f"probe and k-NN over probe seeds {a.probe_seeds}. In %, mean ± std.\n\n"
        + format_table(summary, markdown=True) + "\n")
    (out / "milan_ablation.json").write_text(json.dumps(json_safe(dict(
        command=cmd.strip(), minutes=round(minutes, 2), sizes=s, variants=VARIANTS, runs=facts, summary=summary,
        records=records)), indent=1, default=str) + "\n")
    print(f"wrote {out}/milan_ablation.{{md,json}} in {minutes:.1f} min", flush=True)


if __name__ == "__main__":
    sys.exit(main())
