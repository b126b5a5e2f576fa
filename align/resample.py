"""Area resampling of box crops, as facenet's OpenCV INTER_AREA (and TF's area resize) do it.

Every output pixel is the mean of the input over its footprint, input pixels counted by the
fraction of them that the footprint covers. The mean over any axis-aligned rectangle comes
from four bilinear reads of the summed-area table, so crops of any size and position, inside
the image or not (outside counts as zeros), resample in one vectorised gather.
"""
from __future__ import annotations

import cv2
import numpy as np


def summed_area_table(image: np.ndarray) -> np.ndarray:
    """(H + 1, W + 1, C) float64 table of an (H, W, C) uint8 image: sat[y, x] = sum of
    image[:y, :x] (exact: integers)."""
    sat = cv2.integral(np.ascontiguousarray(image), sdepth=cv2.CV_64F)
    return sat.reshape(image.shape[0] + 1, image.shape[1] + 1, image.shape[2])


def _integral_at(sat: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Integral of the image over [0, y) x [0, x) for the grid ys (K, P) x xs (K, Q), pixel
    edges, clamped to the image; bilinear in the table. Returns (K, P, Q, C)."""
    h, w = sat.shape[0] - 1, sat.shape[1] - 1
    ys = np.clip(ys, 0, h)
    xs = np.clip(xs, 0, w)
    iy = np.minimum(ys.astype(np.intp), h - 1)          # floor: ys >= 0
    ix = np.minimum(xs.astype(np.intp), w - 1)
    fy = (ys - iy)[:, :, None, None]
    fx = (xs - ix)[:, None, :, None]
    flat = sat.reshape(-1, sat.shape[2])
    at = lambda i: np.take(flat, i, axis=0)             # 3x faster than flat[i]
    i00 = (iy * (w + 1))[:, :, None] + ix[:, None, :]   # flat index of sat[iy, ix]
    top, right = at(i00), at(i00 + 1)
    right -= top
    right *= fx
    top += right                                        # interpolated along x on row iy
    bottom, right = at(i00 + (w + 1)), at(i00 + (w + 2))
    right -= bottom
    right *= fx
    bottom += right                                     # ... and on row iy + 1
    bottom -= top
    bottom *= fy
    top += bottom
    return top


def area_crops(sat: np.ndarray, windows: np.ndarray, size: int) -> np.ndarray:
    """Resample each window (K, 4) [left, top, right, bottom], pixel edges of the image whose
    table is `sat`, to size x size by area averaging; zeros outside the image.
    Returns (K, size, size, C) float64."""
    if len(windows) == 0:
        return np.zeros((0, size, size, sat.shape[2]))
    steps = np.arange(size + 1) / size
    left, top, right, bottom = (windows[:, i:i + 1].astype(np.float64) for i in range(4))
    ys = top + (bottom - top) * steps
    xs = left + (right - left) * steps
    f = _integral_at(sat, ys, xs)
    sums = f[:, 1:, 1:] - f[:, :-1, 1:] - f[:, 1:, :-1] + f[:, :-1, :-1]
    cell = ((bottom - top) * (right - left)).reshape(-1, 1, 1, 1) / (size * size)
    sums /= cell
    return sums


def normalised_crops(sat: np.ndarray, windows: np.ndarray, size: int, mean: float,
                     scale: float) -> np.ndarray:
    """(area_crops(sat, windows, size) - mean) * scale as (K, size, size, C) float32, the
    nets' input. native.area_crops is its C twin."""
    crops = area_crops(sat, windows, size)
    crops -= mean
    crops *= scale
    return crops.astype(np.float32)
