"""The report's pictures: trade-off, Pareto front, channels per layer, input-size sweep, and the
|gamma| histograms of sparse training."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from slimloop.report.inputs import is_missing, pareto_front

STEP_MARKERS = {"sparse": "v", "pruned": "x", "padded": "s", "retrained": "o", "distilled": "D", "final_retrain": "^"}
MARKS = {"baseline": dict(marker="*", s=180, color="black", zorder=5),
         "final": dict(marker="o", s=220, facecolors="none", edgecolors="red", linewidths=2, zorder=6),
         "control": dict(marker="P", s=120, color="green", zorder=5)}
KIND_COLOURS = {"baseline": "black", "iteration": "C0", "control": "green", "sweep": "C1"}


def figure(width: float, height: float, nrows: int = 1, ncols: int = 1) -> tuple[Any, np.ndarray]:
    """A pyplot-free Figure (no global state) and its ``(nrows, ncols)`` array of axes."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def draw_gamma_histograms(rows: list[dict[str, Any]], path: Path) -> Path:
    """One PNG with a |gamma| histogram line per epoch of sparse training (log count axis); the
    epochs are told apart by a colour bar, so any number of them leaves the plot readable."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.ticker import MaxNLocator

    from slimloop.io import atomic_path

    fig, axes = figure(7, 4)
    ax, cmap = axes[0, 0], colormaps["viridis"]
    epochs = [row["epoch"] for row in rows] or [0]
    norm = Normalize(min(epochs), max(max(epochs), min(epochs) + 1))
    for row in rows:
        ax.stairs(row["counts"], row["edges"], color=cmap(norm(row["epoch"])))
    ax.set_yscale("symlog", linthresh=1)
    ax.set(xlabel="|gamma| (BN scale)", ylabel="channels", title="BN gamma during sparse training")
    fig.colorbar(ScalarMappable(norm, cmap), ax=ax, label="epoch (0 = before)", ticks=MaxNLocator(integer=True))
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return Path(path)


def message_figure(text: str, path: Path, dpi: int) -> None:
    """A PNG that only says ``text`` (a plot with nothing to show)."""
    fig, axes = figure(7, 2.2)
    axes[0, 0].axis("off")
    axes[0, 0].text(0.5, 0.5, text, ha="center", va="center", fontsize=11)
    fig.savefig(path, dpi=dpi)


def _usable(rows: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    return [r for r in rows if not is_missing(r[key]) and not is_missing(r["map"])]


def _tradeoff_panel(ax: Any, rows: list[dict[str, Any]], key: str) -> None:
    steps = [r for r in _usable(rows, key) if r["kind"] == "iteration"]
    for n, k in enumerate(sorted({r["iteration"] for r in steps})):
        pts, colour = [r for r in steps if r["iteration"] == k], f"C{n % 10}"
        ax.plot([r[key] for r in pts], [r["map"] for r in pts], "-", color=colour, alpha=0.4, label=f"iteration {k}")
        for r in pts:
            ax.scatter(r[key], r["map"], marker=STEP_MARKERS.get(r["step"], "o"), color=colour, s=28)
            ax.annotate(f"{k}:{r['step']}", (r[key], r["map"]), xytext=(3, 3), textcoords="offset points", fontsize=6)
    for r in _usable(rows, key):
        if r["kind"] in MARKS:
            ax.scatter(r[key], r["map"], label=r["model"], **MARKS[r["kind"]])


def plot_tradeoff(rows: list[dict[str, Any]], path: Path, dpi: int, runtime_name: str = "ONNX Runtime CPU") -> None:
    """mAP@0.5:0.95 against GFLOPs and against the side-by-side latency: each iteration's steps joined in
    order and labelled ``<iteration>:<step>``; baseline, final model and control marked (sweep rows left out)."""
    fig, axes = figure(13, 5.5, 1, 2)
    for ax, key, label in zip(axes[0], ("gflops", "latency_ms"), ("GFLOPs", f"latency ms ({runtime_name}, median)"),
                              strict=True):
        _tradeoff_panel(ax, rows, key)
        ax.set(xlabel=label, ylabel="mAP@0.5:0.95")
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    fig.savefig(path, dpi=dpi)


def plot_pareto(rows: list[dict[str, Any]], path: Path, dpi: int) -> None:
    """Every evaluated model (all steps, control, sweep) in GFLOPs / mAP@0.5:0.95, the front drawn and named."""
    pts = [r for r in _usable(rows, "gflops") if r["kind"] not in ("final", "int8")]  # final repeats a row
    fig, axes = figure(9, 6)
    ax = axes[0, 0]
    for kind, colour in KIND_COLOURS.items():
        sel = [r for r in pts if r["kind"] == kind]
        if sel:
            ax.scatter([r["gflops"] for r in sel], [r["map"] for r in sel], color=colour, s=22, alpha=0.7, label=kind)
    front = [pts[i] for i in pareto_front([(r["gflops"], r["map"]) for r in pts])]
    if front:
        ax.plot([r["gflops"] for r in front], [r["map"] for r in front], "-", drawstyle="steps-post", color="red",
                lw=1.5, label="Pareto front")
    for r in front:
        ax.annotate(r["model"], (r["gflops"], r["map"]), xytext=(4, -8), textcoords="offset points", fontsize=6)
    for r in _usable(rows, "gflops"):
        if r["kind"] == "final":
            ax.scatter(r["gflops"], r["map"], label=r["model"], **MARKS["final"])
    costs = [r["gflops"] for r in pts if r["gflops"] > 0]
    if costs and max(costs) > 10 * min(costs):
        ax.set_xscale("log")
    ax.set(xlabel="GFLOPs", ylabel="mAP@0.5:0.95")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=dpi)


def plot_channels(iterations: list[dict[str, Any]], path: Path, dpi: int) -> None:
    """Output channels of every conv layer before pruning, after pruning and after padding, one panel
    per iteration (overlaid bars: the narrower bar is the later step)."""
    its = [it for it in iterations if it.get("widths")]
    if not its:
        message_figure("No per-layer widths recorded (metrics/iterations/iter_<k>.json has no `widths`).", path, dpi)
        return
    n_layers = max(len(it["widths"]["before"]) for it in its)
    fig, axes = figure(max(9.0, 0.17 * n_layers), 2.4 * len(its) + 1.2, len(its), 1)
    bars = (("before", 0.85, "0.75", "before prune"), ("padded", 0.55, "C0", "after pad"),
            ("pruned", 0.3, "C3", "after prune"))
    for row, (ax, it) in enumerate(zip(axes[:, 0], its, strict=True)):
        w = it["widths"]
        names, x = list(w["before"]), np.arange(len(w["before"]))
        for key, width, colour, label in bars:
            ax.bar(x, [w[key].get(n, 0) for n in names], width, color=colour, label=label)
        totals = " -> ".join(f"{sum(w[key].values()):,}" for key in ("before", "pruned", "padded"))
        ax.set_title(f"iteration {it['iteration']}: {totals} channels (before -> pruned -> padded)", fontsize=9)
        ax.set_xticks(x, names if row == len(its) - 1 else [""] * len(names), rotation=90, fontsize=5)
        ax.set_xlim(-0.6, len(x) - 0.4)
        ax.set_ylabel("out channels")
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].legend(fontsize=7, loc="upper left")
    fig.savefig(path, dpi=dpi)


def plot_imgsz_sweep(sweep: list[dict[str, Any]], path: Path, dpi: int, runtime_name: str = "ONNX Runtime CPU") -> None:
    """mAP (solid: @0.5:0.95, dashed: @0.5) and the side-by-side latency against input size, one line per model."""
    if not sweep:
        message_figure("No input-size sweep recorded (metrics/imgsz_sweep.json is missing or empty).", path, dpi)
        return
    fig, axes = figure(12, 4.5, 1, 2)
    for n, model in enumerate(dict.fromkeys(r["model"] for r in sweep)):
        sel = sorted((r for r in sweep if r["model"] == model), key=lambda r: r["imgsz"])
        x, colour = [r["imgsz"] for r in sel], f"C{n % 10}"
        axes[0, 0].plot(x, [r["map"] for r in sel], "o-", color=colour, label=f"{model} mAP@0.5:0.95")
        axes[0, 0].plot(x, [r["map50"] for r in sel], "s--", color=colour, label=f"{model} mAP@0.5")
        lat = [(r["imgsz"], r["latency_ms"]) for r in sel if not is_missing(r.get("latency_ms"))]
        axes[0, 1].plot([s for s, _ in lat], [v for _, v in lat], "o-", color=colour, label=model)
    sizes = sorted({r["imgsz"] for r in sweep})
    for ax, label in zip(axes[0], ("mAP", f"latency ms ({runtime_name}, median)"), strict=True):
        ax.set(xlabel="input size (px)", ylabel=label, xticks=sizes)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.savefig(path, dpi=dpi)
