"""Stage `compress`: the iterative loop (sparse-train, prune, pad, retrain, distill) as a Prefect
flow whose steps are cached tasks; writes the final model and per-iteration metrics."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import CachePolicy
from prefect.transactions import get_transaction

from flows.common import base_parser, run_entry
from slimloop.config import Params, load_params
from slimloop.io import atomic_dir, read_stage_json, write_json_atomic, write_text_atomic
from slimloop.provenance import with_env
from slimloop.records import Baseline
from slimloop.store.entries import (
    files_present,
    open_store,
    run_stored_step,
    store_dir,
    touch_entry,
)
from slimloop.store.keys import step_key

BASELINE = Path("models/baseline")
OUT = Path("models/compressed")
# The loop's step-store entries as a DVC out (persist: true), so `dvc pull` brings them along
LINEAGE = Path("models/lineage")
METRICS = Path("metrics")


class StepCachePolicy(CachePolicy):
    """Prefect cache policy: ``step_key`` of the task's ``name`` and ``kwargs`` inputs.

    Prefect's own policies do not fit: the default includes the run id (never hits across runs),
    ``INPUTS`` hashes a Path as its string, and ``TASK_SOURCE`` covers the task body only.
    """

    def compute_key(self, task_ctx, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any) -> str | None:
        return step_key(inputs["name"], inputs["fn"], inputs["kwargs"])


def worth_retrying(task, task_run, state) -> bool:
    """Prefect ``retry_condition_fn``: retry passing failures (I/O, a killed worker process), never
    the project's own errors (bad input, a NaN loss): on a rerun they would only repeat."""
    from slimloop.errors import SlimloopError

    return not isinstance(getattr(state, "data", None), SlimloopError)


@task(name="step", cache_policy=StepCachePolicy(), persist_result=True, result_serializer="json",
      log_prints=False, retries=1, retry_delay_seconds=1, retry_condition_fn=worth_retrying)
