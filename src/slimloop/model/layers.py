"""The layers a ModelSpec is made of (Conv, C3, SPPF, Upsample, Concat, Detect), as frozen dataclasses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from slimloop.errors import ConfigError


class SpecError(ConfigError, ValueError):
    """A spec is inconsistent or a spec file is malformed; the message names layer or field.

    ``loc`` is the key path of the offending value (for example ``("layers", 4, "out_chs")``),
    used to point at a line of a YAML spec file.
    """

    def __init__(self, message: str, loc: tuple[str | int, ...] = ()):
        super().__init__(message)
        self.loc = loc


@dataclass(frozen=True)
class ConvSpec:
    """Conv2d (no bias) + BatchNorm2d + SiLU."""

    src: tuple[int, ...]
    out_chs: int
    kernel: int
    stride: int
    padding: int
    kind: ClassVar[str] = "Conv"


@dataclass(frozen=True)
class BottleneckSpec:
    """One bottleneck inside a C3: 1x1 conv to ``hidden_chs``, 3x3 conv to ``out_chs``."""

    hidden_chs: int
    out_chs: int


@dataclass(frozen=True)
class C3Spec:
    """CSP block: cv3(concat(m(cv1(x)), cv2(x))); ``hidden_chs`` is cv1's out, ``skip_chs`` cv2's."""

    src: tuple[int, ...]
    hidden_chs: int
    skip_chs: int
    bottlenecks: tuple[BottleneckSpec, ...]
    out_chs: int
    shortcut: bool
    kind: ClassVar[str] = "C3"


@dataclass(frozen=True)
class SPPFSpec:
    """Spatial pyramid pooling (fast): cv1 to ``hidden_chs``, three max-pools, cv2 to ``out_chs``."""

    src: tuple[int, ...]
    hidden_chs: int
    out_chs: int
    kernel: int = 5
    kind: ClassVar[str] = "SPPF"


@dataclass(frozen=True)
class UpsampleSpec:
    """Nearest-neighbour upsampling by an integer ``scale``."""

    src: tuple[int, ...]
    scale: int = 2
    kind: ClassVar[str] = "Upsample"


@dataclass(frozen=True)
class ConcatSpec:
    """Channel concatenation of two or more layers of equal stride."""

    src: tuple[int, ...]
    kind: ClassVar[str] = "Concat"


LayerSpec = ConvSpec | C3Spec | SPPFSpec | UpsampleSpec | ConcatSpec
LAYER_TYPES: dict[str, type] = {c.kind: c for c in (ConvSpec, C3Spec, SPPFSpec, UpsampleSpec, ConcatSpec)}


@dataclass(frozen=True)
class DetectSpec:
    """The head: one 1x1 conv per level; anchors in input pixels, ``(levels, na, 2)`` as (w, h)."""

    src: tuple[int, ...]
    nc: int
    names: tuple[str, ...]
    anchors: tuple[tuple[tuple[float, float], ...], ...]
    strides: tuple[int, ...]
