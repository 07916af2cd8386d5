"""Checkpoints as safetensors: weights plus spec and provenance in the metadata, never pickle."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from slimloop.errors import CheckpointError
from slimloop.io import write_bytes_atomic

FORMAT = "slimloop/1"
DIGEST_KEY = "sha256"  # metadata key: SHA-256 of the other metadata and the tensor bytes


@dataclass
class Checkpoint:
    """A loaded checkpoint: the spec it was built from, its weights and its provenance."""

    spec: Any  # slimloop.model.spec.ModelSpec
    state_dict: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes (the content address of a checkpoint)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _contiguous(state: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in state.items():
        t = t.detach().to("cpu")
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        out[name] = t.contiguous().clone()
    return out


def _digest(metadata: dict[str, str], data: bytes | memoryview) -> str:
    """SHA-256 of the metadata (sorted, without the digest itself) and the tensor bytes after the header."""
    digest = hashlib.sha256(json.dumps({k: v for k, v in metadata.items() if k != DIGEST_KEY},
                                       sort_keys=True).encode())
    header_len = int.from_bytes(data[:8], "little")
    digest.update(memoryview(data)[8 + header_len:])
    return digest.hexdigest()


def _save_with_digest(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """safetensors bytes whose metadata carries a checksum, so that flipped bytes anywhere in the
    spec, provenance or weights are caught on load (safetensors itself checks only the layout)."""
    first = save(tensors, metadata=metadata)
    header_len = int.from_bytes(first[:8], "little")
    header = json.loads(first[8 : 8 + header_len])
    header["__metadata__"] = {**metadata, DIGEST_KEY: _digest(metadata, first)}
    # the tensor bytes and their offsets do not depend on the metadata: only the header is rewritten
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # safetensors pads the header to a multiple of 8 bytes
    return len(text).to_bytes(8, "little") + text + first[8 + header_len :]


def checkpoint_bytes(
    model: torch.nn.Module, meta: dict[str, Any] | None = None, dtype: torch.dtype | None = None
) -> bytes:
    """Serialize ``model`` (which carries ``model.spec``) to safetensors bytes."""
    from slimloop.model.spec import spec_to_json

    header = {
        "format": FORMAT,
        "spec": spec_to_json(model.spec),
        "meta": json.dumps(meta or {}, sort_keys=True),
    }
    return _save_with_digest(_contiguous(model.state_dict(), dtype), header)


def _write(path: Path, data: bytes) -> None:
    """Write atomically; a full disk or a read-only folder is a CheckpointError naming the file."""
    try:
        write_bytes_atomic(path, data)
    except OSError as exc:  # the previous file, if any, is untouched: the write is atomic
        raise CheckpointError(f"cannot write {path}: {exc.strerror or exc}") from exc


def save_checkpoint(
    path: str | os.PathLike,
    model: torch.nn.Module,
    meta: dict[str, Any] | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write ``model`` with its spec and ``meta`` atomically; return the path.

    Args:
        path: destination ``.safetensors`` file.
        model: a built Detector (its ``spec`` attribute is stored).
        meta: JSON-serializable provenance (parent hash, step, params, metrics).
        dtype: store floating tensors in this dtype (``torch.float16`` for the size column).
    """
    path = Path(path)
    _write(path, checkpoint_bytes(model, meta, dtype))
    return path


