"""Step keys of the store: the step's name, its inputs' contents, its params and its code's source."""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

# Modules whose code decides what a step produces: a change to any of them invalidates the cache.
CODE_MODULES = (
    "slimloop.compress.steps", "slimloop.compress.groups", "slimloop.compress.surgery",
    "slimloop.compress.sparse", "slimloop.compress.prune", "slimloop.compress.pad",
    "slimloop.compress.retrain", "slimloop.compress.distill", "slimloop.train", "slimloop.optim",
    "slimloop.checkpoint", "slimloop.evaluate", "slimloop.profile", "slimloop.measure",
    "slimloop.postprocess", "slimloop.model.spec", "slimloop.model.build", "slimloop.model.blocks",
    "slimloop.model.loss", "slimloop.data.dataset", "slimloop.data.augment",
    "slimloop.deploy.export", "slimloop.deploy.runtimes", "slimloop.deploy.latency",
)
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


def code_digest() -> str:
    """Hash of the source of every module a step runs."""
    digest = hashlib.sha256()
    for name in CODE_MODULES:
        digest.update(inspect.getsource(importlib.import_module(name)).encode())
    return digest.hexdigest()


def step_key(name: str, kwargs: dict[str, Any]) -> str:
    """Cache key of one step: its name, its inputs' contents and params, and the code."""
    digest = hashlib.sha256(name.encode())
    digest.update(code_digest().encode())
    for k in sorted(kwargs):
        if k not in IGNORED_KWARGS:
            digest.update(k.encode())
            _hash_value(kwargs[k], digest)
    return digest.hexdigest()[:32]
