"""Stage `report`: the comparison table, trade-off plots, channel plot, input-size sweep and a gallery
of boxes the final model misses, written to reports/ (summary.md and PNGs)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow

from flows.common import base_parser, run_entry
from slimloop.config import Params, load_params

METRICS = Path("metrics")
MODELS = Path("models")
OUT = Path("reports")


def publish_artifacts(table_rows: list[dict[str, Any]], markdown: str) -> bool:
    """Attach the comparison table and the summary to the current Prefect flow run.

    Args:
        table_rows: one dict per table row (column name -> display string).
        markdown: the text of ``summary.md`` (its image links are relative to reports/, so the UI
            shows them as links, not pictures).

    Returns:
        True if published; False outside a flow run (``report_flow.fn`` or a plain call), where
        there is nothing to attach them to.
    """
    from prefect.artifacts import create_markdown_artifact, create_table_artifact
    from prefect.context import FlowRunContext

    if FlowRunContext.get() is None:
        return False
    create_table_artifact(table=table_rows, key="slimloop-comparison",
                          description="slimloop: baseline, iterations, final model, control and input-size sweep")
    create_markdown_artifact(markdown=markdown, key="slimloop-report", description="slimloop report (summary.md)")
    return True


@flow(name="report", log_prints=True)
def report_flow(params: Params, metrics_dir: Path = METRICS, models_dir: Path = MODELS, out_dir: Path = OUT,
                progress: bool = False) -> dict[str, Any]:
    """Read the metrics and models of the earlier stages, write the report folder, publish artifacts."""
    from slimloop.report.inputs import load_inputs
    from slimloop.report.summary import write_report

    inputs = load_inputs(metrics_dir)
    checkpoints = (models_dir / "baseline" / "best.safetensors", models_dir / "compressed" / "final.safetensors")
    gammas = sorted((models_dir / "compressed").glob("gamma_iter_*.png"),
                    key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    report = write_report(inputs, out_dir, params.report, params.eval, Path(params.data.out_dir), checkpoints,
                          progress=progress, gamma_plots=gammas)
    published = publish_artifacts(report.table, report.markdown)
    return {"files": [str(p) for p in report.files], "rows": len(report.rows), "published": published}


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__)
    parser.add_argument("--metrics-dir", type=Path, default=METRICS,
                        help=f"reads baseline.json, final.json, iterations/, control.json, imgsz_sweep.json "
                             f"(default: {METRICS})")
    parser.add_argument("--models-dir", type=Path, default=MODELS,
                        help=f"reads baseline/best.safetensors and compressed/final.safetensors for the gallery "
                             f"(default: {MODELS})")
    parser.add_argument("--out", type=Path, default=OUT, help=f"report folder, replaced as a whole (default: {OUT})")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    result = report_flow.fn(params, args.metrics_dir, args.models_dir, args.out, progress=not args.quiet)
    print(f"report: {result['rows']} table rows, {len(result['files'])} files -> {args.out / 'summary.md'}")
    return 0


if __name__ == "__main__":
    run_entry(main)
