"""Read torch.save zip archives without unpickling: only data, tensors and inert stand-ins come out.

``pickle.load`` calls whatever global a file names, so a checkpoint can run any code. Here the
archive's ``data.pkl`` runs on :class:`~slimloop.model.pickle_vm.Machine` with this allowlist of
what a global may become:

- real: the tensor rebuild functions (implemented here, with bounds checks), the storage types
  (as dtypes), torch dtypes, ``torch.Size``, ``collections.OrderedDict``, ``set`` and ``frozenset``;
- inert stand-ins that only keep their pickled state: the classes of ``torch.nn.modules`` and of
  yolov5's ``models``/``utils.activations`` packages (:class:`ModuleStandIn`), and a few metadata
  types training scripts store beside the model (numpy arrays and scalars, paths, argparse
  namespaces: :class:`Opaque`);
- anything else (``os.system``, ``builtins.eval``, ``subprocess.Popen``, ...): refused with
  :class:`~slimloop.errors.UnsafePickleError` naming the file and the global, before anything runs.
"""

from __future__ import annotations

import io
import pickletools
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from slimloop.errors import CheckpointError, UnsafePickleError
from slimloop.model.pickle_vm import Call, Machine, Marker, ModuleStandIn, Opaque, stand_in_class

MAX_PICKLE_BYTES = 512 << 20  # the pickle of a YOLOv5x checkpoint is under 1 MB; tensors live elsewhere

STORAGE_DTYPES = {
    "HalfStorage": torch.float16, "FloatStorage": torch.float32, "DoubleStorage": torch.float64,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}
TORCH_DTYPES = {name: getattr(torch, name) for name in (
    "float16", "half", "float32", "float", "float64", "double", "bfloat16", "int64", "long",
    "int32", "int", "int16", "int8", "uint8", "bool")}
# packages whose classes become ModuleStandIn (YOLOv5's repo layout and the pip package's)
MODULE_PACKAGES = tuple(f"{root}{pkg}" for root in ("", "yolov5.") for pkg in (
    "models.common", "models.yolo", "models.experimental", "utils.activations"))
OPAQUE_GLOBALS = frozenset({
    "numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct", "numpy.ndarray",
    "numpy.dtype", "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar", "_codecs.encode",
    "pathlib.Path", "pathlib.PosixPath", "pathlib.WindowsPath", "argparse.Namespace",
})


@dataclass(frozen=True)
class _Storage:
    """A storage record of the archive as a flat tensor."""

    flat: torch.Tensor  # (numel,)


def _check_view(storage: Any, offset: Any, size: Any, stride: Any) -> None:
    if not isinstance(storage, _Storage):
        raise ValueError("a tensor must be built on a storage of the archive")
    ints = (offset, *size, *stride)
    if len(size) != len(stride) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in ints):
        raise ValueError(f"bad tensor geometry: offset {offset!r}, size {size!r}, stride {stride!r}")
    if all(size):
        last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
        if last >= storage.flat.numel():
            raise ValueError(f"tensor of size {tuple(size)} reaches past its storage ({storage.flat.numel()})")


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, *rest: Any) -> torch.Tensor:
    """``torch._utils._rebuild_tensor(_v2)``: a copy of the strided view, bounds checked."""
    size, stride = tuple(size), tuple(stride)
    _check_view(storage, offset, size, stride)
    return torch.as_strided(storage.flat, size, stride, offset).clone()


def _rebuild_parameter(data: Any, requires_grad: Any = False, hooks: Any = None, *state: Any) -> torch.Tensor:
    if not isinstance(data, torch.Tensor):
        raise ValueError("a parameter must wrap a tensor")
    return data


def _from_items(kind: type) -> Callable[..., Any]:
    def build(*args: Any) -> Any:
        if len(args) > 1 or (args and not isinstance(args[0], list | tuple | OrderedDict)):
            raise ValueError(f"{kind.__name__} takes one list")
        return kind(*args)
    return build


def _size(*args: Any) -> torch.Size:
    if len(args) != 1 or not all(isinstance(v, int) for v in args[0]):
        raise ValueError("torch.Size takes one tuple of ints")
    return torch.Size(args[0])


def _reconstructor(cls: Any, base: Any, state: Any) -> Any:
    """``copyreg._reconstructor`` (protocols 0 and 1), for stand-in classes only."""
    if not (isinstance(cls, type) and issubclass(cls, ModuleStandIn)) or state is not None:
        raise ValueError("copyreg._reconstructor is only allowed for model classes")
    return cls()


REAL_CALLS = {
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor,
    "torch._utils._rebuild_tensor": _rebuild_tensor,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
    "collections.OrderedDict": _from_items(OrderedDict),
    "builtins.set": _from_items(set),
    "builtins.frozenset": _from_items(frozenset),
    "torch.Size": _size,
    "copyreg._reconstructor": _reconstructor,
}



