"""The report: comparison table, trade-off plots and a gallery of boxes the final model misses."""

from __future__ import annotations

import math
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slimloop.config import EvalParams, ReportParams
from slimloop.io import atomic_dir, read_stage_json, write_text_atomic

TABLE_STEPS = ("pruned", "padded", "retrained", "distilled", "final_retrain")
ALL_STEPS = ("sparse", *TABLE_STEPS)
ROW_KEYS = ("map50", "map", "size_mb", "latency_ms", "gflops", "params", "imgsz", "threads")
GAMMA_DIR = "gamma"  # the per-iteration |gamma| histograms, in a folder of their own
COLUMNS = ("index", "model", "mAP@0.5", "Δ mAP@0.5 vs baseline", "mAP@0.5:0.95", "size MB",
           "latency ms (ONNX Runtime CPU)", "GFLOPs", "params")
PLOTS = {"tradeoff.png": "Accuracy against cost", "pareto.png": "Pareto front (max mAP@0.5:0.95, min GFLOPs)",
         "channels.png": "Channels per layer", "imgsz_sweep.png": "Input-size sweep",
         "gallery.png": "Boxes the final model misses and the baseline finds"}
REASONS = {
    "target_reached": "every target in `target` was met",
    "tolerance_exceeded": "an iteration lost more mAP@0.5:0.95 than `compress.tolerance` allows and was rolled back",
    "max_iterations": "`compress.iterations` iterations ran",
}
NA = "n/a"


# ---- inputs ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReportInputs:
    """Everything the earlier stages measured. ``control`` is None when it was not run (``control_note`` says why)."""

    baseline: dict[str, Any]
    iterations: list[dict[str, Any]]
    final: dict[str, Any]
    control: dict[str, Any] | None
    control_note: str
    sweep: list[dict[str, Any]]


def _control(path: Path) -> tuple[dict[str, Any] | None, str]:
    if not path.exists():
        return None, f"{path} does not exist"
    record = read_stage_json(path, "control")
    if not record.get("enabled", True) or "map" not in record:
        return None, "`control.enabled` is false"
    return record, ""


def load_inputs(metrics_dir: Path) -> ReportInputs:
    """Read ``baseline.json``, ``iterations/iter_<k>.json``, ``final.json``, ``control.json`` and
    ``imgsz_sweep.json`` from ``metrics_dir``.

    Args:
        metrics_dir: the metrics folder the earlier stages wrote.

    Raises:
        ConfigError: ``baseline.json`` or ``final.json`` is missing, or any file present is unreadable.
    """
    metrics_dir = Path(metrics_dir)
    baseline = read_stage_json(metrics_dir / "baseline.json", "baseline")
    final = read_stage_json(metrics_dir / "final.json", "compress")
    files = sorted((metrics_dir / "iterations").glob("iter_*.json"), key=lambda p: int(p.stem.split("_")[1]))
    iterations = [read_stage_json(p, "compress") for p in files]
    sweep_path = metrics_dir / "imgsz_sweep.json"
    sweep = read_stage_json(sweep_path, "compress")["rows"] if sweep_path.exists() else []
    control, note = _control(metrics_dir / "control.json")
    return ReportInputs(baseline, iterations, final, control, note, sweep)


# ---- the table ---------------------------------------------------------------------------------


def _row(model: str, kind: str, record: dict[str, Any], iteration: int | None = None,
         step: str | None = None) -> dict[str, Any]:
    return {"model": model, "kind": kind, "iteration": iteration, "step": step,
            **{k: record.get(k) for k in ROW_KEYS}}


def _iteration_rows(it: dict[str, Any], steps: Sequence[str]) -> list[dict[str, Any]]:
    k = it["iteration"]
    tag = "" if it.get("accepted", True) else " (rolled back)"
    return [_row(f"iter {k} {step}{tag}", "iteration", it["steps"][step], k, step)
            for step in steps if it["steps"].get(step)]


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
        rows.append(_row(f"baseline @ {reference.get('imgsz')} (loop reference)", "baseline", reference))
    for it in inputs.iterations:
        rows.extend(_iteration_rows(it, steps))
    k = int(inputs.final["final_iteration"])
    rows.append(_row(_final_name(inputs.final), "final", inputs.final["record"], k))
    if inputs.control is not None:
        rows.append(_row(f"control (width x{inputs.control.get('width_multiple', float('nan')):.3f})",
                         "control", inputs.control))
    rows.extend(_row(f"{r['model']} @ {r['imgsz']}", "sweep", r) for r in inputs.sweep)
    base = inputs.baseline.get("map50")
    for row in rows:
        row["delta_map50"] = None if row["map50"] is None or base is None else row["map50"] - base
    return rows


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def significant(value: float, digits: int = 3) -> str:
    """``value`` to ``digits`` significant digits, trailing zeros kept (17.5, 3.20, 0.0412, 1,235)."""
    if value == 0:
        return "0"
    decimals = digits - 1 - math.floor(math.log10(abs(value)))
    rounded = round(value, decimals)
    decimals = digits - 1 - math.floor(math.log10(abs(rounded))) if rounded else decimals  # 9.996 -> 10.0
    return f"{rounded:,.{max(decimals, 0)}f}"


