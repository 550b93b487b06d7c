"""URFM pretraining: a ViT student predicts frozen BiomedCLIP patch features of the masked patches.

This module is the entry point only: parse the flags, call ``train.trainer.pretrain`` (plan, Trainer, run),
and turn every known failure into one line and an exit code. The pieces (see docs/architecture.md):
train/config.py (flags), train/plan.py (every derived value), train/distributed.py, train/parallelize.py,
train/checkpointing.py, train/metrics.py, train/preemption.py (signals) and train/trainer.py (the loop);
train/faults.py holds the tests' fault injection.

    # a demo on built-in synthetic ultrasound (tiny model on CPU, ViT-B for a short while on a GPU)
    python -m urfm_fast.pretrain
    # a real run: the full recipe on a folder of images (or a shard folder from urfm_fast.prepare)
    python -m urfm_fast.pretrain --data /path/to/images --teacher /path/to/open_clip_pytorch_model.bin
    # one node, 8 GPUs (FSDP2 + bf16 + per-block torch.compile)
    torchrun --nproc_per_node 8 -m urfm_fast.pretrain --data /data/us_shards --teacher ...
    # several shard folders as one stream, weighted (default: by size; see docs/archives.md)
    torchrun --nproc_per_node 8 -m urfm_fast.pretrain --data /data/liver /data/thyroid --data-weights 0.7,0.3 ...
    # continue a stopped or preempted run exactly where it stopped
    python -m urfm_fast.pretrain --out runs/<name> --resume

Logged per step: loss, lr, grad norm, images/s, MFU (GPU), peak memory; ``metrics.jsonl`` and the
resolved ``config.json`` live in ``--out``; resumable DCP checkpoints in ``--out/checkpoints`` (written
in the background while training goes on, renamed into place only when complete); a URFM-format
``checkpoint-XXXXXXXX.pth`` at the end, on preemption and every ``--pth-every`` steps.
"""

from __future__ import annotations

import logging
import os
import sys

from urfm_fast.train.config import Stop, UsageError, build_parser, cuda_wanted, demo_teacher_line, parse_config


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    if text.startswith("Caught ") and "Original Traceback" in text:  # re-raised from a DataLoader worker
        text = text.splitlines()[-1].split(": ", 1)[-1]  # "urfm_fast.data.stream.DataError: <the message>"
    return text.splitlines()[0] if text else type(e).__name__


def main(argv: list[str] | None = None) -> int:
    """Known failures become one clear message and an exit code, never a traceback."""
    argv = sys.argv[1:] if argv is None else argv
    rank = int(os.environ.get("RANK", 0))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(message)s")
    build_parser().parse_args(argv)  # --help and argparse's own errors end here, before torch is imported
    import torch
    import torch.distributed as dist

    from urfm_fast.checkpoints.formats import CheckpointError
    from urfm_fast.data.dataset import DataError
    from urfm_fast.model.teacher import TeacherUnavailable
    from urfm_fast.train.distributed import fail_fast, is_collective_failure, report
    from urfm_fast.train.trainer import pretrain

    # process-wide settings a run changes (--deterministic, TF32 for fp32): restored for the caller
    settings = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
                torch.get_float32_matmul_precision())
    try:
        cfg, given, demo = parse_config(argv)
        if demo and rank == 0:
            cuda = cuda_wanted(given.get("device", "auto"))
            where = "GPU: ViT-B recipe for a short while" if cuda else "CPU: tiny model, small images"
            print(f"DEMO: no --data given, so this is a short demo on built-in synthetic ultrasound ({where}).\n"
                  "For a real run pass --data DIR (a folder of images) and --teacher PATH. See --help.",
                  flush=True)
            if "teacher" not in given and not given.get("resume"):  # chosen now (a resumed run keeps its own)
                print(demo_teacher_line(cfg.teacher), flush=True)
        return pretrain(cfg, demo)
    except Stop as e:
        report(str(e), rank)
        return e.code
    except (DataError, CheckpointError, TeacherUnavailable, UsageError) as e:
        report(f"error: {_one_line(e)}", rank)
        return 2
    except ValueError as e:  # a flag value (FlagError) or a file a loader refused (e.g. a wrong --teacher file)
        report(f"error: {_one_line(e)}", rank)
        return 2
    except OSError as e:  # a full or read-only disk, a vanished file: one line, not a traceback
        report(f"error: {e.filename or ''}{': ' if e.filename else ''}{e.strerror or e}; check the disk and "
               "permissions of --out and the input paths", rank)
        return 2
    except KeyboardInterrupt:  # before the loop began (the loop says where to continue)
        report("interrupted; rerun the same command to continue", rank)
        return 130
    except Exception as e:  # outside the loop (start-up, final save): the same fail-fast, less context
        if int(os.environ.get("WORLD_SIZE", 1)) > 1 and is_collective_failure(e):
            fail_fast(rank, e, "outside the training loop")
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        torch.use_deterministic_algorithms(settings[0], warn_only=settings[1])
        torch.set_float32_matmul_precision(settings[2])


if __name__ == "__main__":
    sys.exit(main())
