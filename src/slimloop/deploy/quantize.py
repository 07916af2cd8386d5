"""INT8: static post-training quantization (ONNX Runtime QDQ, OpenVINO's NNCF), evaluated through the
runtime, and the per-layer output error against fp32 that says where INT8 loses."""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from slimloop.config import QuantParams
from slimloop.deploy.export import INPUT_NAME
from slimloop.deploy.sigstack import preserve_signal_stack
from slimloop.errors import SlimloopError
from slimloop.io import atomic_path

log = logging.getLogger(__name__)
DETECT_PREFIX = "/detect/"  # torch.onnx names the head's convolutions /detect/m.<i>/Conv


def calibration_batches(root: str | Path, imgsz: int, count: int) -> list[np.ndarray]:
    """The first ``count`` training images, letterboxed as evaluation does (slimloop's own dataset code).

    Returns:
        ``(1, 3, imgsz, imgsz)`` float32 arrays in [0, 1].
    """
    from slimloop.data.dataset import DetectionDataset

    dataset = DetectionDataset(root, "train", imgsz, augment=None)
    return [(dataset[i][0].float() / 255).unsqueeze(0).numpy() for i in range(min(count, len(dataset)))]


class BatchReader:
    """An ONNX Runtime ``CalibrationDataReader`` over prepared batches (it may be rewound)."""

    def __init__(self, batches: list[np.ndarray], input_name: str = INPUT_NAME):
        self.batches, self.input_name, self._it = batches, input_name, iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._it, None)
        return None if batch is None else {self.input_name: batch}

    def rewind(self) -> None:
        self._it = iter(self.batches)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return ({self.input_name: b} for b in self.batches)


def decode_nodes(proto: onnx.ModelProto) -> list[str]:
    """Nodes after the head's convolutions: the box decode (sigmoid, grid, anchors, concat).

    They stay fp32: one int8 scale for a tensor holding both pixel coordinates and probabilities
    would wipe out the probabilities.
    """
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in proto.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    frontier = [out for n in proto.graph.node if n.op_type == "Conv" and n.name.startswith(DETECT_PREFIX)
                for out in n.output]
    seen: dict[str, None] = {}
    while frontier:
        for node in consumers.get(frontier.pop(), []):
            if node.name not in seen:
                seen[node.name] = None
                frontier.extend(node.output)
    return list(seen)


def fp32_nodes(proto: onnx.ModelProto) -> list[str]:
    """Nodes INT8 leaves in fp32: the head's 1x1 convolutions (their outputs mix box offsets and class
    logits in one tensor, cheap to keep exact) and the decode after them (:func:`decode_nodes`)."""
    heads = [n.name for n in proto.graph.node if n.op_type == "Conv" and n.name.startswith(DETECT_PREFIX)]
    return heads + decode_nodes(proto)


def quantize_ort(fp32: Path, out: Path, batches: list[np.ndarray], quant: QuantParams) -> tuple[Path, str]:
    """ONNX Runtime static quantization: QDQ, int8 weights (per channel if ``quant.per_channel``),
    ``quant.activation_type`` activations calibrated on ``batches``; the head and decode stay fp32 (:func:`fp32_nodes`).

    ONNX Runtime's histogram calibrators (percentile, entropy) fail on a tensor whose values span less
    than 2048 float32 steps (numpy cannot cut it into 2048 bins); an untrained or heavily pruned model
    has such near-constant tensors. Then the model is calibrated with minmax instead, with a warning.

    Returns:
        the INT8 file and the calibration method that made it.
    """
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    method = quant.calibrate_method
    with tempfile.TemporaryDirectory() as tmp, atomic_path(out, suffix=".onnx") as dest:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=False)
        exclude = fp32_nodes(onnx.load(str(prepared)))

        def run(how: str) -> None:
            chatter = io.StringIO()  # ONNX Runtime's calibrators print their progress to stdout
            with contextlib.redirect_stdout(chatter):
                quantize_static(str(prepared), str(dest), BatchReader(batches), quant_format=QuantFormat.QDQ,
                                per_channel=quant.per_channel,
                                activation_type=QuantType.QUInt8 if quant.activation_type == "uint8"
                                else QuantType.QInt8,
                                weight_type=QuantType.QInt8, nodes_to_exclude=exclude,
                                calibrate_method=methods[how],
                                extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})
            log.debug("%s", chatter.getvalue())

        try:
            run(method)
        except ValueError as exc:
            if method == "minmax" or "bins" not in str(exc):
                raise
            log.warning("%s: %s calibration failed (%s); calibrating with minmax instead", fp32, method, exc)
            method = "minmax"
            run(method)
    return Path(out), method


