"""Reliability: bad params, bad checkpoints, crashes and a full disk, no network; each failure tried.

The numbers these tests prove are collected in docs/reliability.md. Bad datasets and untrusted
paths are in test_reliability_data.py.
"""

from __future__ import annotations

import ast
import errno
import json
import multiprocessing
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from slimloop.checkpoint import load_checkpoint, load_model, load_state, save_checkpoint, save_state
from slimloop.config import Params, load_params
from slimloop.errors import CheckpointError, ConfigError, SlimloopError
from slimloop.model import build_model, yolov5_spec

ROOT = Path(__file__).resolve().parents[1]


# ---- params.yaml: every mistake names its key, the entry point stops before any work ----------

# (params.yaml text, the key path the message must name, a fragment of the message)
BAD_PARAMS = [
    ("train:\n  epochs: ten\n", "train.epochs", "valid integer"),
    ("train:\n  imgsz: [256]\n", "train.imgsz", "valid integer"),
    ("data:\n  seed: 1.5\n", "data.seed", "fractional part"),
    ("data:\n  out_dir: 5\n", "data.out_dir", "valid string"),
    ("sparse:\n  lam: true\n", "sparse.lam", "expected a number, got true"),
    ("train:\n  amp: 'yes'\n", "train.amp", "expected true or false"),
    ("train:\n  ema: 1\n", "train.ema", "expected true or false"),
    ("sparse:\n  lamda: 0.001\n", "sparse.lamda", "unknown key; allowed keys: epochs, lam,"),
    ("targets:\n  gflops_ratio: 0.5\n", "targets", "unknown key; allowed keys: data"),
    ("train: 30\n", "train", "valid dictionary"),
    ("sparse:\n  lam: -0.0001\n", "sparse.lam", "greater than or equal to 0"),
    ("sparse:\n  lam: .inf\n", "sparse.lam", "finite number"),
    ("train:\n  weight_decay: .nan\n", "train.weight_decay", "finite number"),
    ("prune:\n  ratio: 1.0\n", "prune.ratio", "less than 1"),
    ("prune:\n  ratio: 1.5\n", "prune.ratio", "less than 1"),
    ("prune:\n  min_channels: 0\n", "prune.min_channels", "greater than or equal to 1"),
    ("prune:\n  ratio: 0.3\n  threshold: 0.01\n", "prune", "exactly one of ratio and threshold"),
    ("pad:\n  multiple: 0\n", "pad.multiple", "1, 8, 16 or 32"),
    ("pad:\n  multiple: 12\n", "pad.multiple", "1, 8, 16 or 32"),
    ("train:\n  imgsz: 100\n", "train.imgsz", "multiple of the model stride 32"),
    ("compress:\n  imgsz: 200\n", "compress.imgsz", "multiple of the model stride 32"),
    ("eval:\n  imgsz_sweep: [160, 150]\n", "eval.imgsz_sweep.1", "multiple of the model stride 32"),
    ("compress:\n  step_ratio: 1\n", "compress.step_ratio", "less than 1"),
    ("compress:\n  step_ratio: true\n", "compress.step_ratio", "expected a number"),
    ("target:\n  gflops_ratio: 0\n", "target.gflops_ratio", "greater than 0"),
    ("target:\n  params_ratio: 2\n", "target.params_ratio", "less than or equal to 1"),
    ("target:\n  latency_ms: .inf\n", "target.latency_ms", "finite number"),
    ("retrain:\n  mode: prune\n", "retrain.mode", "'finetune', 'scratch' or 'rewind'"),
]


def _key_line(text: str, key: str) -> int:
    """1-based line where the last part of ``key`` (or its nearest named parent) is written."""
    parts = [p for p in key.split(".") if not p.isdigit()]
    lines = text.split("\n")
    return next(i for i, line in enumerate(lines, 1) if line.strip().startswith(f"{parts[-1]}:"))


@pytest.fixture
def compress_entry(tmp_path, monkeypatch, capsys):
    """Run ``python -m flows.compress --params <file>`` in this process; return (exit code, stderr)."""
    import flows.compress
    from flows.common import OFFLINE_ENV, run_entry

    for key, value in OFFLINE_ENV.items():  # run_entry sets them; keep them out of later tests
        monkeypatch.setenv(key, os.environ.get(key, value))
    monkeypatch.setenv("SLIMLOOP_CACHE", str(tmp_path / "store"))
    monkeypatch.chdir(tmp_path)

    def run(path: Path) -> tuple[int, str]:
        monkeypatch.setattr(sys, "argv", ["flows.compress", "--params", str(path)])
        with pytest.raises(SystemExit) as info:
            run_entry(flows.compress.main)
        return info.value.code, capsys.readouterr().err

    return run


