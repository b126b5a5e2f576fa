"""The MTCNN cascade, faithful to facenet's detect_face, batched over images.

    pyramid -> P-Net (batched over images sharing a source and level size)
            -> per-level NMS 0.5 -> per-image NMS 0.7 -> P-Net regression, square, truncate
            -> 24x24 crops -> R-Net (all images at once) -> score > t2, NMS 0.7, bbreg, square
            -> truncate -> 48x48 crops -> O-Net -> score > t3, landmarks, bbreg, NMS 0.7 Min

Images are HxWx3 uint8 RGB; boxes and landmarks come back in their pixels. The nets run on
Keras's backend (TensorFlow by default), in this process (`LocalNets`) or in the one process
that owns the device (`align.nets_server`); the pyramid levels are OpenCV's INTER_AREA resizes
to uint8, the very call facenet makes; everything between the nets is numpy on float64, as in
facenet. Each image's result depends on that image alone (tests check it against detecting it
by itself).
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from typing import Protocol

import cv2
import numpy as np

from align import boxes as bx
from align import native
from align.config import DetectParams
from align.resample import normalised_crops, summed_area_table
from facenet_nets import NORM_MEAN, NORM_SCALE

# Bounds on one photo's work, checked before it is done (a photo over them is TooCostly): what
# the default options need on the largest photo imageio accepts (60 Mpx: a 21.6 Mpx first level,
# 43 Mpx in all) fits, so they change no detection under normal options. Tiny --min_face_size
# (the first level grows as (12 / minsize)**2), a --factor near 1 (levels without end) and
# thresholds near 0 (every window a candidate, NMS quadratic in them) are what they stop.
MAX_PYRAMID_LEVEL_PIXELS = 24_000_000       # the largest level: P-Net's maps are ~40 bytes a pixel
MAX_PYRAMID_PIXELS = 48_000_000             # all levels together
# Candidates: NMS is quadratic in them (100,000 windows took 23 s). Default options on real
# photos (the samples at 1x and 4x, the largest of shared faces/dev, up to 18 Mpx) stay
# under 1,300 windows a level and 2,100 boxes a photo: these limits are 8-15 times that.
MAX_LEVEL_CANDIDATES = 20_000               # P-Net windows passing on one level, before its NMS
MAX_RNET_CANDIDATES = 20_000                # boxes of one photo from all levels, before its NMS
MAX_ONET_CANDIDATES = 5_000                 # ... into O-Net (so at most this many faces)
MAX_LEVEL_PIXELS = 8_000_000     # source pixels of the photos sharing one P-Net call
MAX_CROPS = 128                  # candidates per R-Net / O-Net call (both slow down past 256)
# R-Net and O-Net calls are padded to a multiple of this many rows: with fewer than 4 rows
# oneDNN takes another GEMM path whose float rounding differs, which would make an image's
# boxes depend on how many candidates its batch happened to hold.
ROW_MULTIPLE = 16


class TooCostly(ValueError):
    """A photo whose detection under these options would pass the bounds above; the message
    says which and what option to change. A verdict on the photo for those options."""


def cost_refusal(height: int, width: int, params: DetectParams) -> str | None:
    """Why a height x width photo is too costly to search under `params`, or None."""
    largest, total = bx.pyramid_pixels(height, width, params.minsize, params.factor)
    if largest > MAX_PYRAMID_LEVEL_PIXELS:
        return (f"too costly for the options: {width}x{height} at min_face_size {params.minsize:g} "
                f"needs a {largest}-pixel pyramid level (limit {MAX_PYRAMID_LEVEL_PIXELS}); "
                f"raise --min_face_size")
    if total > MAX_PYRAMID_PIXELS:
        return (f"too costly for the options: {width}x{height} at min_face_size {params.minsize:g}, "
                f"factor {params.factor:g} needs {total:.0f} pyramid pixels (limit "
                f"{MAX_PYRAMID_PIXELS}); raise --min_face_size or lower --factor")
    return None


def _too_many(n: int, limit: int, what: str) -> None:
    if n > limit:
        raise TooCostly(f"too costly for the options: {n} {what} (limit {limit}); raise --thresholds")


@dataclass(frozen=True)
class Faces:
    """Faces found in one image, highest-ranked first (facenet's order).
    boxes: (N, 4) float64 x1, y1, x2, y2; scores: (N,) O-Net probability;
    landmarks: (N, 5, 2) (x, y) of left eye, right eye, nose, mouth left, mouth right.
    Coordinates are pixels of the input image."""
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))
    scores: np.ndarray = field(default_factory=lambda: np.zeros(0))
    landmarks: np.ndarray = field(default_factory=lambda: np.zeros((0, 5, 2)))

    def __len__(self) -> int:
        return len(self.scores)


def as_rgb(image) -> np.ndarray:
    """HxWx3 uint8 RGB from HxW (gray), HxWx1, HxWx3 or HxWx4 (RGBA, alpha dropped) uint8."""
    a = np.asarray(image)
    if a.dtype != np.uint8:
        raise ValueError(f"image must be uint8, not {a.dtype}")
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4):
        raise ValueError(f"image must be HxW, HxWx1, HxWx3 or HxWx4, not shape {a.shape}")
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"image is empty: shape {a.shape}")
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    return np.ascontiguousarray(a[:, :, :3])


class NetCalls(Protocol):
    """The three nets as numpy functions; where they run is the implementation's business."""

    def pnet(self, levels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N, H, W, 3) uint8 pyramid levels -> box regression (N, H', W', 4), face
        probability (N, H', W'), float32."""

    def rnet(self, crops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N, 24, 24, 3) normalised float32 crops -> regression (N, 4), probabilities (N, 2)."""

    def onet(self, crops: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(N, 48, 48, 3) -> regression (N, 4), landmarks (N, 10), probabilities (N, 2)."""

    def warm_up(self) -> None:
        """Trace or compile what the first photos would otherwise wait for."""

    def trace_counts(self) -> dict[str, int]:
        """How often each net was traced or compiled so far (where that happens here)."""


class LocalNets:
    """The three nets in this process, numpy in and out (see NetCalls); R-Net and O-Net in
    calls of at most `max_rows` rows."""

    def __init__(self, weights_dir: str | os.PathLike | None = None, max_rows: int = MAX_CROPS):
        from facenet_nets.nets import build_nets, to_numpy, traces
        self.nets = build_nets(weights_dir)
        self.max_rows = max_rows
        self._numpy, self._traces = to_numpy, traces

    def pnet(self, levels):
        return tuple(self._numpy(t) for t in self.nets.pnet_levels(levels))

    def rnet(self, crops):
        return self._rows(self.nets.rnet, crops)

    def onet(self, crops):
        return self._rows(self.nets.onet, crops)

    def _rows(self, net, x: np.ndarray) -> tuple:
        chunks = [[self._numpy(o) for o in net(x[s:s + self.max_rows])]
                  for s in range(0, len(x), self.max_rows)]
        return tuple(np.concatenate(o) for o in zip(*chunks))

    def warm_up(self) -> None:
        self.pnet(np.zeros((1, 12, 12, 3), np.uint8))
        self.rnet(np.zeros((ROW_MULTIPLE, 24, 24, 3), np.float32))
        self.onet(np.zeros((ROW_MULTIPLE, 48, 48, 3), np.float32))

    def trace_counts(self) -> dict[str, int]:
        counts = self.nets.trace_counts()
        counts["pnet_levels"] = self._traces(self.nets.pnet_levels)
        return counts


class Detector:
    """The three nets, loaded once (or reached in the nets server), and the cascade over them."""

    def __init__(self, weights_dir: str | os.PathLike | None = None, nets: NetCalls | None = None):
        self.nets = nets or LocalNets(weights_dir)

    def warm_up(self) -> None:
        """Trace every function once (on zeros), so the first photos do not pay for it."""
        self.nets.warm_up()

    def trace_counts(self) -> dict[str, int]:
        return self.nets.trace_counts()

    def detect(self, image, params: DetectParams = DetectParams()) -> Faces:
        return self.detect_batch([image], params)[0]

    def detect_batch(self, images, params: DetectParams = DetectParams()) -> list[Faces]:
        """Faces of each image; each result equals that of detecting the image alone."""
        images = [as_rgb(im) for im in images]
        for im in images:
            reason = cost_refusal(*im.shape[:2], params)
            if reason:
                raise TooCostly(reason)
        _, t2, t3 = params.thresholds
        cands = self._stage1(images, params)
        # R-Net
        crops = [_crops(im, c, 24) for im, c in zip(images, cands)]
        outs = _run_split(self.nets.rnet, crops)
        for i, out in enumerate(outs):
            if out is None:
                continue
            reg, prob = out
            keep = prob[:, 1] > t2
            c = np.column_stack([cands[i][keep, :4], prob[keep, 1]])
            reg = reg[keep]
            pick = bx.nms(c, 0.7, "union")
            cands[i] = np.fix(bx.rerec(bx.bbreg(c[pick], reg[pick])))
            _too_many(len(cands[i]), MAX_ONET_CANDIDATES, "R-Net candidates for O-Net")
        # O-Net
        crops = [_crops(im, c, 48) for im, c in zip(images, cands)]
        outs = _run_split(self.nets.onet, crops)
        results = []
        for i, out in enumerate(outs):
            if out is None:
                results.append(Faces())
                continue
            reg, marks, prob = out
            keep = prob[:, 1] > t3
            c = np.column_stack([cands[i][keep, :4], prob[keep, 1]])
            reg, marks = reg[keep], marks[keep].astype(np.float64)
            w = (c[:, 2] - c[:, 0] + 1)[:, None]
            h = (c[:, 3] - c[:, 1] + 1)[:, None]
            landmarks = np.stack([w * marks[:, :5] + c[:, 0:1] - 1,
                                  h * marks[:, 5:] + c[:, 1:2] - 1], axis=-1)
            c = bx.bbreg(c, reg)
            pick = bx.nms(c, 0.7, "min")
            results.append(Faces(c[pick, :4], c[pick, 4], landmarks[pick]))
        return results

    def _stage1(self, images: list[np.ndarray], params: DetectParams) -> list[np.ndarray]:
        """P-Net candidates per image: (K, 5) rows [x1, y1, x2, y2, score], the corners
        truncated to integers, after NMS, P-Net regression and squaring; the pyramid of
        images of one size runs batched."""
        t1 = params.thresholds[0]
        per_level: dict[tuple[int, int], np.ndarray] = {}
        plans = [[(s, bx.level_size(*im.shape[:2], s))
                  for s in bx.pyramid_scales(*im.shape[:2], params.minsize, params.factor)]
                 for im in images]
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, im in enumerate(images):
            if plans[i]:
                by_size.setdefault(im.shape[:2], []).append(i)
        for (h, w), members in by_size.items():
            step = max(1, MAX_LEVEL_PIXELS // (h * w))     # images of one size share every level
            for start in range(0, len(members), step):
                chunk = members[start:start + step]
                for level, (scale, (lh, lw)) in enumerate(plans[chunk[0]]):
                    levels = np.empty((len(chunk), lh, lw, 3), np.uint8)
                    for j, i in enumerate(chunk):
                        cv2.resize(images[i], (lw, lh), dst=levels[j], interpolation=cv2.INTER_AREA)
                    reg, prob = self.nets.pnet(levels)
                    for j, i in enumerate(chunk):
                        b = bx.generate_boxes(prob[j], reg[j], scale, t1)
                        _too_many(len(b), MAX_LEVEL_CANDIDATES, "P-Net windows on one pyramid level")
                        per_level[(i, level)] = b[bx.nms(b, 0.5, "union")]
        out = []
        for i, plan in enumerate(plans):
            c = np.concatenate([per_level[(i, k)] for k in range(len(plan))] or [np.zeros((0, 9))])
            _too_many(len(c), MAX_RNET_CANDIDATES, "P-Net candidates from all levels")
            c = c[bx.nms(c, 0.7, "union")]
            c = bx.rerec(bx.pnet_regress(c))
            c[:, :4] = np.fix(c[:, :4])
            out.append(c)
        return out


def _crops(image: np.ndarray, boxes: np.ndarray, size: int) -> np.ndarray | None:
    """Normalised size x size crops of facenet's pad windows of `boxes` (None when there are
    none). The summed-area table covers only the part of the image the windows touch."""
    if len(boxes) == 0:
        return None
    windows = bx.crop_windows(boxes)
    h, w = image.shape[:2]
    left, top = np.floor(windows[:, :2].min(axis=0))
    right, bottom = np.ceil(windows[:, 2:].max(axis=0))
    x0, y0 = int(np.clip(left, 0, w - 1)), int(np.clip(top, 0, h - 1))
    x1, y1 = int(np.clip(right, x0 + 1, w)), int(np.clip(bottom, y0 + 1, h))
    sat = summed_area_table(image[y0:y1, x0:x1])
    crops = native.area_crops if native.LIB else normalised_crops
    return crops(sat, windows - np.array([x0, y0, x0, y0]), size, NORM_MEAN, NORM_SCALE)


def _run_split(net, batches: list[np.ndarray | None]) -> list[tuple | None]:
    """Run `net` (a NetCalls method) once over the concatenation of the non-empty batches,
    padded to ROW_MULTIPLE rows; give each batch back its own rows of every output."""
    parts = [b for b in batches if b is not None]
    if not parts:
        return [None] * len(batches)
    rows = sum(len(p) for p in parts)
    x = np.zeros((rows + -rows % ROW_MULTIPLE,) + parts[0].shape[1:], parts[0].dtype)
    np.concatenate(parts, out=x[:rows])
    outs = net(x)
    result, start = [], 0
    for b in batches:
        if b is None:
            result.append(None)
            continue
        result.append(tuple(o[start:start + len(b)] for o in outs))
        start += len(b)
    return result


_detector: Detector | None = None
_lock = threading.Lock()


def default_detector() -> Detector:
    """The process's detector, built on first use (weights found or fetched as
    facenet_nets.weights says)."""
    global _detector
    with _lock:
        if _detector is None:
            _detector = Detector()
        return _detector


def detect_faces(image, *, minsize: float = 20, thresholds=(0.6, 0.7, 0.7),
                 factor: float = 0.709) -> Faces:
    """Faces in one HxWx3 (or HxW gray, HxWx4 RGBA) uint8 RGB image; see Faces."""
    return default_detector().detect(image, DetectParams(minsize, tuple(thresholds), factor))


def detect_faces_batch(images, *, minsize: float = 20, thresholds=(0.6, 0.7, 0.7),
                       factor: float = 0.709) -> list[Faces]:
    """detect_faces over a list of images of any sizes, run together; one Faces per image."""
    return default_detector().detect_batch(list(images), DetectParams(minsize, tuple(thresholds), factor))
