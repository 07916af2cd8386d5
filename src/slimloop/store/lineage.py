"""The loop's step-store entries as a DVC out, so `dvc pull` on another machine restores them.

The step store lives outside the project (``$SLIMLOOP_CACHE``), so DVC neither versions nor pushes
it. At the end of a loop the compress stage copies every entry its metrics name (each step of
each iteration, rejected attempts too) into ``models/lineage/<key>/`` and, at its start, copies
those entries that the local store lacks back into it. A colleague who `dvc pull`s an iteration
then reruns the loop, or changes a later param, without retraining the steps already done:
their keys (inputs by content, params, code) are the same on every machine.

An exported manifest names the store's root as ``@store``; importing writes the local root in
its place. The metrics files name step checkpoints the same way (:func:`portable`), so they read
the same on every machine and `dvc metrics diff` shows results, not home directories. Resume states (``*.state.safetensors``) are left out: a finished step never reads its
own again, and they are the larger half of an entry.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from slimloop.errors import ConfigError
from slimloop.io import atomic_dir, make_dir, read_json_file, write_json_atomic
from slimloop.store.entries import KEY, MANIFEST, files_present, read_manifest, store_dir
from slimloop.store.lock import entry_lock

log = logging.getLogger(__name__)
ROOT_TOKEN = "@store"
SKIPPED_SUFFIX = ".state.safetensors"


def keys_in(obj: Any) -> set[str]:
    """Step-store keys named by any path component of any string inside ``obj``."""
    keys: set[str] = set()
    for text in _strings(obj):
        keys.update(part for part in Path(text).parts if KEY.fullmatch(part))
    return keys


def _strings(obj: Any) -> Iterator[str]:
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _strings(value)
    elif isinstance(obj, list | tuple):
        for value in obj:
            yield from _strings(value)


def rebase(obj: Any, old: str, new: str) -> Any:
    """``obj`` with every string that starts with ``old + '/'`` (or equals it) rebased on ``new``."""
    if isinstance(obj, str):
        return new + obj[len(old):] if obj == old or obj.startswith(old + "/") else obj
    if isinstance(obj, dict):
        return {k: rebase(v, old, new) for k, v in obj.items()}
    if isinstance(obj, list):
        return [rebase(v, old, new) for v in obj]
    return obj


def portable(obj: Any) -> Any:
    """``obj`` with the local step store's root written as ``@store`` (for files others read)."""
    return rebase(obj, str(store_dir()), ROOT_TOKEN)


def local(obj: Any) -> Any:
    """``obj`` (a path, or a record) as read from a metrics file, with ``@store`` as this machine's store."""
    return rebase(obj, ROOT_TOKEN, str(store_dir()))


def _closure(root: Path, keys: Iterable[str]) -> list[str]:
    """``keys`` that have a complete entry in ``root``, with every key their manifests name."""
    todo, done = sorted(set(keys)), set()
    while todo:
        key = todo.pop()
        if key in done:
            continue
        manifest = read_manifest(root / key / MANIFEST)
        if manifest is None or not files_present(manifest):
            log.warning("lineage: step-store entry %s is missing or incomplete; not exported", key)
            continue
        done.add(key)
        todo.extend(sorted(keys_in(manifest) - done))
    return sorted(done)


def _copy_entry(src: Path, dest: Path) -> None:
    """Copy one entry's files but its resume states and manifest (the caller writes that last)."""
    for dirpath, dirnames, filenames in os.walk(src):
        dirnames.sort()
        rel = Path(dirpath).relative_to(src)
        make_dir(dest / rel)
        for name in sorted(filenames):
            if name == MANIFEST or name.endswith(SKIPPED_SUFFIX) or (Path(dirpath) / name).is_symlink():
                continue
            shutil.copyfile(Path(dirpath) / name, dest / rel / name)


def export_lineage(root: Path, keys: Iterable[str], dest: Path) -> list[str]:
    """Replace ``dest`` with copies of the entries ``keys`` (and those they name) from store ``root``.

    Returns the exported keys. ``dest`` is swapped in whole (:func:`slimloop.io.atomic_dir`).
    """
    root = Path(root).resolve()
    exported = _closure(root, keys)
    with atomic_dir(dest) as tmp:
        for key in exported:
            _copy_entry(root / key, tmp / key)
            manifest = read_json_file(root / key / MANIFEST, "step manifest")
            write_json_atomic(tmp / key / MANIFEST, rebase(manifest, str(root), ROOT_TOKEN))
    return exported


def import_lineage(src: Path, root: Path) -> list[str]:
    """Copy into store ``root`` every entry of exported lineage ``src`` that ``root`` lacks.

    An entry already in ``root`` is left alone; an exported entry that is incomplete (a file its
    manifest names is missing) is skipped with a warning. Each copy is built under ``root/work``
    and renamed into place with its manifest already written, so a crash leaves no half entry.
    Returns the imported keys.
    """
    src, root = Path(src), Path(root).resolve()
    if not src.is_dir():
        return []
    imported = []
    for entry in sorted(p for p in src.iterdir() if p.is_dir() and KEY.fullmatch(p.name)):
        if read_manifest(root / entry.name / MANIFEST) is not None:
            continue
        with entry_lock(root, entry.name):  # a step computing this key elsewhere finishes first
            if _import_entry(entry, root):
                imported.append(entry.name)
    return imported


def _import_entry(entry: Path, root: Path) -> bool:
    target = root / entry.name
    if read_manifest(target / MANIFEST) is not None:
        return False
    try:
        manifest = rebase(read_json_file(entry / MANIFEST, "step manifest"), ROOT_TOKEN, str(root))
    except ConfigError as exc:
        log.warning("lineage: %s; entry %s not imported", exc, entry.name)
        return False
    work = make_dir(root / "work" / f"import-{entry.name}-{os.getpid()}")
    try:
        _copy_entry(entry, work)
        # every file it names (its own, or another entry's) is in the export
        if not files_present(rebase(manifest, str(root), str(entry.parent))):
            log.warning("lineage: exported entry %s is incomplete or not a manifest; not imported", entry.name)
            return False
        write_json_atomic(work / MANIFEST, manifest)
        if target.exists():  # a crashed step's partial folder: the import supersedes it
            shutil.rmtree(target)
        os.replace(work, target)
        return True
    finally:
        shutil.rmtree(work, ignore_errors=True)
