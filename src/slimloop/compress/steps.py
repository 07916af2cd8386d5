"""Shared plumbing of the loop's steps: results, lineages, measuring, keep-mask files and the cut."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save
from torch import Tensor, nn

from slimloop.checkpoint import file_sha256, load_model, save_checkpoint
from slimloop.compress.groups import topology
from slimloop.compress.surgery import kept_fraction, prune_model, recalibrate_bn
from slimloop.config import EvalParams, params_to_dict
from slimloop.errors import CheckpointError
from slimloop.io import write_bytes_atomic
from slimloop.train import select_device

PROBE = 64  # probe image for constant folding: a pruned channel is constant everywhere, any size works


@dataclass(frozen=True)
class StepResult:
    """A step's output checkpoint, its evaluation record, and JSON-able extras (paths as str)."""

    checkpoint: Path
    record: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Lineage:
    """A reference checkpoint and the keep-mask files (oldest first) that lead from its spec to a
    descendant's: the baseline's early weights for rewinding, or a teacher for distillation."""

    checkpoint: Path
    masks: tuple[Path, ...] = ()


def measure_step(model: nn.Module, data_root, imgsz: int, eval_params: EvalParams, step: str,
                 device: str = "auto", **fields: Any) -> dict[str, Any]:
    """A step's record: ``model`` evaluated and profiled on the val split, with ``step`` and ``fields``."""
    from slimloop.measure import measure_model

    device = "cpu" if select_device(device).type == "mps" else str(select_device(device))
    record = measure_model(model.to(device), data_root, "val", imgsz, eval_params, device=device)
    return {"step": step, **record, **fields}


def evaluate_step(ckpt: Path, data_root, eval_params: EvalParams, imgsz: int, step: str = "evaluate") -> StepResult:
    """Evaluate and profile a checkpoint as it is (writes nothing)."""
    return StepResult(Path(ckpt), measure_step(load_model(ckpt), data_root, imgsz, eval_params, step))


def step_meta(step: str, ckpt: Path, teacher: Lineage | None = None, **params: Any) -> dict[str, Any]:
    """Checkpoint metadata of a step: its name, the parent's (and teacher's) hash and its params."""
    meta = {"step": step, "parent": file_sha256(ckpt), **{k: params_to_dict(v) for k, v in params.items()}}
    if teacher is not None:
        meta["teacher"] = file_sha256(teacher.checkpoint)
    return meta


def save_masks(path: Path, keep: dict[str, Tensor], scores: dict[str, Tensor]) -> Path:
    """Write keep masks and gamma scores per channel group as one safetensors file, atomically."""
    tensors = {**{f"keep/{g}": m.to(torch.uint8).contiguous() for g, m in keep.items()},
               **{f"score/{g}": s.float().contiguous() for g, s in scores.items()}}
    write_bytes_atomic(path, save(tensors, metadata={"format": "slimloop/masks-1"}))
    return Path(path)


def load_masks(path: Path) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Read ``(keep, scores)`` written by :func:`save_masks`.

    Raises:
        CheckpointError: missing or unreadable file.
    """
    try:
        tensors = load(Path(path).read_bytes())
    except (OSError, SafetensorError, ValueError) as exc:
        raise CheckpointError(f"cannot read masks file {path}: {exc}") from None
    keep = {k[5:]: v.bool() for k, v in tensors.items() if k.startswith("keep/")}
    scores = {k[6:]: v for k, v in tensors.items() if k.startswith("score/")}
    return keep, scores


def check_masks(model: nn.Module, keep: dict[str, Tensor], source: Path) -> None:
    """Raise :class:`CheckpointError` unless ``keep`` has one mask per channel group of ``model``."""
    expected = {g: grp.width for g, grp in topology(model.spec).groups.items()}
    if {g: int(m.numel()) for g, m in keep.items()} != expected:
        raise CheckpointError(f"{source}: masks do not fit the channel groups of {model.spec.name}")


def apply_masks(model: nn.Module, mask_files: tuple[Path, ...] | list[Path]) -> nn.Module:
    """Prune ``model`` with each file's keep masks in turn (the masks of iterations 1..k)."""
    for path in mask_files:
        keep, _ = load_masks(path)
        check_masks(model, keep, Path(path))
        model = prune_model(model, keep, probe=PROBE)
    return model


def surgery_step(model: nn.Module, ckpt: Path, keep: dict[str, Tensor], scores: dict[str, Tensor], step: str,
                 params: Any, data_root, eval_params: EvalParams, out_dir: Path, imgsz: int,
                 recalibrate: int, **fields: Any) -> StepResult:
    """Cut ``model`` to ``keep``, re-estimate BN on ``recalibrate`` images, save checkpoint and masks,
    measure; ``fields`` join the record."""
    out_dir = Path(out_dir)
    device = select_device()
    device = torch.device("cpu") if device.type == "mps" else device  # mps: on the CPU, like the surgery
    out = recalibrate_bn(prune_model(model, keep, probe=PROBE).to(device), data_root, imgsz, recalibrate).cpu()
    path = save_checkpoint(out_dir / f"{step}.safetensors", out,
                           {"step": step, "parent": file_sha256(ckpt), step: params_to_dict(params),
                            "recalibrated_images": recalibrate})
    masks = save_masks(out_dir / "masks.safetensors", keep, scores)
    fraction = kept_fraction(model.spec, out.spec)
    record = measure_step(out, data_root, imgsz, eval_params, step, kept_fraction=round(fraction, 6),
                          recalibrated_images=recalibrate, **fields)
    return StepResult(path, record, {"masks": str(masks), "kept_fraction": fraction})
