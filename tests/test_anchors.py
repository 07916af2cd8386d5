"""Autoanchor: recall metric, k-means plus evolution on barcode-like boxes, spec update."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slimloop.errors import DataError
from slimloop.model import build_model, check_anchors, fit_anchors, yolov5_spec
from slimloop.model.anchors import anchor_fitness, best_possible_recall
from slimloop.model.build import COCO_ANCHORS


def barcode_wh(n: int = 300, seed: int = 0) -> np.ndarray:
    """Long thin boxes: long side 16..96 px, aspect 4:1..8:1, a third of them vertical."""
    rng = np.random.default_rng(seed)
    long_side = rng.uniform(16, 96, n)
    wh = np.stack([long_side, long_side / rng.uniform(4, 8, n)], 1)
    vertical = rng.random(n) < 1 / 3
    wh[vertical] = wh[vertical][:, ::-1]
    return wh


def test_recall_and_fitness_by_hand():
    anchors = np.array([[10.0, 10.0]])
    wh = np.array([[10.0, 10.0], [41.0, 10.0], [39.0, 10.0]])  # ratio 1, 4.1 (out), 3.9 (in)
    assert best_possible_recall(anchors, wh, thr=4.0) == pytest.approx(2 / 3)
    assert anchor_fitness(anchors, wh, thr=4.0) == pytest.approx((1 + 10 / 39) / 3)
    assert best_possible_recall(anchors, torch.tensor(wh), thr=5.0) == 1.0


def test_fitted_anchors_recall_thin_boxes_better_than_coco():
    wh = barcode_wh()
    before = best_possible_recall(np.array(COCO_ANCHORS), wh)
    anchors, bpr = fit_anchors(wh, n=9, imgsz=256, seed=0)
    assert before < 0.97
    assert bpr >= 0.99 and bpr > before
    assert anchors.shape == (3, 3, 2)
    area = anchors.prod(-1).reshape(-1)
    assert (np.diff(area) >= 0).all()  # P3 gets the smallest
    aspect = np.maximum(anchors[..., 0] / anchors[..., 1], anchors[..., 1] / anchors[..., 0])
    assert aspect.max() > 3  # the fit follows the elongated shapes
    again, bpr_again = fit_anchors(wh, n=9, imgsz=256, seed=0)
    np.testing.assert_array_equal(again, anchors)
    assert bpr_again == bpr


def test_kmeans_finds_clusters_without_evolution():
    rng = np.random.default_rng(3)
    centres = np.array([[8, 4], [16, 4], [24, 6], [40, 8], [48, 12], [64, 10], [90, 20], [120, 30], [160, 24]])
    wh = np.concatenate([c * rng.uniform(0.97, 1.03, (40, 2)) for c in centres])
    anchors, bpr = fit_anchors(wh, n=9, gen=0, seed=1)
    got = anchors.reshape(-1, 2)
    order = np.argsort(centres.prod(1))
    np.testing.assert_allclose(got, centres[order], rtol=0.03)
    assert bpr == 1.0


def test_check_anchors_replaces_only_when_recall_is_low():
    spec = yolov5_spec("n", nc=1, width_multiple=0.125)
    new, before, after = check_anchors(spec, barcode_wh(), thr=4.0)
    assert before < 0.98 and after > before
    assert new.layers == spec.layers and new.detect.names == spec.detect.names
    assert new.detect.anchors != spec.detect.anchors
    assert after == pytest.approx(best_possible_recall(np.array(new.detect.anchors), barcode_wh()))
    model = build_model(new)
    np.testing.assert_allclose(model.detect.anchors.numpy(), np.array(new.detect.anchors), rtol=1e-6)
    coco_like = np.array(COCO_ANCHORS).reshape(-1, 2) * 1.1
    same, before, after = check_anchors(spec, coco_like)
    assert same is spec and before == after == 1.0


def test_few_boxes_and_no_boxes():
    anchors, bpr = fit_anchors(np.array([[30.0, 5.0], [60.0, 9.0]]), n=9, imgsz=128, gen=50)
    assert anchors.shape == (3, 3, 2) and 0 <= bpr <= 1 and (anchors >= 2.0).all()
    with pytest.raises(DataError, match="no boxes"):
        fit_anchors(np.zeros((0, 2)))
    with pytest.raises(ValueError, match="levels"):
        fit_anchors(barcode_wh(), n=8)
