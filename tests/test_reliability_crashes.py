"""Reliability, crashes: SIGKILL at four points and a full disk at two; every rerun resumes to
bit-identical weights, and a deleted checkpoint of a finished run is given back.

The numbers these tests prove are collected in docs/reliability.md.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from slimloop.checkpoint import load_checkpoint, load_state
from slimloop.model import build_model

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
