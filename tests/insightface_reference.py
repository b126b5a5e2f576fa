"""insightface 2.1's own 5-point alignment, the oracle for align/warp.py: its
insightface/utils/face_align.py, taken from the insightface==2.1 wheel on PyPI (pip download
--no-deps), sha256-checked, cached beside the sample photos, and imported from there. Nothing of
it is copied into the project. It needs OpenCV and scikit-image (the test extra).
"""
from __future__ import annotations

import importlib.util
import sys
import types
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from facenet_nets.wheelfile import fetch_members, sha256_of, user_cache_dir  # noqa: E402

WHEEL = "insightface==2.1"
MEMBER = "insightface/utils/face_align.py"
SHA256 = "a8b34ddd06716f5ca7e7501415cbd3789ccbce18db9e557b35e537695290d922"
SIZES = (112, 128, 224, 256)        # the sizes insightface accepts, as the parity tests use them

_module: types.ModuleType | None = None


def face_align() -> types.ModuleType:
    """insightface.utils.face_align, as shipped in the wheel (fetched once, then cached)."""
    global _module
    if _module is None:
        path = user_cache_dir("reference") / "insightface_face_align.py"
        if not (path.is_file() and sha256_of(path) == SHA256):
            fetch_members(WHEEL, {MEMBER: (SHA256, path)})
        spec = importlib.util.spec_from_file_location("insightface_face_align", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _module = module
    return _module


def norm_crop(image: np.ndarray, landmarks: np.ndarray, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(insightface's estimate_norm matrix, its norm_crop thumbnail) for one face."""
    fa = face_align()
    with warnings.catch_warnings():     # scikit-image >= 0.26 deprecates the estimate() it calls
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        matrix = fa.estimate_norm(np.asarray(landmarks), image_size)
        thumb = fa.norm_crop(image, np.asarray(landmarks), image_size)
    return matrix, thumb


def compare(ours: np.ndarray, reference: np.ndarray) -> tuple[int, int]:
    """(largest absolute difference, number of values that differ) of two uint8 images."""
    assert ours.shape == reference.shape and ours.dtype == reference.dtype == np.uint8
    diff = np.abs(ours.astype(np.int16) - reference.astype(np.int16))
    return int(diff.max()), int(np.count_nonzero(diff))
