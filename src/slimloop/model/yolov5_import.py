"""A YOLOv5 (v6.x, v7.0) model onto a ModelSpec: rows from its yaml, widths from its tensors, loaded strictly.

The yaml gives the routing, the module of each row, kernels and strides; the tensors give every
width and the number of bottlenecks (a model pruned elsewhere has widths its yaml does not predict),
the anchors (after yolov5's autoanchor, the ``anchors`` buffer, not the yaml, holds them) and the
class count. Supported rows: Conv, C3, SPPF, SPP (5/9/13: exactly three chained 5x5 pools, as SPPF),
nn.Upsample, Concat, Detect. Anything else names itself and its row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from slimloop.checkpoint import file_sha256
from slimloop.errors import CheckpointError, UnsupportedModelError
from slimloop.model.blocks import BN_EPS
from slimloop.model.build import Detector, build_model, make_divisible
from slimloop.model.pickle_vm import ModuleStandIn
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
from slimloop.model.yolov5_files import Yolov5Source, read_yolov5

SUPPORTED = ("Conv", "C3", "SPPF", "SPP", "nn.Upsample", "Concat", "Detect")
# classes a supported row may contain (checked on the stand-ins of full checkpoints)
_INNER = {"Conv", "C3", "Bottleneck", "SPPF", "SPP", "Concat", "Detect", "Conv2d", "BatchNorm2d", "SiLU",
          "MaxPool2d", "Sequential", "ModuleList", "Upsample"}
_WORDS = {"None": None, "True": True, "False": False}


@dataclass(frozen=True)
class Row:
    """One row of the yaml: ``[from, number, module, args]`` and where it is, for messages."""

    index: int
    src: tuple[int, ...]
    repeats: int
    module: str
    args: tuple[Any, ...]
    label: str


@dataclass
class ImportedModel:
    """The imported detector and what is known about where it came from (JSON-ready ``info``)."""

    model: Detector
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Ctx:
    source: str
    yaml: dict[str, Any]
    tensors: dict[int, dict[str, torch.Tensor]]
    modules: dict[int, ModuleStandIn] | None
    downs: list[int] = field(default_factory=list)
    yaml_widths: bool = True  # every width and depth is what the yaml predicts

    def fail(self, row: Row, message: str) -> UnsupportedModelError:
        return UnsupportedModelError(f"{self.source}: {row.label}: {message}")

    def out_of(self, row: Row, prefix: str) -> tuple[int, int]:
        """``(out_chs, kernel)`` of the conv at ``model.<i>.<prefix>``."""
        weight = self.tensors.get(row.index, {}).get(f"{prefix}conv.weight")
        if weight is None or weight.ndim != 4:
            raise CheckpointError(f"{self.source}: {row.label}: no 4-d tensor model.{row.index}.{prefix}conv.weight")
        return int(weight.shape[0]), int(weight.shape[2])

    def expect_width(self, row: Row, width: int) -> None:
        c2 = row.args[0] if row.args else None
        gw = float(self.yaml.get("width_multiple", 1.0))
        if isinstance(c2, int | float) and make_divisible(c2 * gw) != width:
            self.yaml_widths = False


def _rows(spec_yaml: dict[str, Any], source: str) -> list[Row]:
    rows, raw = [], [("backbone", r) for r in spec_yaml["backbone"]] + [("head", r) for r in spec_yaml["head"]]
    for i, (section, r) in enumerate(raw):
        if not isinstance(r, list | tuple) or len(r) != 4:
            raise CheckpointError(f"{source}: yaml row {i} is not [from, number, module, args]: {r!r}")
        f, n, module, args = r
        src = (f,) if isinstance(f, int) else tuple(f)
        args = tuple(_WORDS.get(a, a) if isinstance(a, str) else a for a in (args or ()))
        j = i if section == "backbone" else i - len(spec_yaml["backbone"])
        label = f"row {i} ({section} {j}: {module} {list(args)})"
        if not all(isinstance(s, int) for s in src) or not isinstance(n, int) or not isinstance(module, str):
            raise CheckpointError(f"{source}: {label}: malformed row")
        rows.append(Row(i, src, n, module, args, label))
    return rows


def _group_tensors(state: dict[str, torch.Tensor], source: str) -> dict[int, dict[str, torch.Tensor]]:
    out: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        parts = key.split(".", 2)
        if len(parts) != 3 or parts[0] != "model" or not parts[1].isdigit():
            raise CheckpointError(f"{source}: tensor {key} belongs to no layer (expected model.<i>.…)")
        out.setdefault(int(parts[1]), {})[parts[2]] = tensor
    return out


def _walk(module: ModuleStandIn, path: str = ""):
    yield path, module
    for key, child in module.children().items():
        if isinstance(child, ModuleStandIn):
            yield from _walk(child, f"{path}.{key}" if path else key)


def _check_stand_ins(ctx: _Ctx, row: Row) -> None:
    """Full checkpoints: the pickled modules of the row are what the mapping assumes."""
    top = (ctx.modules or {}).get(row.index)
    if top is None:
        if ctx.modules is not None:
            raise CheckpointError(f"{ctx.source}: {row.label}: the checkpoint has no module {row.index}")
        return
    if top.name != row.module.removeprefix("nn."):
        raise ctx.fail(row, f"the yaml names {row.module} but the checkpoint's module {row.index} is {top.kind}")
    for path, m in _walk(top):
        where = f"model.{row.index}{'.' + path if path else ''}"
        if m.name not in _INNER:
            raise ctx.fail(row, f"{where} is a {m.kind}, which slimloop does not support (Conv blocks must use "
                                "SiLU; supported rows: " + ", ".join(SUPPORTED) + ")")
        if m.name == "Conv2d" and (m.get("groups", 1) != 1 or tuple(m.get("dilation", (1, 1))) != (1, 1)):
            raise ctx.fail(row, f"{where} is a grouped or dilated convolution")
        if m.name == "BatchNorm2d" and abs(float(m.get("eps", BN_EPS)) - BN_EPS) > 1e-9:
            raise ctx.fail(row, f"{where} has BatchNorm eps {m.get('eps')}; slimloop's blocks use {BN_EPS}")
        if m.name == "Upsample" and (m.get("mode") != "nearest" or m.get("size") is not None):
            raise ctx.fail(row, f"{where} upsamples with mode {m.get('mode')!r}; only nearest is supported")


def _conv(ctx: _Ctx, row: Row, src: tuple[int, ...], down: int) -> tuple[LayerSpec, int]:
    a = row.args + (None,) * 7
    kernel, stride = a[1] or 1, a[2] or 1
    groups, dilation, act = a[4] or 1, a[5] or 1, True if len(row.args) < 7 else row.args[6]
    if groups != 1 or dilation != 1 or act is not True:
        raise ctx.fail(row, "grouped, dilated or non-SiLU Conv rows are not supported")
    out, k = ctx.out_of(row, "")
    if k != kernel:
        raise ctx.fail(row, f"the yaml says kernel {kernel}, the weights have {k}")
    padding = kernel // 2 if a[3] is None else a[3]
    conv = (ctx.modules or {}).get(row.index)
    conv = conv.children().get("conv") if conv is not None else None
    if isinstance(conv, ModuleStandIn):  # the pickled Conv2d is the truth for stride and padding
        (stride, s2), (padding, p2) = conv.get("stride", (stride,) * 2), conv.get("padding", (padding,) * 2)
        if stride != s2 or padding != p2:
            raise ctx.fail(row, "non-square strides or paddings are not supported")
    ctx.expect_width(row, out)
    return ConvSpec(src, out, kernel, stride, padding), down * stride


def _c3(ctx: _Ctx, row: Row, src: tuple[int, ...], down: int) -> tuple[LayerSpec, int]:
    shortcut = row.args[1] if len(row.args) > 1 else True
    if len(row.args) > 2 and row.args[2] != 1:
        raise ctx.fail(row, "grouped C3 bottlenecks are not supported")
    hidden, skip, out = ctx.out_of(row, "cv1.")[0], ctx.out_of(row, "cv2.")[0], ctx.out_of(row, "cv3.")[0]
    n = sum(1 for k in ctx.tensors.get(row.index, {}) if k.startswith("m.") and k.endswith(".cv1.conv.weight"))
    blocks = tuple(BottleneckSpec(ctx.out_of(row, f"m.{j}.cv1.")[0], ctx.out_of(row, f"m.{j}.cv2.")[0])
                   for j in range(n))
    ins = [hidden] + [b.out_chs for b in blocks[:-1]]
    adds = [bool(shortcut) and b.out_chs == c for b, c in zip(blocks, ins, strict=True)]  # yolov5's Bottleneck.add
    top = (ctx.modules or {}).get(row.index)
    if top is not None:
        seq = top.children().get("m")
        adds = [bool(b.get("add")) for b in (seq.children().values() if seq is not None else ())]
    if len(set(adds)) > 1:
        raise ctx.fail(row, f"its bottlenecks mix residual and plain ones ({adds}); slimloop's C3 has one shortcut flag")
    gd = float(ctx.yaml.get("depth_multiple", 1.0))
    if n != (max(round(row.repeats * gd), 1) if row.repeats > 1 else row.repeats):
        ctx.yaml_widths = False
    ctx.expect_width(row, out)
    return C3Spec(src, hidden, skip, blocks, out, adds[0] if adds else bool(shortcut)), down


def _sppf(ctx: _Ctx, row: Row, src: tuple[int, ...], down: int) -> tuple[LayerSpec, int]:
    if row.module == "SPPF":
        kernel = row.args[1] if len(row.args) > 1 else 5
    else:  # SPP(k1, k2, k3) = SPPF(k) when k_j = k + j (k - 1): a chain of k-pools covers exactly those windows
        ks = tuple(row.args[1]) if len(row.args) > 1 else (5, 9, 13)
        kernel = ks[0]
        if ks != tuple(kernel + j * (kernel - 1) for j in range(3)):
            raise ctx.fail(row, f"SPP kernels {list(ks)} are not three chained max-pools (like 5, 9, 13)")
    out = ctx.out_of(row, "cv2.")[0]
    ctx.expect_width(row, out)
    return SPPFSpec(src, ctx.out_of(row, "cv1.")[0], out, int(kernel)), down


def _upsample(ctx: _Ctx, row: Row, src: tuple[int, ...], down: int) -> tuple[LayerSpec, int]:
    defaults = (None, 2, "nearest")
    size, scale, mode = (row.args + defaults[len(row.args):])[:3]
    if size is not None or mode != "nearest" or float(scale) != int(scale) or int(scale) < 1:
        raise ctx.fail(row, "only nearest upsampling by an integer factor is supported")
    if down % int(scale):
        raise ctx.fail(row, f"cannot upsample stride {down} by {scale}")
    return UpsampleSpec(src, int(scale)), down // int(scale)


def _concat(ctx: _Ctx, row: Row, src: tuple[int, ...], down: int) -> tuple[LayerSpec, int]:
    if (row.args[0] if row.args else 1) != 1:
        raise ctx.fail(row, "only channel concatenation (dimension 1) is supported")
    return ConcatSpec(src), down


_LAYERS = {"Conv": _conv, "C3": _c3, "SPPF": _sppf, "SPP": _sppf, "nn.Upsample": _upsample,
           "Upsample": _upsample, "Concat": _concat}


def _detect(ctx: _Ctx, row: Row) -> DetectSpec:
    st = ctx.tensors.get(row.index, {})
    strides = tuple(ctx.downs[j if j >= 0 else row.index + j] for j in row.src)
    anchors = st.get("anchors")
    if anchors is None or anchors.ndim != 3 or anchors.shape[0] != len(row.src):
        raise CheckpointError(f"{ctx.source}: {row.label}: no anchors buffer (levels, anchors, 2) in model.{row.index}")
    top = (ctx.modules or {}).get(row.index)
    pickled = top.get("stride") if top is not None else None
    if isinstance(pickled, torch.Tensor) and tuple(int(s) for s in pickled.tolist()) != strides:
        raise ctx.fail(row, f"the routing gives strides {strides}, the checkpoint says {pickled.tolist()}")
    px = anchors.float() * torch.tensor(strides, dtype=torch.float32).view(-1, 1, 1)  # (nl, na, 2) grid -> px
    na, outs = anchors.shape[1], {int(st[f"m.{k}.weight"].shape[0]) for k in range(len(row.src)) if f"m.{k}.weight" in st}
    if len(outs) != 1 or next(iter(outs)) % na or next(iter(outs)) // na < 6:
        raise CheckpointError(f"{ctx.source}: {row.label}: head convs model.{row.index}.m.* do not give "
                              f"{na} anchors x (5 + nc) outputs per level ({sorted(outs)})")
    nc = next(iter(outs)) // na - 5
    names = tuple(f"class{i}" for i in range(nc))
    anchor_px = tuple(tuple((float(w), float(h)) for w, h in level.tolist()) for level in px)
    return DetectSpec(row.src, nc, names, anchor_px, strides)


def _map_state(ctx: _Ctx, detect_index: int) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """slimloop names for every tensor (fp32), and each one's yolov5 name for messages."""
    mapped, origin = {}, {}
    for i, st in ctx.tensors.items():
        for rest, tensor in st.items():
            if i == detect_index and rest in ("anchors", "anchor_grid"):
                continue  # the spec carries the anchors
            key = f"detect.{rest}" if i == detect_index else f"layers.{i}.{rest}"
            mapped[key] = tensor.float() if tensor.is_floating_point() else tensor
            origin[key] = f"model.{i}.{rest}"
    return mapped, origin