def quantize_openvino(fp32: Path, out_xml: Path, batches: list[np.ndarray], quant: QuantParams) -> Path:
    """OpenVINO's own post-training quantization (NNCF) of the fp32 ONNX file into an IR (``.xml`` + ``.bin``).

    NNCF's telemetry is switched off (``NNCF_CI``) unless the user set it: nothing leaves the machine.

    Raises:
        SlimloopError: openvino or nncf is not installed.
    """
    os.environ.setdefault("NNCF_CI", "1")  # read by nncf at import: no telemetry (it defaults to sending)
    try:
        import nncf
        import openvino as ov
    except ImportError as exc:
        raise SlimloopError(f"OpenVINO INT8 needs the openvino and nncf packages: {exc}") from None
    nncf.set_log_level(logging.WARNING)  # otherwise one INFO line per node it leaves alone
    model = ov.Core().read_model(str(fp32))
    ignored = nncf.IgnoredScope(names=fp32_nodes(onnx.load(str(fp32))), validate=False)
    with preserve_signal_stack():  # NNCF compiles the model on OpenVINO CPU to calibrate
        quantized = nncf.quantize(model, nncf.Dataset(batches), subset_size=len(batches),
                                  ignored_scope=ignored, preset=nncf.QuantizationPreset.MIXED)
    out_xml = Path(out_xml)
    out_xml.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_xml.parent) as tmp:  # the .xml names its .bin by stem
        ov.save_model(quantized, str(Path(tmp) / out_xml.name), compress_to_fp16=False)
        os.replace(Path(tmp) / out_xml.with_suffix(".bin").name, out_xml.with_suffix(".bin"))
        os.replace(Path(tmp) / out_xml.name, out_xml)  # last: an .xml present means its .bin is too
    return out_xml


def _with_outputs(proto: onnx.ModelProto, names: list[str]) -> bytes:
    """The model serialized with ``names`` added as float graph outputs."""
    proto = onnx.ModelProto.FromString(proto.SerializeToString())
    existing = {o.name for o in proto.graph.output}
    proto.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None)
                              for n in names if n not in existing)
    return proto.SerializeToString()


def _outputs(model: bytes, names: list[str], batches: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every tensor as named
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"])
    return [dict(zip(names, sess.run(names, {INPUT_NAME: b}), strict=True)) for b in batches]


def layer_errors(fp32: Path, int8: Path, batches: list[np.ndarray]) -> list[dict[str, Any]]:
    """Each convolution's output in the INT8 model against the fp32 model's, on ``batches``.

    The fp32 file is preprocessed as :func:`quantize_ort` does, so tensor names match the QDQ model's.

    Returns:
        ``{"layer", "tensor", "sqnr_db"}`` per convolution (signal-to-quantization-noise ratio over all
        batches: 10 log10(sum fp32^2 / sum (fp32 - int8)^2); lower loses more), worst first.
    """
    from onnxruntime.quantization import quant_pre_process

    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=False)
        ref = onnx.load(str(prepared))
    convs = {n.output[0]: n.name for n in ref.graph.node if n.op_type == "Conv"}
    qdq = onnx.load(str(int8))
    present = {o for n in qdq.graph.node for o in n.output}
    names = [t for t in convs if t in present]
    if not names:
        raise SlimloopError(f"{int8}: none of the fp32 model's convolution outputs is in the INT8 model")
    a, b = _outputs(_with_outputs(ref, names), names, batches), _outputs(_with_outputs(qdq, names), names, batches)
    rows = []
    for name in names:
        signal = sum(float(np.square(x[name].astype(np.float64)).sum()) for x in a)
        noise = sum(float(np.square(x[name].astype(np.float64) - y[name]).sum()) for x, y in zip(a, b, strict=True))
        sqnr = math.inf if noise == 0 else 10 * math.log10(max(signal, 1e-30) / noise)
        layer = convs[name].strip("/").removesuffix("/Conv").replace("/", ".")
        rows.append({"layer": layer, "tensor": name, "sqnr_db": round(sqnr, 3) if math.isfinite(sqnr) else None})
    return sorted(rows, key=lambda r: math.inf if r["sqnr_db"] is None else r["sqnr_db"])


