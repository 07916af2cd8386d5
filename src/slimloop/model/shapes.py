"""The tensors a ModelSpec builds, from its integers alone: names, shapes, and the parameter count."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING

from slimloop.model.layers import C3Spec, ConvSpec, SPPFSpec

if TYPE_CHECKING:
    from slimloop.model.spec import ModelSpec

Shape = tuple[int, ...]


def _conv(name: str, in_chs: int, out_chs: int, kernel: int) -> Iterator[tuple[str, Shape, bool]]:
    """A ``Conv`` block: conv weight and BatchNorm parameters (True) and buffers (False)."""
    yield f"{name}.conv.weight", (out_chs, in_chs, kernel, kernel), True
    yield f"{name}.bn.weight", (out_chs,), True
    yield f"{name}.bn.bias", (out_chs,), True
    yield f"{name}.bn.running_mean", (out_chs,), False
    yield f"{name}.bn.running_var", (out_chs,), False
    yield f"{name}.bn.num_batches_tracked", (), False


def _layer(name: str, layer: object, in_chs: int) -> Iterator[tuple[str, Shape, bool]]:
    if isinstance(layer, ConvSpec):
        yield from _conv(name, in_chs, layer.out_chs, layer.kernel)
    elif isinstance(layer, C3Spec):
        yield from _conv(f"{name}.cv1", in_chs, layer.hidden_chs, 1)
        yield from _conv(f"{name}.cv2", in_chs, layer.skip_chs, 1)
        width = layer.hidden_chs
        for j, b in enumerate(layer.bottlenecks):
            yield from _conv(f"{name}.m.{j}.cv1", width, b.hidden_chs, 1)
            yield from _conv(f"{name}.m.{j}.cv2", b.hidden_chs, b.out_chs, 3)
            width = b.out_chs
        yield from _conv(f"{name}.cv3", width + layer.skip_chs, layer.out_chs, 1)
    elif isinstance(layer, SPPFSpec):
        yield from _conv(f"{name}.cv1", in_chs, layer.hidden_chs, 1)
        yield from _conv(f"{name}.cv2", 4 * layer.hidden_chs, layer.out_chs, 1)
    # Upsample and Concat hold no tensors


def _tensors(spec: ModelSpec) -> Iterator[tuple[str, Shape, bool]]:
    """``(state_dict key, shape, is_parameter)`` of every tensor ``build_model(spec)`` saves."""
    chs = spec.out_channels()

    def width(j: int) -> int:
        return spec.in_chs if j < 0 else chs[j]

    for i, layer in enumerate(spec.layers):
        yield from _layer(f"layers.{i}", layer, sum(width(j) for j in spec.sources(i)))
    outputs = len(spec.detect.anchors[0]) * (5 + spec.detect.nc)
    for k, j in enumerate(spec.sources(len(spec.layers))):
        yield f"detect.m.{k}.weight", (outputs, width(j), 1, 1), True
        yield f"detect.m.{k}.bias", (outputs,), True


def state_shapes(spec: ModelSpec) -> dict[str, Shape]:
    """Shape of every tensor in ``build_model(spec).state_dict()``, by key, without building it."""
    return {name: shape for name, shape, _ in _tensors(spec)}


def param_count(spec: ModelSpec) -> int:
    """Number of parameters ``build_model(spec)`` has (``sum(p.numel() for p in model.parameters())``)."""
    return sum(math.prod(shape) for _, shape, is_param in _tensors(spec) if is_param)
