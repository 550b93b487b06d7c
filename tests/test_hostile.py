"""Hostile and careless input: a checkpoint runs no code, every bad value or file is one clear line.

The attack: a DCP folder's ``.metadata`` (a pickle) replaced by one whose ``__reduce__`` runs a shell
command and then returns the real metadata, so nothing looks wrong. Every entry point that reads a
checkpoint must refuse it (one line, "not a trusted checkpoint") before the command runs.
"""

import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_pretrain import SYNTH, TINY, fast_random_teacher  # noqa: F401 (autouse fixture)

from urfm_fast import URFM, URFMConfig, evaluate, export, pretrain
from urfm_fast.checkpoints.formats import CheckpointError, load_checkpoint
from urfm_fast.checkpoints.safe_load import UntrustedCheckpoint, read_dcp_metadata, safe_bytes


class _Payload:
    """Pickles as: run a shell command that creates ``marker``, then return ``real`` unpickled."""

    def __init__(self, marker: Path, real: bytes):
        self.marker, self.real = marker, real

    def __reduce__(self):
        code = f"__import__('os').system('touch {self.marker}') or __import__('pickle').loads({self.real!r})"
        return (eval, (code,))


def poison(folder: Path, marker: Path) -> None:
    """Replace folder/.metadata by the attack (the real metadata comes back, so loading would work)."""
    meta = folder / ".metadata"
    meta.write_bytes(pickle.dumps(_Payload(marker, meta.read_bytes())))
    manifest = folder / "manifest.json"
    if manifest.exists():  # an attacker updates the sizes our resume checks too
        m = json.loads(manifest.read_text())
        m["files"][".metadata"] = meta.stat().st_size
        manifest.write_text(json.dumps(m))


def tiny_model_dcp(path: Path) -> Path:
    import torch.distributed.checkpoint as dcp

    torch.manual_seed(0)
    cfg = URFMConfig.preset("vit_tiny", img_size=32, depth=2, decoder_embed_dim=64, decoder_depth=1,
                            decoder_num_heads=4)
    sd = URFM(cfg).state_dict()
    dcp.save({"model": sd, "epoch": 3, "args": {"model": "vit_tiny"}}, checkpoint_id=str(path), no_dist=True)
    return path


@pytest.fixture(scope="module")
def clean_dcp(tmp_path_factory) -> Path:
    return tiny_model_dcp(tmp_path_factory.mktemp("dcp") / "clean")


@pytest.fixture
def attack(clean_dcp, tmp_path):
    """(poisoned DCP folder, marker file the attack would create)."""
    bad = tmp_path / "poisoned"
    shutil.copytree(clean_dcp, bad)
    marker = tmp_path / "PWNED"
    poison(bad, marker)
    # the attack is real: plain pickle runs it and returns working metadata
    check = tmp_path / "CHECK"
    (tmp_path / "probe").write_bytes(pickle.dumps(_Payload(check, pickle.dumps(1))))
    assert pickle.loads((tmp_path / "probe").read_bytes()) == 1 and check.exists()
    return bad, marker


def _refused(err: str, marker: Path) -> None:
    assert not marker.exists(), "the checkpoint ran a command"
    assert "not a trusted checkpoint" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err


def test_clean_dcp_still_loads(clean_dcp):
    ck = load_checkpoint(clean_dcp)
    assert ck.config.depth == 2 and ck.meta["format"] == "dcp" and ck.meta["epoch"] == 3


def test_load_checkpoint_refuses_the_attack(attack):
    bad, marker = attack
    with pytest.raises(CheckpointError, match="not a trusted checkpoint") as e:
        load_checkpoint(bad)
    _refused(str(e.value), marker)


def test_load_backbone_and_timm_refuse_the_attack(attack):
    import timm

    from urfm_fast.checkpoints.backbone import load_backbone

    bad, marker = attack
    with pytest.raises(CheckpointError, match="not a trusted checkpoint"):
        load_backbone(bad)
    with pytest.raises(CheckpointError, match="not a trusted checkpoint"):
        timm.create_model("urfm_vit_tiny_patch16_224", pretrained=True, pretrained_cfg_overlay=dict(file=str(bad)))
    assert not marker.exists()


