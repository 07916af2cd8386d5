"""DetectionDataset: eval letterbox geometry, image formats, errors, determinism, loaders."""

from __future__ import annotations

import random

import cv2
import numpy as np
import pytest
import torch

from slimloop.config import AugmentParams
from slimloop.data.canonical import Sample, Split, image_dir, write_annotations
from slimloop.data.dataset import DetectionDataset, EpochSampler, box_wh, collate_fn, make_loader
from slimloop.errors import DataError

# (w, h, [(cls, x1, y1, x2, y2)]): landscape, portrait and square images
LAYOUT = [
    (80, 60, [(0, 10, 8, 40, 30), (1, 50, 35, 72, 52)]),
    (60, 80, [(1, 8, 10, 30, 40)]),
    (80, 60, [(0, 10, 24, 66, 30)]),
    (50, 50, [(1, 12, 12, 38, 38)]),
    (80, 60, []),
    (60, 80, [(0, 20, 50, 50, 72), (0, 5, 5, 15, 15)]),
]
COLOUR = (255, 0, 0)  # BGR as written by cv2: pure blue objects on black


def build(root, layout=LAYOUT, split="train"):
    """Write a canonical dataset of painted rectangles; return its samples."""
    samples = []
    folder = image_dir(root, split)
    folder.mkdir(parents=True, exist_ok=True)
    for k, (w, h, rects) in enumerate(layout):
        img = np.zeros((h, w, 3), np.uint8)
        for _, x1, y1, x2, y2 in rects:
            img[y1:y2, x1:x2] = COLOUR
        cv2.imwrite(str(folder / f"im{k}.png"), img)
        boxes = np.array([r[1:] for r in rects], np.float64).reshape(-1, 4)
        samples.append(Sample(f"im{k}.png", w, h, boxes, np.array([r[0] for r in rects], np.int64)))
    write_annotations(root, split, Split(["a", "b"], samples))
    return samples


def to_xyxy(labels: torch.Tensor, size: int) -> np.ndarray:
    cxcywh = labels[:, 2:].double().numpy() * size
    return np.concatenate([cxcywh[:, :2] - cxcywh[:, 2:] / 2, cxcywh[:, :2] + cxcywh[:, 2:] / 2], 1)


@pytest.mark.parametrize("imgsz", [64, 160])
def test_eval_letterbox_inverts_to_original(tmp_path, imgsz):
    samples = build(tmp_path)
    ds = DetectionDataset(tmp_path, "train", imgsz)
    for i, s in enumerate(samples):
        img, labels, meta = ds[i]
        assert img.dtype == torch.uint8 and img.shape == (3, imgsz, imgsz)
        assert labels.dtype == torch.float32 and labels.shape == (len(s.boxes), 6)
        assert meta["image_id"] == i + 1 and meta["orig_shape"] == (s.height, s.width)
        r, pad = meta["ratio"], np.array(meta["pad"] * 2)
        assert r == pytest.approx(imgsz / max(s.width, s.height))
        # centred: the padding on each side differs by at most one pixel
        assert abs(imgsz - 2 * pad[0] - s.width * r) <= 1.5 and abs(imgsz - 2 * pad[1] - s.height * r) <= 1.5
        np.testing.assert_allclose((to_xyxy(labels, imgsz) - pad) / r, s.boxes, atol=0.5 / 8)
        np.testing.assert_array_equal(labels[:, 1].numpy(), s.labels)
        hwc = img.permute(1, 2, 0).numpy()
        assert (hwc[: int(pad[1])] == 114).all() and (hwc[:, : int(pad[0])] == 114).all()
        # the painted pixels, mapped back with meta, fall on the original rectangles
        blue = hwc[:, :, 2] > 127
        for x1, y1, x2, y2 in s.boxes:
            sub = blue[int(y1 * r + pad[1]) - 2 : int(y2 * r + pad[1]) + 3,
                       int(x1 * r + pad[0]) - 2 : int(x2 * r + pad[0]) + 3]
            ys, xs = np.nonzero(sub)
            c0, r0 = int(x1 * r + pad[0]) - 2, int(y1 * r + pad[1]) - 2
            extent = np.array([xs.min() + c0, ys.min() + r0, xs.max() + c0 + 1, ys.max() + r0 + 1])
            np.testing.assert_allclose((extent - pad) / r, [x1, y1, x2, y2], atol=1.0 / r)


