"""Validation of a ModelSpec: routing, widths, strides, the head, and bounds on every size."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from slimloop.model.layers import C3Spec, ConcatSpec, ConvSpec, SpecError, SPPFSpec, UpsampleSpec

if TYPE_CHECKING:
    from slimloop.model.spec import ModelSpec

# Bounds on every size a spec can state. YOLOv5x, the largest YOLOv5, has 25 layers, at most 1280
# channels, kernels of at most 6, 4 bottlenecks per C3 and 86 M parameters: these leave room for
# any real detector, while a crafted spec (a kernel of 20001, a million channels) is refused before
# build_model tries to allocate tens of GB for it.
MAX_LAYERS = 1000
MAX_CHANNELS = 16384  # any width: out_chs, hidden_chs, skip_chs, in_chs
MAX_KERNEL = 31
MAX_STRIDE = 32  # a Conv's stride and an Upsample's scale
MAX_BOTTLENECKS = 64  # bottlenecks in one C3 (the depth)
MAX_CLASSES = 10000
MAX_LEVELS = 8  # Detect levels
MAX_ANCHORS = 64  # anchors per level
MAX_PARAMS = 500_000_000  # parameters in all (2 GB of fp32 weights)


def _need(ok: bool, where: str, message: str, loc: tuple[str | int, ...]) -> None:
    if not ok:
        raise SpecError(f"{where}: {message}", loc)


def _ints(where: str, loc: tuple[str | int, ...], low: int = 1, high: int | None = None, **values: Any) -> None:
    for key, v in values.items():
        ok = isinstance(v, int) and not isinstance(v, bool) and v >= low
        _need(ok, where, f"{key} must be an int >= {low}, got {v!r}", loc + (key,))
        _need(high is None or v <= high, where, f"{key} {v} is larger than the limit {high}", loc + (key,))


def _check_block(layer: Any, down: int, where: str, loc: tuple[str | int, ...]) -> int:
    """Validate one non-Concat layer; return its down-sampling factor."""
    if isinstance(layer, ConvSpec):
        _ints(where, loc, high=MAX_CHANNELS, out_chs=layer.out_chs)
        _ints(where, loc, high=MAX_KERNEL, kernel=layer.kernel)
        _ints(where, loc, high=MAX_STRIDE, stride=layer.stride)
        _ints(where, loc, low=0, padding=layer.padding)
        k, s, p = layer.kernel, layer.stride, layer.padding
        # output side is exactly input / stride (for inputs divisible by stride) iff k - s <= 2p < k
        _need(k - s <= 2 * p < k, where, f"kernel {k}, stride {s}, padding {p} does not give "
              "output size = input size / stride", loc + ("padding",))
        return down * s
    if isinstance(layer, C3Spec):
        _ints(where, loc, high=MAX_CHANNELS, hidden_chs=layer.hidden_chs, skip_chs=layer.skip_chs,
              out_chs=layer.out_chs)
        _need(isinstance(layer.shortcut, bool), where, "shortcut must be a bool", loc + ("shortcut",))
        _need(len(layer.bottlenecks) <= MAX_BOTTLENECKS, where, f"{len(layer.bottlenecks)} bottlenecks, more "
              f"than the limit {MAX_BOTTLENECKS}", loc + ("bottlenecks",))
        for j, b in enumerate(layer.bottlenecks):
            bloc = loc + ("bottlenecks", j)
            _ints(f"{where} bottleneck {j}", bloc, high=MAX_CHANNELS, hidden_chs=b.hidden_chs, out_chs=b.out_chs)
            _need(not layer.shortcut or b.out_chs == layer.hidden_chs, where,
                  f"shortcut=True adds each bottleneck's input to its output, so every bottleneck's "
                  f"out_chs must equal hidden_chs (cv1 out) {layer.hidden_chs}, but bottleneck {j} "
                  f"has out_chs {b.out_chs}", bloc + ("out_chs",))
        return down
    if isinstance(layer, SPPFSpec):
        _ints(where, loc, high=MAX_CHANNELS, hidden_chs=layer.hidden_chs, out_chs=layer.out_chs)
        _ints(where, loc, high=MAX_KERNEL, kernel=layer.kernel)
        _need(layer.kernel % 2 == 1, where, f"kernel must be odd, got {layer.kernel}", loc + ("kernel",))
        return down
    if isinstance(layer, UpsampleSpec):
        _ints(where, loc, high=MAX_STRIDE, scale=layer.scale)
        _need(down % layer.scale == 0, where, f"cannot upsample stride {down} by {layer.scale}",
              loc + ("scale",))
        return down // layer.scale
    raise SpecError(f"{where}: not a layer spec: {type(layer).__name__}", loc)


def _check_sources(spec: ModelSpec, i: int, where: str, loc: tuple[str | int, ...]) -> tuple[int, ...]:
    src = spec.detect.src if i == len(spec.layers) else spec.layers[i].src
    _need(isinstance(src, tuple) and 0 < len(src) <= MAX_LEVELS, where,
          f"src must be a non-empty tuple of at most {MAX_LEVELS} layers", loc)
    for s in src:
        _ints(where, loc, low=-(i + 1), src=s)
        _need(s < i, where, f"src {s} does not refer to an earlier layer", loc + ("src",))
    return spec.sources(i)


def _check_detect(spec: ModelSpec, downs: list[int]) -> None:
    d, where, loc = spec.detect, "detect", ("detect",)
    srcs = _check_sources(spec, len(spec.layers), where, loc)
    _ints(where, loc, high=MAX_CLASSES, nc=d.nc)
    _need(len(d.names) == d.nc and all(isinstance(n, str) for n in d.names), where,
          f"names must be {d.nc} strings (one per class), got {len(d.names)}", loc + ("names",))
    nl = len(srcs)
    _need(len(d.anchors) == nl and len(d.strides) == nl, where,
          f"{nl} levels in src but {len(d.anchors)} anchor levels and {len(d.strides)} strides", loc)
    _need(1 <= len(d.anchors[0]) <= MAX_ANCHORS and all(len(a) == len(d.anchors[0]) for a in d.anchors), where,
          f"every level needs the same number (1 to {MAX_ANCHORS}) of anchors", loc + ("anchors",))
    for a in (wh for level in d.anchors for wh in level):
        ok = len(a) == 2 and all(isinstance(v, int | float) and v > 0 and math.isfinite(v) for v in a)
        _need(ok, where, f"an anchor must be a positive (w, h) pair, got {a!r}", loc + ("anchors",))
    for k, (j, stride) in enumerate(zip(srcs, d.strides, strict=True)):
        _ints(where, loc, strides=stride)
        _need(downs[j] == stride, where, f"level {k} reads layer {j} at stride {downs[j]}, "
              f"but strides[{k}] is {stride}", loc + ("strides", k))


def check_spec(spec: ModelSpec) -> None:
    """Validate routing, widths, strides, the head and the total size.

    Raises:
        SpecError: naming the layer (or ``detect``) and the field; a spec of more than
            :data:`MAX_PARAMS` parameters is refused from its widths, before any tensor exists.
    """
    _ints("spec", (), high=MAX_CHANNELS, in_chs=spec.in_chs)
    _need(isinstance(spec.layers, tuple) and 0 < len(spec.layers) <= MAX_LAYERS, "spec",
          f"layers must be a non-empty tuple of at most {MAX_LAYERS} layers", ("layers",))
    downs: list[int] = []
    for i, layer in enumerate(spec.layers):
        where, loc = f"layer {i} ({getattr(layer, 'kind', type(layer).__name__)})", ("layers", i)
        srcs = _check_sources(spec, i, where, loc)
        ins = [1 if j < 0 else downs[j] for j in srcs]
        if isinstance(layer, ConcatSpec):
            _need(len(srcs) >= 2, where, "Concat needs at least two inputs", loc + ("src",))
            _need(len(set(ins)) == 1, where, f"inputs {srcs} have different strides {ins}", loc + ("src",))
            downs.append(ins[0])
        else:
            _need(len(srcs) == 1, where, "needs exactly one input", loc + ("src",))
            downs.append(_check_block(layer, ins[0], where, loc))
    _check_detect(spec, downs)
    _check_size(spec)


def _check_size(spec: ModelSpec) -> None:
    """Refuse widths a Concat sums past :data:`MAX_CHANNELS` and more than :data:`MAX_PARAMS` parameters."""
    from slimloop.model.shapes import param_count

    for i, width in enumerate(spec.out_channels()):
        _need(width <= MAX_CHANNELS, f"layer {i}", f"{width} output channels, more than the limit "
              f"{MAX_CHANNELS}", ("layers", i))
    total = param_count(spec)
    _need(total <= MAX_PARAMS, "spec", f"{total:,} parameters, more than the limit {MAX_PARAMS:,} "
          "(refused before building it)", ())
