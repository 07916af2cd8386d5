"""COCO import: category mapping, crowd handling, every invalid record found, skip mode, atomicity."""

import copy
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools.coco import COCO

from slimloop.config import CocoSource, DataParams
from slimloop.data.canonical import read_split
from slimloop.data.coco_import import import_coco
from slimloop.data.prepare import prepare_dataset
from slimloop.errors import DataError, Problem

CATEGORIES = [{"id": 7, "name": "qr"}, {"id": 3, "name": "ean13"}]


def coco(n_images: int = 2) -> dict:
    """A valid COCO dict: 32x32 images ``img<i>.jpg``, one box per image (the first has two)."""
    images = [{"id": i + 1, "file_name": f"img{i}.jpg", "width": 32, "height": 32} for i in range(n_images)]
    anns = [{"id": i + 1, "image_id": i + 1, "category_id": 7, "bbox": [4, 8, 10, 12], "iscrowd": 0}
            for i in range(n_images)]
    anns.append({"id": 100, "image_id": 1, "category_id": 3, "bbox": [0, 0, 32, 16.5], "iscrowd": 0})
    return {"images": images, "annotations": anns, "categories": copy.deepcopy(CATEGORIES)}


def write_split(root: Path, split: str, data: dict | str) -> tuple[Path, Path]:
    """Write the JSON and every image it names (32x32); return (json, image folder)."""
    folder = root / split
    folder.mkdir(parents=True, exist_ok=True)
    for im in (data.get("images", []) if isinstance(data, dict) else []):
        if isinstance(im, dict) and isinstance(im.get("file_name"), str) and ".." not in im["file_name"]:
            ok, buf = cv2.imencode(".jpg", np.full((32, 32, 3), 100, np.uint8))
            (folder / im["file_name"]).parent.mkdir(parents=True, exist_ok=True)
            (folder / im["file_name"]).write_bytes(buf.tobytes())
    path = root / f"{split}.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    return path, folder


def source(root: Path, train: dict | str, val: dict | None = None) -> CocoSource:
    train_json, train_images = write_split(root, "train", train)
    val_json, val_images = write_split(root, "val", val or coco(1))
    return CocoSource(train_json=str(train_json), train_images=str(train_images),
                      val_json=str(val_json), val_images=str(val_images))


def problems_of(src: CocoSource, out: Path, **kwargs) -> list[Problem]:
    with pytest.raises(DataError) as info:
        import_coco(src, "/", out, **kwargs)
    return info.value.problems


def test_import_maps_sorted_category_ids_and_ignores_crowd(tmp_path):
    data = coco(2)
    data["images"].append({"id": 9, "file_name": "sub dir/ü 3.jpg", "width": 32, "height": 32})
    data["annotations"].append({"id": 5, "image_id": 2, "category_id": 3, "bbox": [0, 0, 5, 5], "iscrowd": 1})
    report = import_coco(source(tmp_path / "src", data), "/", tmp_path / "out")
    assert report["ignored_crowd"] == 1 and report["skipped"] == 0
    train = read_split(tmp_path / "out", "train")
    assert train.names == ["ean13", "qr"]  # id 3 -> class 0, id 7 -> class 1
    first = train.samples[0]
    assert first.labels.tolist() == [1, 0]
    np.testing.assert_allclose(first.boxes, [[4, 8, 14, 20], [0, 0, 32, 16.5]])
    assert [s.file_name for s in train.samples] == ["img0.jpg", "img1.jpg", "ü 3.jpg"]
    assert len(train.samples[1].labels) == 1 and len(train.samples[2].labels) == 0
    gt = COCO(str(tmp_path / "out" / "train.json"))
    assert len(gt.getAnnIds()) == 3 and gt.loadImgs([3])[0]["file_name"] == "ü 3.jpg"


def _edit(fn):
    data = coco(2)
    fn(data)
    return data


