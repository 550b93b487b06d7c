"""Archives -> shards -> the training stream.

sources / media / dicom_grey read what users hold (image files, DICOM, video, volumes); deid and
scan_region find burned-in text and the scan; source_ids names sources without their paths (the key kept
outside the folder); shards owns the shard folder's format (index parts and their merge included); dataset
reads a shard or image folder item by item, stream turns a source into batches, mixture several folders into
one weighted order; augment and synthetic serve both ends.

The face handed on here is free of torch at import (prepare imports this wing without torch).
"""

from urfm_fast.data.dataset import DataError, ImageFolderDataset, ShardDataset

__all__ = ["DataError", "ImageFolderDataset", "ShardDataset"]
