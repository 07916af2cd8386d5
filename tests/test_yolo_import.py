"""YOLO import: every invalid case is found with file and line; skip mode; atomicity; round trips."""

import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from slimloop.config import DataParams
from slimloop.data.canonical import Sample, Split, read_split, write_annotations
from slimloop.data.prepare import prepare_dataset
from slimloop.data.validate import _pil_error
from slimloop.data.yolo import export_yolo, import_yolo, label_path_for
from slimloop.errors import DataError, Problem

GOOD = "0 0.5 0.5 0.25 0.5\n"


def write_image(path: Path, img: np.ndarray | None = None, ext: str = ".jpg") -> bytes:
    """Encode ``img`` (default a 32x32 grey square) and write it; return the bytes."""
    img = np.full((32, 32, 3), 128, np.uint8) if img is None else img
    ok, buf = cv2.imencode(ext, img)
    assert ok
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.tobytes())
    return buf.tobytes()


def make_dataset(root: Path, train: dict, val: dict | None = None, yaml_text: str | None = None) -> Path:
    """A YOLO dataset: ``{file_name: label_text or None}`` per split; returns data.yaml."""
    for split, files in (("train", train), ("val", val or {"v.jpg": GOOD})):
        for name, labels in files.items():
            write_image(root / "images" / split / name)
            if labels is not None:
                label = root / "labels" / split / Path(name).with_suffix(".txt")
                label.parent.mkdir(parents=True, exist_ok=True)
                label.write_text(labels, encoding="utf-8")
    data_yaml = root / "data.yaml"
    data_yaml.write_text(yaml_text or "train: images/train\nval: images/val\nnames: [code, qr]\n")
    return data_yaml


def problems_of(data_yaml: Path, out: Path, **kwargs) -> list[Problem]:
    with pytest.raises(DataError) as info:
        import_yolo(data_yaml, out, **kwargs)
    return info.value.problems


def test_import_converts_boxes_and_keeps_names(tmp_path):
    data_yaml = make_dataset(tmp_path / "src", {"a b é.jpg": GOOD + "1 0.25 0.25 0.5 0.5\n", "bg.jpg": None})
    out = tmp_path / "out"
    report = import_yolo(data_yaml, out)
    assert report["skipped"] == 0 and report["missing_labels"] == 1
    train = read_split(out, "train")
    assert train.names == ["code", "qr"]
    assert [s.file_name for s in train.samples] == ["a b é.jpg", "bg.jpg"]
    sample = train.samples[0]
    assert (sample.width, sample.height) == (32, 32)
    np.testing.assert_allclose(sample.boxes, [[12, 8, 20, 24], [0, 0, 16, 16]])
    assert sample.labels.tolist() == [0, 1]
    assert len(train.samples[1].labels) == 0
    assert (out / "images" / "train" / "a b é.jpg").read_bytes() == (
        tmp_path / "src" / "images" / "train" / "a b é.jpg").read_bytes()
    coco = COCO(str(out / "train.json"))
    assert len(coco.getAnnIds()) == 2 and coco.loadCats([2])[0]["name"] == "qr"


