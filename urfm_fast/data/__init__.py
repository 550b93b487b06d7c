"""Archives -> shards -> the training stream.

sources / media / dicom_grey read what users hold (image files, DICOM, video, volumes); deid and
scan_region find burned-in text and the scan; source_ids names sources without their paths (the key kept
outside the folder); shards owns the shard folder's format (index parts and their merge included); stream
turns a folder into batches, mixture several folders into one weighted order; augment and synthetic
serve both ends.

``from urfm_fast.data import ShardDataset`` is bound on first use, so prepare (which imports this wing's
modules) starts without importing torch.
"""

import importlib

_EXPORTS = ("DataError", "ShardDataset", "ImageFolderDataset", "build_train_stream")


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module("urfm_fast.data.stream"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'urfm_fast.data' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
