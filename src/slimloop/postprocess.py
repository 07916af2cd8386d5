"""Detector output to final boxes: confidence filter, per-class NMS, undo the letterbox."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torchvision.ops import batched_nms

MAX_NMS_CANDIDATES = 30000  # boxes per image entering NMS; bounds its quadratic cost


def xywh2xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """Convert ``cx, cy, w, h`` boxes to ``x1, y1, x2, y2``.

    Args:
        boxes: ``(..., 4)`` boxes as centre and size.

    Returns:
        A new ``(..., 4)`` tensor of corner boxes.
    """
    xy, wh = boxes[..., :2], boxes[..., 2:4] / 2
    return torch.cat((xy - wh, xy + wh), dim=-1)


def _nms_one(
    pred: torch.Tensor, conf_thres: float, iou_thres: float, max_det: int
) -> torch.Tensor:
    """NMS for one image: ``pred (N, 5 + nc)`` -> ``(n, 6)``."""
    pred = pred[pred[:, 4] > conf_thres]  # objectness alone bounds the final score
    scores = pred[:, 5:] * pred[:, 4:5]  # (n, nc) obj * class probability
    conf, cls = scores.max(dim=1)  # (n,) best class only
    keep = conf > conf_thres
    boxes, conf, cls = xywh2xyxy(pred[keep, :4]), conf[keep], cls[keep]
    if conf.numel() > MAX_NMS_CANDIDATES:
        top = conf.topk(MAX_NMS_CANDIDATES).indices
        boxes, conf, cls = boxes[top], conf[top], cls[top]
    kept = batched_nms(boxes.float(), conf.float(), cls, iou_thres)[:max_det]  # sorted by score
    return torch.cat((boxes[kept], conf[kept, None], cls[kept, None].to(boxes.dtype)), dim=1)


def non_max_suppression(
    pred: torch.Tensor, conf_thres: float, iou_thres: float, max_det: int = 300
) -> list[torch.Tensor]:
    """Filter decoded predictions by score and suppress overlaps within each class.

    The score of a box is ``objectness * class probability`` of its best class (one label per
    box). Boxes scoring ``<= conf_thres`` are dropped, at most ``MAX_NMS_CANDIDATES`` of the
    rest enter NMS, and the ``max_det`` best survivors are kept.

    Args:
        pred: ``(B, N, 5 + nc)`` decoded output: ``cx, cy, w, h`` in input pixels, objectness,
            then class probabilities.
        conf_thres: score threshold.
        iou_thres: boxes of one class overlapping a better one by more than this IoU are removed.
        max_det: detections kept per image.

    Returns:
        One ``(n, 6)`` tensor per image, rows ``x1, y1, x2, y2, score, cls``, by descending score.
    """
    if pred.ndim != 3 or pred.shape[-1] < 6:
        raise ValueError(f"expected predictions of shape (B, N, 5 + nc), got {tuple(pred.shape)}")
    return [_nms_one(p, conf_thres, iou_thres, max_det) for p in pred]


def scale_boxes_to_original(boxes: torch.Tensor, meta: Mapping[str, Any]) -> torch.Tensor:
    """Map ``xyxy`` boxes from the letterboxed input back to original-image pixels.

    Inverse of the letterbox: ``orig_xy = (xy - pad) / ratio``, then clipped to the image.

    Args:
        boxes: ``(n, 4)`` ``x1, y1, x2, y2`` in letterboxed-input pixels.
        meta: the dataset's meta dict with ``orig_shape (h, w)``, ``ratio`` and ``pad (padw, padh)``.

    Returns:
        A new ``(n, 4)`` tensor in original-image pixels.
    """
    ratio = meta["ratio"]
    rw, rh = ratio if isinstance(ratio, (tuple, list)) else (ratio, ratio)
    padw, padh = meta["pad"]
    h, w = meta["orig_shape"]
    out = boxes.clone()
    out[:, [0, 2]] = ((out[:, [0, 2]] - padw) / rw).clamp(0, w)
    out[:, [1, 3]] = ((out[:, [1, 3]] - padh) / rh).clamp(0, h)
    return out
