"""Size and pruning of the step store: scan its entries, find what no metrics file references and
nothing used lately, and remove it without ever following a link out of the store."""

from __future__ import annotations

import os
import shutil
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from slimloop.errors import SlimloopError
from slimloop.io import load_json_text
from slimloop.store.entries import ENV_STORE, KEY, MANIFEST, STORE_MARKER
from slimloop.store.lineage import keys_in

RESULTS, WORK = "results", "work"
DAY = 86400.0
# An incomplete folder may be a step that is still running, so orphans wait this long before
# they go, or --keep-days if that is shorter.
ORPHAN_GRACE_DAYS = 1.0


class StoreError(SlimloopError):
    """The store or a metrics folder cannot be read, or a removal would leave the store."""


@dataclass(frozen=True)
class Entry:
    """One cache key: its folder and/or its Prefect result record."""

    key: str
    folder: Path | None
    record: Path | None
    complete: bool  # a result record or a manifest: the step finished
    size: int
    last_used: float  # latest mtime of the folder itself and the record (a cache hit may touch it)
    newest: float  # latest mtime anywhere inside: a running step is still writing


@dataclass(frozen=True)
class Removal:
    """A path prune removes (or would), and why."""

    path: Path
    size: int
    reason: str


# ---------------------------------------------------------------------------------- scanning
def _walk(path: Path) -> Iterator[os.stat_result]:
    """lstat of ``path`` and everything below it; symlinks are listed, never followed."""
    st = os.lstat(path)
    yield st
    if stat.S_ISDIR(st.st_mode):
        for dirpath, dirnames, filenames in os.walk(path):  # followlinks=False
            for name in dirnames + filenames:
                yield os.lstat(os.path.join(dirpath, name))


def tree_size(path: Path) -> int:
    """Bytes of the files (and links) at or under ``path``."""
    return sum(st.st_size for st in _walk(path) if not stat.S_ISDIR(st.st_mode))


def _newest(path: Path) -> float:
    return max(st.st_mtime for st in _walk(path))


def _children(folder: Path) -> list[Path]:
    return sorted(folder.iterdir()) if folder.is_dir() and not folder.is_symlink() else []


def scan(root: Path) -> list[Entry]:
    """Every cache key in the store (folders named by a key, records in ``results/``)."""
    folders = {p.name: p for p in _children(root) if KEY.fullmatch(p.name)}
    records = {p.name: p for p in _children(root / RESULTS) if KEY.fullmatch(p.name)}
    entries = []
    for key in sorted(folders.keys() | records.keys()):
        folder, record = folders.get(key), records.get(key)
        parts = [p for p in (folder, record) if p is not None]
        complete = record is not None or (folder is not None and not folder.is_symlink()
                                          and (folder / MANIFEST).is_file())
        entries.append(Entry(key, folder, record, complete, sum(tree_size(p) for p in parts),
                             max(os.lstat(p).st_mtime for p in parts), max(_newest(p) for p in parts)))
    return entries


