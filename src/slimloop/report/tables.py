"""The comparison table: one row per evaluated model, display formatting and GitHub markdown."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from slimloop.deploy.catalogue import model_key
from slimloop.report.inputs import ReportInputs, is_missing

TABLE_STEPS = ("pruned", "padded", "retrained", "distilled", "final_retrain")
ALL_STEPS = ("sparse", *TABLE_STEPS)
ROW_KEYS = ("map50", "map", "size_mb", "gflops", "params", "imgsz")
LATENCY_KEYS = ("latency_ms", "latency_q1_ms", "latency_q3_ms", "speedup", "speedup_min", "speedup_max")
NA = "n/a"


def columns(runtime_name: str = "ONNX Runtime CPU") -> tuple[str, ...]:
    """The table's header; latency names the runtime it was measured on."""
    return ("index", "model", "mAP@0.5", "Δ mAP@0.5 vs baseline", "mAP@0.5:0.95", "size MB",
            f"latency ms ({runtime_name}): median [IQR]", "speed-up vs baseline [round range]", "GFLOPs", "params")


def _row(model: str, kind: str, record: dict[str, Any], iteration: int | None = None,
         step: str | None = None, key: str | None = None) -> dict[str, Any]:
    return {"model": model, "kind": kind, "iteration": iteration, "step": step, "key": key or model_key(kind),
            **{k: record.get(k) for k in ROW_KEYS}}


def _iteration_rows(it: dict[str, Any], steps: Sequence[str]) -> list[dict[str, Any]]:
    k = it["iteration"]
    tag = "" if it.get("accepted", True) else " (rolled back)"
    return [_row(f"iter {k} {step}{tag}", "iteration", it["steps"][step], k, step, model_key("iteration", k, step))
            for step in steps if it["steps"].get(step)]


def latency_fields(inputs: ReportInputs, key: str) -> dict[str, Any]:
    """``LATENCY_KEYS`` of model ``key`` from the side-by-side table (None where it was not measured)."""
    row = inputs.latency_row(key) or {}
    iqr = row.get("iqr_ms") or (None, None)
    return {"latency_ms": row.get("median_ms"), "latency_q1_ms": iqr[0], "latency_q3_ms": iqr[1],
            "speedup": row.get("speedup"), "speedup_min": row.get("speedup_min"), "speedup_max": row.get("speedup_max")}


def _int8_rows(inputs: ReportInputs) -> list[dict[str, Any]]:
    rows = []
    for name, entry in ((inputs.int8 or {}).get("models") or {}).items():
        rows.append(_row(f"{name} int8", "int8", entry.get("int8") or {}, key=model_key("int8", model=name)))
    return rows


def _final_name(final: dict[str, Any]) -> str:
    k, again = int(final["final_iteration"]), final.get("final_retrain")
    if not k:
        return "final (= baseline)"
    return f"final (iteration {k}, {again['mode']} {again['epochs']} epochs)" if again else f"final (iteration {k})"


def comparison_rows(inputs: ReportInputs, steps: Sequence[str] = TABLE_STEPS) -> list[dict[str, Any]]:
    """One row per model in report order: baseline, every iteration's ``steps``, final, control, sweep.

    Args:
        inputs: the loaded metrics.
        steps: which steps of each iteration get a row.

    Returns:
        Dicts with ``model``, ``kind`` (baseline, iteration, final, control, sweep), ``iteration``,
        ``step``, the ``ROW_KEYS`` values and ``delta_map50`` (against ``baseline.json``).
    """
    rows = [_row("baseline", "baseline", inputs.baseline)]
    reference = inputs.final.get("baseline") or {}
    if reference and reference.get("imgsz") != inputs.baseline.get("imgsz"):
        rows.append(_row(f"baseline @ {reference.get('imgsz')} (loop reference)", "baseline", reference,
                         key="baseline_loop"))
    for it in inputs.iterations:
        rows.extend(_iteration_rows(it, steps))
    k = int(inputs.final["final_iteration"])
    rows.append(_row(_final_name(inputs.final), "final", inputs.final["record"], k))
    if inputs.control is not None:
        rows.append(_row(f"control (width x{inputs.control.get('width_multiple', float('nan')):.3f})",
                         "control", inputs.control))
    rows.extend(_int8_rows(inputs))
    rows.extend(_row(f"{r['model']} @ {r['imgsz']}", "sweep", r,
                     key=model_key("sweep", imgsz=r["imgsz"], model=r["model"])) for r in inputs.sweep)
    base = inputs.baseline.get("map50")
    for row in rows:
        row["delta_map50"] = None if row["map50"] is None or base is None else row["map50"] - base
        row.update(latency_fields(inputs, row["key"]))
    return rows


def significant(value: float, digits: int = 3) -> str:
    """``value`` to ``digits`` significant digits, trailing zeros kept (17.5, 3.20, 0.0412, 1,235)."""
    if value == 0:
        return "0"
    decimals = digits - 1 - math.floor(math.log10(abs(value)))
    rounded = round(value, decimals)
    decimals = digits - 1 - math.floor(math.log10(abs(rounded))) if rounded else decimals  # 9.996 -> 10.0
    return f"{rounded:,.{max(decimals, 0)}f}"


def format_value(value: Any, style: str) -> str:
    """``value`` for display: ``delta`` (signed), ``sig`` (3 significant digits), ``int``, or decimals."""
    if is_missing(value):
        return NA
    if style == "delta":
        return f"{round(float(value), 3) + 0.0:+.3f}"  # + 0.0 turns -0.0 into 0.0: no "-0.000"
    if style == "sig":
        return significant(float(value))
    if style == "int":
        return f"{int(value):,}"
    return f"{float(value):.{style}f}"


def format_latency(row: dict[str, Any]) -> str:
    """``median [q1-q3]`` in ms, or n/a."""
    if is_missing(row.get("latency_ms")):
        return NA
    return f"{format_value(row['latency_ms'], '2')} [{format_value(row['latency_q1_ms'], '2')}-" \
           f"{format_value(row['latency_q3_ms'], '2')}]"


def format_speedup(row: dict[str, Any]) -> str:
    """``2.82x [2.71-2.90]``: the median of the per-round ratios and their range, or n/a."""
    if is_missing(row.get("speedup")):
        return NA
    return f"{row['speedup']:.2f}x [{row['speedup_min']:.2f}-{row['speedup_max']:.2f}]"


def format_table(rows: list[dict[str, Any]], runtime_name: str = "ONNX Runtime CPU") -> Any:
    """The rows as a pandas DataFrame of display strings with the :func:`columns` of the report."""
    import pandas as pd

    cells = [[str(i), row["model"], format_value(row["map50"], "3"), format_value(row["delta_map50"], "delta"),
              format_value(row["map"], "3"), format_value(row["size_mb"], "2"), format_latency(row),
              format_speedup(row), format_value(row["gflops"], "sig"), format_value(row["params"], "int")]
             for i, row in enumerate(rows)]
    return pd.DataFrame(cells, columns=list(columns(runtime_name)))


def markdown_table(frame: Any) -> str:
    """GitHub markdown for a DataFrame of strings, every column right-aligned except ``model``.

    Written here rather than with ``DataFrame.to_markdown``: tabulate parses numeric-looking cells
    and would print ``+0.012`` as ``0.012``, and it is not a declared dependency.
    """
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    align = [":---" if c == "model" else "---:" for c in frame.columns]
    return "\n".join([line(frame.columns), line(align), *(line(r) for r in frame.itertuples(index=False))]) + "\n"
