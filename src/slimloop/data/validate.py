"""Checks shared by the YOLO and COCO importers: image probing, box bounds, the invalid-sample report."""

from __future__ import annotations

import io
import shutil
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from tqdm import tqdm

from slimloop.data.canonical import Sample, Split, image_dir, write_annotations
from slimloop.errors import DataError, Problem
from slimloop.io import Protected, atomic_dir, check_output_dir, write_json_atomic

IMAGE_SUFFIXES = frozenset({".bmp", ".jpg", ".jpeg", ".png", ".tif", ".tiff", ".webp", ".pgm", ".ppm"})
TOLERANCE = 1e-3  # boxes may overshoot the image by this fraction of its side; they are clipped
REPORT_NAME = "invalid.json"
# Largest image accepted (100 MP, e.g. 10000 x 10000): checked from the file header before decoding,
# so a decompression bomb (a small PNG declaring 30000 x 30000 pixels) never allocates its pixels.
MAX_PIXELS = 100_000_000

_ORIENTATION_TAG = 0x0112  # EXIF orientation; 1 means upright
_SUPPORTED_DTYPES = (np.uint8, np.uint16)  # what slimloop.data.dataset.decode_image accepts
_SUPPORTED_CHANNELS = (1, 3, 4)


@dataclass
class Candidate:
    """One image to import with its labels, before its file is probed."""

    src: Path  # the image file
    labels: np.ndarray  # (N,) 0-based class ids
    boxes: np.ndarray  # (N, 4) xyxy: fractions of the image side if ``normalized``, else px
    normalized: bool
    box_where: list[tuple[str, int | None, str]] = field(default_factory=list)  # per box: file, line, prefix
    problems: list[Problem] = field(default_factory=list)
    listed_at: str = ""  # where the importer found the image, appended to image problems
    declared_size: tuple[int, int] | None = None  # (width, height) claimed by an annotation file
    declared_where: tuple[str, str] = ("", "")  # file and record prefix for a size mismatch
    probe: bool = True  # False when the path is unsafe to open (it escapes the image folder)


@dataclass
class SplitDraft:
    """The candidates of one split and the file that defines the split."""

    name: str
    origin: str
    candidates: list[Candidate]


@dataclass
class Draft:
    """Everything an importer found, before any image is probed or file written."""

    names: list[str]
    splits: list[SplitDraft]
    fatal: list[Problem] = field(default_factory=list)  # dataset-level: never skippable
    dropped: list[Problem] = field(default_factory=list)  # records that belong to no image
    ignored_crowd: int = 0
    sources: list[Path] = field(default_factory=list)  # files and folders read: the output must stay clear
    warnings: list[Problem] = field(default_factory=list)  # imported anyway, but the user should know


def _pil_error(data: bytes, suffix: str) -> str | None:
    """Truncation OpenCV may let through, and EXIF rotation training would not apply."""
    jpeg = suffix in (".jpg", ".jpeg")
    try:
        with Image.open(io.BytesIO(data)) as im:
            orientation = im.getexif().get(_ORIENTATION_TAG, 1)
            if jpeg:
                im.load()  # OpenCV < 5 decodes a truncated JPEG with a grey tail and a warning
    except Exception as exc:  # noqa: BLE001 -- PIL raises many types on corrupt data
        # OpenCV decoded the whole file already; only for JPEG is PIL's verdict needed.
        return f"corrupt image: {exc}" if jpeg else None
    if orientation not in (1, None):
        # Training reads pixels as stored (cv2.IMREAD_UNCHANGED), while labelling tools show the
        # rotated image: the boxes would not match. Refuse rather than guess which one is meant.
        return f"EXIF orientation {orientation} (rotated image): save it upright without the tag"
    return None