@pytest.mark.parametrize(("text", "key", "message"), BAD_PARAMS, ids=[c[1] + ":" + c[2] for c in BAD_PARAMS])
def test_bad_params_stop_the_compress_entry_point_naming_the_key(compress_entry, tmp_path, text, key, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    code, err = compress_entry(path)
    assert code == 1
    assert err.startswith("error: invalid params:")
    assert f"{path}:{_key_line(text, key)}: {key}: " in err and message in err, err
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]  # no models/, metrics/, store


def test_compress_command_with_many_mistakes_names_every_key_and_exits_1(tmp_path):
    text = "sparse:\n  lam: -1\nprune:\n  ratio: 1.0\npad:\n  multiple: 0\ntrain:\n  imgsz: 100\n  epoch: 3\n"
    work, home = tmp_path / "work", tmp_path / "home"
    work.mkdir()
    home.mkdir()
    (work / "bad.yaml").write_text(text)
    out = subprocess.run([sys.executable, "-m", "flows.compress", "--params", "bad.yaml"], cwd=work,
                         capture_output=True, text=True, timeout=300,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(home),
                              "SLIMLOOP_CACHE": str(tmp_path / "store")})
    assert out.returncode == 1, out.stderr
    for line, key in [(2, "sparse.lam"), (4, "prune.ratio"), (6, "pad.multiple"), (8, "train.imgsz"),
                      (9, "train.epoch")]:
        assert f"bad.yaml:{line}: {key}: " in out.stderr, out.stderr
    assert "Traceback" not in out.stderr and out.stdout == ""
    assert sorted(p.name for p in work.iterdir()) == ["bad.yaml"] and not (tmp_path / "store").exists()


def test_numbers_written_as_yaml_strings_stay_accepted(tmp_path):
    # YAML 1.1 reads 1e-4 as a string; refusing strings for numbers would refuse ordinary files
    path = tmp_path / "p.yaml"
    path.write_text("sparse:\n  lam: 1e-4\ntrain:\n  amp: false\n  ema: yes\n")
    params = load_params(path)
    assert params.sparse.lam == 1e-4 and params.train.amp is False and params.train.ema is True


# ---- targets that no pruning can reach: decided from the spec, before any training -------------


@pytest.mark.parametrize(("min_channels", "multiple"), [(8, 8), (5, 8), (3, 1), (20, 16)])
def test_narrowest_spec_is_what_pruning_everything_gives(min_channels, multiple):
    from slimloop.compress.feasibility import narrowest_spec
    from slimloop.compress.groups import topology
    from slimloop.compress.pad import pad_channels
    from slimloop.compress.prune import select_channels
    from slimloop.config import PadParams, PruneParams
    from slimloop.model.build import conv_widths

    spec = yolov5_spec("n", nc=2)
    topo = topology(spec)
    generator = torch.Generator().manual_seed(0)
    scores = {g: torch.rand(group.width, generator=generator) for g, group in topo.groups.items()}
    keep = pad_channels(select_channels(scores, ratio=0.999, min_channels=min_channels), scores, multiple)
    pruned = {name: int(keep[g].sum()) for name, g in topo.group_of.items()}
    narrow = narrowest_spec(spec, PruneParams(min_channels=min_channels), PadParams(multiple=multiple))
    assert conv_widths(narrow) == pruned
    assert max(pruned.values()) < max(conv_widths(spec).values())