def _map_through(runtime: str, path: Path, data_root: Path, imgsz: int, eval_params) -> dict[str, Any]:
    """mAP of a model file run by ``runtime`` (batch 1), with slimloop's letterbox, NMS and pycocotools."""
    import torch

    from slimloop.deploy.runtimes import load_runner
    from slimloop.evaluate import evaluate_forward

    runner = load_runner(runtime, path, None)
    metrics = evaluate_forward(lambda x: torch.from_numpy(runner.infer(x.numpy())), data_root, "val", imgsz, eval_params)
    return {k: metrics[k] for k in ("map50", "map", "precision", "recall", "missed")}


def quantize_models(models: dict[str, tuple[Path, dict[str, Any]]], data_root: Path, eval_params, quant: QuantParams,
                    runtimes: list[str], out_dir: Path) -> dict[str, Any]:
    """Quantize each fp32 model, evaluate fp32 and INT8 through the runtime, and measure the per-layer error.

    Args:
        models: name -> (batch-1 fp32 ONNX file, its torch metric record: ``imgsz``, ``map``, ``gflops``...).
        data_root: the canonical dataset (train images calibrate, val evaluates).
        eval_params: NMS and operating point.
        quant: the quant section.
        runtimes: the runtimes measured (``openvino`` among them: NNCF's INT8 too).
        out_dir: where ``<name>_int8.onnx`` (and ``<name>_int8_openvino.xml``) and ``index.json`` go.

    Returns:
        ``metrics/int8.json``: settings, per model ``fp32`` (through ONNX Runtime), ``torch`` mAP, ``int8``
        (mAP, size, GFLOPs), ``openvino_int8``; ``final_drop``, ``within_tolerance``, ``worst_layers``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    entries, index, openvino = {}, {"stage": "quantize", "models": {}, "runtimes": {}}, "openvino" in runtimes
    layers: list[dict[str, Any]] = []
    for name, (fp32, record) in models.items():
        imgsz = int(record["imgsz"])
        batches = calibration_batches(data_root, imgsz, quant.calibration_images)
        int8, method = quantize_ort(fp32, out_dir / f"{name}_int8.onnx", batches, quant)
        index["models"][f"{name}_int8"] = {"file": int8.name, "imgsz": imgsz}
        entry = {"fp32": _map_through("onnxruntime", fp32, data_root, imgsz, eval_params),
                 "torch": {k: record.get(k) for k in ("map50", "map")},
                 "int8": {**_map_through("onnxruntime", int8, data_root, imgsz, eval_params), "imgsz": imgsz,
                          "size_mb": round(int8.stat().st_size / 1e6, 6), "gflops": record.get("gflops"),
                          "calibrate_method": method,
                          "params": record.get("params")}}
        if openvino:
            xml = quantize_openvino(fp32, out_dir / f"{name}_int8_openvino.xml", batches, quant)
            index["runtimes"].setdefault("openvino", {})[f"{name}_int8"] = xml.name
            entry["openvino_int8"] = _map_through("openvino", xml, data_root, imgsz, eval_params)
        if name == "final":
            layers = layer_errors(fp32, int8, batches)
        entries[name] = entry
    from slimloop.io import write_json_atomic

    write_json_atomic(out_dir / "index.json", index)
    drop = entries["final"]["fp32"]["map"] - entries["final"]["int8"]["map"] if "final" in entries else None
    return {"enabled": True, "format": "QDQ", "per_channel": quant.per_channel, "calibrate_method": quant.calibrate_method,
            "activation_type": quant.activation_type,
            "calibration_images": quant.calibration_images, "tolerance": quant.tolerance, "models": entries,
            "final_drop": None if drop is None else round(drop, 6),
            "within_tolerance": None if drop is None else drop <= quant.tolerance + 1e-9,
            "worst_layers": layers[: quant.worst_layers], "layers": layers,
            "openvino": {"note": "NNCF post-training quantization (mixed preset) of the same fp32 ONNX file, "
                                 "evaluated and measured on OpenVINO CPU"} if openvino else None}
