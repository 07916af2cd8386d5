"""The report's inputs: what the earlier stages measured, read from the metrics folder, and the
helpers both the text and the pictures need (missing values, the Pareto front)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slimloop.io import read_stage_json
from slimloop.records import Baseline, Control, Final, Iteration, Sweep


@dataclass(frozen=True)
class ReportInputs:
    """Everything the earlier stages measured. ``control`` is None when it was not run (``control_note`` says why)."""

    baseline: dict[str, Any]
    iterations: list[dict[str, Any]]
    final: dict[str, Any]
    control: dict[str, Any] | None
    control_note: str
    sweep: list[dict[str, Any]]
    latency: dict[str, Any] | None = None  # metrics/latency.json: the side-by-side table (None: not measured)
    int8: dict[str, Any] | None = None  # metrics/int8.json (None: quantization off or not run)

    def latency_row(self, key: str) -> dict[str, Any] | None:
        """The latency table's row for model ``key`` on the target runtime (None when not measured)."""
        if not self.latency:
            return None
        return next((row for row in self.latency.get("rows", []) if row["name"] == key), None)


def _control(path: Path) -> tuple[dict[str, Any] | None, str]:
    if not path.exists():
        return None, f"{path} does not exist"
    record = read_stage_json(path, "control", Control)
    if not record.get("enabled", True) or "map" not in record:
        return None, "`control.enabled` is false"
    return record, ""


def _optional(path: Path, stage: str) -> dict[str, Any] | None:
    return read_stage_json(path, stage) if path.exists() else None


def load_inputs(metrics_dir: Path) -> ReportInputs:
    """Read ``baseline.json``, ``iterations/iter_<k>.json``, ``final.json``, ``control.json``,
    ``imgsz_sweep.json``, ``latency.json`` and ``int8.json`` from ``metrics_dir``.

    Args:
        metrics_dir: the metrics folder the earlier stages wrote.

    Raises:
        ConfigError: ``baseline.json`` or ``final.json`` is missing, or any file present is unreadable,
            not JSON, or lacks a key (or has a value of another type) the report relies on.
    """
    metrics_dir = Path(metrics_dir)
    baseline = read_stage_json(metrics_dir / "baseline.json", "baseline", Baseline)
    final = read_stage_json(metrics_dir / "final.json", "compress", Final)
    files = sorted((p for p in (metrics_dir / "iterations").glob("iter_*.json") if p.stem[5:].isdigit()),
                   key=lambda p: int(p.stem[5:]))
    iterations = [read_stage_json(p, "compress", Iteration) for p in files]
    sweep_path = metrics_dir / "imgsz_sweep.json"
    sweep = read_stage_json(sweep_path, "compress", Sweep)["rows"] if sweep_path.exists() else []
    control, note = _control(metrics_dir / "control.json")
    return ReportInputs(baseline, iterations, final, control, note, sweep,
                        _optional(metrics_dir / "latency.json", "latency"), _optional(metrics_dir / "int8.json", "quantize"))


def is_missing(value: Any) -> bool:
    """None or NaN: a value a record does not have."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point dominates, by ascending cost.

    Args:
        points: ``(gflops, map)`` pairs; fewer GFLOPs and more mAP are better.

    Returns:
        Indices of the front, cheapest first. Of exact duplicates only the first is kept; a point
        equal to another in one coordinate and worse in the other is dominated.
    """
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1], i))
    front: list[int] = []
    for i in order:
        if not front or points[i][1] > points[front[-1]][1]:
            front.append(i)
    return front