def _fmt(value: Any, style: str) -> str:
    if _missing(value):
        return NA
    if style == "delta":
        return f"{round(float(value), 3) + 0.0:+.3f}"  # + 0.0 turns -0.0 into 0.0: no "-0.000"
    if style == "sig":
        return significant(float(value))
    if style == "int":
        return f"{int(value):,}"
    return f"{float(value):.{style}f}"


def format_table(rows: list[dict[str, Any]]) -> Any:
    """The rows as a pandas DataFrame of display strings with the ``COLUMNS`` of the report."""
    import pandas as pd

    cells = [[str(i), row["model"], _fmt(row["map50"], "3"), _fmt(row["delta_map50"], "delta"),
              _fmt(row["map"], "3"), _fmt(row["size_mb"], "2"), _fmt(row["latency_ms"], "2"),
              _fmt(row["gflops"], "sig"), _fmt(row["params"], "int")] for i, row in enumerate(rows)]
    return pd.DataFrame(cells, columns=list(COLUMNS))


def markdown_table(frame: Any) -> str:
    """GitHub markdown for a DataFrame of strings, every column right-aligned except ``model``.

    Written here rather than with ``DataFrame.to_markdown``: tabulate parses numeric-looking cells
    and would print ``+0.012`` as ``0.012``, and it is not a declared dependency.
    """
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    align = [":---" if c == "model" else "---:" for c in frame.columns]
    return "\n".join([line(frame.columns), line(align), *(line(r) for r in frame.itertuples(index=False))]) + "\n"


# ---- the Pareto front --------------------------------------------------------------------------


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


# ---- the text ----------------------------------------------------------------------------------


def _negate(value: Any) -> Any:
    return None if _missing(value) else -float(value)


def _stop_text(final: dict[str, Any], final_checkpoint: Path | None = None) -> str:
    k, reason = int(final["final_iteration"]), final.get("reason")
    which = (f"**iteration {k}**" if k else "**the baseline** (no iteration was accepted)")
    why = REASONS.get(reason, "the loop recorded no stop reason") if reason else "the loop recorded no stop reason"
    accepted = ", ".join(str(a) for a in final.get("accepted", [])) or "none"
    trained = f"`{final.get('checkpoint', NA)}`"
    where = f"`{final_checkpoint}` (a copy of {trained})" if final_checkpoint else trained
    return (f"The final model is {which}, {where}. The loop stopped after "
            f"{final.get('iterations_run', NA)} iteration(s) because {why} (`{reason}`). Accepted iterations: "
            f"{accepted}. mAP@0.5:0.95 against the baseline: {_fmt(_negate(final.get('map_drop')), 'delta')}. "
            f"Epochs: {final.get('epochs_to_final', NA)} to the final model, {final.get('epochs_total', NA)} in all."
            f"{_final_retrain_text(final)}")


def _final_retrain_text(final: dict[str, Any]) -> str:
    again = final.get("final_retrain")
    if not again:
        return ""
    how = ("its pruned and padded structure was trained again from random weights (plan C)"
           if again["mode"] == "scratch" else "its weights were trained further")
    loop = final.get("loop_record") or {}
    return (f" After the loop {how} for {again['epochs']} epochs (`compress.final_retrain: {again['mode']}`): "
            f"mAP@0.5:0.95 {_fmt(loop.get('map'), '3')} at the end of the loop, "
            f"{_fmt(final['record'].get('map'), '3')} after it.")


def _measure_text(inputs: ReportInputs, rows: list[dict[str, Any]]) -> str:
    threads = sorted({int(r["threads"]) for r in rows if not _missing(r["threads"])})
    shown = "/".join(str(t) for t in threads) or NA
    b = inputs.baseline
    return (f"Latency is the median batch-1 ONNX Runtime run on the CPU with {shown} thread(s) "
            f"(torch eager: {_fmt(b.get('latency_torch_ms'), '2')} ms for the baseline). Models were evaluated "
            f"on device `{b.get('device', NA)}`; mAP comes from pycocotools on the `{b.get('split', 'val')}` split. "
            f"Δ mAP@0.5 is against the baseline row (index 0).")


