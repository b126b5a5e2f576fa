"""The C kernels (align/_native.c) against their numpy twins: bitwise the same, on real
photos' crop windows and on random boxes. The Makefile's install builds the extension, so
here it must load; a user without a C compiler runs the numpy code instead."""
import numpy as np
import pytest

from align import boxes as bx
from align import native
from align.config import DetectParams
from align.detect import NORM_MEAN, NORM_SCALE, Detector
from align.resample import normalised_crops, summed_area_table



def test_extension_is_built():
    # the build skips the extension quietly where it fails (setup.py): say so loudly here
    assert native.LIB is not None, "align._native was not built: is there a C compiler?"


def test_detector_finds_the_same_faces_without_the_extension(detector, sample_images, monkeypatch):
    image = sample_images["t1.jpg"]
    with_c = detector.detect(image)
    monkeypatch.setattr(native, "LIB", None)
    without = detector.detect(image)
    assert len(with_c) == 6
    assert np.array_equal(with_c.boxes, without.boxes)
    assert np.array_equal(with_c.landmarks, without.landmarks)


@pytest.mark.parametrize("size", [24, 48])
def test_area_crops_bitwise_numpy_on_photo_windows(detector: Detector, sample_images, size):
    """The windows facenet's cascade crops from each photo (P-Net's candidates: inside the
    photo, hanging off its edges, smaller and larger than size), and windows past every edge."""
    for image in sample_images.values():
        cands = detector._stage1([image], DetectParams())[0]
        windows = bx.crop_windows(cands)
        h, w = image.shape[:2]
        windows = np.vstack([windows, [[-30, -40, 20, 10], [w - 10, h - 5, w + 50, h + 40],
                                       [-5, -5, w + 5, h + 5], [3, 4, 4, 5]]])
        sat = summed_area_table(image)
        got = native.area_crops(sat, windows, size, NORM_MEAN, NORM_SCALE)
        assert got.dtype == np.float32 and got.shape == (len(windows), size, size, 3)
        assert np.array_equal(got, normalised_crops(sat, windows, size, NORM_MEAN, NORM_SCALE))


def test_area_crops_random_windows_and_channels():
    rng = np.random.default_rng(1)
    for channels in (1, 3, 4):
        image = rng.integers(0, 256, size=(37, 53, channels), dtype=np.uint8)
        sat = summed_area_table(image)
        corner = rng.uniform(-20, 60, size=(200, 2)).round()
        windows = np.column_stack([corner, corner + rng.integers(1, 70, size=(200, 2))])
        for size in (1, 5, 24):
            assert np.array_equal(native.area_crops(sat, windows, size, NORM_MEAN, NORM_SCALE),
                                  normalised_crops(sat, windows, size, NORM_MEAN, NORM_SCALE))
    assert native.area_crops(sat, np.zeros((0, 4)), 24, 0, 1).shape == (0, 24, 24, 4)


def test_nms_kept_bitwise_numpy():
    """Random boxes with tied scores, empty boxes (0/0 overlaps: NaN drops) and more boxes
    than one numpy block."""
    rng = np.random.default_rng(2)
    for n in (0, 1, 2, 40, 300, 2 * bx.NMS_BLOCK + 7):
        corner = rng.integers(0, 200, size=(n, 2)).astype(float)
        size = rng.integers(-1, 60, size=(n, 2)).astype(float)
        x1, y1 = corner.T
        x2, y2 = (corner + size).T
        b = np.column_stack([x1, y1, x2, y2, (x2 - x1 + 1) * (y2 - y1 + 1)])
        for threshold, method in ((0.5, "union"), (0.7, "union"), (0.7, "min")):
            with np.errstate(divide="ignore", invalid="ignore"):
                expected = bx.nms_kept(b, threshold, method)
            got = native.nms_kept(b, threshold, method)
            assert got.tolist() == expected.tolist(), (n, method)