def _read_header(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint not found: {path}") from None
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc.strerror}") from None
    if len(data) < 8:
        raise CheckpointError(f"{path}: not a safetensors file (only {len(data)} bytes; truncated?)")
    header_len = int.from_bytes(data[:8], "little")
    if header_len <= 0 or 8 + header_len > len(data):
        raise CheckpointError(
            f"{path}: not a safetensors file or truncated (header says {header_len} bytes, "
            f"file has {len(data)}); pickled .pt files are refused on purpose"
        )
    try:
        header = json.loads(data[8 : 8 + header_len])
        tensors = load(data)
    except (SafetensorError, ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: corrupt safetensors file ({exc})") from None
    metadata = header.get("__metadata__") or {}
    # files written before the checksum existed have none and are read as they are
    if DIGEST_KEY in metadata and metadata[DIGEST_KEY] != _digest(metadata, data):
        raise CheckpointError(f"{path}: corrupt file (its checksum does not match its contents)")
    return tensors, metadata


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read a checkpoint without unpickling anything.

    Raises:
        CheckpointError: the file is missing, truncated, corrupt, or carries no valid spec.
    """
    from slimloop.model.spec import spec_from_json

    path = Path(path)
    tensors, metadata = _read_header(path)
    if metadata.get("format") != FORMAT or "spec" not in metadata:
        raise CheckpointError(f"{path}: not a slimloop checkpoint (no spec in its metadata)")
    try:
        spec = spec_from_json(metadata["spec"])
        meta = json.loads(metadata.get("meta", "{}"))
    except (ValueError, TypeError, KeyError) as exc:
        raise CheckpointError(f"{path}: invalid spec in metadata: {exc}") from None
    return Checkpoint(spec=spec, state_dict=tensors, meta=meta, path=path)


def load_state_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``model`` strictly, with a readable error instead of a shape traceback."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and own[k].shape != state[k].shape
    ]
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            parts.append(f"{len(shapes)} shape mismatch(es), first: {shapes[0]}")
        if missing:
            parts.append(f"{len(missing)} missing tensor(s), first: {missing[0]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensor(s), first: {unexpected[0]}")
        raise CheckpointError(f"{source}: weights do not match the spec: " + "; ".join(parts))
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True)


def _check_out_widths(ckpt: Checkpoint, source: str) -> None:
    """Compare the spec's conv and head widths with the stored weights before building anything.

    A spec whose widths disagree with the weights (say a corrupt or hand-edited one claiming
    200000 channels) would otherwise allocate that model first and fail, or exhaust memory, later.
    """
    from slimloop.model.build import conv_widths

    spec = ckpt.spec
    expected = {f"{name}.conv.weight": width for name, width in conv_widths(spec).items()}
    expected.update({f"detect.m.{k}.weight": len(level) * (5 + spec.detect.nc)
                     for k, level in enumerate(spec.detect.anchors)})
    for key, width in expected.items():
        tensor = ckpt.state_dict.get(key)
        if tensor is None or tensor.ndim == 0 or tensor.shape[0] != width:
            found = "missing" if tensor is None else f"{tuple(tensor.shape)}"
            raise CheckpointError(f"{source}: weights do not match the spec: {key} has {width} output "
                                  f"channels in the spec, the weights are {found}")


def load_model(path: str | os.PathLike, nc: int | None = None, device: str | torch.device = "cpu"):
    """Build the model a checkpoint describes and load its weights strictly.

    Args:
        path: the ``.safetensors`` checkpoint.
        nc: if given, the number of classes the caller expects (checked, not adapted).
        device: where to put the model.

    Raises:
        CheckpointError: unreadable file, spec/weights mismatch, or a different class count.
    """
    from slimloop.model.build import build_model

    ckpt = load_checkpoint(path)
    if nc is not None and ckpt.spec.detect.nc != nc:
        raise CheckpointError(
            f"{path}: checkpoint detects {ckpt.spec.detect.nc} classes, the dataset has {nc}"
        )
    _check_out_widths(ckpt, str(path))
    try:
        model = build_model(ckpt.spec)
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: spec does not build: {exc}") from None
    load_state_strict(model, ckpt.state_dict, str(path))
    return model.to(device)


def flatten_state(obj: Any, prefix: str = "") -> tuple[dict[str, torch.Tensor], Any]:
    """Split a nested structure into tensors (by path) and a JSON skeleton referencing them.

    Used for optimizer, scheduler, EMA and RNG state so that resume needs no pickle.
    """
    tensors: dict[str, torch.Tensor] = {}

    def walk(x: Any, key: str) -> Any:
        if isinstance(x, torch.Tensor):
            tensors[key] = x.detach().cpu().contiguous().clone()
            return {"__tensor__": key}
        if isinstance(x, dict):
            return {"__dict__": [[walk(k, f"{key}.k{i}"), walk(v, f"{key}.{i}")] for i, (k, v) in enumerate(x.items())]}
        if isinstance(x, (list, tuple)):
            kind = "__list__" if isinstance(x, list) else "__tuple__"
            return {kind: [walk(v, f"{key}.{i}") for i, v in enumerate(x)]}
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        raise TypeError(f"cannot serialize {type(x).__name__} at {key}")

    return tensors, walk(obj, prefix or "s")


def unflatten_state(tensors: dict[str, torch.Tensor], skeleton: Any) -> Any:
    """Inverse of :func:`flatten_state`."""
    if isinstance(skeleton, dict):
        if "__tensor__" in skeleton:
            return tensors[skeleton["__tensor__"]]
        if "__dict__" in skeleton:
            return {unflatten_state(tensors, k): unflatten_state(tensors, v) for k, v in skeleton["__dict__"]}
        if "__list__" in skeleton:
            return [unflatten_state(tensors, v) for v in skeleton["__list__"]]
        if "__tuple__" in skeleton:
            return tuple(unflatten_state(tensors, v) for v in skeleton["__tuple__"])
    return skeleton


def save_state(path: str | os.PathLike, state: Any) -> None:
    """Write a nested training state (tensors, numbers, strings) as safetensors, atomically."""
    tensors, skeleton = flatten_state(state)
    _write(Path(path), _save_with_digest(tensors, {"format": FORMAT + "-state", "skeleton": json.dumps(skeleton)}))


def load_state(path: str | os.PathLike) -> Any:
    """Read a state written by :func:`save_state`.

    Raises:
        CheckpointError: missing, truncated or not a slimloop state file.
    """
    path = Path(path)
    tensors, metadata = _read_header(path)
    if metadata.get("format") != FORMAT + "-state":
        raise CheckpointError(f"{path}: not a slimloop training-state file")
    try:
        return unflatten_state(tensors, json.loads(metadata["skeleton"]))
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"{path}: corrupt training state ({exc})") from None
