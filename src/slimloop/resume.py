"""The training resume state read back from ``last.state.safetensors``: its schema, and its fit to
the run that resumes from it, both checked before any of it is used."""

from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from slimloop.config import TrainParams, params_to_dict
from slimloop.errors import CheckpointError
from slimloop.io import check_schema, parse_json

Tensors = dict[str, torch.Tensor]
Scalar = float | int | bool | str | None


class _Loose(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")


class OptimizerState(_Loose):
    """``torch.optim.Optimizer.state_dict()``: per-parameter buffers by index, and the groups."""

    state: dict[int, dict[str, torch.Tensor | Scalar]]
    param_groups: list[dict[str, Scalar | list[int] | tuple[float, ...]]]


class TrainState(_Loose):
    """What ``slimloop.train`` saves after every epoch (``_Run.state``)."""

    epoch: int = Field(ge=0)
    fingerprint: str
    model: Tensors
    ema: Tensors | None
    ema_updates: int = Field(ge=0)
    optimizer: OptimizerState
    scaler: dict[str, Scalar] | None
    extra: list[Tensors]
    best_fitness: float
    best_metrics: str  # JSON: {metric: number}
    history: str  # JSON: [{metric: number}, ...] one row per epoch
    torch_rng: torch.Tensor


class _Metrics(BaseModel):
    row: dict[str, float | int]
    rows: list[dict[str, float | int]]


def check_state(state: Any, source: str) -> None:
    """Refuse a state that is not the shape ``slimloop.train`` writes.

    Raises:
        CheckpointError: ``<source>: invalid training state: <key.path>: <reason>``.
    """
    check_schema(state, TrainState, source, "training state", CheckpointError)


def _fail(source: str, message: str) -> CheckpointError:
    return CheckpointError(f"{source}: training state does not fit this run: {message}")


def _check_groups(saved: list[dict[str, Any]], own: list[dict[str, Any]], source: str) -> None:
    """Same groups, same keys, values of the same kinds, as many parameters in each."""
    if len(saved) != len(own):
        raise _fail(source, f"{len(saved)} optimizer parameter groups, this run has {len(own)}")
    for k, (group, mine) in enumerate(zip(saved, own, strict=True)):
        if set(group) != set(mine):
            raise _fail(source, f"optimizer group {k} has keys {sorted(group)[:8]}, expected {sorted(mine)}")
        for key, value in mine.items():
            other = group[key]
            numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in (value, other))
            if not numbers and type(other) is not type(value):
                raise _fail(source, f"optimizer group {k}: {key} is a {type(other).__name__}, expected "
                                    f"a {type(value).__name__}")
        if len(group["params"]) != len(mine["params"]):
            raise _fail(source, f"optimizer group {k} has {len(group['params'])} parameters, this run "
                                f"has {len(mine['params'])}")


def _check_buffers(state: dict[int, dict[str, Any]], saved: list[dict[str, Any]],
                   optimizer: torch.optim.Optimizer, source: str) -> None:
    """Every per-parameter buffer belongs to a parameter and has its shape (or is a scalar)."""
    params = {i: p for i, p in zip(itertools.chain.from_iterable(g["params"] for g in saved),
                                   itertools.chain.from_iterable(g["params"] for g in optimizer.param_groups),
                                   strict=True)}
    for index, buffers in state.items():
        if index not in params:
            raise _fail(source, f"optimizer state for parameter {index}, which no group holds")
        for name, value in buffers.items():
            if isinstance(value, torch.Tensor) and value.ndim and value.shape != params[index].shape:
                raise _fail(source, f"optimizer {name} of parameter {index} is {tuple(value.shape)}, the "
                                    f"parameter is {tuple(params[index].shape)}")


def check_resumable(state: dict[str, Any], source: str,
                    optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Check a state (already :func:`check_state`-valid) against the run that resumes from it.

    Args:
        state: the loaded state.
        source: its file, for errors.
        optimizer: the run's freshly built optimizer (the reference for groups and shapes).

    Returns:
        ``(best_metrics, history)`` parsed from their JSON.

    Raises:
        CheckpointError: the optimizer groups or buffers, the RNG state or the metrics do not fit.
    """
    saved = state["optimizer"]["param_groups"]
    _check_groups(saved, optimizer.state_dict()["param_groups"], source)
    _check_buffers(state["optimizer"]["state"], saved, optimizer, source)
    rng = state["torch_rng"]
    if rng.dtype != torch.uint8 or rng.shape != torch.get_rng_state().shape:
        raise _fail(source, f"torch_rng is {rng.dtype} {tuple(rng.shape)}, not a CPU generator state")
    best = parse_json(state["best_metrics"], f"{source} (best_metrics)", CheckpointError)
    history = parse_json(state["history"], f"{source} (history)", CheckpointError)
    check_schema({"row": best, "rows": history}, _Metrics, source, "training state metrics", CheckpointError)
    return best, history


def params_fingerprint(params: TrainParams, extra: dict[str, Any] | None = None) -> str:
    """Short hash of the params a run depends on (a resume must match it)."""
    blob = json.dumps({"train": params_to_dict(params), "extra": extra or {}}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def run_identity(model: nn.Module, data_root: str | Path) -> dict[str, str]:
    """What else a resume must match besides the params: the starting weights (and so the spec) and
    the dataset (annotation files by content, images by name and size).

    Without it a persisted run folder (``models/baseline`` is a DVC ``persist`` out) would resume a
    finished run of another model or another dataset under the same params, and return it.
    """
    weights = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        weights.update(key.encode())
        weights.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    data = hashlib.sha256()
    root = Path(data_root)
    for split in ("train", "val"):
        ann = root / f"{split}.json"
        if ann.exists():
            data.update(ann.read_bytes())
        images = root / "images" / split
        if images.is_dir():
            for f in sorted(images.iterdir()):
                data.update(f"{f.name}:{f.stat().st_size}".encode())
    return {"init": weights.hexdigest()[:16], "data": data.hexdigest()[:16]}
