"""Under DDP the losses normalize by global counts: two half batches, each scaled by its size, add up
to the loss of the whole batch (what makes 2 processes equal 1). Checked in one process, the
all-reduce replaced by the sum of both halves' local counts."""

from __future__ import annotations

import pytest
import torch

from slimloop.compress.distill import DistillWeights, output_distill_loss
from slimloop.config import LossParams
from slimloop.model import build_model
from slimloop.model.loss import ComputeLoss


def _two_ranks(run):
    """``run(reduce, half)`` on halves 0 and 1 with reduce = the sum of both halves' tensors."""
    seen = []
    for half in (0, 1):  # first pass: each half's local tensor
        run(lambda t: seen.append(t.clone()) or t, half)
    total = seen[0] + seen[1]
    return [run(lambda t: total.clone(), half) for half in (0, 1)]


def test_detection_loss_of_two_halves_adds_up_to_the_whole(tiny_spec):
    torch.manual_seed(0)
    model = build_model(tiny_spec).train()
    x = torch.rand(6, 3, 128, 128)
    # 6 images, uneven boxes: 3 in the first half, 1 in the second (per-rank means would differ)
    targets = torch.tensor([[0, 0, .3, .3, .2, .3], [1, 1, .6, .5, .4, .4], [2, 0, .5, .5, .1, .1],
                            [2, 1, .2, .7, .3, .2], [4, 0, .5, .4, .5, .6]])
    raw = model(x)  # (B, na, H, W, 5 + nc) per level
    loss = ComputeLoss(model, LossParams(), 128)
    whole, _ = loss(raw, targets)
    halves = []
    for half in (0, 1):
        keep = (targets[:, 0] >= 3 * half) & (targets[:, 0] < 3 * half + 3)
        t = targets[keep].clone()
        t[:, 0] -= 3 * half
        halves.append(([r[3 * half : 3 * half + 3] for r in raw], t))

    def run(reduce, half):
        loss.reduce = reduce
        return loss(*halves[half])[0]

    parts = _two_ranks(run)
    assert float(parts[0] + parts[1]) == pytest.approx(float(whole), rel=1e-5)
    loss.reduce = None  # per-rank means: not the whole batch's loss
    assert float(loss(*halves[0])[0] + loss(*halves[1])[0]) != pytest.approx(float(whole), rel=1e-3)


def test_distillation_terms_of_two_halves_add_up_to_the_whole():
    torch.manual_seed(0)
    shapes = [(6, 3, 16, 16, 7), (6, 3, 8, 8, 7), (6, 3, 4, 4, 7)]
    student = [torch.randn(s) for s in shapes]
    teacher = [torch.randn(s) * 2 for s in shapes]  # objectness spread: uneven confident counts
    w = DistillWeights(box_conf=0.7)
    whole = output_distill_loss(student, teacher, w)

    def run(reduce, half):
        part = slice(3 * half, 3 * half + 3)
        return output_distill_loss([s[part] for s in student], [t[part] for t in teacher], w, reduce)

    parts = _two_ranks(run)
    for key, value in whole.items():  # each term times the batch size, as DistillLoss scales them
        assert float(parts[0][key] * 3 + parts[1][key] * 3) == pytest.approx(float(value * 6), rel=1e-5), key
    local = [run(None, h) for h in (0, 1)]
    assert float(local[0]["kd_box"] * 3 + local[1]["kd_box"] * 3) != pytest.approx(float(whole["kd_box"] * 6),
                                                                                  rel=1e-3)
