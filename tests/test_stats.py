"""Dataset statistics and pictures: counts match the JSON, quantiles are right, PNGs are valid."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from slimloop.config import DataParams, SyntheticParams
from slimloop.data.canonical import SPLITS, Sample, Split, write_annotations
from slimloop.data.stats import dataset_stats, plot_box_sizes, plot_samples
from slimloop.data.synth import generate_dataset
from slimloop.errors import DataError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("stats") / "ds"
    synthetic = SyntheticParams(image_size=128, train=8, val=4, test=2)
    generate_dataset(root, DataParams(seed=3, synthetic=synthetic), progress=False, workers=0)
    return root


def test_counts_equal_the_json(dataset: Path) -> None:
    stats = dataset_stats(dataset)
    assert stats["names"] == ["barcode", "qrcode"]
    total_boxes = 0
    for split in SPLITS:
        coco = json.loads((dataset / f"{split}.json").read_text())
        got = stats["splits"][split]
        assert got["images"] == len(coco["images"])
        assert got["boxes"] == len(coco["annotations"])
        with_boxes = {a["image_id"] for a in coco["annotations"]}
        assert got["images_without_boxes"] == len(coco["images"]) - len(with_boxes)
        for cat in coco["categories"]:
            anns = [a for a in coco["annotations"] if a["category_id"] == cat["id"]]
            assert got["per_class"][cat["name"]]["boxes"] == len(anns)
            assert got["per_class"][cat["name"]]["images"] == len({a["image_id"] for a in anns})
        total_boxes += len(coco["annotations"])
    assert stats["images"] == 14 and stats["boxes"] == total_boxes > 0
    json.dumps(stats, allow_nan=False)  # ready for metrics/data.json


def test_size_quantiles_are_consistent(dataset: Path) -> None:
    sizes = dataset_stats(dataset)["splits"]["train"]["box_size"]
    for key in ("side", "w", "h"):
        px = list(sizes["px"][key].values())
        assert px == sorted(px)
        # square 128 px images: the fraction is the pixel size over 128
        np.testing.assert_allclose(list(sizes["frac"][key].values()), np.array(px) / 128, atol=1e-4)
    assert list(sizes["px"]["side"]) == ["q05", "q25", "q50", "q75", "q95"]


def test_known_boxes_give_exact_quantiles(tmp_path: Path) -> None:
    # five boxes of 10x40, 20x20, 30x30, 40x10, 50x50 in 100x200 images; one image without boxes
    boxes = np.array(
        [[0, 0, 10, 40], [0, 0, 20, 20], [5, 5, 35, 35], [0, 0, 40, 10], [0, 0, 50, 50]], float
    )
    samples = [
        Sample("a.jpg", 100, 200, boxes[:3], np.array([0, 0, 1])),
        Sample("b.jpg", 100, 200, boxes[3:], np.array([1, 1])),
        Sample("c.jpg", 100, 200),
    ]
    write_annotations(tmp_path, "train", Split(["barcode", "qrcode"], samples))
    stats = dataset_stats(tmp_path)
    assert set(stats["splits"]) == {"train"}
    train = stats["splits"]["train"]
    assert (train["images"], train["boxes"], train["images_without_boxes"]) == (3, 5, 1)
    assert (
        train["per_class"]["barcode"]["boxes"] == 2 and train["per_class"]["qrcode"]["images"] == 2
    )
    side = train["box_size"]["px"]["side"]  # sides 20, 20, 30, 20, 50
    assert side["q50"] == pytest.approx(20.0) and side["q75"] == pytest.approx(30.0)
    assert side["q95"] == pytest.approx(46.0)  # linear between 30 and 50 at 0.8 of the way
    assert train["box_size"]["frac"]["w"]["q50"] == pytest.approx(30 / 100)
    assert train["box_size"]["frac"]["h"]["q50"] == pytest.approx(30 / 200)
    assert train["box_size"]["aspect"]["q05"] == pytest.approx(0.25 + 0.2 * 0.75)
    assert train["per_class"]["barcode"]["box_size"]["px"]["w"]["q50"] == pytest.approx(15.0)


def test_missing_dataset_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=str(tmp_path.name)):
        dataset_stats(tmp_path)


def _png_shape(path: Path) -> tuple[int, ...]:
    assert path.read_bytes()[:8] == PNG_MAGIC
    img = cv2.imread(str(path))
    assert img is not None
    return img.shape


def test_plots_are_valid_pngs(dataset: Path, tmp_path: Path) -> None:
    grid = plot_samples(dataset, "train", tmp_path / "pics" / "samples.png", n=16, seed=0)
    h, w, _ = _png_shape(grid)
    assert w > 500 and h > 500  # 4x4 grid at 100 dpi
    small = plot_samples(dataset, "test", tmp_path / "test.png", n=4)
    assert _png_shape(small)[1] < w  # 2x2 grid is narrower
    hist = plot_box_sizes(dataset, tmp_path / "sizes.png")
    assert _png_shape(hist)[:2] == (400, 600)
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == [
        "samples.png",
        "sizes.png",
        "test.png",
    ]  # no temp files left
    pyplot = sys.modules.get("matplotlib.pyplot")
    assert pyplot is None or pyplot.get_fignums() == []


def test_plot_samples_is_deterministic(dataset: Path, tmp_path: Path) -> None:
    a = plot_samples(dataset, "train", tmp_path / "a.png", n=2, seed=1).read_bytes()
    b = plot_samples(dataset, "train", tmp_path / "b.png", n=2, seed=1).read_bytes()
    c = plot_samples(dataset, "train", tmp_path / "c.png", n=2, seed=2).read_bytes()
    assert a == b and a != c
