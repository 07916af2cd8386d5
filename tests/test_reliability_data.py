"""Reliability of dataset import: every bad input is refused naming its file and line or record,
and leaves the previously prepared dataset untouched; odd but valid images and names import;
paths from data files cannot escape. Numbers are collected in docs/reliability.md."""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slimloop.config import CocoSource, DataParams
from slimloop.data.canonical import read_split
from slimloop.data.coco_import import import_coco
from slimloop.data.dataset import DetectionDataset
from slimloop.data.prepare import prepare_dataset
from slimloop.data.validate import MAX_PIXELS
from slimloop.data.yolo import export_yolo, import_yolo
from slimloop.errors import DataError

GOOD = "0 0.5 0.5 0.25 0.5\n"


def write_image(path: Path, img: np.ndarray | None = None, ext: str | None = None) -> None:
    img = np.full((32, 32, 3), 128, np.uint8) if img is None else img
    ok, buf = cv2.imencode(ext or path.suffix, img)
    assert ok
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.tobytes())


def yolo_dataset(root: Path, train: dict[str, str | None], names: str = "[code, qr]",
                 yaml_text: str | None = None) -> Path:
    """``{image name: label text or None}`` for train; one good val image; returns data.yaml."""
    (root / "images" / "train").mkdir(parents=True, exist_ok=True)
    for split, files in (("train", train), ("val", {"v.jpg": GOOD})):
        for name, labels in files.items():
            write_image(root / "images" / split / name)
            if labels is not None:
                label = (root / "labels" / split / name).with_suffix(".txt")
                label.parent.mkdir(parents=True, exist_ok=True)
                label.write_text(labels, encoding="utf-8")
    data_yaml = root / "data.yaml"
    data_yaml.write_text(yaml_text if yaml_text is not None else f"train: images/train\nval: images/val\nnames: {names}\n",
                         encoding="utf-8")
    return data_yaml


def coco_dataset(root: Path, images: list[dict], annotations: list[dict], categories: list[dict]) -> CocoSource:
    """A COCO source: ``images`` for train (files written where safe), one good val image."""
    for split, recs in (("train", images), ("val", [{"id": 1, "file_name": "v.jpg"}])):
        (root / split).mkdir(parents=True, exist_ok=True)
        for im in recs:
            name = im.get("file_name", "")
            if name.endswith(".jpg") and "\x00" not in name and ".." not in name and not name.startswith("/"):
                try:
                    write_image(root / split / name)
                except OSError:  # a name the file system refuses (too long): left without a file
                    pass
    (root / "train.json").write_text(json.dumps({"images": images, "annotations": annotations,
                                                 "categories": categories}))
    (root / "val.json").write_text(json.dumps({"images": [{"id": 1, "file_name": "v.jpg"}], "annotations": [],
                                               "categories": categories}))
    return CocoSource(train_json=str(root / "train.json"), train_images=str(root / "train"),
                      val_json=str(root / "val.json"), val_images=str(root / "val"))


