"""Durable writes: a file is written to a temporary name, fsync'ed and renamed into place; the
rename is made durable by fsync'ing its folder. A reader never sees a half-written file, and a
run killed at any moment leaves only temporaries (`.tmp-*.tmp`) that the next run removes."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

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
