"""Walk INPUT_DIR into image tasks, and cut the tasks a run has left to do into shards.

Identities are the sub-folders of INPUT_DIR, sorted; every file in one is a task (whether it
holds an image is found out by the worker, from its content). Anything else at the top of
INPUT_DIR is listed as skipped. Output names follow facenet, `<identity>/<stem><ext>`; when
several files of a folder share a stem (a.jpg, a.png) each of them keeps its whole name
instead (a.jpg.png, a.png.png), so no output overwrites another.

Names that cannot be used as they are get a deterministic safe name instead, `<prefix>~<hash>`
(the hash: 16 hex digits of the sha1 of the whole input name; the prefix: the name with control
characters replaced by "_", cut to fit), and their records keep the natural name too:
- a stem whose output name would not fit in NAME_MAX bytes once the longest face suffix and
  extension are added (SUFFIX_ROOM), e.g. 255-byte input names, or two 250-byte names that
  share a stem and so keep their whole names;
- a stem or identity holding a control character (a newline, a tab, ...): bounding_boxes.txt
  has one output path per line, so its paths must hold none;
- an identity named like a record at the top of OUTPUT_DIR (RESERVED: faces.jsonl,
  summary.json, bounding_boxes.txt, report.html, .align_dataset) or like a temporary
  (.tmp-*.tmp): its thumbnails go to `<name>~<hash>/`.
A folder inside an identity folder is a task too: the worker records it as not an image.
"""
from __future__ import annotations

import collections
import hashlib
import itertools
import os
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from align.durable import TEMP_PREFIX, TEMP_SUFFIX

NAME_MAX = 255          # bytes in one path component (Linux's, and most file systems')
SUFFIX_ROOM = 10        # bytes an output name adds to its stem, at most: "_<face>" and ".png"
HASH_HEX = 16
# the top of OUTPUT_DIR: an identity folder must not be named like what the run writes there
RESERVED = frozenset({"faces.jsonl", "summary.json", "bounding_boxes.txt", "report.html",
                      ".align_dataset"})
SHARD_SIZE = 32     # images per shard, at most: a worker's journal and detection batches are per shard
MIN_SHARD = 8       # ... and at least (but the last): shards shrink toward the end of a run


class Task:
    """One input file. `rel` is its path relative to INPUT_DIR; `out_base` the output path
    relative to OUTPUT_DIR without extension (a face index and the extension are added).
    A walk makes one per photo, millions of them: slots, and `out_base` kept as its length
    when it is a prefix of `rel` (it almost always is), so a task costs an object and its
    `rel`. Treat as immutable."""
    __slots__ = ("rel", "_base", "natural")

    def __init__(self, rel: str, out_base: str, natural: str | None = None):
        self.rel = rel
        self._base = len(out_base) if rel.startswith(out_base) else out_base
        self.natural = natural      # out_base as facenet would name it, where that was not usable

    @property
    def out_base(self) -> str:
        base = self._base
        return self.rel[:base] if base.__class__ is int else base

    def __eq__(self, other) -> bool:
        if other.__class__ is not Task:
            return NotImplemented
        return (self.rel, self.out_base, self.natural) == (other.rel, other.out_base, other.natural)

    def __hash__(self) -> int:
        return hash((self.rel, self.out_base))

    def __repr__(self) -> str:
        return f"Task(rel={self.rel!r}, out_base={self.out_base!r}, natural={self.natural!r})"

    def __reduce__(self):
        return Task, (self.rel, self.out_base, self.natural)


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


def _unusable(name: str, room: int) -> bool:
    if len(name) <= 60 and name.isprintable():     # the common case, at walk speed
        return False
    return len(os.fsencode(name)) + room > NAME_MAX or any(ord(c) < 32 or ord(c) == 127 for c in name)


def safe_name(name: str, whole: str, room: int = 0, force: bool = False) -> str:
    """`name` itself when it fits in NAME_MAX bytes with `room` bytes to spare and holds no
    control character (and not `force`); else `<prefix>~<hash of whole>`, NAME_MAX - room
    bytes at most. `whole` is the name the hash is taken of (the whole file name, for a
    stem), so that names sharing a stem get different safe names."""
    if not force and not _unusable(name, room):
        return name
    tag = "~" + hashlib.sha1(os.fsencode(whole)).hexdigest()[:HASH_HEX]
    clean = os.fsencode("".join("_" if ord(c) < 32 or ord(c) == 127 else c for c in name))
    cut = max(0, NAME_MAX - room - len(tag))
    while 0 < cut < len(clean) and clean[cut] & 0xC0 == 0x80:     # not inside a UTF-8 character
        cut -= 1
    return os.fsdecode(clean[:cut]) + tag


def output_identity(name: str) -> str:
    """The folder of OUTPUT_DIR that identity `name`'s thumbnails go to."""
    reserved = name in RESERVED or (name.startswith(TEMP_PREFIX) and name.endswith(TEMP_SUFFIX))
    return safe_name(name, name, force=reserved)


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


