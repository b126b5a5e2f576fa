"""Weights: found in order, verified before unpickling, refused with a clear message."""
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from facenet_nets import weights as w


def test_checksums_file_matches_code():
    lines = (w.CHECKOUT_DATA / "weights.sha256").read_text().split("\n")
    listed = dict(reversed(line.split()) for line in lines if line.strip())
    assert listed == w.SHA256


def test_load_verifies_and_returns_layer_dicts(weights):
    d = w.load_weights("det1.npy", weights)
    assert sorted(d) == ["PReLU1", "PReLU2", "PReLU3", "conv1", "conv2", "conv3", "conv4-1", "conv4-2"]
    assert d["conv1"]["weights"].shape == (3, 3, 3, 10)
    assert w.load_weights("det3.npy", weights)["conv6-3"]["weights"].shape == (256, 10)


class _Payload:
    """Unpickled, it creates the file `marker`: proof that a pickle ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def copies_and_payload(weights: Path, folder: Path, payload: Path) -> Path:
    """The three weight files copied into `folder`, and a pickle payload saved as `payload`;
    returns the marker file the payload would create."""
    for name in w.SHA256:
        shutil.copy(weights / name, folder / name)
    marker = folder / "unpickled"
    np.save(payload, np.array(_Payload(marker), dtype=object), allow_pickle=True)
    return marker


def test_tampered_file_is_refused_before_unpickling(weights, tmp_path):
    marker = copies_and_payload(weights, tmp_path, tmp_path / "det2.npy")
    with pytest.raises(w.WeightsError, match="refusing to unpickle"):
        w.load_weights("det2.npy", tmp_path)
    assert not marker.exists()
    assert w.load_weights("det1.npy", tmp_path)["conv1"]["biases"].shape == (10,)


def test_explicit_dir_wins_and_must_be_complete(weights, tmp_path, monkeypatch):
    monkeypatch.setenv(w.ENV_VAR, str(tmp_path))
    with pytest.raises(w.WeightsError, match="det1.npy, det2.npy, det3.npy"):
        w.weights_dir()
    for name in w.SHA256:
        shutil.copy(weights / name, tmp_path / name)
    assert w.weights_dir() == tmp_path


def test_offline_fetch_says_what_to_put_where(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(w, "CHECKOUT_DATA", tmp_path / "no-data")
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")   # nothing listens there
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    with pytest.raises(w.WeightsError) as e:
        w.weights_dir()
    message = str(e.value)
    assert "facenet==1.0.5" in message and str(tmp_path / "cache") in message
    assert "ALIGN_WEIGHTS_DIR" in message
    assert not any((tmp_path / "cache").rglob("*.npy"))


_swap = {}      # armed by the test below; an audit hook cannot be removed, so it checks this


def _swap_on_second_open(event, args):
    if event == "open" and _swap and os.fspath(args[0]) == str(_swap["target"]):
        _swap["opens"] += 1
        if _swap["opens"] == 2:     # the file is replaced between the check and the load
            os.replace(_swap["payload"], _swap["target"])


def test_a_file_swapped_after_the_check_is_never_unpickled(weights, tmp_path):
    """The race: the file is hashed, then replaced by a pickle payload before it is unpickled.
    The file's bytes are read once, so the payload is never even opened."""
    payload = tmp_path / "payload.npy"
    marker = copies_and_payload(weights, tmp_path, payload)
    sys.addaudithook(_swap_on_second_open)
    _swap.update(target=tmp_path / "det2.npy", payload=payload, opens=0)
    try:
        d = w.load_weights("det2.npy", tmp_path)
    finally:
        opens = _swap.pop("opens")
        _swap.clear()
    assert not marker.exists(), "the swapped-in pickle ran"
    assert opens == 1
    assert d["conv5-1"]["weights"].shape == (128, 2)


def test_an_installed_package_never_looks_in_a_data_folder_beside_it(tmp_path):
    """Installed, facenet_nets sits in site-packages, where a `data/` folder is some other
    package's: even one that holds files of the right names is not looked at."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    site = tmp_path / "site-packages"
    shutil.copytree(Path(w.__file__).parent, site / "facenet_nets",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (site / "data").mkdir()
    shutil.copy(w.CHECKOUT_DATA / "weights.sha256", site / "data")
    for name in w.SHA256:
        (site / "data" / name).write_bytes(b"not the weights")
    code = "import facenet_nets.weights as w; print(w.CHECKOUT_DATA, w.weights_dir())"
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(site)))
    assert proc.returncode == 0, proc.stderr
    checkout_data, found = proc.stdout.split()
    assert checkout_data == "None" and Path(found) != site / "data"
