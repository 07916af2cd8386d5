"""The detector: ModelSpec, blocks, build_model, anchors and the YOLOv5 loss."""

from slimloop.model.anchors import best_possible_recall, check_anchors, fit_anchors
from slimloop.model.build import (
    Detector,
    build_model,
    conv_modules,
    conv_widths,
    with_conv_widths,
    yolov5_spec,
)
from slimloop.model.loss import ComputeLoss
from slimloop.model.spec import (
    ModelSpec,
    SpecError,
    spec_from_json,
    spec_from_yaml,
    spec_to_json,
    spec_to_yaml,
)
from slimloop.model.spec_files import load_spec, save_spec

__all__ = [
    "ComputeLoss",
    "Detector",
    "ModelSpec",
    "SpecError",
    "best_possible_recall",
    "build_model",
    "check_anchors",
    "conv_modules",
    "conv_widths",
    "fit_anchors",
    "load_spec",
    "save_spec",
    "spec_from_json",
    "spec_from_yaml",
    "spec_to_json",
    "spec_to_yaml",
    "with_conv_widths",
    "yolov5_spec",
]
