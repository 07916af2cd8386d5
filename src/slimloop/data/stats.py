"""Dataset statistics and pictures: counts, box-size quantiles, sample grids, size histograms."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from slimloop.data.canonical import SPLITS, Split, annotation_path, image_dir, read_split
from slimloop.errors import DataError, Problem
from slimloop.io import atomic_path

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
_COLORS = ("#00c853", "#ff1744", "#2979ff", "#ffab00", "#d500f9", "#00b8d4")


def _read_splits(root: str | Path) -> dict[str, Split]:
    """Every split of the canonical dataset at ``root`` that has an annotation file."""
    splits = {s: read_split(root, s) for s in SPLITS if annotation_path(root, s).is_file()}
    if not splits:
        raise DataError(Problem(str(root), None, "no split annotation file (train/val/test.json)"))
    return splits


def _box_table(split: Split) -> dict[str, np.ndarray]:
    """Per-box arrays: ``w``, ``h`` (px), ``img_w``, ``img_h`` (px of its image), ``label``."""
    rows = [
        (b[2] - b[0], b[3] - b[1], s.width, s.height, lab)
        for s in split.samples
        for b, lab in zip(s.boxes, s.labels, strict=True)
    ]
    table = np.array(rows, np.float64).reshape(-1, 5)
    return dict(zip(("w", "h", "img_w", "img_h", "label"), table.T, strict=True))


def _quantiles(values: np.ndarray) -> dict[str, float | None]:
    """``{"q05": ..., "q95": ...}``; None for every key when there are no values."""
    keys = [f"q{round(q * 100):02d}" for q in QUANTILES]
    if len(values) == 0:
        return dict.fromkeys(keys)
    return {
        k: round(float(v), 4) for k, v in zip(keys, np.quantile(values, QUANTILES), strict=True)
    }


def _size_stats(t: dict[str, np.ndarray], keep: np.ndarray) -> dict[str, Any]:
    """Box-size quantiles of the boxes selected by ``keep``, in px and as a fraction of the side."""
    w, h, img_w, img_h = (t[k][keep] for k in ("w", "h", "img_w", "img_h"))
    side = np.sqrt(w * h)
    return {
        "px": {"side": _quantiles(side), "w": _quantiles(w), "h": _quantiles(h)},
        "frac": {
            "side": _quantiles(side / np.sqrt(img_w * img_h)),
            "w": _quantiles(w / img_w),
            "h": _quantiles(h / img_h),
        },
        "aspect": _quantiles(w / np.maximum(h, 1e-9)),
    }


def _split_stats(split: Split) -> dict[str, Any]:
    t = _box_table(split)
    per_class = {}
    for i, name in enumerate(split.names):
        per_class[name] = {
            "images": sum(bool((s.labels == i).any()) for s in split.samples),
            "boxes": int((t["label"] == i).sum()),
            "box_size": _size_stats(t, t["label"] == i),
        }
    return {
        "images": len(split.samples),
        "boxes": len(t["w"]),
        "images_without_boxes": sum(len(s.labels) == 0 for s in split.samples),
        "box_size": _size_stats(t, np.ones(len(t["w"]), bool)),
        "per_class": per_class,
    }


def dataset_stats(root: str | Path) -> dict[str, Any]:
    """Counts and box sizes of a canonical dataset, ready for ``metrics/data.json``.

    Box sizes are quantiles (q05, q25, q50, q75, q95) of ``side = sqrt(w * h)``, ``w`` and ``h`` in
    pixels (``px``) and as a fraction of the image side (``frac``), and of the aspect ``w / h``.

    Args:
        root: dataset root (``<root>/<split>.json``).

    Returns:
        ``{"names", "images", "boxes", "splits": {split: {"images", "boxes",
        "images_without_boxes", "box_size", "per_class": {name: {"images", "boxes",
        "box_size"}}}}}``.

    Raises:
        DataError: no split annotation file, or one is malformed.
    """
    splits = _read_splits(root)
    per_split = {name: _split_stats(split) for name, split in splits.items()}
    return {
        "names": next(iter(splits.values())).names,
        "images": sum(s["images"] for s in per_split.values()),
        "boxes": sum(s["boxes"] for s in per_split.values()),
        "splits": per_split,
    }


def _save(fig: Figure, path: str | Path) -> Path:
    """Render ``fig`` to a PNG at ``path`` atomically."""
    FigureCanvasAgg(fig)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    return Path(path)


def _draw_sample(ax: Any, root: Path, split_name: str, split: Split, index: int) -> None:
    sample = split.samples[index]
    path = image_dir(root, split_name) / sample.file_name
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise DataError(Problem(str(path), None, "image cannot be read"))
    ax.imshow(cv2.cvtColor(img, cv2.COLOR_BGR2RGB))
    for (x1, y1, x2, y2), label in zip(sample.boxes, sample.labels, strict=True):
        color = _COLORS[int(label) % len(_COLORS)]
        ax.add_patch(Rectangle((x1 - 0.5, y1 - 0.5), x2 - x1, y2 - y1, fill=False, lw=1, ec=color))
        ax.text(
            x1,
            y1 - 1,
            split.names[int(label)],
            color="white",
            fontsize=6,
            va="bottom",
            bbox={"facecolor": color, "edgecolor": "none", "pad": 0.5},
        )
    ax.set_title(sample.file_name, fontsize=7)


def plot_samples(
    root: str | Path, split: str, path: str | Path, n: int = 16, seed: int = 0
) -> Path:
    """A grid of ``n`` random images of ``split`` with their boxes and class names, as PNG.

    Args:
        root: dataset root.
        split: which split to draw from.
        path: where the PNG goes (written atomically).
        n: how many images (a square-ish grid, 4x4 for 16); fewer if the split is smaller.
        seed: which images are picked.

    Returns:
        ``path``.

    Raises:
        DataError: the split or one of the chosen images cannot be read.
    """
    root = Path(root)
    data = read_split(root, split)
    rng = np.random.default_rng(seed % 2**64)  # params seeds may be negative
    chosen = np.sort(rng.choice(len(data.samples), min(n, len(data.samples)), replace=False))
    cols = max(math.ceil(math.sqrt(n)), 1)
    rows = max(math.ceil(n / cols), 1)
    fig = Figure(figsize=(2.4 * cols, 2.5 * rows), dpi=100)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.92, wspace=0.05, hspace=0.15)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes:
        ax.set_axis_off()
    for ax, index in zip(axes, chosen, strict=False):
        _draw_sample(ax, root, split, data, int(index))
    if len(chosen) == 0:
        axes[0].text(0.5, 0.5, f"{split}: no images", ha="center", va="center")
    fig.suptitle(f"{root.name}/{split}: {len(chosen)} of {len(data.samples)} images")
    return _save(fig, path)


def plot_box_sizes(root: str | Path, path: str | Path) -> Path:
    """Histogram of box sizes ``sqrt(w * h)`` in px per class over all splits (log x axis), as PNG.

    Args:
        root: dataset root.
        path: where the PNG goes (written atomically).

    Returns:
        ``path``.

    Raises:
        DataError: no split annotation file, or one is malformed.
    """
    splits = _read_splits(root)
    tables = [_box_table(s) for s in splits.values()]
    side = np.concatenate([np.sqrt(t["w"] * t["h"]) for t in tables])
    labels = np.concatenate([t["label"] for t in tables])
    names = next(iter(splits.values())).names
    fig = Figure(figsize=(6, 4), dpi=100, layout="tight")
    ax = fig.subplots()
    positive = side[side > 0]
    if len(positive):
        bins = np.geomspace(positive.min() * 0.95, positive.max() * 1.05, 31)
        for i, name in enumerate(names):
            chosen = side[(labels == i) & (side > 0)]
            ax.hist(
                chosen,
                bins=bins,
                alpha=0.6,
                color=_COLORS[i % len(_COLORS)],
                label=f"{name} ({len(chosen)})",
            )
        ax.set_xscale("log")
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no boxes", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("box size sqrt(w * h), px")
    ax.set_ylabel("boxes")
    ax.set_title(f"{Path(root).name}: box sizes, all splits")
    return _save(fig, path)
