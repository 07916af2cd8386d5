"""Drawing a synthetic image: barcodes, QR codes, distractors, backgrounds, compositing."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import barcode
import barcode.errors
import cv2
import numpy as np
import segno

from slimloop.data import raster
from slimloop.errors import DataError, Problem

# python-barcode symbologies that build from the payloads below (EAN/UPC guard variants give
# taller guard bars, as printed retail codes have).
SYMBOLOGIES = (
    "ean13", "ean13-guard", "ean8", "ean8-guard", "upca", "jan", "ean14", "issn",
    "code128", "gs1_128", "code39", "itf", "codabar", "pzn"
)  # fmt: skip
_DIGITS = np.array(list("0123456789"))
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
_CODE128_CHARS = np.array(list(_LETTERS + "-./ "))
_CODE39_CHARS = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-. "))
_TEXT_CHARS = np.array(list(_LETTERS + " :-/."))
_FONTS = (cv2.FONT_HERSHEY_SIMPLEX, cv2.FONT_HERSHEY_PLAIN, cv2.FONT_HERSHEY_DUPLEX,
          cv2.FONT_HERSHEY_COMPLEX, cv2.FONT_HERSHEY_TRIPLEX)  # fmt: skip
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


@dataclass(frozen=True)
class Art:
    """A shape drawn upright on its own canvas, ready to be warped into an image.

    ``maps`` is ``(h, w, 3)`` float32 in [0, 1]: channel 0 ink (the dark bars, modules or text),
    channel 1 the code region (what its box covers), channel 2 paper (the label under it,
    quiet zone included). ``region`` is the region's rectangle ``(x0, y0, x1, y1)`` in canvas
    pixels (the whole canvas for distractors).
    """

    maps: np.ndarray
    region: tuple[int, int, int, int]
    long_side: float

    @property
    def center(self) -> tuple[float, float]:
        """Middle of the region, canvas pixels."""
        x0, y0, x1, y1 = self.region
        return (x0 + x1) / 2, (y0 + y1) / 2


def _pick(rng: np.random.Generator, chars: np.ndarray, n: int) -> str:
    return "".join(rng.choice(chars, int(n)))


def barcode_payload(rng: np.random.Generator, name: str) -> str:
    """A random payload that ``name`` (a python-barcode symbology) accepts."""
    fixed = {"ean13": 12, "ean13-guard": 12, "ean8": 7, "ean8-guard": 7, "upca": 11,
             "ean14": 13, "issn": 7, "pzn": 6}  # fmt: skip
    if name in fixed:
        return _pick(rng, _DIGITS, fixed[name])
    if name == "jan":
        return "49" + _pick(rng, _DIGITS, 10)
    if name == "gs1_128":
        return "01" + _pick(rng, _DIGITS, 14)
    if name == "code128":
        return _pick(rng, _CODE128_CHARS, rng.integers(3, 15)).strip() or "A1"
    if name == "code39":
        return _pick(rng, _CODE39_CHARS, rng.integers(3, 11)).strip() or "A1"
    if name == "itf":
        return _pick(rng, _DIGITS, 2 * rng.integers(2, 8))
    if name == "codabar":
        ends = rng.choice(np.array(list("ABCD")), 2)
        return ends[0] + _pick(rng, _DIGITS, rng.integers(4, 13)) + ends[1]
    raise ValueError(f"unknown symbology {name!r}")


def barcode_modules(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, str]:
    """Random 1D code as modules: ``(dark (n,) bool, guard (n,) bool, human-readable text)``."""
    for _ in range(4):
        name = str(rng.choice(SYMBOLOGIES))
        try:
            code = barcode.get_barcode_class(name)(barcode_payload(rng, name))
            bits = code.build()[0]
            text = code.get_fullcode()
        except (barcode.errors.BarcodeError, ValueError):
            continue  # e.g. a PZN payload whose check digit would be 10
        chars = np.frombuffer(bits.encode("ascii"), dtype=np.uint8)
        guard = chars == ord("G")
        return (chars == ord("1")) | guard, guard, text
    code = barcode.get_barcode_class("ean13")(_pick(rng, _DIGITS, 12))
    chars = np.frombuffer(code.build()[0].encode("ascii"), dtype=np.uint8)
    return chars == ord("1"), np.zeros(len(chars), bool), code.get_fullcode()


def _text_ink(text: str, width: int, height: int, font: int) -> np.ndarray:
    """``text`` drawn to fill at most ``(height, width)``: float32 ink map of that shape."""
    (tw, th), base = cv2.getTextSize(text, font, 1.0, 1)
    scale = min(width / max(tw, 1), height / max(th + base, 1))
    canvas = np.zeros((height, width), np.uint8)
    (tw, th), base = cv2.getTextSize(text, font, scale, 1)
    org = (max((width - tw) // 2, 0), max(height - base, th))
    cv2.putText(canvas, text, org, font, scale, 255, 1, cv2.LINE_AA)
    return canvas.astype(np.float32) / 255.0


def barcode_art(rng: np.random.Generator, long_px: float, aspect: float) -> Art:
    """A 1D barcode whose region is ``long_px`` wide and ``aspect * long_px`` tall.

    The region spans the bars (first to last dark bar) and, when drawn, the digits under them.
    """
    dark, guard, text = barcode_modules(rng)
    width = max(int(round(long_px)), 4)
    height = max(int(round(aspect * width)), 3)
    text_h = int(round(height * rng.uniform(0.15, 0.22))) if rng.random() < 0.6 else 0
    if text_h < 5:
        text_h = 0
    bars_h = height - text_h
    module = width / len(dark)
    quiet = int(round(module * rng.uniform(2, 11))) if rng.random() < 0.75 else 0
    margin = int(round(height * rng.uniform(0.0, 0.15)))
    maps = np.zeros((height + 2 * margin, width + 2 * quiet, 3), np.float32)
    maps[..., 2] = 1.0
    maps[margin : margin + height, quiet : quiet + width, 1] = 1.0
    row = raster.resize(dark.astype(np.float32)[None, :], (width, 1))
    maps[margin : margin + bars_h, quiet : quiet + width, 0] = row
    if text_h:
        ink = _text_ink(text, width, text_h, int(rng.choice(_FONTS[:3])))
        guard_row = raster.resize(guard.astype(np.float32)[None, :], (width, 1))
        ink = np.maximum(ink, guard_row * (np.arange(text_h) < text_h * 0.6)[:, None])
        maps[margin + bars_h : margin + height, quiet : quiet + width, 0] = ink
    return Art(maps, (quiet, margin, quiet + width, margin + height), float(width))


def qr_art(rng: np.random.Generator, long_px: float) -> Art:
    """A QR code (random payload, version, error level and mask) ``long_px`` on a side."""
    side = max(int(round(long_px)), 5)
    top = int(np.clip((side / 1.5 - 17) // 4, 1, 6))  # >= 1.5 px a module; v7+ encodes slowly
    version = int(rng.integers(1, top + 1))
    error = str(rng.choice(np.array(list("lmqh"))))
    payload = _pick(rng, _TEXT_CHARS, rng.integers(1, 8 * version + 1))
    options = {"version": version, "error": error, "micro": False, "boost_error": False,
               "mask": int(rng.integers(8))}  # a fixed mask: scoring all 8 costs 5x the time
    try:
        qr = segno.make(payload, **options)
    except segno.DataOverflowError:
        qr = segno.make(payload[:7], **options)  # 7 bytes fit any version and error level
    matrix = np.array([list(r) for r in qr.matrix], dtype=np.float32)  # (N, N), 1 = dark
    modules = raster.resize(matrix, (side, side))
    quiet = int(round(side / len(matrix) * rng.uniform(0, 4))) if rng.random() < 0.8 else 0
    maps = np.zeros((side + 2 * quiet, side + 2 * quiet, 3), np.float32)
    maps[..., 2] = 1.0
    maps[quiet : quiet + side, quiet : quiet + side, 0] = modules
    maps[quiet : quiet + side, quiet : quiet + side, 1] = 1.0
    return Art(maps, (quiet, quiet, quiet + side, quiet + side), float(side))


def homography(
    art: Art, angle: float, at: tuple[float, float], jitter: float, rng: np.random.Generator
) -> np.ndarray:
    """Canvas -> image transform: rotate by ``angle`` (degrees) about the region centre, move it to
    ``at`` and displace each corner by ``jitter * long_side`` at most (a mild perspective)."""
    h, w = art.maps.shape[:2]
    src = np.array([[0, 0], [w, 0], [w, h], [0, h]], np.float64)
    t = math.radians(angle)
    c, s = math.cos(t), math.sin(t)
    x, y = src[:, 0] - art.center[0], src[:, 1] - art.center[1]
    dst = np.stack([c * x - s * y + at[0], s * x + c * y + at[1]], 1)  # rotated about the centre
    dst += rng.uniform(-jitter, jitter, (4, 2)) * art.long_side
    return raster.perspective_matrix(src, dst)


def region_polygon(art: Art, hom: np.ndarray) -> np.ndarray:
    """The warped corners (4, 2) of the art's code region."""
    x0, y0, x1, y1 = art.region
    return raster.transform_points(np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]]), hom)


