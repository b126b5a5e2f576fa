"""The detector on the Keras backend of this process (KERAS_BACKEND), over photos decoded as
facenet decodes them (PIL, to RGB), for tests/test_backends.py, which runs it once per backend.

Usage: python tests/backend_detect.py OUT.json PHOTO...
Writes {"backend": keras's backend, "backend_name": facenet_nets.backend_name()'s, "faces": [{"boxes", "scores", "landmarks"} per photo]}.
"""
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from align.detect import Detector


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
    Path(out).write_text(json.dumps({"backend": keras.backend.backend(), "backend_name": backend_name(),
                                      "faces": faces}))


if __name__ == "__main__":
    main(*sys.argv[1:])