def test_export_and_evaluate_refuse_the_attack(attack, tmp_path, capsys):
    bad, marker = attack
    assert export.main([str(bad), "--out", str(tmp_path / "exp")]) == 2
    _refused(capsys.readouterr().err, marker)
    assert not (tmp_path / "exp" / "model.safetensors").exists()  # so timm never sees an export of it
    assert evaluate.main(["--backbone", str(bad), "--data", "synthetic", "--out", str(tmp_path / "ev"),
                          "--protocol", "knn", "--synthetic-train", "8", "--synthetic-val", "4"]) == 2
    _refused(capsys.readouterr().err, marker)


def test_pretrain_init_refuses_the_attack(attack, tmp_path, capsys):
    bad, marker = attack
    args = [*TINY, *SYNTH, "--batch-size", "8", "--steps", "2", "--warmup-steps", "1", "--out", str(tmp_path / "r")]
    assert pretrain.main([*args, "--init", str(bad)]) == 2
    _refused(capsys.readouterr().err, marker)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A 2-step run with a resumable checkpoint at step 2 (and its .pth)."""
    out = tmp_path_factory.mktemp("run") / "run"
    args = [*TINY, *SYNTH, "--batch-size", "8", "--steps", "2", "--warmup-steps", "1", "--save-every", "0"]
    assert pretrain.main([*args, "--out", str(out)]) == 0
    return out


def test_pretrain_resume_refuses_the_attack(tiny_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(tiny_run, out)
    marker = tmp_path / "PWNED"
    poison(out / "checkpoints" / "step_00000002", marker)
    assert pretrain.main(["--out", str(out), "--resume", "--steps", "3"]) == 2
    _refused(capsys.readouterr().err, marker)


def test_metadata_allow_list_refuses_foreign_classes_without_calling_them(clean_dcp, tmp_path):
    bad = tmp_path / "x"
    shutil.copytree(clean_dcp, bad)
    # a harmless global the allow-list does not know: refused by name, never imported or called
    (bad / ".metadata").write_bytes(pickle.dumps(json.JSONDecoder))
    with pytest.raises(UntrustedCheckpoint, match="json.decoder.JSONDecoder"):
        read_dcp_metadata(bad)
    md = read_dcp_metadata(clean_dcp)  # the real thing passes, with its own classes
    assert type(md).__name__ == "Metadata"


def test_metadata_cannot_point_outside_or_allocate_at_will(clean_dcp, tmp_path):
    md = read_dcp_metadata(clean_dcp)
    bad = tmp_path / "y"
    shutil.copytree(clean_dcp, bad)
    info = next(iter(md.storage_data.values()))
    info.relative_path = "../../etc/passwd"
    (bad / ".metadata").write_bytes(pickle.dumps(md))
    with pytest.raises(UntrustedCheckpoint, match="outside its folder"):
        read_dcp_metadata(bad)
    md = read_dcp_metadata(clean_dcp)
    entry = next(v for v in md.state_dict_metadata.values() if hasattr(v, "size"))
    entry.size = torch.Size([1 << 20, 1 << 20])  # 4 TiB of float32 from a few bytes of metadata
    (bad / ".metadata").write_bytes(pickle.dumps(md))
    with pytest.raises(UntrustedCheckpoint, match="declares"):
        read_dcp_metadata(bad)


def test_byte_entries_are_read_weights_only(tmp_path):
    import io

    marker = tmp_path / "PWNED"
    buf = io.BytesIO()
    torch.save({"lr": _Payload(marker, pickle.dumps(0.1))}, buf)
    buf.seek(0)
    with pytest.raises(UntrustedCheckpoint, match="not a trusted checkpoint"):
        safe_bytes(buf)
    assert not marker.exists()


def test_malicious_or_corrupt_pth_is_one_line(tmp_path, capsys):
    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.pth"
    torch.save({"model": _Payload(marker, pickle.dumps({}))}, evil)
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    args = [*TINY, *SYNTH, "--batch-size", "8", "--steps", "2", "--warmup-steps", "1"]
    for i, f in enumerate((evil, corrupt)):
        assert pretrain.main([*args, "--out", str(tmp_path / f"r{i}"), "--init", str(f)]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert not marker.exists()


def test_resume_with_a_wrong_architecture_pth_is_one_line(tiny_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(tiny_run, out)
    wrong = tmp_path / "weights.pth"
    torch.save({"model": {"x": torch.zeros(1)}, "step": 1}, wrong)
    assert pretrain.main(["--out", str(out), "--resume", str(wrong), "--steps", "3"]) == 2
    err = capsys.readouterr().err
    assert "not a resumable checkpoint of this model" in err and len(err.strip().splitlines()) == 1, err


def test_resume_falls_back_past_a_same_size_corrupt_shard(tiny_run, tmp_path, capsys):
    """Garbage of the right size passes the manifest check; DCP then raises CheckpointException (a
    BaseException): the run must fall back to the previous checkpoint, not crash."""
    out = tmp_path / "run"
    shutil.copytree(tiny_run, out)
    (out / "checkpoint-00000002.pth").unlink()
    src = out / "checkpoints" / "step_00000002"
    shutil.copytree(src, out / "checkpoints" / "step_00000001")  # an older good one (same weights)
    manifest = json.loads((src / "manifest.json").read_text())
    manifest["step"] = 1
    (out / "checkpoints" / "step_00000001" / "manifest.json").write_text(json.dumps(manifest))
    shard = next(src.glob("*.distcp"))
    shard.write_bytes(bytes(shard.stat().st_size))
    assert pretrain.main(["--out", str(out), "--resume", "--steps", "3"]) == 0
    printed = capsys.readouterr().out
    assert "step_00000002 could not be read" in printed and "step_00000001 at step 2" in printed


def test_a_failed_save_removes_its_temporary_folder(tmp_path, monkeypatch):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    from urfm_fast.checkpoints import runs as ckpt

    def full_disk(*a, **k):  # what DCP raises when a rank's write fails: a BaseException
        raise CheckpointException("write failed", {0: (OSError(28, "No space left on device"), None)})

    monkeypatch.setattr(dcp, "save", full_disk)
    with pytest.raises(ckpt.CheckpointError, match="No space left on device"):
        ckpt.save_dcp(tmp_path, 5, {"x": torch.zeros(2)}, {"step": 5}, {}, keep=2)
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


def test_sigterm_ends_a_stuck_run_within_the_grace(tmp_path):
    """The loop never finishes step 1 (a hung loader or peer) and the process gets SIGTERM: the
    watchdog ends it after URFM_STOP_GRACE_S instead of waiting forever."""
    import os

    args = [*TINY, *SYNTH, "--batch-size", "8", "--steps", "4", "--warmup-steps", "1", "--out", str(tmp_path / "r")]
    env = {**os.environ, "URFM_FAULTS": "hang@1", "URFM_STOP_GRACE_S": "1"}
    r = subprocess.run([sys.executable, "-m", "urfm_fast.pretrain", *args], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 128 + 15, r.stderr[-2000:]
    assert "SIGTERM received and no step finished within 1s" in r.stderr and "Traceback" not in r.stderr


# ---------------------------------------------------------------------------------------------
# prepare: files from strangers


@pytest.fixture
def alarm():
    """Fail instead of hanging forever (a FIFO read blocks, a device never ends)."""
    import signal

    def boom(*_):
        raise TimeoutError("prepare hung")

    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(30)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def _png(path, seed=0):
    import numpy as np
    from PIL import Image

    Image.fromarray(np.random.default_rng(seed).integers(20, 180, (40, 48), dtype=np.uint8)).save(path)


def _map(out):
    """The --path-map of a test's shard folder (outputs name sources by salted hash only)."""
    return out.with_name(out.name + ".map.jsonl")