def step_task(name: str, fn: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """One loop step as a Prefect task: cached by :class:`StepCachePolicy`, run into the store."""
    txn = get_transaction()
    key = txn.key if txn is not None and txn.key else step_key(name, fn, kwargs)
    return run_stored_step(name, fn, kwargs, key)


def _step_result(out: dict[str, Any]):
    from slimloop.compress.steps import StepResult

    return StepResult(Path(out["checkpoint"]), out["record"], out["extra"])


def prefect_run_step(name: str, fn, kwargs: dict[str, Any]):
    """``run_step`` for :func:`slimloop.compress.loop.run_loop`: each step a cached Prefect task.

    A cached result whose files went missing (a cleaned store) is recomputed, not trusted.
    """
    storage = store_dir() / "results"  # a Path: Prefect makes a local, unsaved storage of it
    runner = step_task.with_options(name=name, result_storage=storage)
    qualname = f"{fn.__module__}.{fn.__name__}"
    out = runner(name, qualname, kwargs)
    if not files_present(out):
        out = runner.with_options(refresh_cache=True)(name, qualname, kwargs)
    touch_entry(out["checkpoint"])  # a Prefect cache hit skips run_stored_step's own touch
    return _step_result(out)


def local_run_step(name: str, fn, kwargs: dict[str, Any]):
    """``run_step`` without Prefect: the same content-addressed store, keyed by :func:`step_key`."""
    qualname = f"{fn.__module__}.{fn.__name__}"
    return _step_result(run_stored_step(name, qualname, kwargs, step_key(name, qualname, kwargs)))


def prefect_api_available() -> str | None:
    """None when a Prefect API answers (``PREFECT_API_URL`` or a temporary local one); else why not.

    Without ``PREFECT_API_URL`` Prefect starts a temporary server in this process; on a busy
    machine that can time out, and the loop should not fail for it.
    """
    try:
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            error = client.api_healthcheck()
        return None if error is None else str(error)
    except Exception as exc:  # noqa: BLE001 - any failure to reach the API means: run without it
        return f"{type(exc).__name__}: {exc}"


_COLUMNS = ("map50", "map", "precision", "recall", "missed", "params", "size_mb", "gflops", "latency_quick_ms")


def _iterations_csv(result) -> str:
    import pandas as pd

    rows = [{"iteration": 0, "step": "baseline", **{k: result.baseline.get(k) for k in _COLUMNS}}]
    for it in result.iterations:
        for step, rec in it["steps"].items():
            if rec is not None:
                rows.append({"iteration": it["iteration"], "step": step, **{k: rec.get(k) for k in _COLUMNS}})
    return pd.DataFrame(rows).to_csv(index=False)


def write_outputs(result, out_dir: Path, metrics_dir: Path, imgsz: int, baseline_ckpt: Path,
                  baseline_imgsz: int, sweep_sizes: list[int] = ()) -> None:
    """Final checkpoint, spec and ONNX (ours and YOLOv5's layout) into ``out_dir``, with ``onnx/``: every model the report shows
    as a batch-1 ONNX file (the latency stage measures them); per-iteration JSON, CSV and final.json."""
    from slimloop.checkpoint import load_model
    from slimloop.deploy.catalogue import export_catalogue, loop_entries
    from slimloop.deploy.export import export_onnx
    from slimloop.deploy.yolov5_onnx import FILE_NAME, export_yolov5_onnx
    from slimloop.model import save_spec
    from slimloop.report.plots import draw_gamma_histograms
    from slimloop.store.lineage import portable

    with atomic_dir(out_dir) as tmp:
        shutil.copyfile(result.final_checkpoint, tmp / "final.safetensors")
        model = load_model(result.final_checkpoint)
        save_spec(model.spec, tmp / "spec.json")
        export_onnx(model, tmp / "model.onnx", imgsz, dynamic_batch=True)
        export_catalogue(loop_entries(result.iterations, baseline_ckpt, tmp / "final.safetensors", imgsz,
                                      baseline_imgsz, sweep_sizes), tmp / "onnx", "compress")
        export_yolov5_onnx(model, tmp / FILE_NAME, imgsz)  # for yolov5's detect.py and its users' code
        for it in result.iterations:
            rows = it.get("gamma_histogram") or []
            if rows:
                draw_gamma_histograms(rows, tmp / f"gamma_iter_{it['iteration']}.png")
    # step checkpoints named as @store/<key>/..., whatever this machine's $SLIMLOOP_CACHE
    with atomic_dir(metrics_dir / "iterations") as tmp:
        for it in result.iterations:
            write_json_atomic(tmp / f"iter_{it['iteration']}.json", portable(it))
    write_text_atomic(metrics_dir / "iterations.csv", _iterations_csv(result))
    write_json_atomic(metrics_dir / "final.json", with_env(portable(result.summary())))


@flow(name="compress", log_prints=True)
def compress_flow(params: Params, baseline_dir: Path = BASELINE, out_dir: Path = OUT,
                  metrics_dir: Path = METRICS, progress: bool = False, steps: str = "prefect",
                  lineage: Path = LINEAGE) -> dict:
    """Run the loop from the baseline checkpoint.

    ``steps``: ``prefect`` (each step a cached Prefect task), ``store`` (the same step store without
    Prefect) or ``direct`` (no cache at all). Before the loop, the entries of ``lineage`` (the
    previous run's, pulled by DVC) that the store lacks are copied into it; after it, ``lineage``
    is replaced by the entries this run's metrics name (:mod:`slimloop.store.lineage`).
    """
    from slimloop.compress.loop import run_loop
    from slimloop.store.lineage import export_lineage, import_lineage, keys_in

    runners = {"prefect": prefect_run_step, "store": local_run_step, "direct": None}
    record = read_stage_json(metrics_dir / "baseline.json", "baseline", Baseline)
    open_store()
    if steps != "direct" and (imported := import_lineage(lineage, store_dir())):
        print(f"step store: {len(imported)} entries of {lineage} copied into {store_dir()}")
    result = run_loop(baseline_dir / "best.safetensors", record, params, Path(params.data.out_dir),
                      store_dir() / "work", run_step=runners[steps],
                      rewind_ckpt=baseline_dir / "rewind.safetensors", progress=progress)
    imgsz = params.compress.imgsz or params.train.imgsz
    write_outputs(result, out_dir, metrics_dir, imgsz, baseline_dir / "best.safetensors",
                  int(record.get("imgsz") or params.train.imgsz), params.eval.imgsz_sweep)
    _publish_iterations(metrics_dir / "iterations.csv")
    export_lineage(store_dir(), keys_in(result.iterations) | keys_in(result.summary()), lineage)
    write_imgsz_sweep(params, baseline_dir / "best.safetensors", out_dir / "final.safetensors", metrics_dir,
                      use_prefect=steps == "prefect")
    return result.summary()


def _publish_iterations(csv: Path) -> bool:
    """The per-iteration table as a Prefect table artifact (only inside a flow run)."""
    import pandas as pd
    from prefect.artifacts import create_table_artifact
    from prefect.context import FlowRunContext

    if FlowRunContext.get() is None:
        return False
    rows = pd.read_csv(csv).astype(object).where(lambda f: f.notna(), None).to_dict("records")
    create_table_artifact(table=rows, key="slimloop-iterations",
                          description="slimloop compress: every step of every iteration (metrics/iterations.csv)")
    return True


def write_imgsz_sweep(params: Params, baseline: Path, final: Path, metrics_dir: Path, use_prefect: bool = False) -> None:
    """``metrics/imgsz_sweep.json``: baseline and final model at every ``eval.imgsz_sweep`` size, on
    ``compress.task_runner`` when Prefect runs the flow (else in turn)."""
    from flows.parallel import run_sweep

    rows = run_sweep(params, {"baseline": baseline, "final": final}, use_prefect=use_prefect)
    write_json_atomic(metrics_dir / "imgsz_sweep.json", {"rows": rows})


def check_targets(params: Params, baseline: Path) -> None:
    """Stop before any work when a target cannot be met even by the narrowest model the pruner allows."""
    from slimloop.checkpoint import load_checkpoint
    from slimloop.compress.feasibility import check_targets_reachable

    check_targets_reachable(load_checkpoint(baseline).spec, params)


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__)
    parser.add_argument("--no-cache", action="store_true", help="run every step, without Prefect or the step store")
    parser.add_argument("--no-prefect", action="store_true",
                        help="use the step store without Prefect (also the fallback when no Prefect API starts)")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    check_targets(params, BASELINE / "best.safetensors")
    if args.no_cache:
        summary = compress_flow.fn(params, progress=not args.quiet, steps="direct")
    elif args.no_prefect:
        summary = compress_flow.fn(params, progress=not args.quiet, steps="store")
    elif (why := prefect_api_available()) is not None:
        print(f"warning: no Prefect API ({why}); running the steps through the step store {store_dir()} "
              "without Prefect. Start one with `prefect server start` and set PREFECT_API_URL.", file=sys.stderr)
        summary = compress_flow.fn(params, progress=not args.quiet, steps="store")
    else:
        summary = compress_flow(params, progress=not args.quiet)
    rec = summary["record"]
    again = summary.get("final_retrain")
    again = f", then {again['mode']} {again['epochs']} epochs" if again else ""
    print(f"compress: final iteration {summary['final_iteration']} ({summary['reason']}){again}: "
          f"mAP@0.5:0.95 {rec['map']:.3f} (drop {summary['map_drop']:+.3f}), {rec['gflops']:.3f} GFLOPs, "
          f"{rec['params']:,} params, ORT {rec['latency_quick_ms']:.2f} ms (quick reading)")
    return 0


if __name__ == "__main__":
    run_entry(main)