CASES = {
    "duplicate image id": (lambda d: d["images"][1].update(id=1), [
        "annotations[1] (id 2): unknown image_id 2",
        "images[0] (id 1): duplicate image id (also images[1])",
        "images[1] (id 1): duplicate image id (also images[0])"]),
    "duplicate annotation id": (lambda d: d["annotations"][1].update(id=1), [
        "annotations[1] (id 1): duplicate annotation id (first at annotations[0])"]),
    "unknown image id": (lambda d: d["annotations"][1].update(image_id=99), [
        "annotations[1] (id 2): unknown image_id 99"]),
    "unknown category id": (lambda d: d["annotations"][1].update(category_id=5), [
        "annotations[1] (id 2): unknown category_id 5"]),
    "bbox not 4 numbers": (lambda d: d["annotations"][1].update(bbox=[1, 2, 3]), [
        "annotations[1] (id 2): bbox must be a list of 4 finite numbers, got [1, 2, 3]"]),
    "bbox non-numeric": (lambda d: d["annotations"][1].update(bbox=[1, "2", 3, 4]), [
        "annotations[1] (id 2): bbox must be a list of 4 finite numbers, got [1, '2', 3, 4]"]),
    "bbox nan": (lambda d: d["annotations"][1].update(bbox=[1, float("nan"), 3, 4]), [
        "annotations[1] (id 2): bbox must be a list of 4 finite numbers, got [1, nan, 3, 4]"]),
    "bbox zero width": (lambda d: d["annotations"][1].update(bbox=[1, 2, 0, 4]), [
        "annotations[1] (id 2): bbox width <= 0"]),
    "bbox negative height": (lambda d: d["annotations"][1].update(bbox=[1, 2, 3, -4]), [
        "annotations[1] (id 2): bbox height <= 0"]),
    "bbox outside image": (lambda d: d["annotations"][1].update(bbox=[20, 2, 13, 4]), [
        "annotations[1] (id 2): bbox outside the 32x32 image (beyond tolerance 0.001)"]),
    "size mismatch": (lambda d: d["images"][1].update(width=64), [
        "images[1] (id 2): width/height 64x32 in the annotations but the image file is 32x32"]),
    "bad size": (lambda d: d["images"][1].update(height="32"), [
        "images[1] (id 2): width and height must be positive integers"]),
    "path escape": (lambda d: d["images"][1].update(file_name="../img1.jpg"), [
        "images[1] (id 2): file_name must be a relative path inside the image folder"]),
    "duplicate file": (lambda d: d["images"][1].update(file_name="img0.jpg"), [
        "images[1] (id 2): duplicate file_name (first at images[0])"]),
    "bad iscrowd": (lambda d: d["annotations"][1].update(iscrowd=2), [
        "annotations[1] (id 2): iscrowd must be 0 or 1, got 2"]),
    "bad image record": (lambda d: d["images"].append({"id": 3}), [
        "images[2]: needs a non-empty string file_name"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_invalid_record_reported_with_file_and_index(tmp_path, case):
    edit, messages = CASES[case]
    src = source(tmp_path / "src", _edit(edit))
    problems = problems_of(src, tmp_path / "out")
    assert [p.message for p in problems] == messages
    assert all(p.file == src.train_json and p.line is None for p in problems)
    assert not (tmp_path / "out").exists()


def test_missing_image_file(tmp_path):
    src = source(tmp_path / "src", coco(2))
    (Path(src.train_images) / "img1.jpg").unlink()
    assert problems_of(src, tmp_path / "out") == [Problem(
        str(Path(src.train_images) / "img1.jpg"), None, f"image not found (images[1] (id 2) in {src.train_json})")]


def test_file_level_problems(tmp_path):
    val = coco(1)
    val["categories"][0]["name"] = "other"
    src = source(tmp_path / "src", '{"images": [\n  {"id": 1 "x": 2}\n]}', val)
    problems = problems_of(src, tmp_path / "out")
    # train unreadable: nothing to compare val's categories against
    assert problems == [Problem(src.train_json, 2, "not valid JSON: Expecting ',' delimiter")]
    src = source(tmp_path / "src2", coco(1), val)
    assert problems_of(src, tmp_path / "out") == [
        Problem(src.val_json, None, f"categories differ from those of {src.train_json}")]
    src = source(tmp_path / "src3", {"images": [], "annotations": [], "categories": []})
    assert [p.message for p in problems_of(src, tmp_path / "out")] == [
        "categories must be a non-empty list", "train: no images", f"categories differ from those of {src.train_json}"]


def test_skip_invalid_drops_images_and_records_and_reports(tmp_path):
    data = coco(3)
    data["annotations"][1]["bbox"] = [1, 2, 0, 4]  # image 2 is bad
    data["annotations"].append({"id": 50, "image_id": 42, "category_id": 3, "bbox": [1, 1, 2, 2]})
    src = source(tmp_path / "src", data)
    params = DataParams(source="coco", coco=src, out_dir="out", skip_invalid=True)
    summary = prepare_dataset(params, tmp_path, progress=False)
    assert (summary["skipped"], summary["dropped"]) == (1, 1)
    assert summary["splits"]["train"]["images"] == 2
    assert [s.file_name for s in read_split(tmp_path / "out", "train").samples] == ["img0.jpg", "img2.jpg"]
    report = json.loads((tmp_path / "out" / "invalid.json").read_text())
    assert report["skipped"] == [{"split": "train", "image": str(Path(src.train_images) / "img1.jpg"), "problems": [
        {"file": src.train_json, "line": None, "message": "annotations[1] (id 2): bbox width <= 0"}]}]
    assert report["dropped"] == [{"file": src.train_json, "line": None,
                                  "message": "annotations[4] (id 50): unknown image_id 42"}]


def test_failed_import_keeps_previous_dataset(tmp_path):
    out = tmp_path / "out"
    import_coco(source(tmp_path / "good", coco(1)), "/", out)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    problems_of(source(tmp_path / "bad", _edit(lambda d: d["annotations"][0].update(category_id=1))), out)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "good", "out"]


def test_test_split_and_relative_paths(tmp_path):
    src = source(tmp_path / "src", coco(1))
    test_json, test_images = write_split(tmp_path / "src", "test", coco(2))
    rel = CocoSource(train_json="src/train.json", train_images="src/train", val_json="src/val.json",
                     val_images="src/val", test_json="src/test.json", test_images="src/test")
    assert src.train_json == str(tmp_path / rel.train_json) and test_json.exists() and test_images.is_dir()
    summary = prepare_dataset(DataParams(source="coco", coco=rel, out_dir="out"), tmp_path, progress=False)
    assert {k: v["images"] for k, v in summary["splits"].items()} == {"train": 1, "val": 1, "test": 2}
    half = CocoSource(**{**rel.model_dump(), "test_images": None})
    with pytest.raises(DataError, match="test_json and test_images must be given together"):
        import_coco(half, tmp_path, tmp_path / "out2")


def test_split_without_annotations_key_is_an_error_and_an_empty_list_a_warning(tmp_path):
    """No ``annotations`` key at all (COCO's image_info files have none) would import every image as
    background: an error. ``"annotations": []`` says so on purpose: imported, with a warning."""
    no_key = {k: v for k, v in coco(2).items() if k != "annotations"}
    src = source(tmp_path / "a", no_key)
    assert problems_of(src, tmp_path / "out") == [Problem(src.train_json, None, (
        'no annotations key: every image would import as background; write "annotations": [] if no image has '
        "any object"))]
    src = source(tmp_path / "b", {**no_key, "annotations": []})
    summary = import_coco(src, "/", tmp_path / "out")
    assert summary["warnings"] == [{"file": src.train_json, "line": None,
                                    "message": "annotations is empty: all 2 images import as background"}]
    assert json.loads((tmp_path / "out" / "invalid.json").read_text())["warnings"] == summary["warnings"]


def test_val_that_is_train_is_refused_unless_allowed(tmp_path):
    train_json, train_images = write_split(tmp_path / "src", "train", coco(2))
    same = CocoSource(train_json=str(train_json), train_images=str(train_images), val_json=str(train_json),
                      val_images=str(train_images))
    (problem,) = problems_of(same, tmp_path / "out")
    assert problem.file == str(train_json) and "val is the same 2 images as train" in problem.message
    assert "data.allow_val_equals_train: true" in problem.message
    summary = import_coco(same, "/", tmp_path / "out", allow_val_equals_train=True)
    assert [w["message"] for w in summary["warnings"]] == [
        "val is the same 2 images as train: validation mAP would measure memorization, not detection of new "
        "images (data.allow_val_equals_train is true)"]