def _named(out, name):
    """Records of index.jsonl or skipped.jsonl with their source path joined back from the path map."""
    paths = {r["id"]: r["path"] for r in map(json.loads, _map(out).read_text().splitlines())}
    return [dict(r, path=paths[r["id"]]) for r in map(json.loads, (out / name).read_text().splitlines())]


def _skips(out):
    return {r["path"]: r["reason"] for r in _named(out, "skipped.jsonl")}


def test_prepare_reads_regular_files_only(tmp_path, alarm):
    import os

    from urfm_fast.data import convert

    src = tmp_path / "src"
    (src / "real").mkdir(parents=True)
    _png(src / "real" / "a.png")
    os.mkfifo(src / "x.png")
    (src / "zero.png").symlink_to("/dev/zero")
    (src / "random.dcm").symlink_to("/dev/urandom")
    (tmp_path / "elsewhere").mkdir()
    _png(tmp_path / "elsewhere" / "b.png")
    (src / "linked").symlink_to(tmp_path / "elsewhere")  # a symlinked folder: followed
    (src / "real" / "loop").symlink_to(src)  # a link loop: reported, not followed forever
    (src / "again").symlink_to(src / "real")  # a second way into one folder: read once
    # two workers: on a hang the alarm interrupts the parent's wait and the pool is terminated
    c = convert.prepare([src], tmp_path / "out", short_side=32, workers=2, progress=False,
                        path_map=_map(tmp_path / "out"))
    skips = _skips(tmp_path / "out")
    for name in ("x.png", "zero.png", "random.dcm"):
        assert skips[name] == "not a regular file (FIFO, device or socket); not opened"
    assert skips["real/loop"].startswith("symlinked folder already read")
    assert skips["again"].startswith("symlinked folder already read")
    paths = {r["path"] for r in _named(tmp_path / "out", "index.jsonl")}
    assert paths == {"real/a.png", "linked/b.png"}
    assert c["images_added"] == 2


