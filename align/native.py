"""The C kernels of align/_native.c, through ctypes: bitwise twins of numpy code that loops
over boxes (tests/test_native.py compares them).

- area_crops: resample.normalised_crops, the nets' input crops (~3x faster on lfw_gwb);
- nms_kept: the greedy loop of boxes.nms (all of an lfw_gwb photo's NMS ~3.5x faster).

The extension is optional (setup.py): where it was not built, LIB is None and callers run
their numpy code instead.
"""
from __future__ import annotations

import ctypes
import importlib.util

import numpy as np


def _load() -> ctypes.CDLL | None:
    spec = importlib.util.find_spec("align._native")
    if spec is None or not spec.origin:
        return None
    try:
        lib = ctypes.CDLL(spec.origin)
    except OSError:
        return None
    ptr, i64, f64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double
    lib.area_crops.argtypes = [ptr, i64, i64, i64, ptr, i64, i64, f64, f64, ptr]
    lib.area_crops.restype = ctypes.c_int
    lib.nms_kept.argtypes = [ptr, i64, f64, ctypes.c_int, ptr]
    lib.nms_kept.restype = i64
    return lib


LIB = _load()


def area_crops(sat: np.ndarray, windows: np.ndarray, size: int, mean: float,
               scale: float) -> np.ndarray:
    """resample.normalised_crops(sat, windows, size, mean, scale), bitwise."""
    sat = np.ascontiguousarray(sat, dtype=np.float64)
    windows = np.ascontiguousarray(windows, dtype=np.float64).reshape(-1, 4)
    h, w, c = sat.shape[0] - 1, sat.shape[1] - 1, sat.shape[2]
    out = np.empty((len(windows), size, size, c), np.float32)
    if LIB.area_crops(sat.ctypes.data, h, w, c, windows.ctypes.data, len(windows), size,
                      mean, scale, out.ctypes.data) != 0:
        raise MemoryError("area_crops: out of memory")
    return out


def nms_kept(b: np.ndarray, threshold: float, method: str) -> np.ndarray:
    """Positions of the rows of b (x1, y1, x2, y2, inclusive area; in the order greedy NMS
    takes them) that NMS keeps; method "union" or "min" (see boxes.nms)."""
    b = np.ascontiguousarray(b, dtype=np.float64)
    kept = np.empty(len(b), np.int64)
    m = LIB.nms_kept(b.ctypes.data, len(b), threshold, method == "min", kept.ctypes.data)
    return kept[:m].astype(np.intp, copy=False)
