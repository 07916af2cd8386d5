"""The step store under concurrency: two processes racing on one key compute it once, and a
holder killed with the lock does not block the next."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from slimloop.store.entries import MANIFEST, open_store, read_manifest
from slimloop.store.lock import LOCKS

ROOT = Path(__file__).resolve().parents[1]
RACER = Path(__file__).with_name("store_race.py")
KEY = "0123456789abcdef" * 2


def _env(store: Path) -> dict[str, str]:
    path = os.pathsep.join([str(ROOT / "src"), str(ROOT), str(RACER.parent)])
    return {**os.environ, "PYTHONPATH": path, "SLIMLOOP_CACHE": str(store), "OMP_NUM_THREADS": "1"}


def _start(store: Path, calls: Path, go: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(RACER), str(calls), str(go), KEY, *extra], env=_env(store),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_ready(procs: list[subprocess.Popen], seconds: float = 1.5) -> None:
    """Give the interpreters time to import and reach the wait for the go file."""
    time.sleep(seconds)
    for p in procs:
        assert p.poll() is None, p.stderr.read()


def test_two_processes_racing_on_one_key_compute_it_once(tmp_path):
    store, calls, go = open_store(tmp_path / "store"), tmp_path / "calls", tmp_path / "go"
    calls.mkdir()
    procs = [_start(store, calls, go) for _ in range(2)]
    _wait_ready(procs)
    go.touch()  # both ask for the key at once
    outs = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=60)
        assert p.returncode == 0, stderr
        outs.append(json.loads(stdout.strip().splitlines()[-1]))
    assert len(list(calls.iterdir())) == 1  # one computed, the other waited and reused its entry
    assert outs[0] == outs[1]
    entry = store / KEY
    assert read_manifest(entry / MANIFEST) == outs[0]
    assert (entry / "model.bin").read_bytes() == bytes(range(256)) * 4096  # whole, not torn
    assert sorted(p.name for p in entry.iterdir()) == ["model.bin", MANIFEST]  # no temporaries
    assert list((store / LOCKS).iterdir()) == []  # lock and claim files released


def test_a_holder_killed_with_the_lock_does_not_block_the_next(tmp_path):
    store, calls, go = open_store(tmp_path / "store"), tmp_path / "calls", tmp_path / "go"
    calls.mkdir()
    go.touch()
    holder = _start(store, calls, go, "hold")
    assert holder.stdout.readline().strip() == "holding"
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=10)
    assert (store / LOCKS / f"{KEY}.lock").exists()  # the dead holder's lock stays behind
    start = time.monotonic()
    after = _start(store, calls, go)
    stdout, stderr = after.communicate(timeout=60)
    assert after.returncode == 0, stderr
    # broken at once (its holder ran on this machine), not after the 60 s lifetime
    assert time.monotonic() - start < 30
    assert json.loads(stdout.strip().splitlines()[-1])["record"]["map"] == 0.5
    assert len(list(calls.iterdir())) == 1
