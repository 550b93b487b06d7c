"""`python -m urfm_fast.prepare SRC [SRC ...] [--list FILE] --out DIR`: ultrasound archives (images, DICOM,
video, volumes, zips) -> a de-identified shard folder for `python -m urfm_fast.pretrain --data DIR`.

The command parses its flags and calls urfm_fast.data.convert (the pipeline), urfm_fast.data.review (the
review sheet) or the merge of parts; what the folder holds is listed in urfm_fast.data.shards.

    python -m urfm_fast.prepare /data/us_archive --out /data/us_shards --review 64
    python -m urfm_fast.prepare /data/us_archive --out /scratch/us_shards --key ~/keys/us.key --part 3/16
    python -m urfm_fast.prepare --out /scratch/us_shards --merge
    python -m urfm_fast.prepare --out /data/us_shards --show 17     # index line 17 at full size
"""

import os
import sys

from urfm_fast.cli_checks import OneLineParser
from urfm_fast.data import convert, media, review, shards, sources

INTERRUPTED = 130  # the shell's code for a command ended by Ctrl-C


def _parser():
    ap = OneLineParser(
        prog="python -m urfm_fast.prepare",
        epilog=convert.MEMORY_NOTE + " Only regular files are read: FIFOs, devices and links to them are listed as "
        "skipped, unopened; symlinked folders are followed once each. Zip members are refused by their declared "
        f"size (over {sources.MAX_MEMBER_BYTES >> 30} GiB) or compression ratio (over {sources.MAX_MEMBER_RATIO}:1) "
        "before a byte is decompressed. One prepare at a time per --out (a lock file). Video clips and volumes need "
        f"the media extra ({media.EXTRA}); a volume's data over {media.MAX_VOLUME_BYTES >> 20} MiB is refused "
        "before it is read.",
        description="Convert folders and zip archives of ultrasound images (PNG, JPEG, BMP, TIFF), DICOM "
        "(cine) files, video clips (AVI, MP4, MOV, M4V) and volumes (NIfTI .nii/.nii.gz, MetaImage .mhd/.raw, "
        ".mha) into de-identified uint8 shards for python -m urfm_fast.pretrain --data DIR: burned-in text and "
        "overlays are blanked, near-duplicate consecutive frames dropped, sources are named by salted hashes. "
        "Unreadable files and archive members are listed in DIR/skipped.jsonl; a second run adds only new "
        "files; DIR/summary.json and the console give counts per source.",
    )
    ap.add_argument("sources", nargs="*", metavar="SRC",
                    help="folders (searched recursively), files or .zip archives (read like folders, "
                    "members named archive.zip/member/path in the --path-map)")
    ap.add_argument("--list", metavar="FILE", default=None, dest="list_file",
                    help="more sources: one path per line (# comments), or a CSV with a 'path' column; relative "
                    "paths are relative to FILE's folder. Its entries are named by line in messages and by "
                    "position in summary.json, never by path")
    ap.add_argument("--out", required=True, help="shard folder to create or extend (resumable)")
    ap.add_argument("--short-side", type=int, default=256, help="resize every image to this short side "
                    "(16 to 8192)")
    ap.add_argument("--frame-stride", type=int, default=1, help="keep every N-th frame of a cine or video clip, "
                    "every N-th slice of a volume (1 to 10^6)")
    ap.add_argument("--workers", type=int, default=None, help="decoding processes (default: all cores; 1 to "
                    "1024; see the memory note below)")
    ap.add_argument("--retry-skipped", action="store_true", help="read files listed in skipped.jsonl again")
    ap.add_argument("--path-map", metavar="FILE", default=None,
                    help="also write the table source id -> folder/relative path to FILE (JSON lines; it "
                    "names patients' files: must be outside --out; merged with FILE when it exists)")
    ap.add_argument("--key", metavar="FILE", default=None,
                    help="the file holding the key that names this folder's sources (default: DIR.key beside "
                    "--out, created mode 0600 on the first run; must be outside --out). Share the folder, keep "
                    "the key: a rerun needs it to skip what is done")
    ap.add_argument("--burned-in", choices=("clean", "skip"), default="clean",
                    help="DICOM with BurnedInAnnotation YES: blank its text like any file and flag it in "
                    "index.jsonl (clean), or leave it out, listed in skipped.jsonl (skip)")
    ap.add_argument("--part", metavar="K/N", default=None,
                    help="prepare only the K-th of N slices of the files (by salted id, so slices balance) into "
                    "index part K of --out: N machines can run at once against one shared --out (give them one "
                    "--key), then --merge; or each into its own folder (then --merge --part K/N there)")
    ap.add_argument("--merge", action="store_true",
                    help="join the finished index parts of --out (from --part runs) into its index; a missing "
                    "or unfinished part is named and nothing is changed (with no SRC; --part K/N: that part alone)")
    ap.add_argument("--review", type=int, default=0, metavar="N",
                    help="write DIR/review.png, a contact sheet of N random prepared images with the "
                    "blanked areas outlined (with no SRC: only that, for an existing shard folder)")
    ap.add_argument("--show", type=int, default=None, metavar="LINE",
                    help="write DIR/review-LINE.png: the image of index line LINE (the number on its review-sheet "
                    "tile) at its full stored size, blanked areas outlined (with no SRC)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    return ap


def main(argv=None):
    args = _parser().parse_args(argv)
    try:
        _run(args)
    except (sources.PrepareError, review.ReviewError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full or read-only disk under --out
        print(f"error: {_out_path(e, args.out)}: {e.strerror or type(e).__name__}; {_kept(args.out)}check the disk "
              "and permissions of --out, then rerun the same command to continue", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # what is written is whole: the rerun adds the rest
        print(f"interrupted; {_kept(args.out)}rerun the same command to continue", file=sys.stderr)
        return INTERRUPTED
    return 0


def _run(args):
    PrepareError = sources.PrepareError
    if args.review < 0:
        raise PrepareError("--review must be >= 0")
    part = convert.parse_part(args.part) if args.part is not None else None
    if args.merge and (args.sources or args.list_file):
        raise PrepareError("--merge takes no SRC: run it after every prepare --part K/N has finished")
    if args.show is not None and (args.sources or args.list_file):
        raise PrepareError("--show takes no SRC: run it on a prepared --out")
    if not (args.sources or args.list_file or args.review or args.merge or args.show is not None):
        raise PrepareError("give at least one SRC or --list FILE (or --review N / --show LINE for an existing "
                           "shard folder)")
    if args.merge:
        added, parts = convert.merge(args.out, part)
        print(f"{args.out}: merged {len(parts)} index part(s), {added} images added; "
              f"{len(shards.read_index(args.out))} images in total")
    elif args.sources or args.list_file:
        c = convert.prepare(args.sources, args.out, short_side=args.short_side, frame_stride=args.frame_stride,
                            workers=args.workers, retry_skipped=args.retry_skipped, progress=not args.quiet,
                            path_map=args.path_map, burned_in=args.burned_in, list_file=args.list_file,
                            key=args.key, part=part)
        print(convert.format_summary(c, args.out))
    if (args.review or args.show is not None) and not shards.is_shard_dir(args.out):
        raise PrepareError(f"--out {args.out} is not a shard folder")
    if args.review:
        print(f"review sheet: {review.write_review(args.out, args.review)}")
    if args.show is not None:
        print(f"index line {args.show} at full size: {review.write_full(args.out, args.show)}")


def _kept(out):
    """What a run cut short by the disk left in the folder, for its one-line error."""
    try:
        n = len(shards.read_index(out)) + sum(len(shards.read_jsonl(shards.part_paths(out, k, m)[0])) for k, m in
                                       shards.parts_present(out))
    except (OSError, ValueError):
        return ""
    return f"{n} images are kept in {out}, whole; " if shards.is_shard_dir(out) else ""


def _out_path(e, out):
    """The file an OSError names, only when it is under --out: a source path may name a patient."""
    name = os.fspath(e.filename) if isinstance(e.filename, (str, bytes, os.PathLike)) else ""
    root = os.path.realpath(out)
    inside = name and os.path.commonpath([os.path.realpath(name), root]) == root
    return name if inside else out


if __name__ == "__main__":
    sys.exit(main())
