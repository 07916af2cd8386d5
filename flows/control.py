"""Stage `control`: YOLOv5 scaled uniformly in width to the final model's GFLOPs, trained from scratch
with the same epoch budget as the baseline plus the loop, measured like every other model."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from flows.common import base_parser, run_entry
from flows.launch import distributed_job, flow_in_processes, relaunch
from slimloop.config import Params, load_params
from slimloop.io import read_stage_json, write_json_atomic
from slimloop.provenance import with_env
from slimloop.records import ControlTarget

BASELINE = Path("models/baseline")
OUT = Path("models/control")
METRICS = Path("metrics")


def control_epochs(params: Params, final: dict) -> int:
    """``control.epochs``, or the baseline's epochs plus the loop's epochs on the way to the final model."""
    if params.control.epochs is not None:
        return params.control.epochs
    return params.train.epochs + int(final.get("epochs_to_final", 0))


@flow(name="control", log_prints=True)
def control_flow(params: Params, baseline_dir: Path = BASELINE, out_dir: Path = OUT,
                 metrics_dir: Path = METRICS, progress: bool = True) -> dict:
    """Train and measure the control; write ``metrics_dir/control.json`` (as ``train.nproc`` processes
    when above 1, outside torchrun)."""
    from slimloop.compress.control import train_control
    from slimloop.deploy.catalogue import export_catalogue
    from slimloop.distributed import is_main_process

    metrics = metrics_dir / "control.json"
    if not params.control.enabled:
        record = {"enabled": False}
        if is_main_process():
            write_json_atomic(metrics, with_env(record))
        return record
    relaunched = flow_in_processes("flows.control", params, [
        "--baseline", str(baseline_dir), "--out", str(out_dir), "--metrics-dir", str(metrics_dir),
        *([] if progress else ["--quiet"])], metrics)
    if relaunched is not None:  # train.nproc > 1: the job above wrote it
        return relaunched
    final = read_stage_json(metrics_dir / "final.json", "compress", ControlTarget)
    target = float(final["record"]["gflops"])
    imgsz = int(final["record"].get("imgsz") or params.compress.imgsz or params.train.imgsz)
    record = train_control(baseline_dir / "best.safetensors", target, imgsz, params, control_epochs(params, final),
                           Path(params.data.out_dir), out_dir, progress=progress)
    if record is None:  # a rank other than 0 under torchrun: it trained, rank 0 writes
        return {"enabled": True, "rank": "not 0"}
    record = {"enabled": True, **record}
    export_catalogue([("control", Path(record["checkpoint"]), imgsz)], out_dir / "onnx", "control")
    write_json_atomic(metrics, with_env(record))
    return record


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__)
    parser.add_argument("--baseline", type=Path, default=BASELINE, help=f"baseline folder (default: {BASELINE})")
    parser.add_argument("--out", type=Path, default=OUT, help=f"control training folder (default: {OUT})")
    parser.add_argument("--metrics-dir", type=Path, default=METRICS,
                        help=f"reads final.json, writes control.json (default: {METRICS})")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    code = relaunch("flows.control", argv, params.train)
    if code is not None:
        return code
    with distributed_job(params.train) as main:
        rec = control_flow.fn(params, args.baseline, args.out, args.metrics_dir, progress=not args.quiet)
    if not main:
        return 0
    if not rec["enabled"]:
        print(f"control: disabled (control.enabled: false) -> {args.metrics_dir / 'control.json'}")
        return 0
    fit = "" if rec["fits"] else " (even the narrowest width is over the target)"
    print(f"control: width x{rec['width_multiple']:.3f}{fit}, {rec['epochs']} epochs: mAP@0.5 {rec['map50']:.3f}  "
          f"mAP@0.5:0.95 {rec['map']:.3f}  {rec['gflops']:.3f} GFLOPs (target {rec['target_gflops']:.3f})  "
          f"{rec['params']:,} params  ORT {rec['latency_quick_ms']:.2f} ms (quick reading)  -> {args.metrics_dir / 'control.json'}")
    return 0


if __name__ == "__main__":
    run_entry(main)
