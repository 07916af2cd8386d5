"""reports/summary.md: the stop decision, how latency was measured, the table, the control, and
every picture, written together into a fresh report folder."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slimloop.compress.decide import REASONS
from slimloop.config import EvalParams, ReportParams
from slimloop.deploy.catalogue import model_key
from slimloop.io import atomic_dir, write_text_atomic
from slimloop.report.gallery import find_regressions, plot_gallery
from slimloop.report.inputs import ReportInputs, is_missing
from slimloop.report.plots import plot_channels, plot_imgsz_sweep, plot_pareto, plot_tradeoff
from slimloop.report.speed import int8_text, measure_text, pad_auto_text, runtimes_text
from slimloop.report.tables import (
    ALL_STEPS,
    NA,
    comparison_rows,
    format_table,
    format_value,
    latency_fields,
    markdown_table,
)

GAMMA_DIR = "gamma"  # the per-iteration |gamma| histograms, in a folder of their own
LATENCY_CSV = "latency.csv"  # every row's mAP, GFLOPs and side-by-side latency: dvc.yaml's map_vs_latency plot
PLOTS = {"tradeoff.png": "Accuracy against cost", "pareto.png": "Pareto front (max mAP@0.5:0.95, min GFLOPs)",
         "channels.png": "Channels per layer", "imgsz_sweep.png": "Input-size sweep",
         "gallery.png": "Boxes the final model misses and the baseline finds"}


def _negate(value: Any) -> Any:
    return None if is_missing(value) else -float(value)


def _ratio(value: Any, base: Any) -> str:
    return NA if is_missing(value) or is_missing(base) or not float(base) else f"{float(value) / float(base):.3f}x"


def headline(final: dict[str, Any]) -> str:
    """The report's first line: what the loop delivered against the baseline, or that it could not."""
    rec, base = final["record"], final["baseline"]
    if final.get("reason") == "cannot_compress" or int(final["final_iteration"]) == 0:
        tries = final.get("first_attempts") or []
        tried = "; ".join(f"ratio {a['ratio']:g} kept {100 * a['retention']:.0f}% (mAP@0.5:0.95 {a['map']:.3f})"
                          for a in tries) or "no attempt recorded"
        return (f"**The loop could not compress this model**: every cut of the first iteration lost too much "
                f"after its finetune ({tried}; the baseline has {format_value(base.get('map'), '3')}, and a cut "
                f"must keep `compress.min_retention` of it). The final model is the baseline, unchanged.")
    met = final.get("tolerance_met")
    verdict = ("" if met is None else f", within the tolerance of {final.get('tolerance'):g}" if met
               else f", **more than the tolerance of {final.get('tolerance'):g} below it**")
    return (f"**Final model: {_ratio(rec.get('gflops'), base.get('gflops'))} the baseline's GFLOPs, "
            f"{_ratio(rec.get('params'), base.get('params'))} its parameters, mAP@0.5:0.95 "
            f"{format_value(rec.get('map'), '3')} against {format_value(base.get('map'), '3')} "
            f"({format_value(_negate(final.get('map_drop')), 'delta')}){verdict}.**")


def _landing(attempt: dict[str, Any]) -> str:
    if attempt.get("reached"):
        return " (more than a step, to reach the target: `compress.reach`)"
    return " (landed on the target)" if attempt.get("landed") else ""


def iteration_text(iterations: list[dict[str, Any]]) -> str:
    """One line per iteration: its cut (and retries), what the finetune kept, how sparse the cut was."""
    lines = []
    for it in iterations:
        tries = it.get("attempts") or []
        pruned = it["steps"].get("pruned") or {}
        below = pruned.get("cut_gamma_below_1e-2")
        how = ", ".join(f"{a['ratio']:.3g}{_landing(a)} -> "
                        f"{100 * a['retention']:.0f}% {'accepted' if a['accepted'] else 'rejected'}" for a in tries)
        sparse = ("" if below is None else
                  f"; {100 * below:.0f}% of the cut channels had |gamma| below 1e-2 after sparse training")
        lines.append(f"- iteration {it['iteration']}: cut {how or NA} of its parent's mAP@0.5:0.95{sparse}.")
    return "\n".join(lines)


def _stop_text(final: dict[str, Any], final_checkpoint: Path | None = None) -> str:
    k, reason = int(final["final_iteration"]), final.get("reason")
    which = (f"**iteration {k}**" if k else "**the baseline** (no iteration was accepted)")
    why = REASONS.get(reason, "the loop recorded no stop reason") if reason else "the loop recorded no stop reason"
    accepted = ", ".join(str(a) for a in final.get("accepted", [])) or "none"
    trained = f"`{final.get('checkpoint', NA)}`"
    where = f"`{final_checkpoint}` (a copy of {trained})" if final_checkpoint else trained
    return (f"The final model is {which}, {where}. The loop stopped after "
            f"{final.get('iterations_run', NA)} iteration(s) because {why} (`{reason}`). Accepted iterations: "
            f"{accepted}. mAP@0.5:0.95 against the baseline: "
            f"{format_value(_negate(final.get('map_drop')), 'delta')}. "
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
            f"mAP@0.5:0.95 {format_value(loop.get('map'), '3')} at the end of the loop, "
            f"{format_value(final['record'].get('map'), '3')} after it.")