def _load_strict(model: Detector, mapped: dict[str, torch.Tensor], origin: dict[str, str],
                 rows: list[Row], source: str) -> None:
    own = model.state_dict()

    def where(key: str) -> str:
        name = origin.get(key) or (f"model.{len(rows) - 1}.{key[7:]}" if key.startswith("detect.")
                                   else "model." + key.removeprefix("layers."))
        i = int(name.split(".")[1]) if name.split(".")[1].isdigit() else None
        return f"{name} ({rows[i].label})" if i is not None and i < len(rows) else name

    problems = [f"{where(k)}: the checkpoint has {tuple(mapped[k].shape)}, the structure needs {tuple(v.shape)}"
                for k, v in own.items() if k in mapped and mapped[k].shape != v.shape]
    problems += [f"{where(k)}: missing from the checkpoint" for k in own if k not in mapped]
    problems += [f"{where(k)}: left over (no layer of the structure uses it)" for k in mapped if k not in own]
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise CheckpointError(f"{source}: the weights do not fit the structure: " + "; ".join(problems[:5]) + more)
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in mapped.items()}, strict=True)


def spec_from_yolov5(src: Yolov5Source) -> tuple[ModelSpec, dict[str, torch.Tensor], dict[str, Any]]:
    """The spec, the slimloop state dict (fp32) and mapping facts of a yolov5 model read from disk.

    Raises:
        UnsupportedModelError: a module or setting slimloop cannot represent (named with its row).
        CheckpointError: tensors missing, left over or of the wrong shape (named with their layer).
    """
    source, y = str(src.path), src.yaml
    activation = y.get("activation")
    if activation not in (None, "nn.SiLU()"):
        raise UnsupportedModelError(f"{source}: activation {activation!r}: slimloop's blocks use SiLU")
    rows = _rows(y, source)
    ctx = _Ctx(source, y, _group_tensors(src.state, source), src.modules)
    layers: list[LayerSpec] = []
    for row in rows[:-1]:
        _check_stand_ins(ctx, row)
        build = _LAYERS.get(row.module)
        if build is None or (row.repeats != 1 and row.module != "C3"):
            what = f"{row.module} x{row.repeats}" if build is not None else row.module
            raise ctx.fail(row, f"module {what} is not supported (slimloop maps {', '.join(SUPPORTED)}; "
                                "Detect must be the last row)")
        down = min((1 if j < 0 else ctx.downs[j]) for j in (row.index + s if s < 0 else s for s in row.src))
        layer, down = build(ctx, row, row.src, down)
        layers.append(layer)
        ctx.downs.append(down)
    if rows[-1].module != "Detect":
        raise ctx.fail(rows[-1], "the last row must be Detect")
    _check_stand_ins(ctx, rows[-1])
    detect = _detect(ctx, rows[-1])
    name = Path(str(src.meta.get("yaml_file") or "yolov5")).stem + "-imported"
    try:
        spec = ModelSpec(layers=tuple(layers), detect=detect, in_chs=3, name=name)
    except SpecError as exc:
        raise CheckpointError(f"{source}: the imported structure is inconsistent: {exc}") from None
    mapped, origin = _map_state(ctx, rows[-1].index)
    facts = {"layers": len(layers), "widths_as_yaml": ctx.yaml_widths, "origin": origin, "rows": rows}
    return spec, mapped, facts