def test_unreachable_targets_are_refused_naming_the_key():
    from slimloop.compress.feasibility import check_targets_reachable

    spec = yolov5_spec("n", nc=2)
    ok = check_targets_reachable(spec, Params.model_validate({"target": {"gflops_ratio": 0.5}}))
    assert 0.01 < ok.gflops_ratio_floor < 0.5 and 0 < ok.params_ratio_floor < 0.5
    bad = Params.model_validate({"target": {"gflops_ratio": ok.gflops_ratio_floor * 0.9,
                                            "params_ratio": ok.params_ratio_floor * 0.9}})
    with pytest.raises(ConfigError) as info:
        check_targets_reachable(spec, bad)
    message = str(info.value)
    assert "target.gflops_ratio" in message and "target.params_ratio" in message
    assert "prune.min_channels = 8" in message and "pad.multiple = 8" in message
    # a smaller floor makes the same target reachable again
    looser = bad.model_copy(update={"prune": bad.prune.model_copy(update={"min_channels": 1}),
                                    "pad": bad.pad.model_copy(update={"multiple": 1})})
    assert check_targets_reachable(spec, looser).gflops_ratio_floor < ok.gflops_ratio_floor * 0.9


def test_floor_is_a_true_lower_bound_for_real_prunes():
    from slimloop.compress.feasibility import narrowest_spec
    from slimloop.compress.groups import topology
    from slimloop.compress.pad import pad_channels
    from slimloop.compress.prune import select_channels
    from slimloop.compress.surgery import prune_model
    from slimloop.profile import gflops

    params = Params()
    spec = yolov5_spec("n", nc=2)
    torch.manual_seed(0)
    model = build_model(spec).eval()
    topo = topology(spec)
    floor = gflops(build_model(narrowest_spec(spec, params.prune, params.pad)), 32)
    for ratio in (0.5, 0.97):  # a mild and a deep prune, each checked against the floor
        scores = {g: torch.rand(group.width) for g, group in topo.groups.items()}
        keep = pad_channels(select_channels(scores, ratio=ratio, min_channels=8), scores, 8)
        assert gflops(prune_model(model, keep, probe=32), 32) >= floor - 1e-12


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


def test_spec_claiming_huge_widths_fails_before_allocating(checkpoint_file, tmp_path):
    from safetensors.torch import save

    from slimloop.checkpoint import FORMAT
    from slimloop.model.build import with_conv_widths
    from slimloop.model.spec import spec_to_json

    ckpt = load_checkpoint(checkpoint_file)
    huge = with_conv_widths(ckpt.spec, {"layers.0": 10**6})  # building it would allocate ~1 GB
    path = tmp_path / "huge.safetensors"
    path.write_bytes(save(ckpt.state_dict, metadata={"format": FORMAT, "spec": spec_to_json(huge), "meta": "{}"}))
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match=r"layers\.0\.conv\.weight has 1000000 output channels"):
        load_model(path)
    assert time.perf_counter() - start < 5


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


# ---- crashes: SIGKILL at four points and a full disk at two; every rerun resumes exactly -------

