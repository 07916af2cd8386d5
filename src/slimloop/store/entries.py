"""Entries of the step store: where it lives, its marker, one folder per key with a manifest
written last, and running a step into its entry (or serving the entry already there)."""

from __future__ import annotations

import importlib
import inspect
import logging
import os
import re
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from slimloop.errors import ConfigError
from slimloop.io import check_schema, make_dir, read_json_file, write_json_atomic, write_text_atomic
from slimloop.records import StepManifest
from slimloop.store.lock import entry_lock

ENV_STORE = "SLIMLOOP_CACHE"
log = logging.getLogger(__name__)


def store_dir() -> Path:
    """Absolute folder of the step store: ``$SLIMLOOP_CACHE`` or ``~/.cache/slimloop/steps``.

    Absolute on purpose: DVC deletes a stage's outs before running it, and relative paths are not
    carried into ``dvc exp run --queue`` runs, so the store lives outside both.
    """
    env = os.environ.get(ENV_STORE)
    base = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "slimloop" / "steps"
    return base.expanduser().resolve()


STORE_MARKER = ".slimloop-store"  # in the store's root: only such a folder is ever pruned
_STORE_NAMES = re.compile(r"[0-9a-f]{32}|results|work|locks|\.slimloop-store")
KEY = re.compile(r"[0-9a-f]{32}")
# The file run_stored_step writes last into an entry folder: a folder with neither it nor a result
# record is a step that crashed or is still running.
MANIFEST = "step.json"


def open_store(root: Path | None = None) -> Path:
    """The step store's root (default :func:`store_dir`), created with its marker when missing.

    A folder without the marker becomes a store only when it is empty or holds nothing but store
    entries (a store made before the marker existed); any other folder is refused, so a mistyped
    ``$SLIMLOOP_CACHE`` (a home directory, say) is never written into or pruned.

    Raises:
        ConfigError: ``root`` is a file, or a folder that is not a step store.
    """
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
    make_dir(root)
    write_text_atomic(root / STORE_MARKER, "slimloop step store: python -m flows.store size | prune\n")
    return root


def files_present(out: Any) -> bool:
    """Whether ``out`` is a step manifest (see :class:`slimloop.records.StepManifest`) whose checkpoint
    and absolute paths among the extras all exist; anything else (a damaged cache record) is False."""
    try:
        StepManifest.model_validate(out, strict=True)
    except ValidationError:
        return False
    paths = [out["checkpoint"]] + [v for v in out["extra"].values() if isinstance(v, str) and v.startswith("/")]
    return all(Path(p).exists() for p in paths)


def read_manifest(path: Path) -> dict[str, Any] | None:
    """The manifest at ``path``, or None when it is missing; a truncated, unreadable or malformed one
    is logged and read as None too, so the step runs again and writes it anew."""
    if not path.exists():
        return None
    try:
        out = read_json_file(path, "step manifest")
        check_schema(out, StepManifest, str(path), "step manifest")
    except ConfigError as exc:
        log.warning("step store: %s; the step runs again", exc)
        return None
    return out


def _hit(out_dir: Path) -> dict[str, Any] | None:
    out = read_manifest(out_dir / MANIFEST)
    if out is not None and files_present(out):
        os.utime(out_dir)
        return out
    return None


def run_stored_step(name: str, fn: str, kwargs: dict[str, Any], key: str) -> dict[str, Any]:
    """Run step ``fn`` into ``store/<key>``, or return the entry already there.

    An entry counts only when its manifest (written last, atomically) exists and every file it
    names is present; otherwise the step runs again in the same folder (training resumes from its
    ``last`` checkpoint there). A hit touches the folder, so ``flows.store prune`` keeps entries in use.
    A manifest that is truncated or not a manifest is a miss (logged), never an error.

    A miss runs under the entry's lock (:func:`slimloop.store.lock.entry_lock`): of processes (or
    machines sharing the store) asking for one key at once, one computes and the others wait for
    it, then read its entry.
    """
    out_dir = store_dir() / key
    out = _hit(out_dir)
    if out is not None:
        return out
    with entry_lock(store_dir(), key):
        out = _hit(out_dir)  # computed by the process that held the lock while this one waited
        return out if out is not None else _run_into(name, fn, kwargs, out_dir)


def _run_into(name: str, fn: str, kwargs: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    manifest = out_dir / MANIFEST
    module, _, attr = fn.rpartition(".")
    step = getattr(importlib.import_module(module), attr)
    if "out_dir" in inspect.signature(step).parameters:  # evaluate_step writes nothing
        kwargs = {**kwargs, "out_dir": out_dir}
    result = step(**kwargs)
    out = {"name": name, "checkpoint": str(result.checkpoint), "record": result.record, "extra": result.extra}
    write_json_atomic(manifest, out)
    return out


def touch_entry(path: str | Path) -> None:
    """Mark the store entry holding ``path`` as used now (its folder's mtime), so a cache hit
    keeps it through ``prune --keep-days``; paths outside the store are ignored."""
    root = store_dir()
    try:
        key = Path(os.path.abspath(path)).relative_to(root).parts[0]
    except (ValueError, IndexError):
        return
    if KEY.fullmatch(key) and (root / key).is_dir() and not (root / key).is_symlink():
        os.utime(root / key)
