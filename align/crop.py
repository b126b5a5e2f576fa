"""facenet's face choice, margin box and thumbnail resize (align_dataset_mtcnn.py)."""
from __future__ import annotations

import numpy as np
from PIL import Image


def choose_faces(boxes: np.ndarray, image_hw: tuple[int, int], multiple: bool) -> list[int]:
    """Indices of the faces to write. All of them with `multiple`; else the one maximising
    area - 2 * (squared distance of the box centre from the image centre), pixels of the
    input image (facenet's "some extra weight on the centering")."""
    n = len(boxes)
    if n == 0:
        return []
    if multiple or n == 1:
        return list(range(n))
    return [int(np.argmax(choice_values(boxes, image_hw)))]


def choice_values(boxes: np.ndarray, image_hw: tuple[int, int]) -> np.ndarray:
    """facenet's value of each face (N,), pixels² of the input image: box area - 2 * squared
    distance of the box centre from the image centre. The largest is the face written."""
    h, w = image_hw
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    dx = (boxes[:, 0] + boxes[:, 2]) / 2 - w / 2
    dy = (boxes[:, 1] + boxes[:, 3]) / 2 - h / 2
    return area - 2.0 * (dx ** 2 + dy ** 2)


def crop_box(box: np.ndarray, image_hw: tuple[int, int], margin: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom), integer pixel edges of the input image: the box grown by
    margin / 2 on each side, clipped to the image, truncated to int as facenet does."""
    h, w = image_hw
    bb = np.zeros(4, dtype=np.int32)
    bb[0] = np.maximum(box[0] - margin / 2, 0)
    bb[1] = np.maximum(box[1] - margin / 2, 0)
    bb[2] = np.minimum(box[2] + margin / 2, w)
    bb[3] = np.minimum(box[3] + margin / 2, h)
    return tuple(int(v) for v in bb)


def thumbnail(image: np.ndarray, box: tuple[int, int, int, int], size: int) -> np.ndarray | None:
    """The crop image[top:bottom, left:right] resized to size x size with PIL's bilinear filter
    (what scipy.misc.imresize(..., 'bilinear') did); None when the crop is empty."""
    left, top, right, bottom = box
    crop = image[top:bottom, left:right]
    if crop.shape[0] == 0 or crop.shape[1] == 0:
        return None
    return np.asarray(Image.fromarray(crop).resize((size, size), Image.BILINEAR))
