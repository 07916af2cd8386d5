"""The three forms of a YOLOv5 model on disk, read without running anything they contain.

- a full checkpoint as yolov5's ``train.py`` saves it (``{'model', 'ema', 'epoch', 'opt', ...}``):
  read by the restricted pickle machine of :mod:`slimloop.model.torch_zip`; the ``ema`` model when
  present, else ``model``; its own ``yaml`` dict describes the network;
- a plain state dict (``torch.save(model.state_dict())``), loaded with
  ``torch.load(weights_only=True)``, plus the model's yaml file;
- a safetensors state dict plus the model's yaml file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from slimloop.errors import CheckpointError, UnsafePickleError
from slimloop.model.pickle_vm import ModuleStandIn
from slimloop.model.torch_zip import MODULE_PACKAGES, read_torch_archive

MODEL_CLASSES = ("DetectionModel", "Model")  # v7.0 / v6.x names of yolov5's detector class


@dataclass
class Yolov5Source:
    """A YOLOv5 model as read from disk: its yaml, its tensors (yolov5 names), and what else is known.

    Attributes:
        path: the weights file.
        form: ``checkpoint``, ``state_dict`` or ``safetensors``.
        yaml: the model definition (``nc``, ``depth_multiple``, ``width_multiple``, ``anchors``,
            ``backbone``, ``head``).
        state: every tensor by its yolov5 name (``model.4.m.0.cv1.conv.weight``), as stored.
        names: class names, when the file carries them.
        modules: the stand-ins of ``model.model[i]`` by index (full checkpoints only): their
            attributes (strides, paddings, BN eps, activations) are checked against the mapping.
        meta: JSON-ready facts about the file (which weights, epoch, date, yaml file name).
    """

    path: Path
    form: str
    yaml: dict[str, Any]
    state: dict[str, torch.Tensor]
    names: tuple[str, ...] | None = None
    modules: dict[int, ModuleStandIn] | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def module_state(module: ModuleStandIn, prefix: str = "") -> dict[str, torch.Tensor]:
    """What ``state_dict()`` of the real module would hold: parameters and persistent buffers."""
    out: dict[str, torch.Tensor] = {}
    for key, value in (module.get("_parameters") or {}).items():
        if value is not None:
            out[prefix + key] = value
    skip = module.get("_non_persistent_buffers_set") or set()
    for key, value in (module.get("_buffers") or {}).items():
        if value is not None and key not in skip:
            out[prefix + key] = value
    for key, child in module.children().items():
        if isinstance(child, ModuleStandIn):
            out.update(module_state(child, f"{prefix}{key}."))
    return out


def _names(raw: Any, source: str) -> tuple[str, ...] | None:
    """Class names from a list or a ``{index: name}`` dict (yolov5 v7 stores a dict)."""
    if raw is None:
        return None
    if isinstance(raw, dict):
        if sorted(raw) != list(range(len(raw))):
            raise CheckpointError(f"{source}: class names {raw!r} are not indexed 0..{len(raw) - 1}")
        raw = [raw[k] for k in range(len(raw))]
    if not isinstance(raw, list | tuple) or not all(isinstance(n, str | int) for n in raw):
        raise CheckpointError(f"{source}: class names must be a list of strings, got {type(raw).__name__}")
    return tuple(str(n) for n in raw)


def _json_meta(ckpt: dict[str, Any], which: str, model: ModuleStandIn) -> dict[str, Any]:
    meta: dict[str, Any] = {"weights": which, "class": model.kind}
    for key in ("epoch", "updates", "date"):
        if isinstance(ckpt.get(key), int | str) and not isinstance(ckpt.get(key), bool):
            meta[key] = ckpt[key]
    if isinstance(model.get("yaml_file"), str):
        meta["yaml_file"] = model.get("yaml_file")
    return meta


def read_checkpoint(path: Path) -> Yolov5Source:
    """A full yolov5 checkpoint: the ``ema`` model when present, else ``model``."""
    source = str(path)
    ckpt = read_torch_archive(path)
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{source}: expected yolov5's checkpoint dict, found a {type(ckpt).__name__}")
    which = "ema" if isinstance(ckpt.get("ema"), ModuleStandIn) else "model"
    model = ckpt.get(which)
    if not isinstance(model, ModuleStandIn):
        if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
            raise CheckpointError(f"{source}: a plain state dict, not a yolov5 checkpoint: give the model's "
                                  "yaml file too (model.checkpoint_yaml)")
        raise CheckpointError(f"{source}: no 'ema' or 'model' entry holding a model (keys: {sorted(map(str, ckpt))})")
    if model.name not in MODEL_CLASSES:
        raise CheckpointError(f"{source}: the checkpoint holds a {model.kind}, not a yolov5 detection model")
    spec_yaml = model.get("yaml")
    layers = model.children().get("model")
    if not isinstance(spec_yaml, dict) or not isinstance(layers, ModuleStandIn):
        raise CheckpointError(f"{source}: the {which} model has no yaml dict or no layer list")
    modules = {int(k): v for k, v in layers.children().items() if str(k).isdigit()}
    return Yolov5Source(path, "checkpoint", spec_yaml, module_state(model), _names(model.get("names"), source),
                        modules, _json_meta(ckpt, which, model))


def read_model_yaml(path: str | Path) -> dict[str, Any]:
    """A yolov5 model yaml (``yolov5n.yaml``), read with ``yaml.safe_load`` (no python tags)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise CheckpointError(f"cannot read the model yaml {path}: {exc.strerror or exc}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not a plain YAML model definition ({exc})") from None
    if not isinstance(data, dict) or not {"backbone", "head"} <= set(data):
        raise CheckpointError(f"{path}: not a yolov5 model yaml (needs backbone and head)")
    return data


