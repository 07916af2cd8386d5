"""Atomic file writes: a reader never sees half a file, a crash never leaves one behind."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

from pydantic import BaseModel, ValidationError

from slimloop.errors import ConfigError, OutputPathError


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it into place only if the block succeeds.

    The temporary file lives in the same directory, so the final ``os.replace`` is atomic.
    On any exception the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    _make_parent(path)
    if path.is_dir() and not path.is_symlink():
        raise OutputPathError(f"{path}: is a folder; slimloop will not replace a folder with a file")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or ".tmp", dir=path.parent)
    except PermissionError:
        raise OutputPathError(f"{path}: cannot write in {path.parent}: permission denied") from None
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; final files get the usual mode
    try:
        yield tmp_path
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (keys kept in insertion order)."""
    write_text_atomic(path, json.dumps(obj, indent=indent, allow_nan=False) + "\n")


OUTPUT_MARKER = ".slimloop-output"  # in every folder atomic_dir makes: only such folders are replaced
_MARKER_TEXT = "This folder was written by slimloop; slimloop may replace it.\n"


def _real(path: str | os.PathLike) -> Path:
    return Path(os.path.realpath(path))


def _overlap(out: Path, other: Path, inside: bool) -> str | None:
    """How ``out`` overlaps ``other`` (both real paths): equal, contains it, or (``inside``) lies in it."""
    if out == other:
        return "is"
    if other.is_relative_to(out):
        return "contains"
    if inside and out.is_relative_to(other):
        return "is inside"
    return None


class Protected(NamedTuple):
    """A path an output folder must not equal or contain; with ``inside``, nor lie inside it."""

    what: str  # how the error names it: "the dataset source", "the project folder"
    path: Path
    inside: bool = True


def check_output_dir(path: str | os.PathLike, protected: Iterable[Protected] = ()) -> None:
    """Refuse an output folder that slimloop must not replace, before anything is written.

    Refused: the current directory or a folder that contains it; a symbolic link; a file; an
    existing non-empty folder without :data:`OUTPUT_MARKER` (slimloop did not make it); and a
    folder equal to or containing a ``protected`` path (or inside it, where it says so).

    Raises:
        OutputPathError: naming the path and the reason.
    """
    path = Path(path)
    out, cwd = _real(path), _real(Path.cwd())
    if _overlap(out, cwd, inside=False):
        raise OutputPathError(f"{path}: refusing to use it as an output folder: it is or contains the current "
                              f"directory {cwd}, which slimloop would replace")
    for guard in protected:
        if how := _overlap(out, _real(guard.path), guard.inside):
            raise OutputPathError(f"{path}: refusing to use it as an output folder: it {how} {guard.what} "
                                  f"{guard.path}")
    if path.is_symlink():
        raise OutputPathError(f"{path}: refusing to replace a symbolic link (to {os.readlink(path)}); "
                              "slimloop replaces only folders it made")
    if path.exists() and not path.is_dir():
        raise OutputPathError(f"{path}: exists and is not a folder; slimloop will not replace a file with a folder")
    if path.is_dir() and not (path / OUTPUT_MARKER).is_file() and any(path.iterdir()):
        raise OutputPathError(f"{path}: exists, is not empty and was not written by slimloop (it has no "
                              f"{OUTPUT_MARKER}); move it away or choose another output folder")


def _make_parent(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise OutputPathError(f"{path}: cannot create it: a part of {path.parent} is a file, not a folder") from None
    except PermissionError:
        raise OutputPathError(f"{path}: cannot create it: permission denied in {path.parent}") from None


def make_dir(path: str | os.PathLike) -> Path:
    """Create the folder ``path`` (and its parents) unless it exists; return it.

    Raises:
        OutputPathError: it, or a part of it, is a file; or a parent is read-only.
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise OutputPathError(f"{path}: cannot create the folder: it, or a part of it, is a file") from None
    except PermissionError:
        raise OutputPathError(f"{path}: cannot create the folder: permission denied") from None
    except OSError as exc:  # a read-only file system, a full disk
        raise OutputPathError(f"{path}: cannot create the folder: {exc.strerror}") from None
    return path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_siblings(path: Path) -> None:
    """Remove temporaries of earlier atomic_dir calls on ``path`` whose process died (killed runs)."""
    for sibling in path.parent.glob(f".{path.name}.*.slimloop-tmp*"):
        pid = sibling.name.split(".")[-2]
        if (sibling / OUTPUT_MARKER).is_file() and pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(sibling, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, protected: Iterable[Protected] = ()) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; swap it into place if the block succeeds.

    Any previous directory at ``path`` is replaced only after the new one is complete, so a failed
    run leaves either the old directory or nothing, never a half-written one. Only a folder that
    slimloop made (it holds :data:`OUTPUT_MARKER`, which the new folder gets too) or an empty one is
    replaced: :func:`check_output_dir` runs (with ``protected``) before the block and again before
    the swap. No temporary is left behind, after success or failure; those of killed runs are
    removed on the next call.

    Raises:
        OutputPathError: ``path`` must not be replaced, or its parent cannot be created.
    """
    path, protected = Path(path), tuple(protected)
    check_output_dir(path, protected)
    _make_parent(path)
    _remove_stale_siblings(path)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=f".{os.getpid()}.slimloop-tmp", dir=path.parent))
    except PermissionError:
        raise OutputPathError(f"{path}: cannot write in {path.parent}: permission denied") from None
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        (tmp / OUTPUT_MARKER).write_text(_MARKER_TEXT, encoding="utf-8")
        yield tmp
        check_output_dir(path, protected)
        _swap(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a swap


def _swap(tmp: Path, path: Path) -> None:
    """Move ``tmp`` to ``path``; an old folder there goes into ``tmp``'s name and is then removed."""
    if not path.exists():
        os.replace(tmp, path)
        return
    old = tmp.with_name(tmp.name + "-old")
    os.replace(path, old)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.replace(old, path)
        raise
    os.replace(old, tmp)  # removed by the caller's finally, as a temporary of this process


MAX_DEPTH = 100  # nesting levels accepted in a JSON or YAML file; slimloop's own files need fewer than 20


def _constant(name: str) -> float:
    raise ValueError(f"{name} is not a number slimloop writes")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:20]} is out of range")
    return value


