"""COCO JSON datasets: validate every record and import them into the canonical form."""

from __future__ import annotations

import json
import math
import os
import reprlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from slimloop.config import CocoSource
from slimloop.data.validate import Candidate, Draft, SplitDraft, finish_import
from slimloop.data.yolo_checks import split_overlap
from slimloop.errors import Problem
from slimloop.io import Protected


@dataclass
class CocoRecord:
    """One image record of a COCO file with its valid boxes and its problems."""

    file_name: str  # relative to the split's image folder
    prefix: str  # "images[3] (id 4): " for messages
    declared_size: tuple[int, int] | None
    boxes: list[list[float]] = field(default_factory=list)  # xyxy px
    labels: list[int] = field(default_factory=list)
    box_prefixes: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    safe_path: bool = True  # False: file_name escapes the image folder, never opened


@dataclass
class CocoParse:
    """What one COCO file holds: categories (sorted by id), image records, file-level problems."""

    categories: list[tuple[int, str]] = field(default_factory=list)
    records: list[CocoRecord] = field(default_factory=list)
    fatal: list[Problem] = field(default_factory=list)
    dropped: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)
    ignored_crowd: int = 0


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _finite(value: Any) -> float | None:
    """``value`` as a finite float, or None (bools, strings, nan, inf and huge ints are not)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _categories(raw: Any, source: str, out: CocoParse) -> dict[int, int]:
    """Fill ``out.categories``; return category id -> 0-based class (sorted id order)."""
    if not isinstance(raw, list) or not raw:
        out.fatal.append(Problem(source, None, "categories must be a non-empty list"))
        return {}
    seen: dict[int, str] = {}
    for i, cat in enumerate(raw):
        cid = cat.get("id") if isinstance(cat, dict) else None
        name = cat.get("name") if isinstance(cat, dict) else None
        if not _is_int(cid) or not isinstance(name, str):
            out.fatal.append(Problem(source, None, f"categories[{i}]: needs an integer id and a string name"))
        elif cid in seen:
            out.fatal.append(Problem(source, None, f"categories[{i}]: duplicate category id {cid}"))
        else:
            seen[cid] = name
    out.categories = sorted(seen.items())
    return {cid: k for k, (cid, _) in enumerate(out.categories)}


def _declared_size(im: dict, prefix: str, source: str, problems: list[Problem]) -> tuple[int, int] | None:
    """(width, height) of an image record; absent is fine, anything but positive ints is not."""
    if "width" not in im and "height" not in im:
        return None
    w, h = im.get("width"), im.get("height")
    if not (_is_int(w) and _is_int(h) and w > 0 and h > 0):
        problems.append(Problem(source, None, f"{prefix}width and height must be positive integers"))
        return None
    return w, h


def _images(raw: Any, source: str, out: CocoParse) -> dict[int, CocoRecord]:
    """Fill ``out.records``; return image id -> record (first record of a duplicated id)."""
    if not isinstance(raw, list):
        out.fatal.append(Problem(source, None, "images must be a list"))
        return {}
    by_id: dict[int, CocoRecord] = {}
    first_at: dict[int, int] = {}
    files: dict[str, int] = {}
    for i, im in enumerate(raw):
        name = im.get("file_name") if isinstance(im, dict) else None
        if not isinstance(name, str) or not name.strip():
            out.dropped.append(Problem(source, None, f"images[{i}]: needs a non-empty string file_name"))
            continue
        iid = im.get("id")
        prefix = f"images[{i}] (id {reprlib.repr(iid)}): "
        problems: list[Problem] = []
        record = CocoRecord(name, prefix, _declared_size(im, prefix, source, problems), problems=problems)
        rel = Path(name)
        if rel.is_absolute() or ".." in rel.parts:
            record.safe_path = False
            problems.append(Problem(source, None, f"{prefix}file_name must be a relative path inside the image folder"))
        elif "\x00" in name:  # no file system allows it; opening it would raise ValueError
            record.safe_path = False
            problems.append(Problem(source, None, f"{prefix}file_name contains a NUL character"))
        key = os.path.normpath(name)
        if key in files:
            problems.append(Problem(source, None, f"{prefix}duplicate file_name (first at images[{files[key]}])"))
        files.setdefault(key, i)
        if not _is_int(iid):
            problems.append(Problem(source, None, f"{prefix}image id must be an integer"))
        elif iid in first_at:
            message = f"duplicate image id (also images[{first_at[iid]}])"
            problems.append(Problem(source, None, prefix + message))
            by_id[iid].problems.append(Problem(source, None, by_id[iid].prefix + message.replace(
                f"images[{first_at[iid]}]", f"images[{i}]")))
        else:
            first_at[iid], by_id[iid] = i, record
        out.records.append(record)
    return by_id


def _bbox(raw: Any) -> tuple[list[float] | None, str | None]:
    """xyxy px from a COCO ``[x, y, w, h]``, or what is wrong with it."""
    values = [_finite(v) for v in raw] if isinstance(raw, list) and len(raw) == 4 else None
    if values is None or any(v is None for v in values):
        return None, f"bbox must be a list of 4 finite numbers, got {reprlib.repr(raw)}"
    x, y, w, h = values
    if w <= 0:
        return None, "bbox width <= 0"
    if h <= 0:
        return None, "bbox height <= 0"
    if not (x + w > x and y + h > y and math.isfinite(x + w) and math.isfinite(y + h)):
        return None, f"bbox {reprlib.repr(raw)} has no extent at its magnitude (outside any image)"
    return [x, y, x + w, y + h], None


def _annotation(a: Any, j: int, source: str, state: dict[str, Any], out: CocoParse) -> None:
    """Check one annotation; attach its box or its problems to its image record."""
    if not isinstance(a, dict):
        out.dropped.append(Problem(source, None, f"annotations[{j}]: not an object"))
        return
    aid, iid = a.get("id"), a.get("image_id")
    prefix = f"annotations[{j}] (id {reprlib.repr(aid)}): "
    record = state["images"].get(iid) if _is_int(iid) else None
    if record is None:
        out.dropped.append(Problem(source, None, f"{prefix}unknown image_id {reprlib.repr(iid)}"))
        return
    errors = []
    if not _is_int(aid):
        errors.append("annotation id must be an integer")
    elif aid in state["ann_ids"]:
        errors.append(f"duplicate annotation id (first at annotations[{state['ann_ids'][aid]}])")
    else:
        state["ann_ids"][aid] = j
    crowd = a.get("iscrowd", 0)
    if crowd not in (0, 1) or isinstance(crowd, bool):
        errors.append(f"iscrowd must be 0 or 1, got {reprlib.repr(crowd)}")
    elif crowd == 1:  # a region of many objects: not a box to detect, as in COCO evaluation
        record.problems.extend(Problem(source, None, prefix + e) for e in errors)
        out.ignored_crowd += not errors
        return
    cid = a.get("category_id")
    if not _is_int(cid) or cid not in state["classes"]:
        errors.append(f"unknown category_id {reprlib.repr(cid)}")
    box, error = _bbox(a.get("bbox"))
    errors += [error] if error else []
    record.problems.extend(Problem(source, None, prefix + e) for e in errors)
    if not errors:
        record.boxes.append(box)
        record.labels.append(state["classes"][cid])
        record.box_prefixes.append(prefix)


def coco_to_split(coco: Any, source: str) -> CocoParse:
    """Validate a parsed COCO file without touching the disk; collect every problem.

    Category ids may be any integers: classes are their 0-based ranks in sorted id order, names
    kept. ``iscrowd: 1`` annotations are ignored (not boxes to detect, as in COCO evaluation) and
    counted in ``ignored_crowd``. Problems of an image or of an annotation of a known image stay
    with that image's record; annotations of unknown images and unusable image records are
    ``dropped``; file-level problems are ``fatal``.

    Args:
        coco: the JSON value (anything ``json.load`` can return).
        source: the file name for problems.

    Returns:
        The parse; records keep the file order.
    """
    out = CocoParse()
    if not isinstance(coco, dict):
        out.fatal.append(Problem(source, None, "must be a JSON object with images, annotations and categories"))
        return out
    classes = _categories(coco.get("categories"), source, out)
    images = _images(coco.get("images"), source, out)
    if "annotations" not in coco:  # like COCO's image_info files: no labels at all, surely not meant
        out.fatal.append(Problem(source, None, "no annotations key: every image would import as background; "
                                 'write "annotations": [] if no image has any object'))
        return out
    annotations = coco["annotations"]
    if not isinstance(annotations, list):
        out.fatal.append(Problem(source, None, "annotations must be a list"))
        return out
    if not annotations and images:
        out.warnings.append(Problem(source, None, f"annotations is empty: all {len(images)} images import as "
                                    "background"))
    state = {"images": images, "classes": classes, "ann_ids": {}}
    for j, a in enumerate(annotations):
        _annotation(a, j, source, state, out)
    return out


def _load_json(path: Path) -> tuple[Any, list[Problem]]:
    """Parsed JSON of ``path`` or a problem saying why it cannot be read."""
    try:
        return json.loads(path.read_text(encoding="utf-8-sig")), []
    except FileNotFoundError:
        return None, [Problem(str(path), None, "annotation file not found")]
    except json.JSONDecodeError as exc:
        return None, [Problem(str(path), exc.lineno, f"not valid JSON: {exc.msg}")]
    except RecursionError:
        return None, [Problem(str(path), None, "cannot read annotation file: nested too deeply")]
    except (OSError, ValueError) as exc:  # not UTF-8; an integer of more than 4300 digits
        return None, [Problem(str(path), None, f"cannot read annotation file: {exc}")]


def _split_paths(source: CocoSource, base: Path) -> tuple[list[tuple[str, Path, Path]], list[Problem]]:
    """(split, json, image folder) per configured split, relative paths against ``base``."""
    splits = [("train", source.train_json, source.train_images), ("val", source.val_json, source.val_images)]
    problems = []
    if (source.test_json is None) != (source.test_images is None):
        problems.append(Problem("data.coco", None, "test_json and test_images must be given together"))
    elif source.test_json is not None:
        splits.append(("test", source.test_json, source.test_images))
    return [(name, base / js, base / img) for name, js, img in splits], problems


def _split_draft(name: str, json_path: Path, images: Path, parse: CocoParse) -> SplitDraft:
    """Candidates of one split from its parse."""
    candidates = []
    for r in parse.records:
        boxes = np.array(r.boxes, np.float64).reshape(-1, 4)
        candidates.append(Candidate(
            images / r.file_name, np.array(r.labels, np.int64), boxes, False,
            box_where=[(str(json_path), None, p) for p in r.box_prefixes], problems=r.problems,
            listed_at=f"{r.prefix.rstrip(': ')} in {json_path}", declared_size=r.declared_size,
            declared_where=(str(json_path), r.prefix), probe=r.safe_path))
    if not candidates and name != "test":
        parse.fatal.append(Problem(str(json_path), None, f"{name}: no images"))
    return SplitDraft(name, str(json_path), candidates)


def _val_is_train(draft: Draft, allowed: bool) -> None:
    """The YOLO rule (:func:`slimloop.data.yolo_checks.split_overlap`) on the image files of val and train."""
    files = {s.name: [c.src for c in s.candidates if c.probe] for s in draft.splits}
    error, warning = split_overlap(files.get("train", []), files.get("val", []), allowed)
    origin = next((s.origin for s in draft.splits if s.name == "val"), "data.coco")
    draft.fatal.extend([Problem(origin, None, error)] if error else [])
    draft.warnings.extend([Problem(origin, None, warning)] if warning else [])


def import_coco(source: CocoSource, base: str | Path, out_dir: str | Path, skip_invalid: bool = False,
                progress: bool = False, protected: Iterable[Protected] = (),
                allow_val_equals_train: bool = False) -> dict[str, Any]:
    """Import a COCO dataset (one JSON and one image folder per split) into the canonical form.

    Every split must have the same categories as train. Crowd annotations (``iscrowd: 1``) are
    ignored and counted. An image's ``width``/``height``, when given, must match the file.

    Args:
        source: the ``data.coco`` params.
        base: folder that relative paths in ``source`` are relative to (the project root).
        out_dir: canonical dataset root; replaced only when the import succeeds.
        skip_invalid: drop invalid images (listed in ``<out_dir>/invalid.json``) instead of failing.
        progress: show progress bars.
        protected: paths ``out_dir`` must keep clear of (besides the JSON files and image folders).
        allow_val_equals_train: accept val images that are exactly the train images (with a warning).

    Returns:
        ``skipped``, ``dropped``, ``ignored_crowd`` and ``report`` (see ``finish_import``).

    Raises:
        DataError: listing every problem found.
    """
    paths, fatal = _split_paths(source, Path(base))
    draft = Draft([], [], fatal, sources=[p for _, js, images in paths for p in (js, images)])
    reference: tuple[str, list[tuple[int, str]]] | None = None
    for name, json_path, images in paths:
        coco, problems = _load_json(json_path)
        draft.fatal.extend(problems)
        if not images.is_dir():
            draft.fatal.append(Problem(str(images), None, f"{name}: image folder not found"))
        if problems:
            continue
        parse = coco_to_split(coco, str(json_path))
        if reference is None:
            reference = (str(json_path), parse.categories)
        elif parse.categories != reference[1]:
            parse.fatal.append(Problem(str(json_path), None, f"categories differ from those of {reference[0]}"))
        draft.splits.append(_split_draft(name, json_path, images, parse))
        draft.fatal.extend(parse.fatal)
        draft.dropped.extend(parse.dropped)
        draft.warnings.extend(parse.warnings)
        draft.ignored_crowd += parse.ignored_crowd
    _val_is_train(draft, allow_val_equals_train)
    draft.names = [n for _, n in reference[1]] if reference else []
    return finish_import(draft, Path(out_dir), skip_invalid, progress, protected)
