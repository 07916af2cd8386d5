"""Stage `compress`: the iterative loop (sparse-train, prune, pad, retrain, distill) as a Prefect
flow whose steps are cached tasks; writes the final model and per-iteration metrics."""

from __future__ import annotations

import importlib
import shutil
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.transactions import get_transaction

from flows.cache import StepCachePolicy, step_key, store_dir
from flows.common import base_parser, run_entry
from slimloop.config import Params, load_params
from slimloop.io import atomic_dir, write_json_atomic, write_text_atomic

BASELINE = Path("models/baseline")
OUT = Path("models/compressed")
METRICS = Path("metrics")


@task(name="step", cache_policy=StepCachePolicy(), persist_result=True, result_serializer="json",
      log_prints=False,
      retries=1, retry_delay_seconds=1)
def step_task(name: str, fn: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Run one loop step into the store folder named by its cache key; return JSON-able output."""
    module, _, attr = fn.rpartition(".")
    step = getattr(importlib.import_module(module), attr)
    txn = get_transaction()
    key = txn.key if txn is not None and txn.key else step_key(name, kwargs)
    out_dir = store_dir() / key
    result = step(**{**kwargs, "out_dir": out_dir})
    return {"checkpoint": str(result.checkpoint), "record": result.record, "extra": result.extra}


def _files_present(out: dict[str, Any]) -> bool:
    paths = [out["checkpoint"]] + [v for v in out["extra"].values() if isinstance(v, str) and v.startswith("/")]
    return all(Path(p).exists() for p in paths)


def prefect_run_step(name: str, fn, kwargs: dict[str, Any]):
    """``run_step`` for :func:`slimloop.loop.run_loop`: each step a cached Prefect task.

    A cached result whose files went missing (a cleaned store) is recomputed, not trusted.
    """
    from slimloop.compress import StepResult

    storage = store_dir() / "results"  # a Path: Prefect makes a local, unsaved storage of it
    runner = step_task.with_options(name=name, result_storage=storage)
    qualname = f"{fn.__module__}.{fn.__name__}"
    out = runner(name, qualname, kwargs)
    if not _files_present(out):
        out = runner.with_options(refresh_cache=True)(name, qualname, kwargs)
    return StepResult(Path(out["checkpoint"]), out["record"], out["extra"])


_COLUMNS = ("map50", "map", "precision", "recall", "missed", "params", "size_mb", "gflops", "latency_ms")


def _iterations_csv(result) -> str:
    import pandas as pd

    rows = [{"iteration": 0, "step": "baseline", **{k: result.baseline.get(k) for k in _COLUMNS}}]
    for it in result.iterations:
        for step, rec in it["steps"].items():
            if rec is not None:
                rows.append({"iteration": it["iteration"], "step": step, **{k: rec.get(k) for k in _COLUMNS}})
    return pd.DataFrame(rows).to_csv(index=False)


def write_outputs(result, out_dir: Path, metrics_dir: Path, imgsz: int) -> None:
    """Final checkpoint, spec and ONNX into ``out_dir``; per-iteration JSON, CSV and final.json."""
    from slimloop.checkpoint import load_model
    from slimloop.compress import draw_gamma_histograms
    from slimloop.export import export_onnx
    from slimloop.model import save_spec

    with atomic_dir(out_dir) as tmp:
        shutil.copyfile(result.final_checkpoint, tmp / "final.safetensors")
        model = load_model(result.final_checkpoint)
        save_spec(model.spec, tmp / "spec.json")
        export_onnx(model, tmp / "model.onnx", imgsz, dynamic_batch=True)
        for it in result.iterations:
            rows = it.get("gamma_histogram") or []
            if rows:
                draw_gamma_histograms(rows, tmp / f"gamma_iter_{it['iteration']}.png")
    with atomic_dir(metrics_dir / "iterations") as tmp:
        for it in result.iterations:
            write_json_atomic(tmp / f"iter_{it['iteration']}.json", it)
    write_text_atomic(metrics_dir / "iterations.csv", _iterations_csv(result))
    write_json_atomic(metrics_dir / "final.json", result.summary())


@flow(name="compress", log_prints=True)
def compress_flow(params: Params, baseline_dir: Path = BASELINE, out_dir: Path = OUT,
                  metrics_dir: Path = METRICS, progress: bool = False, cached: bool = True) -> dict:
    """Run the loop from the baseline checkpoint; ``cached`` routes steps through Prefect tasks."""
    import json

    from slimloop.loop import run_loop

    record = json.loads((metrics_dir / "baseline.json").read_text())
    result = run_loop(baseline_dir / "best.safetensors", record, params, Path(params.data.out_dir),
                      store_dir() / "work", run_step=prefect_run_step if cached else None,
                      rewind_ckpt=baseline_dir / "rewind.safetensors", progress=progress)
    imgsz = params.compress.imgsz or params.train.imgsz
    write_outputs(result, out_dir, metrics_dir, imgsz)
    write_imgsz_sweep(params, baseline_dir / "best.safetensors", out_dir / "final.safetensors", metrics_dir)
    return result.summary()


def write_imgsz_sweep(params: Params, baseline: Path, final: Path, metrics_dir: Path) -> None:
    """``metrics/imgsz_sweep.json``: baseline and final model at every ``eval.imgsz_sweep`` size."""
    from slimloop.checkpoint import load_model
    from slimloop.measure import sweep_imgsz

    models = {"baseline": load_model(baseline), "final": load_model(final)}
    rows = sweep_imgsz(models, params.data.out_dir, "val", params.eval.imgsz_sweep, params.eval)
    write_json_atomic(metrics_dir / "imgsz_sweep.json", {"rows": rows})


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__)
    parser.add_argument("--no-cache", action="store_true", help="run steps directly, without Prefect")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    if args.no_cache:
        summary = compress_flow.fn(params, progress=not args.quiet, cached=False)
    else:
        summary = compress_flow(params, progress=not args.quiet)
    rec = summary["record"]
    print(f"compress: final iteration {summary['final_iteration']} ({summary['reason']}): "
          f"mAP@0.5:0.95 {rec['map']:.3f} (drop {summary['map_drop']:+.3f}), {rec['gflops']:.3f} GFLOPs, "
          f"{rec['params']:,} params, ORT {rec['latency_ms']:.2f} ms")
    return 0


if __name__ == "__main__":
    run_entry(main)
