"""YOLO (ultralytics data.yaml) datasets: parse and validate labels, import to canonical, export back."""

from __future__ import annotations

import math
import os
import reprlib
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from slimloop.data.canonical import (
    SPLITS,
    Sample,
    Split,
    annotation_path,
    image_dir,
    read_split,
    to_coco,
)
from slimloop.data.validate import (
    IMAGE_SUFFIXES,
    TOLERANCE,
    Candidate,
    Draft,
    SplitDraft,
    finish_import,
)
from slimloop.errors import DataError, Problem
from slimloop.io import Protected, atomic_dir, write_text_atomic

_FIELDS = ("class", "cx", "cy", "w", "h")
_MIN_DECIMALS, _MAX_DECIMALS = 6, 12  # export precision: see _label_lines
Where = Callable[[str, str], Problem]  # (data.yaml key, message) -> Problem at that key


def label_path_for(image: Path) -> Path:
    """The ultralytics rule: last ``images`` folder of the path -> ``labels``, suffix -> ``.txt``."""
    parts = list(image.parts)
    hits = [i for i, part in enumerate(parts[:-1]) if part == "images"]
    if hits:
        parts[hits[-1]] = "labels"
    return Path(*parts).with_suffix(".txt")


def cxcywh_to_xyxy(rows: np.ndarray) -> np.ndarray:
    """(N, 4) normalized ``cx cy w h`` -> (N, 4) ``x1 y1 x2 y2`` clipped to [0, 1]."""
    rows = np.asarray(rows, np.float64).reshape(-1, 4)
    half = rows[:, 2:] / 2
    return np.clip(np.concatenate([rows[:, :2] - half, rows[:, :2] + half], axis=1), 0.0, 1.0)


def _numbers(fields: list[str]) -> tuple[list[float | None], list[str]]:
    """Fields as finite floats, or the reasons they are not."""
    values, errors = [], []
    for name, token in zip(_FIELDS, fields, strict=True):
        try:
            value = float(token)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value):
            errors.append(f"{name} {reprlib.repr(token)} is {'not a number' if value is None else 'not finite'}")
        values.append(value)
    return values, errors


def _check_line(fields: list[str], nc: int | None, tol: float) -> tuple[list[float] | None, list[str]]:
    """One label line -> ``[class, cx, cy, w, h]`` or the list of what is wrong with it."""
    if len(fields) != 5:
        hint = " (segmentation polygons are not supported)" if len(fields) > 5 else ""
        return None, [f"expected 5 fields 'class cx cy w h', got {len(fields)}{hint}"]
    values, errors = _numbers(fields)
    if errors:
        return None, errors
    cls, cx, cy, w, h = values
    if cls != int(cls):
        errors.append(f"class {reprlib.repr(fields[0])} is not an integer")
    elif nc is not None and not 0 <= cls < nc:
        errors.append(f"class {int(cls)} out of range 0..{nc - 1}")
    for name, value in (("cx", cx), ("cy", cy)):
        if not -tol <= value <= 1 + tol:
            errors.append(f"{name} {value:g} outside [0, 1]")
    for name, value in (("w", w), ("h", h)):
        if value <= 0:
            errors.append(f"{name} {value:g} is zero or negative")
        elif value > 1 + tol:
            errors.append(f"{name} {value:g} outside [0, 1]")
    if errors:
        return None, errors
    x1, y1, x2, y2 = cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
    if min(x1, y1) < -tol or max(x2, y2) > 1 + tol:
        return None, [f"box x {x1:g}..{x2:g}, y {y1:g}..{y2:g} extends outside [0, 1] beyond tolerance {tol}"]
    x1, y1, x2, y2 = cxcywh_to_xyxy(np.array([cx, cy, w, h]))[0]
    if x2 <= x1 or y2 <= y1:
        return None, ["box has zero size after clipping to the image"]
    return values, []


def parse_label_text(
    text: str, source: str, nc: int | None, tol: float = TOLERANCE
) -> tuple[np.ndarray, list[Problem]]:
    """Parse a YOLO label file's text; check every line and collect every problem.

    Blank lines are ignored. Coordinates may overshoot [0, 1] by ``tol`` and are then clipped.

    Args:
        text: the file's text.
        source: the file name for problems.
        nc: number of classes, or None to skip the class range check.
        tol: tolerance on the normalized coordinates.

    Returns:
        ``rows`` (N, 5) ``[class, x1, y1, x2, y2]`` normalized and clipped (valid lines only),
        and the problems with their 1-based line numbers.
    """
    rows, problems = [], []
    for number, line in enumerate(text.split("\n"), start=1):
        fields = line.split()
        if not fields:
            continue
        values, errors = _check_line(fields, nc, tol)
        problems.extend(Problem(source, number, e) for e in errors)
        if values is not None:
            rows.append([values[0], *cxcywh_to_xyxy(np.array(values[1:]))[0]])
    return np.array(rows, np.float64).reshape(-1, 5), problems


