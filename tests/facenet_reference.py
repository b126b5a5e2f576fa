"""Run facenet's own detect_face (the facenet==1.0.5 wheel) on images, in this process.

Usage: python tests/facenet_reference.py WEIGHTS_DIR OUT.json IMAGE...

It must run in a process of its own: facenet's code needs TF1 graph mode
(tf.compat.v1 with v2 behaviour disabled), which the Keras port cannot share. The wheel's
detect_face.py is read from site-packages and run with the one shim facenet's harness uses,
`import tensorflow.compat.v1 as tf`; nothing of it is copied into this project.
Images are decoded as tests/test_parity.py decodes them (PIL, converted to RGB).
"""
import importlib.util
import json
import sys
import types

import numpy as np
import tensorflow.compat.v1 as tf
from PIL import Image


def load_detect_face() -> types.ModuleType:
    spec = importlib.util.find_spec("facenet")
    path = spec.submodule_search_locations[0] + "/src/align/detect_face.py"
    with open(path, newline="") as f:
        src = f.read().replace("\r\n", "\n")
    shimmed = src.replace("import tensorflow as tf\n", "import tensorflow.compat.v1 as tf\n")
    assert shimmed != src, "facenet's detect_face.py no longer imports tensorflow as expected"
    module = types.ModuleType("facenet_detect_face")
    module.__file__ = path
    exec(compile(shimmed, path, "exec"), module.__dict__)
    return module


def main(weights_dir: str, out_path: str, paths: list[str]) -> None:
    tf.disable_v2_behavior()
    df = load_detect_face()
    results = []
    with tf.Graph().as_default():
        sess = tf.Session()
        with sess.as_default():
            pnet, rnet, onet = df.create_mtcnn(sess, weights_dir)
        for p in paths:
            img = np.asarray(Image.open(p).convert("RGB"))
            boxes, points = df.detect_face(img, 20, pnet, rnet, onet, [0.6, 0.7, 0.7], 0.709)
            results.append({"path": p, "boxes": np.asarray(boxes).tolist(),
                            "landmarks": np.asarray(points).T.tolist()})
    with open(out_path, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
