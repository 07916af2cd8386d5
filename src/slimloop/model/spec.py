"""ModelSpec: a YOLOv5-style detector written down with explicit integers, and its file formats."""

from __future__ import annotations

import dataclasses
import json
import math
import reprlib
import types
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

from slimloop.io import parse_json
from slimloop.model.layers import (  # noqa: F401 - the layers are part of this module's interface
    LAYER_TYPES,
    BottleneckSpec,
    C3Spec,
    ConcatSpec,
    ConvSpec,
    DetectSpec,
    LayerSpec,
    SpecError,
    SPPFSpec,
    UpsampleSpec,
)
from slimloop.model.spec_checks import check_spec
from slimloop.yamlfile import load_yaml_text

FORMAT = "slimloop.ModelSpec"
VERSION = 1


@dataclass(frozen=True)
class ModelSpec:
    """A whole detector with explicit integer widths; validated on construction.

    ``src`` follows YOLOv5's ``from``: ``-1`` is the previous layer (the image for layer 0),
    other negatives count back, non-negative values are absolute layer indices. Input widths
    are not stored: they follow from the routing (``in_channels``). Inside a C3, bottleneck 0
    reads cv1 (``hidden_chs``), bottleneck j reads bottleneck j - 1, and cv3 reads the last
    bottleneck's ``out_chs`` (``hidden_chs`` if there are none) plus ``skip_chs``.

    Module names of ``build_model(spec)`` (what ``conv_widths`` and ``conv_modules`` key on):
      - ``ConvSpec`` at layer i: ``layers.i`` (``.conv``, ``.bn``), width ``out_chs``.
      - ``C3Spec`` at layer i: ``layers.i.cv1`` (``hidden_chs``), ``layers.i.cv2`` (``skip_chs``),
        bottleneck j: ``layers.i.m.j.cv1`` (``hidden_chs``), ``layers.i.m.j.cv2`` (``out_chs``),
        ``layers.i.cv3`` (``out_chs``).
      - ``SPPFSpec`` at layer i: ``layers.i.cv1`` (``hidden_chs``), ``layers.i.cv2`` (``out_chs``).
      - ``UpsampleSpec`` / ``ConcatSpec``: ``layers.i``, no parameters.
      - ``DetectSpec``: ``detect.m.k`` (plain ``nn.Conv2d`` with bias, ``na * (5 + nc)`` outputs).
    """

    layers: tuple[LayerSpec, ...]
    detect: DetectSpec
    in_chs: int = 3
    name: str = "custom"

    def __post_init__(self) -> None:
        check_spec(self)

    def sources(self, i: int) -> tuple[int, ...]:
        """Absolute indices of layer ``i``'s inputs (``-1`` is the image); ``i = len(layers)`` is Detect."""
        src = self.detect.src if i == len(self.layers) else self.layers[i].src
        return tuple(i + s if s < 0 else s for s in src)

    def out_channels(self) -> tuple[int, ...]:
        """Output width of every layer, following the routing."""
        chs: list[int] = []
        for i, layer in enumerate(self.layers):
            ins = [self.in_chs if j < 0 else chs[j] for j in self.sources(i)]
            chs.append(sum(ins) if isinstance(layer, ConcatSpec | UpsampleSpec) else layer.out_chs)
        return tuple(chs)

    def in_channels(self, i: int) -> int:
        """Input width of layer ``i`` (the sum for a Concat)."""
        chs = self.out_channels()
        return sum(self.in_chs if j < 0 else chs[j] for j in self.sources(i))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-ready dict (layers carry a ``type`` key)."""
        return {"format": FORMAT, "version": VERSION, **_to_plain(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelSpec:
        """Parse and validate a dict made by ``to_dict`` (or written by hand).

        Raises:
            SpecError: a missing, unknown or mistyped field (named by its path) or an
                inconsistent spec (named by its layer).
        """
        if not isinstance(data, Mapping):
            raise SpecError(f"spec: expected a mapping, got {type(data).__name__}")
        data = dict(data)
        if data.pop("format", FORMAT) != FORMAT:
            raise SpecError(f"format: expected {FORMAT!r}", ("format",))
        version = data.pop("version", VERSION)
        if version != VERSION:
            raise SpecError(f"version: unsupported spec version {reprlib.repr(version)} (expected {VERSION})",
                            ("version",))
        return _from_mapping(cls, data, ())


def _to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        out = {"type": obj.kind} if hasattr(obj, "kind") else {}
        for f in dataclasses.fields(obj):
            out[f.name] = _to_plain(getattr(obj, f.name))
        return out
    if isinstance(obj, tuple | list):
        return [_to_plain(v) for v in obj]
    return obj


def _where(loc: tuple[str | int, ...]) -> str:
    text = ""
    for key in loc:
        text += f"[{key}]" if isinstance(key, int) else (f".{key}" if text else key)
    return text or "spec"


def _scalar(tp: Any, value: Any, loc: tuple[str | int, ...]) -> Any:
    ok = {
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, int | float) and not isinstance(value, bool),
        bool: isinstance(value, bool),
        str: isinstance(value, str),
    }.get(tp)
    if ok is None:
        raise TypeError(f"unsupported spec field type {tp!r}")
    if not ok:
        raise SpecError(f"{_where(loc)}: expected {tp.__name__}, got {type(value).__name__} {reprlib.repr(value)}", loc)
    if tp is float:
        if not math.isfinite(value):
            raise SpecError(f"{_where(loc)}: expected a finite number, got {value!r}", loc)
        return float(value)
    return value


def _convert(tp: Any, value: Any, loc: tuple[str | int, ...]) -> Any:
    if dataclasses.is_dataclass(tp):
        return _from_mapping(tp, value, loc)
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):  # only the layer union: dispatch on "type"
        kind = value.get("type") if isinstance(value, Mapping) else None
        if not isinstance(kind, str) or kind not in LAYER_TYPES:
            raise SpecError(
                f"{_where(loc + ('type',))}: unknown layer type {reprlib.repr(kind)}; "
                f"expected one of {', '.join(LAYER_TYPES)}", loc + ("type",))
        return _from_mapping(LAYER_TYPES[kind], value, loc)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise SpecError(f"{_where(loc)}: expected a list, got {type(value).__name__} {reprlib.repr(value)}", loc)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, loc + (k,)) for k, v in enumerate(value))
        if len(value) != len(args):
            raise SpecError(f"{_where(loc)}: expected {len(args)} values, got {len(value)}", loc)
        return tuple(_convert(a, v, loc + (k,)) for k, (a, v) in enumerate(zip(args, value, strict=True)))
    return _scalar(tp, value, loc)


def _from_mapping(cls: type, data: Any, loc: tuple[str | int, ...]) -> Any:
    if not isinstance(data, Mapping):
        raise SpecError(f"{_where(loc)}: expected a mapping, got {type(data).__name__} {reprlib.repr(data)}", loc)
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    allowed = set(fields) | ({"type"} if hasattr(cls, "kind") else set())
    unknown = sorted(str(k) for k in data if k not in allowed)
    if unknown:
        raise SpecError(
            f"{_where(loc)}: unknown key(s) {', '.join(k[:40] for k in unknown[:5])}"
            f"{', ...' if len(unknown) > 5 else ''}; allowed: {', '.join(sorted(allowed))}", loc)
    missing = [n for n, f in fields.items() if n not in data
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise SpecError(f"{_where(loc)}: missing key(s) {', '.join(missing)}", loc)
    kwargs = {n: _convert(hints[n], data[n], loc + (n,)) for n in fields if n in data}
    return cls(**kwargs)


def spec_to_json(spec: ModelSpec, indent: int | None = 2) -> str:
    """The spec as JSON text."""
    return json.dumps(spec.to_dict(), indent=indent, allow_nan=False)


def spec_from_json(text: str, source: str = "spec JSON") -> ModelSpec:
    """Parse JSON text made by ``spec_to_json``; ``source`` names it in errors.

    Raises:
        SpecError: not JSON (with its line), nested too deeply, or an invalid spec.
    """
    return ModelSpec.from_dict(parse_json(text, source, SpecError))


def spec_to_yaml(spec: ModelSpec) -> str:
    """The spec as YAML text (one layer per block, short lists inline)."""
    return yaml.safe_dump(spec.to_dict(), sort_keys=False, default_flow_style=None, width=100)


def spec_from_yaml(text: str, source: str = "spec YAML") -> ModelSpec:
    """Parse YAML text made by ``spec_to_yaml`` (or written by hand); ``source`` names it in errors.

    Raises:
        SpecError: not YAML (with its line), a key given twice, nested too deeply, or an invalid spec.
    """
    return ModelSpec.from_dict(load_yaml_text(text, source, SpecError))

