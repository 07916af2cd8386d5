"""Data-parallel stages: relaunch an entry point under torchrun for ``train.nproc``, join its job."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from slimloop.config import Params, TrainParams


def relaunch(module: str, argv: list[str] | None, train: TrainParams) -> int | None:
    """With ``train.nproc`` above 1 outside torchrun: run ``python -m module argv`` again as that many
    processes under ``torch.distributed.run`` and return its exit code; otherwise None (run here).

    A process that torchrun started (``torchrun --nproc_per_node N -m flows.baseline``) is never
    relaunched: its job's size wins over ``train.nproc``.
    """
    from slimloop.distributed import launched_by_torchrun, torchrun_command

    if train.nproc <= 1 or launched_by_torchrun():
        return None
    cmd = torchrun_command(module, list(sys.argv[1:] if argv is None else argv), train.nproc)
    print(f"{module}: {train.nproc} processes: {' '.join(cmd[1:])}", flush=True)
    return subprocess.run(cmd, check=False).returncode


@contextlib.contextmanager
def distributed_job(train: TrainParams) -> Iterator[bool]:
    """Join torchrun's job for the body (a no-op in a plain process); yields whether this is rank 0."""
    from slimloop.distributed import init_distributed, is_main_process, shutdown_distributed
    from slimloop.train import select_device

    init_distributed(select_device(train.device).type)
    try:
        yield is_main_process()
    finally:
        shutdown_distributed()


def flow_in_processes(module: str, params: Params, args: list[str], metrics: Path) -> dict[str, Any] | None:
    """For a flow called from Prefect (or Python) with ``train.nproc`` above 1 outside torchrun: run
    its entry point as that many processes on ``params`` (written to a temporary params file) and
    ``args``, and return the record it wrote to ``metrics`` (with its ``env``); None when the flow
    should run here.

    Raises:
        TrainingError: the job failed (its exit code; the ranks' errors are above it on stderr).
    """
    import yaml

    from slimloop.distributed import launched_by_torchrun
    from slimloop.errors import TrainingError
    from slimloop.io import read_json_file

    if params.train.nproc <= 1 or launched_by_torchrun():
        return None
    with tempfile.TemporaryDirectory(prefix="slimloop-params-") as tmp:
        path = Path(tmp) / "params.yaml"
        path.write_text(yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False), encoding="utf-8")
        code = relaunch(module, ["--params", str(path), *args], params.train)
    if code is None:
        return None
    if code != 0:
        raise TrainingError(f"{module}: the {params.train.nproc}-process job exited with code {code}")
    return read_json_file(metrics, f"{module} metrics", TrainingError)

