"""Step pad: round every pruned width up to a multiple (restoring the largest-gamma channels) and cut;
``pad.multiple: auto`` picks the multiple by measuring each candidate structure side by side."""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from slimloop.checkpoint import load_model
from slimloop.compress.steps import PROBE, StepResult, check_masks, load_masks, surgery_step
from slimloop.compress.surgery import prune_model
from slimloop.config import PAD_CANDIDATES, EvalParams, LatencyParams, PadParams

EPS = 1e-9
# (multiple -> structure, imgsz, latency params) -> runtime -> multiple -> latency-table row
MeasureFn = Callable[[dict[int, nn.Module], int, LatencyParams], dict[str, dict[int, dict[str, Any]]]]


def pad_channels(keep: dict[str, Tensor], scores: dict[str, Tensor], multiple: int) -> dict[str, Tensor]:
    """Round every kept width UP to a multiple by restoring the pruned channels with the largest gamma.

    Never above the group's current width; ``multiple == 1`` returns the masks unchanged.
    """
    padded = {}
    for g, mask in keep.items():
        width, kept = mask.numel(), int(mask.sum())
        target = min(width, math.ceil(kept / multiple) * multiple)
        mask = mask.clone()
        if target > kept:
            candidates = scores[g].masked_fill(mask, -math.inf)
            mask[candidates.topk(target - kept).indices] = True
        padded[g] = mask
    return padded


def measure_structures(structures: dict[int, nn.Module], imgsz: int,
                       latency: LatencyParams) -> dict[str, dict[int, dict[str, Any]]]:
    """Each candidate structure exported to ONNX and measured side by side (``latency.pad_rounds`` rounds of
    ``latency.pad_runs`` runs) on ``latency.runtime`` and every ``latency.compare`` runtime."""
    from slimloop.deploy.export import export_onnx
    from slimloop.deploy.latency import measure_files

    timing = latency.model_copy(update={"rounds": latency.pad_rounds, "runs": latency.pad_runs})
    out: dict[str, dict[int, dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        files = {str(m): export_onnx(net, Path(tmp) / f"pad_{m}.onnx", imgsz) for m, net in structures.items()}
        for runtime in (latency.runtime, *latency.compare):
            table = measure_files(files, runtime, timing, baseline=str(min(structures)))
            out[runtime] = {int(row["name"]): row for row in table["rows"]}
    return out


def choose_multiple(candidates: list[dict[str, Any]], runtime: str) -> int:
    """The multiple whose structure ran fastest on ``runtime`` among those within the GFLOPs growth
    allowed (ties: the smaller multiple); the unpadded structure (1) is always allowed."""
    allowed = [c for c in candidates if c["within_growth"]]
    return min(allowed, key=lambda c: (c["latency"][runtime]["median_ms"], c["multiple"]))["multiple"]


def auto_pad_table(model: nn.Module, keep: dict[str, Tensor], scores: dict[str, Tensor], imgsz: int,
                   pad: PadParams, latency: LatencyParams, measure: MeasureFn = measure_structures) -> dict[str, Any]:
    """``pad.multiple: auto``: the pruned structure padded to each of :data:`PAD_CANDIDATES`, its GFLOPs
    and its side-by-side latency, and the chosen multiple (:func:`choose_multiple`).

    Args:
        model: the model the masks were selected on.
        keep, scores: the prune step's masks and gamma scores.
        imgsz: the size the structures are measured at.
        pad: ``max_growth``.
        latency: runtime, compare runtimes, threads, ``pad_rounds`` and ``pad_runs``.
        measure: the timing function (tests inject fake timings).

    Returns:
        ``chosen``, ``runtime``, ``max_growth``, ``unpadded_gflops``, ``runtime_names`` and ``candidates``:
        ``multiple``, ``gflops``, ``growth`` (over unpadded), ``within_growth``, ``latency`` (runtime -> row).
    """
    from slimloop.deploy.runtimes import RUNTIME_NAMES
    from slimloop.profile import gflops

    structures = {m: prune_model(model, pad_channels(keep, scores, m), probe=PROBE).eval() for m in PAD_CANDIDATES}
    flops = {m: gflops(net, imgsz) for m, net in structures.items()}
    timings = measure(structures, imgsz, latency)
    base = flops[min(PAD_CANDIDATES)]
    candidates = [{"multiple": m, "gflops": round(flops[m], 6), "growth": round(flops[m] / base - 1, 6),
                   "within_growth": flops[m] <= (1 + pad.max_growth) * base + EPS,
                   "latency": {rt: timings[rt][m] for rt in timings}} for m in PAD_CANDIDATES]
    runtimes = list(timings)
    return {"chosen": choose_multiple(candidates, latency.runtime), "runtime": latency.runtime,
            "max_growth": pad.max_growth, "unpadded_gflops": round(base, 6), "imgsz": imgsz,
            "runtime_names": {rt: RUNTIME_NAMES.get(rt, rt) for rt in runtimes}, "candidates": candidates}


def pad_step(ckpt: Path, masks: Path, data_root, pad: PadParams, eval_params: EvalParams, out_dir: Path,
             imgsz: int, recalibrate: int = 0, latency: LatencyParams | None = None,
             machine: dict[str, Any] | None = None) -> StepResult:
    """Round the pruned widths up to ``pad.multiple`` (restoring the largest-gamma channels) and cut.

    With ``pad.multiple: auto`` the multiple is measured (:func:`auto_pad_table`) and the table goes
    into the record as ``pad_auto``. The choice depends on the machine, so the loop passes ``machine``
    (CPU, flags, runtime versions, threads): it is part of the step's cache key, and a rerun on the
    same machine serves the step, table and choice included, from the store.

    Args:
        ckpt: the model the masks were selected on (the sparse-trained one, not the pruned one).
        masks: ``masks.safetensors`` of :func:`prune_step`.
        recalibrate: training images that re-estimate the BN statistics (``prune.recalibrate``).
        latency: the latency params (needed for ``auto``).
        machine: the hardware fingerprint (recorded with the table).

    Writes ``out_dir/pad.safetensors`` and ``out_dir/masks.safetensors`` (the padded masks).
    """
    keep, scores = load_masks(masks)
    model = load_model(ckpt)
    check_masks(model, keep, Path(masks))
    table = None
    multiple = pad.multiple
    if multiple == "auto":
        table = auto_pad_table(model, keep, scores, imgsz, pad, latency or LatencyParams())
        table["machine"] = machine
        multiple = table["chosen"]
    padded = pad_channels(keep, scores, multiple)
    result = surgery_step(model, ckpt, padded, scores, "pad", pad, data_root, eval_params, out_dir, imgsz,
                          recalibrate)
    result.record["multiple"] = multiple
    if table is not None:
        result.record["pad_auto"] = table
    return result
