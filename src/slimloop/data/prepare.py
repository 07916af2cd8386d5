"""The prepare step: build the canonical dataset from the configured source and summarize it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from slimloop.config import DataParams
from slimloop.data.canonical import SPLITS, annotation_path, read_split
from slimloop.data.coco_import import import_coco
from slimloop.data.yolo import import_yolo
from slimloop.io import Protected, check_output_dir


def summarize_dataset(root: str | Path) -> dict[str, Any]:
    """Counts of a canonical dataset: class names and, per split present, images, boxes,
    background images (no boxes) and boxes per class.

    Raises:
        DataError: an annotation file is malformed.
    """
    summary: dict[str, Any] = {"names": [], "splits": {}}
    for split_name in SPLITS:
        if not annotation_path(root, split_name).exists():
            continue
        split = read_split(root, split_name)
        summary["names"] = split.names
        per_class = [0] * len(split.names)
        for sample in split.samples:
            for label in sample.labels:
                per_class[int(label)] += 1
        summary["splits"][split_name] = {
            "images": len(split.samples),
            "boxes": sum(per_class),
            "background": sum(1 for s in split.samples if len(s.labels) == 0),
            "per_class": per_class,
        }
    return summary


def prepare_dataset(data: DataParams, project_root: Path, progress: bool = True) -> dict[str, Any]:
    """Write the canonical dataset at ``project_root / data.out_dir`` from ``data.source``.

    ``synthetic`` generates barcodes; ``yolo`` and ``coco`` import and validate a dataset
    (paths in ``data.yolo``/``data.coco`` are relative to ``project_root``). The output folder
    is replaced only when the new dataset is complete.

    Args:
        data: the ``data`` params section.
        project_root: folder that relative paths in ``data`` are relative to.
        progress: show progress bars.

    Returns:
        ``source``, ``out_dir``, ``names``, per-split counts under ``splits``, and the import's
        ``skipped`` (invalid images left out), ``dropped`` (records left out), ``ignored_crowd``,
        ``report`` (the invalid-sample report, None for synthetic data) and ``warnings`` (what was
        imported although it looks wrong, each ``{"file", "line", "message"}``).

    Raises:
        DataError: the source data has problems (all of them are listed).
        OutputPathError: ``out_dir`` is, contains or lies in the source, contains the project, or
            is an existing folder slimloop did not write.
    """
    project_root = Path(project_root)
    out_dir = project_root / data.out_dir
    guard = [Protected("the project folder", project_root, inside=False)]
    check_output_dir(out_dir, guard)
    if data.source == "synthetic":
        from slimloop.data.synth import generate_dataset  # heavy (rendering); only when needed

        generate_dataset(out_dir, data, progress, protected=guard)
        report: dict[str, Any] = {"skipped": 0, "dropped": 0, "ignored_crowd": 0, "report": None, "warnings": []}
    elif data.source == "yolo":
        assert data.yolo is not None  # guaranteed by DataParams validation
        report = import_yolo(project_root / data.yolo.data_yaml, out_dir, data.skip_invalid, progress, guard,
                             data.allow_val_equals_train)
    else:
        assert data.coco is not None  # guaranteed by DataParams validation
        report = import_coco(data.coco, project_root, out_dir, data.skip_invalid, progress, guard,
                             data.allow_val_equals_train)
    return {"source": data.source, "out_dir": str(out_dir), **summarize_dataset(out_dir), **report}
