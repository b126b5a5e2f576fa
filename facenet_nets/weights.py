"""Find, fetch, verify and load facenet's MTCNN weights (det1.npy, det2.npy, det3.npy).

They are pickled dicts {layer name: {param name: array}} from the facenet==1.0.5 wheel. A file
is read once into memory, and those bytes are unpickled only after their sha256 matches the
digest below: a tampered or truncated file is refused before any of its bytes are interpreted,
and a file swapped after the check is never read.

Where they are looked for, in order:
1. an explicit directory (argument, or the ALIGN_WEIGHTS_DIR environment variable);
2. `data/` of a source checkout (beside this package; never site-packages' `data/`);
3. the per-user cache, `$XDG_CACHE_HOME/align-dataset/weights` (default `~/.cache/...`),
   where they are fetched from PyPI when no directory has them.
"""
from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import numpy as np

from facenet_nets.wheelfile import FetchError, fetch_members, sha256_of, user_cache_dir

WHEEL = "facenet==1.0.5"
MEMBER_DIR = "facenet/src/align"
SHA256 = {
    "det1.npy": "3285cf7a3de2651c5784cb9e32013f5919aae95fd1ed1bc371dd9691affb39af",
    "det2.npy": "716b8b83e42476791c9096f14dbb09fefc88bf5c7ec876b1683f9acd52b3f39c",
    "det3.npy": "396ead803d85d3443307ff8f45fb6aed2536579b415a4f4d4cb8f93ea6b1476a",
}
ENV_VAR = "ALIGN_WEIGHTS_DIR"


def _checkout_data() -> Path | None:
    """`data/` of the source checkout this package runs from; None when installed (in
    site-packages there is no checkout, and a `data/` folder there is another package's)."""
    root = Path(__file__).resolve().parent.parent
    if (root / "setup.cfg").is_file() and (root / "data" / "weights.sha256").is_file():
        return root / "data"
    return None


CHECKOUT_DATA = _checkout_data()


class WeightsError(RuntimeError):
    """The weights are missing, cannot be fetched, or do not match their checksum."""


def cache_dir() -> Path:
    return user_cache_dir("weights")


def _has_all(directory: Path) -> bool:
    return all((directory / name).is_file() for name in SHA256)


def weights_dir(directory: str | os.PathLike | None = None) -> Path:
    """The directory that holds det1..3.npy, fetching them into the cache when none does.

    An explicit directory (argument or ALIGN_WEIGHTS_DIR) must hold all three files: it is
    never silently replaced by another. Files are not verified here: `load_weights` does that."""
    explicit = directory or os.environ.get(ENV_VAR)
    if explicit:
        path = Path(explicit)
        if not _has_all(path):
            missing = [n for n in SHA256 if not (path / n).is_file()]
            raise WeightsError(f"{path} lacks {', '.join(missing)} (from {WHEEL}, {MEMBER_DIR}/)")
        return path
    for candidate in (CHECKOUT_DATA, cache_dir()):
        if candidate is not None and _has_all(candidate):
            return candidate
    cache = cache_dir()
    try:
        fetch_members(WHEEL, {f"{MEMBER_DIR}/{name}": (digest, cache / name)
                              for name, digest in SHA256.items()})
    except (FetchError, OSError) as e:
        raise WeightsError(
            f"MTCNN weights not found and not fetched ({e}). Download the {WHEEL} wheel "
            f"(pip download --no-deps {WHEEL}), copy {', '.join(SHA256)} from its {MEMBER_DIR}/ "
            f"into {cache} (or any folder named by {ENV_VAR})") from e
    return cache


def _check(path: Path, got: str) -> None:
    if got != SHA256[path.name]:
        raise WeightsError(f"{path} has sha256 {got}, expected {SHA256[path.name]}: refusing to "
                           f"unpickle it. Delete it and run again to fetch a good copy.")


def verify_weights(directory: str | os.PathLike | None = None) -> Path:
    """The weights directory (fetched when needed) once all three files match their sha256."""
    path = weights_dir(directory)
    for name in SHA256:
        _check(path / name, sha256_of(path / name))
    return path


def load_weights(name: str, directory: str | os.PathLike | None = None) -> dict:
    """The dict {layer: {param: ndarray}} of `name` ("det1.npy", "det2.npy" or "det3.npy"),
    unpickled only after its sha256 matched."""
    if name not in SHA256:
        raise ValueError(f"unknown weights file {name!r}; expected one of {sorted(SHA256)}")
    path = weights_dir(directory) / name
    data = path.read_bytes()        # once: the bytes unpickled are the bytes hashed
    _check(path, hashlib.sha256(data).hexdigest())
    return np.load(io.BytesIO(data), encoding="latin1", allow_pickle=True).item()


if __name__ == "__main__":
    print(verify_weights())
