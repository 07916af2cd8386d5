"""The machine-independent float image operations agree with OpenCV's to float tolerance."""

import math

import cv2
import numpy as np
import pytest

from slimloop.data import raster


@pytest.fixture
def img():
    rng = np.random.default_rng(0)
    return rng.uniform(0, 255, (37, 41, 3)).astype(np.float32)


def test_perspective_matrix_and_points_match_opencv():
    src = np.array([[0, 0], [30, 0], [30, 20], [0, 20]], np.float32)
    dst = np.array([[3, 4], [35, 2], [33, 27], [1, 22]], np.float32)
    hom = raster.perspective_matrix(src, dst)
    np.testing.assert_allclose(hom, cv2.getPerspectiveTransform(src, dst), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(raster.transform_points(src, hom), dst, atol=1e-9)
    assert raster.polygon_area(src) == 600.0
    np.testing.assert_allclose(raster.translate(hom, 2, -3), np.array([[1, 0, 2], [0, 1, -3], [0, 0, 1]]) @ hom)
    with pytest.raises(ValueError, match="singular"):
        raster.solve([[1, 2], [2, 4]], [1, 2])


def test_warp_perspective_matches_opencv_bilinear(img):
    hom = raster.perspective_matrix(np.array([[0, 0], [41, 0], [41, 37], [0, 37]]),
                                    np.array([[2, 3], [40, 1], [38, 35], [4, 33.5]]))
    ours = raster.warp_perspective(img, hom, (45, 40))
    ref = cv2.warpPerspective(img, hom, (45, 40), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
    inner = (slice(6, 30), slice(6, 36))  # OpenCV quantizes fractions to 1/32: compare away from edges
    assert ours.shape == ref.shape and ours.dtype == np.float32
    assert np.abs(ours[inner] - ref[inner]).max() < 255 / 32
    assert np.abs(ours[inner] - ref[inner]).mean() < 1.0


def test_rotation_matches_opencv():
    ours = raster.rotation_about((3.5, 2.0), 33.0)
    np.testing.assert_allclose(ours[:2], cv2.getRotationMatrix2D((3.5, 2.0), 33.0, 1), atol=1e-12)


def test_blur_and_filter_match_opencv(img):
    for sigma in (0.4, 1.0, 2.5):
        ref = cv2.GaussianBlur(img, (0, 0), sigma)
        np.testing.assert_allclose(raster.gaussian_blur(img, sigma), ref, atol=0.02)
    assert math.isclose(sum(raster.gaussian_kernel(1.3)), 1.0, rel_tol=1e-12)
    kernel = np.random.default_rng(1).uniform(0, 1, (5, 5)).astype(np.float32)
    kernel[0, 3] = 0.0
    np.testing.assert_allclose(raster.filter2d(img, kernel), cv2.filter2D(img, -1, kernel), rtol=1e-5, atol=1e-3)


def test_resize_area_and_cubic_match_opencv(img):
    np.testing.assert_allclose(raster.resize(img, (20, 12)), cv2.resize(img, (20, 12), interpolation=cv2.INTER_AREA),
                               atol=1e-3)  # 41x37 -> 20x12: fractional footprints
    row = (np.arange(13) % 3 == 0).astype(np.float32)[None, :]
    up = raster.resize(row, (40, 1))
    assert math.isclose(float(up.mean()), float(row.mean()), rel_tol=1e-6)  # area keeps the ink
    low = img[:5, :5]
    ref = cv2.resize(low, (40, 40), interpolation=cv2.INTER_CUBIC)
    np.testing.assert_allclose(raster.resize(low, (40, 40), "cubic"), ref, atol=0.05)
