"""Walk INPUT_DIR into image tasks, and cut the tasks a run has left to do into shards.

Identities are the sub-folders of INPUT_DIR, sorted; every file in one is a task (whether it
holds an image is found out by the worker, from its content). Anything else at the top of
INPUT_DIR is listed as skipped. Output names follow facenet, `<identity>/<stem><ext>`; when
several files of a folder share a stem (a.jpg, a.png) each of them keeps its whole name
instead (a.jpg.png, a.png.png), so no output overwrites another.
"""
from __future__ import annotations

import hashlib
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

SHARD_SIZE = 32     # images per shard, at most: a worker's journal and detection batches are per shard
MIN_SHARD = 8       # ... and at least (but the last): shards shrink toward the end of a run


class Task:
    """One input file. `rel` is its path relative to INPUT_DIR; `out_base` the output path
    relative to OUTPUT_DIR without extension (a face index and the extension are added).
    A walk makes one per photo, millions of them: slots, and `out_base` kept as its length
    when it is a prefix of `rel` (it almost always is), so a task costs an object and its
    `rel`. Treat as immutable."""
    __slots__ = ("rel", "_base")

    def __init__(self, rel: str, out_base: str):
        self.rel = rel
        self._base = len(out_base) if rel.startswith(out_base) else out_base

    @property
    def out_base(self) -> str:
        base = self._base
        return self.rel[:base] if base.__class__ is int else base

    def __eq__(self, other) -> bool:
        if other.__class__ is not Task:
            return NotImplemented
        return self.rel == other.rel and self.out_base == other.out_base

    def __hash__(self) -> int:
        return hash((self.rel, self.out_base))

    def __repr__(self) -> str:
        return f"Task(rel={self.rel!r}, out_base={self.out_base!r})"

    def __reduce__(self):
        return Task, (self.rel, self.out_base)


@dataclass(frozen=True)
class Shard:
    """A run of consecutive tasks (of one identity or several); `key` names its journal."""
    key: str
    tasks: tuple[Task, ...]


@dataclass(frozen=True)
class Walk:
    tasks: list[Task]         # identities sorted by name, then their files by name
    skipped: list[str]        # top-level entries of INPUT_DIR that are not identity folders


def output_stems(names: list[str]) -> dict[str, str]:
    """{file name: output stem} for the files of one folder, unique within it."""
    stems = {n: _stem(n) for n in names}
    if len(set(stems.values())) == len(stems):
        return stems
    while True:
        counts = Counter(stems.values())
        clashes = [n for n, s in stems.items() if counts[s] > 1 and s != n]
        if not clashes:
            return stems
        for n in clashes:
            stems[n] = n


def _stem(name: str) -> str:
    """os.path.splitext(name)[0], for a file name (no "/"), faster where it has no leading dot."""
    dot = name.rfind(".")
    return name[:dot] if dot > 0 and name[0] != "." else os.path.splitext(name)[0]


def _is_dir(entry: os.DirEntry) -> bool:
    """Follows symlinks; a link that loops or leads nowhere is not a folder."""
    try:
        return entry.is_dir()
    except OSError:
        return False


def _entries(folder: str | Path) -> list[tuple[str, bool]]:
    """(name, is a folder) of each entry, sorted by name; read as os.scandir streams them
    (one folder entry at a time), keeping no DirEntry."""
    with os.scandir(folder) as entries:
        return sorted((e.name, _is_dir(e)) for e in entries)


def walk(input_dir: Path) -> Walk:
    tasks, skipped = [], []
    for identity, is_dir in _entries(input_dir):
        if not is_dir:
            skipped.append(identity)
            continue
        try:
            names = [name for name, is_dir in _entries(os.path.join(input_dir, identity)) if not is_dir]
        except OSError:
            skipped.append(identity)
            continue
        stems = output_stems(names)
        tasks += [Task(f"{identity}/{name}", f"{identity}/{stems[name]}") for name in names]
    return Walk(tasks, skipped)


def cut_shards(tasks: list[Task], workers: int) -> list[Shard]:
    """`tasks` in runs of SHARD_SIZE, shrinking (guided scheduling) once fewer than
    2 x SHARD_SIZE are left per worker, to MIN_SHARD: the workers run out of shards together,
    and runs of one-photo identities (most of LFW) still share detection batches and journals.
    Keys are unique within the cut; a later run may cut its tasks otherwise (the journals are
    read all together, so where a record lies does not matter)."""
    shards, i = [], 0
    while i < len(tasks):
        size = max(MIN_SHARD, min(SHARD_SIZE, -(-(len(tasks) - i) // (2 * workers))))
        part = tuple(tasks[i:i + size])
        key = hashlib.sha1(os.fsencode(f"{part[0].rel}\0{part[-1].rel}")).hexdigest()[:20]
        shards.append(Shard(key, part))
        i += size
    return shards
