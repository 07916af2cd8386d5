"""The input-size sweep on Prefect task runners: a local Dask cluster of 2 workers (prefect-dask)
and a process pool give the rows of the sequential sweep, in its order."""

from __future__ import annotations

import pytest
import torch
from flows.parallel import make_task_runner, run_sweep

from conftest import TINY_EVAL, tiny_train_params
from slimloop.config import CompressParams, DataParams, Params
from slimloop.model import build_model
from slimloop.train import seed_everything, train


def _comparable(rows: list[dict]) -> list[dict]:
    """Rows without their latency readings (timings: they differ from run to run)."""
    return [{k: v for k, v in r.items() if not k.startswith("latency")} for r in rows]


@pytest.fixture(scope="module")
def models(tiny_data, tiny_spec, tmp_path_factory):
    """A briefly trained model (mAP above 0) and its untrained twin."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("sweep")
    seed_everything(0)
    trained = train(build_model(tiny_spec), tiny_data, tiny_train_params(epochs=30, lr0=0.1, ema=False),
                    TINY_EVAL, out / "trained", progress=False)
    seed_everything(1)
    untrained = train(build_model(tiny_spec), tiny_data, tiny_train_params(epochs=0), TINY_EVAL,
                      out / "untrained", progress=False)
    return {"final": trained.best, "baseline": untrained.best}


def _params(tiny_data, runner: str) -> Params:
    return Params(data=DataParams(out_dir=str(tiny_data)), eval=TINY_EVAL,
                  compress=CompressParams(task_runner=runner, workers=2))


def test_runner_from_params():
    from prefect_dask import DaskTaskRunner

    assert make_task_runner(CompressParams()) is None
    assert make_task_runner(CompressParams(task_runner="process", workers=3))._max_workers == 3
    remote = make_task_runner(CompressParams(task_runner="dask", dask_address="tcp://10.0.0.5:8786"))
    assert isinstance(remote, DaskTaskRunner) and remote.address == "tcp://10.0.0.5:8786"


@pytest.mark.slow
def test_dask_and_process_pool_sweeps_equal_the_sequential_one(models, tiny_data, prefect_server):
    sequential = run_sweep(_params(tiny_data, "sequential"), models)
    assert [(r["model"], r["imgsz"]) for r in sequential] == [
        ("final", 128), ("final", 96), ("baseline", 128), ("baseline", 96)]
    assert sequential[0]["map50"] > 0  # a real model: the numbers compared are not all zero
    dask = run_sweep(_params(tiny_data, "dask"), models)
    assert _comparable(dask) == _comparable(sequential)
    pool = run_sweep(_params(tiny_data, "process"), models)
    assert _comparable(pool) == _comparable(sequential)