def parse_label_bytes(
    data: bytes, source: str, nc: int | None, tol: float = TOLERANCE
) -> tuple[np.ndarray, list[Problem]]:
    """:func:`parse_label_text` on raw bytes; UTF-8 (a BOM is allowed), else one problem."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        return np.zeros((0, 5)), [Problem(source, data[: exc.start].count(b"\n") + 1, "not UTF-8 text")]
    return parse_label_text(text, source, nc, tol)


def _key_lines(text: str) -> dict[str, int]:
    """1-based line of each top-level key of a YAML mapping (for problem locations)."""
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        node = None
    pairs = node.value if isinstance(node, yaml.MappingNode) else []
    return {str(k.value): k.start_mark.line + 1 for k, _ in pairs}


def _read_yaml(path: Path) -> tuple[dict[str, Any], dict[str, int]]:
    """The data.yaml mapping and its key lines. Raises DataError if it cannot be read."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(Problem(str(path), None, "data.yaml not found")) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(Problem(str(path), None, f"cannot read data.yaml: {exc}")) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise DataError(Problem(str(path), mark and mark.line + 1, f"not valid YAML: {exc}")) from None
    if not isinstance(raw, dict):
        raise DataError(Problem(str(path), None, "must be a mapping with train, val and names"))
    return raw, _key_lines(text)


def _names(raw: dict[str, Any], where: Where) -> tuple[list[str] | None, list[Problem]]:
    """Class names from ``names`` (list or {id: name}) and ``nc``; they must agree."""
    names, nc = raw.get("names"), raw.get("nc")
    if nc is not None and (isinstance(nc, bool) or not isinstance(nc, int) or nc < 1):
        return None, [where("nc", f"nc must be a positive integer, got {nc!r}")]
    if names is None:
        if nc is None:
            return None, [where("names", "names is missing")]
        return [f"class_{i}" for i in range(nc)], []
    if isinstance(names, dict):
        keys = list(names)
        if any(isinstance(k, bool) or not isinstance(k, int) for k in keys) or sorted(keys) != list(range(len(keys))):
            return None, [where("names", f"names keys must be the class ids 0..{len(names) - 1}")]
        names = [names[i] for i in range(len(names))]
    if not isinstance(names, list) or not names:
        return None, [where("names", "names must be a non-empty list or {id: name} mapping")]
    bad = [i for i, n in enumerate(names) if isinstance(n, bool) or not isinstance(n, str | int | float)]
    if bad:
        return None, [where("names", f"names[{bad[0]}] is not a string")]
    if nc is not None and nc != len(names):
        return None, [where("nc", f"nc is {nc} but names has {len(names)} entries")]
    return [str(n) for n in names], []


def _list_file(path: Path) -> tuple[list[tuple[Path, str]], list[Problem]]:
    """Image paths of a .txt list file (relative ones are relative to its folder)."""
    try:
        lines = path.read_text(encoding="utf-8-sig").split("\n")
    except (OSError, UnicodeDecodeError) as exc:
        return [], [Problem(str(path), None, f"cannot read image list: {exc}")]
    out, problems = [], []
    for number, line in enumerate(lines, start=1):
        entry = line.strip()
        if not entry:
            continue
        image = Path(os.path.normpath(path.parent / entry))
        if "\x00" in entry or image.suffix.lower() not in IMAGE_SUFFIXES:  # NUL: no file system allows it
            problems.append(Problem(str(path), number, f"not an image file name: {reprlib.repr(entry)}"))
        else:
            out.append((image, f"listed at {path}:{number}"))
    return out, problems