_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")  # torch names the refused global "GLOBAL module.name"


def _weights_only_error(path: Path, exc: Exception) -> CheckpointError:
    """torch's weights-only refusal, as a named error (and a hint when it is a full yolov5 checkpoint)."""
    found = _GLOBAL.search(str(exc))
    if not found:
        return CheckpointError(f"{path}: torch.load(weights_only=True) refused it: {str(exc).splitlines()[0]}")
    qualname = found.group(1)
    if qualname.rsplit(".", 1)[0] in MODULE_PACKAGES:
        return CheckpointError(f"{path}: a full yolov5 checkpoint (it holds {qualname}), not a state dict: "
                               "leave model.checkpoint_yaml empty to read it with its own yaml")
    return UnsafePickleError(str(path), qualname)


# what torch.load(weights_only=True) raises for a refused global: pickle's own error class, reached
# through torch so that slimloop itself imports no pickle module (a test scans the sources for it)
_UNPICKLING_ERROR = torch.serialization.pickle.UnpicklingError


def _state_from_pickle(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except _UNPICKLING_ERROR as exc:
        raise _weights_only_error(path, exc) from None
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint not found: {path}") from None
    except (RuntimeError, OSError, EOFError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable torch file ({exc})") from None


def _state_from_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a safetensors file ({exc})") from None


def _yolov5_keys(state: Any, source: str) -> dict[str, torch.Tensor]:
    """``state`` checked to be tensors by name, renamed to ``model.<i>.…`` (DataParallel's
    ``module.`` dropped; a bare ``model.model`` state dict gets the ``model.`` prefix)."""
    if not isinstance(state, dict) or not state or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        kind = type(state).__name__
        raise CheckpointError(f"{source}: expected a state dict (tensor by name), got a {kind}")
    out = {}
    for key, tensor in state.items():
        key = key.removeprefix("module.")
        key = f"model.{key}" if key.split(".", 1)[0].isdigit() else key
        out[key] = tensor
    return out


def read_yolov5(path: str | Path, yaml_path: str | Path | None = None) -> Yolov5Source:
    """Read any of the three forms (see the module docstring); nothing in the file is run.

    Args:
        path: a ``.pt`` checkpoint or state dict, or a ``.safetensors`` state dict.
        yaml_path: the model yaml; required for state dicts, and a full checkpoint must not get one.

    Raises:
        UnsafePickleError: the pickle names a global outside the allowlist.
        CheckpointError: anything else that makes the file unreadable as a yolov5 model.
    """
    path = Path(path)
    if yaml_path is None:
        if path.suffix.lower() == ".safetensors":
            raise CheckpointError(f"{path}: a safetensors state dict needs the model's yaml file "
                                  "(model.checkpoint_yaml)")
        return read_checkpoint(path)
    spec_yaml = read_model_yaml(yaml_path)
    if path.suffix.lower() == ".safetensors":
        form, raw = "safetensors", _state_from_safetensors(path)
    else:
        form, raw = "state_dict", _state_from_pickle(path)
    names = _names(spec_yaml.get("names"), str(yaml_path))
    meta = {"yaml_file": Path(yaml_path).name}
    return Yolov5Source(path, form, spec_yaml, _yolov5_keys(raw, str(path)), names, None, meta)
