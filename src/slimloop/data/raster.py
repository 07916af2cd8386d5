"""Float image operations that give the same bits on every machine: warps, blurs, resizes.

OpenCV's float paths (warpPerspective, GaussianBlur, filter2D, resize on float32) and Intel IPP
pick code by CPU: the same call gave different bits on AVX2 and SSE4 builds of one machine, and
IPP differs between CPU generations, so the synthetic dataset hashed differently on another
machine. These versions use only element-wise NumPy arithmetic in a fixed order (each operation
is IEEE-754 rounded, never fused or reordered by SIMD width), Python's ``math`` for the few
transcendental scalars, and no BLAS: the result depends on the inputs alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

Matrix = list[list[float]]


def solve(a: Matrix, b: list[float]) -> list[float]:
    """Solve ``a x = b`` (small, dense) by Gaussian elimination with partial pivoting in Python floats.

    Raises:
        ValueError: ``a`` is singular.
    """
    n = len(b)
    m = [list(map(float, row)) + [float(v)] for row, v in zip(a, b, strict=True)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(m[r][col]))
        if m[pivot][col] == 0.0:
            raise ValueError("singular system")
        m[col], m[pivot] = m[pivot], m[col]
        for r in range(col + 1, n):
            f = m[r][col] / m[col][col]
            m[r] = [x - f * y for x, y in zip(m[r], m[col], strict=True)]
    x = [0.0] * n
    for r in range(n - 1, -1, -1):
        x[r] = (m[r][n] - sum(m[r][c] * x[c] for c in range(r + 1, n))) / m[r][r]
    return x


def perspective_matrix(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 3x3 homography (float64) taking the four ``src`` points to the four ``dst`` points."""
    a, b = [], []
    for (x, y), (u, v) in zip(np.asarray(src, np.float64).tolist(), np.asarray(dst, np.float64).tolist(),
                              strict=True):
        a += [[x, y, 1.0, 0.0, 0.0, 0.0, -x * u, -y * u], [0.0, 0.0, 0.0, x, y, 1.0, -x * v, -y * v]]
        b += [u, v]
    h = solve(a, b)
    return np.array([h[0:3], h[3:6], [h[6], h[7], 1.0]], np.float64)


def translate(hom: np.ndarray, dx: float, dy: float) -> np.ndarray:
    """``[[1, 0, dx], [0, 1, dy], [0, 0, 1]] @ hom`` without a matrix product (no BLAS)."""
    hom = np.asarray(hom, np.float64)
    return np.stack([hom[0] + dx * hom[2], hom[1] + dy * hom[2], hom[2]])


def transform_points(points: np.ndarray, hom: np.ndarray) -> np.ndarray:
    """(N, 2) points through homography ``hom`` -> (N, 2) float64."""
    p = np.asarray(points, np.float64).reshape(-1, 2)
    h = np.asarray(hom, np.float64)
    x, y = p[:, 0], p[:, 1]
    w = h[2, 0] * x + h[2, 1] * y + h[2, 2]
    return np.stack([(h[0, 0] * x + h[0, 1] * y + h[0, 2]) / w, (h[1, 0] * x + h[1, 1] * y + h[1, 2]) / w], 1)


def polygon_area(points: np.ndarray) -> float:
    """Area of the polygon ``points`` (N, 2) by the shoelace formula, in Python floats."""
    p = np.asarray(points, np.float64).reshape(-1, 2).tolist()
    twice = sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(p, p[1:] + p[:1], strict=True))
    return abs(twice) / 2


def _inverse3(h: np.ndarray) -> np.ndarray:
    """Inverse of a 3x3 matrix by its adjugate (scalar Python arithmetic)."""
    (a, b, c), (d, e, f), (g, i, k) = np.asarray(h, np.float64).tolist()
    cof = [[e * k - f * i, c * i - b * k, b * f - c * e],
           [f * g - d * k, a * k - c * g, c * d - a * f],
           [d * i - e * g, b * g - a * i, a * e - b * d]]  # fmt: skip
    det = a * cof[0][0] + b * cof[1][0] + c * cof[2][0]
    if det == 0.0:
        raise ValueError("singular homography")
    return np.array(cof, np.float64) / det


