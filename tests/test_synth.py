"""Synthetic dataset: determinism, boxes that match the drawn codes, canonical output, errors."""

from __future__ import annotations

import json
from pathlib import Path

import barcode
import cv2
import numpy as np
import pytest
from pycocotools.coco import COCO

from slimloop.config import DataParams, SyntheticParams
from slimloop.data import synth
from slimloop.data.canonical import SPLITS, read_split
from slimloop.data.render import SYMBOLOGIES, barcode_payload, find_backgrounds
from slimloop.data.synth import CLASSES, generate_dataset, render_sample, sample_rng
from slimloop.errors import DataError

SMALL = SyntheticParams(image_size=128, train=6, val=3, test=2)


def _data(seed: int = 0, **synthetic: object) -> DataParams:
    return DataParams(seed=seed, synthetic=SMALL.model_copy(update=synthetic))


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "ds"
    generate_dataset(root, _data(0), progress=False, workers=0)
    return root


def test_same_seed_is_byte_identical(dataset: Path, tmp_path: Path) -> None:
    generate_dataset(tmp_path / "again", _data(0), progress=False, workers=0)
    assert _files(tmp_path / "again") == _files(dataset)


def test_different_seed_differs(dataset: Path, tmp_path: Path) -> None:
    generate_dataset(tmp_path / "other", _data(1), progress=False, workers=0)
    for split in SPLITS:
        assert (tmp_path / "other" / f"{split}.json").read_bytes() != (
            dataset / f"{split}.json"
        ).read_bytes()


def test_pool_output_equals_sequential(dataset: Path, tmp_path: Path) -> None:
    generate_dataset(tmp_path / "pool", _data(0), progress=False, workers=2)
    assert _files(tmp_path / "pool") == _files(dataset)


def test_layout_and_coco(dataset: Path) -> None:
    for split in SPLITS:
        coco = COCO(str(dataset / f"{split}.json"))
        count = getattr(SMALL, split)
        assert len(coco.imgs) == count
        assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(CLASSES)
        names = sorted(p.name for p in (dataset / "images" / split).iterdir())
        assert names == [f"{i:06d}.jpg" for i in range(count)]
        for img in coco.imgs.values():
            pixels = cv2.imread(str(dataset / "images" / split / img["file_name"]))
            assert pixels.shape == (128, 128, 3)
    assert not [p for p in dataset.parent.iterdir() if p.name.startswith(".")]  # no temp left


def test_boxes_inside_image_and_not_empty(dataset: Path) -> None:
    total = 0
    for split in SPLITS:
        for s in read_split(dataset, split).samples:
            assert len(s.boxes) <= SMALL.max_codes
            b = s.boxes
            assert np.all(b[:, 0] >= 0) and np.all(b[:, 1] >= 0)
            assert np.all(b[:, 2] <= s.width) and np.all(b[:, 3] <= s.height)
            assert np.all(b[:, 2] - b[:, 0] >= 2) and np.all(b[:, 3] - b[:, 1] >= 2)
            total += len(b)
    assert total > 0


def test_each_image_depends_only_on_seed_split_index(dataset: Path) -> None:
    s = render_sample(sample_rng(0, "val", 2), SMALL)
    ok, buf = cv2.imencode(".jpg", s.image, [cv2.IMWRITE_JPEG_QUALITY, s.jpeg_quality])
    assert ok and buf.tobytes() == (dataset / "images" / "val" / "000002.jpg").read_bytes()
    np.testing.assert_allclose(read_split(dataset, "val").samples[2].boxes, s.boxes)


