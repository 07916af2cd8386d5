"""Torch Dataset over a canonical split: image cache, eval letterbox, seeded augmentation, loader.

Randomness: every sample draws from ``np.random.default_rng([seed, epoch, index])`` and nothing
else, so a sample depends only on (seed, epoch, index), never on worker count or order.

Epoch propagation: the epoch lives in a one-element torch tensor in shared memory. DataLoader
workers (forked or spawned; torch pickles shared tensors as handles) read it in
``__getitem__`` and the shuffling sampler reads it in the main process, so one loader with
persistent workers serves every epoch: call ``dataset.set_epoch(e)`` before iterating epoch e.
Changing the epoch while an epoch is being iterated affects batches not yet prefetched.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from slimloop.config import AugmentParams
from slimloop.data import augment as aug
from slimloop.data.canonical import Sample, image_dir, read_split
from slimloop.errors import DataError, Problem

Meta = dict[str, Any]
Item = tuple[torch.Tensor, torch.Tensor, Meta]

_U64 = 2**64


def _seed_words(*values: int) -> list[int]:
    """Non-negative words for ``SeedSequence`` (seeds may be negative in params)."""
    return [int(v) % _U64 for v in values]


def decode_image(path: Path) -> np.ndarray:
    """Read an image file as (h, w, 3) uint8 RGB.

    Grayscale becomes 3 channels, alpha is dropped, 16-bit is scaled to 8-bit.

    Raises:
        DataError: the file is missing, cannot be decoded, or has an unsupported pixel type.
    """
    if not path.is_file():
        raise DataError(Problem(str(path), None, "image file is missing"))
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None or img.size == 0:
        raise DataError(Problem(str(path), None, "cannot decode image (corrupt or unknown format)"))
    if img.dtype == np.uint16:
        img = cv2.convertScaleAbs(img, alpha=255.0 / 65535.0)  # rounds, 65535 -> 255
    elif img.dtype != np.uint8:
        raise DataError(Problem(str(path), None, f"unsupported pixel type {img.dtype}"))
    channels = 1 if img.ndim == 2 else img.shape[2]
    codes = {1: cv2.COLOR_GRAY2RGB, 3: cv2.COLOR_BGR2RGB, 4: cv2.COLOR_BGRA2RGB}
    if channels not in codes:
        raise DataError(Problem(str(path), None, f"unsupported channel count {channels}"))
    return cv2.cvtColor(img, codes[channels])


class DetectionDataset(Dataset):
    """One split of a canonical dataset as ``(img, labels, meta)`` samples of size ``imgsz``.

    Args:
        root: canonical dataset root (``<root>/<split>.json``, ``<root>/images/<split>/``).
        split: ``train``, ``val`` or ``test``.
        imgsz: side of the square output images.
        augment: training augmentation, or None for the evaluation letterbox.
        seed: base seed of the per-sample random generators.
        cache_images: decode every image once at construction and keep it in RAM resized so
            the long side is ``imgsz`` (one contiguous buffer, shared copy-on-write with forked
            workers). Without it images are decoded on every access.

    Raises:
        DataError: the annotation file is missing or malformed, or (with ``cache_images``)
            any image is missing, corrupt, or not the size its annotation says; all are listed.
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        imgsz: int,
        augment: AugmentParams | None = None,
        seed: int = 0,
        cache_images: bool = True,
    ):
        self.root = Path(root)
        self.split_name = split
        self.split = read_split(root, split)
        self.names = self.split.names
        self.imgsz = int(imgsz)
        self.augment = augment
        self.seed = int(seed)
        self._dir = image_dir(root, split)
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self._shapes = np.array(
            [aug.scaled_shape(s.width, s.height, self._ratio(i))[::-1] for i, s in enumerate(self.samples)],
            dtype=np.int64,
        ).reshape(-1, 2)  # (N, 2) (h, w) after resizing the long side to imgsz
        self._cache: np.ndarray | None = None
        self._offsets = np.zeros(len(self) + 1, dtype=np.int64)
        if cache_images:
            self._fill_cache()

    @property
    def samples(self) -> list[Sample]:
        """The split's samples (image ``i`` has COCO image id ``i + 1``)."""
        return self.split.samples

    @property
    def epoch(self) -> int:
        """The epoch whose augmentation ``__getitem__`` produces."""
        return int(self._epoch.item())

    @property
    def cache_bytes(self) -> int:
        """Bytes held by the image cache (0 without one)."""
        return 0 if self._cache is None else int(self._cache.nbytes)

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation (and loader shuffle order) of ``epoch``, in every worker."""
        self._epoch.fill_(int(epoch))

    def __len__(self) -> int:
        return len(self.samples)

    def _ratio(self, i: int) -> float:
        s = self.samples[i]
        return self.imgsz / max(s.width, s.height)

    def _read_resized(self, i: int) -> np.ndarray:
        """Decode image ``i`` and resize its long side to imgsz; checks the annotated size."""
        s = self.samples[i]
        path = self._dir / s.file_name
        img = decode_image(path)
        h, w = img.shape[:2]
        if (w, h) != (s.width, s.height):
            msg = f"image is {w}x{h} but its annotation says {s.width}x{s.height}"
            raise DataError(Problem(str(path), None, msg))
        img, _ = aug.resize_long_side(img, self.imgsz)
        return img

    def _fill_cache(self) -> None:
        sizes = self._shapes[:, 0] * self._shapes[:, 1] * 3
        self._offsets[1:] = np.cumsum(sizes)
        cache = np.empty(int(self._offsets[-1]), dtype=np.uint8)
        problems: list[Problem] = []
        for i in range(len(self)):
            try:
                img = self._read_resized(i)
            except DataError as exc:
                problems.extend(exc.problems)
                continue
            cache[self._offsets[i] : self._offsets[i + 1]] = img.reshape(-1)
        if problems:
            raise DataError(problems, header=f"cannot load images of split {self.split_name!r}")
        cache.flags.writeable = False  # transforms must copy, never edit a cached image
        self._cache = cache

    def load_image(self, i: int) -> aug.Tile:
        """Image ``i`` resized so its long side is imgsz, with its boxes at that scale.

        Returns:
            ``(img (h, w, 3) uint8 RGB, boxes (n, 4) xyxy px, cls (n,))``; ``img`` may be a
            read-only view into the cache.
        """
        if self._cache is not None:
            h, w = self._shapes[i]
            img = self._cache[self._offsets[i] : self._offsets[i + 1]].reshape(h, w, 3)
        else:
            img = self._read_resized(i)
        s = self.samples[i]
        return img, s.boxes.astype(np.float64) * self._ratio(i), s.labels.astype(np.int64)

    def __getitem__(self, i: int) -> Item:
        """Sample ``i``: ``(img uint8 (3, imgsz, imgsz) RGB, labels float32 (n, 6), meta)``.

        ``labels`` rows are ``[0, cls, cx, cy, w, h]`` normalized to the output image; ``meta``
        is ``{"image_id": i + 1, "orig_shape": (h, w), "ratio": r, "pad": (padw, padh)}``.
        Without augmentation ``orig_xy = (xy - pad) / ratio``; with it, ``ratio`` and ``pad``
        describe the letterbox before the random geometry (mosaic: pad ``(0, 0)``).
        """
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} samples")
        if self.augment is None:
            img, boxes, cls = self.load_image(i)
            img, r, pad = aug.letterbox(img, self.imgsz)
            boxes = aug.clip_boxes(boxes * r + np.array(pad * 2, np.float64), self.imgsz, self.imgsz)
            ratio, pad = self._ratio(i) * r, pad
        else:
            rng = np.random.default_rng(_seed_words(self.seed, self.epoch, i))
            img, boxes, cls, pad = self._augmented(i, self.augment, rng)
            ratio = self._ratio(i)
        s = self.samples[i]
        meta = {
            "image_id": i + 1,
            "orig_shape": (s.height, s.width),
            "ratio": float(ratio),
            "pad": (float(pad[0]), float(pad[1])),
        }
        img_t = torch.from_numpy(img.transpose(2, 0, 1).copy())  # (3, H, W) uint8, C order
        return img_t, _labels_tensor(boxes, cls, self.imgsz), meta

    def _augmented(
        self, i: int, p: AugmentParams, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, int]]:
        """Training view of sample ``i``: mosaic or letterbox, affine, HSV, flips."""
        s = self.imgsz
        if rng.random() < p.mosaic:
            picks = np.concatenate([[i], rng.integers(0, len(self), 3)])[rng.permutation(4)]
            img, boxes, cls = aug.mosaic([self.load_image(int(j)) for j in picks], s, rng)
            pad, border = (0, 0), -(s // 2)
        else:
            img, boxes, cls = self.load_image(i)
            img, r, pad = aug.letterbox(img, s)
            boxes = boxes * r + np.array(pad * 2, np.float64)
            border = 0
        img, boxes, keep = aug.random_affine(img, boxes, p, rng, border)
        img = aug.augment_hsv(img, p, rng)
        img, boxes = aug.random_flip(img, boxes, p, rng)
        return img, boxes, cls[keep], pad


def _labels_tensor(boxes: np.ndarray, cls: np.ndarray, size: int) -> torch.Tensor:
    """(n, 6) float32 ``[0, cls, cx, cy, w, h]`` normalized by ``size`` from xyxy px boxes."""
    labels = np.zeros((len(boxes), 6), dtype=np.float32)
    if len(boxes):
        labels[:, 1] = cls
        labels[:, 2] = (boxes[:, 0] + boxes[:, 2]) / (2 * size)
        labels[:, 3] = (boxes[:, 1] + boxes[:, 3]) / (2 * size)
        labels[:, 4] = (boxes[:, 2] - boxes[:, 0]) / size
        labels[:, 5] = (boxes[:, 3] - boxes[:, 1]) / size
    return torch.from_numpy(labels)


def collate_fn(batch: list[Item]) -> tuple[torch.Tensor, torch.Tensor, list[Meta]]:
    """Stack samples: ``(imgs uint8 (B, 3, H, W), labels (M, 6) col 0 = index in batch, metas)``."""
    imgs, labels, metas = zip(*batch, strict=True)
    rows = []
    for k, lab in enumerate(labels):
        lab = lab.clone()
        lab[:, 0] = k
        rows.append(lab)
    # default_collate stacks into shared memory inside a worker, saving a copy per batch
    return default_collate(list(imgs)), torch.cat(rows), list(metas)


class EpochSampler(Sampler[int]):
    """Sample order of the dataset's current epoch: a permutation seeded by (seed, epoch)."""

    def __init__(self, dataset: DetectionDataset, shuffle: bool, seed: int):
        self.dataset = dataset
        self.shuffle = shuffle
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(len(self.dataset)))
        words = _seed_words(self.seed, self.dataset.epoch)
        state = np.random.SeedSequence(words).generate_state(1, np.uint64)[0]
        gen = torch.Generator().manual_seed(int(state) & (2**63 - 1))
        return iter(torch.randperm(len(self.dataset), generator=gen).tolist())


