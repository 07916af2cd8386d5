"""YOLO (ultralytics data.yaml) datasets: parse and validate labels, import to canonical, export back."""

from __future__ import annotations

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
    Candidate,
    Draft,
    SplitDraft,
    finish_import,
)
from slimloop.data.yolo_checks import (
    mark_shared_labels,
    orphan_labels,
    real_key,
    repeated_names,
    split_overlap,
    walk_images,
)
from slimloop.data.yolo_labels import cxcywh_to_xyxy, parse_label_bytes
from slimloop.errors import DataError, Problem
from slimloop.io import Protected, atomic_dir, write_text_atomic
from slimloop.yamlfile import StrictSafeLoader, parse_yaml, yaml_problem

_MIN_DECIMALS, _MAX_DECIMALS = 6, 12  # export precision: see _label_lines
Where = Callable[[str, str], Problem]  # (data.yaml key, message) -> Problem at that key


def label_path_for(image: Path) -> Path:
    """The ultralytics rule: last ``images`` folder of the path -> ``labels``, suffix -> ``.txt``."""
    parts = list(image.parts)
    hits = [i for i, part in enumerate(parts[:-1]) if part == "images"]
    if hits:
        parts[hits[-1]] = "labels"
    return Path(*parts).with_suffix(".txt")


def _key_lines(text: str) -> dict[str, int]:
    """1-based line of each top-level key of a YAML mapping (for problem locations)."""
    try:
        node = yaml.compose(text, Loader=StrictSafeLoader)
    except (yaml.YAMLError, RecursionError):
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
        raw = parse_yaml(text)
    except yaml.YAMLError as exc:  # a key twice and deep nesting included
        line, problem = yaml_problem(exc)
        raise DataError(Problem(str(path), line, f"not valid YAML: {problem}")) from None
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
    names = [str(n) for n in names]
    if repeated := repeated_names(names):
        return None, [where("names", repeated)]
    return names, []


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
    value: Any, root: Path, key: str, where: Where, draft: Draft, label_roots: list[tuple[Path, bool]]
) -> tuple[list[tuple[Path, str]], list[Problem], list[Problem]]:
    """Images of one split entry: (image, listed_at) pairs, fatal problems, dropped records; the
    folders and list files it reads are added to ``draft.sources``, the label folders worth searching
    for orphans to ``label_roots``."""
    entries = value if isinstance(value, list) else [value]
    if not entries or not all(isinstance(e, str) and e for e in entries):
        return [], [where(key, f"{key} must be a folder, a .txt list file, or a list of them")], []
    images: list[tuple[Path, str]] = []
    fatal, dropped = [], []
    for entry in entries:
        path = Path(os.path.normpath(root / os.path.expanduser(entry)))
        if path.is_dir():
            labels = label_path_for(path / "image.jpg").parent
            found, linked, warnings = walk_images(path)
            draft.sources.extend([path, labels, *linked])
            draft.warnings.extend(warnings)
            label_roots.extend([(labels, True)] if labels != path else [])
            images.extend((p, "") for p in found)
        elif path.is_file() and path.suffix.lower() == ".txt":
            draft.sources.append(path)
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


def _add_split(draft: Draft, key: str, value: Any, root: Path, where: Where, origin: str,
               label_roots: list[tuple[Path, bool]]) -> int:
    """Add one split's candidates and problems to ``draft``; return how many lack a label file."""
    images, fatal, dropped = _split_images(value, root, key, where, draft, label_roots)
    images, duplicates = _dedupe(images)
    label_roots.extend((label_path_for(image).parent, False) for image, listed_at in images
                       if listed_at and label_path_for(image).parent != image.parent)
    draft.fatal.extend(fatal)
    draft.dropped.extend(dropped + duplicates)
    if not images and key != "test" and not fatal:
        draft.fatal.append(where(key, f"{key}: no images found"))
    pairs = [_candidate(image, listed_at, len(draft.names) or None) for image, listed_at in images]
    draft.splits.append(SplitDraft(key, origin, [c for c, _ in pairs]))
    if pairs and not any(found for _, found in pairs):
        draft.warnings.append(where(key, f"{key}: none of its {len(pairs)} images has a label file (all import "
                                    f"as background); labels are looked for at {label_path_for(pairs[0][0].src)}"))
    return sum(not found for _, found in pairs)


def _cross_checks(draft: Draft, label_roots: list[tuple[Path, bool]], where: Where, allow_val_equals_train: bool) -> None:
    """Checks over all splits: shared and orphan label files, val images that are train images."""
    candidates = [c for split in draft.splits for c in split.candidates]
    mark_shared_labels(candidates, label_path_for)
    used = {real_key(label_path_for(c.src)) for c in candidates}
    draft.warnings.extend(orphan_labels(label_roots, used, draft.sources))
    by_name = {split.name: [c.src for c in split.candidates] for split in draft.splits}
    error, warning = split_overlap(by_name.get("train", []), by_name.get("val", []), allow_val_equals_train)
    draft.fatal.extend([where("val", error)] if error else [])
    draft.warnings.extend([where("val", warning)] if warning else [])


def import_yolo(data_yaml: str | Path, out_dir: str | Path, skip_invalid: bool = False,
                progress: bool = False, protected: Iterable[Protected] = (),
                allow_val_equals_train: bool = False) -> dict[str, Any]:
    """Import an ultralytics-style YOLO dataset into the canonical form at ``out_dir``.

    ``path`` (optional) is relative to the yaml's folder; ``train``, ``val``, ``test`` (optional)
    are relative to it and name an image folder (searched recursively), a ``.txt`` image list
    (lines relative to its folder), or a list of those. Labels follow :func:`label_path_for`;
    an image without a label file is a background image. Linked subfolders are followed, ``~``
    is expanded.

    Args:
        data_yaml: the data.yaml file (read with a ``yaml.SafeLoader`` that refuses repeated keys).
        out_dir: canonical dataset root; replaced only when the import succeeds.
        skip_invalid: drop invalid images (listed in ``<out_dir>/invalid.json``) instead of failing.
        progress: show progress bars.
        protected: paths ``out_dir`` must keep clear of (besides the dataset's own files).
        allow_val_equals_train: accept a val split of exactly the train images (with a warning).

    Returns:
        ``skipped``, ``dropped``, ``ignored_crowd`` (always 0), ``report``, ``missing_labels`` and
        ``warnings`` (label files no image uses, val images that are train images, a split
        without any label file, link loops), each ``{"file", "line", "message"}``.

    Raises:
        DataError: listing every problem found (with file and line): besides bad labels and
            images, repeated class names, one label file for two images, val equal to train.
    """
    data_yaml = Path(data_yaml).absolute()
    raw, lines = _read_yaml(data_yaml)

    def where(key: str, message: str) -> Problem:
        return Problem(str(data_yaml), lines.get(key), message)

    names, fatal = _names(raw, where)
    root = data_yaml.parent
    if isinstance(raw.get("path"), str):
        root = Path(os.path.normpath(root / os.path.expanduser(raw["path"])))
    elif raw.get("path") is not None:
        fatal.append(where("path", "path must be a string"))
    draft = Draft(names or [], [], fatal, sources=[data_yaml])
    missing, label_roots = 0, []
    for key in SPLITS:
        if raw.get(key) is not None:
            missing += _add_split(draft, key, raw[key], root, where, str(data_yaml), label_roots)
        elif key != "test":
            fatal.append(where(key, f"{key} is missing"))
    _cross_checks(draft, label_roots, where, allow_val_equals_train)
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
