"""One writer per store entry: a lock file that holds across processes and machines sharing the store."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

from flufl.lock import Lock, LockState, TimeOutError

from slimloop.io import make_dir

LOCKS = "locks"  # the store's folder of lock files, one per key being computed
log = logging.getLogger(__name__)


def _break_if_stale(lock: Lock) -> None:
    """Remove a lock whose holder ran on this machine and is gone (a SIGKILL), without waiting for its
    lifetime; a holder on another machine is only known dead when it stops refreshing."""
    with contextlib.suppress(OSError):
        if lock.state is not LockState.stale:
            return
        claim = Path(lock.lockfile).read_text().strip()
        if lock.state is LockState.stale:  # read again: not broken and retaken in between
            log.warning("step store: breaking the lock of a process that is gone: %s", claim)
            os.unlink(lock.lockfile)
            with contextlib.suppress(OSError):
                os.unlink(claim)


@contextlib.contextmanager
def entry_lock(root: Path, key: str, lifetime: float = 60.0, poll: float = 0.5) -> Iterator[None]:
    """Hold the lock of entry ``key`` in store ``root`` for the body; wait while another holds it.

    The lock is flufl.lock's NFS-safe link(2) protocol, so it works between processes on one machine
    and between machines sharing the store's filesystem. The holder refreshes it every
    ``lifetime / 3`` seconds from a thread; a holder that stops (killed, its machine down) loses
    it ``lifetime`` seconds later, and at once when it ran on this machine.

    Args:
        root: the store's root.
        key: the entry's key.
        lifetime: seconds a lock lives without a refresh.
        poll: seconds between attempts while another process holds it.
    """
    folder = make_dir(Path(root) / LOCKS)
    lock = Lock(str(folder / f"{key}.lock"), lifetime=timedelta(seconds=lifetime))
    while True:
        try:
            lock.lock(timeout=timedelta(seconds=poll))
            break
        except TimeOutError:
            _break_if_stale(lock)
    done = threading.Event()

    def refresh() -> None:
        while not done.wait(lifetime / 3):
            with contextlib.suppress(Exception):  # a missed refresh only shortens the lease
                lock.refresh()

    beat = threading.Thread(target=refresh, name=f"store-lock-{key[:8]}", daemon=True)
    beat.start()
    try:
        yield
    finally:
        done.set()
        beat.join()
        with contextlib.suppress(Exception):
            lock.unlock(unconditionally=True)