def _class_names(found: tuple[str, ...] | None, nc: int, expected: tuple[str, ...] | None,
                 source: str) -> tuple[tuple[str, ...], str]:
    if found is not None and len(found) != nc:
        raise CheckpointError(f"{source}: {len(found)} class names {list(found)} for a head of {nc} classes")
    if expected is None:
        return (found or tuple(f"class{i}" for i in range(nc))), "checkpoint" if found else "none"
    if found is None:
        if len(expected) != nc:
            raise CheckpointError(f"{source}: the model detects {nc} classes, the dataset has "
                                  f"{len(expected)} {list(expected)}")
        return tuple(expected), "dataset"
    if tuple(found) != tuple(expected):
        order = " (the same classes in another order: class ids would be swapped)" if sorted(found) == sorted(expected) else ""
        raise CheckpointError(f"{source}: the checkpoint's classes {list(found)} are not the dataset's "
                              f"{list(expected)}{order}")
    return tuple(found), "checkpoint"


def import_yolov5(path: str | Path, yaml_path: str | Path | None = None,
                  names: tuple[str, ...] | None = None) -> ImportedModel:
    """Read a yolov5 model (full checkpoint, or state dict + yaml) into a slimloop ``Detector``.

    Args:
        path: ``best.pt`` (as yolov5's train.py saves it), a ``state_dict`` ``.pt`` or a ``.safetensors``.
        yaml_path: the model yaml, for the state-dict forms only.
        names: the class names the model must detect (the dataset's); checked against the
            checkpoint's, and used when the file carries none.

    Returns:
        The model (fp32, strictly loaded) and ``info`` (file hash, form, weights, epoch, names).

    Raises:
        UnsafePickleError, UnsupportedModelError, CheckpointError: see :func:`read_yolov5` and
            :func:`spec_from_yolov5`; a class list that differs from ``names``.
    """
    import dataclasses

    src = read_yolov5(path, yaml_path)
    spec, mapped, facts = spec_from_yolov5(src)
    class_names, names_from = _class_names(src.names, spec.detect.nc, names, str(src.path))
    spec = dataclasses.replace(spec, detect=dataclasses.replace(spec.detect, names=class_names))
    try:
        model = build_model(spec)
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{src.path}: the imported structure does not build: {exc}") from None
    _load_strict(model, mapped, facts["origin"], facts["rows"], str(src.path))
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in src.state.values() if t.is_floating_point()})
    info = {"source": str(src.path), "sha256": file_sha256(src.path), "form": src.form, **src.meta,
            "names_from": names_from, "stored_dtypes": dtypes, "widths_as_yaml": facts["widths_as_yaml"]}
    if yaml_path is not None:
        info["yaml_sha256"] = file_sha256(yaml_path)
    return ImportedModel(model.eval(), info)
