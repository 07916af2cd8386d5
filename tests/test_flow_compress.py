"""The compress flow: content-addressed step cache; a distillation-only change reuses earlier steps."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import NO_FINAL, NO_TARGET, TINY_EVAL, TRAIN_LR, tiny_train_params
from slimloop.config import (
    CompressParams,
    DataParams,
    DistillParams,
    Params,
    RetrainParams,
    SparseParams,
)
from slimloop.store.entries import store_dir
from slimloop.store.keys import step_key

PRUNE = "slimloop.compress.prune.prune_step"


def test_key_follows_content_not_path(tmp_path):
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(b"weights")
    b.write_bytes(b"weights")
    sparse = SparseParams(epochs=1)
    assert step_key("prune", PRUNE, {"ckpt": a, "sparse": sparse}) == step_key("prune", PRUNE, {"ckpt": b, "sparse": sparse})
    b.write_bytes(b"other")
    assert step_key("prune", PRUNE, {"ckpt": a, "sparse": sparse}) != step_key("prune", PRUNE, {"ckpt": b, "sparse": sparse})
    assert step_key("prune", PRUNE, {"ckpt": a, "sparse": sparse}) != step_key(
        "prune", PRUNE, {"ckpt": a, "sparse": SparseParams(epochs=2)})
    assert step_key("prune", PRUNE, {"ckpt": a, "out_dir": tmp_path / "x"}) == step_key(
        "prune", PRUNE, {"ckpt": a, "out_dir": tmp_path / "y"})
    assert step_key("prune", PRUNE, {"ckpt": a}) != step_key("prune", "slimloop.compress.pad.pad_step", {"ckpt": a})


def test_step_code_is_the_import_closure_of_its_module():
    from slimloop.store.keys import code_modules

    names = {p.relative_to(p.parents[2]).as_posix() if "compress" in p.parts else p.name for p in code_modules(PRUNE)}
    assert {"slimloop/compress/prune.py", "slimloop/compress/surgery.py", "train.py", "evaluate.py"} <= names
    assert "report.py" not in names and not any("flows" in n for n in names)


def test_store_is_absolute_and_overridable(monkeypatch, tmp_path):
    monkeypatch.setenv("SLIMLOOP_CACHE", "rel/store")
    assert store_dir().is_absolute()
    monkeypatch.setenv("SLIMLOOP_CACHE", str(tmp_path))
    assert store_dir() == tmp_path.resolve()


@pytest.fixture
def project(tmp_path, tiny_data, tiny_spec, monkeypatch):
    """A project folder with a trained tiny baseline and its metrics, cwd set to it."""
    from slimloop.checkpoint import load_model
    from slimloop.measure import measure_model
    from slimloop.model import build_model
    from slimloop.train import seed_everything, train

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SLIMLOOP_CACHE", str(tmp_path / "store"))
    params = Params(
        data=DataParams(out_dir=str(tiny_data)),
        train=tiny_train_params(epochs=2),
        eval=TINY_EVAL,
        sparse=SparseParams(epochs=1, lam=1e-3, lr0=None),
        retrain=RetrainParams(epochs=1, **TRAIN_LR),
        distill=DistillParams(mode="separate", epochs=1),
        compress=CompressParams(iterations=1, step_ratio=0.3, min_retention=0.0, tolerance=1.0, **NO_FINAL),
        target=NO_TARGET,
    )
    seed_everything(0)
    result = train(build_model(tiny_spec), tiny_data, params.train, params.eval, tmp_path / "models/baseline",
                   progress=False)
    assert result.best == tmp_path / "models/baseline/best.safetensors"
    record = measure_model(load_model(result.best), tiny_data, "val", 128, TINY_EVAL)
    Path("metrics").mkdir()
    Path("metrics/baseline.json").write_text(json.dumps(record))
    return params


def _step_dirs(root: Path) -> set[str]:
    return {p.name for p in root.iterdir() if p.is_dir() and p.name not in ("results", "work", "locks")}


@pytest.mark.slow
def test_distill_change_reuses_cached_steps(project, tmp_path, prefect_server):
    from flows.compress import compress_flow

    first = compress_flow(project)
    made = _step_dirs(tmp_path / "store")
    assert len(made) == 5  # sparse_train, prune, pad, retrain, distill
    again = compress_flow(project)
    assert _step_dirs(tmp_path / "store") == made  # everything served from the cache
    assert again["record"] == first["record"]
    changed = project.model_copy(update={"distill": project.distill.model_copy(update={"feature": 0.5})})
    compress_flow(changed)
    new = _step_dirs(tmp_path / "store") - made
    assert len(new) == 1  # only the distill step ran again
    shutil.rmtree(tmp_path / "store" / sorted(made)[0])  # a cached step whose files vanished
    compress_flow(project)
    assert sorted(made)[0] in _step_dirs(tmp_path / "store")  # recomputed, not trusted
    assert json.loads(Path("metrics/final.json").read_text())["iterations_run"] == 1
    assert Path("metrics/iterations/iter_1.json").exists()
    assert Path("models/compressed/final.safetensors").exists()
    assert "iteration,step,map50" in Path("metrics/iterations.csv").read_text()
    sweep = json.loads(Path("metrics/imgsz_sweep.json").read_text())["rows"]
    assert [(r["model"], r["imgsz"]) for r in sweep] == [("baseline", 128), ("baseline", 96), ("final", 128), ("final", 96)]
    assert all(r["gflops"] > 0 and set(r["missed_per_class"]) == {"barcode", "qrcode"} for r in sweep)
    small, large = sweep[1], sweep[0]
    assert small["gflops"] < large["gflops"]


@pytest.mark.slow
def test_failing_step_fails_the_flow_with_its_own_error(project, prefect_server):
    """A corrupt baseline checkpoint: the first step's CheckpointError, not a generic flow failure,
    and no retry (the project's own errors would only repeat)."""
    from flows.compress import compress_flow

    from slimloop.errors import CheckpointError

    Path("models/baseline/best.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="best.safetensors"):
        compress_flow(project)


def test_retry_condition_skips_project_errors():
    from types import SimpleNamespace

    from flows.compress import worth_retrying

    from slimloop.errors import TrainingError

    assert not worth_retrying(None, None, SimpleNamespace(data=TrainingError("nan at epoch 1")))
    assert worth_retrying(None, None, SimpleNamespace(data=OSError("disk hiccup")))
