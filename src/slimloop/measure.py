"""One record per evaluated model: accuracy at the report's operating point plus cost."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from slimloop.config import EvalParams

KEYS = (
    "map50", "map", "precision", "recall", "missed",
    "params", "size_mb", "gflops", "imgsz", "latency_quick_ms", "latency_torch_quick_ms", "threads",
)


def measure_model(
    model: nn.Module,
    data_root: str | Path,
    split: str,
    imgsz: int,
    params: EvalParams,
    device: str = "cpu",
    progress: bool = False,
) -> dict[str, Any]:
    """Evaluate ``model`` on ``split`` and profile it at ``imgsz``.

    Returns:
        The DESIGN.md metric keys (``map50``, ``map``, ``precision``, ``recall``, ``missed``,
        ``params``, ``size_mb``, ``gflops``, ``imgsz``, ``latency_quick_ms``, ``latency_torch_quick_ms``
        (single readings: the report's latencies come from ``metrics/latency.json``),
        ``threads``), then ``latency_cuda_quick_ms`` when measured, ``per_class`` and ``split``.
    """
    from slimloop.evaluate import evaluate
    from slimloop.profile import profile

    acc = evaluate(model, data_root, split, imgsz, params, device=device, progress=progress)
    cost = profile(model, imgsz, params)
    merged = {**acc, **cost, "imgsz": imgsz}
    record = {k: merged[k] for k in KEYS}
    if "latency_cuda_quick_ms" in merged:
        record["latency_cuda_quick_ms"] = merged["latency_cuda_quick_ms"]
    record["split"] = split
    record["per_class"] = acc.get("per_class", {})
    return record


def sweep_imgsz(
    models: dict[str, nn.Module],
    data_root: str | Path,
    split: str,
    sizes: list[int],
    params: EvalParams,
    device: str = "cpu",
) -> list[dict[str, Any]]:
    """Plan B: evaluate each model at each input size (lower sizes miss small codes first).

    Returns:
        One row per (model, size): ``model``, ``imgsz``, the metric keys, and ``missed_per_class``.
    """
    return [sweep_cell(model, name, data_root, split, imgsz, params, device)
            for name, model in models.items() for imgsz in sizes]


def sweep_cell(model: nn.Module, name: str, data_root: str | Path, split: str, imgsz: int, params: EvalParams,
               device: str = "cpu") -> dict[str, Any]:
    """One row of :func:`sweep_imgsz`: ``model`` (called ``name``) measured at ``imgsz``.

    Independent of every other cell, so cells may run in parallel (``compress.task_runner``).
    """
    rec = measure_model(model, data_root, split, imgsz, params, device=device)
    missed = {cls: v["missed"] for cls, v in rec["per_class"].items()}
    return {"model": name, **{k: rec[k] for k in KEYS}, "missed_per_class": missed}
