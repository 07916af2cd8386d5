"""The step store command: size, prune keeps what metrics reference or was used lately, never
leaves the store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from flows.store import main

from slimloop.store.entries import STORE_MARKER, open_store, touch_entry
from slimloop.store.prune import MANIFEST, StoreError, human, remove, scan

DAY = 86400
ROOT = Path(__file__).resolve().parents[1]


def _key(name: str) -> str:
    """The 32-hex-digit cache key of the fixture's entry ``name`` (a..j)."""
    return "abcdef1234"["abcdefghij".index(name)] * 32


def _age(path: Path, days: float) -> None:
    """Set the mtime of ``path`` and everything under it ``days`` back (links themselves)."""
    t = time.time() - days * DAY
    for p in [*path.rglob("*"), path] if path.is_dir() and not path.is_symlink() else [path]:
        os.utime(p, (t, t), follow_symlinks=False)


def _entry(root: Path, key: str, size: int, days: float, folder: bool = True, record: bool = True,
           points_home: bool = True, manifest: bool = False) -> None:
    """A cache entry: ``<key>/train/best.safetensors`` of ``size`` bytes and/or ``results/<key>``
    (Prefect's result record), or a ``step.json`` manifest (a step run without Prefect)."""
    ckpt = root / key / "train" / "best.safetensors"
    if folder:
        ckpt.parent.mkdir(parents=True)
        ckpt.write_bytes(b"w" * size)
        if manifest:
            (root / key / MANIFEST).write_text(json.dumps({"checkpoint": str(ckpt)}))
        _age(root / key, days)
    if record:
        target = ckpt if points_home else Path("/elsewhere/models/baseline/best.safetensors")
        result = json.dumps({"checkpoint": str(target), "record": {"map": 0.5}})
        path = root / "results" / key
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps({"metadata": {"storage_key": str(path)}, "result": result}))
        _age(path, days)


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A fake store and a project whose metrics reference entries a and i.

    a: referenced, old      b: unreferenced, used 2 days ago     c: unreferenced, 30 days old
    d: folder only, 3 days  e: folder only, being written now    f: record only, its folder gone
    g: record only of a step that writes nothing, recent           i: referenced by iter_1 only, old
    j: folder with a manifest (run without Prefect), 3 days old
    work/ 5 days old; outside/ a folder outside the store that entry h links to.
    """
    monkeypatch.setenv("SLIMLOOP_CACHE", str(tmp_path / "store"))
    root = open_store()
    _entry(root, _key("a"), 1000, 40)
    _entry(root, _key("b"), 2000, 2)
    _entry(root, _key("c"), 3000, 30)
    _entry(root, _key("d"), 400, 3, record=False)
    _entry(root, _key("e"), 500, 0, record=False)
    _entry(root, _key("f"), 0, 30, folder=False)
    _entry(root, _key("g"), 0, 1, folder=False, points_home=False)
    _entry(root, _key("i"), 100, 50)
    _entry(root, _key("j"), 600, 3, record=False, manifest=True)
    (root / "work" / "iter_1").mkdir(parents=True)
    (root / "work" / "iter_1" / "tmp.bin").write_bytes(b"s" * 700)
    _age(root / "work", 5)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.safetensors").write_bytes(b"p" * 9000)
    (root / _key("h")).symlink_to(outside, target_is_directory=True)
    _age(root / _key("h"), 60)
    metrics = tmp_path / "project" / "metrics"
    (metrics / "iterations").mkdir(parents=True)
    (metrics / "final.json").write_text(json.dumps(
        {"checkpoint": str(root / _key("a") / "train/best.safetensors"), "record": {"map": 0.6}}))
    (metrics / "iterations" / "iter_1.json").write_text(json.dumps(
        {"iteration": 1, "checkpoint": str(root / _key("i") / "train/best.safetensors")}))
    monkeypatch.chdir(tmp_path / "project")
    return root


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_human_sizes():
    assert [human(0), human(1023), human(1536), human(5 * 1024**3)] == ["0 B", "1023 B", "1.5 KiB", "5.0 GiB"]


def test_size_lists_total_entries_and_largest(store, capsys):
    assert main(["size", "--top", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    records = sum(p.stat().st_size for p in (store / "results").iterdir())
    link = os.lstat(store / _key("h")).st_size  # the link itself, not the 9000 bytes behind it
    manifest = (store / _key("j") / MANIFEST).stat().st_size
    marker = (store / STORE_MARKER).stat().st_size
    total = 1000 + 2000 + 3000 + 400 + 500 + 100 + 600 + manifest + 700 + records + link + marker
    assert out[0] == f"store {store}: {human(total)} in 10 entries (work/: 700 B)"
    assert out[1] == "largest 2:"
    assert out[2].split()[2] == _key("c") and out[3].split()[2] == _key("b")
    assert [e.size for e in scan(store) if e.key == _key("h")] == [link]


def test_dry_run_removes_nothing(store, capsys):
    before = _tree(store)
    main(["prune", "--dry-run"])
    out = capsys.readouterr().out
    assert _tree(store) == before
    assert "would remove" in out and _key("c") in out and "would free" in out


def test_prune_keeps_referenced_and_recent(store, tmp_path, capsys):
    main(["prune"])
    out = capsys.readouterr().out
    left = {p.name for p in store.iterdir()}
    records = {p.name for p in (store / "results").iterdir()}
    assert left == {_key(c) for c in "abehij"} | {"results", STORE_MARKER}  # c stale, d orphan, work/ scratch
    assert records == {_key(c) for c in "abgi"}  # c stale, f orphan; g recent
    assert (tmp_path / "outside" / "precious.safetensors").stat().st_size == 9000
    removed = [line for line in out.splitlines() if line.startswith("removed")]
    assert len(removed) == 5  # c folder + record, d, f, work
    assert any(_key("d") in line and "orphan: no result record or manifest" in line for line in removed)
    assert any(_key("f") in line and "orphan: its folder is gone" in line for line in removed)
    freed = int(out.split("(")[-1].split()[0].replace(",", ""))
    assert freed >= 3000 + 400 + 700
    assert "kept 7 of 10 entries (2 referenced by metrics)" in out


def test_keep_days_zero_removes_all_unreferenced(store, capsys):
    main(["prune", "--keep-days", "0"])
    left = {p.name for p in store.iterdir()}
    assert left == {_key(c) for c in "aih"} | {"results", STORE_MARKER}  # e is written "now" but grace is 0 days
    assert {p.name for p in (store / "results").iterdir()} == {_key(c) for c in "ai"}


def test_symlink_outside_is_not_followed(store, tmp_path, capsys):
    main(["prune", "--keep-days", "0"])
    out = capsys.readouterr().out
    assert f"skipped {store / _key('h')}: a link to {tmp_path / 'outside'}" in out
    assert (store / _key("h")).is_symlink()
    assert (tmp_path / "outside" / "precious.safetensors").exists()
    with pytest.raises(StoreError, match="not an entry of the store"):
        remove(tmp_path / "outside", store)
    (store / "results").rename(store / "results_real")
    (store / "results").symlink_to(tmp_path / "outside")  # the records folder itself escaping
    with pytest.raises(StoreError, match="not an entry of the store"):
        remove(store / "results" / "precious.safetensors", store)


def test_touch_entry_marks_a_hit_as_used(store):
    touch_entry(store / _key("c") / "train" / "best.safetensors")
    assert time.time() - (store / _key("c")).stat().st_mtime < 60
    touch_entry("/elsewhere/models/baseline/best.safetensors")  # not in the store: ignored
    main(["prune"])
    assert (store / _key("c")).is_dir()


def test_missing_metrics_folder_refuses_to_prune(store, tmp_path):
    env = {**os.environ, "SLIMLOOP_CACHE": str(store), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "flows.store", "prune", "--metrics-dir", "nope"],
                          cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 1
    assert "error: metrics folder nope does not exist" in proc.stderr
    assert (store / _key("c")).is_dir()


def test_manifest_name_matches_compress():
    # the writer's name (run_stored_step); MANIFEST above is the scanner's
    from slimloop.store import entries

    assert entries.MANIFEST == MANIFEST


FAKE_STEP = '''
from pathlib import Path
from slimloop.compress.steps import StepResult

def step(n, out_dir):
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = out_dir / "runs"
    runs.write_text(str(int(runs.read_text()) + 1 if runs.exists() else 1))
    (out_dir / "best.safetensors").write_bytes(b"w" * n)
    return StepResult(out_dir / "best.safetensors", {"map": 0.5, "gflops": 1.0}, {"masks": str(out_dir / "runs")})
'''


@pytest.mark.parametrize("damage", ["truncated", "empty", "deep", "wrong types", "a list", "not UTF-8",
                                    "unknown key", "NaN"])
def test_damaged_step_manifest_is_a_logged_miss(tmp_path, monkeypatch, caplog, damage):
    """A truncated (or otherwise damaged) step.json runs the step again, says so, and is rewritten."""
    from slimloop.store.entries import run_stored_step

    monkeypatch.setenv("SLIMLOOP_CACHE", str(tmp_path / "store"))
    (tmp_path / "fake_step.py").write_text(FAKE_STEP)
    monkeypatch.syspath_prepend(str(tmp_path))
    key = "5" * 32
    first = run_stored_step("fake", "fake_step.step", {"n": 4}, key)
    manifest = tmp_path / "store" / key / MANIFEST
    good = manifest.read_text()
    bad = {"truncated": good[: len(good) // 2], "empty": "", "deep": "[" * 10000 + "]" * 10000,
           "wrong types": json.dumps({**first, "record": {"map": "high", "gflops": 1}}), "a list": "[1, 2]",
           "not UTF-8": "\udcff", "unknown key": json.dumps({**first, "surprise": 1}),
           "NaN": good.replace("0.5", "NaN")}[damage]
    manifest.write_bytes(bad.encode("utf-8", "surrogateescape"))
    assert run_stored_step("fake", "fake_step.step", {"n": 4}, key) == first
    assert (tmp_path / "store" / key / "runs").read_text() == "2"  # ran again
    assert f"step store: {manifest}" in caplog.text and "the step runs again" in caplog.text
    assert json.loads(manifest.read_text()) == first  # rewritten whole
    caplog.clear()
    assert run_stored_step("fake", "fake_step.step", {"n": 4}, key) == first  # and a hit again
    assert (tmp_path / "store" / key / "runs").read_text() == "2" and caplog.text == ""
