"""A fake step for tests/test_store_lock.py, and a process that asks the store for it.

``python tests/store_race.py <calls dir> <go file> <key> [hold]``: waits for ``<go file>``, then runs
:func:`slimloop.store.entries.run_stored_step` for ``<key>`` and prints the entry as JSON; ``hold``
instead takes the entry's lock, says so, and sleeps (to be killed holding it).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from slimloop.compress.steps import StepResult
from slimloop.io import write_bytes_atomic
from slimloop.store.entries import run_stored_step, store_dir
from slimloop.store.lock import entry_lock


def slow_step(calls: str, seconds: float, out_dir: Path) -> StepResult:
    """Writes a checkpoint-sized file in ``out_dir``; leaves one file per call in ``calls``."""
    Path(calls, f"{os.getpid()}-{time.time_ns()}").write_text("called")
    time.sleep(seconds)  # long enough for the other process to arrive while this one computes
    ckpt = Path(out_dir) / "model.bin"
    write_bytes_atomic(ckpt, bytes(range(256)) * 4096)
    return StepResult(ckpt, {"map": 0.5, "gflops": 0.1, "pid": os.getpid()}, {"model": str(ckpt)})


def main() -> int:
    calls, go, key = sys.argv[1:4]
    while not Path(go).exists():
        time.sleep(0.005)
    if sys.argv[4:] == ["hold"]:
        with entry_lock(store_dir(), key):
            print("holding", flush=True)
            time.sleep(600)
        return 0
    out = run_stored_step("slow", "store_race.slow_step", {"calls": calls, "seconds": 1.0}, key)
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
