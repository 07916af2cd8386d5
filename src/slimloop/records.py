"""Schemas of the JSON files one stage writes and another reads back (metrics/*.json, step manifests):
the keys and types the readers rely on, checked when the file is read (other keys pass through)."""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class Record(_Open):
    """One evaluated model, as ``slimloop.measure`` writes it (``map`` and ``gflops`` are what every
    reader compares; the rest is shown where present)."""

    map: float
    gflops: float
    map50: float | None = None
    precision: float | None = None
    recall: float | None = None
    missed: int | None = None
    params: int | None = None
    size_mb: float | None = None
    imgsz: int | None = None
    latency_ms: float | None = None
    latency_torch_ms: float | None = None
    threads: int | None = None
    epochs: int | None = None
    step: str | None = None


class Baseline(Record):
    """``metrics/baseline.json``: the loop compares against its ``map``, ``gflops`` and ``params``."""

    params: int
    imgsz: int


class Widths(_Open):
    before: dict[str, int]
    pruned: dict[str, int]
    padded: dict[str, int]


class Iteration(_Open):
    """``metrics/iterations/iter_<k>.json``: one loop iteration, a record per step."""

    iteration: int
    steps: dict[str, Record | None]
    accepted: bool = True
    widths: Widths | None = None


class FinalRetrain(_Open):
    mode: str
    epochs: int


class Final(_Open):
    """``metrics/final.json``: the loop's outcome; ``record`` is the final model's."""

    final_iteration: int
    record: Record
    reason: str | None = None
    accepted: list[int] = []
    epochs_to_final: int = 0
    epochs_total: int | None = None
    map_drop: float | None = None
    final_retrain: FinalRetrain | None = None
    loop_record: Record | None = None
    baseline: Record | None = None


class _Target(_Open):
    gflops: float
    imgsz: int | None = None


class ControlTarget(_Open):
    """``metrics/final.json`` as the control stage reads it: the final model's GFLOPs and size."""

    record: _Target
    epochs_to_final: int = 0


class Control(_Open):
    """``metrics/control.json``: ``{"enabled": false}`` or the control's record."""

    enabled: bool = True
    map: float | None = None
    gflops: float | None = None
    width_multiple: float = math.nan
    target_gflops: float | None = None
    fits: bool = True
    epochs: int | None = None


class SweepRow(Record):
    model: str
    imgsz: int


class Sweep(_Open):
    """``metrics/imgsz_sweep.json``."""

    rows: list[SweepRow]


class StepManifest(BaseModel):
    """``step.json`` of a step-store entry (written last by ``run_stored_step``)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    checkpoint: str
    record: Record
    extra: dict[str, Any]