def referenced_keys(metrics_dirs: list[Path]) -> set[str]:
    """Cache keys named in a path in ``iterations/iter_*.json`` or ``final.json`` of each folder.

    Any path component that is a key counts, wherever the store was when the metrics were
    written (another machine, another $SLIMLOOP_CACHE): keeping too much is the safe mistake.

    Raises:
        StoreError: a folder is missing or a metrics file is not JSON (refuse rather than guess).
    """
    keys: set[str] = set()
    for folder in metrics_dirs:
        if not folder.is_dir():
            raise StoreError(f"metrics folder {folder} does not exist: run from the project root or "
                             "pass --metrics-dir")
        for path in [*sorted(folder.glob("iterations/iter_*.json")), folder / "final.json"]:
            if not path.is_file():
                continue
            try:
                obj = load_json_text(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:  # JSONTextError and UnicodeDecodeError are ValueErrors
                raise StoreError(f"cannot read references from {path}: {exc}") from None
            keys |= keys_in(obj)
    return keys


# ----------------------------------------------------------------------------------- pruning
def escapes(path: Path, root: Path) -> Path | None:
    """Where ``path`` really points when that is outside ``root`` (a symlink out), else None."""
    real = Path(os.path.realpath(path))
    return None if real.is_relative_to(root) else real


def _age(seconds: float) -> str:
    if seconds >= DAY:
        return f"{seconds / DAY:.1f} days"
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"


def _wrote_to_folder(entry: Entry) -> bool:
    """Whether the record's result names a file in the entry's own folder (``<key>/...``)."""
    try:
        return f"{entry.key}/" in entry.record.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False


def plan_prune(entries: list[Entry], root: Path, referenced: set[str], keep_days: float,
               now: float) -> list[Removal]:
    """What prune removes: unreferenced entries unused for ``keep_days``, orphans, ``work/``.

    Orphans: a folder with neither a result record nor a manifest (a crashed step) once older than
    the grace period, and a record whose result pointed into its folder when that folder is gone.
    A record of a step that writes nothing (its checkpoint lies elsewhere) ages like an entry.
    """
    cutoff, grace = now - keep_days * DAY, now - min(keep_days, ORPHAN_GRACE_DAYS) * DAY
    plan: list[Removal] = []

    def add(path: Path, reason: str) -> None:
        plan.append(Removal(path, tree_size(path), reason))

    for e in entries:
        if e.key in referenced:
            continue
        stale = f"not referenced, last used {_age(now - e.last_used)} ago"
        if e.folder is not None and e.complete:
            if e.last_used < cutoff:
                add(e.folder, stale)
                if e.record is not None:
                    add(e.record, stale)
        elif e.folder is not None:
            if e.newest < grace:
                add(e.folder, "orphan: no result record or manifest")
        elif _wrote_to_folder(e):
            add(e.record, "orphan: its folder is gone")
        elif e.last_used < cutoff:
            add(e.record, stale)
    work = root / WORK
    if os.path.lexists(work) and _newest(work) < grace:
        add(work, "scratch folder")
    return plan


def remove(path: Path, root: Path) -> None:
    """Delete one store entry; a symlink is unlinked, never followed.

    Raises:
        StoreError: ``path`` is not an entry of ``root`` or points outside it.
    """
    if path.parent not in (root, root / RESULTS) or escapes(path.parent, root) is not None:
        raise StoreError(f"refusing to remove {path}: not an entry of the store {root}")
    if path.is_symlink():
        path.unlink()
    elif path.is_dir():
        # rmtree unlinks symlinks inside without following them (fd-based on Linux).
        shutil.rmtree(path)
    else:
        path.unlink()


# --------------------------------------------------------------------------------- reporting
def human(n: float) -> str:
    """``n`` bytes as B, KiB, MiB, GiB or TiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def print_size(root: Path, top: int) -> None:
    """Print the store's total size, its number of entries and the ``top`` largest."""
    entries = scan(root)
    now = time.time()
    total = tree_size(root) if root.exists() else 0
    work = tree_size(root / WORK) if os.path.lexists(root / WORK) else 0
    print(f"store {root}: {human(total)} in {len(entries)} entries (work/: {human(work)})")
    if entries:
        print(f"largest {min(top, len(entries))}:")
    for e in sorted(entries, key=lambda e: -e.size)[:top]:
        note = ("  (link, not followed)" if e.folder and e.folder.is_symlink() else
                "" if e.complete and e.folder else "  (incomplete)" if e.folder else "  (no folder)")
        print(f"  {human(e.size):>10}  {e.key}  last used {_age(now - e.last_used)} ago{note}")


def prune(root: Path, metrics_dirs: list[Path], keep_days: float, dry_run: bool) -> int:
    """Remove what :func:`plan_prune` lists (or only print it); returns the bytes freed.

    Raises:
        StoreError: ``root`` has no store marker (it is not a step store slimloop made).
    """
    if not (root / STORE_MARKER).is_file():
        raise StoreError(f"refusing to prune {root}: it is not a slimloop step store (no {STORE_MARKER}); "
                         f"check {ENV_STORE}")
    entries = scan(root)
    referenced = referenced_keys(metrics_dirs)
    plan = plan_prune(entries, root, referenced, keep_days, time.time())
    verb, freed, gone = ("would remove" if dry_run else "removed"), 0, set()
    for item in plan:
        if target := escapes(item.path, root):
            print(f"skipped {item.path}: a link to {target}, outside the store (not followed)")
            continue
        if not dry_run:
            remove(item.path, root)
        freed += item.size
        gone.add(item.path.name)
        print(f"{verb} {human(item.size):>10}  {item.path}  ({item.reason})")
    keys = {e.key for e in entries}
    print(f"kept {len(keys - gone)} of {len(keys)} entries ({len(referenced & keys)} referenced by "
          f"{', '.join(map(str, metrics_dirs))})")
    print(f"{'would free' if dry_run else 'freed'} {human(freed)} ({freed:,} bytes)")
    return freed
