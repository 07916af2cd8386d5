"""`dvc repro` on the tiny profile started from a yolov5 checkpoint in imports/: the baseline stage
does not train (train.epochs 0), the loop runs from the imported weights, the YOLOv5-layout ONNX
comes out, and a replaced checkpoint makes the baseline stage stale by content."""

from __future__ import annotations

import hashlib
import time

import pytest
import torch
from tests.test_dvc_pipeline import STAGES, Project, _copy_project, ran
from tests.yolov5_models import make_model, save_like_train_py, yolov5_yaml

from slimloop.checkpoint import load_model
from slimloop.model.yolov5_import import import_yolov5

pytestmark = pytest.mark.slow
NAMES = ("barcode", "qrcode")


def _checkpoint(path, seed: int):
    return save_like_train_py(path, make_model(yolov5_yaml("yolov5n", width_multiple=0.125), names=NAMES, seed=seed))


@pytest.fixture(scope="module")
def imported_project(tmp_path_factory, prefect_server) -> Project:
    from prefect.settings import PREFECT_API_URL

    root = tmp_path_factory.mktemp("y5repo")
    _copy_project(root)
    proj = Project(root, tmp_path_factory.mktemp("y5store"))
    proj.env["PREFECT_API_URL"] = PREFECT_API_URL.value()
    _checkpoint(root / "imports" / "best.pt", seed=0)
    proj.set_param("model", "checkpoint", "imports/best.pt")
    proj.set_param("train", "epochs", 0)
    proj.run("git", "init", "-q")
    proj.commit("tiny project from a yolov5 checkpoint")
    started = time.perf_counter()
    proj.first_run = proj.dvc("repro")
    proj.seconds = time.perf_counter() - started
    return proj


def test_repro_from_an_imported_checkpoint(imported_project):
    proj = imported_project
    assert ran(proj.first_run) == set(STAGES)
    baseline = proj.metrics("baseline.json")
    digest = hashlib.sha256((proj.root / "imports" / "best.pt").read_bytes()).hexdigest()
    assert baseline["epochs"] == 0 and baseline["imported"]["sha256"] == digest
    out = proj.root / "models" / "baseline"
    assert not (out / "last.safetensors").exists() and not (out / "live").exists()  # it did not train
    imported = import_yolov5(proj.root / "imports" / "best.pt", names=NAMES).model.state_dict()
    best = load_model(out / "best.safetensors").state_dict()
    assert all(torch.equal(best[k], imported[k]) for k in best)
    iteration = proj.metrics("iterations/iter_1.json")
    assert iteration["steps"]["pruned"]["params"] < baseline["params"]  # the loop ran on the import
    assert (proj.root / "models" / "compressed" / "model_yolov5.onnx").is_file()
    assert (proj.root / "reports" / "summary.md").is_file()


def test_a_replaced_checkpoint_makes_the_baseline_stale(imported_project):
    proj = imported_project
    assert "Data and pipelines are up to date" in proj.dvc("status").stdout
    _checkpoint(proj.root / "imports" / "best.pt", seed=1)  # same path, other weights
    status = proj.dvc("status", "baseline").stdout
    assert "modified:" in status and "imports" in status
