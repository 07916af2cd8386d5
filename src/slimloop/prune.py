"""Structured channel pruning: one global |gamma| threshold over coupled channel groups,
pad-up to a multiple, and surgery that returns a new spec with weights that load strictly."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from slimloop.model.build import Detector, build_model, conv_modules, conv_widths, with_conv_widths
from slimloop.model.spec import C3Spec, ConcatSpec, ConvSpec, ModelSpec, SPPFSpec, UpsampleSpec

IMAGE = "<image>"


@dataclass(frozen=True)
class ChannelGroup:
    """Conv outputs whose channels must be kept or removed together (a residual add couples them).

    ``name`` is the first member; all members have ``width`` output channels.
    """

    name: str
    members: tuple[str, ...]
    width: int


@dataclass(frozen=True)
class Topology:
    """Which group each conv's output channels belong to, and what each conv reads.

    ``inputs`` maps every conv (including ``detect.m.k``) to the list of groups whose channels,
    concatenated in order, form its input (``IMAGE`` for the picture).
    """

    groups: dict[str, ChannelGroup]
    group_of: dict[str, str]
    inputs: dict[str, list[str]]


def _c3_topology(p: str, layer: C3Spec, inp: list[str], group_of: dict, inputs: dict) -> list[str]:
    stream = [f"{p}.cv1"]
    inputs[f"{p}.cv1"] = inp
    inputs[f"{p}.cv2"] = inp
    for j in range(len(layer.bottlenecks)):
        b = f"{p}.m.{j}"
        inputs[f"{b}.cv1"] = stream
        inputs[f"{b}.cv2"] = [f"{b}.cv1"]
        if layer.shortcut:  # the add couples cv2's output with the stream (cv1's group)
            group_of[f"{b}.cv2"] = group_of[f"{p}.cv1"]
        else:
            stream = [f"{b}.cv2"]
    inputs[f"{p}.cv3"] = stream + [f"{p}.cv2"]
    return [f"{p}.cv3"]


def topology(spec: ModelSpec) -> Topology:
    """Channel groups and conv inputs of ``spec`` (module names as ``conv_widths``)."""
    widths = conv_widths(spec)
    group_of = {name: name for name in widths}
    inputs: dict[str, list[str]] = {}
    outs: list[list[str]] = []

    def source(i: int) -> list[str]:
        return [g for j in spec.sources(i) for g in ([IMAGE] if j < 0 else outs[j])]

    for i, layer in enumerate(spec.layers):
        p, inp = f"layers.{i}", source(i)
        if isinstance(layer, ConvSpec):
            inputs[p] = inp
            outs.append([p])
        elif isinstance(layer, C3Spec):
            outs.append(_c3_topology(p, layer, inp, group_of, inputs))
        elif isinstance(layer, SPPFSpec):
            inputs[f"{p}.cv1"] = inp
            inputs[f"{p}.cv2"] = [f"{p}.cv1"] * 4  # x and three max-pools of it, concatenated
            outs.append([f"{p}.cv2"])
        elif isinstance(layer, UpsampleSpec | ConcatSpec):
            outs.append(inp)
    for k, j in enumerate(spec.sources(len(spec.layers))):
        inputs[f"detect.m.{k}"] = outs[j]
    inputs = {name: [group_of.get(g, g) for g in segs] for name, segs in inputs.items()}
    members: dict[str, list[str]] = {}
    for name, g in group_of.items():
        members.setdefault(g, []).append(name)
    groups = {g: ChannelGroup(g, tuple(m), widths[g]) for g, m in members.items()}
    return Topology(groups, group_of, inputs)


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


def _input_mask(topo: Topology, name: str, keep: dict[str, Tensor], in_chs: int) -> Tensor:
    parts = [torch.ones(in_chs, dtype=torch.bool) if g == IMAGE else keep[g] for g in topo.inputs[name]]
    return torch.cat(parts)


@torch.no_grad()
def _fold_constants(model: Detector, topo: Topology, keep: dict[str, Tensor], probe: int) -> Detector:
    """Copy of ``model`` whose pruned channels emit exactly act(beta), folded into their consumers.

    A channel with gamma = 0 outputs the constant act(beta) everywhere; removing it would drop
    that constant from every conv that reads it. Adding sum_k W[:, c, k] * const to the
    consumer's BN running mean (or Detect bias) keeps the outputs unchanged away from borders.
    """
    model = copy.deepcopy(model).eval()
    convs = conv_modules(model)
    for name, conv in convs.items():
        conv.bn.weight[~keep[topo.group_of[name]]] = 0.0
    probes: dict[str, Tensor] = {}
    targets = {name: c.conv for name, c in convs.items()}
    targets.update({f"detect.m.{k}": m for k, m in enumerate(model.detect.m)})
    hooks = [
        mod.register_forward_pre_hook(
            lambda _m, args, n=name: probes.__setitem__(n, args[0][0, :, args[0].shape[2] // 2, args[0].shape[3] // 2])
        )
        for name, mod in targets.items()
    ]
    try:
        device = next(model.parameters()).device
        model.forward_raw(torch.zeros(1, model.spec.in_chs, probe, probe, device=device))
    finally:
        for h in hooks:
            h.remove()
    for name, conv2d in targets.items():
        dropped = ~_input_mask(topo, name, keep, model.spec.in_chs).to(probes[name].device)
        if not dropped.any():
            continue
        const = probes[name][dropped]  # (n_dropped,) value of each removed input channel
        shift = conv2d.weight[:, dropped].sum((2, 3)) @ const  # (out,)
        if name.startswith("detect."):
            conv2d.bias += shift
        else:
            convs[name].bn.running_mean -= shift
    return model


def prune_model(model: Detector, keep: dict[str, Tensor], probe: int = 256) -> Detector:
    """Remove every channel whose group mask is False; return a new detector with a new spec.

    Constants emitted by removed channels are folded into the next layer first (see
    :func:`_fold_constants`). The Detect outputs are never pruned.

    Args:
        model: the detector to prune (not modified).
        keep: ``{group: bool mask}`` from :func:`select_channels` / :func:`pad_channels`.
        probe: side of the probe image used to read the constants (any multiple of 32).
    """
    topo = topology(model.spec)
    keep = {g: m.cpu().bool() for g, m in keep.items()}
    folded = _fold_constants(model, topo, keep, probe)
    widths = {name: int(keep[topo.group_of[name]].sum()) for name in topo.group_of}
    new_spec = with_conv_widths(model.spec, widths)
    state = {}
    for key, value in folded.state_dict().items():
        state[key] = _slice(key, value, topo, keep, model.spec.in_chs)
    pruned = build_model(new_spec)
    pruned.load_state_dict(state, strict=True)
    pruned.train(model.training)
    return pruned.to(next(model.parameters()).device)


def _slice(key: str, value: Tensor, topo: Topology, keep: dict[str, Tensor], in_chs: int) -> Tensor:
    """Slice one state-dict entry by its conv's output group and input mask."""
    parts = key.rsplit(".", 2)
    if key.startswith("detect.m."):
        owner = key.rsplit(".", 1)[0]
        if key.endswith(".weight"):
            return value[:, _input_mask(topo, owner, keep, in_chs).to(value.device)].clone()
        return value.clone()
    owner, sub, field = (parts[0], parts[1], parts[2]) if len(parts) == 3 else (None, None, None)
    if owner not in topo.group_of or sub not in ("conv", "bn"):
        return value.clone()
    out_mask = keep[topo.group_of[owner]].to(value.device)
    if field == "num_batches_tracked":
        return value.clone()
    value = value[out_mask]
    if sub == "conv":
        value = value[:, _input_mask(topo, owner, keep, in_chs).to(value.device)]
    return value.clone()


