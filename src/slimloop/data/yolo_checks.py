"""YOLO import checks that span files: image folders walked through links, label files no image uses
or that two images share, repeated class names, and a validation split that is the training split."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from slimloop.data.validate import IMAGE_SUFFIXES, Candidate
from slimloop.errors import Problem

MAX_LISTED = 50  # orphan label files named one by one; the rest are counted in one more warning


def real_key(path: Path) -> str:
    """Where ``path`` really is (a name with a NUL byte, refused elsewhere, stays as it is)."""
    try:
        return os.path.normcase(os.path.realpath(path))
    except ValueError:
        return str(path)


def walk_images(folder: Path) -> tuple[list[Path], list[Path], list[Problem]]:
    """Image files under ``folder``, following linked subfolders (``Path.rglob`` skips them silently).

    Returns:
        ``(images, linked, warnings)``: the images sorted by path; the real folders links led to
        (the output must keep clear of them too); a warning per link back into a folder already
        searched (a loop), which is not searched again.
    """
    images, linked, warnings, seen = [], [], [], set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            warnings.append(Problem(dirpath, None, f"a link to {real}, which is searched already: skipped"))
            dirnames[:] = []
            continue
        seen.add(real)
        if Path(dirpath).is_symlink():
            linked.append(Path(real))
        dirnames.sort()
        images.extend(Path(dirpath) / name for name in filenames
                      if Path(name).suffix.lower() in IMAGE_SUFFIXES and (Path(dirpath) / name).is_file())
    return sorted(images), linked, warnings


def mark_shared_labels(candidates: Iterable[Candidate], label_of: Callable[[Path], Path]) -> int:
    """Give every image whose label file another image uses too (``a.jpg`` and ``a.png`` beside one
    ``a.txt``) a problem: which image the boxes belong to cannot be known, and importing both would
    count every box twice. Returns how many images got one."""
    groups: dict[str, list[Candidate]] = {}
    for c in candidates:
        groups.setdefault(real_key(label_of(c.src)), []).append(c)
    marked = 0
    for group in groups.values():
        images = list(dict.fromkeys(real_key(c.src) for c in group))  # one image in train and val is one
        if len(images) < 2:
            continue
        names = ", ".join(Path(i).name for i in images[:4]) + (", ..." if len(images) > 4 else "")
        for c in group:
            c.problems.append(Problem(str(label_of(c.src)), None, f"one label file for {len(images)} images "
                                      f"({names}): which image it labels is ambiguous; rename or remove all but one"))
            marked += 1
    return marked


def orphan_labels(roots: Iterable[tuple[Path, bool]], used: set[str], sources: Sequence[Path]) -> list[Problem]:
    """Label files under ``roots`` (``(folder, recursive)``) that no image of the dataset uses: their
    boxes would be lost without a word (an image deleted, renamed or given another suffix).

    Args:
        roots: label folders; only folders the ``images`` -> ``labels`` rule made are worth searching
            (beside the images, any ``.txt`` may be a list file or a note).
        used: :func:`real_key` of every label path an image maps to.
        sources: files the import reads (list files are not orphans).
    """
    skip = {real_key(p) for p in sources}
    found: dict[str, Path] = {}
    for root, recursive in dict.fromkeys(roots):  # list files give one root per image
        if root.is_dir():
            for path in sorted(root.rglob("*.txt") if recursive else root.glob("*.txt")):
                key = real_key(path)
                if path.is_file() and key not in used and key not in skip:
                    found.setdefault(key, path)
    orphans = list(found.values())
    warnings = [Problem(str(p), None, "label file with no image: its boxes are not imported") for p in orphans[:MAX_LISTED]]
    if len(orphans) > MAX_LISTED:
        warnings.append(Problem(str(orphans[MAX_LISTED].parent), None, f"{len(orphans) - MAX_LISTED} more label files "
                                f"with no image (the first {MAX_LISTED} are listed above)"))
    return warnings


def repeated_names(names: Sequence[str]) -> str | None:
    """Why ``names`` is not a list of distinct class names, or None."""
    first: dict[str, int] = {}
    for i, name in enumerate(names):
        if name in first:
            return (f"names[{i}] {name!r} repeats names[{first[name]}]: two classes of one name cannot be told "
                    "apart in the metrics or by a user of the model")
        first[name] = i
    return None


def split_overlap(train: Sequence[Path], val: Sequence[Path], allowed: bool) -> tuple[str | None, str | None]:
    """``(error, warning)`` about validation images that are training images too.

    The same images in both is surely a mistake (validation would measure memorization) unless
    ``allowed`` (``data.allow_val_equals_train``; then it is a warning); a partial overlap is a warning.
    """
    keys_train, keys_val = {real_key(p) for p in train}, {real_key(p) for p in val}
    shared = len(keys_train & keys_val)
    if not shared:
        return None, None
    if keys_train == keys_val:
        message = (f"val is the same {shared} images as train: validation mAP would measure memorization, not "
                   "detection of new images")
        if allowed:
            return None, message + " (data.allow_val_equals_train is true)"
        return message + "; point val at held-out images, or set data.allow_val_equals_train: true", None
    return None, f"{shared} of the {len(keys_val)} val images are train images too: validation mAP is optimistic"
