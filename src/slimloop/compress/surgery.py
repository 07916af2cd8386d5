"""Channel surgery: cut channels out of a detector (a new spec whose weights load strictly),
fold the constants they emit into their consumers, and re-estimate BN statistics after the cut."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from slimloop.compress.groups import Topology, input_mask, topology
from slimloop.model.build import Detector, build_model, conv_modules, conv_widths, with_conv_widths
from slimloop.model.spec import ModelSpec


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
        dropped = ~input_mask(topo, name, keep, model.spec.in_chs).to(probes[name].device)
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
            return value[:, input_mask(topo, owner, keep, in_chs).to(value.device)].clone()
        return value.clone()
    owner, sub, field = (parts[0], parts[1], parts[2]) if len(parts) == 3 else (None, None, None)
    if owner not in topo.group_of or sub not in ("conv", "bn"):
        return value.clone()
    out_mask = keep[topo.group_of[owner]].to(value.device)
    if field == "num_batches_tracked":
        return value.clone()
    value = value[out_mask]
    if sub == "conv":
        value = value[:, input_mask(topo, owner, keep, in_chs).to(value.device)]
    return value.clone()


def kept_fraction(before: ModelSpec, after: ModelSpec) -> float:
    """Fraction of prunable channels that remain."""
    b, a = conv_widths(before), conv_widths(after)
    return sum(a.values()) / sum(b.values())


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
