"""The canonical dataset: COCO JSON per split plus an image folder per split.

Layout under a dataset root::

    <root>/train.json  <root>/val.json  <root>/test.json     (COCO, loadable by pycocotools)
    <root>/images/<split>/<file_name>

Category ids in the JSON are 1..K in class order (COCO convention); in memory a class is its
0-based index into ``names``. Boxes in memory are ``xyxy`` float pixels; in the JSON they are
COCO ``[x, y, w, h]``.
"""

from __future__ import annotations

import reprlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from slimloop.errors import DataError, Problem
from slimloop.io import JSONTextError, load_json_text, write_json_atomic

SPLITS = ("train", "val", "test")


@dataclass
class Sample:
    """One image and its boxes."""

    file_name: str  # relative to <root>/images/<split>/
    width: int
    height: int
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float64))  # (N, 4) xyxy px
    labels: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.int64))  # (N,) 0-based


@dataclass
class Split:
    """One split of a dataset: class names and samples (image ids are 1-based list positions)."""

    names: list[str]
    samples: list[Sample]


def image_dir(root: str | Path, split: str) -> Path:
    """Folder holding the images of ``split``."""
    return Path(root) / "images" / split


def annotation_path(root: str | Path, split: str) -> Path:
    """COCO JSON file of ``split``."""
    return Path(root) / f"{split}.json"


def to_coco(split: Split) -> dict[str, Any]:
    """COCO dict of ``split``: image ids 1..N, annotation ids 1..M, category ids 1..K."""
    images, annotations = [], []
    for image_id, s in enumerate(split.samples, start=1):
        images.append({"id": image_id, "file_name": s.file_name, "width": int(s.width), "height": int(s.height)})
        for box, label in zip(s.boxes, s.labels, strict=True):
            x1, y1, x2, y2 = (round(float(v), 6) for v in box)
            w, h = round(x2 - x1, 6), round(y2 - y1, 6)
            annotations.append({
                "id": len(annotations) + 1,
                "image_id": image_id,
                "category_id": int(label) + 1,
                "bbox": [x1, y1, w, h],
                "area": round(w * h, 3),
                "iscrowd": 0,
            })
    categories = [{"id": i + 1, "name": n, "supercategory": "code"} for i, n in enumerate(split.names)]
    return {"images": images, "annotations": annotations, "categories": categories}


def from_coco(coco: dict[str, Any], source: str = "<coco>") -> Split:
    """Inverse of :func:`to_coco` for canonical files (trusted: written by slimloop).

    Raises:
        DataError: the dict does not have the canonical shape.
    """
    try:
        cats = sorted(coco["categories"], key=lambda c: c["id"])
        names = [c["name"] for c in cats]
        cat_index = {c["id"]: i for i, c in enumerate(cats)}
        by_image: dict[int, list[dict[str, Any]]] = {}
        for a in coco["annotations"]:
            by_image.setdefault(a["image_id"], []).append(a)
        samples = []
        for im in coco["images"]:
            anns = by_image.get(im["id"], [])
            boxes = np.array(
                [[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]] for a in anns],
                dtype=np.float64,
            ).reshape(-1, 4)
            labels = np.array([cat_index[a["category_id"]] for a in anns], dtype=np.int64)
            samples.append(Sample(_safe_name(im["file_name"]), int(im["width"]), int(im["height"]), boxes, labels))
    except (KeyError, TypeError, IndexError, ValueError, AttributeError) as exc:
        raise DataError(Problem(source, None, f"not a canonical COCO file ({reprlib.repr(exc)})")) from None
    if not all(isinstance(n, str) for n in names):
        raise DataError(Problem(source, None, "not a canonical COCO file (a category name is not a string)"))
    return Split(names, samples)


def _safe_name(name: Any) -> str:
    """``name`` if it is a plain relative path inside the image folder (the importers make only such)."""
    ok = isinstance(name, str) and name.strip() and "\x00" not in name
    if not ok or Path(name).is_absolute() or ".." in Path(name).parts:
        raise ValueError(f"file_name {reprlib.repr(name)} is not a relative path inside the image folder")
    return name


def write_annotations(root: str | Path, split_name: str, split: Split) -> Path:
    """Write ``<root>/<split_name>.json`` atomically and return its path."""
    path = annotation_path(root, split_name)
    write_json_atomic(path, to_coco(split), indent=None)
    return path


def read_split(root: str | Path, split_name: str) -> Split:
    """Read one split of a canonical dataset.

    Raises:
        DataError: the annotation file is missing or malformed.
    """
    path = annotation_path(root, split_name)
    try:
        coco = load_json_text(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(Problem(str(path), None, "missing; run the prepare stage first")) from None
    except JSONTextError as exc:
        raise DataError(Problem(str(path), exc.line, f"unreadable: {exc.message}")) from None
    except (OSError, UnicodeDecodeError) as exc:  # binary junk is not UTF-8
        raise DataError(Problem(str(path), None, f"unreadable: {exc}")) from None
    return from_coco(coco, str(path))
