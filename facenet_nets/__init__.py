"""facenet's three MTCNN nets (P-Net, R-Net, O-Net) as Keras models (`facenet_nets.nets`),
and their weights (`facenet_nets.weights`). Importing the package itself loads nothing."""
from __future__ import annotations

import json
import os

# how facenet feeds its nets: (pixel - 127.5) / 128
NORM_MEAN, NORM_SCALE = 127.5, 0.0078125


def backend_name() -> str:
    """The Keras backend that a process started now runs, as Keras decides it, without
    importing Keras (which would import that backend): $KERAS_BACKEND, else the "backend" of
    $KERAS_HOME/keras.json (default ~/.keras), else "tensorflow"."""
    if os.environ.get("KERAS_BACKEND"):
        return os.environ["KERAS_BACKEND"]
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    try:
        with open(os.path.join(home, "keras.json")) as f:
            return json.load(f).get("backend") or "tensorflow"
    except (OSError, ValueError, AttributeError):
        return "tensorflow"
