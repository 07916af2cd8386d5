"""YOLOv5 loss: shape-ratio target assignment with neighbour cells, CIoU box, BCE obj and cls."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimloop.config import LossParams

# neighbour-cell offsets (self, left, up, right, down) times g = 0.5, as YOLOv5 build_targets
_G = 0.5
_OFFSETS = ((0, 0), (1, 0), (0, 1), (-1, 0), (0, -1))


def bbox_iou(box1: Tensor, box2: Tensor, eps: float = 1e-7) -> Tensor:
    """Complete IoU (CIoU, Zheng et al. 2020) of paired boxes.

    Args:
        box1: ``(..., 4)`` cx, cy, w, h.
        box2: ``(..., 4)`` cx, cy, w, h, same shape as ``box1``.
        eps: guards the divisions.

    Returns:
        ``(...)`` CIoU = IoU - centre distance^2 / enclosing diagonal^2 - alpha * v; 1 for
        identical boxes, negative for disjoint far-apart ones.
    """
    (x1, y1, w1, h1), (x2, y2, w2, h2) = box1.unbind(-1), box2.unbind(-1)
    w1, h1, w2, h2 = w1.clamp(min=eps), h1.clamp(min=eps), w2.clamp(min=eps), h2.clamp(min=eps)
    b1x1, b1x2, b1y1, b1y2 = x1 - w1 / 2, x1 + w1 / 2, y1 - h1 / 2, y1 + h1 / 2
    b2x1, b2x2, b2y1, b2y2 = x2 - w2 / 2, x2 + w2 / 2, y2 - h2 / 2, y2 + h2 / 2
    inter = (torch.minimum(b1x2, b2x2) - torch.maximum(b1x1, b2x1)).clamp(min=0) * (
        torch.minimum(b1y2, b2y2) - torch.maximum(b1y1, b2y1)
    ).clamp(min=0)
    union = w1 * h1 + w2 * h2 - inter + eps
    iou = inter / union
    cw = torch.maximum(b1x2, b2x2) - torch.minimum(b1x1, b2x1)  # enclosing box width
    ch = torch.maximum(b1y2, b2y2) - torch.minimum(b1y1, b2y1)
    diag2 = cw**2 + ch**2 + eps
    rho2 = (x2 - x1) ** 2 + (y2 - y1) ** 2  # squared centre distance
    v = (4 / math.pi**2) * (torch.atan(w2 / h2) - torch.atan(w1 / h1)) ** 2
    with torch.no_grad():
        alpha = v / (v - iou + (1 + eps))
    return iou - (rho2 / diag2 + v * alpha)


class LevelTargets(NamedTuple):
    """Positive samples of one level: image, anchor, cell row and column, box, anchor, class."""

    b: Tensor  # (n,) image index in batch
    a: Tensor  # (n,) anchor index
    gj: Tensor  # (n,) cell row
    gi: Tensor  # (n,) cell column
    box: Tensor  # (n, 4) cx, cy relative to the cell's corner (in [-0.5, 1.5]), w, h in grid units
    anchor: Tensor  # (n, 2) matched anchor w, h in grid units
    cls: Tensor  # (n,) class index


class ComputeLoss:
    """YOLOv5's ComputeLoss with the hyp gains scaled for the number of levels, classes and size.

    Anchors and strides are read from ``model.detect`` on every call, so the loss follows the
    model across devices.
    """

    def __init__(self, model: nn.Module, params: LossParams, imgsz: int = 640):
        """Args:
        model: a Detector (its ``detect`` head supplies anchors, strides, nc).
        params: gains, anchor ratio threshold and per-level objectness balance.
        imgsz: training image size; objectness gain scales with (imgsz / 640)^2 as in YOLOv5.
        """
        self.detect = model.detect
        nl, nc = self.detect.nl, self.detect.nc
        if len(params.balance) != nl:
            raise ValueError(f"loss balance has {len(params.balance)} levels, the model has {nl}")
        self.nc, self.nl, self.na = nc, nl, self.detect.na
        self.anchor_t = params.anchor_t
        self.balance = tuple(params.balance)
        self.box_gain = params.box * 3 / nl
        self.cls_gain = params.cls * nc / 80 * 3 / nl
        self.obj_gain = params.obj * (imgsz / 640) ** 2 * 3 / nl
        self.bce = nn.BCEWithLogitsLoss()
        # data-parallel training sets this to a sum over ranks (slimloop.distributed.all_sum): the
        # box and class means then divide by the global number of matches, so that the ranks' losses
        # add up to the loss one process computes on the global batch
        self.reduce: Callable[[Tensor], Tensor] | None = None

    def _counts(self, built: list, bs: int, device: torch.device) -> list[float] | None:
        """Per level, what the box and class sums divide by under DDP: the global matches times this
        rank's share of the global batch (None in a single process: plain means)."""
        if self.reduce is None:
            return None
        local = torch.tensor([t.b.numel() for t in built] + [bs], dtype=torch.float64, device=device)
        total = self.reduce(local)  # (nl + 1,) matches per level, global batch size
        return (total[:-1] * bs / total[-1]).tolist()

    def __call__(self, raw: Sequence[Tensor], targets: Tensor) -> tuple[Tensor, dict[str, float]]:
        """Loss of raw maps against ``targets (M, 6) [img_idx, cls, cx, cy, w, h]`` (normalized).

        Returns:
            ``(loss * batch_size, {"box", "obj", "cls"})``, the items detached floats after gains.
        """
        device = raw[0].device
        lbox, lobj, lcls = (torch.zeros((), device=device) for _ in range(3))
        built = self.build_targets(raw, targets)
        bs = raw[0].shape[0]
        counts = self._counts(built, bs, device) or [None] * self.nl
        for pi, t, balance, n in zip(raw, built, self.balance, counts, strict=True):
            tobj = torch.zeros(pi.shape[:4], dtype=pi.dtype, device=device)  # (B, na, H, W)
            if t.b.numel():
                pxy, pwh, _, pcls = pi[t.b, t.a, t.gj, t.gi].split((2, 2, 1, self.nc), 1)  # (n, .)
                pxy = pxy.sigmoid() * 2 - 0.5
                pwh = (pwh.sigmoid() * 2) ** 2 * t.anchor
                iou = bbox_iou(torch.cat((pxy, pwh), 1), t.box)  # (n,)
                lbox = lbox + ((1.0 - iou).mean() if n is None else (1.0 - iou).sum() / n)
                tobj[t.b, t.a, t.gj, t.gi] = iou.detach().clamp(min=0).to(tobj.dtype)  # gr = 1.0
                if self.nc > 1:  # YOLOv5 skips the class loss of single-class models
                    tcls = torch.zeros_like(pcls)
                    tcls[torch.arange(len(t.cls), device=device), t.cls] = 1.0
                    lcls = lcls + (self.bce(pcls, tcls) if n is None else
                                   F.binary_cross_entropy_with_logits(pcls, tcls, reduction="sum") / (n * self.nc))
            lobj = lobj + self.bce(pi[..., 4], tobj) * balance
        lbox, lobj, lcls = lbox * self.box_gain, lobj * self.obj_gain, lcls * self.cls_gain
        items = {"box": float(lbox.detach()), "obj": float(lobj.detach()), "cls": float(lcls.detach())}
        return (lbox + lobj + lcls) * bs, items

    def build_targets(self, raw: Sequence[Tensor], targets: Tensor) -> list[LevelTargets]:
        """Assign each target to every anchor within ``anchor_t`` of its shape, in its own cell
        and the two neighbouring cells nearest its centre (YOLOv5's g = 0.5 rule).

        Args:
            raw: raw maps ``(B, na, H_i, W_i, 5 + nc)``.
            targets: ``(M, 6) [img_idx, cls, cx, cy, w, h]`` normalized to the image.

        Returns:
            One ``LevelTargets`` per level.
        """
        device, na, nt = raw[0].device, self.na, targets.shape[0]
        targets = targets.to(device=device, dtype=torch.float32)
        anchors_grid = (self.detect.anchors / self.detect.stride.view(-1, 1, 1)).to(device)  # (nl, na, 2)
        ai = torch.arange(na, device=device, dtype=torch.float32).view(na, 1).expand(na, nt)
        tg = torch.cat((targets.expand(na, nt, 6), ai[..., None]), 2)  # (na, nt, 7) + anchor idx
        off = torch.tensor(_OFFSETS, device=device, dtype=torch.float32) * _G  # (5, 2)
        gain = torch.ones(7, device=device)
        out = []
        for i, p in enumerate(raw):
            anchors, (h, w) = anchors_grid[i], p.shape[2:4]
            gain[2:6] = torch.tensor((w, h, w, h), device=device, dtype=torch.float32)
            t = tg * gain  # (na, nt, 7) in grid units
            r = t[..., 4:6] / anchors[:, None]  # (na, nt, 2) wh ratio to each anchor
            t = t[torch.maximum(r, 1 / r).amax(2) < self.anchor_t]  # (n, 7)
            gxy = t[:, 2:4]
            gxi = gain[[2, 3]] - gxy  # distance from the far edge
            left, up = ((gxy % 1 < _G) & (gxy > 1)).T  # centre in the cell's left / upper half
            right, down = ((gxi % 1 < _G) & (gxi > 1)).T
            mask = torch.stack((torch.ones_like(left), left, up, right, down))  # (5, n)
            t = t.repeat((5, 1, 1))[mask]  # (n', 7)
            offsets = (torch.zeros_like(gxy)[None] + off[:, None])[mask]  # (n', 2)
            gxy, gwh = t[:, 2:4], t[:, 4:6]
            gij = (gxy - offsets).long()
            gi, gj = gij[:, 0].clamp(0, w - 1), gij[:, 1].clamp(0, h - 1)
            gij = torch.stack((gi, gj), 1)  # YOLOv5 clamps in place, so the box offset uses it too
            a = t[:, 6].long()
            out.append(LevelTargets(
                b=t[:, 0].long(), a=a, gj=gj, gi=gi,
                box=torch.cat((gxy - gij, gwh), 1), anchor=anchors[a], cls=t[:, 1].long(),
            ))
        return out
