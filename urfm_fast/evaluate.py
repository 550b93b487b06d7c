"""Downstream evaluation with label-efficiency curves: linear probe, k-NN and fine-tuning.

    python -m urfm_fast.evaluate --backbone mae_vit_base_patch16_dec768d8b_all_biomedclip_1199.pth \\
        --data /data/busi --protocol linear,knn,finetune --label-fractions 0.01,0.1,1.0 --seeds 0,1,2
    python -m urfm_fast.evaluate --backbone urfm=runs/a.pth random=random --arch vit_tiny \\
        --data synthetic --img-size 64 --protocol linear,knn      # a demo on the built-in lesion task
    python -m urfm_fast.evaluate --backbone runs/a.pth --data /data/ultrabench/mmotu_v1.0.0 --mask-key \\
        tumor_mask_binary --protocol linear,finetune              # segmentation (docs/evaluation_segmentation.md)

Backbones (``--backbone``, several allowed, each optionally ``label=spec``; all from local files except
``timm:NAME``, each loaded strictly: a missing or mis-shaped key stops with one line naming it): one of our
checkpoints, an official URFM file, an export folder, a DCP folder (anything ``load_checkpoint`` reads);
``mae:FILE`` (an MAE-layout ViT: facebookresearch/mae, USF-MAE, the released URFM files; architecture from
the shapes, decoder dropped); ``random`` (``--arch`` at random init); ``timm:MODEL=FILE`` (any timm model,
weights from a local safetensors or torch file); ``teacher:SPEC`` (any pretrain ``--teacher`` spec, e.g.
``teacher:efficientnet_lite0`` or a BiomedCLIP file, frozen at its own input size and mean/std: linear and
knn only); or a timm model name (``timm:NAME``, timm's pretrained weights, which need a network or a cache).

Data (``--data``): an ImageFolder root with ``train/`` and ``val/`` (and optional ``test/``) class
sub-folders; a shard folder from ``python -m urfm_fast.prepare`` plus ``--labels CSV`` (format below);
or ``synthetic`` (urfm_fast.data.synthetic's four lesion classes, rendered on the fly; train and val come
from different seeds). Images are read once, converted to 3-channel grey/RGB, resized (short side) and
centre-cropped to the backbone's input size. Metrics are computed on ``test`` when it exists, else on
``val``.

Segmentation (``--task segmentation``, implied by masks; docs/evaluation_segmentation.md): an UltraBench
folder (``train.json``, ``validation.json``, ``test.json``; ``--label-key`` picks a class field,
``--mask-key`` a mask field such as ``tumor_mask_binary``, automatic when there is one candidate;
``patient`` groups the label fractions; ``scan_mask`` blanks pixels outside the scan unless
``--no-scan-mask``), ``images/`` + ``masks/`` folders (optionally under ``train/ val/ test/``; masks are
PNGs of class ids) or ``synthetic-seg`` (the lesions' exact masks). Images and masks are resized whole to
the input size. Protocols: ``linear`` (BatchNorm without affine + a linear layer on frozen patch tokens,
``--probe-layers 4`` concatenates the last four blocks, logits bilinearly upsampled, loss ``--seg-loss``) and
``finetune`` (segmentation-models-pytorch's DPT over the backbone, layer-wise lr decay, cross-entropy + Dice
loss; ``pip install 'urfm_fast[seg]'``). Metrics from one confusion matrix over the evaluation split: mean
Dice and IoU over the foreground classes, per-class Dice and IoU, pixel accuracy; and per-pixel average
precision of each class on its softmax score, ``mean_ap`` over the foreground classes (``pixel AP``).

Labels CSV for a shard folder (--labels): a header row, then one row per labelled image, keyed in one of
two ways:
  index,label,split        index = 0-based position of the image in DIR/index.jsonl (= ShardDataset item)
  path,label,split[,frame] path = the source path as prepare read it ("path" inside its SRC folder, or
                           "src/path" to tell two sources apart; DIR/index.jsonl holds only salted hashes
                           of them, matched here with the folder's key: DIR.key or --key FILE), e.g.
                           "liver/p01.png" or "cines.zip/a/cine.dcm"; without a frame column (or with it
                           empty) every frame of that file gets the row
label is a class name or id (classes are ordered numerically when all are integers, else by name); split
is train, val or test. A train split and a val or test split are required; extra columns are ignored and
images without a row are not used. Example:
  path,label,split
  benign/001.png,benign,train
  malignant/007.png,malignant,val

Protocols (MAE/DINO conventions):
- ``linear``: frozen backbone, pooled features (CLS or mean of patch tokens, ``--global-pool``) computed
  once, then BatchNorm without affine + a linear layer trained with SGD (momentum 0.9, no weight decay).
- ``knn``: cosine similarity to the labelled training features, k nearest vote with weights
  exp(sim / T) (DINO: k=20, T=0.07).
- ``finetune``: the whole backbone + a new head, AdamW with layer-wise lr decay 0.65, drop-path 0.1,
  label smoothing 0.1, random-resized-crop + horizontal flip, warm-up + cosine, bf16 on GPU.
- ``attentive`` (not in the default list): frozen patch tokens computed once, then one cross-attention block
  with a learned query + LayerNorm + a linear layer (V-JEPA's attentive probe), AdamW (lr 1e-3), the linear
  probe's epochs and minimum steps; any backbone (teachers and CNNs through their token maps).

Label fractions are class-stratified and nested: for a seed, each class's training images are put in
a seeded random order once and a fraction takes its first ceil(fraction * n_class) (at least one).

Outputs in ``--out``: ``results.json`` (accuracy, macro-AUC, macro-F1, confusion matrix per backbone,
protocol, fraction and seed, plus mean/std) and ``table.txt`` (the table printed at the end), both rewritten
after every row; ``label_efficiency.png`` and, with tensorboard installed, the same curves as TensorBoard
scalars (``BACKBONE/PROTOCOL/accuracy`` etc., x = labelled training images). A line per row with the rows
done and the time left (an estimate after the first row). Progress bars on stderr while features are
extracted and while fine-tuning (off with ``--quiet`` or when stderr is not a terminal).

Interrupted (Ctrl-C: exit 130; SIGTERM: 143) or killed, a run keeps the rows it finished in results.json; the
same command again (same settings and --out) runs only the rows left; other settings with that --out are
refused unless ``--force`` (start over).

On a CPU with the built-in data (``synthetic``, ``synthetic-seg``) the run is sized as the demo (vit_tiny of
4 blocks at 64 px, fewer images and epochs; a line says which values it set); every flag given wins, and a
GPU or real data keeps the defaults below. ``--config FILE`` reads the flags' values from YAML or JSON
(keys: the flag names, e.g. ``lp_epochs: 50``), as pretrain does.
"""

from __future__ import annotations

import sys

from urfm_fast.cli_checks import FlagError


def build_parser():
    from urfm_fast.eval.config import build_parser

    return build_parser(__doc__)


def main(argv=None) -> int:
    import logging

    from urfm_fast.eval.config import parse_config

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        cfg, given = parse_config(argv, __doc__)
    except FlagError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from urfm_fast.eval.run import evaluate

    return evaluate(cfg, given, show_progress=not cfg.quiet and sys.stderr.isatty())


if __name__ == "__main__":
    sys.exit(main())
