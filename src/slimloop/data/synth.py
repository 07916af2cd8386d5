"""Synthetic barcode and QR-code dataset: each image depends only on (seed, split, index)."""

from __future__ import annotations

import contextlib
import functools
import math
import multiprocessing
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np
from tqdm import tqdm

from slimloop.config import DataParams, SyntheticParams
from slimloop.data import raster
from slimloop.data.canonical import SPLITS, Sample, Split, image_dir, write_annotations
from slimloop.data.render import (
    Art,
    barcode_art,
    code_colors,
    composite,
    draw_distractors,
    find_backgrounds,
    gray3,
    homography,
    photo_background,
    procedural_background,
    qr_art,
    random_color,
    region_polygon,
    warp_art,
)
from slimloop.io import Protected, atomic_dir

CLASSES = ("barcode", "qrcode")
SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
POOL_MIN_IMAGES = 200  # below this, starting worker processes costs more than it saves
MIN_BARCODE_SHORT_PX = 12.0  # at 256 px images; scaled with the image side
MAX_OCCLUDED = 0.3  # an occluder hides at most this fraction of any code
MIN_INSIDE = 0.6  # a code must have this fraction of its area inside the image


class RenderedSample(NamedTuple):
    """One synthetic image before JPEG encoding, with its ground truth."""

    image: np.ndarray  # (H, W, 3) uint8 BGR
    boxes: np.ndarray  # (N, 4) float64 xyxy px: tight box of each code's region mask
    labels: np.ndarray  # (N,) int64 index into CLASSES
    masks: np.ndarray  # (N, H, W) bool: pixels of each code's region (bars/modules, digits)
    jpeg_quality: int


@dataclass(frozen=True)
class _Code:
    box: np.ndarray  # (4,) xyxy px
    paper_box: np.ndarray  # (4,) xyxy px of its label, quiet zone included
    label: int
    mask: np.ndarray  # (H, W) bool


