"""Step prune: select channels by one global |gamma| threshold over the coupled groups, and cut them."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor

from slimloop.checkpoint import load_model
from slimloop.compress.groups import Topology, topology
from slimloop.compress.steps import StepResult, surgery_step
from slimloop.config import EvalParams, PruneParams
from slimloop.model.build import Detector, conv_modules


def gamma_scores(model: Detector, topo: Topology) -> dict[str, Tensor]:
    """Per group, per channel: the largest raw |gamma| over the group's members."""
    convs = conv_modules(model)
    scores = {}
    for g, group in topo.groups.items():
        gammas = torch.stack([convs[m].bn.weight.detach().abs().float().cpu() for m in group.members])
        scores[g] = gammas.amax(0)  # (width,)
    return scores


def select_channels(
    scores: dict[str, Tensor],
    ratio: float | None = None,
    threshold: float | None = None,
    min_channels: int = 1,
) -> dict[str, Tensor]:
    """Keep masks by one global threshold on raw |gamma| (not normalized per layer).

    Args:
        scores: per-group channel scores from :func:`gamma_scores`.
        ratio: prune this fraction of all channels (the lowest scores, globally).
        threshold: or prune every channel whose score is below this value.
        min_channels: every group keeps at least this many (its highest-scoring) channels.

    Returns:
        ``{group: bool mask (width,)}``, True = keep.
    """
    if (ratio is None) == (threshold is None):
        raise ValueError("give exactly one of ratio and threshold")
    flat = torch.cat(list(scores.values()))
    if ratio is not None:
        k = int(math.floor(ratio * flat.numel()))
        threshold = float(flat.sort().values[k - 1]) if k > 0 else -math.inf
        keep = {g: s > threshold for g, s in scores.items()}
    else:
        keep = {g: s >= threshold for g, s in scores.items()}
    for g, s in scores.items():
        need = min(min_channels, s.numel())
        if int(keep[g].sum()) < need:
            keep[g] = torch.zeros_like(keep[g])
            keep[g][s.topk(need).indices] = True
    return keep


def prune_step(ckpt: Path, data_root, prune: PruneParams, eval_params: EvalParams, out_dir: Path,
               imgsz: int) -> StepResult:
    """Select channels by global |gamma| (``prune.ratio`` or ``prune.threshold``), cut them, and
    re-estimate the BN statistics on ``prune.recalibrate`` training images.

    Writes ``out_dir/prune.safetensors`` and ``out_dir/masks.safetensors`` (keep masks and scores
    relative to ``ckpt``'s channel groups, for :func:`pad_step` and rewinding).
    """
    model = load_model(ckpt)
    scores = gamma_scores(model, topology(model.spec))
    keep = select_channels(scores, prune.ratio, prune.threshold, prune.min_channels)
    return surgery_step(model, ckpt, keep, scores, "prune", prune, data_root, eval_params, out_dir, imgsz,
                        prune.recalibrate)
