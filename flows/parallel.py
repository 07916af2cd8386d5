"""Independent work inside a run (the input-size sweep) through the Prefect task runner in params."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.task_runners import ProcessPoolTaskRunner

from slimloop.config import CompressParams, EvalParams, Params


def make_task_runner(compress: CompressParams) -> Any:
    """The Prefect task runner ``compress.task_runner`` names (None for ``sequential``).

    ``dask``: prefect-dask's DaskTaskRunner against ``compress.dask_address``, or a local cluster of
    ``compress.workers`` single-threaded worker processes started for the run and stopped after it.
    """
    if compress.task_runner == "process":  # not threads: torch.onnx.export (latency) is not thread-safe
        return ProcessPoolTaskRunner(max_workers=compress.workers)
    if compress.task_runner == "dask":
        from prefect_dask import DaskTaskRunner

        if compress.dask_address:
            return DaskTaskRunner(address=compress.dask_address)
        return DaskTaskRunner(cluster_kwargs={"n_workers": compress.workers, "threads_per_worker": 1,
                                              "processes": True, "dashboard_address": None})
    return None


@task(name="imgsz-sweep-cell")
def sweep_cell_task(checkpoint: str, name: str, data_root: str, split: str, imgsz: int,
                    eval_params: EvalParams) -> dict[str, Any]:
    """One model at one size, on whichever worker the runner picks (checkpoints and data are read
    from their paths: workers on other machines need the same filesystem)."""
    from slimloop.checkpoint import load_model
    from slimloop.measure import sweep_cell

    return sweep_cell(load_model(Path(checkpoint)), name, data_root, split, imgsz, eval_params)


@flow(name="imgsz-sweep")
def sweep_flow(models: dict[str, str], data_root: str, sizes: list[int], eval_params: EvalParams,
               split: str = "val") -> list[dict[str, Any]]:
    """Every (model, size) cell submitted at once; rows in the sequential order."""
    futures = [sweep_cell_task.submit(ckpt, name, data_root, split, imgsz, eval_params)
               for name, ckpt in models.items() for imgsz in sizes]
    return [f.result() for f in futures]


def run_sweep(params: Params, models: dict[str, Path], use_prefect: bool = True) -> list[dict[str, Any]]:
    """The input-size sweep of ``models`` (name -> checkpoint) at ``eval.imgsz_sweep``.

    ``compress.task_runner: sequential`` (or ``use_prefect`` False: no Prefect API) measures the
    cells in turn in this process; otherwise :func:`sweep_flow` runs them on the task runner.
    """
    runner = make_task_runner(params.compress) if use_prefect else None
    if runner is None:
        from slimloop.checkpoint import load_model
        from slimloop.measure import sweep_imgsz

        loaded = {name: load_model(path) for name, path in models.items()}
        return sweep_imgsz(loaded, params.data.out_dir, "val", params.eval.imgsz_sweep, params.eval)
    return sweep_flow.with_options(task_runner=runner)(
        {name: str(path) for name, path in models.items()}, str(params.data.out_dir),
        list(params.eval.imgsz_sweep), params.eval)
