"""YOLOv5 building blocks with explicit widths: Conv, Bottleneck, C3, SPPF, Concat, Detect."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

BN_EPS = 1e-3
BN_MOMENTUM = 0.03


class Conv(nn.Module):
    """Conv2d (no bias) + BatchNorm2d + SiLU, the unit every prunable width lives in."""

    def __init__(self, in_chs: int, out_chs: int, kernel: int = 1, stride: int = 1, padding: int | None = None):
        super().__init__()
        padding = kernel // 2 if padding is None else padding
        self.conv = nn.Conv2d(in_chs, out_chs, kernel, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(out_chs, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.act = nn.SiLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self.conv(x)))  # (B, out_chs, H / stride, W / stride)


class Bottleneck(nn.Module):
    """1x1 conv to ``hidden_chs``, 3x3 conv to ``out_chs``, plus the input when ``shortcut``."""

    def __init__(self, in_chs: int, hidden_chs: int, out_chs: int, shortcut: bool):
        super().__init__()
        if shortcut and in_chs != out_chs:
            raise ValueError(f"a shortcut bottleneck needs in_chs == out_chs, got {in_chs} and {out_chs}")
        self.cv1 = Conv(in_chs, hidden_chs, 1)
        self.cv2 = Conv(hidden_chs, out_chs, 3)
        self.add = shortcut

    def forward(self, x: Tensor) -> Tensor:
        y = self.cv2(self.cv1(x))  # (B, out_chs, H, W)
        return x + y if self.add else y


class C3(nn.Module):
    """CSP bottleneck block: cv3(concat(m(cv1(x)), cv2(x)))."""

    def __init__(
        self,
        in_chs: int,
        hidden_chs: int,
        skip_chs: int,
        bottlenecks: Sequence[tuple[int, int]],
        out_chs: int,
        shortcut: bool,
    ):
        """Args:
        in_chs: input width.
        hidden_chs: cv1's out (the bottleneck chain's input).
        skip_chs: cv2's out (the bypass branch).
        bottlenecks: ``(hidden_chs, out_chs)`` of each bottleneck, in order.
        out_chs: cv3's out.
        shortcut: residual adds inside the bottlenecks.
        """
        super().__init__()
        self.cv1 = Conv(in_chs, hidden_chs, 1)
        self.cv2 = Conv(in_chs, skip_chs, 1)
        blocks, width = [], hidden_chs
        for b_hidden, b_out in bottlenecks:
            blocks.append(Bottleneck(width, b_hidden, b_out, shortcut))
            width = b_out
        self.m = nn.Sequential(*blocks)
        self.cv3 = Conv(width + skip_chs, out_chs, 1)

    def forward(self, x: Tensor) -> Tensor:
        y = torch.cat((self.m(self.cv1(x)), self.cv2(x)), 1)  # (B, last_out + skip_chs, H, W)
        return self.cv3(y)


class SPPF(nn.Module):
    """Spatial pyramid pooling, fast: three chained max-pools instead of parallel 5/9/13."""

    def __init__(self, in_chs: int, hidden_chs: int, out_chs: int, kernel: int = 5):
        super().__init__()
        self.cv1 = Conv(in_chs, hidden_chs, 1)
        self.cv2 = Conv(hidden_chs * 4, out_chs, 1)
        self.m = nn.MaxPool2d(kernel_size=kernel, stride=1, padding=kernel // 2)

    def forward(self, x: Tensor) -> Tensor:
        x = self.cv1(x)  # (B, hidden, H, W)
        y1 = self.m(x)
        y2 = self.m(y1)
        return self.cv2(torch.cat((x, y1, y2, self.m(y2)), 1))  # (B, out_chs, H, W)


class Concat(nn.Module):
    """Concatenate a list of tensors along channels."""

    def __init__(self, dim: int = 1):
        super().__init__()
        self.dim = dim

    def forward(self, xs: list[Tensor]) -> Tensor:
        return torch.cat(xs, self.dim)


class Detect(nn.Module):
    """YOLOv5 head: a 1x1 conv per level, and the box decode used in eval and ONNX export.

    Buffers ``anchors`` ``(nl, na, 2)`` in input pixels and ``stride`` ``(nl,)`` come from the
    spec; they are not saved in the state dict (the spec is their single source of truth).
    """

    def __init__(self, in_chs: Sequence[int], nc: int, anchors: Tensor, strides: Sequence[int]):
        super().__init__()
        anchors = torch.as_tensor(anchors, dtype=torch.float32)  # (nl, na, 2) px
        self.nc, self.nl, self.na = nc, anchors.shape[0], anchors.shape[1]
        self.no = nc + 5
        self.register_buffer("anchors", anchors.clone(), persistent=False)
        self.register_buffer("stride", torch.tensor(strides, dtype=torch.float32), persistent=False)
        self.m = nn.ModuleList(nn.Conv2d(c, self.na * self.no, 1) for c in in_chs)
        self.init_biases()

    @torch.no_grad()
    def init_biases(self, imgsz: int = 640) -> None:
        """YOLOv5 prior: about 8 objects per ``imgsz`` image, class probability 0.6 / nc."""
        for conv, s in zip(self.m, self.stride.tolist(), strict=True):
            b = conv.bias.view(self.na, self.no)
            b[:, 4] += math.log(8 / (imgsz / s) ** 2)
            b[:, 5:] += math.log(0.6 / (self.nc - 0.99))

    def forward(self, feats: Sequence[Tensor]) -> list[Tensor]:
        """Raw maps: one ``(B, na, H_i, W_i, 5 + nc)`` per level."""
        out = []
        for conv, x in zip(self.m, feats, strict=True):
            y = conv(x)  # (B, na * no, H, W)
            b, _, h, w = y.shape
            out.append(y.view(b, self.na, self.no, h, w).permute(0, 1, 3, 4, 2).contiguous())
        return out

    def decode(self, raw: Sequence[Tensor]) -> Tensor:
        """Boxes ``(B, N, 5 + nc)``: cx, cy, w, h in input pixels, then probabilities.

        The grid is built on every call from the map's own shape, so any input size (and a
        dynamic batch in ONNX) decodes correctly without a cache.
        """
        out = []
        for i, p in enumerate(raw):
            b, na, h, w, no = p.shape  # (B, na, H, W, no)
            gy = torch.arange(h, device=p.device, dtype=p.dtype).view(1, 1, h, 1)
            gx = torch.arange(w, device=p.device, dtype=p.dtype).view(1, 1, 1, w)
            grid = torch.stack((gx.expand(1, 1, h, w), gy.expand(1, 1, h, w)), -1)  # (1, 1, H, W, 2)
            anchor = self.anchors[i].to(p.dtype).view(1, na, 1, 1, 2)
            y = p.sigmoid()
            xy = (y[..., :2] * 2 - 0.5 + grid) * self.stride[i].to(p.dtype)
            wh = (y[..., 2:4] * 2) ** 2 * anchor
            out.append(torch.cat((xy, wh, y[..., 4:]), -1).reshape(b, -1, no))  # (B, na*H*W, no)
        return torch.cat(out, 1)
