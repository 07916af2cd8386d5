"""YOLO label files: parse and check every line of ``class cx cy w h`` (normalized) into boxes."""

from __future__ import annotations

import math
import reprlib

import numpy as np

from slimloop.data.validate import TOLERANCE
from slimloop.errors import Problem

_FIELDS = ("class", "cx", "cy", "w", "h")


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
