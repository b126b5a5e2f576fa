"""Walk INPUT_DIR into image tasks and cut them into shards.

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

SHARD_SIZE = 32     # images of one identity per shard: small enough to balance the workers' last shards


@dataclass(frozen=True)
class Task:
    """One input file. `rel` is its path relative to INPUT_DIR; `out_base` the output path
    relative to OUTPUT_DIR without extension (a face index and the extension are added)."""
    rel: str
    out_base: str


@dataclass(frozen=True)
class Shard:
    """A run of tasks of one identity; `key` names its journal, stable across runs."""
    key: str
    tasks: tuple[Task, ...]


@dataclass(frozen=True)
class Walk:
    shards: list[Shard]
    skipped: list[str]        # top-level entries of INPUT_DIR that are not identity folders
    n_tasks: int


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
    shards, skipped, n = [], [], 0
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
        tasks = [Task(f"{entry.name}/{name}", f"{entry.name}/{stems[name]}") for name in names]
        digest = hashlib.sha1(os.fsencode(entry.name)).hexdigest()[:16]
        for k in range(0, len(tasks), SHARD_SIZE):
            shards.append(Shard(f"{digest}-{k // SHARD_SIZE:05d}", tuple(tasks[k:k + SHARD_SIZE])))
        n += len(tasks)
    return Walk(shards, skipped, n)
