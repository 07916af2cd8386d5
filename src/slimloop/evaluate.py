"""Accuracy of a detector on a canonical split: COCO mAP and the report's operating point."""

from __future__ import annotations

import contextlib
import copy
import io
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pycocotools.coco
import pycocotools.cocoeval
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from tqdm import tqdm

from slimloop.config import EvalParams
from slimloop.data.canonical import annotation_path
from slimloop.data.dataset import DetectionDataset, make_loader
from slimloop.errors import DataError, Problem, SlimloopError
from slimloop.io import JSONTextError, load_json_text
from slimloop.postprocess import non_max_suppression, scale_boxes_to_original

DECIMALS = 6
Batch = tuple[torch.Tensor, torch.Tensor, list[dict[str, Any]]]  # what collate_fn yields


@contextlib.contextmanager
def _quiet_pycocotools():
    """Silence pycocotools' progress prints. Redirecting stdout is not enough inside a Prefect flow
    with ``log_prints``: Prefect replaces ``builtins.print``, so the lines would become log records.
    A module-level ``print`` shadows the builtin for pycocotools' code alone."""
    modules = (pycocotools.coco, pycocotools.cocoeval)
    for module in modules:
        module.print = lambda *args, **kwargs: None
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for module in modules:
            vars(module).pop("print", None)


def _r(value: float) -> float:
    return round(float(value), DECIMALS)


def _as_numpy(values: Any, dtype: type) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=dtype)


def _coco_from_dict(gt: dict[str, Any]) -> COCO:
    """A pycocotools COCO built in memory (no file written)."""
    coco = COCO()
    coco.dataset = copy.deepcopy(gt)
    with _quiet_pycocotools():
        coco.createIndex()
    return coco


def _load_gt(gt_coco: dict[str, Any] | str | Path) -> dict[str, Any]:
    if isinstance(gt_coco, dict):
        return gt_coco
    path = Path(gt_coco)
    try:
        return load_json_text(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(Problem(str(path), None, "missing; run the prepare stage first")) from None
    except (OSError, UnicodeDecodeError, JSONTextError) as exc:
        line = getattr(exc, "line", None)
        raise DataError(Problem(str(path), line, f"unreadable: {exc}")) from None


def _to_results(detections: Sequence[dict[str, Any]], cat_ids: list[int]) -> list[dict[str, Any]]:
    """COCO result records (``bbox`` as ``x, y, w, h``) from per-image xyxy detections."""
    results = []
    for det in detections:
        boxes = _as_numpy(det["boxes"], np.float64).reshape(-1, 4)
        scores = _as_numpy(det["scores"], np.float64).reshape(-1)
        labels = _as_numpy(det["labels"], np.int64).reshape(-1)
        for (x1, y1, x2, y2), score, label in zip(boxes, scores, labels, strict=True):
            results.append({
                "image_id": int(det["image_id"]),
                "category_id": cat_ids[int(label)],
                "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
                "score": float(score),
            })
    return results


def _mean_valid(precision: np.ndarray) -> float | None:
    """Mean over entries COCOeval filled (``-1`` marks "no ground truth"), as its summarize does."""
    valid = precision[precision > -1]
    return float(valid.mean()) if valid.size else None


def _coco_ap(gt: COCO, results: list[dict[str, Any]], cat_ids: list[int]) -> dict[str, Any]:
    """COCOeval bbox: overall map/map50 and per-category AP (None where a class has no GT)."""
    if not results:  # loadRes cannot take an empty list
        zeros = [0.0 if gt.getAnnIds(catIds=[c]) else None for c in cat_ids]
        return {"map": 0.0, "map50": 0.0, "ap": zeros, "ap50": list(zeros)}
    with _quiet_pycocotools():
        dt = gt.loadRes(results)
        coco_eval = COCOeval(gt, dt, iouType="bbox")
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    # precision: (T iou thresholds, R recall points, K categories, A area ranges, M max dets);
    # area "all" is index 0, the last max-dets setting is the one stats[0] uses.
    precision = coco_eval.eval["precision"][:, :, :, 0, -1]
    i50 = int(np.argmin(np.abs(coco_eval.params.iouThrs - 0.5)))
    order = {c: k for k, c in enumerate(coco_eval.params.catIds)}
    ap = [_mean_valid(precision[:, :, order[c]]) for c in cat_ids]
    ap50 = [_mean_valid(precision[i50, :, order[c]]) for c in cat_ids]
    stats = coco_eval.stats
    return {"map": max(float(stats[0]), 0.0), "map50": max(float(stats[1]), 0.0), "ap": ap, "ap50": ap50}


def _box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix ``(len(a), len(b))`` of xyxy boxes."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(axis=2)
    area_a = (a[:, 2:] - a[:, :2]).prod(axis=1)
    area_b = (b[:, 2:] - b[:, :2]).prod(axis=1)
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-12)


