"""Reliability, checkpoints: every damaged file is a CheckpointError, pickle payloads are refused by
every loader and never run, and nothing in the code unpickles, shells out or loads YAML unsafely.

The numbers these tests prove are collected in docs/reliability.md.
"""

from __future__ import annotations

import ast
import errno
import os
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from slimloop.checkpoint import load_checkpoint, load_model, load_state, save_checkpoint, save_state
from slimloop.config import load_params
from slimloop.errors import CheckpointError, ConfigError, SlimloopError
from slimloop.model import build_model, yolov5_spec

ROOT = Path(__file__).resolve().parents[1]



# ---- checkpoints: every damaged file is a CheckpointError, nothing is ever unpickled ----------


@pytest.fixture(scope="module")
def checkpoint_file(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model(yolov5_spec("n", nc=2, names=("a", "b"), width_multiple=0.125, depth_multiple=0.33))
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "m.safetensors", model.eval(), {"epoch": 3})


N_FLIPS, N_CUTS = 60, 20


def test_every_flipped_byte_is_a_checkpoint_error(checkpoint_file, tmp_path):
    """Damage anywhere (length prefix, JSON header, spec, provenance, weights) is refused."""
    data = checkpoint_file.read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    rng = np.random.default_rng(0)
    spec_at = data.index(b"out_chs")  # inside the spec JSON: a digit change would still parse
    positions = sorted({0, 3, 8, 9, spec_at + 10, 8 + header_len - 1, 8 + header_len, len(data) - 1,
                        *rng.integers(8, 8 + header_len, N_FLIPS // 2).tolist(),
                        *rng.integers(8 + header_len, len(data), N_FLIPS // 2).tolist()})
    path = tmp_path / "bad.safetensors"
    for pos in positions:
        damaged = bytearray(data)
        damaged[pos] ^= 0x01 if pos >= 8 + header_len or damaged[pos] in b"0123456789" else 0xFF
        path.write_bytes(bytes(damaged))
        with pytest.raises(CheckpointError, match="bad.safetensors"):
            load_model(path)
    assert len(positions) >= N_FLIPS


def test_every_truncation_is_a_checkpoint_error(checkpoint_file, tmp_path):
    data = checkpoint_file.read_bytes()
    path = tmp_path / "cut.safetensors"
    for cut in np.linspace(0, len(data) - 1, N_CUTS).astype(int):
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="cut.safetensors"):
            load_model(path)


def test_damaged_training_state_is_a_checkpoint_error(tmp_path):
    path = tmp_path / "last.state.safetensors"
    save_state(path, {"epoch": 2, "weights": torch.arange(1000.0), "history": "[]"})
    data = bytearray(path.read_bytes())
    data[-10] ^= 0x01  # one bit of one weight
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum"):
        load_state(path)


def _with_spec(ckpt_path: Path, tmp_path: Path, edit) -> Path:
    """A copy of the checkpoint whose spec JSON ``edit(spec_dict)`` changed (checksum left out, as a
    hand edit would)."""
    import json

    from safetensors.torch import save

    from slimloop.checkpoint import FORMAT
    from slimloop.model.spec import spec_to_json

    ckpt = load_checkpoint(ckpt_path)
    spec = json.loads(spec_to_json(ckpt.spec))
    edit(spec)
    path = tmp_path / "edited.safetensors"
    path.write_bytes(save(ckpt.state_dict, metadata={"format": FORMAT, "spec": json.dumps(spec), "meta": "{}"}))
    return path


# (what the crafted spec says, how to write it, what the error must say)
HUGE_SPECS = [
    ("a kernel of 20001 (77 GB)", lambda s: s["layers"][0].update(kernel=20001, padding=10000),
     r"layer 0 \(Conv\): kernel 20001 is larger than the limit 31"),
    ("a million channels", lambda s: s["layers"][0].update(out_chs=10**6),
     r"layer 0 \(Conv\): out_chs 1000000 is larger than the limit 16384"),
    ("10000 bottlenecks", lambda s: s["layers"][2].update(bottlenecks=s["layers"][2]["bottlenecks"] * 10000),
     r"layer 2 \(C3\): 10000 bottlenecks, more than the limit 64"),
    ("5000 layers", lambda s: s.update(layers=s["layers"] * 200),
     r"layers must be a non-empty tuple of at most 1000 layers"),
    ("a million classes", lambda s: s["detect"].update(nc=10**6, names=["x"] * 10**6),
     r"detect: nc 1000000 is larger than the limit 10000"),
    ("widths in bounds, 2.4 G parameters", lambda s: [s["layers"][i].update(out_chs=16384, kernel=3, padding=1)
                                                     for i in (0, 1)],
     r"spec: 2,4\d\d,\d{3},\d{3} parameters, more than the limit 500,000,000"),
]


@pytest.mark.parametrize(("what", "edit", "message"), HUGE_SPECS, ids=[c[0] for c in HUGE_SPECS])
def test_spec_claiming_huge_sizes_fails_before_allocating(checkpoint_file, tmp_path, what, edit, message):
    path = _with_spec(checkpoint_file, tmp_path, edit)
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match=rf"edited\.safetensors: invalid spec in metadata: .*{message}"):
        load_model(path)
    assert time.perf_counter() - start < 10  # refused from the integers: nothing was allocated


def test_every_tensor_shape_is_checked_before_building(checkpoint_file, tmp_path, monkeypatch):
    """A spec that differs from the weights only in a kernel (dimension 2 of one tensor) or in an
    input width (dimension 1) is refused before any module is built."""
    import slimloop.model.build as build

    built = []
    monkeypatch.setattr(build, "build_model", lambda spec: built.append(spec))
    kernel = _with_spec(checkpoint_file, tmp_path, lambda s: s["layers"][0].update(kernel=5))
    with pytest.raises(CheckpointError, match=r"layers\.0\.conv\.weight is \(8, 3, 5, 5\) in the spec, "
                                              r"the weights are \(8, 3, 6, 6\)"):
        load_model(kernel)
    wider_input = _with_spec(checkpoint_file, tmp_path, lambda s: s.update(in_chs=4))
    with pytest.raises(CheckpointError, match=r"layers\.0\.conv\.weight is \(8, 4, 6, 6\)"):
        load_model(wider_input)
    assert built == []


def test_checkpoint_for_other_classes_is_refused_by_training(tiny_data, tmp_path):
    from conftest import TINY_EVAL, tiny_train_params
    from slimloop.train import train

    other = build_model(yolov5_spec("n", nc=3, width_multiple=0.125, depth_multiple=0.33))
    path = save_checkpoint(tmp_path / "other.safetensors", other)
    with pytest.raises(CheckpointError, match=r"detects 3 classes .* has 2 \(barcode, qrcode\)"):
        train(load_model(path), tiny_data, tiny_train_params(epochs=1), TINY_EVAL, tmp_path / "run",
              progress=False)
    assert not (tmp_path / "run" / "last.safetensors").exists()


def test_unwritable_checkpoint_is_a_checkpoint_error(checkpoint_file, tmp_path, monkeypatch):
    model = load_model(checkpoint_file)
    target = tmp_path / "m.safetensors"
    save_checkpoint(target, model, {"epoch": 1})
    before = target.read_bytes()

    def full(self, data):
        with open(self, "wb") as fh:
            fh.write(data[: len(data) // 3])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))

    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(CheckpointError, match=r"cannot write .*m\.safetensors: No space left on device"):
        save_checkpoint(target, model, {"epoch": 2})
    monkeypatch.undo()
    assert target.read_bytes() == before and load_checkpoint(target).meta == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


# ---- signatures: the SHA-256 is an integrity check anyone can recompute; the HMAC is not ---------


def _forge(path: Path, **changes: str) -> None:
    """Change metadata of ``path`` and recompute its SHA-256, as anyone can (the signature is kept)."""
    import json

    from slimloop.checkpoint import DIGEST_KEY, _digest

    data = path.read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    meta = {**header["__metadata__"], **changes}
    meta[DIGEST_KEY] = _digest(meta, data)
    header["__metadata__"] = meta
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + header_len :])


def test_signed_checkpoints_refuse_unsigned_forged_and_foreign_files(checkpoint_file, tmp_path, monkeypatch):
    from slimloop.checkpoint import SIGNATURE_KEY, SIGNING_ENV, _read_header

    model = load_model(checkpoint_file)
    unsigned = save_checkpoint(tmp_path / "unsigned.safetensors", model, {"epoch": 1})
    monkeypatch.setenv(SIGNING_ENV, "alice's key")
    signed = save_checkpoint(tmp_path / "signed.safetensors", model, {"epoch": 1})
    assert SIGNATURE_KEY in _read_header(signed)[1] and load_checkpoint(signed).meta == {"epoch": 1}
    with pytest.raises(CheckpointError, match=rf"unsigned\.safetensors: not signed, and {SIGNING_ENV} is set"):
        load_model(unsigned)
    _forge(signed, meta='{"epoch": 99}')  # a consistent SHA-256, a stale signature
    with pytest.raises(CheckpointError, match=r"signed\.safetensors: wrong signature"):
        load_checkpoint(signed)
    monkeypatch.delenv(SIGNING_ENV)
    assert load_checkpoint(signed).meta == {"epoch": 99}  # without a key the forgery passes: SHA-256 is no signature
    monkeypatch.setenv(SIGNING_ENV, "alice's key")
    bob = save_checkpoint(tmp_path / "bob.safetensors", model)
    monkeypatch.setenv(SIGNING_ENV, "mallory's key")
    with pytest.raises(CheckpointError, match=r"bob\.safetensors: wrong signature: written with another"):
        load_model(bob)
    save_state(tmp_path / "s.safetensors", {"epoch": 1, "w": torch.ones(3)})  # states are signed too
    monkeypatch.setenv(SIGNING_ENV, "alice's key")
    with pytest.raises(CheckpointError, match="wrong signature"):
        load_state(tmp_path / "s.safetensors")


class Evil:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _pickles(tmp_path: Path, marker: Path) -> dict[str, bytes]:
    """The payload as torch.save writes it (zip) and as a plain/legacy pickle."""
    zipped = tmp_path / "evil.pt"
    torch.save({"model": Evil(marker)}, zipped)
    legacy = tmp_path / "legacy.pt"
    torch.save({"model": Evil(marker)}, legacy, _use_new_zipfile_serialization=False)
    return {"torch.save": zipped.read_bytes(), "legacy torch.save": legacy.read_bytes(),
            "pickle": pickle.dumps(Evil(marker))}


def _train_resume(path: Path, tiny_data: Path) -> None:
    """Training whose resume state file is ``path``."""
    from conftest import TINY_EVAL, tiny_train_params
    from slimloop.model import build_model as build
    from slimloop.train import train

    spec = yolov5_spec("n", nc=2, names=("barcode", "qrcode"), width_multiple=0.125, depth_multiple=0.33)
    train(build(spec), tiny_data, tiny_train_params(epochs=1), TINY_EVAL, path.parent, progress=False)


# every loader of the project that reads a file a user or a previous run could have replaced
LOADERS = {
    "load_checkpoint": ("m.safetensors", lambda p, d: load_checkpoint(p), CheckpointError),
    "load_model": ("m.safetensors", lambda p, d: load_model(p), CheckpointError),
    "load_state": ("last.state.safetensors", lambda p, d: load_state(p), CheckpointError),
    "train(resume)": ("last.state.safetensors", lambda p, d: _train_resume(p, d), CheckpointError),
    "read_split": ("train.json", lambda p, d: __import__("slimloop.data.canonical", fromlist=["x"]).read_split(
        p.parent, "train"), SlimloopError),
    "import_yolo(data.yaml)": ("data.yaml", lambda p, d: __import__("slimloop.data.yolo", fromlist=["x"]).import_yolo(
        p, p.parent / "out"), SlimloopError),
    "load_params": ("params.yaml", lambda p, d: load_params(p), ConfigError),
    "load_spec(.json)": ("spec.json", lambda p, d: __import__("slimloop.model", fromlist=["x"]).load_spec(p),
                         ConfigError),
    "load_spec(.yaml)": ("spec.yaml", lambda p, d: __import__("slimloop.model", fromlist=["x"]).load_spec(p),
                         ConfigError),
}


@pytest.mark.parametrize("loader", sorted(LOADERS))
def test_pickle_payloads_are_refused_by_every_loader_and_never_run(loader, tmp_path, tiny_data):
    name, load, error = LOADERS[loader]
    marker = tmp_path / "pwned"
    refused = {}
    for kind, payload in _pickles(tmp_path, marker).items():
        folder = tmp_path / kind.replace(" ", "_")
        folder.mkdir()
        (folder / name).write_bytes(payload)
        with pytest.raises(Exception) as info:  # noqa: PT011 -- the type is checked below
            load(folder / name, tiny_data)
        refused[kind] = info.value
    assert not marker.exists(), "a pickle payload was executed"
    assert all(isinstance(exc, error) for exc in refused.values()), refused


# ---- nothing in the code unpickles, shells out or loads YAML unsafely -------------------------

FORBIDDEN_NAMES = {"pickle", "cPickle", "_pickle", "dill", "shelve", "marshal", "cloudpickle", "joblib"}


def _unsafe_calls(source: str, filename: str) -> list[str]:
    """Unsafe deserialization and shell use in ``source`` (comments and strings do not count)."""
    found = []

    def flag(node: ast.AST, what: str) -> None:
        found.append(f"{filename}:{node.lineno}: {what}")

    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                if name and name.split(".")[0] in FORBIDDEN_NAMES:
                    flag(node, f"imports {name}")
        elif isinstance(node, ast.Name) and node.id in FORBIDDEN_NAMES:
            flag(node, f"uses {node.id}")
        elif isinstance(node, ast.Call):
            func = ast.unparse(node.func)
            kwargs = {k.arg: ast.unparse(k.value) for k in node.keywords}
            if kwargs.get("shell") not in (None, "False"):
                flag(node, f"{func}(shell={kwargs['shell']})")
            if func in ("os.system", "os.popen", "system", "popen") or func.startswith("os.exec") or func.startswith("os.spawn"):
                flag(node, f"{func}()")
            if func.endswith("torch.load") or func == "load" and "weights_only" in kwargs:
                if kwargs.get("weights_only") != "True":
                    flag(node, f"{func}() without weights_only=True")
            if func in ("yaml.load", "yaml.load_all") and not any(
                    "SafeLoader" in v for v in [*kwargs.values(), *map(ast.unparse, node.args[1:])]):
                flag(node, f"{func}() without SafeLoader")
            if func in ("yaml.unsafe_load", "yaml.full_load", "yaml.unsafe_load_all", "yaml.full_load_all"):
                flag(node, f"{func}()")
            if func.endswith(("np.load", "numpy.load")) and kwargs.get("allow_pickle") not in (None, "False"):
                flag(node, f"{func}(allow_pickle=...)")
            if func in ("eval", "exec", "pd.read_pickle", "pandas.read_pickle"):
                flag(node, f"{func}()")
    return found


def test_checker_finds_each_unsafe_pattern():
    bad = ("import pickle\nimport subprocess, os, yaml, torch\nsubprocess.run('x', shell=True)\nos.system('x')\n"
           "torch.load('m.pt')\ntorch.load('m.pt', weights_only=False)\nyaml.load(s)\n"
           "yaml.load(s, Loader=yaml.Loader)\nyaml.unsafe_load(s)\n")
    good = ("import subprocess, yaml, torch\nsubprocess.run(['x'], shell=False)\ntorch.load('m', weights_only=True)\n"
            "yaml.load(s, Loader=yaml.SafeLoader)\nyaml.safe_load(s)\nx = 'pickle is never used' # pickle\n")
    assert [int(hit.split(":")[1]) for hit in _unsafe_calls(bad, "bad.py")] == [1, 3, 4, 5, 6, 7, 8, 9]
    assert _unsafe_calls(good, "good.py") == []


def test_source_tree_has_no_unsafe_deserialization_or_shell():
    files = sorted([*(ROOT / "src").rglob("*.py"), *(ROOT / "flows").rglob("*.py")])
    assert len(files) > 30
    found = [hit for f in files for hit in _unsafe_calls(f.read_text(encoding="utf-8"), str(f.relative_to(ROOT)))]
    assert found == []
