"""Training input: sources of uint8 grey images and the infinite, resumable, sharded batch stream.

Sources (each item is a uint8 tensor [1,H,W]): a shard folder or an image folder (`ShardDataset`,
`ImageFolderDataset` in urfm_fast.data.dataset), several shard folders (`open_mixture`), or
`SyntheticSource(n, size, seed)`, the built-in synthetic ultrasound (the default demo data); `open_source`
picks one.

`build_train_stream(...)` turns a source into batches `(images01 [B,3,S,S] on device, sample_index
[B])`: background DataLoader workers read uint8 (pinned when CUDA), the whole batch is augmented on
the device (urfm_fast.data.augment). Each epoch is a permutation seeded by (seed, epoch), cut into global
batches of batch_size * world_size (drop_last); rank r takes its own slice of every global batch,
so ranks never overlap. `state_dict()` stores (epoch, offset): a resumed run continues with the
very next unseen global batch.

Deterministic mode: crop/flip of a sample derive from `sample_seeds(seed, epoch, index)`, and the
model's masking noise can derive from the same triple through `mask_noise` (another hash stream):

    for x, idx in stream:
        noise = stream.mask_noise(idx, num_patches, device=x.device)  # float [B, N] in [0,1)
        ids_shuffle = noise.argsort(dim=1)                              # MAE's random_masking

Nothing then depends on the number of workers, ranks or batch composition (pixels agree up to
float rounding, ~1e-6, because a batch's zero-padding size enters grid_sample's coordinates).
"""

import logging
import os

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from urfm_fast.data import index_bin, shards
from urfm_fast.data.augment import batch_augment, hash_uniform, mix_seed, pad_batch
from urfm_fast.data.dataset import DataError, ImageFolderDataset, ShardDataset
from urfm_fast.data.mixture import MixtureDataset

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Sources


class SyntheticSource(Dataset):
    """The built-in synthetic ultrasound as a source; item = uint8 [1,size,size] (label dropped)."""

    def __init__(self, length, size, seed=0):
        from urfm_fast.data.synthetic import SyntheticUltrasound  # lazy: only the demo needs it

        self.ds = SyntheticUltrasound(length, size, seed)
        # Rendered up front (on the GPU when there is one) so forked workers share one copy.
        device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            self.ds.render_all(device)
        except (RuntimeError, torch.cuda.OutOfMemoryError) as e:  # the demo must still run: render lazily
            self.ds = SyntheticUltrasound(length, size, seed)  # drop any partial rendering
            log.warning("synthetic data: rendering on %s failed (%s); workers render it on the CPU", device, e)

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        img = self.ds[i][0]
        return img if img.dim() == 3 else img.unsqueeze(0)


def open_mixture(roots, weights=None):
    """Several shard folders -> MixtureDataset (weights: None = by size, "equal", or K numbers)."""
    parts = []
    for root in roots:
        root = os.fspath(root)
        if not os.path.isdir(root):
            raise DataError(f"data folder {root} does not exist")
        if not shards.is_shard_dir(root):
            raise DataError(f"{root} is not a shard folder (no {shards.MARKER}); several --data folders must each "
                            "be written by python -m urfm_fast.prepare")
        parts.append(ShardDataset(root))
    try:
        return MixtureDataset(parts, weights, names=[p.root for p in parts])
    except ValueError as e:
        raise DataError(f"--data-weights: {e}") from None


def open_source(source, *, seed=0, synthetic_length=4096, synthetic_size=256, short_side=256, weights=None):
    """'synthetic' | shard folder | image folder | several shard folders (a list, with `weights`) ->
    Dataset of uint8 [1,H,W] (raises DataError)."""
    if isinstance(source, (Dataset, ShardDataset, ImageFolderDataset)):
        return source
    if isinstance(source, (list, tuple)):
        if len(source) > 1:
            return open_mixture(source, weights)
        (source,) = source
    if source is None or str(source) == "synthetic":
        return SyntheticSource(synthetic_length, synthetic_size, seed)
    path = os.fspath(source)
    if not os.path.exists(path):
        raise DataError(f"data folder {path} does not exist")
    if not os.path.isdir(path):
        raise DataError(f"{path} is not a folder; give a folder of images or a shard folder")
    if shards.is_shard_dir(path):
        return ShardDataset(path)
    return ImageFolderDataset(path, short_side=short_side)