def _resolver(source: str) -> Callable[[str, str], Any]:
    """``resolve(module, name)`` for :class:`Machine`: the allowlist of torch checkpoints."""
    classes: dict[str, type] = {}

    def resolve(module: str, name: str) -> Any:
        qualname = f"{module}.{name}"
        if qualname in REAL_CALLS:
            return Call(qualname, REAL_CALLS[qualname])
        if module == "torch" and name in STORAGE_DTYPES:
            return STORAGE_DTYPES[name]
        if module == "torch" and name in TORCH_DTYPES:
            return TORCH_DTYPES[name]
        if qualname == "builtins.object":
            return Marker(qualname)
        if qualname in OPAQUE_GLOBALS:
            return stand_in_class(qualname, Opaque, classes)
        is_module = module.startswith("torch.nn.modules.") or module in MODULE_PACKAGES
        if is_module and name.isidentifier() and not name.startswith("_"):
            return stand_in_class(qualname, ModuleStandIn, classes)
        raise UnsafePickleError(source, qualname)

    return resolve


def _archive_prefix(zf: zipfile.ZipFile, source: str) -> str:
    pickles = [n for n in zf.namelist() if n.endswith("data.pkl") and n.count("/") <= 1]
    if len(pickles) != 1:
        raise CheckpointError(f"{source}: not a torch.save archive (expected one data.pkl, found {len(pickles)})")
    prefix = pickles[0][: -len("data.pkl")]
    order = f"{prefix}byteorder"
    if order in zf.namelist() and zf.read(order).strip() != b"little":
        raise CheckpointError(f"{source}: big-endian tensor data is not supported")
    return prefix


def _storage_loader(zf: zipfile.ZipFile, prefix: str, source: str) -> Callable[[Any], _Storage]:
    cache: dict[str, _Storage] = {}
    names = set(zf.namelist())

    def load(pid: Any) -> _Storage:
        ok = isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
        if not ok or not isinstance(pid[1], torch.dtype) or not isinstance(pid[2], str) or not isinstance(pid[4], int):
            raise ValueError(f"unknown persistent id {pid!r}")
        dtype, key, numel = pid[1], pid[2], pid[4]
        record = f"{prefix}data/{key}"
        if record not in names:
            raise ValueError(f"storage {key!r} is missing from the archive")
        if key not in cache:
            raw = bytearray(zf.read(record))
            itemsize = torch.empty((), dtype=dtype).element_size()
            if numel < 0 or numel * itemsize > len(raw):
                raise ValueError(f"storage {key!r} claims {numel} elements but holds {len(raw)} bytes")
            flat = torch.frombuffer(raw, dtype=dtype, count=numel) if numel else torch.empty(0, dtype=dtype)
            cache[key] = _Storage(flat)
        return cache[key]

    return load


def _globals_of(data: bytes) -> list[str]:
    """Names of the GLOBAL opcodes of the pickles one after another in ``data`` (parsed, never run),
    for error messages; a legacy torch file is several pickles in a row, then raw storage bytes."""
    found, stream = [], io.BytesIO(data)
    try:
        while stream.tell() < len(data) and data[stream.tell():stream.tell() + 1] == b"\x80":
            for op, arg, _ in pickletools.genops(stream):
                if op.name in ("GLOBAL", "INST") and isinstance(arg, str):
                    found.append(arg.replace(" ", "."))
    except Exception:  # noqa: BLE001 - a best-effort listing for a message about a file we refuse anyway
        pass
    return found


def read_torch_archive(path: str | Path) -> Any:
    """The object a ``torch.save`` zip archive holds, rebuilt without running anything it names.

    Args:
        path: the file (torch >= 1.6 zip format).

    Returns:
        The unpickled object: dicts, lists, tensors (on CPU, in their stored dtype),
        :class:`ModuleStandIn` for modules and :class:`Opaque` for other metadata values.

    Raises:
        UnsafePickleError: the pickle names a global outside the allowlist (nothing was run).
        CheckpointError: not a zip archive (legacy torch < 1.6 files and plain pickles are
            refused unread), a missing or corrupt record, or a malformed pickle.
    """
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if not zipfile.is_zipfile(path):
        head = path.read_bytes()[: 1 << 20]
        named = _globals_of(head) if head[:1] == b"\x80" else []
        calls = f"; it names {', '.join(dict.fromkeys(named))}" if named else ""
        raise CheckpointError(f"{source}: not a torch zip archive (a legacy torch < 1.6 file or a plain pickle, "
                              f"refused unread: unpickling it could run code{calls}); re-save it with "
                              "torch >= 1.6 on a machine you trust, or export a safetensors state dict")
    try:
        with zipfile.ZipFile(path) as zf:
            prefix = _archive_prefix(zf, source)
            info = zf.getinfo(f"{prefix}data.pkl")
            if info.file_size > MAX_PICKLE_BYTES:
                raise CheckpointError(f"{source}: data.pkl is {info.file_size} bytes, more than any checkpoint needs")
            data = zf.read(info)
            return Machine(_resolver(source), _storage_loader(zf, prefix, source)).run(data)
    except (CheckpointError, UnsafePickleError):
        raise
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, RuntimeError, EOFError,
            zipfile.BadZipFile, OSError) as exc:
        raise CheckpointError(f"{source}: corrupt or unsupported torch archive ({type(exc).__name__}: {exc})") from None