def png_bomb(width: int, height: int, valid: bool = True) -> bytes:
    """A grey PNG of ``width`` x ``height`` whose file is tiny (zeros compress ~1000:1); with
    ``valid`` False only the header is honest and the pixel data is cut short."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    if valid:
        rows, packer = b"\x00" * ((width + 1) * 256), zlib.compressobj(9)
        body = b"".join(packer.compress(rows) for _ in range(height // 256)) + packer.compress(
            b"\x00" * ((width + 1) * (height % 256))) + packer.flush()
    else:
        body = zlib.compress(b"\x00" * 64)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


# ---- every bad input: a DataError naming file and line/record, the old dataset untouched -------

Case = Callable[[Path], DataParams]


def _yolo(data_yaml: Path) -> DataParams:
    return DataParams(source="yolo", yolo={"data_yaml": str(data_yaml)}, out_dir="prepared")


def _coco(source: CocoSource) -> DataParams:
    return DataParams(source="coco", coco=source, out_dir="prepared")


def _bomb(src: Path, valid: bool) -> DataParams:
    data_yaml = yolo_dataset(src, {"a.jpg": GOOD, "big.png": GOOD})
    (src / "images" / "train" / "big.png").write_bytes(png_bomb(11_000, 10_000, valid) if valid
                                                       else png_bomb(100_000, 100_000, valid))
    return _yolo(data_yaml)


def _list_file(src: Path, lines: str) -> DataParams:
    yolo_dataset(src, {"a.jpg": GOOD})
    (src / "train.txt").write_text(lines, encoding="utf-8")
    return _yolo(yolo_dataset(src, {}, yaml_text="train: train.txt\nval: images/val\nnames: [code, qr]\n"))


CATS = [{"id": 1, "name": "code"}]
IMG = {"id": 1, "file_name": "a.jpg"}

# name -> (build the bad source in a folder, (file the first problem names (relative), its line,
#          a fragment of its message))
BAD_INPUTS: dict[str, tuple[Case, tuple[str, int | None, str]]] = {
    "yolo: empty train folder": (
        lambda s: _yolo(yolo_dataset(s, {})), ("data.yaml", 1, "train: no images found")),
    "yolo: empty data.yaml": (
        lambda s: _yolo(yolo_dataset(s, {"a.jpg": GOOD}, yaml_text="")),
        ("data.yaml", None, "must be a mapping with train, val and names")),
    "yolo: label class 2 with 2 names": (
        lambda s: _yolo(yolo_dataset(s, {"a.jpg": GOOD + "2 0.5 0.5 0.1 0.1\n"})),
        ("labels/train/a.txt", 2, "class 2 out of range 0..1")),
    "yolo: label class 1 with nc 1": (
        lambda s: _yolo(yolo_dataset(s, {"a.jpg": "1 0.5 0.5 0.1 0.1\n"}, yaml_text=(
            "train: images/train\nval: images/val\nnc: 1\nnames: [code]\n"))),
        ("labels/train/a.txt", 1, "class 1 out of range 0..0")),
    "yolo: 110 MP decompression bomb (a 110 kB PNG)": (
        lambda s: _bomb(s, True), ("images/train/big.png", None, "image too large (11000 x 10000 = 110 MP)")),
    "yolo: header declaring 100000 x 100000": (
        lambda s: _bomb(s, False), ("images/train/big.png", None, "image too large")),
    "yolo: list file entry with a NUL": (
        lambda s: _list_file(s, "images/train/a.jpg\nimages/train/b\x00.jpg\n"),
        ("train.txt", 2, "not an image file name: 'images/train/b\\x00.jpg'")),
    "yolo: list file entry ../../etc/passwd": (
        lambda s: _list_file(s, "images/train/a.jpg\n../../etc/passwd\n"),
        ("train.txt", 2, "not an image file name: '../../etc/passwd'")),
    "coco: empty annotation file": (
        lambda s: _coco(_coco_text(s, "")), ("train.json", 1, "not valid JSON")),
    "coco: no images": (
        lambda s: _coco(coco_dataset(s, [], [], CATS)), ("train.json", None, "train: no images")),
    "coco: category id not in the category list": (
        lambda s: _coco(coco_dataset(s, [IMG], [{"id": 1, "image_id": 1, "category_id": 2, "bbox": [1, 1, 5, 5]}],
                                     CATS)), ("train.json", None, "annotations[0] (id 1): unknown category_id 2")),
    "coco: absolute file_name /etc/passwd": (
        lambda s: _coco(coco_dataset(s, [IMG, {"id": 2, "file_name": "/etc/passwd"}], [], CATS)),
        ("train.json", None, "images[1] (id 2): file_name must be a relative path inside the image folder")),
    "coco: file_name sub/../../x.jpg": (
        lambda s: _coco(coco_dataset(s, [IMG, {"id": 2, "file_name": "sub/../../x.jpg"}], [], CATS)),
        ("train.json", None, "images[1] (id 2): file_name must be a relative path inside the image folder")),
    "coco: file_name with a NUL": (
        lambda s: _coco(coco_dataset(s, [IMG, {"id": 2, "file_name": "b\x00.jpg"}], [], CATS)),
        ("train.json", None, "images[1] (id 2): file_name contains a NUL character")),
}


def _coco_text(src: Path, text: str) -> CocoSource:
    source = coco_dataset(src, [IMG], [], CATS)
    Path(source.train_json).write_text(text)
    return source


@pytest.fixture
def prepared(tmp_path) -> tuple[Path, dict[Path, bytes]]:
    """A good dataset prepared at ``tmp_path/prepared`` and a snapshot of its bytes."""
    prepare_dataset(_yolo(yolo_dataset(tmp_path / "good", {"g.jpg": GOOD})), tmp_path, progress=False)
    out = tmp_path / "prepared"
    return out, {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_named_and_changes_nothing(case, tmp_path, prepared):
    build, (file, line, message) = BAD_INPUTS[case]
    out, before = prepared
    params = build(tmp_path / "bad")
    with pytest.raises(DataError) as info:
        prepare_dataset(params, tmp_path, progress=False)
    first = info.value.problems[0]
    assert (first.file, first.line) == (str(tmp_path / "bad" / file), line), info.value.problems
    assert message in first.message and message in str(info.value)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "good", "prepared"]  # no temp folder


def test_bomb_is_refused_before_decoding():
    from slimloop.data.validate import _too_large

    assert MAX_PIXELS == 100_000_000
    assert _too_large(png_bomb(10_000, 10_000, valid=False)) is None  # at the limit: fine
    assert "10001 x 10000" in _too_large(png_bomb(10_001, 10_000, valid=False))


# ---- odd but valid images and names: imported, and training reads them as RGB ----------------

PIXEL_FORMATS = {  # name -> (pixels as stored, extension)
    "gray8.png": (np.full((30, 40), 200, np.uint8), ".png"),
    "rgba.png": (np.dstack([np.full((48, 64, 3), 90, np.uint8), np.zeros((48, 64), np.uint8)]), ".png"),
    "gray16.png": (np.full((20, 50), 65535, np.uint16), ".png"),
    "rgb16.png": (np.full((64, 32, 3), 32768, np.uint16), ".png"),
    "bgr.jpg": (np.full((100, 70, 3), 50, np.uint8), ".jpg"),
    "gray.bmp": (np.full((16, 16), 7, np.uint8), ".bmp"),
    "rgb.tif": (np.full((40, 40, 3), 60, np.uint8), ".tif"),
}


def test_mixed_sizes_and_pixel_types_import_and_load_as_rgb(tmp_path):
    data_yaml = yolo_dataset(tmp_path / "src", {name: GOOD for name in PIXEL_FORMATS})
    for name, (img, ext) in PIXEL_FORMATS.items():
        write_image(tmp_path / "src" / "images" / "train" / name, img, ext)
    import_yolo(data_yaml, tmp_path / "out")
    split = read_split(tmp_path / "out", "train")
    sizes = {s.file_name: (s.width, s.height) for s in split.samples}
    assert sizes == {n: (img.shape[1], img.shape[0]) for n, (img, _) in PIXEL_FORMATS.items()}
    dataset = DetectionDataset(tmp_path / "out", "train", 64, None)
    for i, sample in enumerate(dataset.samples):
        img, labels, meta = dataset[i]
        assert img.shape == (3, 64, 64) and img.dtype == torch.uint8, sample.file_name
        assert meta["orig_shape"] == (sample.height, sample.width)
        np.testing.assert_allclose(labels[0, 2:4].numpy(), [0.5, 0.5], atol=0.02)  # the centred box
    gray16 = dataset[[s.file_name for s in dataset.samples].index("gray16.png")][0]
    assert int(gray16.max()) == 255  # 16-bit scaled to 8-bit, not wrapped


def test_spaces_and_non_ascii_names_work_end_to_end(tmp_path):
    src = tmp_path / "データ set" / "données ü"
    names = {"code 1.jpg": GOOD, "é ü 2.png": GOOD, "条码.jpg": GOOD, "  leading.jpg": GOOD}
    yolo_dataset(src, names)
    (src / "train list.txt").write_text("".join(f"./images/train/{n}\n" for n in names), encoding="utf-8")
    data_yaml = src / "data.yaml"
    data_yaml.write_text("train: train list.txt\nval: images/val\nnames: [código, 二维码]\n", encoding="utf-8")
    out = tmp_path / "out ü"
    import_yolo(data_yaml, out)
    split = read_split(out, "train")
    assert [s.file_name for s in split.samples] == list(names) and split.names == ["código", "二维码"]
    dataset = DetectionDataset(out, "train", 64, None)
    assert all(dataset[i][1].shape == (1, 6) for i in range(len(dataset)))
    import_yolo(export_yolo(out, tmp_path / "yolo ü"), tmp_path / "back")
    assert (out / "train.json").read_bytes() == (tmp_path / "back" / "train.json").read_bytes()


# ---- untrusted paths: a data file cannot make the import read or write outside -----------------


def test_yolo_list_may_name_images_elsewhere_but_copies_stay_inside(tmp_path):
    """A data.yaml and its list files are the user's: images they name anywhere are read (as
    ultralytics does); the copies are written under the output folder only, flattened."""
    elsewhere = tmp_path / "elsewhere" / "deep"
    write_image(elsewhere / "images" / "x.jpg")
    (elsewhere / "labels").mkdir()
    (elsewhere / "labels" / "x.txt").write_text(GOOD)
    src = tmp_path / "src"
    yolo_dataset(src, {"a.jpg": GOOD})
    (src / "train.txt").write_text(f"images/train/a.jpg\n{elsewhere / 'images' / 'x.jpg'}\n"
                                   "../elsewhere/deep/images/x.jpg\n")
    data_yaml = src / "data.yaml"
    data_yaml.write_text("train: train.txt\nval: images/val\nnames: [code, qr]\n")
    before = sorted(p for p in tmp_path.rglob("*"))
    with pytest.raises(DataError, match="duplicate image in the split"):  # the same file twice
        import_yolo(data_yaml, tmp_path / "out")
    (src / "train.txt").write_text(f"images/train/a.jpg\n{elsewhere / 'images' / 'x.jpg'}\n")
    import_yolo(data_yaml, tmp_path / "out")
    assert [s.file_name for s in read_split(tmp_path / "out", "train").samples] == ["a.jpg", "x.jpg"]
    after = sorted(p for p in tmp_path.rglob("*") if not p.is_relative_to(tmp_path / "out"))
    assert after == before  # nothing written outside the output folder


def test_coco_paths_outside_the_image_folder_are_never_opened(tmp_path, monkeypatch):
    """With skip_invalid, escaping records are dropped; they are never even probed."""
    import slimloop.data.validate as validate

    secret = tmp_path / "src" / "secret.jpg"  # a real image one level above the image folder
    write_image(secret)
    opened: list[str] = []
    real_probe = validate.probe_image
    monkeypatch.setattr(validate, "probe_image", lambda p: opened.append(str(p)) or real_probe(p))
    bad_names = ["../secret.jpg", str(secret), "sub/../../secret.jpg", "a\x00.jpg"]
    images = [IMG] + [{"id": i + 2, "file_name": n} for i, n in enumerate(bad_names)]
    source = coco_dataset(tmp_path / "src", images, [], CATS)
    report = import_coco(source, "/", tmp_path / "out", skip_invalid=True)
    assert report["skipped"] == len(bad_names)
    assert [s.file_name for s in read_split(tmp_path / "out", "train").samples] == ["a.jpg"]
    assert not any("secret" in p or "\x00" in p for p in opened), opened
    assert sorted(p.name for p in (tmp_path / "out" / "images" / "train").iterdir()) == ["a.jpg"]


file_names = st.one_of(
    st.text(st.characters(codec="utf-8"), min_size=1, max_size=12),
    st.sampled_from(["..", ".", "/", "a/../../b.jpg", "/etc/passwd", "a\x00.jpg", "~/x.jpg", "con.jpg",
                     " a.jpg", "a .jpg", "ü.jpg", "a/b.jpg", "\\..\\x.jpg", "a\nb.jpg", "x" * 300 + ".jpg"]),
)


@settings(deadline=None, database=None, max_examples=120, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=file_names)
def test_coco_file_names_fuzz_never_escape_or_crash(tmp_path_factory, name):
    """Any file_name: the import succeeds or raises DataError, and writes only inside its output."""
    root = tmp_path_factory.mktemp("fuzz")
    source = coco_dataset(root / "src", [IMG, {"id": 2, "file_name": name}], [], CATS)
    try:
        import_coco(source, "/", root / "out", skip_invalid=True)
    except DataError:
        pass
    outside = {p.relative_to(root).parts[0] for p in root.rglob("*")}
    assert outside <= {"src", "out"}
    if (root / "out").exists():
        names = [s.file_name for s in read_split(root / "out", "train").samples]
        assert all("/" not in n and "\x00" not in n and n not in (".", "..") for n in names)


@settings(deadline=None, database=None, max_examples=120, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(entry=file_names)
def test_yolo_list_entries_fuzz_never_crash(tmp_path_factory, entry):
    """Any line of a list file: refused with its line, or read as an image path; never a traceback."""
    root = tmp_path_factory.mktemp("fuzz")
    yolo_dataset(root / "src", {"a.jpg": GOOD})
    (root / "src" / "train.txt").write_text(f"images/train/a.jpg\n{entry}\n", encoding="utf-8")
    data_yaml = root / "src" / "data.yaml"
    data_yaml.write_text("train: train.txt\nval: images/val\nnames: [code, qr]\n")
    try:
        import_yolo(data_yaml, root / "out", skip_invalid=True)
    except DataError as exc:
        assert all(p.file for p in exc.problems)
    assert {p.relative_to(root).parts[0] for p in root.rglob("*")} <= {"src", "out"}