# ---------------------------------------------------------------------------------------------
# Seeds


def epoch_permutation(n, seed, epoch):
    """The global order of epoch `epoch`: integers [n], a pure function of (seed, epoch).

    int32 below 2^31 entries: torch draws the same permutation for either dtype, and int32 halves its memory
    and cuts its time by ~20 % (every rank computes it whole: 10M entries, the largest start-up cost)."""
    g = torch.Generator().manual_seed(int(mix_seed(seed, epoch, 0x5EED)) & 0x7FFFFFFFFFFFFFFF)
    return torch.randperm(n, generator=g, dtype=torch.int32 if n < 2**31 else torch.int64)


def sample_seeds(seed, epoch, sample_index):
    """Per-sample augmentation seeds: int64 [B] from (seed, epoch or int64 [B], sample_index [B])."""
    return mix_seed(seed, epoch, sample_index)


def mask_seeds(seed, epoch, sample_index):
    """Per-sample masking seeds, independent of the augmentation seeds of the same sample."""
    return mix_seed(seed, epoch, sample_index, 0x3A5C)


def mask_noise(seed, epoch, sample_index, num_patches, device=None):
    """float32 [B, num_patches] uniform in [0,1) from (seed, epoch, index): argsort it to mask."""
    idx = torch.as_tensor(sample_index, dtype=torch.int64)
    if device is not None:
        # Hash on the device (integer ops, identical results): copying a freshly computed CPU
        # tensor to the GPU would block the host every step.
        idx = idx.to(device, non_blocking=True)
        if torch.is_tensor(epoch) and epoch.dim() > 0:
            epoch = epoch.to(device, non_blocking=True)
    return hash_uniform(mask_seeds(seed, epoch, idx), num_patches, stream=1)


# ---------------------------------------------------------------------------------------------
# The stream


class _Keyed(Dataset):
    """Wraps a source so a key (epoch, index) yields (uint8 [1,H,W], index, epoch, unreadable files)."""

    def __init__(self, source):
        self.source = source

    def __len__(self):
        return len(self.source)

    def __getitem__(self, key):
        epoch, i = key
        if isinstance(self.source, ImageFolderDataset):
            img, met = self.source.load(i)
        else:
            img, met = self.source[i], []
        return img, i, epoch, met


def _collate(items):
    """-> (uint8 [B,1,Hmax,Wmax] zero-padded, int64 [B,2] sizes, int64 [B] index, int64 [B] epoch, bad)."""
    padded, sizes = pad_batch([it[0] for it in items])
    index = torch.tensor([it[1] for it in items], dtype=torch.int64)
    epoch = torch.tensor([it[2] for it in items], dtype=torch.int64)
    return padded, sizes, index, epoch, [m for it in items for m in it[3]]


