"""Helpers for the yolov5 interop tests: models built by the `yolov5` package (7.0.14), saved as its
train.py saves them. Imported by the test modules that need the package (a hard import: CI installs it)."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch
import yaml

os.environ.setdefault("YOLO_OFFLINE", "1")  # ultralytics (imported by yolov5): no update checks

import yolov5  # noqa: E402
from yolov5.models.common import Conv  # noqa: E402
from yolov5.models.yolo import Model  # noqa: E402

CFG_DIR = Path(yolov5.__file__).parent / "models"


def yolov5_yaml(name: str = "yolov5n", **changes) -> dict:
    """A bundled model yaml as a dict (``changes`` replace top-level keys)."""
    cfg = yaml.safe_load((CFG_DIR / f"{name}.yaml").read_text())
    return {**cfg, **changes}


def spp_yaml(name: str = "yolov5n") -> dict:
    """The v6 yaml with the older SPP (5, 9, 13) in place of SPPF (as in yolov5 <= v5 and yolov3-spp)."""
    cfg = yolov5_yaml(name)
    cfg["backbone"] = [row if row[2] != "SPPF" else [-1, 1, "SPP", [1024, [5, 9, 13]]] for row in cfg["backbone"]]
    return cfg


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial BN weights and statistics (convs keep torch's init), so that outputs are not an
    untrained model's near-constant ones."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(n, generator=gen) * 0.1)
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            elif isinstance(m, torch.nn.Conv2d):  # unit gain: spatial detail survives the 24 layers
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) / m.weight[0].numel() ** 0.5)
        for conv in model.model[-1].m:  # the head: spread objectness and class scores over (0, 1)
            conv.bias.copy_(torch.randn(conv.bias.shape, generator=gen))
    return model


_BUILT: dict[str, Model] = {}


def make_model(cfg: str | dict = "yolov5n", nc: int = 2, names=None, seed: int = 0) -> Model:
    """A yolov5 DetectionModel in eval mode with randomized weights; ``names`` set as train.py does.

    Built once per arguments and process (yolov5's constructor runs a forward pass and prints a
    summary: seconds on a busy CPU); each call returns a fresh copy.
    """
    cfg = yolov5_yaml(cfg) if isinstance(cfg, str) else copy.deepcopy(cfg)
    key = json.dumps([cfg, nc, list(names) if names is not None else None, seed], sort_keys=True)
    if key not in _BUILT:
        _BUILT[key] = _build(cfg, nc, names, seed)
    return copy.deepcopy(_BUILT[key])


def _build(cfg: dict, nc: int, names, seed: int) -> Model:
    default_act = Conv.default_act
    try:
        model = Model(cfg, ch=3, nc=nc)
    finally:  # a yaml's `activation` sets it for every later model of the process (yolov5's parse_model)
        Conv.default_act = default_act
    model.names = list(names) if names is not None else [str(i) for i in range(nc)]
    return randomize(model, seed).eval()


def save_like_train_py(path: Path, model: Model, ema: Model | None = None, epoch: int = 3) -> Path:
    """``torch.save`` of the dict yolov5's train.py writes (v7.0), fp16 models included."""
    ckpt = {
        "epoch": epoch,
        "best_fitness": None,
        "model": copy.deepcopy(model).half(),
        "ema": copy.deepcopy(ema if ema is not None else model).half(),
        "updates": 0,
        "optimizer": None,
        "opt": {"weights": "", "cfg": "yolov5n.yaml", "epochs": 10, "imgsz": 160, "hyp": {"lr0": 0.01}},
        "git": None,
        "date": "2024-01-01T00:00:00",
    }
    torch.save(ckpt, path)
    return path


def yolov5_forward(model: Model, x: torch.Tensor) -> torch.Tensor:
    """yolov5's own decoded eval output ``(B, N, 5 + nc)``."""
    with torch.no_grad():
        return model.eval()(x)[0]
