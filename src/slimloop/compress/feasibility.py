"""Can the compression targets be met at all? Decided from the spec alone, before any training."""

from __future__ import annotations

import math
from dataclasses import dataclass

from slimloop.config import STRIDE, PadParams, Params, PruneParams
from slimloop.errors import ConfigError
from slimloop.model.build import build_model, with_conv_widths
from slimloop.model.spec import ModelSpec

EPS = 1e-9  # the loop's own slack when it compares GFLOPs with a target (slimloop.compress.loop.EPS)


@dataclass(frozen=True)
class Feasibility:
    """The narrowest model the loop can reach and its cost relative to the starting spec."""

    narrowest: ModelSpec
    gflops_ratio_floor: float  # narrowest GFLOPs / starting GFLOPs (the same at every input size)
    params_ratio_floor: float  # narrowest params / starting params


def narrowest_spec(spec: ModelSpec, prune: PruneParams, pad: PadParams) -> ModelSpec:
    """The smallest spec pruning and padding can produce from ``spec``.

    Every channel group keeps at least ``prune.min_channels`` (all of them if it has fewer), padding
    rounds that up to ``pad.multiple`` but never above the group's width: the same rules as
    :func:`slimloop.compress.prune.select_channels` and :func:`slimloop.compress.pad.pad_channels`.
    Costs grow with every width, so no model the loop produces is cheaper than this one.
    """
    from slimloop.compress.groups import topology

    topo = topology(spec)
    floor = {}
    for name, group in topo.groups.items():
        kept = min(prune.min_channels, group.width)
        multiple = 1 if pad.multiple == "auto" else pad.multiple  # auto may choose 1: the smallest floor
        floor[name] = min(group.width, math.ceil(kept / multiple) * multiple)
    return with_conv_widths(spec, {conv: floor[group] for conv, group in topo.group_of.items()})


def check_targets_reachable(spec: ModelSpec, params: Params) -> Feasibility:
    """Refuse targets that even the narrowest model the pruner allows cannot meet.

    Only ``target.gflops_ratio`` and ``target.params_ratio`` can be decided without training;
    ``target.latency_ms`` needs a measurement and is not checked. Every counted FLOP is a
    convolution whose output grows with the input area, so the GFLOPs ratio is the same at every
    input size (measured: equal to 1e-16 from 32 to 256 px); it is computed at 32 px, in well
    under a second.

    Args:
        spec: the starting model (the baseline checkpoint's spec).
        params: reads ``prune.min_channels``, ``pad.multiple`` and ``target``.

    Returns:
        The narrowest spec and its GFLOPs and params ratios.

    Raises:
        ConfigError: naming each unreachable target key, the floor it is below, and what to change.
    """
    from slimloop.profile import count_params, gflops

    narrow = narrowest_spec(spec, params.prune, params.pad)
    base_model, narrow_model = build_model(spec), build_model(narrow)
    base_gflops, narrow_gflops = gflops(base_model, STRIDE), gflops(narrow_model, STRIDE)
    base_params, narrow_params = count_params(base_model), count_params(narrow_model)
    result = Feasibility(narrow, narrow_gflops / base_gflops, narrow_params / base_params)
    why = (f"the narrowest model the pruner allows (every channel group at prune.min_channels = "
           f"{params.prune.min_channels}, rounded up to pad.multiple = {params.pad.multiple})")
    problems = []
    target = params.target
    if target.gflops_ratio is not None and narrow_gflops > target.gflops_ratio * base_gflops + EPS:
        problems.append(
            f"target.gflops_ratio: {target.gflops_ratio:g} cannot be reached: {why} still has "
            f"{result.gflops_ratio_floor:.4f} of the baseline's GFLOPs; raise the target "
            f"to at least that, or lower prune.min_channels or pad.multiple")
    if target.params_ratio is not None and narrow_params > target.params_ratio * base_params:
        problems.append(
            f"target.params_ratio: {target.params_ratio:g} cannot be reached: {why} still has "
            f"{result.params_ratio_floor:.4f} of the baseline's parameters; raise the target to at "
            f"least that, or lower prune.min_channels or pad.multiple")
    if problems:
        raise ConfigError("unreachable target:\n  " + "\n  ".join(problems))
    return result