def _split_images(
    value: Any, root: Path, key: str, where: Where, sources: list[Path]
) -> tuple[list[tuple[Path, str]], list[Problem], list[Problem]]:
    """Images of one split entry: (image, listed_at) pairs, fatal problems, dropped records; the
    folders and list files it reads are added to ``sources``."""
    entries = value if isinstance(value, list) else [value]
    if not entries or not all(isinstance(e, str) and e for e in entries):
        return [], [where(key, f"{key} must be a folder, a .txt list file, or a list of them")], []
    images: list[tuple[Path, str]] = []
    fatal, dropped = [], []
    for entry in entries:
        path = Path(os.path.normpath(root / entry))
        if path.is_dir():
            sources.extend([path, label_path_for(path / "image.jpg").parent])
            found = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            images.extend((p, "") for p in found)
        elif path.is_file() and path.suffix.lower() == ".txt":
            sources.append(path)
            listed, problems = _list_file(path)
            images.extend(listed)
            dropped.extend(problems)
        else:
            fatal.append(where(key, f"{key}: {entry} is not a folder or a .txt list file (resolved to {path})"))
    return images, fatal, dropped


def _dedupe(images: list[tuple[Path, str]]) -> tuple[list[tuple[Path, str]], list[Problem]]:
    """Drop repeated images of one split; each repeat is a problem."""
    first: dict[str, str] = {}
    out, problems = [], []
    for image, listed_at in images:
        key = os.path.normcase(str(image.resolve()))
        if key in first:
            problems.append(Problem(str(image), None, f"duplicate image in the split ({listed_at or 'found twice'}; "
                                    f"first {first[key] or 'found in a folder'})"))
        else:
            first[key] = listed_at
            out.append((image, listed_at))
    return out, problems


def _candidate(image: Path, listed_at: str, nc: int | None) -> tuple[Candidate, bool]:
    """The candidate for one image and whether a label file was found."""
    label, found, problems = label_path_for(image), True, []
    try:
        data = label.read_bytes()
    except FileNotFoundError:
        data, found = b"", False
    except OSError as exc:
        data, problems = b"", [Problem(str(label), None, f"cannot read label file: {exc.strerror}")]
    rows, parse_problems = parse_label_bytes(data, str(label), nc)
    return Candidate(image, rows[:, 0].astype(np.int64), rows[:, 1:], True, problems=problems + parse_problems,
                     listed_at=listed_at), found


def _add_split(draft: Draft, key: str, value: Any, root: Path, where: Where, origin: str) -> int:
    """Add one split's candidates and problems to ``draft``; return how many lack a label file."""
    images, fatal, dropped = _split_images(value, root, key, where, draft.sources)
    images, duplicates = _dedupe(images)
    draft.fatal.extend(fatal)
    draft.dropped.extend(dropped + duplicates)
    if not images and key != "test" and not fatal:
        draft.fatal.append(where(key, f"{key}: no images found"))
    pairs = [_candidate(image, listed_at, len(draft.names) or None) for image, listed_at in images]
    draft.splits.append(SplitDraft(key, origin, [c for c, _ in pairs]))
    return sum(not found for _, found in pairs)


def import_yolo(data_yaml: str | Path, out_dir: str | Path, skip_invalid: bool = False,
                progress: bool = False, protected: Iterable[Protected] = ()) -> dict[str, Any]:
    """Import an ultralytics-style YOLO dataset into the canonical form at ``out_dir``.

    ``path`` (optional) is relative to the yaml's folder; ``train``, ``val``, ``test`` (optional)
    are relative to it and name an image folder (searched recursively), a ``.txt`` image list
    (lines relative to its folder), or a list of those. Labels follow :func:`label_path_for`;
    an image without a label file is a background image.

    Args:
        data_yaml: the data.yaml file (read with ``yaml.safe_load``).
        out_dir: canonical dataset root; replaced only when the import succeeds.
        skip_invalid: drop invalid images (listed in ``<out_dir>/invalid.json``) instead of failing.
        progress: show progress bars.
        protected: paths ``out_dir`` must keep clear of (besides the dataset's own files).

    Returns:
        ``skipped``, ``dropped``, ``ignored_crowd`` (always 0), ``report`` and ``missing_labels``.

    Raises:
        DataError: listing every problem found (with file and line).
    """
    data_yaml = Path(data_yaml).absolute()
    raw, lines = _read_yaml(data_yaml)

    def where(key: str, message: str) -> Problem:
        return Problem(str(data_yaml), lines.get(key), message)

    names, fatal = _names(raw, where)
    root = data_yaml.parent
    if isinstance(raw.get("path"), str):
        root = Path(os.path.normpath(root / raw["path"]))
    elif raw.get("path") is not None:
        fatal.append(where("path", "path must be a string"))
    draft = Draft(names or [], [], fatal, sources=[data_yaml])
    missing = 0
    for key in SPLITS:
        if raw.get(key) is not None:
            missing += _add_split(draft, key, raw[key], root, where, str(data_yaml))
        elif key != "test":
            fatal.append(where(key, f"{key} is missing"))
    return {**finish_import(draft, Path(out_dir), skip_invalid, progress, protected), "missing_labels": missing}


