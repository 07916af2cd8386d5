"""The step store without Prefect: the same content-addressed entries, reused and verified."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from flows.compress import compress_flow

from slimloop.store.entries import MANIFEST
from test_flow_compress import _step_dirs, project  # noqa: F401  (the fixture)


def test_store_without_prefect_reuses_and_verifies(project, tmp_path):  # noqa: F811
    store = tmp_path / "store"
    first = compress_flow.fn(project, steps="store")
    made = _step_dirs(store)
    assert len(made) == 5  # sparse_train, prune, pad, retrain, distill
    assert all((store / key / MANIFEST).exists() for key in made)
    stamps = {key: (store / key).stat().st_mtime_ns for key in made}
    again = compress_flow.fn(project, steps="store")
    assert _step_dirs(store) == made and again["record"] == first["record"]
    assert all((store / key).stat().st_mtime_ns >= stamps[key] for key in made)  # touched on a hit
    # an entry whose checkpoint vanished is recomputed in place, not trusted; an entry without its
    # manifest (a crash before the step finished) runs again
    victim = Path(json.loads((store / sorted(made)[0] / MANIFEST).read_text())["checkpoint"])
    victim.unlink()
    shutil.rmtree(store / sorted(made)[1])
    third = compress_flow.fn(project, steps="store")
    assert victim.exists() and sorted(made)[1] in _step_dirs(store)
    # a recomputed final step measures its latency again; everything else is deterministic on CPU
    assert _without_latency(third["record"]) == _without_latency(first["record"])


def _without_latency(record: dict) -> dict:
    return {k: v for k, v in record.items() if not k.startswith("latency")}


def test_direct_mode_writes_no_store_entries(project, tmp_path):  # noqa: F811
    summary = compress_flow.fn(project, steps="direct")
    store = tmp_path / "store"
    assert not store.exists() or not _step_dirs(store)
    assert summary["iterations_run"] == 1
