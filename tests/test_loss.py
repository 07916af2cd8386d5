"""YOLOv5 loss: CIoU, target assignment to anchors and cells, gains, and that it trains."""

from __future__ import annotations

import math

import pytest
import torch

from slimloop.config import LossParams
from slimloop.model import ComputeLoss, build_model, yolov5_spec
from slimloop.model.loss import bbox_iou

# anchors in px; at 64x64 the grids are 8, 4, 2 cells
ANCHORS = (
    ((16.0, 16.0), (40.0, 40.0), (100.0, 100.0)),  # stride 8: 2, 5, 12.5 cells
    ((48.0, 48.0), (80.0, 80.0), (120.0, 120.0)),  # stride 16: 3, 5, 7.5 cells
    ((200.0, 200.0), (300.0, 300.0), (400.0, 400.0)),
)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny convs run fastest on one thread, and the test machine's cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(nc: int = 2, anchors=ANCHORS):
    torch.manual_seed(0)
    return build_model(yolov5_spec("n", nc=nc, anchors=anchors, width_multiple=0.125))


def raw_maps(nc: int = 2, bs: int = 1, size: int = 64) -> list[torch.Tensor]:
    return [torch.zeros(bs, 3, size // s, size // s, 5 + nc) for s in (8, 16, 32)]


def test_ciou_identical_disjoint_and_known_value():
    box = torch.tensor([[10.0, 20.0, 4.0, 8.0], [0.5, 0.5, 1.0, 3.0]])
    torch.testing.assert_close(bbox_iou(box, box), torch.ones(2), atol=1e-6, rtol=0)
    far = torch.tensor([[30.0, 40.0, 4.0, 8.0], [5.0, 0.5, 1.0, 3.0]])
    assert (bbox_iou(box, far) < 0).all()
    # same size, shifted by 1 along x: IoU 1/3, enclosing 3x2 (diag^2 13), centre dist^2 1, v = 0
    a, b = torch.tensor([[0.0, 0.0, 2.0, 2.0]]), torch.tensor([[1.0, 0.0, 2.0, 2.0]])
    torch.testing.assert_close(bbox_iou(a, b), torch.tensor([1 / 3 - 1 / 13]))
    # aspect term: concentric 2x2 and 4x1, IoU 2/6, rho 0, enclosing 4x2
    c, d = torch.tensor([[0.0, 0.0, 2.0, 2.0]]), torch.tensor([[0.0, 0.0, 4.0, 1.0]])
    v = 4 / math.pi**2 * (math.atan(4.0) - math.atan(1.0)) ** 2
    iou = 2 / 6
    expected = iou - v * v / (v - iou + 1)
    torch.testing.assert_close(bbox_iou(c, d), torch.tensor([expected]), atol=1e-6, rtol=0)


def test_build_targets_box_equal_to_anchor_at_cell_centre():
    loss = ComputeLoss(tiny_model(), LossParams(), imgsz=64)
    # cell (row 4, column 3) centre of the 8x8 grid; box = first P3 anchor (16 px = 2 cells)
    targets = torch.tensor([[0.0, 1.0, 3.5 / 8, 4.5 / 8, 0.25, 0.25]])
    p3, p4, p5 = loss.build_targets(raw_maps(), targets)
    # P3: anchors 2 (ratio 1) and 5 cells (2.5 < 4) match, 12.5 (6.25) does not; exactly at the
    # centre neither half-cell test fires, so only the own cell
    assert p3.a.tolist() == [0, 1] and p3.gj.tolist() == [4, 4] and p3.gi.tolist() == [3, 3]
    assert p3.b.tolist() == [0, 0] and p3.cls.tolist() == [1, 1]
    torch.testing.assert_close(p3.box, torch.tensor([[0.5, 0.5, 2.0, 2.0]] * 2))
    torch.testing.assert_close(p3.anchor, torch.tensor([[2.0, 2.0], [5.0, 5.0]]))
    # P4 (4x4): centre at (1.75, 2.25), box 1 cell; only anchor 0 (3 cells) matches; own cell,
    # the cell above (y frac 0.25) and the cell to the right (x frac 0.75)
    assert p4.a.tolist() == [0, 0, 0]
    assert list(zip(p4.gi.tolist(), p4.gj.tolist(), strict=True)) == [(1, 2), (1, 1), (2, 2)]
    torch.testing.assert_close(p4.box[:, :2], torch.tensor([[0.75, 0.25], [0.75, 1.25], [-0.25, 0.25]]))
    assert p5.b.numel() == 0


def test_build_targets_off_centre_gets_two_neighbours_and_border_gets_none():
    loss = ComputeLoss(tiny_model(), LossParams(), imgsz=64)
    targets = torch.tensor([
        [0.0, 0.0, 3.25 / 8, 4.75 / 8, 0.25, 0.25],  # left half, lower half of cell (3, 4)
        [1.0, 0.0, 0.25 / 8, 0.25 / 8, 0.25, 0.25],  # top-left corner cell: no neighbours inside
    ])
    p3 = loss.build_targets(raw_maps(bs=2), targets)[0]
    cells = list(zip(p3.b.tolist(), p3.a.tolist(), p3.gi.tolist(), p3.gj.tolist(), strict=True))
    # order: own cells (target-major within each anchor), then left, then down neighbours
    assert cells == [(0, 0, 3, 4), (1, 0, 0, 0), (0, 1, 3, 4), (1, 1, 0, 0),
                     (0, 0, 2, 4), (0, 1, 2, 4), (0, 0, 3, 5), (0, 1, 3, 5)]
    torch.testing.assert_close(p3.box[4, :2], torch.tensor([1.25, 0.75]))  # seen from the left cell
    torch.testing.assert_close(p3.box[6, :2], torch.tensor([0.25, -0.25]))  # from the cell below


def test_gains_scale_like_yolov5_hyp():
    model = tiny_model(nc=2)
    loss = ComputeLoss(model, LossParams(box=0.05, obj=1.0, cls=0.5), imgsz=320)
    assert loss.box_gain == pytest.approx(0.05)
    assert loss.cls_gain == pytest.approx(0.5 * 2 / 80)
    assert loss.obj_gain == pytest.approx(0.25)
    with pytest.raises(ValueError, match="balance"):
        ComputeLoss(model, LossParams(balance=(4.0, 1.0)), imgsz=64)


def test_loss_items_sum_to_loss_over_batch_and_zero_targets_work():
    model = tiny_model().train()
    x = torch.rand(3, 3, 64, 64)
    compute = ComputeLoss(model, LossParams(), imgsz=64)
    targets = torch.tensor([[0, 1, 0.5, 0.5, 0.3, 0.1], [2, 0, 0.2, 0.7, 0.05, 0.4]])
    loss, items = compute(model(x), targets)
    assert set(items) == {"box", "obj", "cls"} and all(v > 0 for v in items.values())
    assert loss.item() == pytest.approx(3 * sum(items.values()), rel=1e-5)
    loss, items = compute(model(x), torch.zeros(0, 6))
    assert torch.isfinite(loss) and items["box"] == 0 and items["cls"] == 0 and items["obj"] > 0
    loss.backward()
    assert model.detect.m[0].bias.grad.abs().sum() > 0


def test_single_class_model_has_no_class_loss():
    model = tiny_model(nc=1).train()
    compute = ComputeLoss(model, LossParams(), imgsz=64)
    _, items = compute(model(torch.rand(1, 3, 64, 64)), torch.tensor([[0, 0, 0.5, 0.5, 0.3, 0.2]]))
    assert items["cls"] == 0 and items["box"] > 0


def test_loss_decreases_on_a_fixed_batch():
    model = tiny_model(nc=2).train()
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 64, 64, generator=gen)
    targets = torch.tensor([
        [0, 0, 0.3, 0.4, 0.4, 0.1], [0, 1, 0.7, 0.7, 0.2, 0.3], [1, 1, 0.5, 0.5, 0.6, 0.15],
    ])
    compute = ComputeLoss(model, LossParams(), imgsz=64)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    losses = []
    for _ in range(20):
        loss, _ = compute(model(x), targets)
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.9 * first and losses[-1] < losses[0], losses
