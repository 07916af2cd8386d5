"""Step pad: round every pruned width up to a multiple (restoring the largest-gamma channels) and cut."""

from __future__ import annotations

import math
from pathlib import Path

from torch import Tensor

from slimloop.checkpoint import load_model
from slimloop.compress.steps import StepResult, check_masks, load_masks, surgery_step
from slimloop.config import EvalParams, PadParams


def pad_channels(keep: dict[str, Tensor], scores: dict[str, Tensor], multiple: int) -> dict[str, Tensor]:
    """Round every kept width UP to a multiple by restoring the pruned channels with the largest gamma.

    Never above the group's current width; ``multiple == 1`` returns the masks unchanged.
    """
    padded = {}
    for g, mask in keep.items():
        width, kept = mask.numel(), int(mask.sum())
        target = min(width, math.ceil(kept / multiple) * multiple)
        mask = mask.clone()
        if target > kept:
            candidates = scores[g].masked_fill(mask, -math.inf)
            mask[candidates.topk(target - kept).indices] = True
        padded[g] = mask
    return padded


def pad_step(ckpt: Path, masks: Path, data_root, pad: PadParams, eval_params: EvalParams, out_dir: Path,
             imgsz: int, recalibrate: int = 0) -> StepResult:
    """Round the pruned widths up to ``pad.multiple`` (restoring the largest-gamma channels) and cut.

    Args:
        ckpt: the model the masks were selected on (the sparse-trained one, not the pruned one).
        masks: ``masks.safetensors`` of :func:`prune_step`.
        recalibrate: training images that re-estimate the BN statistics (``prune.recalibrate``).

    Writes ``out_dir/pad.safetensors`` and ``out_dir/masks.safetensors`` (the padded masks).
    """
    keep, scores = load_masks(masks)
    model = load_model(ckpt)
    check_masks(model, keep, Path(masks))
    padded = pad_channels(keep, scores, pad.multiple)
    return surgery_step(model, ckpt, padded, scores, "pad", pad, data_root, eval_params, out_dir, imgsz,
                        recalibrate)
