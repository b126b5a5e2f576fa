"""Files that PyPI wheels carry: download with pip, extract one member, verify its sha256."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from align.durable import write_atomic


def user_cache_dir(name: str) -> Path:
    """`$XDG_CACHE_HOME/align-dataset/<name>` (default `~/.cache/align-dataset/<name>`)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "align-dataset" / name


class FetchError(RuntimeError):
    """A file could not be fetched from PyPI, or its checksum did not match."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_members(requirement: str, members: dict[str, tuple[str, Path]]) -> None:
    """Download the wheel `requirement` (e.g. "facenet==1.0.5") and write each of its `members`
    (zip path -> (sha256, destination)) to its destination, atomically, after checking the
    digest. Raises FetchError when pip cannot download the wheel or a digest differs."""
    with tempfile.TemporaryDirectory(prefix="align-fetch-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", "-d", tmp, requirement]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or len(wheels) != 1:
            last = (proc.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise FetchError(f"could not download {requirement} from PyPI: {last}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            for member, (sha256, dest) in members.items():
                data = wheel.read(member)
                got = hashlib.sha256(data).hexdigest()
                if got != sha256:
                    raise FetchError(f"{requirement}:{member} has sha256 {got}, expected {sha256}")
                write_atomic(Path(dest), data)
