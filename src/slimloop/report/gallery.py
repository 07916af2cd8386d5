"""The gallery: val images where the final model misses a ground-truth box the baseline finds."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from slimloop.config import EvalParams
from slimloop.report.inputs import ReportInputs
from slimloop.report.plots import figure, message_figure

GALLERY_STYLES = {"missed": dict(color="magenta", lw=3.0, ls="-", label="GT missed by final"),
                  "gt": dict(color="lime", lw=1.5, ls="-", label="ground truth"),
                  "baseline": dict(color="dodgerblue", lw=1.2, ls="--", label="baseline"),
                  "final": dict(color="red", lw=1.0, ls="-", label="final")}


@dataclass(frozen=True)
class GalleryItem:
    """One val image; boxes are ``(n, 4)`` xyxy original-image px, detections those at the operating point."""

    image: Path
    gt: np.ndarray
    baseline: np.ndarray
    final: np.ndarray
    missed: np.ndarray  # ground truth the baseline finds and the final model does not


def matched_gt(det: dict[str, Any], gt_boxes: np.ndarray, gt_labels: np.ndarray, eval_params: EvalParams) -> np.ndarray:
    """Which ground-truth boxes a model finds at the operating point (bool ``(G,)``).

    Detections scoring at least ``op_conf``, best first, each take the best free box of their class
    with IoU at least ``op_iou``: the rule behind the ``missed`` count of :mod:`slimloop.evaluate`.
    """
    import torch
    from torchvision.ops import box_iou

    keep = det["scores"] >= eval_params.op_conf
    order = np.argsort(-det["scores"][keep], kind="stable")
    boxes, labels = det["boxes"][keep][order], det["labels"][keep][order]
    found = np.zeros(len(gt_boxes), dtype=bool)
    if len(boxes) == 0 or len(gt_boxes) == 0:
        return found
    iou = box_iou(torch.as_tensor(boxes, dtype=torch.float64), torch.as_tensor(gt_boxes, dtype=torch.float64))
    for row, label in zip(iou.numpy(), labels, strict=True):  # row: (G,)
        cand = np.where(~found & (gt_labels == label) & (row >= eval_params.op_iou), row, -1.0)
        best = int(cand.argmax())
        if cand[best] >= 0:
            found[best] = True
    return found


def _confident(det: dict[str, Any], eval_params: EvalParams) -> np.ndarray:
    return det["boxes"][det["scores"] >= eval_params.op_conf].reshape(-1, 4)


def regressions(samples: Sequence[Any], folder: Path, baseline: dict[int, dict[str, Any]],
                final: dict[int, dict[str, Any]], eval_params: EvalParams, limit: int) -> list[GalleryItem]:
    """The ``limit`` images with the most ground-truth boxes the baseline finds and the final model misses.

    Args:
        samples: the split's ``Sample`` list (image id ``i + 1`` is ``samples[i]``).
        folder: the split's image folder.
        baseline: per image id, the baseline's detections as :func:`slimloop.evaluate.predict` returns them.
        final: the same for the final model.
        eval_params: ``op_conf`` and ``op_iou``.
        limit: most images returned (ties keep file order).
    """
    empty = {"boxes": np.zeros((0, 4)), "scores": np.zeros(0), "labels": np.zeros(0, np.int64)}
    items = []
    for image_id, s in enumerate(samples, start=1):
        b, f = baseline.get(image_id, empty), final.get(image_id, empty)
        lost = matched_gt(b, s.boxes, s.labels, eval_params) & ~matched_gt(f, s.boxes, s.labels, eval_params)
        if lost.any():
            items.append(GalleryItem(Path(folder) / s.file_name, s.boxes, _confident(b, eval_params),
                                     _confident(f, eval_params), s.boxes[lost]))
    items.sort(key=lambda item: -len(item.missed))
    return items[:limit]


def _predict(ckpt: Path, root: Path, imgsz: int, eval_params: EvalParams, progress: bool) -> dict[int, dict[str, Any]]:
    from slimloop.checkpoint import load_model
    from slimloop.data.dataset import DetectionDataset, make_loader
    from slimloop.evaluate import predict

    model = load_model(ckpt).eval()
    loader = make_loader(DetectionDataset(root, "val", imgsz), 16, shuffle=False, workers=0, seed=0)
    return {d["image_id"]: d for d in predict(model, loader, "cpu", eval_params, progress=progress)}


def find_regressions(checkpoints: tuple[Path, Path], inputs: ReportInputs, data_root: Path,
                     eval_params: EvalParams, limit: int, progress: bool = False) -> list[GalleryItem]:
    """Predict the val split with the baseline and the final model (each at the size its record was
    measured at, on the CPU) and return :func:`regressions`."""
    from slimloop.data.canonical import image_dir, read_split

    baseline_ckpt, final_ckpt = checkpoints
    b = _predict(baseline_ckpt, data_root, int(inputs.baseline["imgsz"]), eval_params, progress)
    f = _predict(final_ckpt, data_root, int(inputs.final["record"]["imgsz"]), eval_params, progress)
    return regressions(read_split(data_root, "val").samples, image_dir(data_root, "val"), b, f, eval_params, limit)


def plot_gallery(items: list[GalleryItem] | None, eval_params: EvalParams, path: Path, dpi: int) -> None:
    """Each image with ground truth, baseline and final boxes; a figure that says so when there is none.

    ``items`` None means the gallery is switched off (``report.gallery`` is 0).
    """
    from matplotlib.lines import Line2D
    from matplotlib.patches import Rectangle

    from slimloop.data.dataset import decode_image

    point = f"IoU >= {eval_params.op_iou:g} at confidence >= {eval_params.op_conf:g}"
    if items is None:
        message_figure("The gallery is switched off (report.gallery is 0).", path, dpi)
        return
    if not items:
        message_figure(f"The final model misses no ground-truth box the baseline finds\n({point}, val split).",
                       path, dpi)
        return
    cols = min(4, len(items))
    fig, axes = figure(3.3 * cols, 3.3 * math.ceil(len(items) / cols) + 0.6, math.ceil(len(items) / cols), cols)
    for ax in axes.flat:
        ax.axis("off")
    for ax, item in zip(axes.flat, items, strict=False):  # the last row may have spare axes
        ax.imshow(decode_image(item.image))
        for key, style in GALLERY_STYLES.items():
            kw = {k: v for k, v in style.items() if k != "label"}
            for x1, y1, x2, y2 in getattr(item, key):
                ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, **kw))
        ax.set_title(f"{item.image.name}: {len(item.missed)} missed", fontsize=8)
    handles = [Line2D([], [], **style) for style in GALLERY_STYLES.values()]
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=8)
    fig.suptitle(f"Ground truth the baseline finds and the final model misses ({point})", fontsize=10)
    fig.savefig(path, dpi=dpi)
