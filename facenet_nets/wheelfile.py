"""Files that PyPI wheels carry: download with pip, extract one member, verify its sha256."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path


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


TEMP_PREFIX, TEMP_SUFFIX = ".tmp-", ".tmp"     # write_atomic's temporary names


def write_atomic(dest: str | bytes | os.PathLike, data: bytes) -> None:
    """Write `data` to `dest` through a temporary file in the same folder (`.tmp-*.tmp`, short
    whatever the length of `dest`'s name) and a rename. On failure `dest` is untouched.
    Creates missing parent folders."""
    dest = Path(os.fsdecode(dest))
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=TEMP_PREFIX, suffix=TEMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o644)    # mkstemp makes 0600; outputs are for everyone to read
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def fsync_dir(path: Path) -> None:
    """Make the renames into `path` durable (what a power loss may otherwise undo)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
