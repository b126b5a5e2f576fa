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


@dataclass(frozen=True)
class Task:
    """One input file. `rel` is its path relative to INPUT_DIR; `out_base` the output path
    relative to OUTPUT_DIR without extension (a face index and the extension are added)."""
    rel: str
    out_base: str


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
    stems = {n: os.path.splitext(n)[0] for n in names}
    while True:
        counts = Counter(stems.values())
        clashes = [n for n, s in stems.items() if counts[s] > 1 and s != n]
        if not clashes:
            return stems
        for n in clashes:
            stems[n] = n


def _is_dir(entry: os.DirEntry) -> bool:
    """Follows symlinks; a link that loops or leads nowhere is not a folder."""
    try:
        return entry.is_dir()
    except OSError:
        return False


def walk(input_dir: Path) -> Walk:
    tasks, skipped = [], []
    for entry in sorted(os.scandir(input_dir), key=lambda e: e.name):
        if not _is_dir(entry):
            skipped.append(entry.name)
            continue
        try:
            names = sorted(e.name for e in os.scandir(entry.path) if not _is_dir(e))
        except OSError:
            skipped.append(entry.name)
            continue
        stems = output_stems(names)
        tasks += [Task(f"{entry.name}/{name}", f"{entry.name}/{stems[name]}") for name in names]
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