class ShardBatchSampler(Sampler[list[int]]):
    """Rank ``rank``'s share of each global batch of :class:`EpochSampler`'s order.

    Global batch ``k`` is ``order[k * B:(k + 1) * B]``; it is split into ``world`` consecutive
    chunks (sizes differ by at most one) and this rank takes chunk ``rank``, so the ranks' batches
    of a step, concatenated in rank order, are exactly the single-process batch. A last batch with
    fewer samples than ranks lends a rank without a chunk one of its samples (DDP needs every rank
    to take every step).
    """

    def __init__(self, order: EpochSampler, batch_size: int, rank: int, world: int):
        if not 0 <= rank < world or batch_size < world:
            raise ValueError(f"rank {rank} of {world} with a global batch of {batch_size}")
        self.order, self.batch_size, self.rank, self.world = order, batch_size, rank, world

    def __len__(self) -> int:
        return -(-len(self.order) // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        order = list(self.order)
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            chunks = np.array_split(np.asarray(batch), self.world)
            mine = chunks[self.rank].tolist()
            yield mine if mine else [batch[self.rank % len(batch)]]


def _worker_init(_: int) -> None:
    # workers already run torch single-threaded; keep cv2 from oversubscribing the cores too
    cv2.setNumThreads(0)


def make_loader(
    dataset: DetectionDataset,
    batch_size: int,
    shuffle: bool,
    workers: int,
    seed: int,
    epoch: int | None = None,
    pin_memory: bool = False,
    rank: int = 0,
    world: int = 1,
) -> DataLoader:
    """DataLoader over ``dataset`` built once for all epochs.

    Call ``dataset.set_epoch(e)`` before iterating epoch ``e``: it selects both the shuffle
    order (a permutation seeded by ``(seed, e)``) and the augmentation, in the main process and
    in the persistent workers alike, so batches do not depend on ``workers``.

    Args:
        dataset: the dataset.
        batch_size: samples per batch (the last batch may be smaller).
        shuffle: permute the samples each epoch.
        workers: worker processes (0 = load in the main process).
        seed: seed of the shuffle order.
        epoch: if given, ``dataset.set_epoch(epoch)`` now.
        pin_memory: pin batches for faster host-to-GPU copies.
        rank: this process's rank in data-parallel training.
        world: number of processes; above 1, ``batch_size`` is the global batch and this rank
            loads its share of it (:class:`ShardBatchSampler`).

    Returns:
        A DataLoader yielding :func:`collate_fn` batches.
    """
    if epoch is not None:
        dataset.set_epoch(epoch)
    order = EpochSampler(dataset, shuffle, seed)
    batching: dict[str, Any] = {"batch_size": batch_size, "sampler": order}
    if world > 1:
        batching = {"batch_sampler": ShardBatchSampler(order, batch_size, rank, world)}
    return DataLoader(
        dataset,
        **batching,
        num_workers=workers,
        collate_fn=collate_fn,
        pin_memory=pin_memory,
        persistent_workers=workers > 0,
        worker_init_fn=_worker_init if workers > 0 else None,
        # unused by our sampler, but without it each iter() draws from torch's global RNG
        generator=torch.Generator().manual_seed(int(_seed_words(seed)[0] & (2**63 - 1))),
    )


def box_wh(dataset: DetectionDataset) -> np.ndarray:
    """All label widths and heights in px at the letterboxed ``imgsz`` scale (for autoanchor).

    Returns:
        (N, 2) float32 ``(w, h)`` over every box of every sample, no augmentation.
    """
    rows = [
        (s.boxes[:, 2:4] - s.boxes[:, 0:2]).reshape(-1, 2) * dataset.imgsz / max(s.width, s.height)
        for s in dataset.samples
    ]
    return np.concatenate(rows).astype(np.float32) if rows else np.zeros((0, 2), np.float32)
