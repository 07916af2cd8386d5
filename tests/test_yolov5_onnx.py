"""The model handed back in YOLOv5's ONNX layout: yolov5's DetectMultiBackend reads it (names, stride),
and its output, through slimloop's NMS and through yolov5's, gives slimloop's own detections."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from tests.yolov5_models import make_model, save_like_train_py, yolov5_yaml

from slimloop.config import EvalParams
from slimloop.data.dataset import DetectionDataset, make_loader
from slimloop.deploy.export import ort_session
from slimloop.deploy.yolov5_onnx import export_yolov5_onnx
from slimloop.evaluate import predict
from slimloop.model.yolov5_import import import_yolov5
from slimloop.postprocess import non_max_suppression, scale_boxes_to_original

NAMES = ("barcode", "qrcode")
OP = EvalParams(conf_thres=0.25, nms_iou=0.45, max_det=1000)  # detect.py's defaults


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """An imported yolov5n (eighth width, spread head biases) and its YOLOv5-layout ONNX at 128 px."""
    tmp = tmp_path_factory.mktemp("y5onnx")
    path = save_like_train_py(tmp / "best.pt", make_model(yolov5_yaml("yolov5n", width_multiple=0.125), names=NAMES))
    model = import_yolov5(path, names=NAMES).model
    return model, export_yolov5_onnx(model, tmp / "model_yolov5.onnx", 128)


@pytest.fixture(scope="module")
def noisy_data(tiny_data, tmp_path_factory):
    """The tiny dataset with noise on every val image: flat backgrounds make many boxes score exactly
    alike, and NMS breaks such ties by float noise (ORT's and torch's differ)."""
    import shutil

    import cv2

    root = tmp_path_factory.mktemp("noisy") / "data"
    shutil.copytree(tiny_data, root)
    rng = np.random.default_rng(0)
    for image in sorted((root / "images" / "val").iterdir()):
        pixels = cv2.imread(str(image)).astype(np.int16)
        pixels += rng.integers(-25, 26, size=pixels.shape, dtype=np.int16)
        cv2.imwrite(str(image), np.clip(pixels, 0, 255).astype(np.uint8))
    return root


def _batches(root):
    return make_loader(DetectionDataset(root, "val", 128, augment=None), 1, shuffle=False, workers=0, seed=0)


def _rows(det: dict | torch.Tensor) -> np.ndarray:
    """``(n, 6)`` rows x1 y1 x2 y2 score class."""
    if isinstance(det, torch.Tensor):
        return det.numpy()
    return np.column_stack([det["boxes"], det["scores"], det["labels"]])


def _unmatched(a: np.ndarray, b: np.ndarray, atol: float = 1e-3) -> list[np.ndarray]:
    """Rows of ``a`` with no equal row (within ``atol``) left in ``b``: detections compared as sets,
    since two boxes whose scores differ in the 6th digit may come out in either order."""
    free = list(range(len(b)))
    missing = []
    for row in a:
        j = next((j for j in free if np.allclose(row, b[j], atol=atol)), None)
        if j is None:
            missing.append(row)
        else:
            free.remove(j)
    return missing


def test_layout_and_metadata_are_yolov5s(exported):
    model, path = exported
    proto = onnx.load(str(path))
    assert [i.name for i in proto.graph.input] == ["images"] and [o.name for o in proto.graph.output] == ["output0"]
    dims = [d.dim_value for d in proto.graph.output[0].type.tensor_type.shape.dim]
    assert dims == [1, 3 * (16 * 16 + 8 * 8 + 4 * 4), 5 + 2]
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta == {"stride": "32", "names": "{0: 'barcode', 1: 'qrcode'}"}
    x = torch.rand(1, 3, 128, 128)
    got = ort_session(path).run(["output0"], {"images": x.numpy()})[0]
    with torch.no_grad():
        assert np.allclose(got, model.eval()(x).numpy(), atol=1e-3)


def test_onnx_output_gives_slimloops_detections(exported, noisy_data):
    """ORT on the letterboxed images + slimloop's NMS == slimloop's predict on the same images."""
    model, path = exported
    session = ort_session(path)
    via_onnx = []
    for imgs, _, metas in _batches(noisy_data):
        pred = torch.from_numpy(session.run(["output0"], {"images": imgs.float().numpy() / 255})[0])
        det = non_max_suppression(pred, OP.conf_thres, OP.nms_iou, OP.max_det)[0]
        via_onnx.append({"boxes": scale_boxes_to_original(det[:, :4], metas[0]).numpy(),
                         "scores": det[:, 4].numpy(), "labels": det[:, 5].long().numpy()})
    ours = predict(model.eval(), _batches(noisy_data), "cpu", OP, progress=False)
    assert sum(len(d["scores"]) for d in ours) > 0
    for a, b in zip(via_onnx, ours, strict=True):
        assert len(a["scores"]) == len(b["scores"]) and not _unmatched(_rows(a), _rows(b))


def test_yolov5_detect_py_backend_runs_it(exported, noisy_data, monkeypatch):
    """What `detect.py --weights model_yolov5.onnx` does: DetectMultiBackend, then yolov5's own NMS."""
    import yolov5.models.common as common

    # the pip package's fork first asks the Hugging Face hub for any weights name (upstream
    # ultralytics/yolov5 v7 does not); a local file needs no hub, and tests run offline
    import yolov5.utils.downloads as downloads
    from yolov5.utils.general import non_max_suppression as yolov5_nms

    for module in (common, downloads):
        monkeypatch.setattr(module, "attempt_download_from_hub", lambda *a, **k: None)
    model, path = exported
    backend = common.DetectMultiBackend(str(path), device=torch.device("cpu"))
    assert backend.names == {0: "barcode", 1: "qrcode"} and backend.stride == 32
    found = 0
    for imgs, _, _ in _batches(noisy_data):
        x = imgs.float() / 255  # (1, 3, 128, 128) RGB in [0, 1], as detect.py feeds it
        theirs = yolov5_nms(backend(x), OP.conf_thres, OP.nms_iou, max_det=OP.max_det)[0]
        with torch.no_grad():
            ours = non_max_suppression(model.eval()(x), OP.conf_thres, OP.nms_iou, OP.max_det)[0]
        assert theirs.shape == ours.shape and not _unmatched(_rows(theirs), _rows(ours))
        found += len(theirs)
    assert found > 0
