"""Run facenet's own detect_face (the facenet==1.0.5 wheel) on images, in this process.

Usage: python tests/facenet_reference.py WEIGHTS_DIR OUT.json IMAGE...
       python tests/facenet_reference.py WEIGHTS_DIR --nets IN.npz OUT.npz
The second form runs each net alone on the tensors p, r, o of IN.npz ((N, H, W, 3) images as
the Keras port takes them; facenet's transposed layout is applied here) and saves their
outputs, transposed back, as p0 p1 / r0 r1 / o0 o1 o2.

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
import warnings

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
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SyntaxWarning)     # its nms: `method is 'Min'`
        code = compile(shimmed, path, "exec")
    exec(code, module.__dict__)
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


def run_nets(weights_dir: str, in_path: str, out_path: str) -> None:
    tf.disable_v2_behavior()
    df = load_detect_face()
    x = np.load(in_path)
    t = lambda a: np.transpose(a, (0, 2, 1, 3))
    with tf.Graph().as_default():
        sess = tf.Session()
        with sess.as_default():
            pnet, rnet, onet = df.create_mtcnn(sess, weights_dir)
        p, r, o = pnet(t(x["p"])), rnet(t(x["r"])), onet(t(x["o"]))
    np.savez(out_path, p0=t(p[0]), p1=t(p[1]), r0=r[0], r1=r[1], o0=o[0], o1=o[1], o2=o[2])


if __name__ == "__main__":
    if sys.argv[2] == "--nets":
        run_nets(sys.argv[1], sys.argv[3], sys.argv[4])
    else:
        main(sys.argv[1], sys.argv[2], sys.argv[3:])
