"""Box-aware image transforms after YOLOv5: letterbox, mosaic, random affine, HSV jitter, flips."""

from __future__ import annotations

import cv2
import numpy as np

from slimloop.config import AugmentParams

GRAY = 114  # letterbox / border fill, as YOLOv5
WH_THR = 2.0  # boxes this thin (px) or thinner are dropped after augmentation
AREA_THR = 0.1  # ... and boxes keeping less than this fraction of their (scaled) area
# YOLOv5 uses 100 (20 in old releases); barcodes are long and thin, so never tighten it below 20.
AR_THR = 100.0

# One image with its boxes: (img (h, w, 3) uint8 RGB, boxes (n, 4) xyxy px, cls (n,) int64).
Tile = tuple[np.ndarray, np.ndarray, np.ndarray]


def resize_long_side(img: np.ndarray, size: int) -> tuple[np.ndarray, float]:
    """Resize ``img`` so that its long side is ``size`` px (YOLOv5's ``load_image``).

    Args:
        img: (h, w, 3) uint8 image.
        size: target length of the long side.

    Returns:
        The resized image and the ratio ``r`` (new = old * r; the short side is rounded).
    """
    h, w = img.shape[:2]
    r = size / max(h, w)
    if r == 1:
        return img, r
    new_w, new_h = scaled_shape(w, h, r)
    interp = cv2.INTER_AREA if r < 1 else cv2.INTER_LINEAR
    return cv2.resize(img, (new_w, new_h), interpolation=interp), r


def scaled_shape(w: int, h: int, r: float) -> tuple[int, int]:
    """``(w, h)`` scaled by ``r`` and rounded, at least 1 px each."""
    return max(1, int(w * r + 0.5)), max(1, int(h * r + 0.5))


def letterbox(img: np.ndarray, size: int) -> tuple[np.ndarray, float, tuple[int, int]]:
    """Fit ``img`` into a ``size`` x ``size`` square, keeping aspect, centered on gray 114.

    Args:
        img: (h, w, 3) uint8 image.
        size: side of the output square.

    Returns:
        ``(out (size, size, 3), ratio, (padw, padh))`` with ``out_xy = xy * ratio + pad``.
    """
    img, r = resize_long_side(img, size)
    h, w = img.shape[:2]
    padw, padh = (size - w) // 2, (size - h) // 2
    if (padw, padh, w, h) == (0, 0, size, size):
        return img, r, (0, 0)
    out = cv2.copyMakeBorder(
        img, padh, size - h - padh, padw, size - w - padw, cv2.BORDER_CONSTANT, value=(GRAY,) * 3
    )
    return out, r, (padw, padh)


def mosaic(tiles: list[Tile], imgsz: int, rng: np.random.Generator) -> Tile:
    """Place four tiles around a random centre of a ``2 * imgsz`` square canvas (YOLOv5).

    Args:
        tiles: four images (long side ``imgsz``) with their boxes in their own pixels.
        imgsz: training size; the canvas is ``2 * imgsz`` square, gray elsewhere.
        rng: source of the random centre.

    Returns:
        ``(canvas (2s, 2s, 3), boxes (n, 4) xyxy canvas px, cls (n,))``. Boxes are NOT
        clipped to the canvas: :func:`random_affine` clips them and uses the full box to
        judge how much of an object is left.
    """
    s = imgsz
    xc, yc = (int(v) for v in rng.uniform(s / 2, 1.5 * s, 2))
    canvas = np.full((2 * s, 2 * s, 3), GRAY, dtype=np.uint8)
    all_boxes, all_cls = [], []
    for k, (img, boxes, cls) in enumerate(tiles):
        h, w = img.shape[:2]
        # destination corners a, source corners b: quadrant k touches the centre (xc, yc)
        x1a = max(xc - w, 0) if k in (0, 2) else xc
        x2a = xc if k in (0, 2) else min(xc + w, 2 * s)
        y1a = max(yc - h, 0) if k in (0, 1) else yc
        y2a = yc if k in (0, 1) else min(yc + h, 2 * s)
        x1b = w - (x2a - x1a) if k in (0, 2) else 0
        y1b = h - (y2a - y1a) if k in (0, 1) else 0
        canvas[y1a:y2a, x1a:x2a] = img[y1b : y1b + y2a - y1a, x1b : x1b + x2a - x1a]
        shift = np.array([x1a - x1b, y1a - y1b] * 2, dtype=np.float64)
        all_boxes.append(np.asarray(boxes, np.float64).reshape(-1, 4) + shift)
        all_cls.append(np.asarray(cls, np.int64).reshape(-1))
    return canvas, np.concatenate(all_boxes), np.concatenate(all_cls)


def box_candidates(before: np.ndarray, after: np.ndarray, scale: float) -> np.ndarray:
    """Boolean mask of boxes still worth training on after a geometric transform (YOLOv5).

    Args:
        before: (n, 4) xyxy boxes before the transform (unclipped: the whole object).
        after: (n, 4) xyxy boxes after transform and clipping.
        scale: the transform's scale; the area test compares with ``before`` area * scale**2
            (YOLOv5 multiplies by ``scale`` once, which under-counts area changes).

    Returns:
        (n,) bool: wider and taller than ``WH_THR``, at least ``AREA_THR`` of the expected
        area left, aspect ratio below ``AR_THR``.
    """
    eps = 1e-16
    w1, h1 = before[:, 2] - before[:, 0], before[:, 3] - before[:, 1]
    w2, h2 = after[:, 2] - after[:, 0], after[:, 3] - after[:, 1]
    ar = np.maximum(w2 / (h2 + eps), h2 / (w2 + eps))
    area_ok = w2 * h2 / (w1 * h1 * scale**2 + eps) > AREA_THR
    return (w2 > WH_THR) & (h2 > WH_THR) & area_ok & (ar < AR_THR)


