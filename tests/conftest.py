"""Shared fixtures: a tiny synthetic dataset and tiny model specs, made once per session."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from slimloop.config import (
    AugmentParams,
    DataParams,
    EvalParams,
    SyntheticParams,
    TargetParams,
    TrainParams,
)

os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MPLBACKEND", "Agg")

if "PYTEST_XDIST_WORKER_COUNT" in os.environ:  # pytest -n N: share the cores instead of oversubscribing
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

NO_AUGMENT = AugmentParams(hsv_h=0, hsv_s=0, hsv_v=0, translate=0, scale=0, fliplr=0, mosaic=0)


@pytest.fixture(autouse=True)
def _threads():
    """Keep each test on the cores CI has, and restore torch's thread count afterwards."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 synthetic 128 px images with large codes; val is a copy of train (for overfitting)."""
    from slimloop.data.synth import generate_dataset

    root = tmp_path_factory.mktemp("tiny") / "data"
    params = DataParams(
        seed=3,
        synthetic=SyntheticParams(image_size=128, train=8, val=1, test=0, max_codes=2,
                                  min_size=0.25, max_size=0.6, distractors=0),
    )
    generate_dataset(root, params, progress=False, workers=0)
    shutil.copy(root / "train.json", root / "val.json")
    shutil.rmtree(root / "images" / "val")
    shutil.copytree(root / "images" / "train", root / "images" / "val")
    return root


@pytest.fixture(scope="session")
def tiny_spec():
    """A YOLOv5 at an eighth of n's width (8..32 channels): trains in seconds on a CPU."""
    from slimloop.model import yolov5_spec

    return yolov5_spec("n", nc=2, names=("barcode", "qrcode"), width_multiple=0.125,
                       depth_multiple=0.33)


@pytest.fixture(scope="session")
def prefect_server():
    """One temporary Prefect server for the whole session (it takes 15 to 25 s to start).

    Runs, deployments and artifacts of every test that uses it share its database; result
    storage is not isolated either (tests point it at their own folders).
    """
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def tiny_train_params(**overrides) -> TrainParams:
    """Training settings for tests: 128 px, no augmentation, no workers."""
    base = dict(imgsz=128, epochs=2, batch_size=8, lr0=0.02, warmup_epochs=0, workers=0,
                augment=NO_AUGMENT, device="cpu", val_every=100)
    return TrainParams(**{**base, **overrides})


TINY_EVAL = EvalParams(latency_runs=3, latency_warmup=1, imgsz_sweep=[128, 96])
# The built-in defaults are the demo's params.yaml values; tests that build sections from defaults
# turn off what the demo turns on and they do not want:
NO_TARGET = TargetParams(gflops_ratio=None, params_ratio=None)  # no stop on reaching a target
NO_FINAL = {"final_retrain": "off", "final_epochs": None, "final_lr0": None}  # no training after the loop
TRAIN_LR = {"lr0": None, "warmup_epochs": None}  # retrain with train's lr and warm-up


def randomize_bn(model):
    """Give every BatchNorm random statistics and gammas in [0.2, 1] (eval mode), so pruning has
    real constants to fold; returns the model."""
    from slimloop.model.build import conv_modules

    model.eval()
    for conv in conv_modules(model).values():
        conv.bn.weight.data.uniform_(0.2, 1.0)
        conv.bn.bias.data.normal_(0, 0.5)
        conv.bn.running_mean.normal_(0, 0.1)
        conv.bn.running_var.uniform_(0.5, 1.5)
    return model