@dataclass(frozen=True)
class Warped:
    """Art warped into an image window ``[y0:y1, x0:x1]``: maps ``(y1-y0, x1-x0, 3)`` float32."""

    maps: np.ndarray
    x0: int
    y0: int


def warp_art(art: Art, hom: np.ndarray, shape: tuple[int, int]) -> Warped | None:
    """Warp ``art`` into the window of an ``(H, W)`` image it touches; None if it misses it."""
    h, w = art.maps.shape[:2]
    corners = raster.transform_points(np.array([[0, 0], [w, 0], [w, h], [0, h]]), hom)
    x0, y0 = np.floor(corners.min(0)).astype(int)
    x1, y1 = np.ceil(corners.max(0)).astype(int)
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, shape[1]), min(y1, shape[0])
    if x1 <= x0 or y1 <= y0:
        return None
    maps = raster.warp_perspective(art.maps, raster.translate(hom, -x0, -y0), (x1 - x0, y1 - y0))
    return Warped(maps, x0, y0)


def gray3(plane: np.ndarray) -> np.ndarray:
    """(H, W) float32 -> (H, W, 3): NumPy broadcasting over a last axis of 3 is ~10x slower."""
    return cv2.cvtColor(np.ascontiguousarray(plane), cv2.COLOR_GRAY2BGR)