def _control_text(inputs: ReportInputs) -> str:
    c = inputs.control
    if c is None:
        return f"The control was not run: {inputs.control_note}."
    gap = float(inputs.final["record"]["map"]) - float(c["map"])
    fits = "" if c.get("fits", True) else " (even the narrowest width is over the target)"
    verdict = "beats" if gap > 0 else "does not beat"
    return (f"Control: YOLOv5 scaled uniformly to width x{format_value(c.get('width_multiple'), '3')}{fits}, "
            f"{format_value(c.get('gflops'), 'sig')} GFLOPs against a target of "
            f"{format_value(c.get('target_gflops'), 'sig')}, "
            f"trained from scratch for {c.get('epochs', NA)} epochs. The compressed model {verdict} it: "
            f"mAP@0.5:0.95 {format_value(inputs.final['record']['map'], '3')} vs {format_value(c['map'], '3')} "
            f"({format_value(gap, 'delta')}).")


def summary_markdown(inputs: ReportInputs, rows: list[dict[str, Any]], table: str,
                     final_checkpoint: Path | None = None) -> str:
    """``reports/summary.md``: the stop decision, how latency was measured, the table, control and plots.

    ``final_checkpoint``: the final model's file in the pipeline's outs, named before the step-store
    path it was copied from.
    """
    plots = "\n".join(f"### {title}\n\n![{name[:-4]}]({name})\n" for name, title in PLOTS.items())
    steps = iteration_text(inputs.iterations)
    speed = "\n".join(part for part in (runtimes_text(inputs), pad_auto_text(inputs), int8_text(inputs)) if part)
    return (f"# slimloop report\n\n{headline(inputs.final)}\n\n{_stop_text(inputs.final, final_checkpoint)}\n\n"
            f"{steps + chr(10) + chr(10) if steps else ''}{measure_text(inputs)}\n\n"
            f"## Comparison\n\n{table}\n{_control_text(inputs)}\n\n"
            + (f"## Speed\n\n{speed}\n" if speed else "") + f"## Plots\n\n{plots}")

def latency_csv(rows: list[dict[str, Any]]) -> str:
    """One line per measured row: model, kind, mAP, GFLOPs and the side-by-side latency and speed-up."""
    import pandas as pd

    keys = ("model", "key", "kind", "map", "map50", "gflops", "latency_ms", "latency_q1_ms", "latency_q3_ms",
            "speedup", "speedup_min", "speedup_max")
    return pd.DataFrame([{k: r.get(k) for k in keys} for r in rows if not is_missing(r.get("latency_ms"))],
                        columns=list(keys)).to_csv(index=False)



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
    rows = comparison_rows(inputs)
    runtime = (inputs.latency or {}).get("runtime_name", "ONNX Runtime CPU")
    frame = format_table(rows, runtime)
    markdown = summary_markdown(inputs, rows, markdown_table(frame), final_checkpoint=Path(checkpoints[1]))
    gamma_plots = [Path(p) for p in gamma_plots]
    if gamma_plots:
        markdown += "\n### |gamma| during sparse training, per iteration\n\n" + "".join(
            f"![{p.stem}]({GAMMA_DIR}/{p.name})\n" for p in gamma_plots)
    every = comparison_rows(inputs, ALL_STEPS)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        write_text_atomic(tmp / "summary.md", markdown)
        write_text_atomic(tmp / LATENCY_CSV, latency_csv(every))
        plot_tradeoff(every, tmp / "tradeoff.png", report.dpi, runtime)
        plot_pareto(every, tmp / "pareto.png", report.dpi)
        plot_channels(inputs.iterations, tmp / "channels.png", report.dpi)
        sweep = [{**r, "latency_ms": latency_fields(inputs, model_key("sweep", imgsz=r["imgsz"], model=r["model"]))
                  ["latency_ms"]} for r in inputs.sweep]
        plot_imgsz_sweep(sweep, tmp / "imgsz_sweep.png", report.dpi, runtime)
        items = (find_regressions(checkpoints, inputs, data_root, eval_params, report.gallery, progress)
                 if report.gallery else None)
        plot_gallery(items, eval_params, tmp / "gallery.png", report.dpi)
        if gamma_plots:
            (tmp / GAMMA_DIR).mkdir()
        for path in gamma_plots:
            shutil.copyfile(path, tmp / GAMMA_DIR / path.name)
    files = [out_dir / "summary.md", out_dir / LATENCY_CSV, *(out_dir / name for name in PLOTS), *(out_dir / GAMMA_DIR / p.name for p in gamma_plots)]
    return Report(rows, frame.to_dict("records"), markdown, files)