class JSONTextError(ValueError):
    """Text that is not JSON slimloop could have written; ``line`` is 1-based where known."""

    def __init__(self, message: str, line: int | None = None):
        super().__init__(message)
        self.message, self.line = message, line


def _check_depth(obj: Any) -> None:
    """Refuse nesting deeper than :data:`MAX_DEPTH` (iteratively: the check itself cannot recurse)."""
    stack = [(obj, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise JSONTextError(f"nested deeper than {MAX_DEPTH} levels")
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))


def load_json_text(text: str | bytes) -> Any:
    """Parse JSON read back from a file that anyone could have written.

    Deep nesting (which makes ``json.loads`` raise ``RecursionError``, and any later recursive walk
    too), ``NaN``/``Infinity`` (slimloop never writes them), numbers out of range and malformed text
    are all refused.

    Raises:
        JSONTextError: with the line where known.
    """
    try:
        obj = json.loads(text, parse_constant=_constant, parse_float=_finite_float)
    except json.JSONDecodeError as exc:
        raise JSONTextError(f"not valid JSON: {exc.msg}", exc.lineno) from None
    except RecursionError:
        raise JSONTextError(f"nested deeper than {MAX_DEPTH} levels") from None
    except ValueError as exc:  # bytes not UTF-8, NaN, 1e999, an integer of more than 4300 digits
        raise JSONTextError(f"not valid JSON: {exc}") from None
    _check_depth(obj)
    return obj


def parse_json(text: str | bytes, source: str, error: type[Exception] = ConfigError) -> Any:
    """:func:`load_json_text`, failures raised as ``error``: ``<source>[:<line>]: <problem>``."""
    try:
        return load_json_text(text)
    except JSONTextError as exc:
        where = f"{source}:{exc.line}" if exc.line else source
        raise error(f"{where}: {exc.message}") from None


def read_json_file(path: str | os.PathLike, what: str, error: type[Exception] = ConfigError) -> Any:
    """The parsed JSON file ``path`` (see :func:`parse_json`); ``what`` names it when it cannot be read.

    Raises:
        error: the file is missing, unreadable, or not JSON slimloop could have written.
    """
    return parse_json(read_text_file(path, what, error), str(path), error)


def read_stage_json(path: str | os.PathLike, stage: str, schema: type[BaseModel] | None = None) -> Any:
    """A JSON file another pipeline stage writes; a missing one names the stage to run first.

    Args:
        path: the metrics file.
        stage: the stage that writes it (named when the file is missing).
        schema: a pydantic model the content must match (the keys and types the reader relies on).

    Raises:
        ConfigError: the file is missing, unreadable, not JSON, or does not match ``schema``
            (naming the file and the key path).
    """
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        raise ConfigError(f"{path} does not exist: run the {stage} stage first (dvc repro {stage})")
    obj = read_json_file(path, "metrics file")
    if schema is not None:
        check_schema(obj, schema, str(path), "metrics file")
    return obj


def check_schema(obj: Any, schema: type[BaseModel], source: str, what: str,
                 error: type[Exception] = ConfigError) -> BaseModel:
    """Validate ``obj`` (strictly: no string for a number, no bool for an int) as ``schema``.

    Raises:
        error: ``<source>: invalid <what>: <key.path>: <reason>`` for the first few mismatches.
    """
    try:
        return schema.model_validate(obj, strict=True)
    except ValidationError as exc:
        lines = [f"{'.'.join(str(k)[:40] for k in e['loc']) or '<top>'}: {e['msg']}" for e in exc.errors()[:5]]
        more = f" (and {exc.error_count() - 5} more)" if exc.error_count() > 5 else ""
        raise error(f"{source}: invalid {what}: " + "; ".join(lines) + more) from None


def read_text_file(path: str | os.PathLike, what: str, error: type[Exception] = ConfigError) -> str:
    """The UTF-8 text of ``path``; ``what`` names the file in the ``error`` raised when it cannot be
    read (``<path>: cannot read <what>: <reason>``) or is not text."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise error(f"{path}: cannot read {what}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise error(f"{path}: not a text file (not UTF-8)") from None
