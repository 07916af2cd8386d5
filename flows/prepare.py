"""Stage `prepare`: build the canonical dataset (synthetic or imported), its stats and pictures."""

from __future__ import annotations

import sys
from pathlib import Path

from prefect import flow

from flows.common import base_parser, run_entry
from slimloop.config import DataParams, load_params
from slimloop.io import write_json_atomic
from slimloop.provenance import with_env

METRICS = Path("metrics/data.json")
PLOTS = Path("plots/data")


@flow(name="prepare", log_prints=True)
def prepare_flow(
    data: DataParams, progress: bool = True, metrics: Path = METRICS, plots: Path = PLOTS
) -> dict:
    """Write the canonical dataset to ``data.out_dir``, its stats to ``metrics`` and two pictures."""
    from slimloop.data.prepare import prepare_dataset
    from slimloop.data.stats import dataset_stats, plot_box_sizes, plot_samples

    summary = prepare_dataset(data, Path.cwd(), progress=progress)
    stats = dataset_stats(data.out_dir)
    stats["source"] = data.source
    stats["skipped"] = summary.get("skipped", 0)
    stats["dropped"] = summary.get("dropped", 0)
    stats["invalid_report"] = summary.get("report")
    stats["warnings"] = summary.get("warnings", [])
    write_json_atomic(metrics, with_env(stats))
    plot_samples(data.out_dir, "train", plots / "samples.png", seed=data.seed)
    plot_box_sizes(data.out_dir, plots / "box_sizes.png")
    return stats


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__)
    parser.add_argument("--metrics", type=Path, default=METRICS, help=f"stats file (default: {METRICS})")
    parser.add_argument("--plots", type=Path, default=PLOTS, help=f"picture folder (default: {PLOTS})")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    stats = prepare_flow.fn(params.data, progress=not args.quiet, metrics=args.metrics, plots=args.plots)
    for w in stats["warnings"]:
        where = w["file"] if w["line"] is None else f"{w['file']}:{w['line']}"
        print(f"warning: {where}: {w['message']}", file=sys.stderr)
    counts = ", ".join(f"{s}: {v['images']} images / {v['boxes']} boxes" for s, v in stats["splits"].items())
    print(f"prepared {params.data.out_dir} ({counts}); stats in {args.metrics}")
    if stats["skipped"] or stats["dropped"]:
        print(f"skipped {stats['skipped']} invalid image(s) and {stats['dropped']} record(s) that belong to no "
              f"image (data.skip_invalid: true); each is listed with its problems in {stats['invalid_report']}")
    if stats["warnings"]:
        print(f"{len(stats['warnings'])} warning(s) above, also in {args.metrics} (warnings)")
    return 0


if __name__ == "__main__":
    run_entry(main)
