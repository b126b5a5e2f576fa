"""MTCNN box math in numpy (NMS's greedy loop also in C), faithful to facenet's detect_face.

Boxes are float64 rows [x1, y1, x2, y2, score, ...] in pixels of the input image. facenet's
code (after the MATLAB original) treats x1..x2 as inclusive 1-based pixel indices in `pad`
and adds 1 to widths in NMS areas and `bbreg`, but not in the P-Net regression: each function
below says which convention it follows.
"""
from __future__ import annotations

import numpy as np

from align import native

STRIDE = 2      # P-Net output cell step, in pixels of the pyramid level
CELL = 12       # P-Net receptive field, in pixels of the pyramid level


def pyramid_scales(height: int, width: int, minsize: float, factor: float) -> list[float]:
    """Scales of the image pyramid: m * factor**k for k = 0, 1, ... while the shorter side of
    the scaled image, min(h, w) * m * factor**k, is at least 12 px; m = 12 / minsize."""
    m = 12.0 / minsize
    minl = min(height, width) * m
    scales = []
    k = 0
    while minl >= 12:
        scales.append(m * np.power(factor, k))
        minl *= factor
        k += 1
    return scales


def pyramid_pixels(height: int, width: int, minsize: float, factor: float) -> tuple[int, float]:
    """(pixels of the pyramid's largest level, pixels of all its levels, bounded above by the
    geometric series: largest / (1 - factor**2)), from the sizes alone, before any work."""
    if min(height, width) * 12.0 / minsize < 12:
        return 0, 0.0
    rows, cols = level_size(height, width, 12.0 / minsize)
    return rows * cols, rows * cols / (1 - factor * factor)


def level_size(height: int, width: int, scale: float) -> tuple[int, int]:
    """(rows, cols) of the pyramid level at `scale`: ceil of the scaled size."""
    return int(np.ceil(height * scale)), int(np.ceil(width * scale))


def generate_boxes(prob: np.ndarray, reg: np.ndarray, scale: float, threshold: float,
                   mirror_lone_cell: bool = True) -> np.ndarray:
    """Candidate boxes from one P-Net output map.

    prob: (rows, cols) face probability; reg: (rows, cols, 4) regression (dx1, dy1, dx2, dy2).
    Returns (K, 9) rows [x1, y1, x2, y2, score, dx1, dy1, dx2, dy2], x/y in pixels of the input
    image, for each cell with prob >= threshold, ordered column by column as facenet orders them.

    mirror_lone_cell: facenet reads the regression of a lone passing cell (exactly one cell over
    the threshold on a level) from the cell mirrored across the map's vertical axis: an
    `np.flipud` of the MATLAB port, where `find` returns a row vector in that one case. It is a
    bug, but it changes what facenet outputs: on the 204 photos of shared faces/dev, turning it
    off (bench/parity_dev.py --no-lone-cell-quirk) makes one photo gain a face facenet does not
    find (Farida_Jalal/FaridaJalal_33.jpg) and moves one box by 1.93 px. Datasets aligned with
    facenet carry it, so the detector keeps it (True); False is there to measure it.
    """
    cols, rows = np.where(prob.T >= threshold)      # facenet's order: by column, then row
    score = prob[rows, cols]
    src_cols = cols
    if mirror_lone_cell and cols.shape[0] == 1:
        src_cols = prob.shape[1] - 1 - cols
    offsets = reg[rows, src_cols, :]
    x1 = np.fix((STRIDE * cols + 1) / scale)
    y1 = np.fix((STRIDE * rows + 1) / scale)
    x2 = np.fix((STRIDE * cols + CELL) / scale)
    y2 = np.fix((STRIDE * rows + CELL) / scale)
    return np.column_stack([x1, y1, x2, y2, score, offsets]).astype(np.float64).reshape(-1, 9)


NMS_BLOCK = 256    # boxes whose pairwise overlaps nms computes at once


def _overlap(b: np.ndarray, rows: np.ndarray, cols: np.ndarray, method: str) -> np.ndarray:
    """(len(rows), len(cols)) overlap of boxes b[rows] with b[cols], b's columns being x1, y1,
    x2, y2, area; the same float64 arithmetic, in the same order, as facenet's nms."""
    r, c = b[rows][:, None, :], b[cols][None, :, :]
    w = np.maximum(0.0, np.minimum(r[..., 2], c[..., 2]) - np.maximum(r[..., 0], c[..., 0]) + 1)
    h = np.maximum(0.0, np.minimum(r[..., 3], c[..., 3]) - np.maximum(r[..., 1], c[..., 1]) + 1)
    inter = w * h
    with np.errstate(divide="ignore", invalid="ignore"):     # empty boxes: NaN, as facenet's
        if method == "min":
            return inter / np.minimum(r[..., 4], c[..., 4])
        return inter / (r[..., 4] + c[..., 4] - inter)