CRASH_DRIVER = '''"""Crash-test driver: one tiny, seeded CPU training run that resumes from whatever its folder holds.

``run(data, out)`` is the command under test. ``<out>.plan.json``, when present, names a point where
the run stops to be killed (it writes ``<out>.paused`` and waits) or where a write hits a full disk.
"""
import errno
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch

import dvclive  # noqa: F401 -- imported once in the fork server; validation needs the rest
import slimloop.evaluate  # noqa: F401
import slimloop.train
from slimloop.config import EvalParams, TrainParams
from slimloop.errors import SlimloopError
from slimloop.model import build_model, yolov5_spec
from slimloop.train import TrainHooks, seed_everything, train

EPOCHS, BATCH = 3, 2
PARAMS = TrainParams(imgsz=64, epochs=EPOCHS, batch_size=BATCH, lr0=0.02, workers=0, device="cpu",
                     amp=False, val_every=100)
EVAL = EvalParams(latency_runs=1, latency_warmup=0, imgsz_sweep=[64])


def _pause(out, point):
    Path(f"{out}.paused").write_text(point)
    time.sleep(600)  # until the test sends SIGKILL
    os._exit(99)


def _instrument(plan, out, steps_per_epoch):
    """Wrap the writers for the plan's point; return the hooks that watch the steps and epochs."""
    point, at = plan.get("point"), plan.get("epoch")
    current = {"epoch": None}
    real_save_state, real_replace, real_write = slimloop.train.save_state, os.replace, Path.write_bytes

    def after_backward(model, progress):
        step = round(progress * steps_per_epoch * EPOCHS)
        current["epoch"] = step // steps_per_epoch
        if point == "mid_epoch" and step == plan["step"]:
            _pause(out, point)

    def on_epoch_end(epoch, model, row):
        if plan.get("snapshots"):
            shutil.copyfile(out / "last.safetensors", f"{out}.epoch{epoch + 1}.safetensors")
        if point == "after_checkpoint" and epoch == at:
            _pause(out, point)

    def save_state(path, state):
        if point == "between_files" and state["epoch"] == at:
            _pause(out, point)
        return real_save_state(path, state)

    def replace(src, dst):
        if point == "mid_write" and Path(dst).name == "last.state.safetensors" and current["epoch"] == at:
            _pause(out, point)
        return real_replace(src, dst)

    def write_bytes(self, data):
        if point == "disk_full" and self.name.startswith(f".{plan['file']}.") and current["epoch"] == at:
            with open(self, "wb") as fh:
                fh.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return real_write(self, data)

    slimloop.train.save_state, os.replace, Path.write_bytes = save_state, replace, write_bytes
    return TrainHooks(after_backward=after_backward, on_epoch_end=[on_epoch_end])


def run(data_root, out_dir):
    torch.set_num_threads(1)
    out = Path(out_dir)
    os.chdir(out.parent)  # outside any git/DVC repository: dvclive then skips reading one
    plan_file = Path(f"{out}.plan.json")
    plan = json.loads(plan_file.read_text()) if plan_file.exists() else {}
    images = len(json.loads((Path(data_root) / "train.json").read_text())["images"])
    hooks = _instrument(plan, out, math.ceil(images / BATCH))
    seed_everything(0)
    model = build_model(yolov5_spec("n", nc=2, names=("barcode", "qrcode"), width_multiple=0.125,
                                    depth_multiple=0.33))
    try:
        train(model, data_root, PARAMS, EVAL, out, hooks=hooks, progress=False)
    except SlimloopError as exc:  # what flows.common.run_entry prints
        Path(f"{out}.error").write_text(f"{type(exc).__name__}: {exc}")
        raise SystemExit(1)


if __name__ == "__main__":  # a fresh interpreter: python driver.py DATA OUT
    run(sys.argv[1], sys.argv[2])
elif __name__ == "__crash__":  # runpy.run_path in a process forked from the preloaded server
    run(*ARGS)  # noqa: F821 -- given by run_path's init_globals
'''

# name -> (plan, epoch of last.safetensors after the crash, a temp file is left by the crash)
CRASHES = {
    "SIGKILL mid-epoch 2 (after optimizer step 3 of 6)": ({"point": "mid_epoch", "step": 3}, 1, False),
    "SIGKILL right after epoch 1's checkpoint and state were written": (
        {"point": "after_checkpoint", "epoch": 0}, 1, False),
    "SIGKILL between epoch 2's last.safetensors and its state file": (
        {"point": "between_files", "epoch": 1}, 2, False),
    "SIGKILL inside the write of epoch 2's state (temp file written, not renamed)": (
        {"point": "mid_write", "epoch": 1}, 2, True),
    "disk full half-way through epoch 2's last.safetensors": (
        {"point": "disk_full", "file": "last.safetensors", "epoch": 1}, 1, False),
    "disk full half-way through epoch 2's state file": (
        {"point": "disk_full", "file": "last.state.safetensors", "epoch": 1}, 2, False),
}


# what a training run imports (by name: the fork server sees only the interpreter's own sys.path)
PRELOAD = ["torch", "slimloop.train", "slimloop.data.dataset", "slimloop.evaluate", "slimloop.model", "dvclive",
           "dvc.repo", "dvc.config", "scmrepo.git", "dulwich.porcelain", "pycocotools.cocoeval"]


@pytest.fixture(scope="module")
def crash_data(tmp_path_factory) -> Path:
    """4 synthetic 64 px training images (2 optimizer steps per epoch at batch 2)."""
    from slimloop.config import DataParams, SyntheticParams
    from slimloop.data.synth import generate_dataset

    root = tmp_path_factory.mktemp("crash") / "data"
    generate_dataset(root, DataParams(seed=5, synthetic=SyntheticParams(
        image_size=64, train=4, val=2, test=0, max_codes=2, min_size=0.3, max_size=0.6, distractors=0)),
        progress=False, workers=0)
    return root


