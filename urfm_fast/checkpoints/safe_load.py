"""Reading DCP checkpoint folders without running code from them.

A DCP folder's ``.metadata`` file is a pickle, and torch reads it with a plain ``pickle.load``: a
file whose ``__reduce__`` runs a shell command would run it on every load (and could then return the
real metadata, so nothing looks wrong). DCP also unpickles every non-tensor entry of the state dict
(optimizer hyper-parameters, counters) with ``torch.load(weights_only=False)``. Checkpoint folders
are exactly what people download and share, so both readers here are restricted:

- ``SafeFileSystemReader``: torch's ``FileSystemReader`` whose ``read_metadata`` unpickles with an
  allow-list of the classes DCP metadata is made of (the dataclasses of
  ``torch.distributed.checkpoint.metadata``, ``filesystem._StorageInfo``, ``torch.Size``, torch
  dtypes and layouts, ``pathlib`` paths), then checks that every storage entry names a plain file
  of the folder, within its size, with no transform (decompression), and that the tensors it
  declares fit in the bytes on disk (no allocation larger than the checkpoint itself);
- ``safe_bytes``: the ``load_bytes`` of our load planners, ``torch.load(weights_only=True)`` with
  ``argparse.Namespace`` as the one extra class.

Anything else raises ``UntrustedCheckpoint`` with a one-line message; it is never called or imported.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import pickle
from pathlib import Path

import torch

_METADATA = "torch.distributed.checkpoint.metadata"
# Exactly the globals a DCP .metadata pickle refers to (torch 2.4 - 2.14): classes that only hold
# data (dataclasses, an Enum), and torch's immutable types. Nothing here runs code when called
# with attacker-chosen arguments: they store them.
_ALLOWED = {
    (_METADATA, "Metadata"), (_METADATA, "MetadataIndex"), (_METADATA, "StorageMeta"),
    (_METADATA, "BytesStorageMetadata"), (_METADATA, "ChunkStorageMetadata"),
    (_METADATA, "TensorStorageMetadata"), (_METADATA, "TensorProperties"),
    (_METADATA, "_MEM_FORMAT_ENCODING"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"), ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"), ("collections", "OrderedDict"),
}
_SLACK_BYTES = 1 << 20  # per-file framing of torch.save around each stored tensor, and then some


class UntrustedCheckpoint(ValueError):
    """A checkpoint file that would run code or is not what it claims; the message is one line."""


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout)):
            return getattr(torch, name)
        raise UntrustedCheckpoint(f"refers to {module}.{name}, which DCP metadata never holds")


def read_dcp_metadata(path: Path):
    """The ``Metadata`` of the DCP folder ``path``, unpickled with the allow-list and checked."""
    from torch.distributed.checkpoint.metadata import Metadata

    meta_file = path / ".metadata"
    try:
        with open(meta_file, "rb") as f:
            md = _MetadataUnpickler(f).load()
    except UntrustedCheckpoint as e:
        raise UntrustedCheckpoint(f"{path}: not a trusted checkpoint: .metadata {e}; refusing to load it") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, KeyError, IndexError,
            RuntimeError, MemoryError, RecursionError) as e:
        raise ValueError(f"{meta_file}: corrupt DCP metadata ({type(e).__name__})") from None
    if not isinstance(md, Metadata):
        raise UntrustedCheckpoint(f"{path}: not a trusted checkpoint: .metadata holds a {type(md).__name__}, "
                                  "not DCP Metadata")
    _check_storage(path, md)
    return md


def _declared_bytes(md) -> int:
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    total = 0
    for entry in md.state_dict_metadata.values():
        if isinstance(entry, TensorStorageMetadata):
            itemsize = torch.empty((), dtype=entry.properties.dtype).element_size()
            total += math.prod(int(s) for s in entry.size) * itemsize
    return total


def _check_storage(path: Path, md) -> None:
    """Every storage entry is a plain file of this folder, in range, untransformed; the tensors the
    metadata declares fit in the bytes on disk (a forged size would otherwise allocate at will)."""
    def refuse(why: str):
        raise UntrustedCheckpoint(f"{path}: not a trusted checkpoint: .metadata {why}; refusing to load it")

    if not isinstance(md.state_dict_metadata, dict) or not isinstance(md.storage_data, dict):
        refuse("lacks its state-dict or storage tables")
    sizes: dict[str, int] = {}
    for info in md.storage_data.values():
        rel = getattr(info, "relative_path", None)
        if not isinstance(rel, str) or not rel or os.path.basename(rel) != rel or rel in (".", ".."):
            refuse(f"points outside its folder ({rel!r})")
        if getattr(info, "transform_descriptors", None):
            refuse("asks for stream transforms (compression), which urfm_fast checkpoints never use")
        if rel not in sizes:
            f = path / rel
            if not f.is_file():
                raise ValueError(f"{path}: DCP data file {rel} is missing")
            sizes[rel] = f.stat().st_size
        offset, length = getattr(info, "offset", -1), getattr(info, "length", -1)
        if not (isinstance(offset, int) and isinstance(length, int) and 0 <= offset
                and 0 <= length and offset + length <= sizes[rel]):
            raise ValueError(f"{path}: DCP data file {rel} is shorter than its metadata says (truncated?)")
    try:
        declared = _declared_bytes(md)
    except (AttributeError, TypeError, ValueError, RuntimeError, OverflowError):
        refuse("holds malformed tensor entries")
    if declared > sum(sizes.values()) + _SLACK_BYTES * max(1, len(sizes)):
        refuse(f"declares {declared} bytes of tensors but the folder holds {sum(sizes.values())}")


def safe_bytes(value: io.BytesIO):
    """A non-tensor state-dict entry of a DCP checkpoint, read without running code."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(value, weights_only=True)
    except pickle.UnpicklingError as e:
        first = (str(e).strip().splitlines() or ["unpickling refused"])[0][:160]
        raise UntrustedCheckpoint(f"not a trusted checkpoint: an entry would need a full unpickle ({first})") from None


