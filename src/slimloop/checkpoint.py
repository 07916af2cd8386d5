"""Checkpoints as safetensors: weights plus spec and provenance in the metadata, never pickle."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from slimloop.errors import CheckpointError
from slimloop.io import parse_json, write_bytes_atomic

FORMAT = "slimloop/1"
DIGEST_KEY = "sha256"  # metadata key: SHA-256 of the other metadata and the tensor bytes
# The SHA-256 catches damage, not forgery: anyone can recompute it. With this variable set, every
# file is also signed (HMAC-SHA256 keyed by its value) and every file loaded must carry a valid signature.
SIGNING_ENV = "SLIMLOOP_SIGNING_KEY"
SIGNATURE_KEY = "hmac_sha256"  # metadata key of the signature
_UNSIGNED = (DIGEST_KEY, SIGNATURE_KEY)


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


def signing_key() -> bytes | None:
    """The user's signing key (``$SLIMLOOP_SIGNING_KEY`` as UTF-8), or None when unset or empty."""
    key = os.environ.get(SIGNING_ENV, "")
    return key.encode("utf-8") if key else None


def _digest(metadata: dict[str, str], data: bytes | memoryview, key: bytes | None = None) -> str:
    """SHA-256 of the metadata (sorted, without the digest and signature) and the tensor bytes after
    the header; with ``key``, the HMAC-SHA256 of the same bytes."""
    digest = hmac.new(key, digestmod=hashlib.sha256) if key is not None else hashlib.sha256()
    digest.update(json.dumps({k: v for k, v in metadata.items() if k not in _UNSIGNED}, sort_keys=True).encode())
    header_len = int.from_bytes(data[:8], "little")
    digest.update(memoryview(data)[8 + header_len:])
    return digest.hexdigest()


def _save_with_digest(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """safetensors bytes whose metadata carries a checksum, so that flipped bytes anywhere in the
    spec, provenance or weights are caught on load (safetensors itself checks only the layout), and
    a signature when :func:`signing_key` is set."""
    first = save(tensors, metadata=metadata)
    header_len = int.from_bytes(first[:8], "little")
    header = json.loads(first[8 : 8 + header_len])
    header["__metadata__"] = {**metadata, DIGEST_KEY: _digest(metadata, first)}
    if (key := signing_key()) is not None:
        header["__metadata__"][SIGNATURE_KEY] = _digest(metadata, first, key)
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
    header = parse_json(bytes(data[8 : 8 + header_len]), f"{path} (safetensors header)", CheckpointError)
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise CheckpointError(f"{path}: corrupt safetensors file (its metadata is not a map of strings)")
    try:
        tensors = load(data)
    except (SafetensorError, ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: corrupt safetensors file ({exc})") from None
    metadata = metadata or {}
    # files written before the checksum existed have none and are read as they are
    if DIGEST_KEY in metadata and metadata[DIGEST_KEY] != _digest(metadata, data):
        raise CheckpointError(f"{path}: corrupt file (its checksum does not match its contents)")
    _verify_signature(path, metadata, data)
    return tensors, metadata


def _verify_signature(path: Path, metadata: dict[str, str], data: bytes) -> None:
    """With :func:`signing_key` set, refuse a file that is unsigned or signed with another key."""
    key = signing_key()
    if key is None:
        return
    if SIGNATURE_KEY not in metadata:
        raise CheckpointError(f"{path}: not signed, and {SIGNING_ENV} is set: only files written with that "
                              "key are loaded (unset it to load unsigned files)")
    if not hmac.compare_digest(metadata[SIGNATURE_KEY], _digest(metadata, data, key)):
        raise CheckpointError(f"{path}: wrong signature: written with another {SIGNING_ENV}, or changed "
                              "after it was signed")


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
        spec = spec_from_json(metadata["spec"], "spec")
    except (ValueError, TypeError, KeyError) as exc:
        raise CheckpointError(f"{path}: invalid spec in metadata: {exc}") from None
    meta = parse_json(metadata.get("meta", "{}"), f"{path} (provenance)", CheckpointError)
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: invalid provenance in metadata: not a JSON object")
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


def _check_shapes(ckpt: Checkpoint, source: str) -> None:
    """Compare every stored tensor's full shape and kind with what the spec builds, before building it.

    A spec whose widths disagree with the weights (say a corrupt or hand-edited one claiming
    200000 channels) would otherwise allocate that model first and fail, or exhaust memory, later.
    """
    from slimloop.model.shapes import state_shapes

    expected = state_shapes(ckpt.spec)
    for key, shape in expected.items():
        tensor = ckpt.state_dict.get(key)
        if tensor is None or tuple(tensor.shape) != shape:
            found = "missing" if tensor is None else f"{tuple(tensor.shape)}"
            raise CheckpointError(f"{source}: weights do not match the spec: {key} is {shape} in the spec, "
                                  f"the weights are {found}")
        if key.endswith("num_batches_tracked") == tensor.is_floating_point() or tensor.is_complex():
            raise CheckpointError(f"{source}: weights do not match the spec: {key} is of type {tensor.dtype}")
    unexpected = sorted(set(ckpt.state_dict) - set(expected))
    if unexpected:
        raise CheckpointError(f"{source}: weights do not match the spec: {len(unexpected)} tensor(s) the "
                              f"spec does not have, first: {unexpected[0][:80]}")


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
    _check_shapes(ckpt, str(path))
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


_NODES = ("__tensor__", "__dict__", "__list__", "__tuple__")


def unflatten_state(tensors: dict[str, torch.Tensor], skeleton: Any, where: str = "s") -> Any:
    """Inverse of :func:`flatten_state`.

    Raises:
        ValueError: a node :func:`flatten_state` cannot have written (named by its path): an unknown
            or missing tensor, a bare list, an unhashable dict key.
    """
    if isinstance(skeleton, list):
        raise ValueError(f"{where}: a bare list (lists are written as __list__ nodes)")
    if not isinstance(skeleton, dict):
        return skeleton
    kind, value = next(iter(skeleton.items())) if len(skeleton) == 1 else (None, None)
    if kind not in _NODES:
        raise ValueError(f"{where}: not a state node (keys {', '.join(str(k)[:20] for k in list(skeleton)[:4])})")
    if kind == "__tensor__":
        if not isinstance(value, str) or value not in tensors:
            raise ValueError(f"{where}: names no stored tensor")
        return tensors[value]
    if not isinstance(value, list):
        raise ValueError(f"{where}: {kind} must hold a list")
    if kind != "__dict__":
        items = [unflatten_state(tensors, v, f"{where}.{i}") for i, v in enumerate(value)]
        return items if kind == "__list__" else tuple(items)
    out = {}
    for i, pair in enumerate(value):
        if not (isinstance(pair, list) and len(pair) == 2):
            raise ValueError(f"{where}.{i}: a dict entry must be a [key, value] pair")
        key = unflatten_state(tensors, pair[0], f"{where}.k{i}")
        try:
            hash(key)
        except TypeError:
            raise ValueError(f"{where}.k{i}: a dict key must be a number, string or tuple") from None
        out[key] = unflatten_state(tensors, pair[1], f"{where}.{i}")
    return out


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
    if not isinstance(metadata.get("skeleton"), str):
        raise CheckpointError(f"{path}: corrupt training state (no skeleton)")
    skeleton = parse_json(metadata["skeleton"], f"{path} (state skeleton)", CheckpointError)
    try:
        return unflatten_state(tensors, skeleton)
    except ValueError as exc:
        raise CheckpointError(f"{path}: corrupt training state ({exc})") from None