def nms(boxes: np.ndarray, threshold: float, method: str = "union") -> np.ndarray:
    """Greedy non-maximum suppression; indices of the kept boxes, highest score first.

    Areas count inclusive pixels, (x2 - x1 + 1) * (y2 - y1 + 1). Boxes are taken by score;
    one is dropped when its overlap with a box kept before it is not <= `threshold` (NaN
    drops, as in facenet); overlap is intersection over union ("union") or over the smaller
    area ("min"). Ties in score are broken as facenet's np.argsort (the default, unstable
    kind) breaks them, so the same input gives its order. The greedy loop runs in C
    (native.nms_kept) where the extension is built, else in numpy (nms_kept)."""
    if method not in ("union", "min"):
        raise ValueError(f"method must be 'union' or 'min', not {method!r}")
    if boxes.shape[0] == 0:
        return np.zeros(0, dtype=np.intp)
    order = np.argsort(boxes[:, 4])[::-1]
    x1, y1, x2, y2 = (boxes[order, i] for i in range(4))
    b = np.column_stack([x1, y1, x2, y2, (x2 - x1 + 1) * (y2 - y1 + 1)])
    kept = native.nms_kept(b, threshold, method) if native.LIB else nms_kept(b, threshold, method)
    return order[kept]


def nms_kept(b: np.ndarray, threshold: float, method: str) -> np.ndarray:
    """The greedy loop of `nms` over b (rows x1, y1, x2, y2, area, in the order it takes
    them): positions of the rows kept. Overlaps are computed NMS_BLOCK boxes at a time:
    against the boxes already kept, then within the block. native.nms_kept is its C twin."""
    kept = np.zeros(0, dtype=np.intp)
    for start in range(0, len(b), NMS_BLOCK):
        block = np.arange(start, min(start + NMS_BLOCK, len(b)))
        alive = (_overlap(b, kept, block, method) <= threshold).all(axis=0)
        spares = _overlap(b, block, block, method) <= threshold     # [j, k]: j lets k stay
        for j in range(len(block)):
            if alive[j]:
                alive[j + 1:] &= spares[j, j + 1:]
        kept = np.concatenate([kept, block[alive]])
    return kept


def pnet_regress(boxes: np.ndarray) -> np.ndarray:
    """Apply P-Net's regression columns 5..8 of (K, 9) candidates; returns (K, 5) boxes
    [x1, y1, x2, y2, score]. Offsets scale with x2 - x1 (no +1, as facenet)."""
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    return np.column_stack([boxes[:, 0] + boxes[:, 5] * w, boxes[:, 1] + boxes[:, 6] * h,
                            boxes[:, 2] + boxes[:, 7] * w, boxes[:, 3] + boxes[:, 8] * h,
                            boxes[:, 4]])


def bbreg(boxes: np.ndarray, reg: np.ndarray) -> np.ndarray:
    """Apply R-Net/O-Net regression (K, 4) to boxes (K, >=4); offsets scale with the
    inclusive size x2 - x1 + 1. Returns a new array; columns past 4 are kept."""
    out = boxes.astype(np.float64, copy=True)
    w = boxes[:, 2] - boxes[:, 0] + 1
    h = boxes[:, 3] - boxes[:, 1] + 1
    out[:, 0] += reg[:, 0] * w
    out[:, 1] += reg[:, 1] * h
    out[:, 2] += reg[:, 2] * w
    out[:, 3] += reg[:, 3] * h
    return out


def rerec(boxes: np.ndarray) -> np.ndarray:
    """Square each box on its centre, side max(x2 - x1, y2 - y1). Returns a new array."""
    out = boxes.astype(np.float64, copy=True)
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    side = np.maximum(w, h)
    out[:, 0] = boxes[:, 0] + w * 0.5 - side * 0.5
    out[:, 1] = boxes[:, 1] + h * 0.5 - side * 0.5
    out[:, 2] = out[:, 0] + side
    out[:, 3] = out[:, 1] + side
    return out


def crop_windows(boxes: np.ndarray) -> np.ndarray:
    """The image region facenet's `pad` crops for integer boxes, as (K, 4) pixel edges
    [left, top, right, bottom] of the input image (0-based, right/bottom exclusive).

    facenet reads x1..x2 as 1-based inclusive columns, so the crop starts at edge x1 - 1 and
    is x2 - x1 + 1 wide; the part outside the image is filled with zeros."""
    b = np.asarray(boxes[:, :4], dtype=np.float64)
    return np.column_stack([b[:, 0] - 1, b[:, 1] - 1, b[:, 2], b[:, 3]])
