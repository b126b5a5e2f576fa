"""The nets on Keras's other backends (KERAS_BACKEND=jax|torch) against facenet's own
detections and the TensorFlow backend; the nets server (--device) against the usual path; a
run where TensorFlow cannot be imported at all."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, SHARED, decode

BACKENDS = ["jax", "torch"]
REFERENCE = SHARED / "reference" / "facenet_dev.jsonl"
TIMEOUT_S = 1800       # a guard against a hang (JAX compiles P-Net for each level size: minutes)


def env(backend: str, *path_first: Path) -> dict:
    paths = [*map(str, path_first), str(REPO), os.environ.get("PYTHONPATH")]
    return dict(os.environ, KERAS_BACKEND=backend, PYTHONPATH=os.pathsep.join(filter(None, paths)))


def need(backend: str) -> None:
    if importlib.util.find_spec(backend) is None:
        pytest.skip(f"{backend} is not installed (pip install '.[backends]'; make venv does)")


@pytest.fixture(scope="module")
def dev_detections(tmp_path_factory) -> tuple[list[dict], dict[str, dict]]:
    """facenet's reference rows of the dev set, and {backend: tests/backend_detect.py's output
    on those photos} for each installed other backend, run side by side. (TensorFlow's own
    parity on the dev set is tests/test_detect.py's.)"""
    if not REFERENCE.exists():
        pytest.skip(f"needs {REFERENCE} and ../shared/faces/dev")
    rows = [json.loads(line) for line in REFERENCE.read_text().splitlines() if line.strip()]
    photos = [str(SHARED / "faces" / "dev" / row["path"]) for row in rows]
    folder = tmp_path_factory.mktemp("backends")
    running = {}
    for backend in BACKENDS:
        if importlib.util.find_spec(backend) is not None:
            out = folder / f"{backend}.json"
            cmd = [sys.executable, str(REPO / "tests" / "backend_detect.py"), str(out), *photos]
            running[backend] = (out, subprocess.Popen(cmd, env=env(backend), stdout=subprocess.PIPE,
                                                      stderr=subprocess.STDOUT, text=True))
    results = {}
    try:
        for backend, (out, proc) in running.items():
            log, _ = proc.communicate(timeout=TIMEOUT_S)
            assert proc.returncode == 0, f"{backend}: {log[-3000:]}"
            results[backend] = json.loads(out.read_text())
    finally:
        for _, proc in running.values():
            proc.kill()
            proc.wait()
    return rows, results


@pytest.mark.parametrize("backend", BACKENDS)
def test_dev_set_parity_with_facenet(dev_detections, backend):
    need(backend)
    rows, results = dev_detections
    ours = results[backend]
    assert ours["backend"] == ours["backend_name"] == backend
    mismatched, deltas = [], []
    for row, faces in zip(rows, ours["faces"]):
        ref = np.asarray(row["boxes"], dtype=np.float64).reshape(-1, 5)
        boxes = np.asarray(faces["boxes"]).reshape(-1, 4)
        if len(boxes) != len(ref):
            mismatched.append(row["path"])
        elif len(ref):
            deltas.extend(np.abs(boxes - ref[:, :4]).max(axis=1))
    deltas = np.asarray(deltas)
    print(f"{backend} dev parity: {len(rows)} photos, {len(mismatched)} count mismatches "
          f"{mismatched}, {len(deltas)} faces, box delta max {deltas.max():.4f} px, p99.5 "
          f"{np.percentile(deltas, 99.5):.4f}, median {np.median(deltas):.2e}")
    assert len(mismatched) <= 0.005 * len(rows), mismatched
    assert (deltas <= 0.5).mean() >= 0.995


def test_jax_pnet_pads_levels_to_buckets_and_gives_each_levels_own_map(dev_detections):
    """On JAX, P-Net compiles once for every input shape, so a level is padded to a bucket
    size: the map is still the level's own (odd sizes, where the pool's SAME padding at the
    edge matters, included), and sizes share compilations (tests/backend_detect.py's check)."""
    need("jax")
    levels = dev_detections[1]["jax"]["levels"]
    assert levels["worst"] <= 1e-6, levels
    assert levels["compilations"] < levels["sizes"], levels    # (250, 251) and (251, 250) share one; so do the two near 100


@pytest.mark.parametrize("backend", BACKENDS)
def test_arcface_crops_within_one_gray_level_of_facenets_landmarks(dev_detections, backend):
    """The arcface crop of each face from the backend's landmarks against the crop from
    facenet's (which the TensorFlow backend gives to 1e-4 px, tests/test_detect.py)."""
    need(backend)
    from align.warp import warp_face
    rows, results = dev_detections
    compared, worst = 0, 0
    for row, faces in zip(rows, results[backend]["faces"]):
        if len(faces["landmarks"]) != len(row["landmarks"]) or not faces["landmarks"]:
            continue
        image = decode(SHARED / "faces" / "dev" / row["path"])
        for ours, theirs in zip(faces["landmarks"], row["landmarks"]):
            a = warp_face(image, np.asarray(ours)).astype(np.int16)
            b = warp_face(image, np.asarray(theirs).reshape(2, 5).T).astype(np.int16)   # facenet: 5 x, 5 y
            worst = max(worst, int(np.abs(a - b).max()))
            compared += 1
    print(f"{backend}: {compared} arcface crops, largest difference from facenet's {worst} gray levels")
    assert compared >= 0.99 * sum(len(row["landmarks"]) for row in rows)
    assert worst <= 1


def photo_folder(root: Path, sample_paths: dict, lfw: int = 0) -> Path:
    """The sample photos, one identity folder each, and the first `lfw` photos of
    ../shared/faces/lfw_gwb in two more."""
    for name, path in sample_paths.items():
        (root / Path(name).stem).mkdir(parents=True)
        (root / Path(name).stem / name).write_bytes(path.read_bytes())
    source = SHARED / "faces" / "lfw_gwb"
    if lfw and source.is_dir():
        for i, path in enumerate(sorted(source.glob("*/*"))[:lfw]):
            folder = root / f"lfw_{i % 2}"
            folder.mkdir(exist_ok=True)
            (folder / path.name).write_bytes(path.read_bytes())
    return root


def align(input_dir: Path, out: Path, *args: str, backend: str = "tensorflow", path_first=()) -> dict:
    proc = subprocess.run([sys.executable, "-m", "align", str(input_dir), str(out), "--quiet",
                           "--no-report", *args], env=env(backend, *path_first),
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "summary.json").read_text())