def _too_large(data: bytes) -> str | None:
    """Why the image declared in ``data``'s header is too large to decode, or None."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:  # reads the header only
                width, height = im.size
    except Image.DecompressionBombError:
        width, height = None, None
    except Exception:  # noqa: BLE001 -- not readable by PIL: OpenCV (and its own limit) decides
        return None
    if width is not None and width * height <= MAX_PIXELS:
        return None
    size = "" if width is None else f" ({width} x {height} = {width * height / 1e6:.0f} MP)"
    return (f"image too large{size}: more than {MAX_PIXELS / 1e6:.0f} MP, refused before decoding "
            "(downscale it)")


def _decode(data: bytes, suffix: str) -> tuple[np.ndarray | None, str | None]:
    """Decode ``data`` as training will (OpenCV, unchanged); return the pixels or why not."""
    if not data:
        return None, "empty file"
    too_large = _too_large(data)
    if too_large:
        return None, too_large
    try:
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error:
        img = None
    if img is None or img.size == 0:
        return None, "corrupt or unsupported image (OpenCV cannot decode it)"
    channels = 1 if img.ndim == 2 else img.shape[2]
    if img.dtype not in _SUPPORTED_DTYPES or channels not in _SUPPORTED_CHANNELS:
        return None, f"unsupported pixel type: {channels} channel(s) of {img.dtype}"
    reason = _pil_error(data, suffix)
    return (None, reason) if reason else (img, None)


def probe_image(path: Path) -> tuple[int, int]:
    """Read and fully decode an image file; return its (width, height) as training will see it.

    Args:
        path: the image file.

    Returns:
        ``(width, height)`` of the pixels as stored (``cv2.IMREAD_UNCHANGED``, as training reads).

    Raises:
        DataError: the file is missing, unreadable, empty, truncated, not an image, of a pixel
            type training cannot read, or rotated by an EXIF orientation tag.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(Problem(str(path), None, "image not found")) from None
    except OSError as exc:
        raise DataError(Problem(str(path), None, f"image unreadable: {exc.strerror}")) from None
    except ValueError:  # a NUL character in the name, from an annotation or list file
        raise DataError(Problem(str(path), None, "not a valid file name (NUL character)")) from None
    img, reason = _decode(data, path.suffix.lower())
    if img is None:
        raise DataError(Problem(str(path), None, reason or "not an image"))
    return int(img.shape[1]), int(img.shape[0])  # img: (H, W) or (H, W, C)


def check_px_boxes(
    boxes: np.ndarray, width: int, height: int, tol: float = TOLERANCE
) -> tuple[np.ndarray, list[str | None]]:
    """Check pixel boxes against the image bounds; clip overshoots within ``tol``.

    Args:
        boxes: (N, 4) xyxy pixels.
        width: image width, px.
        height: image height, px.
        tol: allowed overshoot as a fraction of the image side.

    Returns:
        The clipped boxes (N, 4) and, per box, a problem message or None.
    """
    scale = np.array([width, height, width, height], np.float64)
    norm = boxes / scale  # (N, 4)
    messages: list[str | None] = []
    for x1, y1, x2, y2 in norm:
        outside = min(x1, y1) < -tol or max(x2, y2) > 1 + tol
        messages.append(f"bbox outside the {width}x{height} image (beyond tolerance {tol})" if outside else None)
    clipped = np.clip(norm, 0.0, 1.0) * scale
    for i, (x1, y1, x2, y2) in enumerate(clipped):
        if messages[i] is None and (x2 <= x1 or y2 <= y1):
            messages[i] = "bbox has zero size after clipping to the image"
    return clipped, messages


def _check_candidate(c: Candidate) -> tuple[int, int, np.ndarray] | None:
    """Probe the image of ``c`` and convert its boxes to px; problems go to ``c.problems``."""
    if not c.probe:
        return None
    try:
        width, height = probe_image(c.src)
    except DataError as exc:
        suffix = f" ({c.listed_at})" if c.listed_at else ""
        c.problems.extend(Problem(p.file, p.line, p.message + suffix) for p in exc.problems)
        return None
    if c.declared_size is not None and c.declared_size != (width, height):
        file, prefix = c.declared_where
        dw, dh = c.declared_size
        c.problems.append(Problem(file, None, f"{prefix}width/height {dw}x{dh} in the annotations "
                                  f"but the image file is {width}x{height}"))
        return None
    if c.normalized:
        return width, height, c.boxes * np.array([width, height, width, height], np.float64)
    boxes, messages = check_px_boxes(c.boxes, width, height)
    for (file, line, prefix), msg in zip(c.box_where, messages, strict=True):
        if msg is not None:
            c.problems.append(Problem(file, line, prefix + msg))
    return width, height, boxes


def unique_names(names: list[str]) -> list[str]:
    """Safe, unique file names: originals kept where unique, others prefixed with their index.

    Path separators and control characters become ``_``; spaces and non-ASCII are kept.
    Uniqueness ignores case, so the folder also works on case-insensitive file systems.
    """
    safe = ["".join("_" if ch in "/\\" or ord(ch) < 32 else ch for ch in n).lstrip(".") or "image"
            for n in names]
    counts: dict[str, int] = {}
    for n in safe:
        counts[n.casefold()] = counts.get(n.casefold(), 0) + 1
    used: set[str] = set()
    out = []
    for i, n in enumerate(safe):
        name = n if counts[n.casefold()] == 1 else f"{i}_{n}"
        while name.casefold() in used:
            name = f"{i}_{name}"
        used.add(name.casefold())
        out.append(name)
    return out


