"""The loop's step-store entries exported as a DVC out and imported into another store: what
`dvc pull` on a colleague's machine restores (slimloop.store.lineage)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from slimloop.errors import OutputPathError
from slimloop.io import OUTPUT_MARKER
from slimloop.store.entries import MANIFEST, open_store, read_manifest, run_stored_step
from slimloop.store.lineage import ROOT_TOKEN, export_lineage, import_lineage, keys_in

KEY_A, KEY_B, KEY_BROKEN = "a" * 32, "b" * 32, "c" * 32


@pytest.fixture()
def calls(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))  # store_race.slow_step
    folder = tmp_path / "calls"
    folder.mkdir()
    return folder


def _step(store: Path, key: str, calls: Path, monkeypatch) -> dict:
    monkeypatch.setenv("SLIMLOOP_CACHE", str(store))
    return run_stored_step("slow", "store_race.slow_step", {"calls": str(calls), "seconds": 0.0}, key)


def _made_store(tmp_path, calls, monkeypatch) -> Path:
    """Store A: entries A and B (B's manifest also names A's checkpoint), a resume state in A, and
    entry C whose checkpoint was deleted afterwards."""
    store = open_store(tmp_path / "store-a")
    a = _step(store, KEY_A, calls, monkeypatch)
    _step(store, KEY_B, calls, monkeypatch)
    manifest_b = store / KEY_B / MANIFEST
    b = json.loads(manifest_b.read_text())
    b["extra"]["teacher"] = a["checkpoint"]
    manifest_b.write_text(json.dumps(b))
    (store / KEY_A / "last.state.safetensors").write_bytes(b"\0" * 1000)
    Path(_step(store, KEY_BROKEN, calls, monkeypatch)["checkpoint"]).unlink()
    return store


def test_keys_in_finds_keys_in_any_path_of_a_record():
    record = {"steps": {"prune": {"checkpoint": f"/x/steps/{KEY_A}/model.bin"}},
              "list": [f"rel/{KEY_B}/f", "no key here", 3], "short": "abc/def"}
    assert keys_in(record) == {KEY_A, KEY_B}


def test_export_copies_complete_entries_and_what_they_name_without_resume_states(tmp_path, calls, monkeypatch, caplog):
    store = _made_store(tmp_path, calls, monkeypatch)
    lineage = tmp_path / "models" / "lineage"
    assert export_lineage(store, [KEY_B, KEY_BROKEN], lineage) == [KEY_A, KEY_B]  # A: named by B
    assert "not exported" in caplog.text and KEY_BROKEN in caplog.text
    assert sorted(p.name for p in lineage.iterdir()) == sorted([OUTPUT_MARKER, KEY_A, KEY_B])
    assert not list(lineage.rglob("*.state.safetensors"))
    for key in (KEY_A, KEY_B):
        text = (lineage / key / MANIFEST).read_text()
        assert str(store) not in text and f"{ROOT_TOKEN}/{key}/model.bin" in text
    assert (lineage / KEY_A / "model.bin").read_bytes() == (store / KEY_A / "model.bin").read_bytes()


def test_imported_entries_are_hits_in_another_store_without_running_the_step(tmp_path, calls, monkeypatch):
    store = _made_store(tmp_path, calls, monkeypatch)
    lineage = tmp_path / "lineage"
    export_lineage(store, [KEY_B], lineage)
    ran_before = len(list(calls.iterdir()))
    other = open_store(tmp_path / "elsewhere" / "store-b")
    assert import_lineage(lineage, other) == [KEY_A, KEY_B]
    for key in (KEY_A, KEY_B):
        out = _step(other, key, calls, monkeypatch)
        assert out["checkpoint"] == str(other / key / "model.bin")
        assert Path(out["checkpoint"]).read_bytes() == (store / key / "model.bin").read_bytes()
    assert read_manifest(other / KEY_B / MANIFEST)["extra"]["teacher"] == str(other / KEY_A / "model.bin")
    assert len(list(calls.iterdir())) == ran_before  # served, not computed
    assert import_lineage(lineage, other) == []  # already there: left alone
    assert not list((other / "work").iterdir())


def test_an_incomplete_export_is_skipped_and_leaves_nothing_behind(tmp_path, calls, monkeypatch, caplog):
    store = _made_store(tmp_path, calls, monkeypatch)
    lineage = tmp_path / "lineage"
    export_lineage(store, [KEY_A, KEY_B], lineage)
    (lineage / KEY_A / "model.bin").unlink()  # a pull that lost a file
    (lineage / KEY_B / MANIFEST).write_text('{"name": "slow", "checkp')  # and a truncated manifest
    other = open_store(tmp_path / "store-b")
    assert import_lineage(lineage, other) == []
    assert "not imported" in caplog.text
    assert not (other / KEY_A).exists() and not (other / KEY_B).exists()
    assert not list((other / "work").iterdir())
    assert import_lineage(tmp_path / "no-such-folder", other) == []


def test_export_replaces_its_own_folder_but_never_a_users(tmp_path, calls, monkeypatch):
    store = _made_store(tmp_path, calls, monkeypatch)
    lineage = tmp_path / "lineage"
    export_lineage(store, [KEY_A, KEY_B], lineage)
    assert export_lineage(store, [KEY_A], lineage) == [KEY_A]
    assert not (lineage / KEY_B).exists()
    users = tmp_path / "my-files"
    users.mkdir()
    (users / "notes.txt").write_text("mine")
    with pytest.raises(OutputPathError):
        export_lineage(store, [KEY_A], users)
    assert (users / "notes.txt").read_text() == "mine"