class _RankBatches(Sampler):
    """Infinite: from (epoch, step) on, this rank's slice of every global batch of every epoch.
    order(epoch) -> integers [>= steps * global batch], the sample keys (default: epoch_permutation)."""

    def __init__(self, n, batch_size, world_size, rank, seed, epoch, step, order=None):
        self.n, self.b, self.w, self.r, self.seed = n, batch_size, world_size, rank, seed
        self.epoch, self.step = epoch, step
        self.order = order or (lambda e: epoch_permutation(n, seed, e))

    def __iter__(self):
        epoch, step = self.epoch, self.step
        gb = self.b * self.w
        if gb <= 0 or self.n // gb == 0:  # an epoch without one batch would loop here forever, yielding nothing
            raise DataError(f"{self.n} images are fewer than one global batch of {gb}")
        while True:
            perm = self.order(epoch)
            for s in range(step, self.n // gb):
                lo = s * gb + self.r * self.b
                yield [(epoch, i) for i in perm[lo : lo + self.b].tolist()]  # per batch: no 10M-item list
            epoch, step = epoch + 1, 0


class TrainStream:
    """Iterable forever over `(images01 float32 [B,3,S,S] on device, sample_index int64 [B] on CPU)`.

    Attributes: `epoch` (epoch of the last batch yielded), `samples_per_epoch` (global samples used
    per epoch, after drop_last), `steps_per_epoch`, `num_images`, `source`. Breaking out of a loop
    and iterating again continues where it stopped."""

    def __init__(
        self,
        source,
        *,
        img_size,
        batch_size,
        seed=0,
        rank=0,
        world_size=1,
        num_workers=2,
        deterministic=False,
        device="cpu",
        scale=(0.2, 1.0),
        prefetch_factor=4,
        augment=True,
    ):
        self.source, self.img_size, self.batch_size = source, img_size, batch_size
        # augment=False: the centre square of each image resized to img_size, the same pixels every epoch
        # (a fixed image set whose teacher targets can be computed once: --augment none --cache-targets)
        self.crop = dict(scale=scale, ratio=(3 / 4, 4 / 3), hflip=True) if augment else dict(
            scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=False)
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.num_workers, self.deterministic = num_workers, deterministic
        self.device, self.prefetch_factor = torch.device(device), prefetch_factor
        self.num_images = len(source)
        self.steps_per_epoch = self.num_images // (batch_size * world_size)
        if self.steps_per_epoch == 0:
            raise DataError(
                f"{self.num_images} images are fewer than one global batch of {batch_size * world_size}"
            )
        self.samples_per_epoch = self.steps_per_epoch * batch_size * world_size
        # several folders: the epoch orders (the main process reads them for the shares) and the global
        # samples drawn from each folder since the run began
        self.mixture = source if isinstance(source, MixtureDataset) else None
        self.source_counts = np.zeros(len(source.parts), np.int64) if self.mixture else None
        self._orders = {}
        self.epoch = 0
        self._epoch, self._step = 0, 0  # position of the next global batch
        # Non-deterministic mode draws crops from one generator per rank on the device.
        self._gen = torch.Generator(device=self.device).manual_seed(
            int(mix_seed(seed, rank, 0xA06)) & 0x7FFFFFFFFFFFFFFF
        )

    # -- position -------------------------------------------------------------------------
    def state_dict(self):
        """Data position for the checkpoint: the next global batch is `offset` samples into `epoch`."""
        return {
            "epoch": self._epoch,
            "offset": self._step * self.batch_size * self.world_size,
            "seed": self.seed,
            "num_images": self.num_images,
            "rng": self._gen.get_state(),
            **({"weights": self.mixture.weights.tolist(), "source_counts": self.source_counts.tolist()}
               if self.mixture else {}),
        }

    def load_state_dict(self, state):
        if state.get("num_images", self.num_images) != self.num_images:
            log.warning(
                "data changed since the checkpoint (%s -> %s images): epoch order differs",
                state["num_images"],
                self.num_images,
            )
        if state.get("seed", self.seed) != self.seed:
            log.warning("data seed changed since the checkpoint (%s -> %s)", state["seed"], self.seed)
        gb = self.batch_size * self.world_size
        offset = int(state["offset"])
        if offset % gb:
            log.warning("resume offset %d not a multiple of the global batch %d: rounded down", offset, gb)
        self._epoch, self._step = int(state["epoch"]), offset // gb
        if self._step >= self.steps_per_epoch:
            self._epoch, self._step = self._epoch + 1, 0
        self.epoch = self._epoch
        if "rng" in state:
            self._gen.set_state(state["rng"])
        if self.mixture is not None:
            counts = state.get("source_counts", [])
            if len(counts) == len(self.source_counts):
                self.source_counts[:] = counts
            if not np.allclose(state.get("weights", self.mixture.weights), self.mixture.weights):
                log.warning("folder weights changed since the checkpoint (%s -> %s)", state.get("weights"),
                            self.mixture.weights.tolist())

    def _order(self, epoch):
        """The global order of a mixture's epoch, computed once (the sampler and the share count use it)."""
        o = self._orders.get(epoch)
        if o is None:
            o = self.mixture.order(self.seed, epoch, self.samples_per_epoch)
            self._orders = {e: v for e, v in self._orders.items() if e >= epoch - 1}
            self._orders[epoch] = o
        return o

    def _count_sources(self):
        """Add the global batch at the current position to source_counts (every rank, no collective)."""
        gb = self.batch_size * self.world_size
        keys = self._order(self._epoch)[self._step * gb:(self._step + 1) * gb]
        self.source_counts += np.bincount(self.mixture.folder_of(keys), minlength=len(self.source_counts))

    def mask_noise(self, sample_index, num_patches, epoch=None, device=None):
        """Masking noise float32 [B, num_patches] for the batch just yielded (see module docstring)."""
        epoch = self.epoch if epoch is None else epoch
        return mask_noise(self.seed, epoch, sample_index, num_patches, device)

    # -- iteration ------------------------------------------------------------------------
    def _loader(self):
        sampler = _RankBatches(
            self.num_images, self.batch_size, self.world_size, self.rank, self.seed, self._epoch, self._step,
            order=self._order if self.mixture else None,
        )
        kw = {}
        if self.num_workers > 0:
            kw = dict(prefetch_factor=self.prefetch_factor, persistent_workers=False)
        return DataLoader(
            _Keyed(self.source),
            batch_sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=_collate,
            pin_memory=self.device.type == "cuda",
            **kw,
        )

    def __iter__(self):
        for padded, sizes, index, epoch, bad in self._loader():
            if bad and isinstance(self.source, ImageFolderDataset):
                self.source.note_bad(bad)
            x = padded.to(self.device, non_blocking=True)
            seeds = None
            if self.deterministic:  # hashed on the device from the pinned index: no host sync
                dev_index = index.to(self.device, non_blocking=True)
                seeds = sample_seeds(self.seed, epoch.to(self.device, non_blocking=True), dev_index)
            images = batch_augment(
                x, self.img_size, **self.crop, seeds=seeds, generator=self._gen, sizes=sizes
            )  # (B, 3, S, S) in [0, 1]
            self.epoch = int(epoch[0])
            if self.mixture is not None:
                self._count_sources()
            self._step += 1
            if self._step == self.steps_per_epoch:
                self._epoch, self._step = self._epoch + 1, 0
            yield images, index

    def describe_sources(self):
        """Each shard folder of the run (config.json): path, salted id, images, weight; [] otherwise."""
        if self.mixture is not None:
            roots, weights = self.mixture.names, self.mixture.weights.tolist()
        elif isinstance(self.source, ShardDataset):
            roots, weights = [self.source.root], [1.0]
        else:
            return []
        return [{"path": r, "id": index_bin.folder_id(r), "images": int(n), "weight": w}
                for r, n, w in zip(roots, self.mixture.sizes if self.mixture else [len(self.source)], weights)]

    def summary(self):
        src = self.source
        if self.mixture is not None:
            return f"{len(src)} images in {len(src.parts)} shard folders, weights " + "/".join(
                f"{w:.3g}" for w in src.weights)
        if isinstance(src, ImageFolderDataset):
            return src.summary()
        if isinstance(src, ShardDataset):
            return f"{len(src)} images in shards under {src.root}"
        return f"{len(src)} synthetic images"


def build_train_stream(
    source,
    *,
    img_size,
    batch_size,
    seed=0,
    rank=0,
    world_size=1,
    num_workers=2,
    deterministic=False,
    device="cpu",
    synthetic_length=4096,
    synthetic_size=None,
    short_side=256,
    scale=(0.2, 1.0),
    weights=None,
    augment=True,
):
    """source: "synthetic", a shard folder, an image folder (auto-detected), several shard folders (a
    list; `weights`: None = by size, "equal" or one number each) or a Dataset of uint8 [1,H,W];
    batch_size is per rank. Raises DataError when the source is unusable."""
    ds = open_source(
        source,
        seed=seed,
        synthetic_length=synthetic_length,
        synthetic_size=synthetic_size or img_size,
        short_side=short_side,
        weights=weights,
    )
    return TrainStream(
        ds,
        img_size=img_size,
        batch_size=batch_size,
        seed=seed,
        rank=rank,
        world_size=world_size,
        num_workers=num_workers,
        deterministic=deterministic,
        device=device,
        scale=scale,
        augment=augment,
    )