def test_nets_server_gives_the_usual_path_results_bitwise(tmp_path, sample_paths):
    """--device cpu: the workers' nets run in one process, batched across the workers' photos
    (what a GPU gets, here on the CPU); the records and thumbnails are those of the usual
    run, byte for byte."""
    photos = photo_folder(tmp_path / "in", sample_paths, lfw=48)
    usual = align(photos, tmp_path / "usual", "--workers", "2")
    served = align(photos, tmp_path / "served", "--workers", "2", "--device", "cpu")
    assert served["backend"] == usual["backend"] == "tensorflow"
    assert served["faces_written"] == usual["faces_written"] >= 3
    for name in ("faces.jsonl", *(str(p.relative_to(tmp_path / "usual"))
                                  for p in (tmp_path / "usual").glob("*/*.png"))):
        assert (tmp_path / "served" / name).read_bytes() == (tmp_path / "usual" / name).read_bytes(), name


def test_runs_without_tensorflow(tmp_path, sample_paths):
    """KERAS_BACKEND=torch where `import tensorflow` fails (as on a GPU machine that has
    PyTorch and no TensorFlow): the detector in this process, and a run with --device."""
    need("torch")
    blocked = tmp_path / "blocked" / "tensorflow"
    blocked.mkdir(parents=True)
    (blocked / "__init__.py").write_text("raise ModuleNotFoundError('tensorflow is blocked in this test')\n")
    code = ("import sys; from align import detect_faces; from conftest import decode; "
            "print(len(detect_faces(decode(sys.argv[1])))); "
            "assert not any(m.startswith('tensorflow') for m in sys.modules if sys.modules[m])")
    proc = subprocess.run([sys.executable, "-c", code, str(sample_paths["t1.jpg"])],
                          env=env("torch", blocked.parent, REPO / "tests"), capture_output=True,
                          text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-1] == "6"
    summary = align(photo_folder(tmp_path / "in", sample_paths), tmp_path / "out", "--workers", "2",
                    "--device", "cpu", backend="torch", path_first=[blocked.parent])
    assert summary["backend"] == "torch"
    assert summary["aligned"] == summary["faces_written"] == 3


@pytest.mark.parametrize("device, ok", [(None, True), ("cpu", True), ("gpu", True), ("gpu:1", True),
                                        ("cuda", False), ("gpu:", False)])
def test_device_option(device, ok):
    from align.config import Config
    if ok:
        assert Config(device=device).device == device
    else:
        with pytest.raises(ValueError, match="device"):
            Config(device=device)
    with pytest.raises(ValueError, match="local engine"):
        Config(device="gpu", engine="dask")
