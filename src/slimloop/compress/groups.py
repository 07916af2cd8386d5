"""Coupled channel groups: which conv outputs are kept or cut together, and what each conv reads."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from slimloop.model.build import conv_widths
from slimloop.model.spec import C3Spec, ConcatSpec, ConvSpec, ModelSpec, SPPFSpec, UpsampleSpec

IMAGE = "<image>"


@dataclass(frozen=True)
class ChannelGroup:
    """Conv outputs whose channels must be kept or removed together (a residual add couples them).

    ``name`` is the first member; all members have ``width`` output channels.
    """

    name: str
    members: tuple[str, ...]
    width: int


@dataclass(frozen=True)
class Topology:
    """Which group each conv's output channels belong to, and what each conv reads.

    ``inputs`` maps every conv (including ``detect.m.k``) to the list of groups whose channels,
    concatenated in order, form its input (``IMAGE`` for the picture).
    """

    groups: dict[str, ChannelGroup]
    group_of: dict[str, str]
    inputs: dict[str, list[str]]


def _c3_topology(p: str, layer: C3Spec, inp: list[str], group_of: dict, inputs: dict) -> list[str]:
    stream = [f"{p}.cv1"]
    inputs[f"{p}.cv1"] = inp
    inputs[f"{p}.cv2"] = inp
    for j in range(len(layer.bottlenecks)):
        b = f"{p}.m.{j}"
        inputs[f"{b}.cv1"] = stream
        inputs[f"{b}.cv2"] = [f"{b}.cv1"]
        if layer.shortcut:  # the add couples cv2's output with the stream (cv1's group)
            group_of[f"{b}.cv2"] = group_of[f"{p}.cv1"]
        else:
            stream = [f"{b}.cv2"]
    inputs[f"{p}.cv3"] = stream + [f"{p}.cv2"]
    return [f"{p}.cv3"]


def topology(spec: ModelSpec) -> Topology:
    """Channel groups and conv inputs of ``spec`` (module names as ``conv_widths``)."""
    widths = conv_widths(spec)
    group_of = {name: name for name in widths}
    inputs: dict[str, list[str]] = {}
    outs: list[list[str]] = []

    def source(i: int) -> list[str]:
        return [g for j in spec.sources(i) for g in ([IMAGE] if j < 0 else outs[j])]

    for i, layer in enumerate(spec.layers):
        p, inp = f"layers.{i}", source(i)
        if isinstance(layer, ConvSpec):
            inputs[p] = inp
            outs.append([p])
        elif isinstance(layer, C3Spec):
            outs.append(_c3_topology(p, layer, inp, group_of, inputs))
        elif isinstance(layer, SPPFSpec):
            inputs[f"{p}.cv1"] = inp
            inputs[f"{p}.cv2"] = [f"{p}.cv1"] * 4  # x and three max-pools of it, concatenated
            outs.append([f"{p}.cv2"])
        elif isinstance(layer, UpsampleSpec | ConcatSpec):
            outs.append(inp)
    for k, j in enumerate(spec.sources(len(spec.layers))):
        inputs[f"detect.m.{k}"] = outs[j]
    inputs = {name: [group_of.get(g, g) for g in segs] for name, segs in inputs.items()}
    members: dict[str, list[str]] = {}
    for name, g in group_of.items():
        members.setdefault(g, []).append(name)
    groups = {g: ChannelGroup(g, tuple(m), widths[g]) for g, m in members.items()}
    return Topology(groups, group_of, inputs)


def input_mask(topo: Topology, name: str, keep: dict[str, Tensor], in_chs: int) -> Tensor:
    """Which input channels of conv ``name`` survive ``keep`` (the picture's channels always do)."""
    parts = [torch.ones(in_chs, dtype=torch.bool) if g == IMAGE else keep[g] for g in topo.inputs[name]]
    return torch.cat(parts)
