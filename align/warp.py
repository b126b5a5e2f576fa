"""Five-point alignment: the similarity transform (rotation, uniform scale, translation) that
takes a face's landmarks onto a template, and the image warped by it (`--align arcface`).

Coordinates are (x, y) in pixels, pixel centres at integers (OpenCV's convention, and
insightface's). Landmarks are in pixels of the input image; template points in pixels of the
output thumbnail. A 2x3 matrix M maps input pixels to output pixels: out = M @ [x, y, 1].
The result is insightface 2.1's `norm_crop` (insightface/utils/face_align.py): the same
template, the same scaling rule, the same least-squares estimate, the same cv2.warpAffine.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

__all__ = ["Template", "TEMPLATES", "estimate_similarity", "template_points", "face_transform",
           "warp", "warp_face", "footprint"]

MIN_SPREAD_PX = 1e-6    # points closer than this to their centroid (RMS) fix no scale or rotation


@dataclass(frozen=True)
class Template:
    """points: where the left eye, right eye, nose tip, left and right mouth corners go, in
    pixels of an output of `size` (width, height). canvas: for insightface's arcface template,
    the side of the square it also comes centred in (128): sizes that are multiples of that
    but not of the height scale the canvas (see template_points)."""
    points: tuple[tuple[float, float], ...]
    size: tuple[int, int]
    canvas: int | None = None


TEMPLATES: dict[str, Template] = {
    # insightface's arcface_dst: the crops arcface_torch, and most models since 2018, train on
    "arcface": Template(((38.2946, 51.6963), (73.5318, 51.5014), (56.0252, 71.7366),
                         (41.5493, 92.3655), (70.7299, 92.2041)), (112, 112), canvas=128),
    # SphereFace's and CosFace's 96x112 crops (their face_align_demo.m): arcface's, 8 px to the left
    "sphereface": Template(((30.2946, 51.6963), (65.5318, 51.5014), (48.0252, 71.7366),
                            (33.5493, 92.3655), (62.7299, 92.2041)), (96, 112)),
}


def _points(a) -> np.ndarray:
    a = np.asarray(a)
    return a if a.dtype in (np.float32, np.float64) else a.astype(np.float64)


def estimate_similarity(src, dst) -> np.ndarray:
    """The 2x3 float64 matrix [s*R | t] of the similarity (rotation R, scale s > 0,
    translation t) that maps the points `src` onto `dst` with the least sum of squared
    distances (Umeyama 1991, "Least-squares estimation of transformation parameters between
    two point patterns"; what scikit-image's SimilarityTransform.estimate computes). src, dst:
    (N, 2) arrays of (x, y), N >= 2; the matrix maps src's pixels to dst's.
    float32 points are centred in float32, as scikit-image centres them (so insightface's
    float32 template gives insightface's matrix to the last bit); the rest is float64.
    Raises ValueError when the points fix no transform: fewer than two, not finite, or
    coincident (all within MIN_SPREAD_PX of their centroid, in src or in dst)."""
    src, dst = _points(src), _points(dst)
    if src.ndim != 2 or src.shape[1] != 2 or src.shape != dst.shape or len(src) < 2:
        raise ValueError(f"need two (N, 2) point arrays with N >= 2, not {src.shape} and {dst.shape}")
    if not (np.isfinite(src).all() and np.isfinite(dst).all()):
        raise ValueError("the points are not all finite numbers")
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    src_var = float(src_c.var(axis=0, dtype=np.float64).sum())   # mean squared distance from the centroid
    dst_var = float(dst_c.var(axis=0, dtype=np.float64).sum())
    if not (src_var > MIN_SPREAD_PX ** 2 and dst_var > MIN_SPREAD_PX ** 2):
        raise ValueError("the points coincide: they fix no scale or rotation")
    cov = (dst_c.T @ src_c).astype(np.float64) / len(src)        # Umeyama's Sigma_xy (eq. 38)
    u, d, vt = np.linalg.svd(cov)
    sign = np.ones(2)
    if np.linalg.matrix_rank(cov) == 1:         # collinear points (eq. 43)
        if np.linalg.det(u) * np.linalg.det(vt) < 0:
            sign[1] = -1
    elif np.linalg.det(cov) < 0:                # eq. 39: a rotation, never a reflection
        sign[1] = -1
    rotation = u @ np.diag(sign) @ vt           # eq. 40
    scale = 1.0 / src_var * (d @ sign)          # eq. 42
    matrix = np.empty((2, 3))
    matrix[:, 2] = dst_mean - scale * (rotation @ src_mean)     # eq. 41
    matrix[:, :2] = rotation * scale
    if not (np.isfinite(matrix).all() and scale > 0):
        raise ValueError("the points fix no similarity transform")
    return matrix


def template_points(image_size: int, template: str = "arcface") -> tuple[np.ndarray, tuple[int, int]]:
    """The template's points for an output `image_size` pixels high, and the output's
    (width, height), as insightface's estimate_norm scales arcface_dst: a multiple of the
    template's height (112) scales by image_size / 112; else a multiple of its canvas (128)
    scales by image_size / 128 and shifts x by 8 * image_size / 128, centring the template
    on the wider square; any other size (insightface refuses them) scales by image_size / 112.
    Points: (5, 2) float32 (insightface's arcface_dst is float32, and computed as there),
    pixels of the output."""
    try:
        t = TEMPLATES[template]
    except KeyError:
        raise ValueError(f"template must be one of {sorted(TEMPLATES)}, not {template!r}") from None
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, not {image_size}")
    width, height = t.size
    if image_size % height and t.canvas and image_size % t.canvas == 0:
        ratio = image_size / t.canvas
        shift = (t.canvas - width) / 2 * ratio
    else:
        ratio, shift = image_size / height, 0.0
    points = np.asarray(t.points, dtype=np.float32) * np.float32(ratio)
    points[:, 0] += np.float32(shift)
    return points, (round(width * image_size / height), image_size)


def face_transform(landmarks, image_size: int = 112, template: str = "arcface"
                   ) -> tuple[np.ndarray, tuple[int, int]]:
    """(2x3 matrix from input pixels to output pixels, output (width, height)) for a face's
    five landmarks ((5, 2) x, y in input pixels, in the template's order). Raises ValueError
    for landmarks that fix no transform (see estimate_similarity)."""
    points, size = template_points(image_size, template)
    landmarks = _points(landmarks)
    if landmarks.shape != points.shape:
        raise ValueError(f"landmarks must be (5, 2) x, y pairs, not shape {landmarks.shape}")
    return estimate_similarity(landmarks, points), size


def warp(image: np.ndarray, matrix: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """`image` warped by `matrix` (input pixels -> output pixels) into a (height, width)
    output of `size` (width, height): cv2.warpAffine, bilinear, black outside the image."""
    return cv2.warpAffine(np.ascontiguousarray(image), np.asarray(matrix, dtype=np.float64),
                          tuple(int(v) for v in size), borderValue=0.0)


def warp_face(image: np.ndarray, landmarks, image_size: int = 112,
              template: str = "arcface") -> np.ndarray:
    """The face of `image` (HxWx3 uint8) whose five landmarks ((5, 2) x, y in its pixels:
    left eye, right eye, nose, left and right mouth corner) are given, warped onto the
    template: an (image_size, width, 3) uint8 array, width = image_size for square templates.
    insightface's norm_crop for template="arcface". Raises ValueError for landmarks that fix
    no transform (coincident, not finite)."""
    matrix, size = face_transform(landmarks, image_size, template)
    return warp(image, matrix, size)


def footprint(matrix: np.ndarray, size: tuple[int, int], image_hw: tuple[int, int]
              ) -> tuple[int, int, int, int]:
    """(left, top, right, bottom), integer pixel edges of the input image: the smallest box
    of whole input pixels that holds the output's square of `size` (width, height) mapped back
    by `matrix`, clipped to the image: the part of the input that the thumbnail shows."""
    w, h = size
    inverse = cv2.invertAffineTransform(np.asarray(matrix, dtype=np.float64))
    # the outer edges of the output's corner pixels, back in input pixels
    corners = np.array([[-0.5, -0.5, 1], [w - 0.5, -0.5, 1], [-0.5, h - 0.5, 1], [w - 0.5, h - 0.5, 1]])
    xy = corners @ inverse.T
    height, width = image_hw
    left, top = np.floor(xy.min(axis=0) + 0.5)
    right, bottom = np.ceil(xy.max(axis=0) + 0.5)
    return (int(np.clip(left, 0, width)), int(np.clip(top, 0, height)),
            int(np.clip(right, 0, width)), int(np.clip(bottom, 0, height)))