def sample_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator that draws image ``index`` of ``split`` for dataset ``seed``."""
    return np.random.default_rng(np.random.SeedSequence([seed % 2**64, SPLIT_IDS[split], index]))


def _as_rng(rng: np.random.Generator | int | Sequence[int]) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def render_sample(
    rng: np.random.Generator | int | Sequence[int],
    params: SyntheticParams,
    backgrounds: Sequence[Path] = (),
) -> RenderedSample:
    """Draw one synthetic image: background, distractors, 0..max_codes codes, occluders, defects.

    Args:
        rng: a generator, or a seed for one (see :func:`sample_rng` for dataset images).
        params: image size, code count and size range, distractor count.
        backgrounds: readable background photos (from :func:`find_backgrounds`); may be empty.

    Returns:
        The image with boxes, labels and region masks of the codes it shows.
    """
    rng = _as_rng(rng)
    size = params.image_size
    if backgrounds and rng.random() < 0.7:
        img = photo_background(rng, backgrounds[int(rng.integers(len(backgrounds)))], size)
    else:
        img = procedural_background(rng, size)
    draw_distractors(rng, img, int(rng.integers(0, params.distractors + 1)))
    codes = _place_codes(rng, img, params)
    _occlude(rng, img, codes)
    img = _degrade(rng, img)
    image = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    boxes = np.array([c.box for c in codes], np.float64).reshape(-1, 4)
    labels = np.array([c.label for c in codes], np.int64)
    masks = np.array([c.mask for c in codes], bool).reshape(-1, size, size)
    return RenderedSample(image, boxes, labels, masks, int(rng.integers(35, 96)))


def _place_codes(rng: np.random.Generator, img: np.ndarray, params: SyntheticParams) -> list[_Code]:
    """Place up to ``max_codes`` codes, retrying placements that overlap or fall outside."""
    placed: list[_Code] = []
    for _ in range(int(rng.integers(0, params.max_codes + 1))):
        for _art_attempt in range(2):  # drawing a code (QR encoding) costs more than placing it
            art, label = _code_art(rng, params, img.shape[0])
            code = _fit(rng, img, art, label, placed)
            if code is not None:
                placed.append(code)
                break
    return placed


def _fit(rng: np.random.Generator, img: np.ndarray, art: Art, label: int,
         placed: list[_Code], tries: int = 10) -> _Code | None:
    """Try ``tries`` random poses of ``art``; draw it at the first that fits (None: none did)."""
    for _ in range(tries):
        code = _try_place(rng, img, art, label, placed)
        if code is not None:
            return code
    return None


def _code_art(rng: np.random.Generator, params: SyntheticParams, size: int) -> tuple[Art, int]:
    """A barcode or QR code with its longest side log-uniform in [min_size, max_size] * size."""
    label = int(rng.random() < 0.5)
    lo, hi = params.min_size * size, params.max_size * size
    long_px = math.exp(rng.uniform(math.log(lo), math.log(hi)))
    if label == 1:
        return qr_art(rng, long_px), label
    aspect = rng.uniform(0.25, 0.85)
    min_short = MIN_BARCODE_SHORT_PX * size / 256
    if aspect * long_px < min_short:  # thinner than this is a grey smear, not a barcode
        long_px = min(min_short / aspect, hi)
        aspect = min(max(aspect, min_short / long_px), 1.0)
    return barcode_art(rng, long_px, aspect), label


def _area(a: np.ndarray) -> float:
    return float(max(a[2] - a[0], 0) * max(a[3] - a[1], 0))


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    inter = _inter(a, b)
    union = _area(a) + _area(b) - inter
    return inter / union if union > 0 else 0.0


def _inter(a: np.ndarray, b: np.ndarray) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return float(max(w, 0) * max(h, 0))


def _bbox(points: np.ndarray) -> np.ndarray:
    return np.concatenate([points.min(0), points.max(0)]).astype(np.float64)


def _position(rng: np.random.Generator, art: Art, size: int) -> np.ndarray:
    """Canvas -> image homography: any angle, mild perspective, region mostly inside the image."""
    hom = homography(art, rng.uniform(0, 360), (0.0, 0.0), rng.uniform(0, 0.06), rng)
    origin = region_polygon(art, hom)  # (4, 2) region corners around (0, 0)
    lo, hi = origin.min(0), origin.max(0)
    slack = (hi - lo) * (0.0 if rng.random() < 0.85 else 0.4)  # sometimes cut by the border
    start, stop = -lo - slack, size - hi + slack
    at = np.where(
        stop > start, rng.uniform(start, np.maximum(stop, start + 1e-6)), (start + stop) / 2
    )
    return raster.translate(hom, float(at[0]), float(at[1]))


def _try_place(
    rng: np.random.Generator, img: np.ndarray, art: Art, label: int, placed: list[_Code]
) -> _Code | None:
    """One attempt at drawing ``art`` into ``img``; None (image untouched) when it does not fit."""
    size = img.shape[0]
    hom = _position(rng, art, size)
    region = region_polygon(art, hom)
    h, w = art.maps.shape[:2]
    paper = raster.transform_points(np.array([[0, 0], [w, 0], [w, h], [0, h]]), hom)
    rough, paper_box = np.clip(_bbox(region), 0, size), np.clip(_bbox(paper), 0, size)
    for other in placed:
        # the new label is drawn on top: it may hide at most a tenth of an earlier code
        too_close = _iou(rough, other.box) > 0.1
        covers_other = _inter(paper_box, other.box) > 0.1 * _area(other.box)
        if too_close or covers_other or _inter(rough, other.paper_box) > 0.1 * _area(rough):
            return None
    warped = warp_art(art, hom, img.shape[:2])
    if warped is None:
        return None
    window = warped.maps[..., 1] > 0.5  # the code's pixels: coverage of at least half
    inside = int(window.sum())
    if inside == 0 or inside < MIN_INSIDE * raster.polygon_area(region):
        return None
    cols, rows = np.flatnonzero(window.any(0)), np.flatnonzero(window.any(1))
    box = np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], np.float64)
    box += (warped.x0, warped.y0, warped.x0, warped.y0)
    if min(box[2] - box[0], box[3] - box[1]) < 2:
        return None
    composite(img, warped, *code_colors(rng))
    mask = np.zeros(img.shape[:2], bool)
    mask[warped.y0 : warped.y0 + window.shape[0], warped.x0 : warped.x0 + window.shape[1]] = window
    return _Code(box, paper_box, label, mask)


def _occlude(rng: np.random.Generator, img: np.ndarray, codes: list[_Code]) -> None:
    """Cover part of some codes with a patch hiding at most MAX_OCCLUDED of any (boxes stay)."""
    for code in codes:
        if rng.random() >= 0.2:
            continue
        x1, y1, x2, y2 = code.box
        area = rng.uniform(0.05, 0.25) * code.mask.sum()
        aspect = rng.uniform(0.4, 2.5)
        pw, ph = np.sqrt(area * aspect), np.sqrt(area / aspect)
        rect = (
            (float(rng.uniform(x1, x2)), float(rng.uniform(y1, y2))),
            (float(pw), float(ph)),
            float(rng.uniform(0, 180)),
        )
        patch = np.zeros(img.shape[:2], np.uint8)
        if rng.random() < 0.5:
            cv2.ellipse(patch, rect, 1, -1)
        else:
            cv2.fillConvexPoly(patch, cv2.boxPoints(rect).astype(np.int32), 1)
        covered = patch.astype(bool)
        if any((covered & c.mask).sum() > MAX_OCCLUDED * c.mask.sum() for c in codes):
            continue
        shade = random_color(rng) + rng.normal(0, rng.uniform(0, 20), (int(covered.sum()), 1))
        img[covered] = shade.astype(np.float32)


def _degrade(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """Uneven lighting, blur and sensor noise over the whole float32 image."""
    size = img.shape[0]
    if rng.random() < 0.5:
        ramp = np.arange(size, dtype=np.float32) / size
        xx, yy = ramp[None, :], ramp[:, None]  # (1, S), (S, 1)
        if rng.random() < 0.5:
            theta = rng.uniform(0, 2 * np.pi)
            t = math.cos(theta) * xx + math.sin(theta) * yy
        else:
            cx, cy = (float(v) for v in rng.uniform(0, 1, 2))
            t = -np.sqrt((xx - cx) * (xx - cx) + (yy - cy) * (yy - cy))  # not np.hypot: CPU-dependent
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        dark, bright = rng.uniform(0.45, 0.9), rng.uniform(1.0, 1.25)
        img = img * gray3((dark + (bright - dark) * t).astype(np.float32))
    scale = size / 256
    r = rng.random()
    if r < 0.35:
        img = raster.gaussian_blur(img, rng.uniform(0.3, 1.2) * scale)
    elif r < 0.45:
        length = max(int(round(rng.uniform(2, 5) * scale)), 2)
        kernel = np.zeros((length, length), np.float32)
        kernel[length // 2, :] = 1.0 / length
        rot = raster.rotation_about(((length - 1) / 2, (length - 1) / 2), rng.uniform(0, 180))
        kernel = raster.warp_perspective(kernel, rot, (length, length))
        if length % 2 == 0:  # an odd size centres the kernel (OpenCV's even-size anchor is implicit)
            kernel = np.pad(kernel, ((0, 1), (0, 1)))
        img = raster.filter2d(img, kernel / max(math.fsum(kernel.ravel().tolist()), 1e-6))
    if rng.random() < 0.6:  # luminance noise: a third of the cost of per-channel noise
        sigma = rng.uniform(2, 12)
        img = img + gray3(rng.standard_normal((size, size), dtype=np.float32) * sigma)
    return img


@dataclass(frozen=True)
class _Job:
    """What a worker needs to render and write any image of the dataset."""

    seed: int
    params: SyntheticParams
    root: Path
    backgrounds: tuple[Path, ...]


def _render_file(job: _Job, task: tuple[str, int]) -> Sample:
    """Render image ``task = (split, index)``, write it as JPEG and return its annotation."""
    split, index = task
    s = render_sample(sample_rng(job.seed, split, index), job.params, job.backgrounds)
    ok, buf = cv2.imencode(".jpg", s.image, [cv2.IMWRITE_JPEG_QUALITY, s.jpeg_quality])
    if not ok:
        raise RuntimeError(f"JPEG encoding failed for {split}/{index}")
    name = f"{index:06d}.jpg"
    (image_dir(job.root, split) / name).write_bytes(buf.tobytes())
    size = job.params.image_size
    return Sample(name, size, size, s.boxes, s.labels)


def _init_worker() -> None:
    cv2.setNumThreads(1)  # one worker per core; OpenCV's own threads would oversubscribe
    cv2.ipp.setUseIPP(False)  # see without_ipp


@contextlib.contextmanager
def without_ipp() -> Iterator[None]:
    """Intel IPP off inside the block: its code differs by CPU generation, and so did its pixels
    (the resize of a photo background); OpenCV's own integer paths give the same bits anywhere."""
    before = cv2.ipp.useIPP()
    cv2.ipp.setUseIPP(False)
    try:
        yield
    finally:
        cv2.ipp.setUseIPP(before)


