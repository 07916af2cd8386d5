"""Content-addressed task cache for the loop: keys from file contents, params and code source."""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import os
import re
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

from prefect.cache_policies import CachePolicy
from pydantic import BaseModel

ENV_STORE = "SLIMLOOP_CACHE"
# Modules whose code decides what a step produces: a change to any of them invalidates the cache.
CODE_MODULES = (
    "slimloop.compress.steps", "slimloop.compress.groups", "slimloop.compress.surgery",
    "slimloop.compress.sparse", "slimloop.compress.prune", "slimloop.compress.pad",
    "slimloop.compress.retrain", "slimloop.compress.distill", "slimloop.train", "slimloop.optim",
    "slimloop.checkpoint", "slimloop.evaluate", "slimloop.profile", "slimloop.measure",
    "slimloop.postprocess", "slimloop.model.spec", "slimloop.model.build", "slimloop.model.blocks",
    "slimloop.model.loss", "slimloop.data.dataset", "slimloop.data.augment",
)
IGNORED_KWARGS = ("out_dir", "progress")


def store_dir() -> Path:
    """Absolute folder of the step store: ``$SLIMLOOP_CACHE`` or ``~/.cache/slimloop/steps``.

    Absolute on purpose: DVC deletes a stage's outs before running it, and relative paths are not
    carried into ``dvc exp run --queue`` runs, so the store lives outside both.
    """
    env = os.environ.get(ENV_STORE)
    base = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "slimloop" / "steps"
    return base.expanduser().resolve()


STORE_MARKER = ".slimloop-store"  # in the store's root: only such a folder is ever pruned
_STORE_NAMES = re.compile(r"[0-9a-f]{32}|results|work|\.slimloop-store")


def open_store(root: Path | None = None) -> Path:
    """The step store's root (default :func:`store_dir`), created with its marker when missing.

    A folder without the marker becomes a store only when it is empty or holds nothing but store
    entries (a store made before the marker existed); any other folder is refused, so a mistyped
    ``$SLIMLOOP_CACHE`` (a home directory, say) is never written into or pruned.

    Raises:
        ConfigError: ``root`` is a file, or a folder that is not a step store.
    """
    from slimloop.errors import ConfigError

    root = store_dir() if root is None else Path(root)
    if (root / STORE_MARKER).is_file():
        return root
    if root.exists() and not root.is_dir():
        raise ConfigError(f"{ENV_STORE}={root}: is a file, not a step store folder")
    foreign = sorted(p.name for p in root.iterdir() if not _STORE_NAMES.fullmatch(p.name)) if root.is_dir() else []
    if foreign:
        raise ConfigError(f"{ENV_STORE}={root}: this folder is not a slimloop step store (it holds "
                          f"{', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''} and no {STORE_MARKER}); "
                          "point it at an empty or new folder")
    root.mkdir(parents=True, exist_ok=True)
    (root / STORE_MARKER).write_text("slimloop step store: python -m flows.store size | prune\n", encoding="utf-8")
    return root


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


class StepCachePolicy(CachePolicy):
    """Prefect cache policy: ``step_key`` of the task's ``name`` and ``kwargs`` inputs.

    Prefect's own policies do not fit: the default includes the run id (never hits across runs),
    ``INPUTS`` hashes a Path as its string, and ``TASK_SOURCE`` covers the task body only.
    """

    def compute_key(self, task_ctx, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any) -> str | None:
        return step_key(inputs["name"], inputs["kwargs"])