def scalar(color: np.ndarray) -> tuple[float, float, float, float]:
    """A BGR colour as an OpenCV per-channel scalar."""
    return (float(color[0]), float(color[1]), float(color[2]), 0.0)


def composite(img: np.ndarray, warped: Warped, paper: np.ndarray | None, ink: np.ndarray) -> None:
    """Lay the paper (unless None), then the ink, of ``warped`` onto float32 ``img`` in place."""
    h, w = warped.maps.shape[:2]
    roi = img[warped.y0 : warped.y0 + h, warped.x0 : warped.x0 + w]  # (h, w, 3) view
    ink_map, _, paper_map = cv2.split(warped.maps)
    if paper is not None:
        roi += gray3(paper_map) * cv2.subtract(scalar(paper), roi)
    roi += gray3(ink_map) * cv2.subtract(scalar(ink), roi)


def code_colors(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(paper, ink) BGR float32: dark on light mostly, some coloured, low-contrast or inverted."""
    paper = np.clip(rng.uniform(175, 255) + rng.uniform(-20, 20, 3), 0, 255)
    if rng.random() < 0.12:
        ink = rng.uniform(0, 120, 3)  # coloured ink
    else:
        ink = np.clip(rng.uniform(0, 80) + rng.uniform(-15, 15, 3), 0, 255)
    if rng.random() < 0.08:  # low contrast, still readable
        ink = np.clip(paper - rng.uniform(60, 100), 0, 255)
    if rng.random() < 0.07:  # inverted: light bars on a dark label
        paper, ink = ink, paper
    return paper.astype(np.float32), ink.astype(np.float32)


def random_color(rng: np.random.Generator) -> np.ndarray:
    """Any BGR colour (float32)."""
    return rng.uniform(0, 255, 3).astype(np.float32)


def _ink_art(ink: np.ndarray) -> Art:
    """Ink-only art (no paper, no region) from a float32 ink map."""
    maps = np.zeros((*ink.shape, 3), np.float32)
    maps[..., 0] = ink
    h, w = ink.shape
    return Art(maps, (0, 0, w, h), float(max(h, w)))


def _distractor_art(rng: np.random.Generator, kind: str, side: int) -> Art:
    """Ink map of one unlabelled distractor about ``side`` px long."""
    if kind == "text":
        text = _pick(rng, _TEXT_CHARS, rng.integers(3, 18)).strip() or "OK"
        height = max(int(side * rng.uniform(0.08, 0.2)), 6)
        return _ink_art(_text_ink(text, side, height, int(rng.choice(_FONTS))))
    height = max(int(side * rng.uniform(0.3, 1.0)), 4)
    yy, xx = np.mgrid[0:height, 0:side].astype(np.float32)
    period = side / rng.integers(4, 14)  # a few uniform stripes: clearly not a barcode
    if kind == "grating":
        if rng.random() < 0.5:
            ink = ((xx // (period / 2)) % 2).astype(np.float32)
        else:
            wave = [0.5 + 0.5 * math.sin(2 * math.pi * x / period) for x in range(side)]
            ink = np.broadcast_to(np.array(wave, np.float32), (height, side)).copy()
    else:  # grid of thin lines
        lw = max(1.0, period * 0.15)
        ink = (((xx % period) < lw) | ((yy % period) < lw)).astype(np.float32)
    return _ink_art(ink)


def draw_distractors(rng: np.random.Generator, img: np.ndarray, count: int) -> None:
    """Draw ``count`` unlabelled distractors (text, gratings, grids, circles, boxes) in place."""
    size = img.shape[0]
    for _ in range(count):
        kind = str(rng.choice(np.array(["text", "text", "grating", "grid", "circle", "rect"])))
        color = tuple(float(c) for c in random_color(rng))
        if kind == "circle":
            center = tuple(int(v) for v in rng.integers(0, size, 2))
            for r in np.sort(rng.uniform(0.02, 0.2, rng.integers(1, 4)))[::-1] * size:
                cv2.circle(img, center, int(r), color, int(rng.choice([-1, 1, 2])), cv2.LINE_AA)
            continue
        if kind == "rect":
            x0, y0 = (int(v) for v in rng.integers(0, size, 2))
            w, h = (int(v) for v in rng.integers(size // 20, size // 3, 2))
            cv2.rectangle(img, (x0, y0), (x0 + w, y0 + h), color, int(rng.choice([-1, 1, 2])))
            continue
        art = _distractor_art(rng, kind, int(size * rng.uniform(0.1, 0.5)))
        angle = 0.0 if kind == "text" and rng.random() < 0.6 else rng.uniform(0, 360)
        hom = homography(art, angle, tuple(rng.uniform(0, size, 2)), 0.03, rng)
        warped = warp_art(art, hom, img.shape[:2])
        if warped is not None:
            composite(img, warped, None, np.array(color, np.float32))


def procedural_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A square float32 BGR background: gradient, smooth noise, flat or woven texture, + clutter."""
    kind = int(rng.integers(4))
    ramp = np.arange(size, dtype=np.float32) / size
    xx, yy = ramp[None, :], ramp[:, None]  # (1, S), (S, 1): broadcast instead of full grids
    if kind == 0:
        theta = rng.uniform(0, 2 * np.pi)
        t = math.cos(theta) * xx + math.sin(theta) * yy  # (S, S)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        start, stop = random_color(rng), random_color(rng)
        img = cv2.merge([t * (b - a) + a for a, b in zip(start, stop, strict=True)])
    elif kind == 1:
        k = int(rng.integers(2, 9))
        low = rng.uniform(0, 255, (k, k, 3)).astype(np.float32)
        img = raster.resize(low, (size, size), "cubic")
    elif kind == 2:
        img = cv2.merge([np.full((size, size), c, np.float32) for c in random_color(rng)])
    else:
        f1, f2 = (float(v) for v in rng.uniform(10, 60, 2))
        across = np.array([math.sin(2 * math.pi * f1 * i / size) for i in range(size)], np.float32)
        down = np.array([math.sin(2 * math.pi * f2 * i / size) for i in range(size)], np.float32)
        weave = across[None, :] * down[:, None] * np.float32(rng.uniform(5, 30))  # (S, S)
        img = cv2.add(gray3(weave.astype(np.float32)), scalar(random_color(rng)))
    img = img.astype(np.float32, copy=False)
    if rng.random() < 0.6:
        grain = rng.standard_normal((size, size), dtype=np.float32) * rng.uniform(3, 25)
        img += gray3(raster.gaussian_blur(grain, rng.uniform(0.5, 2.0)))
    if rng.random() < 0.5:
        _draw_clutter(rng, img, int(rng.integers(3, 13)))
    return img


def _draw_clutter(rng: np.random.Generator, img: np.ndarray, count: int) -> None:
    """Random filled shapes and lines in place (background clutter, under everything else)."""
    size = img.shape[0]
    for _ in range(count):
        color = tuple(float(c) for c in random_color(rng))
        p0, p1 = (tuple(int(v) for v in rng.integers(-size // 4, size + size // 4, 2))
                  for _ in range(2))  # fmt: skip
        shape = int(rng.integers(4))
        if shape == 0:
            cv2.rectangle(img, p0, p1, color, -1)
        elif shape == 1:
            cv2.circle(img, p0, int(rng.integers(2, size // 4)), color, -1, cv2.LINE_AA)
        elif shape == 2:
            cv2.line(img, p0, p1, color, int(rng.integers(1, 4)), cv2.LINE_AA)
        else:
            pts = rng.integers(0, size, (int(rng.integers(3, 6)), 2)).astype(np.int32)
            cv2.fillPoly(img, [pts], color, cv2.LINE_AA)


def find_backgrounds(folder: str | Path) -> list[Path]:
    """Readable images in ``folder`` (sorted, recursive), checked by their file signature.

    Raises:
        DataError: the folder does not exist or holds no readable image.
    """
    folder = Path(folder)
    if not folder.is_dir():
        problem = "backgrounds_dir does not exist or is not a folder"
        raise DataError(Problem(str(folder), None, problem))
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES
                   and p.is_file() and cv2.haveImageReader(str(p)))  # fmt: skip
    if not paths:
        found = f"holds no readable image ({', '.join(IMAGE_SUFFIXES)})"
        raise DataError(Problem(str(folder), None, f"backgrounds_dir {found}"))
    return paths


def photo_background(rng: np.random.Generator, path: Path, size: int) -> np.ndarray:
    """A random square crop of the image at ``path``, resized to ``size`` (float32 BGR).

    Raises:
        DataError: the image cannot be decoded.
    """
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise DataError(Problem(str(path), None, "background image cannot be decoded"))
    h, w = img.shape[:2]
    side = max(int(min(h, w) * rng.uniform(0.3, 1.0)), 1)
    y0, x0 = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    crop = img[y0 : y0 + side, x0 : x0 + side]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    interp = cv2.INTER_AREA if side > size else cv2.INTER_LINEAR
    out = cv2.resize(np.ascontiguousarray(crop), (size, size), interpolation=interp)
    return out.astype(np.float32)