def _gather(src: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """``src[ys, xs]`` with zeros outside the image: (h, w[, C]) from (h, w) index grids."""
    height, width = src.shape[:2]
    inside = (xs >= 0) & (xs < width) & (ys >= 0) & (ys < height)
    out = src[np.clip(ys, 0, height - 1), np.clip(xs, 0, width - 1)]
    if out.ndim == 3:
        inside = inside[..., None]
    return np.where(inside, out, np.zeros((), src.dtype))


def warp_perspective(src: np.ndarray, hom: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear warp of ``src`` (h, w[, C]) by ``hom`` (source -> output) into ``size = (w, h)``,
    zero outside the source; float32 out. Pixel centres sit at integer coordinates (OpenCV's rule)."""
    width, height = size
    inv = _inverse3(hom)
    xs = np.arange(width, dtype=np.float64)[None, :]  # (1, w)
    ys = np.arange(height, dtype=np.float64)[:, None]  # (h, 1)
    w = inv[2, 0] * xs + inv[2, 1] * ys + inv[2, 2]  # (h, w)
    sx = (inv[0, 0] * xs + inv[0, 1] * ys + inv[0, 2]) / w
    sy = (inv[1, 0] * xs + inv[1, 1] * ys + inv[1, 2]) / w
    far = ~(np.abs(sx) < 1e7) | ~(np.abs(sy) < 1e7)  # behind the horizon or NaN: outside
    sx, sy = np.where(far, -2.0, sx), np.where(far, -2.0, sy)
    x0, y0 = np.floor(sx), np.floor(sy)
    fx, fy = sx - x0, sy - y0
    x0, y0 = x0.astype(np.int64), y0.astype(np.int64)
    if src.ndim == 3:
        fx, fy = fx[..., None], fy[..., None]
    src = src.astype(np.float64, copy=False)
    top = _gather(src, y0, x0) * (1 - fx) + _gather(src, y0, x0 + 1) * fx
    bottom = _gather(src, y0 + 1, x0) * (1 - fx) + _gather(src, y0 + 1, x0 + 1) * fx
    return (top * (1 - fy) + bottom * fy).astype(np.float32)


def rotation_about(center: tuple[float, float], degrees: float) -> np.ndarray:
    """3x3 rotation by ``degrees`` (counter-clockwise on screen, as OpenCV's) about ``center``."""
    t = math.radians(degrees)
    c, s = math.cos(t), math.sin(t)
    cx, cy = center
    return np.array([[c, s, (1 - c) * cx - s * cy], [-s, c, s * cx + (1 - c) * cy], [0.0, 0.0, 1.0]])


def _reflect101(img: np.ndarray, pad: int, axis: int) -> np.ndarray:
    widths = [(0, 0)] * img.ndim
    widths[axis] = (pad, pad)
    return np.pad(img, widths, mode="reflect")  # NumPy's reflect is OpenCV's BORDER_REFLECT_101


def _correlate1d(img: np.ndarray, weights: Sequence[float], axis: int) -> np.ndarray:
    """Correlate ``img`` with odd-length ``weights`` along ``axis`` (reflect-101 borders)."""
    r = len(weights) // 2
    padded = _reflect101(img, r, axis) if r < img.shape[axis] else np.pad(
        img, [(r, r) if a == axis else (0, 0) for a in range(img.ndim)], mode="symmetric")
    n = img.shape[axis]
    out = np.zeros_like(img)
    for k, w in enumerate(weights):
        out = out + np.float32(w) * np.take(padded, range(k, k + n), axis=axis)
    return out


def gaussian_kernel(sigma: float) -> list[float]:
    """Normalized Gaussian weights of OpenCV's size for float images (``2 * round(4 sigma) + 1``)."""
    r = max(int(round(sigma * 4)), 1)
    raw = [math.exp(-(i * i) / (2 * sigma * sigma)) for i in range(-r, r + 1)]
    total = math.fsum(raw)
    return [v / total for v in raw]


def gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of float32 ``img`` (h, w[, C]); reflect-101 borders."""
    weights = gaussian_kernel(sigma)
    img = np.asarray(img, np.float32)
    return _correlate1d(_correlate1d(img, weights, 1), weights, 0)


def filter2d(img: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Correlate float32 ``img`` (h, w[, C]) with an odd-sized ``kernel`` (reflect-101 borders)."""
    kh, kw = kernel.shape
    ry, rx = kh // 2, kw // 2
    img = np.asarray(img, np.float32)
    padded = _reflect101(_reflect101(img, rx, 1), ry, 0)
    h, w = img.shape[:2]
    out = np.zeros_like(img)
    for dy in range(kh):
        for dx in range(kw):
            if kernel[dy, dx] != 0:
                out = out + np.float32(kernel[dy, dx]) * padded[dy : dy + h, dx : dx + w]
    return out


def _area_taps(n_in: int, n_out: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per tap: (source index, weight) arrays over the output positions of one axis, where each
    output pixel averages the source over its footprint ``[i, i + 1) * n_in / n_out``."""
    scale = n_in / n_out
    lo = np.arange(n_out, dtype=np.float64) * scale
    hi = lo + scale
    first = np.floor(lo).astype(np.int64)
    taps = []
    for k in range(int(math.ceil(scale)) + 1):
        idx = first + k
        overlap = np.minimum(hi, idx + 1.0) - np.maximum(lo, idx.astype(np.float64))
        weight = np.where((idx < n_in) & (overlap > 0), overlap / scale, 0.0)
        taps.append((np.minimum(idx, n_in - 1), weight))
    return taps


def _cubic_taps(n_in: int, n_out: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per tap: (source index, weight) of Keys' cubic (a = -0.75, OpenCV's), replicated borders."""
    sx = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    base = np.floor(sx)
    t = sx - base
    a = -0.75

    def near(d):  # |d| <= 1
        return ((a + 2) * d - (a + 3)) * d * d + 1

    def far(d):  # 1 < |d| < 2
        return ((a * d - 5 * a) * d + 8 * a) * d - 4 * a

    weights = (far(1 + t), near(t), near(1 - t), far(2 - t))
    return [(np.clip(base.astype(np.int64) + k - 1, 0, n_in - 1), w) for k, w in enumerate(weights)]


def _resample(img: np.ndarray, taps: list[tuple[np.ndarray, np.ndarray]], axis: int) -> np.ndarray:
    out = None
    for idx, weight in taps:
        shape = [1] * img.ndim
        shape[axis] = len(weight)
        term = np.take(img, idx, axis=axis) * weight.reshape(shape)
        out = term if out is None else out + term
    return out


def resize(img: np.ndarray, size: tuple[int, int], method: str = "area") -> np.ndarray:
    """Resize float ``img`` (h, w[, C]) to ``size = (w, h)``: ``area`` (footprint average, for
    drawing art) or ``cubic`` (smooth upsampling); float32 out."""
    taps = _area_taps if method == "area" else _cubic_taps
    out = np.asarray(img, np.float64)
    out = _resample(out, taps(out.shape[1], size[0]), 1)
    out = _resample(out, taps(out.shape[0], size[1]), 0)
    return out.astype(np.float32)