@pytest.mark.parametrize(("line", "message"), [
    ("0 0.5 0.5 0.2", "expected 5 fields 'class cx cy w h', got 4"),
    ("0 0.5 0.5 0.2 0.2 0.3 0.3", "expected 5 fields 'class cx cy w h', got 7 (segmentation polygons are not supported)"),
    ("0 0.5 abc 0.2 0.2", "cy 'abc' is not a number"),
    ("0 nan 0.5 0.2 0.2", "cx 'nan' is not finite"),
    ("0 0.5 0.5 inf 0.2", "w 'inf' is not finite"),
    ("2 0.5 0.5 0.2 0.2", "class 2 out of range 0..1"),
    ("-1 0.5 0.5 0.2 0.2", "class -1 out of range 0..1"),
    ("1.5 0.5 0.5 0.2 0.2", "class '1.5' is not an integer"),
    ("0 1.2 0.5 0.1 0.1", "cx 1.2 outside [0, 1]"),
    ("0 0.5 0.5 1.5 0.1", "w 1.5 outside [0, 1]"),
    ("0 0.5 0.5 0 0.2", "w 0 is zero or negative"),
    ("0 0.5 0.5 0.2 -0.1", "h -0.1 is zero or negative"),
    ("0 0.05 0.5 0.2 0.2", "box x -0.05..0.15, y 0.4..0.6 extends outside [0, 1] beyond tolerance 0.001"),
])
def test_bad_label_line_reported_with_file_and_line(tmp_path, line, message):
    data_yaml = make_dataset(tmp_path / "src", {"a.jpg": f"{GOOD}\n{line}\n"})
    problems = problems_of(data_yaml, tmp_path / "out")
    label = tmp_path / "src" / "labels" / "train" / "a.txt"
    assert problems == [Problem(str(label), 3, message)]
    assert not (tmp_path / "out").exists()


def test_overshoot_within_tolerance_is_clipped(tmp_path):
    data_yaml = make_dataset(tmp_path / "src", {"a.jpg": "0 0.0995 0.5 0.2 0.2\n1.0 0.5 0.9005 0.2 0.2\n"})
    import_yolo(data_yaml, tmp_path / "out")
    sample = read_split(tmp_path / "out", "train").samples[0]
    np.testing.assert_allclose(sample.boxes, [[0, 12.8, 0.1995 * 32, 19.2], [12.8, 0.8005 * 32, 19.2, 32]])
    assert sample.labels.tolist() == [0, 1]


def test_label_file_not_utf8(tmp_path):
    data_yaml = make_dataset(tmp_path / "src", {"a.jpg": None})
    label = tmp_path / "src" / "labels" / "train" / "a.txt"
    label.parent.mkdir(parents=True, exist_ok=True)
    label.write_bytes(GOOD.encode() + b"0 0.5 \xff\n")
    assert problems_of(data_yaml, tmp_path / "out") == [Problem(str(label), 2, "not UTF-8 text")]


