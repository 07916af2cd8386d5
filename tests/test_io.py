"""Atomic writes: success replaces, failure leaves the old file and no temporaries."""

import json

import pytest

from slimloop.io import OUTPUT_MARKER, atomic_dir, atomic_path, write_json_atomic


def test_json_written(tmp_path):
    path = tmp_path / "sub" / "m.json"
    write_json_atomic(path, {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in path.parent.iterdir()] == ["m.json"]


def test_failure_keeps_previous_file(tmp_path):
    path = tmp_path / "ckpt.bin"
    path.write_bytes(b"good")
    with pytest.raises(OSError), atomic_path(path) as tmp:
        tmp.write_bytes(b"half")
        raise OSError(28, "No space left on device")
    assert path.read_bytes() == b"good"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.bin"]


def test_nan_is_refused_and_nothing_written(tmp_path):
    path = tmp_path / "m.json"
    with pytest.raises(ValueError):
        write_json_atomic(path, {"map": float("nan")})
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_swaps_and_rolls_back(tmp_path):
    out = tmp_path / "data"
    with atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("1")
    assert (out / "a.txt").read_text() == "1"
    with pytest.raises(RuntimeError), atomic_dir(out) as tmp:
        (tmp / "b.txt").write_text("2")
        raise RuntimeError("crash")
    assert sorted(p.name for p in out.iterdir()) == [OUTPUT_MARKER, "a.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]
    with atomic_dir(out) as tmp:
        (tmp / "c.txt").write_text("3")
    assert sorted(p.name for p in out.iterdir()) == [OUTPUT_MARKER, "c.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_make_dir_names_a_file_in_the_way_and_a_read_only_parent(tmp_path, monkeypatch):
    from pathlib import Path

    from slimloop.errors import OutputPathError
    from slimloop.io import make_dir

    blocker = tmp_path / "blocker"
    blocker.write_text("a user's file")
    with pytest.raises(OutputPathError, match=rf"{blocker / 'run'}: cannot create the folder: it, or a part of it, is a file"):
        make_dir(blocker / "run")
    with pytest.raises(OutputPathError, match="is a file"):
        make_dir(blocker)
    assert make_dir(tmp_path / "a" / "b") == tmp_path / "a" / "b" and (tmp_path / "a" / "b").is_dir()

    def denied(self, *args, **kwargs):  # tests run as root, for whom chmod 555 does not deny
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", denied)
    with pytest.raises(OutputPathError, match=r"c: cannot create the folder: permission denied"):
        make_dir(tmp_path / "c")
    with pytest.raises(OutputPathError, match="permission denied"):
        atomic_path(tmp_path / "d" / "x.json").__enter__()
    assert blocker.read_text() == "a user's file"
