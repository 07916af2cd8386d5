"""Non-maximum suppression and the inverse letterbox."""

from __future__ import annotations

import torch

from slimloop.postprocess import non_max_suppression, scale_boxes_to_original, xywh2xyxy


def pred(rows: list[list[float]]) -> torch.Tensor:
    """(1, N, 5 + nc) decoded predictions from rows cx, cy, w, h, obj, cls probs..."""
    return torch.tensor([rows], dtype=torch.float32)


def test_xywh2xyxy():
    out = xywh2xyxy(torch.tensor([[10.0, 20.0, 4.0, 6.0]]))
    assert out.tolist() == [[8.0, 17.0, 12.0, 23.0]]


def test_overlapping_same_class_keeps_higher_score():
    p = pred([[50, 50, 20, 20, 0.6, 1.0, 0.0], [51, 50, 20, 20, 0.9, 1.0, 0.0]])
    (out,) = non_max_suppression(p, conf_thres=0.1, iou_thres=0.5)
    assert out.shape == (1, 6)
    torch.testing.assert_close(out[0], torch.tensor([41.0, 40.0, 61.0, 60.0, 0.9, 0.0]))


def test_overlapping_different_classes_both_kept():
    p = pred([[50, 50, 20, 20, 0.6, 1.0, 0.0], [51, 50, 20, 20, 0.9, 0.0, 1.0]])
    (out,) = non_max_suppression(p, conf_thres=0.1, iou_thres=0.5)
    assert out[:, 5].tolist() == [1.0, 0.0]  # sorted by score
    torch.testing.assert_close(out[:, 4], torch.tensor([0.9, 0.6]))


def test_score_is_objectness_times_best_class_probability():
    p = pred([[50, 50, 20, 20, 0.5, 0.2, 0.8]])
    (out,) = non_max_suppression(p, conf_thres=0.1, iou_thres=0.5)
    torch.testing.assert_close(out[0, 4:], torch.tensor([0.4, 1.0]))


def test_conf_threshold_filters_on_final_score():
    # objectness 0.9 passes but 0.9 * 0.2 = 0.18 does not
    p = pred([[50, 50, 20, 20, 0.9, 0.2, 0.0], [10, 10, 4, 4, 0.5, 0.9, 0.0]])
    (out,) = non_max_suppression(p, conf_thres=0.25, iou_thres=0.5)
    assert out.shape == (1, 6)
    torch.testing.assert_close(out[0, 4], torch.tensor(0.45))


def test_max_det_caps_and_keeps_best():
    rows = [[10 + 30 * i, 10, 8, 8, 0.1 + 0.08 * i, 1.0] for i in range(10)]  # disjoint boxes
    (out,) = non_max_suppression(pred(rows), conf_thres=0.01, iou_thres=0.5, max_det=3)
    assert out.shape == (3, 6)
    torch.testing.assert_close(out[:, 4], torch.tensor([0.82, 0.74, 0.66]))


def test_batch_and_empty_images():
    p = torch.zeros(2, 5, 7)
    p[1, 0] = torch.tensor([20, 20, 10, 10, 0.9, 0.0, 1.0])
    out = non_max_suppression(p, conf_thres=0.25, iou_thres=0.5)
    assert [o.shape for o in out] == [(0, 6), (1, 6)]


def test_scale_boxes_to_original_inverts_letterbox():
    meta = {"orig_shape": (100, 200), "ratio": 0.5, "pad": (0.0, 25.0)}
    boxes = torch.tensor([[10.0, 35.0, 60.0, 55.0], [-5.0, 20.0, 120.0, 90.0]])
    out = scale_boxes_to_original(boxes, meta)
    # (x - 0) / 0.5, (y - 25) / 0.5, clipped to w = 200, h = 100
    assert out.tolist() == [[20.0, 20.0, 120.0, 60.0], [0.0, 0.0, 200.0, 100.0]]
    assert boxes[1, 0] == -5.0  # input untouched
