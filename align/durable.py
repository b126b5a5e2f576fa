"""Durable writes: a file is written to a temporary name, fsync'ed and renamed into place; the
rename is made durable by fsync'ing its folder. A reader never sees a half-written file, and a
run killed at any moment leaves only temporaries (`.tmp-*.tmp`) that the next run removes."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterator

TEMP_PREFIX, TEMP_SUFFIX = ".tmp-", ".tmp"     # write_atomic's temporary names


def write_atomic(dest: str | bytes | os.PathLike, data: bytes) -> None:
    """Write `data` to `dest` through a temporary file in the same folder (`.tmp-*.tmp`, short
    whatever the length of `dest`'s name) and a rename. On failure `dest` is untouched.
    Creates missing parent folders."""
    with atomic_file(dest) as f:
        f.write(data)


@contextlib.contextmanager
def atomic_file(dest: str | bytes | os.PathLike, buffering: int = -1) -> Iterator[BinaryIO]:
    """write_atomic for data written piece by piece: a binary file to write to, which replaces
    `dest` (fsync'ed, renamed) when the block ends without an exception; on an exception
    `dest` is untouched and the temporary is removed."""
    dest = Path(os.fsdecode(dest))
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=TEMP_PREFIX, suffix=TEMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb", buffering) as f:
            os.fchmod(f.fileno(), 0o644)    # mkstemp makes 0600; outputs are for everyone to read
            yield f
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
