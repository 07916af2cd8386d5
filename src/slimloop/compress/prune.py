"""Step prune: select channels by one global |gamma| threshold over the coupled groups, and cut them."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor

from slimloop.checkpoint import load_model
from slimloop.compress.groups import Topology, topology
from slimloop.compress.land import SizeTarget, smallest_cut
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


def filter_l1_scores(model: Detector, topo: Topology) -> dict[str, Tensor]:
    """Per group, per channel: the largest mean |weight| of the members' conv filters (Li et al.'s
    L1 criterion, as a mean so that layers of different fan-in compare)."""
    convs = conv_modules(model)
    scores = {}
    for g, group in topo.groups.items():
        norms = torch.stack([convs[m].conv.weight.detach().abs().float().mean((1, 2, 3)).cpu()
                             for m in group.members])  # (members, width)
        scores[g] = norms.amax(0)
    return scores


def random_scores(topo: Topology, seed: int) -> dict[str, Tensor]:
    """Per group, per channel: a uniform random score (the control for any ranking)."""
    gen = torch.Generator().manual_seed(seed)
    return {g: torch.rand(group.width, generator=gen) for g, group in sorted(topo.groups.items())}


def channel_scores(model: Detector, topo: Topology, criterion: str, seed: int = 0) -> dict[str, Tensor]:
    """Scores that rank channels for pruning (lowest go first): ``gamma``, ``l1`` or ``random``."""
    if criterion == "gamma":
        return gamma_scores(model, topo)
    if criterion == "l1":
        return filter_l1_scores(model, topo)
    return random_scores(topo, seed)


def _land(model: Detector, topo: Topology, scores: dict[str, Tensor], ratio: float, min_channels: int,
          target: SizeTarget | None, reach: float | None = None) -> tuple[float, bool]:
    """``ratio``, or the smaller ratio that just meets ``target`` when ``ratio`` would overshoot it;
    with ``reach``, the larger ratio (at most ``reach``) that just meets it when ``ratio`` falls short."""
    if target is None:
        return ratio, False
    total = sum(s.numel() for s in scores.values())
    most = int(math.floor(ratio * total))
    fewest = smallest_cut(model.spec, topo, scores, most, min_channels, target)
    if fewest is None and reach is not None and reach > ratio:
        fewest = smallest_cut(model.spec, topo, scores, int(math.floor(reach * total)), min_channels, target)
        return (ratio, False) if fewest is None else (fewest / total, True)
    if fewest is None or fewest == most:
        return ratio, False
    return fewest / total, True


def prune_step(ckpt: Path, data_root, prune: PruneParams, eval_params: EvalParams, out_dir: Path,
               imgsz: int, ratio: float | None = None, land: SizeTarget | None = None, seed: int = 0,
               reach: float | None = None) -> StepResult:
    """Rank channels by ``prune.criterion``, cut the lowest ``ratio`` of them globally (or every one
    with |gamma| below ``prune.threshold``), and re-estimate the BN statistics on
    ``prune.recalibrate`` training images.

    Args:
        ratio: fraction of the model's channels to cut (ignored when ``prune.threshold`` is set).
        land: when cutting ``ratio`` would take the padded structure past these size targets, cut
            only as much as just meets them (bisection on the count; see :mod:`slimloop.compress.land`).
        reach: with ``land``, when cutting ``ratio`` leaves the targets unmet, cut the fewest channels
            (at most ``reach`` of them) that meet them; None (or no such cut): ``ratio``.
        seed: the seed of the ``random`` criterion.

    Writes ``out_dir/prune.safetensors`` and ``out_dir/masks.safetensors`` (keep masks and scores
    relative to ``ckpt``'s channel groups, for :func:`pad_step` and rewinding). The record has the
    ratio cut, whether it landed on the target, and the fraction of cut channels whose |gamma| was
    below 1e-2 (how much sparse training had already switched them off).
    """
    model = load_model(ckpt)
    topo = topology(model.spec)
    scores = channel_scores(model, topo, prune.criterion, seed)
    if prune.threshold is not None:
        keep = select_channels(gamma_scores(model, topo), threshold=prune.threshold, min_channels=prune.min_channels)
        ratio, landed = None, False
    else:
        if ratio is None:
            raise ValueError("prune_step needs a ratio when prune.threshold is not set")
        ratio, landed = _land(model, topo, scores, ratio, prune.min_channels, land, reach)
        keep = select_channels(scores, ratio, min_channels=prune.min_channels)
    gammas = gamma_scores(model, topo)
    cut = torch.cat([gammas[g][~keep[g]] for g in sorted(keep)])
    fields = {"ratio": None if ratio is None else round(ratio, 6), "landed": landed,
              "cut_channels": int(cut.numel()),
              "cut_gamma_below_1e-2": round(float((cut < 1e-2).float().mean()), 6) if cut.numel() else None}
    return surgery_step(model, ckpt, keep, scores, "prune", prune, data_root, eval_params, out_dir, imgsz,
                        prune.recalibrate, **fields)
