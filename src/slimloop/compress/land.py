"""Landing on the target: the smallest cut whose padded structure meets every size target.

Costs are counted on the spec alone (no weights, no data): GFLOPs at a 32 px probe, whose ratio to
the baseline's is the same at every input size (every counted FLOP is a convolution whose output
grows with the input area), and parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor

from slimloop.compress.groups import Topology
from slimloop.model.build import build_model, with_conv_widths
from slimloop.model.spec import ModelSpec

PROBE_PX = 32


@dataclass(frozen=True)
class SizeTarget:
    """Ceilings on the padded structure's cost; None = no ceiling on that cost."""

    gflops: float | None  # GFLOPs at PROBE_PX
    params: int | None
    multiple: int  # pad.multiple: the cost is that of the padded widths

    def met(self, cost: tuple[float, int]) -> bool:
        """Whether ``(gflops at PROBE_PX, params)`` is within every ceiling."""
        gflops, params = cost
        return ((self.gflops is None or gflops <= self.gflops * (1 + 1e-9))
                and (self.params is None or params <= self.params))


def spec_cost(spec: ModelSpec) -> tuple[float, int]:
    """``(GFLOPs at PROBE_PX, parameters)`` of ``spec``."""
    from slimloop.profile import count_params, gflops

    model = build_model(spec)
    return gflops(model, PROBE_PX), count_params(model)


def kept_counts(scores: dict[str, Tensor], pruned: int, min_channels: int) -> dict[str, int]:
    """Channels each group keeps when the ``pruned`` lowest scores (globally) go, at least
    ``min_channels`` per group: the same rule as :func:`slimloop.compress.prune.select_channels`."""
    flat = sorted(float(v) for s in scores.values() for v in s)
    threshold = flat[pruned - 1] if pruned > 0 else -math.inf
    return {g: max(min(min_channels, s.numel()), int((s > threshold).sum())) for g, s in scores.items()}


def padded_spec(spec: ModelSpec, topo: Topology, kept: dict[str, int], multiple: int) -> ModelSpec:
    """``spec`` with every group at its kept count rounded up to ``multiple`` (at most its width)."""
    width = {g: min(grp.width, math.ceil(kept[g] / multiple) * multiple) for g, grp in topo.groups.items()}
    return with_conv_widths(spec, {conv: width[g] for conv, g in topo.group_of.items()})


def smallest_cut(spec: ModelSpec, topo: Topology, scores: dict[str, Tensor], most: int, min_channels: int,
                 target: SizeTarget) -> int | None:
    """The fewest channels to prune (at most ``most``) whose padded structure meets ``target``,
    by bisection (the cost never grows as more channels go); None when ``most`` does not meet it."""
    def meets(pruned: int) -> bool:
        return target.met(spec_cost(padded_spec(spec, topo, kept_counts(scores, pruned, min_channels),
                                                target.multiple)))

    if not meets(most):
        return None
    lo, hi = 0, most  # meets(hi) is true; find the smallest such count
    if meets(lo):
        return 0
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if meets(mid) else (mid, hi)
    return hi
