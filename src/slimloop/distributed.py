"""torch.distributed plumbing for data-parallel training: the process group, ranks, gathers."""

from __future__ import annotations

import os
import sys
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from slimloop.errors import ConfigError


def launched_by_torchrun() -> bool:
    """True in a process that torchrun (``torch.distributed.run``) started: it sets these variables."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"))


def is_distributed() -> bool:
    """True once the default process group is up (more than one process or not)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of processes in the job (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    """This process's index on its machine (torchrun's ``LOCAL_RANK``; 0 without torchrun)."""
    return int(os.environ.get("LOCAL_RANK", "0")) if is_distributed() else 0


def is_main_process() -> bool:
    """True on rank 0 (and in a plain single process): the one process that writes files."""
    return rank() == 0


def init_distributed(device_type: str) -> bool:
    """Join the job torchrun started, once: ``nccl`` for CUDA, ``gloo`` otherwise.

    Args:
        device_type: ``cuda`` or ``cpu`` (``mps`` has no collective backend: refused).

    Returns:
        True when this process is part of a process group (now or already), False when it was not
        started by torchrun.

    Raises:
        ConfigError: MPS under torchrun.
    """
    if is_distributed():
        return True
    if not launched_by_torchrun():
        return False
    if device_type == "mps":
        raise ConfigError("train.device: MPS has no torch.distributed backend; use cpu or cuda with torchrun")
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return True


def shutdown_distributed() -> None:
    """Leave the process group (at the end of an entry point)."""
    if is_distributed():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait until every rank gets here (no-op in a single process)."""
    if is_distributed() and world_size() > 1:
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (a picklable object: metric rows, flags)."""
    if not is_distributed() or world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over the ranks, in place (a tensor on this rank's device)."""
    if is_distributed() and world_size() > 1:
        dist.all_reduce(t)
    return t


def mean_floats(values: dict[str, float]) -> dict[str, float]:
    """Each value averaged over the ranks (every rank must pass the same keys, in any order)."""
    if not is_distributed() or world_size() == 1 or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)  # (K,)
    dist.all_reduce(t)
    return {k: float(v) / world_size() for k, v in zip(keys, t.tolist(), strict=True)}


class _Features(nn.Module):
    """``model.forward_features`` as a module's forward, so that DDP sees the training forward."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return self.model.forward_features(x)  # (P3..P5 features, raw maps)


def wrap_model(model: nn.Module, device: torch.device) -> nn.Module:
    """``model``'s feature forward in DistributedDataParallel: gradients are averaged over the ranks
    during backward, and rank 0's weights and buffers are broadcast at construction (and its BN
    running statistics before every forward).

    Returns:
        A callable ``f(imgs) -> (feats, raw)``; the parameters stay those of ``model``.
    """
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(_Features(model), device_ids=ids)


def average_gradients(modules: list[nn.Module]) -> None:
    """All-reduce (mean) the gradients of ``modules`` in one flat buffer.

    For modules trained beside the DDP-wrapped model but outside its forward (distillation
    adapters): DDP only reduces the parameters of the module it wraps.
    """
    if not is_distributed() or world_size() == 1:
        return
    grads = [p.grad for m in modules for p in m.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])  # (sum of numel,)
    dist.all_reduce(flat)
    flat.div_(world_size())
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def torchrun_command(module: str, argv: list[str], nproc: int) -> list[str]:
    """The command that runs ``python -m module argv`` as ``nproc`` processes on this machine.

    Args:
        module: the entry point's module (``flows.baseline``).
        argv: its arguments.
        nproc: processes (one per GPU, or CPU processes with gloo).
    """
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", module, *argv]
