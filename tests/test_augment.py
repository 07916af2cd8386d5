"""Box-aware augmentation: boxes follow the painted objects through mosaic, affine, flips, HSV."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from slimloop.config import AugmentParams
from slimloop.data import augment as aug
from slimloop.data.canonical import Sample, Split, image_dir, write_annotations
from slimloop.data.dataset import DetectionDataset

# class k is painted in PALETTE[k] on a black background
PALETTE = np.array(
    [[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [255, 0, 255], [0, 255, 255]], np.float64
)
# per image: (w, h, [(cls, x1, y1, x2, y2)]); rects stay >= 6 px away from the image border
LAYOUT = [
    (80, 60, [(0, 10, 8, 40, 30), (1, 50, 35, 72, 52)]),
    (80, 60, [(2, 30, 20, 66, 44)]),
    (60, 80, [(3, 8, 10, 30, 40), (4, 20, 50, 50, 72)]),
    (80, 60, [(5, 10, 24, 66, 30)]),  # long and thin, like a barcode
    (50, 50, [(1, 12, 12, 38, 38)]),
    (80, 60, [(0, 50, 10, 70, 20), (2, 8, 36, 26, 54)]),
]
NO_AUG = AugmentParams(hsv_h=0, hsv_s=0, hsv_v=0, degrees=0, translate=0, scale=0, fliplr=0, flipud=0, mosaic=0)


def paint(w: int, h: int, rects: list[tuple[int, int, int, int, int]]) -> np.ndarray:
    """(h, w, 3) RGB black image with solid rectangles in their class colour."""
    img = np.zeros((h, w, 3), np.uint8)
    for cls, x1, y1, x2, y2 in rects:
        img[y1:y2, x1:x2] = PALETTE[cls]
    return img


def class_map(img: np.ndarray) -> np.ndarray:
    """(h, w) class of the nearest palette colour, -1 where black or gray 114 is nearer."""
    refs = np.concatenate([PALETTE, [[0, 0, 0], [114, 114, 114]]])  # (8, 3)
    dist = np.linalg.norm(img[:, :, None, :].astype(np.float64) - refs, axis=-1)  # (h, w, 8)
    nearest = dist.argmin(-1)
    return np.where(nearest < len(PALETTE), nearest, -1)


def check_boxes(img, boxes, cls, tight: bool, max_lost: float, tol: float = 1.5) -> None:
    """Every box lies in the image; objects are covered by boxes of their class.

    Pixels of a class outside every (tol-dilated) box of that class are allowed only as slivers
    that box_candidates dropped: thin (<= 3 px) or small (<= max_lost px). With ``tight``, each
    box's edges match the extent of its colour within ``tol`` (axis-aligned transforms only).
    """
    h, w = img.shape[:2]
    assert np.all(boxes >= -1e-4) and np.all(boxes[:, [0, 2]] <= w + 1e-4)
    assert np.all(boxes[:, [1, 3]] <= h + 1e-4)
    cmap = class_map(img)
    for c in range(len(PALETTE)):
        covered = np.zeros((h, w), bool)
        for x1, y1, x2, y2 in boxes[cls == c]:
            covered[
                max(0, int(np.floor(y1 - tol))) : int(np.ceil(y2 + tol)),
                max(0, int(np.floor(x1 - tol))) : int(np.ceil(x2 + tol)),
            ] = True
        lost = ((cmap == c) & ~covered).astype(np.uint8)
        n, _, stats, _ = cv2.connectedComponentsWithStats(lost)
        for _, _, bw, bh, area in stats[1:n]:
            assert min(bw, bh) <= 3 or area <= max_lost, f"class {c}: {bw}x{bh} object not boxed"
    if not tight:
        return
    for (x1, y1, x2, y2), c in zip(boxes, cls, strict=True):
        r0, c0 = max(0, int(y1 - 3)), max(0, int(x1 - 3))
        ys, xs = np.nonzero(cmap[r0 : int(y2 + 4), c0 : int(x2 + 4)] == c)
        extent = np.array([xs.min() + c0, ys.min() + r0, xs.max() + c0 + 1, ys.max() + r0 + 1])
        assert np.abs(extent - [x1, y1, x2, y2]).max() <= tol, (extent, (x1, y1, x2, y2))


def tile(k: int) -> aug.Tile:
    w, h, rects = LAYOUT[k]
    boxes = np.array([r[1:] for r in rects], np.float64)
    return paint(w, h, rects), boxes, np.array([r[0] for r in rects])


@pytest.fixture
def dataset_root(tmp_path):
    samples = []
    for k, (w, h, rects) in enumerate(LAYOUT):
        name = f"im{k}.png"
        path = image_dir(tmp_path, "train") / name
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), cv2.cvtColor(paint(w, h, rects), cv2.COLOR_RGB2BGR))
        boxes = np.array([r[1:] for r in rects], np.float64)
        samples.append(Sample(name, w, h, boxes, np.array([r[0] for r in rects])))
    write_annotations(tmp_path, "train", Split([f"c{i}" for i in range(6)], samples))
    return tmp_path


def test_letterbox_geometry():
    img = paint(80, 60, LAYOUT[0][2])
    out, r, pad = aug.letterbox(img, 64)
    assert out.shape == (64, 64, 3) and r == pytest.approx(0.8) and pad == (0, 8)
    assert np.all(out[:8] == 114) and np.all(out[56:] == 114) and out[8:56].max() == 255
    out, r, pad = aug.letterbox(paint(60, 80, LAYOUT[2][2]), 64)
    assert pad == (8, 0) and np.all(out[:, :8] == 114) and np.all(out[:, 56:] == 114)


def test_mosaic_places_tiles_and_boxes_exactly():
    rng = np.random.default_rng(3)
    tiles = [tile(k) for k in (0, 1, 2, 5)]
    canvas, boxes, cls = aug.mosaic(tiles, 80, rng)
    assert canvas.shape == (160, 160, 3)
    assert len(boxes) == sum(len(t[1]) for t in tiles)
    clipped = aug.clip_boxes(boxes.copy(), 160, 160)
    visible = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
    check_boxes(canvas, clipped[visible], cls[visible], tight=True, max_lost=0, tol=0)


@pytest.mark.parametrize("seed", range(6))
def test_affine_keeps_boxes_tight_on_objects(seed):
    params = AugmentParams(degrees=0, translate=0.2, scale=0.5)
    img, boxes, cls = tile(seed % len(LAYOUT))
    out, new, keep = aug.random_affine(img, boxes, params, np.random.default_rng(seed), border=0)
    assert out.shape == img.shape and len(new) == keep.sum()
    # a dropped box keeps < 10% of its area at scale <= 1.5 (largest object 36x24 px)
    check_boxes(out, new, cls[keep], tight=True, max_lost=0.1 * 36 * 24 * 1.5**2 + 20)


@pytest.mark.parametrize("seed", range(4))
def test_rotated_boxes_cover_objects(seed):
    params = AugmentParams(degrees=30, translate=0.1, scale=0.3)
    img, boxes, cls = tile(seed)
    out, new, keep = aug.random_affine(img, boxes, params, np.random.default_rng(seed), border=0)
    check_boxes(out, new, cls[keep], tight=False, max_lost=0.1 * 36 * 24 * 1.3**2 + 20)
    # a rotated rectangle's min/max box is loose: it holds the object and some background
    assert len(new) and np.all(new[:, 2] - new[:, 0] > 2)


def test_box_candidates_thresholds():
    before = np.array([[0, 0, 40, 40], [0, 0, 40, 40], [0, 0, 90, 3], [0, 0, 450, 3], [0, 0, 40, 40]], float)
    after = np.array([[0, 0, 40, 40], [0, 0, 40, 2], [0, 0, 90, 3], [0, 0, 450, 3], [0, 0, 12, 12]], float)
    keep = aug.box_candidates(before, after, scale=1.0)
    # whole box kept; 2 px thin dropped; barcode-like 30:1 kept; 150:1 dropped; 9% area dropped
    assert keep.tolist() == [True, False, True, False, False]
    assert aug.box_candidates(before[4:], after[4:], scale=0.5).tolist() == [True]


def test_flips_are_exact():
    img, boxes, _ = tile(0)
    params = AugmentParams(fliplr=1.0, flipud=1.0)
    out, new = aug.random_flip(img, boxes.copy(), params, np.random.default_rng(0))
    np.testing.assert_array_equal(out, img[::-1, ::-1])
    expected = np.stack([80 - boxes[:, 2], 60 - boxes[:, 3], 80 - boxes[:, 0], 60 - boxes[:, 1]], 1)
    np.testing.assert_array_equal(new, expected)


def test_hsv_changes_colours_deterministically():
    img = paint(80, 60, LAYOUT[0][2])
    img[img.sum(-1) == 0] = (90, 60, 30)  # a background with hue, saturation and value
    params = AugmentParams(hsv_h=0.1, hsv_s=0.7, hsv_v=0.4)
    a = aug.augment_hsv(img, params, np.random.default_rng(1))
    b = aug.augment_hsv(img, params, np.random.default_rng(1))
    np.testing.assert_array_equal(a, b)
    assert a.shape == img.shape and np.abs(a.astype(int) - img).max() > 20
    assert aug.augment_hsv(img, NO_AUG, np.random.default_rng(1)) is img


def test_dataset_mosaic_boxes_cover_objects(dataset_root):
    params = AugmentParams(hsv_h=0, hsv_s=0, hsv_v=0, degrees=0, translate=0.1, scale=0.5, mosaic=1.0)
    ds = DetectionDataset(dataset_root, "train", 64, augment=params, seed=5)
    n_boxes = 0
    for epoch in range(3):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            img, labels, _ = ds[i]
            boxes = labels[:, 2:].numpy().astype(np.float64) * 64
            xyxy = np.concatenate([boxes[:, :2] - boxes[:, 2:] / 2, boxes[:, :2] + boxes[:, 2:] / 2], 1)
            # objects are at most 36x24 px at 80 px -> 29x20 at 64, then scale <= 1.5
            check_boxes(img.permute(1, 2, 0).numpy(), xyxy, labels[:, 1].numpy().astype(int),
                        tight=True, max_lost=0.1 * 29 * 20 * 1.5**2 + 20)
            n_boxes += len(labels)
    assert n_boxes > 2 * len(ds)  # mosaic gathers objects from four images


def test_dataset_hsv_changes_pixels_not_boxes(dataset_root):
    geo = dict(degrees=5, translate=0.1, scale=0.3, fliplr=0.5, mosaic=0.5)
    plain = DetectionDataset(dataset_root, "train", 64, AugmentParams(hsv_h=0, hsv_s=0, hsv_v=0, **geo))
    jitter = DetectionDataset(dataset_root, "train", 64, AugmentParams(hsv_h=0.1, hsv_s=0.7, hsv_v=0.4, **geo))
    changed = 0
    for i in range(len(plain)):
        (a, la, _), (b, lb, _) = plain[i], jitter[i]
        assert torch_equal(la, lb)
        changed += int(not torch_equal(a, b))
    assert changed == len(plain)


def torch_equal(a, b) -> bool:
    return a.shape == b.shape and bool((a == b).all())


def test_dataset_flip_is_exact(dataset_root):
    base = dict(hsv_h=0, hsv_s=0, hsv_v=0, degrees=0, translate=0, scale=0, mosaic=0)
    plain = DetectionDataset(dataset_root, "train", 64, AugmentParams(fliplr=0, **base))
    flipped = DetectionDataset(dataset_root, "train", 64, AugmentParams(fliplr=1, **base))
    for i in range(len(plain)):
        (a, la, _), (b, lb, _) = plain[i], flipped[i]
        assert torch_equal(b, a.flip(-1))
        assert torch_equal(lb[:, [0, 1, 3, 4, 5]], la[:, [0, 1, 3, 4, 5]])
        np.testing.assert_allclose(lb[:, 2].numpy(), 1 - la[:, 2].numpy(), atol=1e-6)


class _HighRng:
    """Stands in for a Generator: every uniform draw returns its upper bound."""

    def uniform(self, low, high, size=None):
        return high if size is None else np.full(size, high, np.float64)


@pytest.mark.parametrize("degrees", [0.0, 30.0])
def test_affine_box_follows_pixels_subpixel(degrees):
    """The box centre lands on the warped object's intensity centroid (pixel-centre convention)."""
    img = np.zeros((40, 40, 3), np.uint8)
    img[10:12, 18:20] = 255
    box = np.array([[18.0, 10.0, 20.0, 12.0]])
    params = AugmentParams(degrees=degrees, translate=0.1, scale=0.9)  # s = 1.9
    out, new, keep = aug.random_affine(img, box, params, _HighRng(), border=0)
    assert keep.tolist() == [True]
    weight = out[:, :, 0].astype(np.float64)
    ys, xs = np.mgrid[: out.shape[0], : out.shape[1]] + 0.5  # pixel centres in edge coordinates
    centroid = [(weight * xs).sum() / weight.sum(), (weight * ys).sum() / weight.sum()]
    np.testing.assert_allclose((new[0, :2] + new[0, 2:]) / 2, centroid, atol=0.1)
    if degrees == 0:
        np.testing.assert_allclose(new[0, 2:] - new[0, :2], [3.8, 3.8], atol=1e-9)
