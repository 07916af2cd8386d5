"""The model handed back in YOLOv5's export layout: an ONNX that yolov5's detect.py and post-processing run.

yolov5/export.py writes one input ``images (1, 3, H, W)`` (RGB, float in [0, 1]) and one output
``output0 (1, N, 5 + nc)``: ``cx, cy, w, h`` in input pixels, objectness, class scores (both after
the sigmoid), the levels P3, P4, P5 one after another, each ordered (anchor, y, x); and metadata
``stride`` (the largest) and ``names`` (``{index: name}``), which ``DetectMultiBackend`` reads.
A slimloop ``Detector``'s eval output already has that layout; this file fixes the batch to 1 and
adds the metadata.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import torch

from slimloop.deploy.export import INPUT_NAME, OUTPUT_NAME, export_onnx
from slimloop.errors import SlimloopError
from slimloop.io import atomic_path

FILE_NAME = "model_yolov5.onnx"


def yolov5_metadata(model: torch.nn.Module) -> dict[str, str]:
    """``stride`` and ``names`` as yolov5/export.py writes them (``str`` of an int and of a dict)."""
    stride = int(max(model.detect.stride.tolist()))
    return {"stride": str(stride), "names": str(dict(enumerate(model.spec.detect.names)))}


def _output_dims(proto: onnx.ModelProto) -> list[int | str]:
    (out,) = [o for o in proto.graph.output if o.name == OUTPUT_NAME]
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in out.type.tensor_type.shape.dim]


def export_yolov5_onnx(model: torch.nn.Module, path: str | Path, imgsz: int, opset: int = 17) -> Path:
    """Export ``model`` (a slimloop ``Detector``) in yolov5/export.py's ONNX layout, atomically.

    Args:
        model: the detector (not modified).
        path: destination, e.g. ``models/compressed/model_yolov5.onnx``.
        imgsz: square input size (yolov5's ``detect.py --imgsz`` must match).
        opset: ONNX opset (yolov5 v7's export default is 17 too).

    Returns:
        ``path``.

    Raises:
        SlimloopError: the graph is invalid or its output is not ``(1, N, 5 + nc)``.
    """
    path = Path(path)
    nc = model.spec.detect.nc
    n = sum(len(a) * (imgsz // s) ** 2 for a, s in zip(model.spec.detect.anchors, model.spec.detect.strides, strict=True))
    with atomic_path(path, suffix=".onnx") as tmp:
        export_onnx(model, tmp, imgsz, dynamic_batch=False, opset=opset)
        proto = onnx.load(str(tmp))
        dims = _output_dims(proto)
        if dims != [1, n, 5 + nc] or [i.name for i in proto.graph.input] != [INPUT_NAME]:
            raise SlimloopError(f"{path}: output {OUTPUT_NAME} is {dims}, not yolov5's (1, {n}, {5 + nc})")
        del proto.metadata_props[:]
        for key, value in yolov5_metadata(model).items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.save(proto, str(tmp))
        onnx.checker.check_model(str(tmp), full_check=True)
    return path