def _entries(folder: str | Path) -> list[tuple[str, bool, bool]]:
    """(name, is a folder, is a symlink) of each entry, sorted by name; read as os.scandir
    streams them (one folder entry at a time), keeping no DirEntry."""
    with os.scandir(folder) as entries:
        return sorted((e.name, _is_dir(e), e.is_symlink()) for e in entries)


class LinkIntoOutput(ValueError):
    """An input that is a symbolic link into OUTPUT_DIR: the run would write over it."""


def _check_link(path: str, output_dir: Path | None) -> None:
    if output_dir is None:
        return
    target = Path(os.path.realpath(path))
    if target == output_dir or output_dir in target.parents:
        raise LinkIntoOutput(f"{path} is a link into OUTPUT_DIR ({target}): the run would write "
                             f"over it; move it out of INPUT_DIR or pick another OUTPUT_DIR")


def walk_identities(input_dir: Path, output_dir: Path | None = None,
                    skipped: list[str] | None = None) -> Iterator[tuple[str, list[Task]]]:
    """(output identity folder, its tasks) for each identity folder of INPUT_DIR, in input
    order, one folder listed at a time: a job of any size costs the listing of its top level
    and of one identity folder. The top-level entries that are not identity folders are added
    to `skipped`. Raises LinkIntoOutput for an identity folder or a file that is a symbolic
    link into `output_dir` (its thumbnails, say: a second run would overwrite them). Links
    are the only entries resolved: the walk costs no stat per file."""
    skipped = [] if skipped is None else skipped
    guard = Path(os.path.realpath(output_dir)) if output_dir is not None else None
    for identity, is_dir, is_link in _entries(input_dir):
        if not is_dir:
            skipped.append(identity)
            continue
        if is_link:
            _check_link(os.path.join(input_dir, identity), guard)
        try:
            entries = _entries(os.path.join(input_dir, identity))
        except OSError:
            skipped.append(identity)
            continue
        out_identity = output_identity(identity)
        stems = output_stems([name for name, is_dir, _ in entries if not is_dir])
        tasks = []
        for name, is_dir, is_link in entries:
            if is_link:
                _check_link(os.path.join(input_dir, identity, name), guard)
            stem = _stem(name) if is_dir else stems[name]
            out = safe_name(stem, name, SUFFIX_ROOM)
            base = f"{out_identity}/{out}"
            natural = None if out == stem and out_identity == identity else f"{identity}/{stem}"
            tasks.append(Task(f"{identity}/{name}", base, natural))
        yield out_identity, tasks


def walk(input_dir: Path, output_dir: Path | None = None) -> Walk:
    """walk_identities, all in memory: the tasks of INPUT_DIR (for a small job, or a test)."""
    skipped: list[str] = []
    tasks = [t for _, ts in walk_identities(input_dir, output_dir, skipped) for t in ts]
    return Walk(tasks, skipped)


def cut_shards(tasks: list[Task], workers: int, prefix: str = "") -> list[Shard]:
    """shards() of a list, for a number of workers that does not change."""
    return list(shards(iter(tasks), lambda: workers, prefix))


def shards(tasks: Iterator[Task], workers: Callable[[], int], prefix: str = "") -> Iterator[Shard]:
    """`tasks` in runs of SHARD_SIZE, cut as they come, shrinking (guided scheduling) once fewer
    than 2 x SHARD_SIZE are left per worker (`workers()`: the workers there are now, asked at
    each cut), to MIN_SHARD: the workers run out of shards together, and runs of one-photo
    identities (most of LFW) still share detection batches and journals. Looks ahead no
    more than 2 x SHARD_SIZE x workers tasks. Keys (`prefix` + a hash of the first and last
    input) are unique within the cut; a later run may cut its tasks otherwise (the journals
    are read all together, so where a record lies does not matter)."""
    ahead: collections.deque[Task] = collections.deque()
    ended = False
    while True:
        n = max(1, workers())
        while not ended and len(ahead) < 2 * SHARD_SIZE * n:
            task = next(tasks, None)
            if task is None:
                ended = True
            else:
                ahead.append(task)
        if not ahead:
            return
        size = SHARD_SIZE if not ended else max(MIN_SHARD, min(SHARD_SIZE, -(-len(ahead) // (2 * n))))
        part = tuple(ahead.popleft() for _ in range(min(size, len(ahead))))
        key = hashlib.sha1(os.fsencode(f"{part[0].rel}\0{part[-1].rel}")).hexdigest()[:20]
        yield Shard(prefix + key, part)


def shuffled(tasks: Iterator[Task], window: int) -> Iterator[Task]:
    """`tasks` in random order within windows of `window` consecutive tasks (all of a job
    smaller than one window): --random_order, for a job too large to hold."""
    while True:
        part = list(itertools.islice(tasks, window))
        if not part:
            return
        random.shuffle(part)
        yield from part
