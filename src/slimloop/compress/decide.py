"""The loop's decisions: accept a step or retry it smaller, stop when the targets are met."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from slimloop.config import CompressParams, TargetParams

EPS = 1e-9  # a value equal to a bound is inside it
ROUNDING = 1e-6  # records round GFLOPs to 6 decimals: a landed structure may read up to half of it high

# Why the loop stopped (metrics/final.json `reason`).
REASONS = {
    "target_reached": "every target in `target` was met",
    "max_iterations": "`compress.iterations` iterations were accepted before the targets were met",
    "step_floor": "no step down to `compress.min_step_ratio` kept `compress.min_retention` of its parent's "
                  "mAP@0.5:0.95, so the loop kept the last accepted iteration",
    "cannot_compress": "not even the smallest step (`compress.min_step_ratio`) of the first iteration kept "
                       "`compress.min_retention` of the baseline's mAP@0.5:0.95: the loop could not compress "
                       "this model",
}


@dataclass(frozen=True)
class Decision:
    """Why the loop stopped and which model is final (``best``: an iteration, 0 = the baseline)."""

    reason: str
    best: int
    accepted: tuple[int, ...]


def map_drop(record: dict[str, Any], baseline: dict[str, Any]) -> float:
    """mAP@0.5:0.95 lost against the baseline (absolute; negative when it improved)."""
    return float(baseline["map"]) - float(record["map"])


def retention(record: dict[str, Any], parent: dict[str, Any]) -> float:
    """The fraction of its parent's mAP@0.5:0.95 a model keeps (1 when the parent has none)."""
    return float(record["map"]) / float(parent["map"]) if float(parent["map"]) > 0 else 1.0


def accepted(record: dict[str, Any], parent: dict[str, Any], compress: CompressParams) -> bool:
    """Whether a step's finetuned model keeps ``compress.min_retention`` of its parent's mAP.

    A relative bound, so one value serves datasets whose mAP differs: the finetune inside the loop
    is short on purpose (the final retraining recovers), and what it must show is that the cut
    left a network that trains, not the final accuracy.
    """
    return retention(record, parent) >= compress.min_retention - EPS


def smaller_step(ratio: float, compress: CompressParams) -> float | None:
    """The next, halved step after a rejected one; None below ``compress.min_step_ratio``."""
    half = ratio / 2
    return half if half >= compress.min_step_ratio - EPS else None


def target_reached(record: dict[str, Any], baseline: dict[str, Any], target: TargetParams) -> bool:
    """True when every target that is set is met (False when none is set)."""
    checks = []
    if target.gflops_ratio is not None:
        checks.append(record["gflops"] <= target.gflops_ratio * baseline["gflops"] + ROUNDING)
    if target.params_ratio is not None:
        checks.append(record["params"] <= target.params_ratio * baseline["params"])
    if target.latency_ms is not None:
        checks.append(record["latency_quick_ms"] <= target.latency_ms)
    return bool(checks) and all(checks)


def size_targets(target: TargetParams) -> bool:
    """Whether any target can be landed on from the spec alone (GFLOPs or params)."""
    return target.gflops_ratio is not None or target.params_ratio is not None