def _canonical_bboxes(sample: Sample, boxes: np.ndarray) -> list[list[float]]:
    """COCO bboxes ``boxes`` (N, 4 xyxy px) get in the canonical JSON of ``sample``."""
    probe = Sample(sample.file_name, sample.width, sample.height, boxes, sample.labels)
    return [a["bbox"] for a in to_coco(Split([], [probe]))["annotations"]]


def _label_lines(sample: Sample) -> list[str]:
    """YOLO label lines of ``sample``, each with the fewest decimals (at least 6) that import back
    to the same canonical boxes, so canonical -> YOLO -> canonical is exact at any image size."""
    scale = np.array([sample.width, sample.height] * 2, np.float64)
    xyxy = np.asarray(sample.boxes, np.float64).reshape(-1, 4) / scale  # (N, 4) normalized
    cxcywh = np.concatenate([(xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]], axis=1)
    target = _canonical_bboxes(sample, sample.boxes)
    chosen: list[list[str] | None] = [None] * len(cxcywh)
    for decimals in range(_MIN_DECIMALS, _MAX_DECIMALS + 1):
        texts = [[f"{v:.{decimals}f}" for v in row] for row in cxcywh]
        back = cxcywh_to_xyxy(np.array([[float(t) for t in row] for row in texts])) * scale
        for i, bbox in enumerate(_canonical_bboxes(sample, back)):
            if chosen[i] is None and (bbox == target[i] or decimals == _MAX_DECIMALS):
                chosen[i] = texts[i]
        if all(c is not None for c in chosen):
            break
    return [" ".join([str(int(c)), *t]) for c, t in zip(sample.labels, chosen, strict=True)]


def _export_split(root: Path, tmp: Path, split_name: str) -> Path:
    """Copy one canonical split into ``tmp`` as YOLO; return the written list file."""
    split = read_split(root, split_name)
    listed, used = [], set()
    for i, sample in enumerate(split.samples):
        rel = Path(sample.file_name)
        if rel.is_absolute() or ".." in rel.parts or any(ord(ch) < 32 for ch in sample.file_name):
            raise DataError(Problem(str(annotation_path(root, split_name)), None,
                                    f"unsafe file_name {reprlib.repr(sample.file_name)}"))
        target = tmp / "images" / split_name / rel
        if str(label_path_for(target)).casefold() in used:
            target = target.with_name(f"{i}_{target.name}")  # a.jpg and a.png would share a.txt
        label = label_path_for(target)
        used.add(str(label).casefold())
        for folder in (target.parent, label.parent):
            folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(image_dir(root, split_name) / rel, target)
        write_text_atomic(label, "".join(f"{line}\n" for line in _label_lines(sample)))
        listed.append("./" + target.relative_to(tmp).as_posix())
    write_text_atomic(tmp / f"{split_name}.txt", "".join(f"{line}\n" for line in listed))
    return tmp / f"{split_name}.txt"


def export_yolo(root: str | Path, out_dir: str | Path) -> Path:
    """Write the canonical dataset at ``root`` as an ultralytics YOLO dataset at ``out_dir``.

    Layout: ``images/<split>/``, ``labels/<split>/*.txt`` (an empty file for a background image),
    ``<split>.txt`` image lists that keep the canonical order, and ``data.yaml``. Importing the
    result gives back the identical canonical JSON.

    Args:
        root: canonical dataset root (train and val required, test if present).
        out_dir: output folder, replaced atomically.

    Returns:
        The path of the written ``data.yaml``.

    Raises:
        DataError: the canonical dataset is missing, malformed, or an image cannot be copied.
    """
    root = Path(root)
    present = [s for s in SPLITS if s != "test" or annotation_path(root, s).exists()]
    names = read_split(root, "train").names
    with atomic_dir(out_dir) as tmp:
        doc: dict[str, Any] = {}
        for split_name in present:
            try:
                doc[split_name] = _export_split(root, tmp, split_name).name
            except OSError as exc:
                raise DataError(Problem(str(exc.filename or root), None, f"cannot export: {exc.strerror}")) from None
        doc.update(nc=len(names), names=dict(enumerate(names)))
        write_text_atomic(tmp / "data.yaml", yaml.safe_dump(doc, sort_keys=False, allow_unicode=True))
    return Path(out_dir) / "data.yaml"