def _dicom_header_only(path, rows, cols):
    """A DICOM that declares a huge frame but holds a few bytes: the budget check must come first."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, UltrasoundImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = UltrasoundImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, cols, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = bytes(64)
    ds.save_as(path, enforce_file_format=True)


def test_prepare_pixel_budget_and_zip_members_refused_before_reading(tmp_path, monkeypatch):
    import zipfile

    from urfm_fast.data import convert, sources

    pytest.importorskip("pydicom")
    src = tmp_path / "src"
    src.mkdir()
    _dicom_header_only(src / "huge.dcm", 20000, 20000)
    with zipfile.ZipFile(src / "bomb.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("zeros.dcm", bytes(32 << 20))  # 32 MiB of zeros: ~1000:1
        zf.writestr("big.png", bytes(3 << 20))
        with open(tmp_path / "ok.png", "wb"):
            pass
        _png(tmp_path / "ok.png")
        zf.write(tmp_path / "ok.png", "ok.png")
    monkeypatch.setattr(sources, "MAX_MEMBER_BYTES", 2 << 20)  # so "declared size" is tested without GBs
    monkeypatch.setattr(sources, "MAX_MEMBER_RATIO", 10**6)  # ... for big.png only; zeros.dcm is over it too
    spooled = []
    real_copy = sources._copy_bounded
    monkeypatch.setattr(sources, "_copy_bounded", lambda s, d, n: spooled.append(n) or real_copy(s, d, n))
    convert.prepare([src], tmp_path / "out", short_side=32, workers=1, progress=False, path_map=_map(tmp_path / "out"))
    skips = _skips(tmp_path / "out")
    assert "exceeds the pixel budget" in skips["huge.dcm"]
    assert skips["bomb.zip/zeros.dcm"].startswith("zip member too large")
    assert skips["bomb.zip/big.png"].startswith("zip member too large")
    assert {r["path"] for r in _named(tmp_path / "out", "index.jsonl")} == {"bomb.zip/ok.png"}
    assert len(spooled) == 1  # only ok.png was decompressed
    monkeypatch.setattr(sources, "MAX_MEMBER_BYTES", 4 << 30)
    monkeypatch.setattr(sources, "MAX_MEMBER_RATIO", 100)
    convert.prepare([src], tmp_path / "out2", short_side=32, workers=1, progress=False,
              path_map=_map(tmp_path / "out2"))
    assert "zip bomb" in _skips(tmp_path / "out2")["bomb.zip/zeros.dcm"]


def test_prepare_one_writer_per_output_folder(tmp_path):
    from urfm_fast.data import convert, shards, sources

    src = tmp_path / "src"
    src.mkdir()
    _png(src / "a.png")
    out = tmp_path / "out"
    out.mkdir()
    held = shards.lock_folder(str(out))  # another prepare is running on out
    try:
        with pytest.raises(sources.PrepareError, match="another prepare is writing"):
            convert.prepare([src], out, short_side=32, workers=1, progress=False)
    finally:
        held.close()
    assert convert.prepare([src], out, short_side=32, workers=1, progress=False)["images_added"] == 1


@pytest.mark.parametrize("argv, needle", [
    (["--short-side", "-5"], "--short-side -5: must be an integer in [16, 8192]"),
    (["--short-side", "x"], "invalid int value"),
    (["--frame-stride", "0"], "--frame-stride 0"),
    (["--workers", "0"], "--workers 0"),
])
def test_prepare_bad_values_are_one_line_and_touch_nothing(tmp_path, capsys, argv, needle):
    from urfm_fast import prepare as P

    src = tmp_path / "src"
    src.mkdir()
    _png(src / "a.png")
    with pytest.raises(SystemExit) if "invalid" in needle else _nothing() as e:
        rc = P.main([str(src), "--out", str(tmp_path / "out"), *argv])
    rc = e.value.code if "invalid" in needle else rc
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()  # no skipped.jsonl marking good images unreadable for good


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False
