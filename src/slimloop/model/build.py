"""Build a Detector from a ModelSpec, and materialize YOLOv5 n/s/m definitions into specs."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from slimloop.model.blocks import C3, SPPF, Concat, Conv, Detect
from slimloop.model.spec import (
    BottleneckSpec,
    C3Spec,
    ConcatSpec,
    ConvSpec,
    DetectSpec,
    LayerSpec,
    ModelSpec,
    SpecError,
    SPPFSpec,
    UpsampleSpec,
)

# YOLOv5 COCO anchors (w, h) in pixels for P3/8, P4/16, P5/32
COCO_ANCHORS = (
    ((10.0, 13.0), (16.0, 30.0), (33.0, 23.0)),
    ((30.0, 61.0), (62.0, 45.0), (59.0, 119.0)),
    ((116.0, 90.0), (156.0, 198.0), (373.0, 326.0)),
)
# base -> (depth_multiple, width_multiple), as in YOLOv5's yolov5{n,s,m,l,x}.yaml
YOLOV5_MULTIPLES = {"n": (0.33, 0.25), "s": (0.33, 0.50), "m": (0.67, 0.75), "l": (1.0, 1.0), "x": (1.33, 1.25)}
# yolov5s.yaml (v6.0+) rows (src, repeats, type, args) before scaling; Detect reads 17, 20, 23
_YOLOV5_ROWS = (
    ((-1,), 1, "Conv", (64, 6, 2, 2)),  # 0 P1/2
    ((-1,), 1, "Conv", (128, 3, 2, 1)),  # 1 P2/4
    ((-1,), 3, "C3", (128, True)),
    ((-1,), 1, "Conv", (256, 3, 2, 1)),  # 3 P3/8
    ((-1,), 6, "C3", (256, True)),
    ((-1,), 1, "Conv", (512, 3, 2, 1)),  # 5 P4/16
    ((-1,), 9, "C3", (512, True)),
    ((-1,), 1, "Conv", (1024, 3, 2, 1)),  # 7 P5/32
    ((-1,), 3, "C3", (1024, True)),
    ((-1,), 1, "SPPF", (1024, 5)),  # 9
    ((-1,), 1, "Conv", (512, 1, 1, 0)),
    ((-1,), 1, "Upsample", (2,)),
    ((-1, 6), 1, "Concat", ()),  # cat backbone P4
    ((-1,), 3, "C3", (512, False)),  # 13
    ((-1,), 1, "Conv", (256, 1, 1, 0)),
    ((-1,), 1, "Upsample", (2,)),
    ((-1, 4), 1, "Concat", ()),  # cat backbone P3
    ((-1,), 3, "C3", (256, False)),  # 17 (P3/8 out)
    ((-1,), 1, "Conv", (256, 3, 2, 1)),
    ((-1, 14), 1, "Concat", ()),  # cat head P4
    ((-1,), 3, "C3", (512, False)),  # 20 (P4/16 out)
    ((-1,), 1, "Conv", (512, 3, 2, 1)),
    ((-1, 10), 1, "Concat", ()),  # cat head P5
    ((-1,), 3, "C3", (1024, False)),  # 23 (P5/32 out)
)
_YOLOV5_DETECT_FROM = (17, 20, 23)


def make_divisible(x: float, divisor: int = 8) -> int:
    """Smallest multiple of ``divisor`` that is >= ``x`` (YOLOv5's channel rounding)."""
    return math.ceil(x / divisor) * divisor


def _materialize_row(row: tuple, chs: list[int], gd: float, gw: float, in_chs: int) -> tuple[LayerSpec, int]:
    src, repeats, kind, args = row
    if kind == "Conv":
        out = make_divisible(args[0] * gw)
        return ConvSpec(src, out, args[1], args[2], args[3]), out
    if kind == "C3":
        out = make_divisible(args[0] * gw)
        hidden = int(out * 0.5)  # YOLOv5 C3: c_ = int(c2 * e), e = 0.5; bottlenecks use e = 1.0
        n = max(round(repeats * gd), 1) if repeats > 1 else repeats
        blocks = tuple(BottleneckSpec(hidden, hidden) for _ in range(n))
        return C3Spec(src, hidden, hidden, blocks, out, args[1]), out
    if kind == "SPPF":
        out = make_divisible(args[0] * gw)
        return SPPFSpec(src, in_chs // 2, out, args[1]), out  # YOLOv5 SPPF: c_ = c1 // 2
    if kind == "Upsample":
        return UpsampleSpec(src, args[0]), in_chs
    return ConcatSpec(src), sum(chs[len(chs) + s if s < 0 else s] for s in src)


def yolov5_spec(
    base: str = "n",
    nc: int = 80,
    names: Sequence[str] | None = None,
    anchors: Sequence[Sequence[Sequence[float]]] | None = None,
    width_multiple: float | None = None,
    depth_multiple: float | None = None,
) -> ModelSpec:
    """Materialize YOLOv5 (v6.0+) ``base`` into explicit widths and repeats, exactly as YOLOv5 does.

    Args:
        base: one of n, s, m, l, x (sets the default multiples).
        nc: number of classes.
        names: class names (default ``class0..``).
        anchors: ``(3, 3, 2)`` (w, h) in pixels for P3/P4/P5; default the COCO anchors.
        width_multiple: overrides the base's width multiple.
        depth_multiple: overrides the base's depth multiple.

    Returns:
        The spec; no ratio remains in it.
    """
    if base not in YOLOV5_MULTIPLES:
        raise SpecError(f"model base must be one of {', '.join(YOLOV5_MULTIPLES)}, got {base!r}")
    gd, gw = YOLOV5_MULTIPLES[base]
    gd = gd if depth_multiple is None else depth_multiple
    gw = gw if width_multiple is None else width_multiple
    layers: list[LayerSpec] = []
    chs: list[int] = []
    for row in _YOLOV5_ROWS:
        layer, out = _materialize_row(row, chs, gd, gw, chs[-1] if chs else 3)
        layers.append(layer)
        chs.append(out)
    anchors = COCO_ANCHORS if anchors is None else anchors
    detect = DetectSpec(
        src=_YOLOV5_DETECT_FROM,
        nc=nc,
        names=tuple(names) if names is not None else tuple(f"class{i}" for i in range(nc)),
        anchors=tuple(tuple((float(w), float(h)) for w, h in level) for level in anchors),
        strides=(8, 16, 32),
    )
    custom = width_multiple is not None or depth_multiple is not None
    name = f"yolov5{base}" + (f"-d{gd:g}-w{gw:g}" if custom else "")
    return ModelSpec(layers=tuple(layers), detect=detect, in_chs=3, name=name)


def _make_layer(layer: LayerSpec, in_chs: int) -> nn.Module:
    if isinstance(layer, ConvSpec):
        return Conv(in_chs, layer.out_chs, layer.kernel, layer.stride, layer.padding)
    if isinstance(layer, C3Spec):
        blocks = [(b.hidden_chs, b.out_chs) for b in layer.bottlenecks]
        return C3(in_chs, layer.hidden_chs, layer.skip_chs, blocks, layer.out_chs, layer.shortcut)
    if isinstance(layer, SPPFSpec):
        return SPPF(in_chs, layer.hidden_chs, layer.out_chs, layer.kernel)
    if isinstance(layer, UpsampleSpec):
        return nn.Upsample(scale_factor=layer.scale, mode="nearest")
    return Concat(1)


class Detector(nn.Module):
    """A YOLOv5-style detector built from (and carrying) its ``ModelSpec``.

    Input ``(B, 3, H, W)`` float in [0, 1], H and W multiples of the largest stride.
    """

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        chs = spec.out_channels()
        self.layers = nn.ModuleList(_make_layer(layer, spec.in_channels(i)) for i, layer in enumerate(spec.layers))
        # output slot 0 is the image, slot j + 1 is layer j's output
        self._routes = tuple(tuple(j + 1 for j in spec.sources(i)) for i in range(len(spec.layers)))
        self._heads = tuple(j + 1 for j in spec.sources(len(spec.layers)))
        d = spec.detect
        self.detect = Detect([chs[j - 1] for j in self._heads], d.nc, torch.tensor(d.anchors, dtype=torch.float32), d.strides)
        self.names = d.names

    def forward_features(self, x: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """Neck outputs feeding Detect (P3, P4, P5) and the raw maps, in any mode."""
        outs = [x]  # (B, 3, H, W)
        for layer, route in zip(self.layers, self._routes, strict=True):
            inp = [outs[j] for j in route] if len(route) > 1 else outs[route[0]]
            outs.append(layer(inp))
        feats = [outs[j] for j in self._heads]  # (B, C_i, H / s_i, W / s_i)
        return feats, self.detect(feats)

    def forward_raw(self, x: Tensor) -> list[Tensor]:
        """Raw maps ``(B, na, H_i, W_i, 5 + nc)`` per level, in any mode."""
        return self.forward_features(x)[1]

    def forward(self, x: Tensor) -> list[Tensor] | Tensor:
        """Training: raw maps per level. Eval: decoded ``(B, N, 5 + nc)``, cx cy w h in pixels."""
        raw = self.forward_raw(x)
        return raw if self.training else self.detect.decode(raw)


def build_model(spec: ModelSpec) -> Detector:
    """The only constructor of detectors: every width comes from ``spec``."""
    return Detector(spec)


def conv_modules(model: nn.Module) -> dict[str, Conv]:
    """Every ``Conv`` (conv + BN + SiLU) of ``model`` by its module path, e.g. ``layers.4.m.0.cv1``."""
    return {name: m for name, m in model.named_modules() if isinstance(m, Conv)}


def _layer_convs(i: int, layer: LayerSpec) -> dict[str, int]:
    p = f"layers.{i}"
    if isinstance(layer, ConvSpec):
        return {p: layer.out_chs}
    if isinstance(layer, C3Spec):
        widths = {f"{p}.cv1": layer.hidden_chs, f"{p}.cv2": layer.skip_chs}
        for j, b in enumerate(layer.bottlenecks):
            widths.update({f"{p}.m.{j}.cv1": b.hidden_chs, f"{p}.m.{j}.cv2": b.out_chs})
        return {**widths, f"{p}.cv3": layer.out_chs}
    if isinstance(layer, SPPFSpec):
        return {f"{p}.cv1": layer.hidden_chs, f"{p}.cv2": layer.out_chs}
    return {}


def conv_widths(spec: ModelSpec) -> dict[str, int]:
    """Output width of every Conv the spec builds, keyed like ``conv_modules(build_model(spec))``."""
    return {k: v for i, layer in enumerate(spec.layers) for k, v in _layer_convs(i, layer).items()}


def _with_layer_widths(i: int, layer: LayerSpec, widths: Mapping[str, int]) -> LayerSpec:
    p = f"layers.{i}"

    def w(name: str, old: int) -> int:
        return widths.get(name, old)

    if isinstance(layer, ConvSpec):
        return dataclasses.replace(layer, out_chs=w(p, layer.out_chs))
    if isinstance(layer, C3Spec):
        blocks = tuple(
            BottleneckSpec(w(f"{p}.m.{j}.cv1", b.hidden_chs), w(f"{p}.m.{j}.cv2", b.out_chs))
            for j, b in enumerate(layer.bottlenecks)
        )
        return dataclasses.replace(
            layer, hidden_chs=w(f"{p}.cv1", layer.hidden_chs), skip_chs=w(f"{p}.cv2", layer.skip_chs),
            bottlenecks=blocks, out_chs=w(f"{p}.cv3", layer.out_chs),
        )
    if isinstance(layer, SPPFSpec):
        return dataclasses.replace(
            layer, hidden_chs=w(f"{p}.cv1", layer.hidden_chs), out_chs=w(f"{p}.cv2", layer.out_chs)
        )
    return layer


def with_conv_widths(spec: ModelSpec, widths: Mapping[str, int]) -> ModelSpec:
    """A new spec with the Conv widths in ``widths`` (keyed as ``conv_widths``) replaced.

    Raises:
        SpecError: a key names no Conv of the spec, or the result is inconsistent (for example
            a shortcut C3 whose bottleneck widths no longer equal its cv1 width).
    """
    unknown = sorted(set(widths) - set(conv_widths(spec)))
    if unknown:
        raise SpecError(f"no Conv named {', '.join(unknown)} in this spec")
    layers = tuple(_with_layer_widths(i, layer, widths) for i, layer in enumerate(spec.layers))
    return dataclasses.replace(spec, layers=layers)