def test_corrupt_images_are_found(tmp_path):
    data_yaml = make_dataset(tmp_path / "src", {"a.jpg": GOOD, "b.png": GOOD, "c.jpg": GOOD, "d.png": GOOD})
    folder = tmp_path / "src" / "images" / "train"
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    jpg = write_image(folder / "a.jpg", noise)
    (folder / "a.jpg").write_bytes(jpg[: len(jpg) * 3 // 4])
    png = write_image(folder / "b.png", noise, ".png")
    (folder / "b.png").write_bytes(png[: len(png) // 2])
    (folder / "c.jpg").write_bytes(b"")
    (folder / "d.png").write_bytes(b"not an image at all")
    found = {Path(p.file).name: p.message for p in problems_of(data_yaml, tmp_path / "out")}
    assert set(found) == {"a.jpg", "b.png", "c.jpg", "d.png"}
    assert found["a.jpg"].startswith("corrupt")
    assert found["b.png"].startswith("corrupt")
    assert found["c.jpg"] == "empty file"
    assert found["d.png"] == "corrupt or unsupported image (OpenCV cannot decode it)"


def test_truncated_jpeg_is_caught_even_where_opencv_would_decode_it():
    # OpenCV < 5 decodes a truncated JPEG with a warning; the PIL check must refuse it on its own.
    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    data = cv2.imencode(".jpg", noise)[1].tobytes()
    assert _pil_error(data, ".jpg") is None
    assert _pil_error(data[: len(data) * 3 // 4], ".jpg").startswith("corrupt image: image file is truncated")


def test_list_file_missing_and_duplicate_images(tmp_path):
    src = tmp_path / "src"
    make_dataset(src, {"a.jpg": GOOD, "b.jpg": GOOD})
    (src / "train.txt").write_text("./images/train/a.jpg\nimages/train/b.jpg\n\n./images/train/gone.jpg\n"
                                   "./images/train/a.jpg\nnotes.md\n")
    data_yaml = src / "data.yaml"
    data_yaml.write_text("train: train.txt\nval: images/val\nnames: [code, qr]\n")
    problems = problems_of(data_yaml, tmp_path / "out")
    listing = src / "train.txt"
    assert Problem(str(listing), 6, "not an image file name: 'notes.md'") in problems
    assert Problem(str(src / "images" / "train" / "a.jpg"), None,
                   f"duplicate image in the split (listed at {listing}:5; first listed at {listing}:1)") in problems
    assert Problem(str(src / "images" / "train" / "gone.jpg"), None,
                   f"image not found (listed at {listing}:4)") in problems
    assert len(problems) == 3


def test_yaml_level_problems(tmp_path):
    src = tmp_path / "src"
    data_yaml = make_dataset(src, {"a.jpg": GOOD})
    (src / "images" / "val" / "v.jpg").unlink()
    data_yaml.write_text("train: images/train\nval: images/val\ntest: nowhere\nnc: 3\nnames: [code, qr]\n")
    problems = problems_of(data_yaml, tmp_path / "out")
    assert problems == [
        Problem(str(data_yaml), 4, "nc is 3 but names has 2 entries"),
        Problem(str(data_yaml), 2, "val: no images found"),
        Problem(str(data_yaml), 3, f"test: nowhere is not a folder or a .txt list file (resolved to {src / 'nowhere'})"),
    ]


@pytest.mark.parametrize(("names", "message"), [
    ("names: {0: code, 2: qr}", "names keys must be the class ids 0..1"),
    ("names: []", "names must be a non-empty list or {id: name} mapping"),
    ("nc: 0", "nc must be a positive integer, got 0"),
    ("foo: 1", "names is missing"),
])
def test_bad_names(tmp_path, names, message):
    data_yaml = make_dataset(tmp_path / "src", {"a.jpg": GOOD})
    data_yaml.write_text(f"train: images/train\nval: images/val\n{names}\n")
    assert problems_of(data_yaml, tmp_path / "out") == [Problem(str(data_yaml), 3 if "foo" not in names else None,
                                                               message)]


def test_names_mapping_nc_only_and_path_key(tmp_path):
    src = tmp_path / "ds"
    make_dataset(src, {"a.jpg": GOOD})
    data_yaml = tmp_path / "cfg" / "data.yaml"
    data_yaml.parent.mkdir()
    data_yaml.write_text("path: ../ds\ntrain: [images/train]\nval: images/val\nnames: {1: qr, 0: code}\n")
    import_yolo(data_yaml, tmp_path / "out")
    assert read_split(tmp_path / "out", "val").names == ["code", "qr"]
    data_yaml.write_text("path: ../ds\ntrain: images/train\nval: images/val\nnc: 2\n")
    import_yolo(data_yaml, tmp_path / "out")
    assert read_split(tmp_path / "out", "train").names == ["class_0", "class_1"]


def test_yaml_is_read_safely(tmp_path):
    data_yaml = make_dataset(tmp_path / "src", {"a.jpg": GOOD})
    marker = tmp_path / "pwned"
    data_yaml.write_text(f"train: !!python/object/apply:os.system ['touch {marker}']\nval: images/val\n")
    problems = problems_of(data_yaml, tmp_path / "out")
    assert problems[0].file == str(data_yaml) and problems[0].line == 1
    assert problems[0].message.startswith("not valid YAML")
    assert not marker.exists()


def test_every_problem_is_collected(tmp_path):
    data_yaml = make_dataset(tmp_path / "src", {"a.jpg": "0 0.5\n", "b.jpg": "5 0.5 0.5 0.1 0.1\n", "c.jpg": GOOD},
                             {"v.jpg": "0 x 0.5 0.1 0.1\n0 0.5 0.5 0.1 2\n"})
    messages = sorted(p.message for p in problems_of(data_yaml, tmp_path / "out"))
    assert messages == ["class 5 out of range 0..1", "cx 'x' is not a number",
                        "expected 5 fields 'class cx cy w h', got 2", "h 2 outside [0, 1]"]


def test_skip_invalid_drops_whole_image_and_reports_it(tmp_path):
    bad_labels = GOOD + "7 0.5 0.5 0.1 0.1\n"
    data_yaml = make_dataset(tmp_path / "src", {"bad.jpg": bad_labels, "good.jpg": GOOD})
    out = tmp_path / "out"
    summary = prepare_dataset(DataParams(source="yolo", yolo={"data_yaml": str(data_yaml)}, out_dir="out",
                                         skip_invalid=True), tmp_path, progress=False)
    assert summary["skipped"] == 1
    assert summary["splits"]["train"] == {"images": 1, "boxes": 1, "background": 0, "per_class": [1, 0]}
    assert [s.file_name for s in read_split(out, "train").samples] == ["good.jpg"]
    report = json.loads((out / "invalid.json").read_text())
    label = tmp_path / "src" / "labels" / "train" / "bad.txt"
    assert report["skipped"] == [{"split": "train", "image": str(tmp_path / "src" / "images" / "train" / "bad.jpg"),
                                  "problems": [{"file": str(label), "line": 2,
                                                "message": "class 7 out of range 0..1"}]}]


def test_skip_invalid_still_fails_when_a_split_ends_empty(tmp_path):
    data_yaml = make_dataset(tmp_path / "src", {"a.jpg": "0 0.5\n"})
    problems = problems_of(data_yaml, tmp_path / "out", skip_invalid=True)
    assert Problem(str(data_yaml), None, "train: no valid images left after skipping invalid ones") in problems


def test_failed_import_keeps_previous_dataset(tmp_path):
    out = tmp_path / "out"
    import_yolo(make_dataset(tmp_path / "good", {"a.jpg": GOOD}), out)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    problems_of(make_dataset(tmp_path / "bad", {"a.jpg": "9 0.5 0.5 0.1 0.1\n"}), out)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "good", "out"]


@pytest.mark.parametrize(("img", "ext"), [
    (np.zeros((20, 36), np.uint8), ".png"),  # grayscale
    (np.zeros((20, 36, 4), np.uint8), ".png"),  # RGBA
    (np.full((20, 36), 40000, np.uint16), ".png"),  # 16-bit
    (np.zeros((20, 36, 3), np.uint8), ".bmp"),
])
def test_pixel_formats_import_with_their_size(tmp_path, img, ext):
    data_yaml = make_dataset(tmp_path / "src", {f"a{ext}": GOOD})
    data = write_image(tmp_path / "src" / "images" / "train" / f"a{ext}", img, ext)
    import_yolo(data_yaml, tmp_path / "out")
    sample = read_split(tmp_path / "out", "train").samples[0]
    assert (sample.width, sample.height) == (36, 20)
    np.testing.assert_allclose(sample.boxes, [[13.5, 5, 22.5, 15]])
    assert (tmp_path / "out" / "images" / "train" / f"a{ext}").read_bytes() == data


def test_exif_rotated_image_is_refused(tmp_path):
    data_yaml = make_dataset(tmp_path / "src", {"a.jpg": GOOD})
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "src" / "images" / "train" / "a.jpg"
    Image.new("RGB", (40, 20)).save(path, exif=exif.tobytes())
    assert problems_of(data_yaml, tmp_path / "out") == [
        Problem(str(path), None, "EXIF orientation 6 (rotated image): save it upright without the tag")]


def test_colliding_base_names_get_index_prefix(tmp_path):
    data_yaml = make_dataset(tmp_path / "src", {"x/a.jpg": GOOD, "y/A.jpg": GOOD, "b.jpg": GOOD})
    import_yolo(data_yaml, tmp_path / "out")
    names = [s.file_name for s in read_split(tmp_path / "out", "train").samples]
    assert names == ["b.jpg", "1_a.jpg", "2_A.jpg"]
    assert sorted(p.name for p in (tmp_path / "out" / "images" / "train").iterdir()) == sorted(names)


def test_label_path_rule():
    assert label_path_for(Path("/d/images/train/images/x.y.jpg")) == Path("/d/images/train/labels/x.y.txt")
    assert label_path_for(Path("/d/pics/x.png")) == Path("/d/pics/x.txt")


def test_canonical_yolo_canonical_is_identical(tmp_path):
    labels = "0 0.123457 0.5 0.2 0.3\n1 0.5 0.654321 0.333333 0.1\n"
    data_yaml = make_dataset(tmp_path / "src", {"a.jpg": labels, "b.jpg": None, "c.jpg": GOOD})
    import_yolo(data_yaml, tmp_path / "one")
    exported = export_yolo(tmp_path / "one", tmp_path / "yolo")
    assert (tmp_path / "yolo" / "labels" / "train" / "b.txt").read_text() == ""
    import_yolo(exported, tmp_path / "two")
    for split in ("train", "val"):
        assert (tmp_path / "one" / f"{split}.json").read_bytes() == (tmp_path / "two" / f"{split}.json").read_bytes()


def test_yolo_canonical_yolo_is_exact(tmp_path):
    labels = "0 0.123457 0.5 0.2 0.3\n1 0.5 0.654321 0.333333 0.1\n"
    data_yaml = make_dataset(tmp_path / "src", {"a.jpg": labels})
    import_yolo(data_yaml, tmp_path / "one")
    export_yolo(tmp_path / "one", tmp_path / "yolo")
    written = (tmp_path / "yolo" / "labels" / "train" / "a.txt").read_text().split("\n")[:2]
    assert [[float(v) for v in line.split()] for line in written] == [
        [float(v) for v in line.split()] for line in labels.strip().split("\n")]


def test_synthetic_dataset_survives_yolo_round_trip(tmp_path):
    params = DataParams(out_dir="syn", synthetic={"image_size": 64, "train": 3, "val": 2, "test": 1})
    summary = prepare_dataset(params, tmp_path, progress=False)
    assert summary["splits"]["test"]["images"] == 1 and summary["report"] is None
    exported = export_yolo(tmp_path / "syn", tmp_path / "yolo")
    import_yolo(exported, tmp_path / "back")
    for split in ("train", "val", "test"):
        assert (tmp_path / "syn" / f"{split}.json").read_bytes() == (tmp_path / "back" / f"{split}.json").read_bytes()


def test_large_image_round_trip_needs_and_gets_more_decimals(tmp_path):
    rng = np.random.default_rng(0)
    xy = np.round(rng.uniform(0, 1000, (20, 2)), 3)
    boxes = np.concatenate([xy, xy + np.round(rng.uniform(1, 500, (20, 2)), 3)], axis=1)
    for split in ("train", "val"):
        write_image(tmp_path / "one" / "images" / split / "big.jpg", np.zeros((1500, 2000, 3), np.uint8))
        write_annotations(tmp_path / "one", split, Split(["a", "b"], [
            Sample("big.jpg", 2000, 1500, boxes, rng.integers(0, 2, 20))]))
    exported = export_yolo(tmp_path / "one", tmp_path / "yolo")
    import_yolo(exported, tmp_path / "two")
    assert (tmp_path / "one" / "train.json").read_bytes() == (tmp_path / "two" / "train.json").read_bytes()
    values = (tmp_path / "yolo" / "labels" / "train" / "big.txt").read_text().split()
    assert max(len(v.split(".")[1]) for v in values if "." in v) > 6  # 6 decimals would not be exact


# ---- mistakes that must not pass in silence --------------------------------------------------


def test_label_file_without_image_is_a_warning(tmp_path):
    data_yaml = make_dataset(tmp_path / "src", {"a.jpg": GOOD})
    orphan = tmp_path / "src" / "labels" / "train" / "gone.txt"
    orphan.write_text(GOOD)
    (tmp_path / "src" / "labels" / "train" / "sub").mkdir()
    (tmp_path / "src" / "labels" / "train" / "sub" / "old.txt").write_text(GOOD)
    summary = import_yolo(data_yaml, tmp_path / "out")
    assert summary["warnings"] == [
        {"file": str(orphan), "line": None, "message": "label file with no image: its boxes are not imported"},
        {"file": str(orphan.parent / "sub" / "old.txt"), "line": None,
         "message": "label file with no image: its boxes are not imported"}]
    assert json.loads((tmp_path / "out" / "invalid.json").read_text())["warnings"] == summary["warnings"]


def test_orphans_are_found_through_list_files_and_list_files_are_no_orphans(tmp_path):
    src = tmp_path / "src"
    make_dataset(src, {"a.jpg": GOOD, "b.jpg": GOOD})
    (src / "train.txt").write_text("images/train/a.jpg\n")  # b.jpg not listed: its labels are unused
    data_yaml = src / "data.yaml"
    data_yaml.write_text("train: train.txt\nval: images/val\nnames: [code, qr]\n")
    summary = import_yolo(data_yaml, tmp_path / "out")
    assert [w["file"] for w in summary["warnings"]] == [str(src / "labels" / "train" / "b.txt")]


def test_one_label_file_for_two_images_is_an_error(tmp_path):
    data_yaml = make_dataset(tmp_path / "src", {"a.jpg": GOOD, "c.jpg": GOOD})
    write_image(tmp_path / "src" / "images" / "train" / "a.png", ext=".png")
    label = tmp_path / "src" / "labels" / "train" / "a.txt"
    message = "one label file for 2 images (a.jpg, a.png): which image it labels is ambiguous; rename or remove all but one"
    assert problems_of(data_yaml, tmp_path / "out") == [Problem(str(label), None, message)] * 2
    summary = import_yolo(data_yaml, tmp_path / "out", skip_invalid=True)  # or both are left out, and listed
    assert summary["skipped"] == 2
    assert [s.file_name for s in read_split(tmp_path / "out", "train").samples] == ["c.jpg"]


def test_repeated_class_name_is_an_error(tmp_path):
    data_yaml = make_dataset(tmp_path / "src", {"a.jpg": GOOD})
    data_yaml.write_text("train: images/train\nval: images/val\nnames: [code, qr, code]\n")
    assert problems_of(data_yaml, tmp_path / "out") == [Problem(str(data_yaml), 3, (
        "names[2] 'code' repeats names[0]: two classes of one name cannot be told apart in the metrics or by a "
        "user of the model"))]


def test_val_equal_to_train_is_an_error_unless_allowed_and_overlap_a_warning(tmp_path):
    data_yaml = make_dataset(tmp_path / "src", {"a.jpg": GOOD, "b.jpg": GOOD})
    data_yaml.write_text("train: images/train\nval: images/train\nnames: [code, qr]\n")
    (problem,) = problems_of(data_yaml, tmp_path / "out")
    assert (problem.file, problem.line) == (str(data_yaml), 2)
    assert problem.message.startswith("val is the same 2 images as train") and "allow_val_equals_train" in problem.message
    params = DataParams(source="yolo", yolo={"data_yaml": str(data_yaml)}, out_dir="out", allow_val_equals_train=True)
    assert "(data.allow_val_equals_train is true)" in prepare_dataset(params, tmp_path, progress=False)["warnings"][0]["message"]
    (tmp_path / "src" / "list.txt").write_text("images/train/a.jpg\nimages/val/v.jpg\n")
    data_yaml.write_text("train: images/train\nval: list.txt\nnames: [code, qr]\n")
    summary = import_yolo(data_yaml, tmp_path / "out2")
    assert summary["warnings"] == [{"file": str(data_yaml), "line": 2, "message": (
        "1 of the 2 val images are train images too: validation mAP is optimistic")}]


def test_linked_subfolders_are_followed_and_loops_named(tmp_path):
    src = tmp_path / "src"
    data_yaml = make_dataset(src, {"a.jpg": GOOD})
    elsewhere = tmp_path / "elsewhere"
    write_image(elsewhere / "images" / "more" / "m.jpg")
    (elsewhere / "labels" / "more").mkdir(parents=True)
    (elsewhere / "labels" / "more" / "m.txt").write_text(GOOD)
    (src / "images" / "train" / "more").symlink_to(elsewhere / "images" / "more")
    (src / "labels" / "train" / "more").symlink_to(elsewhere / "labels" / "more")
    (src / "images" / "train" / "loop").symlink_to(src / "images" / "train")
    summary = import_yolo(data_yaml, tmp_path / "out")
    train = read_split(tmp_path / "out", "train")
    assert [s.file_name for s in train.samples] == ["a.jpg", "m.jpg"] and len(train.samples[1].labels) == 1
    assert summary["warnings"] == [{"file": str(src / "images" / "train" / "loop"), "line": None,
                                    "message": f"a link to {src / 'images' / 'train'}, which is searched already: skipped"}]


def test_home_folder_is_expanded_in_dataset_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    make_dataset(tmp_path / "home" / "ds", {"a.jpg": GOOD})
    params = DataParams(source="yolo", yolo={"data_yaml": "~/ds/data.yaml"}, out_dir="out")
    assert params.yolo.data_yaml == str(tmp_path / "home" / "ds" / "data.yaml")
    assert prepare_dataset(params, tmp_path, progress=False)["splits"]["train"]["images"] == 1
    assert DataParams(synthetic={"backgrounds_dir": "~/bg"}).synthetic.backgrounds_dir == str(tmp_path / "home" / "bg")


def test_split_without_any_label_file_is_a_warning(tmp_path):
    data_yaml = make_dataset(tmp_path / "src", {"a.jpg": None, "b.jpg": None})
    summary = import_yolo(data_yaml, tmp_path / "out")
    label = tmp_path / "src" / "labels" / "train" / "a.txt"
    assert summary["warnings"] == [{"file": str(data_yaml), "line": 1, "message": (
        f"train: none of its 2 images has a label file (all import as background); labels are looked for at {label}")}]


def test_prepare_entry_prints_warnings_and_the_skip_report(tmp_path, monkeypatch, capsys):
    """The console names every warning and where skipped images are listed; metrics/data.json keeps them."""
    import flows.prepare
    from flows.common import OFFLINE_ENV

    for key, value in OFFLINE_ENV.items():
        monkeypatch.setenv(key, os.environ.get(key, value))
    data_yaml = make_dataset(tmp_path / "src", {"a.jpg": GOOD, "bad.jpg": "7 0.5 0.5 0.1 0.1\n"})
    (tmp_path / "src" / "labels" / "train" / "gone.txt").write_text(GOOD)
    params = tmp_path / "params.yaml"
    params.write_text(f"data:\n  source: yolo\n  out_dir: prepared\n  skip_invalid: true\n  yolo:\n"
                      f"    data_yaml: {data_yaml}\n")
    monkeypatch.chdir(tmp_path)
    assert flows.prepare.main(["--params", str(params), "--quiet"]) == 0
    out, err = capsys.readouterr()
    gone = tmp_path / "src" / "labels" / "train" / "gone.txt"
    assert f"warning: {gone}: label file with no image: its boxes are not imported" in err
    report = tmp_path / "prepared" / "invalid.json"
    assert (f"skipped 1 invalid image(s) and 0 record(s) that belong to no image (data.skip_invalid: true); "
            f"each is listed with its problems in {report}") in out
    stats = json.loads((tmp_path / "metrics" / "data.json").read_text())
    assert stats["warnings"] == [{"file": str(gone), "line": None,
                                  "message": "label file with no image: its boxes are not imported"}]
    assert (stats["skipped"], stats["invalid_report"]) == (1, str(report))