@pytest.fixture(scope="module")
def driver(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("driver")
    (folder / "slimloop_crash_driver.py").write_text(CRASH_DRIVER)
    return folder / "slimloop_crash_driver.py"


def _wait_for(path: Path, proc, timeout: float = 180) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        assert proc.is_alive() if hasattr(proc, "is_alive") else proc.poll() is None, f"exited before {path}"
        assert time.monotonic() < end, f"timed out waiting for {path}"
        time.sleep(0.05)


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path).state_dict


def _same(a: Path, b: Path) -> bool:
    x, y = _tensors(a), _tensors(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def _temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def _check_left_by_crash(name: str, out: Path, reference: Path) -> None:
    """What a crash leaves is one consistent earlier epoch, equal to the uninterrupted run's."""
    last_epoch, leaves_temp = CRASHES[name][1:]
    assert load_checkpoint(out / "last.safetensors").meta["epoch"] == last_epoch, name
    assert _same(out / "last.safetensors", Path(f"{reference}.epoch{last_epoch}.safetensors")), name
    assert load_state(out / "last.state.safetensors")["epoch"] == 0, name  # epoch 1, 0-based
    assert bool(_temps(out)) == leaves_temp, (name, _temps(out))


def _resumed_identically(name: str, proc, out: Path, reference: Path) -> bool:
    """The rerun finished with the reference's weights (last and best) and metrics, no temp file."""
    assert proc.exitcode == 0, name
    assert load_checkpoint(out / "last.safetensors").meta == load_checkpoint(reference / "last.safetensors").meta
    assert _same(out / "last.safetensors", reference / "last.safetensors"), name
    assert _same(out / "best.safetensors", reference / "best.safetensors"), name
    assert _temps(out) == [], name
    return True


def test_crashes_resume_to_bit_identical_weights(crash_data, driver, tmp_path):
    """Each crash: the files left are a valid earlier epoch; rerunning the same call finishes the
    run with exactly the weights of an uninterrupted one."""
    import runpy

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)  # imported once in the server; each run is forked from it

    def start(out: Path):
        proc = context.Process(target=runpy.run_path, args=(str(driver),),
                               kwargs={"run_name": "__crash__", "init_globals": {"ARGS": (str(crash_data), str(out))}})
        proc.start()
        return proc

    reference = tmp_path / "reference"
    Path(f"{reference}.plan.json").write_text(json.dumps({"snapshots": True}))
    outs = {name: tmp_path / f"run{i}" for i, name in enumerate(CRASHES)}
    for name, out in outs.items():
        Path(f"{out}.plan.json").write_text(json.dumps(CRASHES[name][0]))
    procs = {"reference": start(reference), **{name: start(out) for name, out in outs.items()}}
    try:
        for name, out in outs.items():  # first runs: kill at the pause, or let the full disk fail them
            proc = procs[name]
            if CRASHES[name][0]["point"] == "disk_full":
                proc.join(180)
                assert proc.exitcode == 1, name
                error = Path(f"{out}.error").read_text()
                assert error.startswith("CheckpointError: cannot write") and "No space left on device" in error
                assert CRASHES[name][0]["file"] in error
            else:
                _wait_for(Path(f"{out}.paused"), proc)
                proc.kill()
                proc.join(60)
                assert proc.exitcode == -signal.SIGKILL, name
        procs["reference"].join(300)
        assert procs["reference"].exitcode == 0
        for name, out in outs.items():
            _check_left_by_crash(name, out, reference)
            Path(f"{out}.plan.json").unlink()
        procs = {name: start(out) for name, out in outs.items()}  # the same call again
        for proc in procs.values():
            proc.join(300)
        resumed = [name for name, out in outs.items() if _resumed_identically(name, procs[name], out, reference)]
    finally:
        for proc in procs.values():
            if proc.is_alive():
                proc.kill()
    assert len(resumed) == len(CRASHES) == 6
    print(f"\ncrash points: {len(CRASHES)}; resumed bit-identical: {len(resumed)}")


def test_finished_run_whose_checkpoint_was_deleted_gives_it_back(crash_data, tiny_spec, tmp_path):
    """A finished run's state survives but a checkpoint was deleted (a cleaned cache, a step that
    crashed after training): the rerun gives it back byte-identical. ``last`` is rewritten from the
    state; ``best`` holds weights the state does not, so the run starts over (it is deterministic)."""
    from conftest import TINY_EVAL, tiny_train_params
    from slimloop.train import seed_everything, train

    params = tiny_train_params(imgsz=64, epochs=1, batch_size=4, val_every=1)

    def run():
        seed_everything(0)
        return train(build_model(tiny_spec), crash_data, params, TINY_EVAL, tmp_path, progress=False)

    first = run()
    original = {p.name: p.read_bytes() for p in (first.last, first.best)}
    for deleted in (first.last, first.best):
        deleted.unlink()
        again = run()
        assert again.history == first.history, deleted.name
        assert {p.name: p.read_bytes() for p in (again.last, again.best)} == original, deleted.name


