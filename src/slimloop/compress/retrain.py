"""Step retrain: the pruned structure finetuned, trained from scratch (scratch-B budget) or rewound."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

from torch import nn

from slimloop.checkpoint import file_sha256, load_checkpoint, load_model, save_checkpoint
from slimloop.compress.distill import distill_hooks, kd_items
from slimloop.compress.steps import Lineage, StepResult, apply_masks, measure_step, step_meta
from slimloop.config import DistillParams, EvalParams, RetrainParams, TrainParams
from slimloop.distributed import is_main_process
from slimloop.errors import CheckpointError
from slimloop.model import build_model
from slimloop.train import seed_everything, train

REWIND_NAME = "rewind.safetensors"


def scratch_epochs(epochs: int, base_gflops: float, pruned_gflops: float, cap: float) -> int:
    """Scratch-B budget: ``epochs * base / pruned`` (same compute as the unpruned run), at most
    ``cap * epochs``, never fewer than ``epochs``."""
    scaled = round(epochs * base_gflops / max(pruned_gflops, 1e-12))
    return max(epochs, min(scaled, math.floor(epochs * cap)))


def _start_model(ckpt: Path, retrain: RetrainParams, train_params: TrainParams, imgsz: int,
                 base_gflops: float | None, rewind: Lineage | None) -> tuple[nn.Module, TrainParams]:
    """The model retraining starts from, and the training params for it."""
    from slimloop.profile import gflops

    target = load_checkpoint(ckpt).spec
    if retrain.mode == "finetune":
        warmup = train_params.warmup_epochs if retrain.warmup_epochs is None else retrain.warmup_epochs
        return load_model(ckpt), train_params.model_copy(
            update={"epochs": retrain.epochs, "lr0": retrain.lr0 or train_params.lr0, "warmup_epochs": warmup})
    if retrain.mode == "scratch":
        seed_everything(train_params.seed)
        model = build_model(target)
        epochs = retrain.epochs
        if retrain.scratch_budget:
            if base_gflops is None:
                raise ValueError("retrain.scratch_budget needs the baseline GFLOPs")
            epochs = scratch_epochs(retrain.epochs, base_gflops, gflops(model, imgsz),
                                    retrain.budget_cap)
        return model, train_params.model_copy(update={"epochs": epochs})
    if rewind is None:
        raise ValueError("retrain.mode rewind needs the rewind checkpoint and the masks")
    model = apply_masks(load_model(rewind.checkpoint), rewind.masks)
    if model.spec != target:
        raise CheckpointError(f"{rewind.checkpoint}: the rewound model's spec differs from {ckpt}'s "
                              "(masks from another lineage?)")
    return model, train_params.model_copy(update={"epochs": retrain.epochs})


def retrain_step(ckpt: Path, data_root, retrain: RetrainParams, train_params: TrainParams,
                 eval_params: EvalParams, out_dir: Path, *, imgsz: int | None = None,
                 base_gflops: float | None = None, rewind: Lineage | None = None,
                 distill: DistillParams | None = None, teacher: Lineage | None = None,
                 progress: bool = False) -> StepResult:
    """Retrain the pruned (padded) structure of ``ckpt``: finetune its weights, train it from scratch
    (optionally with the scratch-B budget), or rewind to the baseline's early weights.

    Args:
        imgsz: evaluation size (default ``train_params.imgsz``).
        base_gflops: the unpruned model's GFLOPs at ``imgsz`` (scratch-B budget).
        rewind: the baseline's ``rewind.safetensors`` and the mask files of iterations 1..k.
        distill: with ``teacher``, distill jointly while retraining.

    Returns:
        The best checkpoint of ``out_dir/train``; the record has the epochs actually trained.
    """
    imgsz = imgsz or train_params.imgsz
    model, params = _start_model(ckpt, retrain, train_params, imgsz, base_gflops, rewind)
    hooks, kd = None, {}
    if distill is not None and teacher is not None:
        hooks = distill_hooks(model, distill, teacher)
    meta = step_meta("retrain", ckpt, teacher if hooks else None, retrain=retrain,
                     **({"distill": distill} if hooks else {}))
    if rewind is not None and retrain.mode == "rewind":
        meta["rewind"] = file_sha256(rewind.checkpoint)
    result = train(model, data_root, params, eval_params, Path(out_dir) / "train", hooks=hooks,
                   progress=progress, meta=meta)
    if hooks:
        kd = {"distill_terms": kd_items(result.history)}
    record = measure_step(load_model(result.best), data_root, imgsz, eval_params, "retrain",
                          params.device, epochs=params.epochs, mode=retrain.mode,
                          distill="joint" if hooks else "off", **kd)
    return StepResult(result.best, record, {"history": result.history})


def rewind_saver(out_dir: Path, rewind_epoch: int) -> Callable[[int, nn.Module, dict[str, float]], None]:
    """``on_epoch_end`` callback for the baseline run: keep ``out_dir/rewind.safetensors`` (the EMA
    weights after epoch ``rewind_epoch``, 1-based) for ``retrain.mode = rewind``."""
    path = Path(out_dir) / REWIND_NAME

    def save_rewind(epoch: int, model: nn.Module, row: dict[str, float]) -> None:
        if epoch + 1 == rewind_epoch and is_main_process():  # under DDP rank 0 alone writes
            save_checkpoint(path, model, {"step": "rewind", "epoch": epoch + 1})

    return save_rewind
