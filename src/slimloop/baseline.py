"""Build the starting spec (with fitted anchors) and train-evaluate-export one model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from slimloop.config import Params
from slimloop.errors import ConfigError, UnsupportedModelError


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


def import_checkpoint(params: Params) -> tuple[Any, dict[str, Any]]:
    """The yolov5 model of ``model.checkpoint``, its classes checked against the dataset's.

    Its anchors are kept (the weights were trained with them); their best possible recall on the
    training boxes at ``train.imgsz`` is recorded, so a model trained at another size shows it.

    Returns:
        ``(model, {"imported": file facts, "anchors": {"refit": False, "bpr": ...}})``.
    """
    from slimloop.data.canonical import read_split
    from slimloop.data.dataset import DetectionDataset, box_wh
    from slimloop.model import best_possible_recall
    from slimloop.model.yolov5_import import import_yolov5

    root = params.data.out_dir
    names = tuple(read_split(root, "train").names)
    imported = import_yolov5(params.model.checkpoint, params.model.checkpoint_yaml, names=names)
    model = imported.model
    if model.detect.nl != len(params.train.loss.balance):
        raise UnsupportedModelError(
            f"{params.model.checkpoint}: {model.detect.nl} detection levels; slimloop trains "
            f"{len(params.train.loss.balance)} (train.loss.balance): P6 models such as yolov5n6 are not supported")
    wh = box_wh(DetectionDataset(root, "train", params.train.imgsz, None, cache_images=False))
    bpr = best_possible_recall(model.detect.anchors.numpy(), wh, params.train.loss.anchor_t)
    return model, {"imported": imported.info, "anchors": {"refit": False, "bpr": round(bpr, 4)}}


def _keep_as_is(model: Any, out_dir: Path, stage: str, info: dict[str, Any]) -> Path:
    """``train.epochs: 0``: the imported weights are the baseline; files of an earlier run go, so that
    no stale ``rewind.safetensors`` or ``last.safetensors`` of another model is picked up."""
    from slimloop.checkpoint import save_checkpoint

    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in ("last.safetensors", "last.state.safetensors", "rewind.safetensors"):
        (out_dir / stale).unlink(missing_ok=True)
    return save_checkpoint(out_dir / "best.safetensors", model, {"stage": stage, "best": True, "epoch": 0,
                                                                 "imported": info})


def train_and_measure(
    spec: Any, params: Params, out_dir: Path, progress: bool = True, stage: str = "baseline",
    start: Any = None, start_info: dict[str, Any] | None = None,
) -> dict[str, Any] | None:
    """Train ``spec`` from scratch (or finetune ``start``), then evaluate, profile and export the best.

    Writes ``out_dir/{best,last,last.state,rewind}.safetensors``, ``spec.json`` and ``model.onnx``.
    Under torchrun every rank trains; rank 0 alone writes and measures, the others return None.

    Args:
        start: a model to finetune instead of a fresh ``build_model(spec)`` (an import); with
            ``train.epochs`` 0 it is measured as it is (only ``best.safetensors`` is written).
        start_info: provenance of ``start``, kept in the checkpoint's metadata.
    """
    from slimloop.checkpoint import load_model
    from slimloop.compress.retrain import rewind_saver
    from slimloop.deploy.export import export_onnx
    from slimloop.distributed import is_main_process
    from slimloop.measure import measure_model
    from slimloop.model import build_model, save_spec
    from slimloop.train import TrainHooks, seed_everything, select_device, train

    out_dir = Path(out_dir)
    seed_everything(params.train.seed)
    model = build_model(spec) if start is None else start
    meta = {"stage": stage, **({"imported": start_info} if start_info else {})}
    if params.train.epochs == 0:
        if not is_main_process():  # nothing to train: rank 0 measures the import
            return None
        best_path, device = _keep_as_is(model, out_dir, stage, start_info or {}), str(select_device(params.train.device))
    else:
        # an early checkpoint for retrain.mode=rewind (lottery-ticket late rewinding)
        hooks = baseline_hooks(params) if stage == "baseline" else TrainHooks()
        hooks.on_epoch_end.append(rewind_saver(out_dir, params.retrain.rewind_epoch))
        result = train(model, params.data.out_dir, params.train, params.eval, out_dir, hooks=hooks,
                       progress=progress, meta=meta)
        best_path, device = result.best, result.device
    if not is_main_process():
        return None
    best = load_model(best_path)
    save_spec(best.spec, out_dir / "spec.json")
    export_onnx(best, out_dir / "model.onnx", params.train.imgsz, dynamic_batch=True)
    device = device if device != "mps" else "cpu"
    record = measure_model(best.to(device), params.data.out_dir, "val", params.train.imgsz, params.eval,
                           device=device, progress=progress)
    record["device"] = device
    record["torch_threads"] = torch.get_num_threads()
    record["epochs"] = params.train.epochs
    return record