def _control_text(inputs: ReportInputs) -> str:
    c = inputs.control
    if c is None:
        return f"The control was not run: {inputs.control_note}."
    gap = float(inputs.final["record"]["map"]) - float(c["map"])
    fits = "" if c.get("fits", True) else " (even the narrowest width is over the target)"
    verdict = "beats" if gap > 0 else "does not beat"
    return (f"Control: YOLOv5 scaled uniformly to width x{_fmt(c.get('width_multiple'), '3')}{fits}, "
            f"{_fmt(c.get('gflops'), 'sig')} GFLOPs against a target of {_fmt(c.get('target_gflops'), 'sig')}, "
            f"trained from scratch for {c.get('epochs', NA)} epochs. The compressed model {verdict} it: "
            f"mAP@0.5:0.95 {_fmt(inputs.final['record']['map'], '3')} vs {_fmt(c['map'], '3')} "
            f"({_fmt(gap, 'delta')}).")


def summary_markdown(inputs: ReportInputs, rows: list[dict[str, Any]], table: str,
                     final_checkpoint: Path | None = None) -> str:
    """``reports/summary.md``: the stop decision, how latency was measured, the table, control and plots.

    ``final_checkpoint``: the final model's file in the pipeline's outs, named before the step-store
    path it was copied from.
    """
    plots = "\n".join(f"### {title}\n\n![{name[:-4]}]({name})\n" for name, title in PLOTS.items())
    return (f"# slimloop report\n\n{_stop_text(inputs.final, final_checkpoint)}\n\n{_measure_text(inputs, rows)}\n\n"
            f"## Comparison\n\n{table}\n{_control_text(inputs)}\n\n## Plots\n\n{plots}")


# ---- writing it all ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Report:
    """What :func:`write_report` produced: numeric rows, display rows, the markdown and the files."""

    rows: list[dict[str, Any]]
    table: list[dict[str, str]]
    markdown: str
    files: list[Path]


def write_report(inputs: ReportInputs, out_dir: Path, report: ReportParams, eval_params: EvalParams,
                 data_root: Path, checkpoints: tuple[Path, Path], progress: bool = False,
                 gamma_plots: Sequence[Path] = ()) -> Report:
    """Build ``summary.md`` and the PNGs of ``PLOTS`` in a fresh ``out_dir`` (swapped in atomically).

    Args:
        inputs: the loaded metrics (:func:`load_inputs`).
        out_dir: the report folder; replaced as a whole only once everything is written.
        report: ``gallery`` (images in the gallery; 0 skips loading models) and ``dpi``.
        eval_params: NMS settings and the operating point (``op_conf``, ``op_iou``) of the gallery.
        data_root: canonical dataset folder (its val split feeds the gallery).
        checkpoints: ``(baseline, final)`` checkpoint files.
        progress: progress bars while predicting for the gallery.
        gamma_plots: the loop's |gamma| histograms (``gamma_iter_<k>.png``), copied into
            ``out_dir/gamma/`` (one folder, so DVC's plots list names it whatever the number of
            iterations) and shown after the other plots.

    Raises:
        CheckpointError, DataError: a checkpoint or the val split cannot be read (gallery only).
    """
    from slimloop.report_plots import (
        find_regressions,
        plot_channels,
        plot_gallery,
        plot_imgsz_sweep,
        plot_pareto,
        plot_tradeoff,
    )

    rows = comparison_rows(inputs)
    frame = format_table(rows)
    markdown = summary_markdown(inputs, rows, markdown_table(frame), final_checkpoint=Path(checkpoints[1]))
    gamma_plots = [Path(p) for p in gamma_plots]
    if gamma_plots:
        markdown += "\n### |gamma| during sparse training, per iteration\n\n" + "".join(
            f"![{p.stem}]({GAMMA_DIR}/{p.name})\n" for p in gamma_plots)
    every = comparison_rows(inputs, ALL_STEPS)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        write_text_atomic(tmp / "summary.md", markdown)
        plot_tradeoff(every, tmp / "tradeoff.png", report.dpi)
        plot_pareto(every, tmp / "pareto.png", report.dpi)
        plot_channels(inputs.iterations, tmp / "channels.png", report.dpi)
        plot_imgsz_sweep(inputs.sweep, tmp / "imgsz_sweep.png", report.dpi)
        items = (find_regressions(checkpoints, inputs, data_root, eval_params, report.gallery, progress)
                 if report.gallery else None)
        plot_gallery(items, eval_params, tmp / "gallery.png", report.dpi)
        if gamma_plots:
            (tmp / GAMMA_DIR).mkdir()
        for path in gamma_plots:
            shutil.copyfile(path, tmp / GAMMA_DIR / path.name)
    files = [out_dir / "summary.md", *(out_dir / name for name in PLOTS), *(out_dir / GAMMA_DIR / p.name for p in gamma_plots)]
    return Report(rows, frame.to_dict("records"), markdown, files)
