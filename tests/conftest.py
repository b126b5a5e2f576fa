"""Shared fixtures: the real sample photos (from PyPI wheels, cached), facenet's own outputs
on them (the reference implementation, in a process of its own), and one Detector."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO / "data"))
import samples  # noqa: E402

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def decode(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


@pytest.fixture(scope="session")
def sample_paths() -> dict[str, Path]:
    """{file name: path} of astronaut.png, grace_hopper.jpg, t1.jpg."""
    return samples.fetch_samples()


@pytest.fixture(scope="session")
def sample_images(sample_paths) -> dict[str, np.ndarray]:
    return {name: decode(p) for name, p in sample_paths.items()}


@pytest.fixture(scope="session")
def weights():
    from facenet_nets.weights import weights_dir
    return weights_dir()


def run_reference(*args) -> None:
    """tests/facenet_reference.py in a subprocess (facenet's code needs TF1 graph mode)."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "facenet_reference.py"), *map(str, args)],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="session")
def reference_faces(sample_paths, weights, tmp_path_factory) -> dict[str, dict]:
    """{file name: {"boxes": (N, 5), "landmarks": (N, 5, 2)}} from facenet's detect_face."""
    out = tmp_path_factory.mktemp("reference") / "faces.json"
    run_reference(weights, out, *sample_paths.values())
    result = {}
    for row in json.loads(out.read_text()):
        boxes = np.asarray(row["boxes"], dtype=np.float64).reshape(-1, 5)
        marks = np.asarray(row["landmarks"], dtype=np.float64).reshape(-1, 10)
        result[Path(row["path"]).name] = {"boxes": boxes,
                                          "landmarks": np.stack([marks[:, :5], marks[:, 5:]], -1)}
    return result


@pytest.fixture(scope="session")
def detector(weights):
    from align.detect import Detector
    return Detector()


@pytest.fixture(scope="session")
def dev_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """One default run (--workers 2 --quiet, OUTPUT_DIR given as `out` from its own cwd) of
    the command on ../shared/faces/dev, shared by the tests that check its records and its
    report and by the Dask engine's comparison: (the finished process, OUTPUT_DIR)."""
    dev = SHARED / "faces" / "dev"
    if not dev.is_dir():
        pytest.skip(f"{dev} is absent (../shared beside the checkout)")
    cwd = tmp_path_factory.mktemp("dev_run")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-m", "align", str(dev), "out", "--workers", "2", "--quiet"],
                          cwd=cwd, env=env, capture_output=True, text=True, errors="replace", timeout=400)
    return proc, cwd / "out"
