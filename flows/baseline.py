"""Stage `baseline`: train the default spec or import a yolov5 model; evaluate, profile, export ONNX."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from flows.common import base_parser, run_entry
from flows.launch import distributed_job, flow_in_processes, relaunch
from slimloop.config import Params, load_params
from slimloop.io import write_json_atomic
from slimloop.provenance import with_env

OUT = Path("models/baseline")
METRICS = Path("metrics/baseline.json")


@flow(name="baseline", log_prints=True)
def baseline_flow(params: Params, out_dir: Path = OUT, metrics: Path = METRICS, progress: bool = True) -> dict:
    """Train (or import) the baseline detector and write its checkpoint, spec, ONNX file and metrics.

    With ``train.nproc`` above 1 (outside torchrun) it runs as that many processes.
    """
    from slimloop.baseline import import_checkpoint, initial_spec, train_and_measure

    relaunched = flow_in_processes("flows.baseline", params, ["--out", str(out_dir), "--metrics", str(metrics),
                                                              *([] if progress else ["--quiet"])], metrics)
    if relaunched is not None:
        return relaunched

    if params.model.checkpoint:
        start, facts = import_checkpoint(params)
        record = train_and_measure(start.spec, params, out_dir, progress=progress, stage="baseline",
                                   start=start, start_info=facts["imported"])
        extra = facts
    else:
        spec, anchor_info = initial_spec(params)
        record = train_and_measure(spec, params, out_dir, progress=progress, stage="baseline")
        extra = {"anchors": anchor_info}
    if record is None:  # a rank other than 0 under torchrun: it trained, rank 0 writes
        return {}
    record.update(extra)
    write_json_atomic(metrics, with_env(record))
    return record


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__)
    parser.add_argument("--out", type=Path, default=OUT, help=f"output folder (default: {OUT})")
    parser.add_argument("--metrics", type=Path, default=METRICS, help=f"metrics file (default: {METRICS})")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    code = relaunch("flows.baseline", argv, params.train)
    if code is not None:
        return code
    with distributed_job(params.train) as main:
        rec = baseline_flow.fn(params, args.out, args.metrics, progress=not args.quiet)
    if not main:
        return 0
    print(
        f"baseline: mAP@0.5 {rec['map50']:.3f}  mAP@0.5:0.95 {rec['map']:.3f}  "
        f"{rec['gflops']:.2f} GFLOPs  {rec['params']:,} params  ORT {rec['latency_quick_ms']:.2f} ms (quick reading)  -> {args.metrics}"
    )
    return 0


if __name__ == "__main__":
    run_entry(main)
