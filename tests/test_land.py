"""Landing on the size target: the fewest channels cut whose padded structure meets it."""

import torch

from slimloop.compress.groups import topology
from slimloop.compress.land import SizeTarget, kept_counts, padded_spec, smallest_cut, spec_cost
from slimloop.compress.prune import select_channels


def test_kept_counts_follow_the_global_selection(tiny_spec):
    topo = topology(tiny_spec)
    gen = torch.Generator().manual_seed(0)
    scores = {g: torch.rand(grp.width, generator=gen) for g, grp in topo.groups.items()}
    total = sum(s.numel() for s in scores.values())
    for pruned in (0, 17, total // 2):
        keep = select_channels(scores, pruned / total, min_channels=2)
        assert kept_counts(scores, pruned, 2) == {g: int(m.sum()) for g, m in keep.items()}


def test_smallest_cut_just_meets_the_target(tiny_spec):
    topo = topology(tiny_spec)
    gen = torch.Generator().manual_seed(1)
    scores = {g: torch.rand(grp.width, generator=gen) for g, grp in topo.groups.items()}
    total = sum(s.numel() for s in scores.values())
    base_gflops, base_params = spec_cost(tiny_spec)
    target = SizeTarget(0.7 * base_gflops, None, 8)

    def cost(n):
        return spec_cost(padded_spec(tiny_spec, topo, kept_counts(scores, n, 2), 8))

    fewest = smallest_cut(tiny_spec, topo, scores, total // 2, 2, target)
    assert fewest is not None and 0 < fewest < total // 2
    assert target.met(cost(fewest)) and not target.met(cost(fewest - 1))  # the fewest that meet it
    assert smallest_cut(tiny_spec, topo, scores, 3, 2, target) is None  # a small cut cannot reach it
    both = SizeTarget(0.9 * base_gflops, int(0.5 * base_params), 8)
    n = smallest_cut(tiny_spec, topo, scores, total - 1, 2, both)
    assert both.met(cost(n)) and cost(n)[1] <= 0.5 * base_params


def test_reach_cuts_more_than_the_step_only_to_meet_the_target(tiny_spec):
    """A step that falls short of the target: without reach it stays the step; with reach it is
    raised to the fewest channels that meet the target, and left alone when even reach cannot."""
    from slimloop.compress.prune import _land
    from slimloop.model.build import build_model

    model = build_model(tiny_spec)
    topo = topology(tiny_spec)
    gen = torch.Generator().manual_seed(1)
    scores = {g: torch.rand(grp.width, generator=gen) for g, grp in topo.groups.items()}
    total = sum(s.numel() for s in scores.values())
    target = SizeTarget(0.7 * spec_cost(tiny_spec)[0], None, 8)
    fewest = smallest_cut(tiny_spec, topo, scores, total - 1, 2, target)
    short = (fewest - 1) / total  # a step just short of the target
    assert _land(model, topo, scores, short, 2, target) == (short, False)
    ratio, landed = _land(model, topo, scores, short, 2, target, reach=0.9)
    assert landed and ratio == fewest / total
    assert _land(model, topo, scores, 3 / total, 2, target, reach=5 / total) == (3 / total, False)  # out of reach
    assert _land(model, topo, scores, 0.9, 2, target, reach=0.95)[0] == fewest / total  # overshoot: lands lower