def safe_reader(path):
    """A ``FileSystemReader`` for ``path`` whose metadata is read by ``read_dcp_metadata``. The metadata
    is read here, before DCP runs: DCP turns a failing ``read_metadata`` into a search for per-rank
    metadata files and a wrapped error, which would hide the reason."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    md = read_dcp_metadata(Path(path))

    class SafeFileSystemReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            if kwargs.get("rank") is not None:  # per-rank metadata files: never written by our saves
                raise UntrustedCheckpoint(f"{path}: per-rank DCP metadata is not supported")
            if getattr(md, "storage_meta", None) is None:
                md.storage_meta = StorageMeta()
            md.storage_meta.load_id = self.load_id
            return md

    return SafeFileSystemReader(str(path))


def safe_load_planner(whole: bool = False):
    """DCP's load planner with ``safe_bytes`` for non-tensor entries (torch reads them with
    weights_only=False, a full unpickle; the placement logic is torch's, only the unpickling is
    restricted). whole=False: load into a given state dict (resume); True: rebuild the whole state
    dict from the metadata (reading a checkpoint folder as a dict)."""
    from torch.distributed.checkpoint._traverse import set_element
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, _EmptyStateDictLoadPlanner

    class SafeLoadPlanner(_EmptyStateDictLoadPlanner if whole else DefaultLoadPlanner):
        def load_bytes(self, read_item, value):
            obj = safe_bytes(value)
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    return SafeLoadPlanner()


def checkpoint_errors() -> tuple:
    """What a DCP save or load can raise: ``CheckpointException`` derives from BaseException, so an
    ``except Exception`` misses it (and a corrupt shard or a full disk would escape as a traceback)."""
    from torch.distributed.checkpoint.api import CheckpointException

    return (Exception, CheckpointException)


def dcp_cause(e: BaseException) -> BaseException:
    """The first rank's own exception inside DCP's ``CheckpointException`` (whose str is a traceback)."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        first = next(iter(failures.values()))
        return first[0] if isinstance(first, tuple) and first else e
    return e


def one_line(e: BaseException, limit: int = 200) -> str:
    """``Type: first line`` of an exception, unwrapped from DCP's CheckpointException."""
    e = dcp_cause(e)
    first = (str(e).strip().splitlines() or [""])[0][:limit]
    return f"{type(e).__name__}: {first}" if first else type(e).__name__
