"""coco_metrics on hand-made ground truth with known AP, and predict() on a stand-in model."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from slimloop.config import EvalParams
from slimloop.data.canonical import Sample, Split, image_dir, to_coco, write_annotations
from slimloop.errors import DataError, SlimloopError
from slimloop.evaluate import coco_metrics, evaluate, predict

NAMES = ["barcode", "qrcode"]
PARAMS = EvalParams()  # op_conf 0.25, op_iou 0.5
COCO_IOUS = np.linspace(0.5, 0.95, 10)
RECALL_POINTS = np.linspace(0, 1, 101)


def gt_dict(boxes_per_image: list[list[list[float]]], labels_per_image: list[list[int]]) -> dict:
    samples = [
        Sample(f"{i}.png", 200, 200, np.array(b, np.float64).reshape(-1, 4), np.array(lab, np.int64))
        for i, (b, lab) in enumerate(zip(boxes_per_image, labels_per_image, strict=True))
    ]
    return to_coco(Split(NAMES, samples))


def det(image_id: int, boxes, scores, labels) -> dict:
    return {
        "image_id": image_id,
        "boxes": np.array(boxes, np.float64).reshape(-1, 4),
        "scores": np.array(scores, np.float64),
        "labels": np.array(labels, np.int64),
    }


def shifted_iou(side: float, dx: float) -> float:
    """IoU of a square and the same square shifted horizontally by dx."""
    return (side - dx) * side / ((side + dx) * side)


GT_BOXES = [[[10, 10, 110, 110], [120, 20, 180, 60]], [[30, 40, 90, 160]]]
GT_LABELS = [[0, 1], [0]]


def test_perfect_predictions_score_one():
    gt = gt_dict(GT_BOXES, GT_LABELS)
    dets = [det(i + 1, b, [0.9] * len(b), lab) for i, (b, lab) in enumerate(zip(GT_BOXES, GT_LABELS, strict=True))]
    m = coco_metrics(gt, dets, NAMES, PARAMS)
    assert set(m) == {"map50", "map", "precision", "recall", "missed", "per_class"}
    assert (m["map"], m["map50"], m["precision"], m["recall"], m["missed"]) == (1.0, 1.0, 1.0, 1.0, 0)
    assert m["per_class"]["barcode"] == {"ap50": 1.0, "ap": 1.0, "precision": 1.0, "recall": 1.0, "missed": 0, "gt": 2}
    assert m["per_class"]["qrcode"]["gt"] == 1


def test_shifted_box_ap_is_fraction_of_thresholds_below_its_iou():
    dx = 15.0
    iou = shifted_iou(100, dx)  # 85 / 115 = 0.739
    gt = gt_dict([[[10, 10, 110, 110]]], [[0]])
    m = coco_metrics(gt, [det(1, [[10 + dx, 10, 110 + dx, 110]], [0.8], [0])], NAMES, PARAMS)
    expected = float(np.mean(COCO_IOUS <= iou))
    assert expected == 0.5
    assert m["map50"] == 1.0
    assert m["map"] == pytest.approx(expected, abs=1e-6)
    assert m["per_class"]["barcode"]["ap"] == pytest.approx(expected, abs=1e-6)
    assert m["precision"] == m["recall"] == 1.0  # 0.739 >= op_iou 0.5


def test_shift_below_operating_iou_is_a_miss_and_a_false_positive():
    dx = 40.0  # IoU 60 / 140 = 0.43 < 0.5
    gt = gt_dict([[[10, 10, 110, 110]]], [[0]])
    m = coco_metrics(gt, [det(1, [[10 + dx, 10, 110 + dx, 110]], [0.8], [0])], NAMES, PARAMS)
    assert shifted_iou(100, dx) < 0.5
    assert (m["map50"], m["map"], m["precision"], m["recall"], m["missed"]) == (0.0, 0.0, 0.0, 0.0, 1)


def test_missing_prediction_counts_as_missed():
    gt = gt_dict([[[10, 10, 60, 60], [100, 100, 180, 170]]], [[0, 0]])
    m = coco_metrics(gt, [det(1, [[10, 10, 60, 60]], [0.9], [0])], NAMES, PARAMS)
    assert m["missed"] == 1
    assert m["recall"] == 0.5
    assert m["precision"] == 1.0
    # precision 1 at every recall point up to 0.5, none found beyond: 51 of 101 points
    assert m["map50"] == pytest.approx(np.mean(RECALL_POINTS <= 0.5), abs=1e-6)
    assert m["per_class"]["barcode"]["missed"] == 1


def test_false_positive_below_operating_conf_is_ignored_at_the_operating_point():
    gt = gt_dict([[[10, 10, 60, 60]]], [[0]])
    good = [[10, 10, 60, 60]]
    far = [[120, 120, 190, 190]]
    low = coco_metrics(gt, [det(1, good + far, [0.9, 0.1], [0, 0])], NAMES, PARAMS)
    assert (low["precision"], low["recall"], low["missed"]) == (1.0, 1.0, 0)
    assert low["map50"] == 1.0  # the FP ranks below the only TP
    high = coco_metrics(gt, [det(1, good + far, [0.9, 0.3], [0, 0])], NAMES, PARAMS)
    assert (high["precision"], high["recall"]) == (0.5, 1.0)


def test_no_detections_gives_zeros_without_crashing():
    gt = gt_dict(GT_BOXES, GT_LABELS)
    for dets in ([], [det(1, [], [], []), det(2, [], [], [])]):
        m = coco_metrics(gt, dets, NAMES, PARAMS)
        assert (m["map50"], m["map"], m["precision"], m["recall"]) == (0.0, 0.0, 0.0, 0.0)
        assert m["missed"] == 3
        assert m["per_class"]["qrcode"] == {"ap50": 0.0, "ap": 0.0, "precision": 0.0, "recall": 0.0, "missed": 1, "gt": 1}
    no_qr = coco_metrics(gt_dict([[[10, 10, 60, 60]]], [[0]]), [], NAMES, PARAMS)
    assert no_qr["per_class"]["qrcode"]["ap"] is None and no_qr["per_class"]["barcode"]["ap"] == 0.0


def test_two_classes_have_their_own_ap():
    dx = 15.0
    gt = gt_dict([[[10, 10, 110, 110], [10, 120, 60, 170]]], [[1, 0]])
    dets = [det(1, [[10 + dx, 10, 110 + dx, 110], [10, 120, 60, 170]], [0.7, 0.9], [1, 0])]
    m = coco_metrics(gt, dets, NAMES, PARAMS)
    qr_ap = float(np.mean(COCO_IOUS <= shifted_iou(100, dx)))
    assert m["per_class"]["barcode"]["ap"] == 1.0
    assert m["per_class"]["qrcode"]["ap"] == pytest.approx(qr_ap, abs=1e-6)
    assert m["per_class"]["qrcode"]["ap50"] == 1.0
    assert m["map"] == pytest.approx((1.0 + qr_ap) / 2, abs=1e-6)


def test_wrong_class_is_a_false_positive_and_a_miss():
    gt = gt_dict([[[10, 10, 110, 110]]], [[0]])
    m = coco_metrics(gt, [det(1, [[10, 10, 110, 110]], [0.9], [1])], NAMES, PARAMS)
    assert (m["precision"], m["recall"], m["missed"]) == (0.0, 0.0, 1)
    assert m["per_class"]["qrcode"]["precision"] == 0.0
    assert m["per_class"]["qrcode"]["ap"] is None  # no qrcode ground truth: undefined


def test_greedy_matching_takes_each_ground_truth_once():
    gt = gt_dict([[[10, 10, 110, 110]]], [[0]])
    dets = [det(1, [[10, 10, 110, 110], [12, 10, 112, 110]], [0.6, 0.9], [0, 0])]
    m = coco_metrics(gt, dets, NAMES, PARAMS)
    assert (m["precision"], m["recall"], m["missed"]) == (0.5, 1.0, 0)


def test_ground_truth_from_file_and_missing_file(tmp_path):
    split = Split(NAMES, [Sample("a.png", 200, 200, np.array([[10.0, 10, 60, 60]]), np.array([1]))])
    path = write_annotations(tmp_path, "val", split)
    m = coco_metrics(path, [det(1, [[10, 10, 60, 60]], [0.5], [1])], NAMES, PARAMS)
    assert m["map"] == 1.0 and m["per_class"]["qrcode"]["gt"] == 1
    with pytest.raises(DataError, match="missing"):
        coco_metrics(tmp_path / "nope.json", [], NAMES, PARAMS)
    with pytest.raises(SlimloopError, match="class names"):
        coco_metrics(path, [], ["only"], PARAMS)


class FixedDecoded(torch.nn.Module):
    """Stand-in detector: the same decoded (B, N, 5 + nc) output for every image."""

    def __init__(self, rows: list[list[float]]):
        super().__init__()
        self.register_buffer("rows", torch.tensor(rows))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rows.expand(x.shape[0], -1, -1)  # (B, N, 5 + nc)


def test_predict_undoes_letterbox_and_feeds_coco_metrics():
    # original 200 x 100 (w x h) letterboxed to 64: ratio 0.32, pad (0, 16)
    metas = [{"image_id": i, "orig_shape": (100, 200), "ratio": 0.32, "pad": (0.0, 16.0)} for i in (1, 2)]
    imgs = torch.zeros(2, 3, 64, 64, dtype=torch.uint8)
    # one barcode centred at (32, 32) of size 32 x 16 in input px, plus a low-score box
    model = FixedDecoded([[32, 32, 32, 16, 0.9, 1.0, 0.0], [10, 40, 8, 8, 0.0005, 1.0, 0.0]])
    dets = predict(model, [(imgs, torch.zeros(0, 6), metas)], "cpu", PARAMS, progress=False)
    assert [d["image_id"] for d in dets] == [1, 2]
    # x: (16 - 0) / 0.32 = 50, (48 - 0) / 0.32 = 150; y: (24 - 16) / 0.32 = 25, (40 - 16) / 0.32 = 75
    np.testing.assert_allclose(dets[0]["boxes"], [[50, 25, 150, 75]], atol=1e-4)
    np.testing.assert_allclose(dets[0]["scores"], [0.9], atol=1e-6)
    assert dets[0]["labels"].tolist() == [0]
    gt = to_coco(Split(NAMES, [Sample(f"{i}.png", 200, 100, np.array([[50.0, 25, 150, 75]]), np.array([0])) for i in (1, 2)]))
    assert coco_metrics(gt, dets, NAMES, PARAMS)["map"] == 1.0


def write_dataset(root, sizes: list[tuple[int, int]], boxes: list[list[float]]) -> None:
    """A canonical 'val' split of blank PNGs (w, h) with one barcode each."""
    folder = image_dir(root, "val")
    folder.mkdir(parents=True)
    samples = []
    for i, ((w, h), box) in enumerate(zip(sizes, boxes, strict=True)):
        cv2.imwrite(str(folder / f"{i}.png"), np.full((h, w, 3), 127, np.uint8))
        samples.append(Sample(f"{i}.png", w, h, np.array([box], np.float64), np.array([0])))
    write_annotations(root, "val", Split(NAMES, samples))


def test_evaluate_end_to_end_on_a_tiny_split(tmp_path):
    # at 64 px both images scale by 0.32; 200x100 pads (0, 16), 100x200 pads (16, 0), so the
    # fixed prediction (16, 24)-(48, 40) in input px lands on these two original boxes
    write_dataset(tmp_path, [(200, 100), (100, 200)], [[50, 25, 150, 75], [0, 75, 100, 125]])
    model = FixedDecoded([[32, 32, 32, 16, 0.9, 1.0, 0.0]]).train()
    m = evaluate(model, tmp_path, "val", 64, PARAMS, batch_size=2, progress=False)
    assert (m["map"], m["map50"], m["precision"], m["recall"], m["missed"]) == (1.0, 1.0, 1.0, 1.0, 0)
    assert m["per_class"]["barcode"]["gt"] == 2
    assert model.training  # mode restored
    with pytest.raises(DataError, match="missing"):
        evaluate(model, tmp_path, "test", 64, PARAMS, progress=False)


def test_pycocotools_prints_nothing_even_when_print_is_replaced(monkeypatch, capsys):
    """Prefect's log_prints replaces builtins.print: pycocotools' progress lines must not reach it."""
    import builtins

    printed = []
    monkeypatch.setattr(builtins, "print", lambda *args, **kwargs: printed.append(args))
    gt = gt_dict(GT_BOXES, GT_LABELS)
    dets = [det(i + 1, b, [0.9] * len(b), lab) for i, (b, lab) in enumerate(zip(GT_BOXES, GT_LABELS, strict=True))]
    assert coco_metrics(gt, dets, NAMES, PARAMS)["map"] == 1.0
    assert printed == []
    assert capsys.readouterr().out == ""
    import pycocotools.cocoeval

    assert "print" not in vars(pycocotools.cocoeval)  # the shadow is removed afterwards
