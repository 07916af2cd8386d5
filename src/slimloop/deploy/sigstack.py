"""Keep this thread's alternate signal stack as it was across calls into native runtimes."""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Iterator
from contextlib import contextmanager

_SS_DISABLE = 2  # <signal.h> on Linux


class _StackT(ctypes.Structure):
    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]


def _libc():
    return ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def signal_stack() -> tuple[int, int, int] | None:
    """This thread's alternate signal stack as (address, flags, size); None where it cannot be read."""
    libc = _libc()
    if libc is None:
        return None
    current = _StackT()
    if libc.sigaltstack(None, ctypes.byref(current)) != 0:
        return None
    return (current.ss_sp or 0, current.ss_flags, current.ss_size)


@contextmanager
def preserve_signal_stack() -> Iterator[None]:
    """Put back the calling thread's alternate signal stack after the block.

    OpenVINO's CPU plugin installs an alternate signal stack on the thread that first compiles a
    model and can free that memory later (when its objects are collected) without uninstalling it.
    CPython installs its signal handlers with ``SA_ONSTACK``, so the next handled signal on that
    thread (SIGCHLD when a subprocess exits under torch's DataLoader handler, SIGINT on Ctrl-C)
    made the kernel write a signal frame into freed memory and kill the process with SIGSEGV.
    Nothing in OpenVINO needs the stack for its results, so the thread gets its own back.
    """
    libc = _libc()
    if libc is None:
        yield
        return
    saved = _StackT()
    readable = libc.sigaltstack(None, ctypes.byref(saved)) == 0
    try:
        yield
    finally:
        if readable:
            if saved.ss_flags & _SS_DISABLE:
                saved = _StackT(None, _SS_DISABLE, 0)
            libc.sigaltstack(ctypes.byref(saved), None)