def _problem_dict(p: Problem) -> dict:
    return {"file": p.file, "line": p.line, "message": p.message}


def _probe_all(draft: Draft, progress: bool) -> dict[str, list[tuple[Candidate, tuple | None]]]:
    """Probe every image of every split (tqdm bar over all of them when ``progress``)."""
    total = sum(len(s.candidates) for s in draft.splits)
    checked: dict[str, list[tuple[Candidate, tuple | None]]] = {}
    with tqdm(total=total, desc="check images", disable=not progress, leave=False) as bar:
        for split in draft.splits:
            checked[split.name] = []
            for c in split.candidates:
                checked[split.name].append((c, _check_candidate(c)))
                bar.update(1)
    return checked


def finish_import(draft: Draft, out_dir: Path, skip_invalid: bool, progress: bool = False,
                  protected: Iterable[Protected] = ()) -> dict:
    """Validate every image of ``draft`` and write the canonical dataset to ``out_dir`` atomically.

    Every problem is collected before anything is decided. Strict mode (``skip_invalid`` False)
    raises on any problem. With ``skip_invalid``, an image with any problem is dropped whole
    (with all its labels) and listed in ``<out_dir>/invalid.json``; dataset-level problems
    (``draft.fatal``) and a train or val split left empty still raise.

    Args:
        draft: what the importer parsed.
        out_dir: the canonical dataset root; replaced only when the import succeeds.
        skip_invalid: skip bad samples instead of failing.
        progress: show a progress bar while probing images.
        protected: paths ``out_dir`` must keep clear of, besides ``draft.sources``.

    Returns:
        ``{"skipped": n_images, "dropped": n_records, "ignored_crowd": n, "report": path,
        "warnings": [{"file", "line", "message"}, ...]}`` (the warnings are in the report too).

    Raises:
        DataError: listing every problem found.
        OutputPathError: ``out_dir`` is, contains or lies in the source, or is not slimloop's to replace.
    """
    protected = [*protected, *(Protected("the dataset source", p) for p in draft.sources)]
    check_output_dir(out_dir, protected)  # before the images are probed: that can take minutes
    checked = _probe_all(draft, progress)
    sample_problems = [p for rows in checked.values() for c, _ in rows for p in c.problems]
    fatal = list(draft.fatal)
    if fatal or ((sample_problems or draft.dropped) and not skip_invalid):
        raise DataError(fatal + draft.dropped + sample_problems)
    kept = {name: [(c, r) for c, r in rows if not c.problems] for name, rows in checked.items()}
    origins = {s.name: s.origin for s in draft.splits}
    empty = [Problem(origins[n], None, f"{n}: no valid images left after skipping invalid ones")
             for n in ("train", "val") if n in kept and not kept[n]]
    if empty:
        raise DataError(empty + sample_problems)
    skipped = [{"split": name, "image": str(c.src), "problems": [_problem_dict(p) for p in c.problems]}
               for name, rows in checked.items() for c, _ in rows if c.problems]
    warnings = [_problem_dict(p) for p in draft.warnings]
    report = {"skipped": skipped, "dropped": [_problem_dict(p) for p in draft.dropped],
              "ignored_crowd": draft.ignored_crowd, "warnings": warnings}
    _write(out_dir, draft.names, kept, report, progress, protected)
    return {"skipped": len(skipped), "dropped": len(draft.dropped),
            "ignored_crowd": draft.ignored_crowd, "report": str(out_dir / REPORT_NAME), "warnings": warnings}


def _write(out_dir: Path, names: list[str], kept: dict, report: dict, progress: bool,
           protected: list[Protected]) -> None:
    """Copy the kept images and write the annotations and report, all inside one atomic folder."""
    with atomic_dir(out_dir, protected) as tmp:
        for split_name, rows in kept.items():
            dest = image_dir(tmp, split_name)
            dest.mkdir(parents=True, exist_ok=True)
            files = unique_names([c.src.name for c, _ in rows])
            samples = []
            for (c, (width, height, boxes)), file_name in tqdm(
                list(zip(rows, files, strict=True)), desc=f"copy {split_name}", disable=not progress, leave=False
            ):
                try:
                    shutil.copyfile(c.src, dest / file_name)
                except OSError as exc:
                    raise DataError(Problem(str(c.src), None, f"cannot copy image: {exc.strerror}")) from None
                samples.append(Sample(file_name, width, height, boxes.reshape(-1, 4), c.labels.astype(np.int64)))
            write_annotations(tmp, split_name, Split(list(names), samples))
        write_json_atomic(tmp / REPORT_NAME, report)
