"""The honest control: YOLOv5 scaled uniformly in width to the final model's FLOPs, trained from scratch."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slimloop.checkpoint import load_checkpoint
from slimloop.config import ModelParams, Params
from slimloop.model import ModelSpec, build_model, conv_widths, yolov5_spec
from slimloop.model.build import YOLOV5_MULTIPLES

MIN_WIDTH = 1 / 128  # every width rounds up to the smallest multiple of 8 well before this


@dataclass(frozen=True)
class WidthFit:
    """The widest uniform scaling within the FLOPs target (``fits`` False when even the narrowest is over)."""

    width_multiple: float
    spec: ModelSpec
    gflops: float
    fits: bool


def control_spec(reference: ModelSpec, model: ModelParams, width_multiple: float) -> ModelSpec:
    """YOLOv5 ``model.base`` at ``width_multiple`` (depth as the baseline), with ``reference``'s classes
    and fitted anchors; widths are rounded up to multiples of 8 as YOLOv5 does."""
    d = reference.detect
    return yolov5_spec(model.base, nc=d.nc, names=d.names, anchors=d.anchors,
                       width_multiple=width_multiple, depth_multiple=model.depth_multiple)


def fit_width(make_spec: Callable[[float], ModelSpec], target_gflops: float, imgsz: int, high: float,
              tol: float = 1e-3) -> WidthFit:
    """Bisection on the width multiple for the largest GFLOPs at ``imgsz`` not above ``target_gflops``.

    GFLOPs never decrease with the width multiple (every width is a rounded-up multiple of it), so
    bisection finds the widest spec inside the target, to ``tol`` in the multiple.

    Args:
        make_spec: width multiple -> spec.
        target_gflops: the budget (the final model's GFLOPs at ``imgsz``).
        imgsz: square input size.
        high: the widest multiple tried (the baseline's).
        tol: stop when the bracket is this narrow.
    """
    from slimloop.profile import gflops

    cache: dict[tuple, float] = {}

    def cost(width: float) -> tuple[ModelSpec, float]:
        spec = make_spec(width)
        key = tuple(conv_widths(spec).values())
        if key not in cache:
            cache[key] = gflops(build_model(spec), imgsz)
        return spec, cache[key]

    spec, value = cost(high)
    if value <= target_gflops:
        return WidthFit(high, spec, value, True)
    low = MIN_WIDTH
    spec, value = cost(low)
    if value > target_gflops:
        return WidthFit(low, spec, value, False)
    while high - low > tol:
        mid = (low + high) / 2
        mid_spec, mid_value = cost(mid)
        if mid_value <= target_gflops:
            low, spec, value = mid, mid_spec, mid_value
        else:
            high = mid
    return WidthFit(low, spec, value, True)


def train_control(baseline_ckpt: Path, target_gflops: float, imgsz: int, params: Params, epochs: int,
                  data_root: Path, out_dir: Path, progress: bool = False) -> dict[str, Any] | None:
    """Fit the control's width to ``target_gflops``, train it from scratch for ``epochs``, measure it.

    Args:
        baseline_ckpt: the baseline checkpoint (classes and fitted anchors come from its spec).
        target_gflops: the final compressed model's GFLOPs at ``imgsz``.
        imgsz: the size the final model was measured at (the control is measured there too).
        params: reads ``model`` (base, depth), ``train`` and ``eval``.
        epochs: the total budget: the baseline's epochs plus the loop's (to the final model).
        data_root: canonical dataset folder.
        out_dir: the training run folder (``best.safetensors`` is the control model).

    Returns:
        The metric record plus ``width_multiple``, ``target_gflops``, ``fits``, ``epochs``, ``checkpoint``;
        None on ranks other than 0 under torchrun (every rank trains).
    """
    from slimloop.compress.steps import evaluate_step
    from slimloop.distributed import is_main_process
    from slimloop.train import seed_everything, train

    reference = load_checkpoint(baseline_ckpt).spec
    high = params.model.width_multiple or YOLOV5_MULTIPLES[params.model.base][1]
    fit = fit_width(lambda w: control_spec(reference, params.model, w), target_gflops, imgsz, high)
    seed_everything(params.train.seed)
    model = build_model(fit.spec)
    train_params = params.train.model_copy(update={"epochs": epochs})
    result = train(model, data_root, train_params, params.eval, out_dir, progress=progress,
                   meta={"stage": "control", "width_multiple": fit.width_multiple})
    if not is_main_process():  # under torchrun rank 0 alone measures and writes
        return None
    record = evaluate_step(result.best, data_root, params.eval, imgsz, step="control").record
    return {**record, "width_multiple": round(fit.width_multiple, 6), "target_gflops": target_gflops,
            "fits": fit.fits, "epochs": epochs, "checkpoint": str(result.best)}