def kept_fraction(before: ModelSpec, after: ModelSpec) -> float:
    """Fraction of prunable channels that remain."""
    b, a = conv_widths(before), conv_widths(after)
    return sum(a.values()) / sum(b.values())


def regularize_gammas(model: nn.Module, lam: float, skip: set[str] | None = None) -> float:
    """Network slimming: add ``lam * sign(gamma)`` to every prunable BN gamma's gradient.

    Call after backward (and after unscaling under AMP). Returns the L1 norm of the gammas.
    """
    total = 0.0
    for name, conv in conv_modules(model).items():
        if skip and name in skip:
            continue
        gamma = conv.bn.weight
        if gamma.grad is not None:
            gamma.grad.add_(torch.sign(gamma.detach()), alpha=lam)
        total += float(gamma.detach().abs().sum())
    return total


@torch.no_grad()
def recalibrate_bn(model: nn.Module, data_root, imgsz: int, images: int, batch_size: int = 16,
                   seed: int = 0) -> nn.Module:
    """Re-estimate every BatchNorm's running statistics on ``images`` training images (no
    augmentation), in place; weights are untouched.

    After a cut the running statistics describe the unpruned network's activations, so eval-mode
    accuracy right after pruning understates what the kept weights can do (adaptive BN, as in
    EagleEye). Measured on the demo baseline: a 30% cut scored mAP@0.5:0.95 0.010 before and 0.065
    after 128 images. It does not change finetuning (training mode normalizes by batch statistics).
    """
    from slimloop.data.dataset import DetectionDataset, make_loader

    if images <= 0:
        return model
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches seen
    loader = make_loader(DetectionDataset(data_root, "train", imgsz, None, seed=seed), batch_size,
                         shuffle=True, workers=0, seed=seed, epoch=0)
    device, was_training, seen = next(model.parameters()).device, model.training, 0
    model.train()
    try:
        for imgs, _, _ in loader:
            model(imgs[: images - seen].to(device).float().div_(255))
            seen += min(len(imgs), images - seen)
            if seen >= images:
                break
    finally:
        model.train(was_training)
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
    return model