def _render_all(
    job: _Job, tasks: list[tuple[str, int]], workers: int, progress: bool
) -> Iterator[Sample]:
    work = functools.partial(_render_file, job)
    bar = tqdm(total=len(tasks), desc="synthetic images", unit="img", disable=not progress)
    with bar:
        if workers <= 0:
            for task in tasks:
                yield work(task)
                bar.update()
            return
        # spawn, not fork: the caller may hold torch/OpenMP threads that fork would break
        with multiprocessing.get_context("spawn").Pool(workers, initializer=_init_worker) as pool:
            for sample in pool.imap(work, tasks, chunksize=16):
                yield sample
                bar.update()


def generate_dataset(
    out_dir: str | Path, data: DataParams, progress: bool = True, workers: int | None = None,
    protected: Iterable[Protected] = (),
) -> dict[str, Split]:
    """Generate the synthetic dataset in canonical form (all or nothing) at ``out_dir``.

    Writes ``images/<split>/<index:06d>.jpg`` and ``<split>.json`` for train, val and test;
    a previous dataset at ``out_dir`` is replaced only once the new one is complete.

    Args:
        out_dir: dataset root.
        data: ``data.seed`` and ``data.synthetic`` (counts, sizes, backgrounds) are read.
        progress: show a tqdm bar over images.
        workers: worker processes; None uses 2 from POOL_MIN_IMAGES images on, else none.
            The output is byte-identical whatever the number.
        protected: paths ``out_dir`` must keep clear of (besides ``backgrounds_dir``).

    Returns:
        The annotations of each split.

    Raises:
        DataError: ``backgrounds_dir`` is set but missing or holds no readable image.
    """
    params = data.synthetic
    backgrounds = tuple(find_backgrounds(params.backgrounds_dir)) if params.backgrounds_dir else ()
    tasks = [(split, i) for split in SPLITS for i in range(getattr(params, split))]
    if workers is None:
        workers = 2 if len(tasks) >= POOL_MIN_IMAGES else 0
    if params.backgrounds_dir:
        protected = [*protected, Protected("the backgrounds folder", Path(params.backgrounds_dir))]
    with atomic_dir(out_dir, protected) as tmp, without_ipp():
        for split in SPLITS:
            image_dir(tmp, split).mkdir(parents=True, exist_ok=True)
        job = _Job(data.seed, params, tmp, backgrounds)
        samples = list(_render_all(job, tasks, workers, progress))
        splits: dict[str, Split] = {}
        for split in SPLITS:
            chosen = [s for (name, _), s in zip(tasks, samples, strict=True) if name == split]
            splits[split] = Split(list(CLASSES), chosen)
            write_annotations(tmp, split, splits[split])
    return splits
