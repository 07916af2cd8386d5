"""INT8: quantized models export, run and evaluate through the runtime; the fp32 ONNX path scores as torch does."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from slimloop.config import EvalParams, QuantParams
from slimloop.deploy.export import export_onnx
from slimloop.deploy.quantize import fp32_nodes, quantize_models
from slimloop.deploy.runtimes import ort_runner
from slimloop.evaluate import evaluate, evaluate_forward, predict
from slimloop.model import build_model

EVAL = EvalParams()
# no max_det cut-off: which of two near-equal scores makes the 300th box is float noise, not a difference
EVERY_BOX = EvalParams(max_det=3000, nms_iou=0.9)


@pytest.fixture(scope="module")
def detector(tiny_spec):
    """A random tiny detector whose head biases are spread around objectness 0.6: hundreds of boxes with
    well-separated scores reach NMS and pycocotools, so the evaluation has something to compare."""
    torch.manual_seed(0)
    model = build_model(tiny_spec).eval()
    with torch.no_grad():
        for conv in model.detect.m:
            bias = conv.bias.view(3, -1)  # (anchors, 5 + nc)
            bias[:, 4:] = torch.randn(bias[:, 4:].shape) * 1.5 + 0.5
    return model


@pytest.fixture(scope="module")
def fp32_onnx(detector, tmp_path_factory):
    return export_onnx(detector, tmp_path_factory.mktemp("int8") / "final.onnx", 128)


def test_fp32_through_onnx_runtime_scores_as_torch(detector, fp32_onnx, tiny_data):
    from slimloop.data.dataset import DetectionDataset, make_loader

    runner = ort_runner(fp32_onnx, 1)
    forward = lambda x: torch.from_numpy(runner.infer(x.numpy()))  # noqa: E731
    ours = evaluate_forward(forward, tiny_data, "val", 128, EVERY_BOX)
    theirs = evaluate(detector, tiny_data, "val", 128, EVERY_BOX, progress=False)
    assert theirs["map50"] > 0 and abs(ours["map"] - theirs["map"]) <= 1e-3
    assert abs(ours["map50"] - theirs["map50"]) <= 1e-3 * max(theirs["map50"], 1e-3) * 100
    assert (ours["recall"], ours["missed"]) == (theirs["recall"], theirs["missed"]) and theirs["recall"] > 0
    loader = make_loader(DetectionDataset(tiny_data, "val", 128), 1, shuffle=False, workers=0, seed=0)
    a = predict(forward, loader, "cpu", EVERY_BOX, progress=False)
    b = predict(detector, loader, "cpu", EVERY_BOX, progress=False)
    for x, y in zip(a, b, strict=True):  # every box in original-image pixels and its score: the same set
        assert len(x["boxes"]) == len(y["boxes"]) > 100
        np.testing.assert_allclose(_sorted(x), _sorted(y), atol=1e-2)


def _sorted(det: dict) -> np.ndarray:
    """Detections as rows (score, label, x1, y1, x2, y2) in a fixed order: equal scores (the letterbox's
    flat border gives neighbouring cells the same output) may come out of NMS in either order."""
    rows = np.column_stack([det["scores"], det["labels"], det["boxes"]]).round(2)  # (n, 6)
    return rows[np.lexsort(rows.T[::-1])]


def test_quantized_models_export_run_and_evaluate(detector, fp32_onnx, tiny_data, tmp_path):
    record = {"imgsz": 128, "map": 0.0, "map50": 0.0, "gflops": 0.1, "params": 1}
    quant = QuantParams(calibration_images=4, worst_layers=3)
    out = quantize_models({"final": (fp32_onnx, record)}, tiny_data, EVAL, quant, ["onnxruntime", "openvino"], tmp_path)
    int8 = tmp_path / "final_int8.onnx"
    proto = onnx.load(str(int8))
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("QuantizeLinear") > 10 and ops.count("DequantizeLinear") > 10
    weights = {i.name: i for i in proto.graph.initializer}
    per_channel = [n for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in weights
                   and len(onnx.numpy_helper.to_array(weights[n.input[1]]).shape) == 1]
    assert per_channel  # per-channel weight scales: one scale per output channel
    decode = set(fp32_nodes(onnx.load(str(fp32_onnx))))
    assert any(n.startswith("/detect/m.") for n in decode) and "/Sigmoid" in decode
    producers = {o: n for n in proto.graph.node for o in n.output}
    for node in proto.graph.node:  # the head's weights and the box decode stay fp32
        if node.op_type == "Conv" and node.name in decode:
            assert node.input[1] in weights  # fp32 weights, no DequantizeLinear in front
        elif node.name in decode:
            assert all(producers.get(i) is None or producers[i].op_type != "DequantizeLinear" for i in node.input)
    entry = out["models"]["final"]
    assert 0 <= entry["int8"]["map"] <= 1 and 0 <= entry["openvino_int8"]["map"] <= 1
    assert entry["int8"]["size_mb"] < fp32_onnx.stat().st_size / 1e6
    assert out["final_drop"] == pytest.approx(entry["fp32"]["map"] - entry["int8"]["map"], abs=1e-6)
    assert len(out["worst_layers"]) == 3 and [w["sqnr_db"] for w in out["worst_layers"]] == sorted(
        w["sqnr_db"] for w in out["worst_layers"])
    index = json.loads((tmp_path / "index.json").read_text())
    assert index["models"]["final_int8"]["file"] == "final_int8.onnx"
    assert (tmp_path / index["runtimes"]["openvino"]["final_int8"]).with_suffix(".bin").exists()
    y = ort_runner(int8, 1).infer(np.zeros((1, 3, 128, 128), np.float32))
    assert y.shape[0] == 1 and np.isfinite(y).all()


def test_percentile_falls_back_to_minmax_on_a_near_constant_tensor(detector, fp32_onnx, tiny_data, tmp_path, caplog,
                                                                   capsys):
    """The untrained detector's decode sigmoid sits at 0.5 within a few float32 steps: ONNX Runtime's
    histogram cannot cut that range into 2048 bins. The model is calibrated with minmax, the warning and
    the record say so, and a method that can bin every tensor is kept as asked. ONNX Runtime's
    calibration chatter on stdout does not reach the stage's output."""
    from slimloop.deploy.quantize import calibration_batches, quantize_ort

    batches = calibration_batches(tiny_data, 128, 2)
    with caplog.at_level("WARNING", logger="slimloop.deploy.quantize"):
        path, method = quantize_ort(fp32_onnx, tmp_path / "p.onnx", batches, QuantParams(calibrate_method="percentile"))
    assert method == "minmax" and path.exists() and "calibrating with minmax instead" in caplog.text
    assert quantize_ort(fp32_onnx, tmp_path / "m.onnx", batches, QuantParams(calibrate_method="minmax"))[1] == "minmax"
    assert "histogram" not in capsys.readouterr().out
    from slimloop.report.inputs import ReportInputs
    from slimloop.report.speed import int8_text

    entry = {"fp32": {"map": 0.6}, "int8": {"map": 0.6, "calibrate_method": "minmax"}}
    q = {"enabled": True, "format": "QDQ", "per_channel": True, "calibrate_method": "percentile",
         "calibration_images": 2, "tolerance": 0.01, "models": {"final": entry}, "final_drop": 0.0,
         "within_tolerance": True, "openvino": None, "worst_layers": []}
    assert "could not bin a near-constant tensor of final" in int8_text(ReportInputs({}, [], {}, None, "", [], None, q))


def test_report_names_the_worst_layers_when_int8_costs_too_much():
    from slimloop.report.inputs import ReportInputs
    from slimloop.report.speed import int8_text

    entry = {"fp32": {"map": 0.60}, "int8": {"map": 0.55}}
    q = {"enabled": True, "format": "QDQ", "per_channel": True, "calibrate_method": "minmax",
         "calibration_images": 64, "tolerance": 0.01, "models": {"baseline": entry, "final": entry},
         "final_drop": 0.05, "within_tolerance": False, "openvino": None,
         "worst_layers": [{"layer": "layers.9.cv1.conv", "sqnr_db": 8.5}, {"layer": "layers.2.cv2.conv", "sqnr_db": 11.0}]}
    inputs = ReportInputs({}, [], {}, None, "", [], None, q)
    text = int8_text(inputs)
    assert "more than `quant.tolerance` 0.01" in text and "`layers.9.cv1.conv` (8.5 dB)" in text
    assert "| final | 0.600 | 0.550 | -0.050 |" in text
    ok = int8_text(ReportInputs({}, [], {}, None, "", [], None, {**q, "final_drop": 0.004, "within_tolerance": True}))
    assert "within `quant.tolerance`" in ok and "layers.9" not in ok
