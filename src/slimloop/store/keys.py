"""Step keys of the store: the step's name, its inputs' contents, its params and its code's source."""

from __future__ import annotations

import hashlib
import json
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from slimloop.codegraph import closure_files, package_roots

IGNORED_KWARGS = ("out_dir", "progress")


def _file_digest(path: Path, digest: Any) -> None:
    if path.is_dir():
        for sub in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(str(sub.relative_to(path)).encode())
            _file_digest(sub, digest)
        return
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)


def _hash_value(value: Any, digest: Any) -> None:
    """Feed ``value`` into ``digest``: files by content, params by JSON, the rest by repr."""
    if isinstance(value, Path):
        digest.update(b"path:")
        if value.exists():
            _file_digest(value, digest)
        else:
            digest.update(f"missing:{value}".encode())
    elif isinstance(value, BaseModel):
        digest.update(value.model_dump_json().encode())
    elif is_dataclass(value) and not isinstance(value, type):
        digest.update(type(value).__name__.encode())
        for f in fields(value):
            _hash_value(getattr(value, f.name), digest)
    elif isinstance(value, dict):
        for k in sorted(value):
            digest.update(str(k).encode())
            _hash_value(value[k], digest)
    elif isinstance(value, list | tuple):
        for v in value:
            _hash_value(v, digest)
    else:
        digest.update(json.dumps(value, sort_keys=True, default=repr).encode())


def code_modules(fn: str) -> list[Path]:
    """Source files the step function ``fn`` (``package.module.function``) runs: its module and every
    project module that imports, transitively (the same graph that derives dvc.yaml's deps)."""
    return closure_files([fn.rpartition(".")[0]], package_roots())


def code_digest(fn: str) -> str:
    """Hash of the source of every module step function ``fn`` runs (paths relative to the package)."""
    root = package_roots()["slimloop"].parent
    digest = hashlib.sha256()
    for path in code_modules(fn):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def step_key(name: str, fn: str, kwargs: dict[str, Any]) -> str:
    """Cache key of one step: its name, its inputs' contents and params, and the code it runs.

    Args:
        name: the step's name in the loop (``prune``, ``retrain``, ...).
        fn: the step function, ``package.module.function``.
        kwargs: its arguments; ``out_dir`` and ``progress`` do not count.
    """
    digest = hashlib.sha256(name.encode())
    digest.update(fn.encode())
    digest.update(code_digest(fn).encode())
    for k in sorted(kwargs):
        if k not in IGNORED_KWARGS:
            digest.update(k.encode())
            _hash_value(kwargs[k], digest)
    return digest.hexdigest()[:32]
