"""Build the starting spec (with fitted anchors) and train-evaluate-export one model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from slimloop.config import Params
from slimloop.errors import ConfigError


def initial_spec(params: Params) -> tuple[Any, dict[str, float]]:
    """The spec to train: a saved one (transfer) or YOLOv5 ``model.base``, anchors fitted to the data.

    Returns:
        ``(spec, {"bpr_before", "bpr_after", "refit"})``.
    """
    from slimloop.data.canonical import read_split
    from slimloop.data.dataset import DetectionDataset, box_wh
    from slimloop.model import check_anchors, load_spec, yolov5_spec

    root = params.data.out_dir
    names = tuple(read_split(root, "train").names)
    if params.model.spec:
        spec = relabel(load_spec(params.model.spec), names)
    else:
        spec = yolov5_spec(
            params.model.base, nc=len(names), names=names,
            width_multiple=params.model.width_multiple, depth_multiple=params.model.depth_multiple,
        )
    info = {"refit": False}
    if params.model.autoanchor:
        wh = box_wh(DetectionDataset(root, "train", params.train.imgsz, None, cache_images=False))
        spec, before, after = check_anchors(spec, wh, params.train.loss.anchor_t)
        info = {"bpr_before": round(before, 4), "bpr_after": round(after, 4), "refit": after != before}
    return spec, info


def relabel(spec: Any, names: tuple[str, ...]) -> Any:
    """``spec`` detecting ``names``: every width stays, only the head's class outputs follow the data.

    Transfer ("one ticket to win them all"): a structure found on one dataset is trained from
    scratch on another, which may have other classes; anchors are refitted afterwards.
    """
    import dataclasses

    if spec.detect.names == names:
        return spec
    if not names:
        raise ConfigError("the dataset has no class names: nothing to detect")
    detect = dataclasses.replace(spec.detect, nc=len(names), names=names)
    return dataclasses.replace(spec, detect=detect)


def baseline_hooks(params: Params) -> Any:
    """Training hooks of the baseline run: network slimming's L1 penalty on BN gammas from the first
    epoch when ``baseline.sparse`` (the paper's recipe: channels are ranked by the time the loop
    cuts), else none."""
    from slimloop.compress.sparse import sparse_hooks
    from slimloop.config import SparseParams
    from slimloop.train import TrainHooks

    b = params.baseline
    if not b.sparse:
        return TrainHooks()
    return sparse_hooks(SparseParams(epochs=params.train.epochs, lam=b.lam, schedule=b.schedule,
                                     low_fraction=b.low_fraction))


def train_and_measure(
    spec: Any, params: Params, out_dir: Path, progress: bool = True, stage: str = "baseline"
) -> dict[str, Any]:
    """Train ``spec`` from scratch, then evaluate, profile and export the best checkpoint.

    Writes ``out_dir/{best,last,last.state,rewind}.safetensors``, ``spec.json`` and ``model.onnx``.
    """
    from slimloop.checkpoint import load_model
    from slimloop.compress.retrain import rewind_saver
    from slimloop.deploy.export import export_onnx
    from slimloop.measure import measure_model
    from slimloop.model import build_model, save_spec
    from slimloop.train import TrainHooks, seed_everything, train

    out_dir = Path(out_dir)
    seed_everything(params.train.seed)
    model = build_model(spec)
    # an early checkpoint for retrain.mode=rewind (lottery-ticket late rewinding)
    hooks = baseline_hooks(params) if stage == "baseline" else TrainHooks()
    hooks.on_epoch_end.append(rewind_saver(out_dir, params.retrain.rewind_epoch))
    result = train(model, params.data.out_dir, params.train, params.eval, out_dir, hooks=hooks,
                   progress=progress, meta={"stage": stage})
    best = load_model(result.best)
    save_spec(best.spec, out_dir / "spec.json")
    export_onnx(best, out_dir / "model.onnx", params.train.imgsz, dynamic_batch=True)
    device = result.device if result.device != "mps" else "cpu"
    record = measure_model(best.to(device), params.data.out_dir, "val", params.train.imgsz, params.eval,
                           device=device, progress=progress)
    record["device"] = device
    record["torch_threads"] = torch.get_num_threads()
    record["epochs"] = params.train.epochs
    return record
