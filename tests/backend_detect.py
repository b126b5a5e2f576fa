"""The detector on the Keras backend of this process (KERAS_BACKEND), over photos decoded as
facenet decodes them (PIL, to RGB), for tests/test_backends.py, which runs it once per backend.

Usage: python tests/backend_detect.py OUT.json PHOTO...
Writes {"backend": keras's backend, "backend_name": facenet_nets.backend_name()'s, "faces": [{"boxes", "scores", "landmarks"} per photo]},
and on JAX "levels": P-Net on levels of odd and even sizes against the model on each level alone
({"worst": the largest difference, "compilations", "sizes"}; JAX pads levels to buckets).
"""
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from align.detect import Detector


LEVEL_SIZES = [(12, 12), (13, 17), (25, 31), (37, 12), (99, 64), (100, 63), (250, 251), (251, 250)]


def levels_check() -> dict:
    from facenet_nets.nets import NORM_MEAN, NORM_SCALE, build_nets
    nets = build_nets()
    x = np.random.default_rng(0).integers(0, 256, (3, 251, 251, 3), dtype=np.uint8)
    worst = 0.0
    for h, w in LEVEL_SIZES:
        level = x[:, :h, :w]
        normalised = (level.astype(np.float32) - NORM_MEAN) * NORM_SCALE
        want = [np.asarray(t) for t in nets.pnet_model(normalised, training=False)]
        for got in (nets.pnet_levels(level), nets.pnet(normalised)):
            for a, b in zip(got, want):
                assert a.shape == b.shape, (h, w, a.shape, b.shape)
                worst = max(worst, float(np.abs(a - b).max()))
    return {"worst": worst, "compilations": nets.pnet_levels.compilations(), "sizes": len(LEVEL_SIZES)}


def main(out: str, *photos: str) -> None:
    import keras
    from facenet_nets import backend_name
    detector = Detector()
    faces = []
    for path in photos:
        with Image.open(path) as im:
            f = detector.detect(np.asarray(im.convert("RGB")))
        faces.append({"boxes": f.boxes.tolist(), "scores": f.scores.tolist(),
                      "landmarks": f.landmarks.tolist()})
    result = {"backend": keras.backend.backend(), "backend_name": backend_name(), "faces": faces}
    if result["backend"] == "jax":
        result["levels"] = levels_check()
    Path(out).write_text(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:])