def test_boxes_equal_the_code_masks() -> None:
    labels = []
    for seed in range(40):
        s = render_sample(seed, SMALL)
        assert s.image.shape == (128, 128, 3) and s.image.dtype == np.uint8
        assert s.masks.shape == (len(s.boxes), 128, 128)
        for box, mask in zip(s.boxes, s.masks, strict=True):
            ys, xs = np.nonzero(mask)
            assert len(xs) > 0
            np.testing.assert_allclose(
                box, [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], atol=1
            )
            x1, y1, x2, y2 = box.astype(int)
            outside = mask.copy()
            outside[y1:y2, x1:x2] = False
            assert not outside.any()
        overlap = s.masks.sum(0) if len(s.masks) else np.zeros(1)
        assert (overlap > 1).sum() <= 0.1 * s.masks.sum()  # codes barely overlap
        labels.extend(s.labels.tolist())
    assert set(labels) == {0, 1}
    assert 0.25 < np.mean(labels) < 0.75


def test_code_sizes_follow_params() -> None:
    params = SyntheticParams(image_size=256, min_size=0.1, max_size=0.3, max_codes=3)
    longest = []
    for seed in range(25):
        s = render_sample(seed, params)
        inside = (s.boxes[:, :2] > 0).all(1) & (s.boxes[:, 2:] < 256).all(1)
        longest.extend((s.boxes[inside, 2:] - s.boxes[inside, :2]).max(1).tolist())
    longest = np.array(longest)
    assert len(longest) > 10
    # a code of longest side L has an axis-aligned box between L / sqrt(2) and L * sqrt(2)
    assert longest.min() >= 0.1 * 256 / np.sqrt(2) * 0.8  # less a mild perspective
    assert longest.max() <= 0.3 * 256 * np.sqrt(2) * 1.15 + 2


def test_no_codes_when_max_codes_is_zero() -> None:
    for seed in range(5):
        s = render_sample(seed, SMALL.model_copy(update={"max_codes": 0}))
        assert s.boxes.shape == (0, 4) and s.labels.shape == (0,) and s.masks.shape == (0, 128, 128)


@pytest.mark.parametrize("name", SYMBOLOGIES)
def test_every_symbology_builds(name: str) -> None:
    rng = np.random.default_rng(0)
    built = 0
    for _ in range(20):
        try:
            bits = barcode.get_barcode_class(name)(barcode_payload(rng, name)).build()[0]
        except barcode.errors.BarcodeError:
            assert name == "pzn"  # a PZN whose check digit would be 10 is invalid by design
            continue
        assert set(bits) <= {"0", "1", "G"} and len(bits) > 20
        built += 1
    assert built >= 15


def test_backgrounds_dir_missing_or_empty(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nowhere"):
        generate_dataset(
            tmp_path / "ds", _data(0, backgrounds_dir=str(tmp_path / "nowhere")), progress=False
        )
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("not an image")
    (tmp_path / "junk" / "fake.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match="junk"):
        find_backgrounds(tmp_path / "junk")
    assert not (tmp_path / "ds").exists()


def test_background_images_are_used(tmp_path: Path) -> None:
    red = np.zeros((60, 90, 3), np.uint8)
    red[..., 2] = 255
    cv2.imwrite(str(tmp_path / "red.png"), red)
    paths = find_backgrounds(tmp_path)
    assert paths == [tmp_path / "red.png"]
    plain = SMALL.model_copy(update={"max_codes": 0, "distractors": 0})
    reds = 0
    for seed in range(10):
        img = render_sample(seed, plain, paths).image.astype(float)
        reds += bool(np.median(img[..., 2]) > 120 and np.median(img[..., 0]) < 40)
    assert 3 <= reds <= 10  # photos for about 70% of images, procedural for the rest


def test_failed_generation_leaves_old_dataset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "ds"
    generate_dataset(root, _data(0, train=2, val=1, test=0), progress=False)
    before = _files(root)
    real = synth.render_sample

    calls: list[int] = []

    def failing(rng: np.random.Generator, *args: object) -> synth.RenderedSample:
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("disk full")
        return real(rng, *args)

    monkeypatch.setattr(synth, "render_sample", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        generate_dataset(root, _data(5), progress=False, workers=0)
    assert _files(root) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]
    assert json.loads((root / "test.json").read_text())["images"] == []