@pytest.mark.slow
def test_sigkill_and_rerun_of_a_fresh_python_command(crash_data, driver, tmp_path):
    """The same as above with a fresh interpreter per run (no fork server): `python driver.py ...`."""
    def command(out: Path) -> list[str]:
        return [sys.executable, str(driver), str(crash_data), str(out)]

    reference, out = tmp_path / "reference", tmp_path / "run"
    subprocess.run(command(reference), check=True, timeout=600, capture_output=True)
    Path(f"{out}.plan.json").write_text(json.dumps({"point": "mid_epoch", "step": 3}))
    proc = subprocess.Popen(command(out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(Path(f"{out}.paused"), proc)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
    assert load_checkpoint(out / "last.safetensors").meta["epoch"] == 1
    Path(f"{out}.plan.json").unlink()
    subprocess.run(command(out), check=True, timeout=600, capture_output=True)
    assert _same(out / "last.safetensors", reference / "last.safetensors")
    assert _same(out / "best.safetensors", reference / "best.safetensors")


# ---- no network: the whole tiny pipeline runs with every connection refused --------------------

NET_GUARD = '''"""Loaded by every Python process of the no-network test: log and refuse any network use."""
import os
import socket

_LOG = os.environ["SLIMLOOP_NET_LOG"]
_connect, _connect_ex, _getaddrinfo = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo


def _refuse(what):
    with open(_LOG, "a") as fh:
        fh.write(f"{os.getpid()} {what}\\n")
    raise OSError(101, f"network is unreachable (no-network test): {what}")


def connect(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        _refuse(f"connect {address!r}")
    return _connect(self, address)


def connect_ex(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        _refuse(f"connect_ex {address!r}")
    return _connect_ex(self, address)


def getaddrinfo(host, *args, **kwargs):
    if host not in (None, "", "localhost", "127.0.0.1", "::1"):
        _refuse(f"getaddrinfo {host!r}")
    return _getaddrinfo(host, *args, **kwargs)


socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo = connect, connect_ex, getaddrinfo
'''

PIPELINE = '''
import sys
from flows import baseline, prepare
from flows.common import run_entry

for stage in (prepare, baseline):
    try:
        run_entry(lambda: stage.main(["--params", "params.yaml", "--quiet"]))
    except SystemExit as exc:
        if exc.code:
            raise
'''

TINY_PIPELINE_PARAMS = {
    "data": {"synthetic": {"image_size": 64, "train": 4, "val": 2, "test": 0, "max_codes": 2,
                           "min_size": 0.3, "max_size": 0.6, "distractors": 0}},
    "model": {"base": "n", "width_multiple": 0.125, "depth_multiple": 0.33, "autoanchor": False},
    "train": {"imgsz": 64, "epochs": 1, "batch_size": 4, "workers": 0, "device": "cpu", "amp": False},
    "eval": {"latency_runs": 2, "latency_warmup": 1, "imgsz_sweep": [64]},
}


UNREACHABLE = "http://127.0.0.1:9"
PROXY_ENV = {"HTTP_PROXY": UNREACHABLE, "HTTPS_PROXY": UNREACHABLE, "ALL_PROXY": UNREACHABLE,
             "http_proxy": UNREACHABLE, "https_proxy": UNREACHABLE, "all_proxy": UNREACHABLE,
             "NO_PROXY": "", "no_proxy": ""}


def test_tiny_pipeline_runs_with_every_connection_refused(tmp_path, monkeypatch):
    """In this process: synthetic data, 1 epoch of training, evaluation, ONNX export and ONNX
    Runtime latency, with proxies pointing nowhere and socket connect/DNS refused and recorded.
    (Imports happened earlier; the entry-point test below starts a fresh interpreter.)"""
    import socket

    from conftest import NO_AUGMENT
    from slimloop.config import DataParams, EvalParams, SyntheticParams, TrainParams
    from slimloop.data.synth import generate_dataset
    from slimloop.deploy.export import export_onnx, ort_session
    from slimloop.measure import measure_model
    from slimloop.train import seed_everything, train

    attempts: list[str] = []

    def refuse(what):
        attempts.append(what)
        raise OSError(errno.ENETUNREACH, f"network is unreachable (no-network test): {what}")

    real_connect = socket.socket.connect
    monkeypatch.setattr(socket.socket, "connect", lambda self, address: refuse(f"connect {address}") if
                        self.family in (socket.AF_INET, socket.AF_INET6) else real_connect(self, address))
    monkeypatch.setattr(socket.socket, "connect_ex", lambda self, address: refuse(f"connect_ex {address}"))
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *a, **k: refuse(f"getaddrinfo {host}"))
    monkeypatch.setattr(socket, "create_connection", lambda address, *a, **k: refuse(f"create_connection {address}"))
    for key, value in PROXY_ENV.items():
        monkeypatch.setenv(key, value)
    root = tmp_path / "data"
    generate_dataset(root, DataParams(seed=1, synthetic=SyntheticParams(
        image_size=64, train=4, val=2, test=0, max_codes=2, min_size=0.3, max_size=0.6, distractors=0)),
        progress=False, workers=0)
    seed_everything(0)
    spec = yolov5_spec("n", nc=2, names=("barcode", "qrcode"), width_multiple=0.125, depth_multiple=0.33)
    params = TrainParams(imgsz=64, epochs=1, batch_size=4, workers=0, device="cpu", amp=False, augment=NO_AUGMENT)
    eval_params = EvalParams(latency_runs=2, latency_warmup=1, imgsz_sweep=[64])
    result = train(build_model(spec), root, params, eval_params, tmp_path / "run", progress=False)
    model = load_model(result.best)
    record = measure_model(model, root, "val", 64, eval_params)
    onnx = export_onnx(model, tmp_path / "model.onnx", 64)
    outputs = ort_session(onnx).run(None, {"images": np.zeros((1, 3, 64, 64), np.float32)})
    assert attempts == []
    assert record["latency_ms"] > 0 and 0 <= record["map50"] <= 1
    assert outputs[0].shape[0] == 1


@pytest.mark.slow
def test_tiny_pipeline_entry_points_need_no_network(tmp_path):
    """A fresh interpreter (imports included): ``flows.prepare`` (synthetic data) and
    ``flows.baseline`` (1 epoch of training, evaluation, ONNX export and ONNX Runtime latency) with
    proxies pointing nowhere and every socket connection refused and logged."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(NET_GUARD)
    work = tmp_path / "work"
    work.mkdir()
    (work / "params.yaml").write_text(yaml.safe_dump(TINY_PIPELINE_PARAMS))
    log = tmp_path / "net.log"
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONPATH": f"{site}:{ROOT}",
           "SLIMLOOP_NET_LOG": str(log), "OMP_NUM_THREADS": "2", **PROXY_ENV}
    out = subprocess.run([sys.executable, "-c", "import socket; assert socket.getaddrinfo.__module__ == "
                          "'sitecustomize', 'guard not loaded'\n" + PIPELINE],
                         cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert not log.exists(), log.read_text()
    record = json.loads((work / "metrics" / "baseline.json").read_text())
    assert {"map50", "map", "gflops", "latency_ms"} <= set(record)
    assert (work / "models" / "baseline" / "model.onnx").stat().st_size > 10_000
    assert (work / "data" / "prepared" / "train.json").exists()


# ---- fuzzing: how many generated inputs tests/test_fuzz_import.py runs -------------------------


def test_fuzz_case_counts():
    """Each fuzz test runs up to its ``max_examples`` (fewer only if hypothesis exhausts the inputs)."""
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        import test_fuzz_import as fuzz
    finally:
        sys.path.remove(str(ROOT / "tests"))
    counts = {name: fn._hypothesis_internal_use_settings.max_examples
              for name, fn in vars(fuzz).items() if name.startswith("test_")}
    assert counts == {"test_structured_label_lines": 300, "test_arbitrary_label_text": 500,
                      "test_arbitrary_label_bytes": 500, "test_coco_arbitrary_json": 400,
                      "test_coco_like_structures": 600}
    assert sum(counts.values()) == 2300