def affine_matrix(
    shape: tuple[int, int], out_shape: tuple[int, int], params: AugmentParams, rng: np.random.Generator
) -> tuple[np.ndarray, float]:
    """Random rotation + scale about the input centre, then translation into the output.

    Args:
        shape: input ``(h, w)``.
        out_shape: output ``(h, w)``.
        params: ``degrees``, ``scale`` and ``translate`` are used (shear and perspective are 0).
        rng: source of the angle, scale and translation (always 4 draws).

    Returns:
        ``(M (3, 3), s)``: M maps input pixel indices to output pixel indices (cv2 convention).
    """
    angle = rng.uniform(-params.degrees, params.degrees)
    s = rng.uniform(1 - params.scale, 1 + params.scale)
    tx, ty = rng.uniform(0.5 - params.translate, 0.5 + params.translate, 2)
    centre = np.eye(3)
    centre[:2, 2] = -shape[1] / 2, -shape[0] / 2
    rot = np.eye(3)
    rot[:2] = cv2.getRotationMatrix2D(center=(0, 0), angle=angle, scale=s)
    move = np.eye(3)
    move[:2, 2] = tx * out_shape[1], ty * out_shape[0]
    return move @ rot @ centre, s


def random_affine(
    img: np.ndarray, boxes: np.ndarray, params: AugmentParams, rng: np.random.Generator, border: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random rotate/scale/translate (YOLOv5 ``random_perspective`` without shear/perspective).

    Args:
        img: (h, w, 3) uint8 image.
        boxes: (n, 4) xyxy px; may extend beyond ``img`` (mosaic); clipped to it first.
        params: augmentation params.
        rng: random source.
        border: output is ``(h + 2 * border, w + 2 * border)``; mosaic passes ``-imgsz // 2``.

    Returns:
        ``(img, boxes (m, 4) clipped to the output, keep (n,) bool)`` where ``keep`` selects the
        surviving input boxes (see :func:`box_candidates`).
    """
    h, w = img.shape[:2]
    out_h, out_w = h + 2 * border, w + 2 * border
    m, s = affine_matrix((h, w), (out_h, out_w), params, rng)
    if border != 0 or not np.array_equal(m, np.eye(3)):
        img = cv2.warpAffine(img, m[:2], dsize=(out_w, out_h), borderValue=(GRAY,) * 3)
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    if not len(boxes):
        return img, boxes, np.zeros(0, bool)
    src = clip_boxes(boxes.copy(), w, h)
    # cv2 maps pixel indices; boxes use edges (pixel centre at +0.5): conjugate by a half shift
    half = np.eye(3)
    half[:2, 2] = 0.5
    mb = half @ m @ np.linalg.inv(half)
    corners = src[:, [0, 1, 2, 3, 0, 3, 2, 1]].reshape(-1, 2)  # (4n, 2) all four corners
    xy = (corners @ mb[:2, :2].T + mb[:2, 2]).reshape(-1, 4, 2)  # (n, 4, 2)
    new = np.concatenate([xy.min(1), xy.max(1)], axis=1)  # (n, 4) xyxy
    clip_boxes(new, out_w, out_h)
    keep = box_candidates(boxes, new, s)
    return img, new[keep], keep


def clip_boxes(boxes: np.ndarray, w: float, h: float) -> np.ndarray:
    """Clip (n, 4) xyxy ``boxes`` in place to ``[0, w] x [0, h]`` and return them."""
    boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, w)
    boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, h)
    return boxes


def augment_hsv(img: np.ndarray, params: AugmentParams, rng: np.random.Generator) -> np.ndarray:
    """Random hue/saturation/value gains through lookup tables (YOLOv5); boxes are unchanged.

    Args:
        img: (h, w, 3) uint8 RGB image.
        params: ``hsv_h``, ``hsv_s``, ``hsv_v`` gain ranges.
        rng: random source (always 3 draws, so later draws do not depend on the gains).

    Returns:
        A new RGB image, or ``img`` itself when all gains are zero.
    """
    gains = rng.uniform(-1, 1, 3) * (params.hsv_h, params.hsv_s, params.hsv_v) + 1
    if np.all(gains == 1):
        return img
    hue, sat, val = cv2.split(cv2.cvtColor(img, cv2.COLOR_RGB2HSV))
    x = np.arange(256, dtype=np.float64)
    lut_hue = ((x * gains[0]) % 180).astype(np.uint8)  # 8-bit OpenCV hue is 0..179
    lut_sat = np.clip(x * gains[1], 0, 255).astype(np.uint8)
    lut_val = np.clip(x * gains[2], 0, 255).astype(np.uint8)
    hsv = cv2.merge((cv2.LUT(hue, lut_hue), cv2.LUT(sat, lut_sat), cv2.LUT(val, lut_val)))
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)


def random_flip(
    img: np.ndarray, boxes: np.ndarray, params: AugmentParams, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Flip left-right with probability ``fliplr`` and up-down with ``flipud``.

    Args:
        img: (h, w, 3) image.
        boxes: (n, 4) xyxy px, modified in place when flipped.
        params: flip probabilities.
        rng: random source (always 2 draws).

    Returns:
        ``(img, boxes)``; ``img`` may be a non-contiguous view.
    """
    h, w = img.shape[:2]
    lr, ud = rng.random(2)
    if lr < params.fliplr:
        img = img[:, ::-1]
        boxes[:, [0, 2]] = w - boxes[:, [2, 0]]
    if ud < params.flipud:
        img = img[::-1]
        boxes[:, [1, 3]] = h - boxes[:, [3, 1]]
    return img, boxes