def _greedy_tp(det_boxes: np.ndarray, gt_boxes: np.ndarray, iou_thres: float) -> int:
    """True positives when detections (sorted by score) each take the best free GT box."""
    if len(det_boxes) == 0 or len(gt_boxes) == 0:
        return 0
    iou = _box_iou(det_boxes, gt_boxes)  # (D, G)
    free = np.ones(len(gt_boxes), dtype=bool)
    tp = 0
    for row in iou:
        cand = np.where(free & (row >= iou_thres), row, -1.0)
        best = int(cand.argmax())
        if cand[best] >= 0:
            free[best] = False
            tp += 1
    return tp


def _gt_by_image(gt: dict[str, Any], cat_ids: list[int]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    index = {c: k for k, c in enumerate(cat_ids)}
    grouped: dict[int, list[tuple[list[float], int]]] = {im["id"]: [] for im in gt["images"]}
    for a in gt["annotations"]:
        x, y, w, h = a["bbox"]
        grouped[a["image_id"]].append(([x, y, x + w, y + h], index[a["category_id"]]))
    return {
        i: (np.array([b for b, _ in rows], np.float64).reshape(-1, 4), np.array([c for _, c in rows], np.int64))
        for i, rows in grouped.items()
    }


def _operating_point(
    gt: dict[str, Any], detections: Sequence[dict[str, Any]], cat_ids: list[int], params: EvalParams
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-class TP, FP and GT counts at ``params.op_conf`` / ``params.op_iou``."""
    nk = len(cat_ids)
    tp, fp, n_gt = np.zeros(nk, np.int64), np.zeros(nk, np.int64), np.zeros(nk, np.int64)
    gt_images = _gt_by_image(gt, cat_ids)
    for _, gt_labels in gt_images.values():
        n_gt += np.bincount(gt_labels, minlength=nk)
    for det in detections:
        boxes = _as_numpy(det["boxes"], np.float64).reshape(-1, 4)
        scores = _as_numpy(det["scores"], np.float64).reshape(-1)
        labels = _as_numpy(det["labels"], np.int64).reshape(-1)
        keep = scores >= params.op_conf
        order = np.argsort(-scores[keep], kind="stable")
        boxes, labels = boxes[keep][order], labels[keep][order]
        gt_boxes, gt_labels = gt_images[int(det["image_id"])]
        for k in range(nk):
            mine = boxes[labels == k]
            hits = _greedy_tp(mine, gt_boxes[gt_labels == k], params.op_iou)
            tp[k] += hits
            fp[k] += len(mine) - hits
    return tp, fp, n_gt


def _ratio(num: int, den: int) -> float:
    return _r(num / den) if den else 0.0


def coco_metrics(
    gt_coco: dict[str, Any] | str | Path,
    detections: Sequence[dict[str, Any]],
    names: Sequence[str],
    params: EvalParams,
) -> dict[str, Any]:
    """mAP through pycocotools and precision/recall/missed at the report's operating point.

    Args:
        gt_coco: ground truth as a COCO dict or the path of a COCO JSON file.
        detections: one dict per image: ``image_id``, ``boxes (n, 4)`` xyxy original-image px,
            ``scores (n,)``, ``labels (n,)`` 0-based class indices (tensors or arrays).
        names: class names, in category-id order.
        params: ``op_conf`` and ``op_iou`` define the operating point.

    Returns:
        ``map50``, ``map`` (AP@0.5:0.95), ``precision``, ``recall``, ``missed`` (ground-truth
        boxes not found at the operating point) and ``per_class`` ``{name: {ap50, ap,
        precision, recall, missed, gt}}``. A class without ground truth has AP ``None``;
        precision or recall with a zero denominator is 0.

    Raises:
        SlimloopError: ``names`` does not match the categories of the ground truth.
    """
    gt = _load_gt(gt_coco)
    cat_ids = sorted(c["id"] for c in gt["categories"])
    if len(cat_ids) != len(names):
        raise SlimloopError(f"{len(names)} class names given but the ground truth has {len(cat_ids)} categories")
    ap = _coco_ap(_coco_from_dict(gt), _to_results(detections, cat_ids), cat_ids)
    tp, fp, n_gt = _operating_point(gt, detections, cat_ids, params)
    per_class = {
        name: {
            "ap50": None if ap["ap50"][k] is None else _r(ap["ap50"][k]),
            "ap": None if ap["ap"][k] is None else _r(ap["ap"][k]),
            "precision": _ratio(tp[k], tp[k] + fp[k]),
            "recall": _ratio(tp[k], n_gt[k]),
            "missed": int(n_gt[k] - tp[k]),
            "gt": int(n_gt[k]),
        }
        for k, name in enumerate(names)
    }
    return {
        "map50": _r(ap["map50"]),
        "map": _r(ap["map"]),
        "precision": _ratio(tp.sum(), tp.sum() + fp.sum()),
        "recall": _ratio(tp.sum(), n_gt.sum()),
        "missed": int(n_gt.sum() - tp.sum()),
        "per_class": per_class,
    }


def predict(
    model: torch.nn.Module, loader: Iterable[Batch], device: str | torch.device,
    params: EvalParams, progress: bool = True,
) -> list[dict[str, Any]]:
    """Run ``model`` (already in eval mode, on ``device``) over ``loader`` and apply NMS.

    Args:
        model: returns decoded ``(B, N, 5 + nc)`` predictions.
        loader: yields ``(imgs uint8 (B, 3, H, W), labels, metas)`` as ``collate_fn`` builds them.
        device: where the images go.
        params: ``conf_thres``, ``nms_iou`` and ``max_det`` for NMS.
        progress: show a tqdm bar.

    Returns:
        One dict per image: ``image_id``, ``boxes (n, 4)`` xyxy in original-image px,
        ``scores (n,)``, ``labels (n,)`` (numpy arrays).
    """
    out: list[dict[str, Any]] = []
    with torch.inference_mode():
        for imgs, _, metas in tqdm(loader, desc="evaluate", disable=not progress, leave=False):
            x = imgs.to(device, non_blocking=True).float() / 255  # (B, 3, H, W)
            dets = non_max_suppression(model(x), params.conf_thres, params.nms_iou, params.max_det)
            for det, meta in zip(dets, metas, strict=True):
                det = det.float().cpu()  # (n, 6)
                out.append({
                    "image_id": int(meta["image_id"]),
                    "boxes": scale_boxes_to_original(det[:, :4], meta).numpy(),
                    "scores": det[:, 4].numpy(),
                    "labels": det[:, 5].long().numpy(),
                })
    return out


def evaluate(
    model: torch.nn.Module, root: str | Path, split: str, imgsz: int, params: EvalParams,
    device: str | torch.device = "cpu", batch_size: int = 16, workers: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate ``model`` on one split of a canonical dataset.

    The model is moved to ``device`` and put in eval mode for the run; its train/eval mode is
    restored afterwards.

    Args:
        model: a detector following the ``Detector`` contract (decoded output in eval mode).
        root: canonical dataset root.
        split: ``train``, ``val`` or ``test``.
        imgsz: letterbox size (multiple of 32).
        params: NMS and operating-point settings.
        device: where inference runs.
        batch_size: images per forward pass.
        workers: data-loading worker processes (0 = main process).
        progress: show a tqdm bar.

    Returns:
        The dict of :func:`coco_metrics`.

    Raises:
        DataError: the split's annotation file or an image is missing or unreadable.
    """
    gt = _load_gt(annotation_path(root, split))
    dataset = DetectionDataset(root, split, imgsz, augment=None)
    loader = make_loader(dataset, batch_size, shuffle=False, workers=workers, seed=0)
    was_training = model.training
    model.to(device).eval()
    try:
        detections = predict(model, loader, device, params, progress=progress)
    finally:
        model.train(was_training)
    return coco_metrics(gt, detections, dataset.names, params)


def evaluate_forward(
    forward: Callable[[torch.Tensor], torch.Tensor], root: str | Path, split: str, imgsz: int, params: EvalParams,
    batch_size: int = 1, progress: bool = False,
) -> dict[str, Any]:
    """:func:`evaluate` for any forward function, such as an exported model run by a runtime: the same
    letterbox, NMS, box scaling and pycocotools evaluation as the torch model gets.

    Args:
        forward: ``(B, 3, H, W)`` float in [0, 1] on the CPU -> decoded ``(B, N, 5 + nc)``.
        root, split, imgsz, params: as for :func:`evaluate`.
        batch_size: images per call (1 for a batch-1 export).
        progress: show a tqdm bar.

    Returns:
        The dict of :func:`coco_metrics`.
    """
    gt = _load_gt(annotation_path(root, split))
    dataset = DetectionDataset(root, split, imgsz, augment=None)
    loader = make_loader(dataset, batch_size, shuffle=False, workers=0, seed=0)
    detections = predict(forward, loader, "cpu", params, progress=progress)
    return coco_metrics(gt, detections, dataset.names, params)