def test_image_formats_load_as_rgb_uint8(tmp_path):
    build(tmp_path, [(80, 60, [])] * 4)
    folder = image_dir(tmp_path, "train")
    gray = np.full((60, 80), 77, np.uint8)
    bgra = np.zeros((60, 80, 4), np.uint8)
    bgra[:] = (10, 20, 30, 0)  # fully transparent: alpha must be dropped, not composited
    rgb16 = np.zeros((60, 80, 3), np.uint16)
    rgb16[:] = (257 * 40, 257 * 50, 65535)  # BGR
    gray16 = np.full((60, 80), 257 * 200, np.uint16)
    for k, img in enumerate([gray, bgra, rgb16, gray16]):
        assert cv2.imwrite(str(folder / f"im{k}.png"), img)
    ds = DetectionDataset(tmp_path, "train", 80)
    expected = [(77, 77, 77), (30, 20, 10), (255, 50, 40), (200, 200, 200)]
    for k, rgb in enumerate(expected):
        img, _, meta = ds[k]
        assert img.dtype == torch.uint8 and img.shape == (3, 80, 80) and meta["pad"] == (0.0, 10.0)
        assert img[:, 10:70].reshape(3, -1).unique(dim=1).T.tolist() == [list(rgb)]


@pytest.mark.parametrize("cache", [True, False])
def test_corrupt_or_missing_image_names_the_file(tmp_path, cache):
    build(tmp_path)
    (image_dir(tmp_path, "train") / "im2.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (image_dir(tmp_path, "train") / "im4.png").unlink()
    if cache:
        with pytest.raises(DataError) as err:
            DetectionDataset(tmp_path, "train", 64)
        assert [p.file.rsplit("/", 1)[-1] for p in err.value.problems] == ["im2.png", "im4.png"]
        assert "cannot decode" in str(err.value) and "missing" in str(err.value)
    else:
        ds = DetectionDataset(tmp_path, "train", 64, cache_images=False)
        assert ds[1][0].shape == (3, 64, 64)
        with pytest.raises(DataError, match="im2.png"):
            ds[2]


def test_size_mismatch_is_a_data_error(tmp_path):
    build(tmp_path)
    cv2.imwrite(str(image_dir(tmp_path, "train") / "im0.png"), np.zeros((30, 40, 3), np.uint8))
    with pytest.raises(DataError, match=r"im0.png.*40x30 but its annotation says 80x60"):
        DetectionDataset(tmp_path, "train", 64)


def test_cache_and_no_cache_agree(tmp_path):
    build(tmp_path)
    params = AugmentParams(degrees=10, mosaic=0.5)
    cached = DetectionDataset(tmp_path, "train", 64, augment=params, seed=3)
    fresh = DetectionDataset(tmp_path, "train", 64, augment=params, seed=3, cache_images=False)
    assert cached.cache_bytes == sum(h * w * 3 for h, w in cached._shapes) and fresh.cache_bytes == 0
    for i in range(len(cached)):
        (a, la, _), (b, lb, _) = cached[i], fresh[i]
        assert torch.equal(a, b) and torch.equal(la, lb)


def test_augmentation_is_a_function_of_seed_epoch_index(tmp_path):
    build(tmp_path)
    params = AugmentParams(degrees=10)
    a = DetectionDataset(tmp_path, "train", 64, augment=params, seed=1)
    b = DetectionDataset(tmp_path, "train", 64, augment=params, seed=1)
    other_seed = DetectionDataset(tmp_path, "train", 64, augment=params, seed=2)
    np_state, py_state, torch_state = np.random.get_state(), random.getstate(), torch.get_rng_state()
    for i in (0, 3, 5):
        b[(i + 1) % len(b)]  # access order must not matter
        assert torch.equal(a[i][0], b[i][0]) and torch.equal(a[i][1], b[i][1])
        assert not torch.equal(a[i][0], other_seed[i][0])
        first = a[i][0]
        a.set_epoch(1)
        assert a.epoch == 1 and not torch.equal(a[i][0], first)
        a.set_epoch(0)
        assert torch.equal(a[i][0], first)
    # no global random state is touched
    assert random.getstate() == py_state and torch.equal(torch.get_rng_state(), torch_state)
    assert all(np.array_equal(x, y) for x, y in zip(np.random.get_state(), np_state, strict=True))


def test_collate_indexes_labels_by_image(tmp_path):
    build(tmp_path)
    ds = DetectionDataset(tmp_path, "train", 64)
    imgs, labels, metas = collate_fn([ds[i] for i in range(4)])
    assert imgs.shape == (4, 3, 64, 64) and imgs.dtype == torch.uint8
    assert labels[:, 0].tolist() == [0, 0, 1, 2, 3]
    assert [m["image_id"] for m in metas] == [1, 2, 3, 4]
    assert ds[0][1][:, 0].tolist() == [0, 0]  # the dataset's own tensors are not modified


def test_sampler_permutes_per_epoch(tmp_path):
    build(tmp_path)
    ds = DetectionDataset(tmp_path, "train", 64)
    sampler = EpochSampler(ds, shuffle=True, seed=0)
    first, again = list(sampler), list(sampler)
    ds.set_epoch(1)
    second = list(sampler)
    assert first == again and sorted(first) == sorted(second) == list(range(6)) and first != second
    assert list(EpochSampler(ds, shuffle=False, seed=0)) == list(range(6))


def loader_batches(ds, workers, epochs):
    loader = make_loader(ds, batch_size=4, shuffle=True, workers=workers, seed=7, epoch=0)
    out = []
    for epoch in range(epochs):
        ds.set_epoch(epoch)
        out.append([(imgs, labels, [m["image_id"] for m in metas]) for imgs, labels, metas in loader])
    return out


def test_loader_is_independent_of_worker_count(tmp_path):
    build(tmp_path)
    params = AugmentParams(degrees=5, mosaic=0.5)
    serial = loader_batches(DetectionDataset(tmp_path, "train", 64, augment=params), 0, 2)
    parallel = loader_batches(DetectionDataset(tmp_path, "train", 64, augment=params), 2, 2)
    for epoch_a, epoch_b in zip(serial, parallel, strict=True):
        assert len(epoch_a) == 2 and [len(ids) for _, _, ids in epoch_a] == [4, 2]
        for (ia, la, ida), (ib, lb, idb) in zip(epoch_a, epoch_b, strict=True):
            assert ida == idb and torch.equal(ia, ib) and torch.equal(la, lb)
    assert serial[0][0][2] != serial[1][0][2] or not torch.equal(serial[0][0][0], serial[1][0][0])
    ids = sorted(i for _, _, batch_ids in serial[1] for i in batch_ids)
    assert ids == list(range(1, 7))


def test_box_wh_at_training_scale(tmp_path):
    samples = build(tmp_path)
    wh = box_wh(DetectionDataset(tmp_path, "train", 160, cache_images=False))
    expected = np.concatenate([(s.boxes[:, 2:] - s.boxes[:, :2]) * 160 / max(s.width, s.height) for s in samples])
    assert wh.shape == (7, 2) and wh.dtype == np.float32
    np.testing.assert_allclose(wh, expected, rtol=1e-6)
    np.testing.assert_allclose(wh[0], [30 * 2, 22 * 2])


def test_each_index_draws_its_own_augmentation(tmp_path):
    build(tmp_path, [LAYOUT[0]] * 3)  # identical images: only the random draws tell them apart
    ds = DetectionDataset(tmp_path, "train", 64, augment=AugmentParams(degrees=10))
    imgs = [ds[i][0] for i in range(3)]
    assert not torch.equal(imgs[0], imgs[1]) and not torch.equal(imgs[1], imgs[2])


def test_image_already_at_imgsz_passes_through_unchanged(tmp_path):
    build(tmp_path, [(64, 64, [(1, 4, 6, 30, 20)])])
    painted = np.zeros((64, 64, 3), np.uint8)
    painted[6:20, 4:30] = COLOUR[::-1]  # RGB
    flip_only = AugmentParams(hsv_h=0, hsv_s=0, hsv_v=0, translate=0, scale=0, fliplr=1, mosaic=0)
    for augment in (None, flip_only, None):
        img, labels, meta = DetectionDataset(tmp_path, "train", 64, augment=augment)[0]
        expected = painted if augment is None else painted[:, ::-1]
        np.testing.assert_array_equal(img.permute(1, 2, 0).numpy(), expected)
        x1 = 4 if augment is None else 64 - 30
        np.testing.assert_allclose(to_xyxy(labels, 64)[0], [x1, 6, x1 + 26, 20], atol=1e-4)
        assert meta["ratio"] == 1.0 and meta["pad"] == (0.0, 0.0)
