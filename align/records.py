"""What a run leaves beside the thumbnails, and how a killed run picks up where it stopped.

A finished run (exit 0) leaves plain files at the top of OUTPUT_DIR, and nothing else but the
identity folders of thumbnails:
  faces.jsonl           one record per input file, in input order
  bounding_boxes.txt    facenet's format: "<output path> x1 y1 x2 y2" (a written face's
                        crop_box), or "<output path>" alone (an image without a face); no
                        output path holds a line break (align/dataset.py's safe names); with
                        a packed output format (rec, webdataset), the sample's key instead
                        of the path (align.writers.sample_key)
  summary.json          counts and timings, and what a rerun must know: "options" (those that
                        shape the output; a rerun with others is refused) and "legacy_outputs"
A run in progress (or one killed, or stopped by an error) also has its state folder,
OUTPUT_DIR/.align_dataset/ (StateDir):
  lock                  flock'ed by the running command; a second run on the folder refuses
  options.json          the options of the run, as in summary.json
  legacy_outputs        present when the folder held thumbnails we had not written (facenet's)
  journal/<shard>.jsonl one record per finished image, appended only after its thumbnails are
                        renamed into place (fsync'ed); a torn last line is dropped on reading
  parts/<shard>-*.part  rec and webdataset: the thumbnails of a shard's run, fsync'ed before
                        the journal lines that record them; assembled into the packed files
                        at the end (align/writers.py)
  previous/             the packed files that the end of the run replaces, set aside
A run's records are faces.jsonl (the last finished run's) with the journals over it
(Records); at its end they are merged into the top-level files (each written atomically),
then the state folder is removed ("folded away"). A run killed at any moment leaves a state
any run resumes: before the fold, the journals are still there; during it, what is left of
them repeats what faces.jsonl already holds.

Each written face's record: "face" (its index in "faces"), "output" (its name in the folders
layout, whatever the output format: the records are the same in every format), and "crop_box": the part of
the input the thumbnail shows, integer pixel edges (left, top, right, bottom) clipped to the
image: with --align box facenet's margin box, the very pixels cropped; with --align arcface the
smallest box of whole input pixels that holds the (rotated) square the thumbnail was warped
from. --align arcface adds "matrix", 2x3, mapping input pixels to thumbnail pixels
([u, v] = M @ [x, y, 1]), and "template", the name of the template ("arcface").
With --split, a record whose file was read (every record, with --split_by identity) has
"split", its outputs are under `<split>/`, and the records of an identity held out
(align/splits.py) have "held_out": true and their outputs under `held_out/`.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import gc
import heapq
import itertools
import json
import os
import pickle
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from align.dataset import Task
from align.durable import atomic_file, write_atomic
from align.writers import PARTS, PREVIOUS, sample_key

STATE = ".align_dataset"
RECORDS, BOXES, SUMMARY = "faces.jsonl", "bounding_boxes.txt", "summary.json"
STATUSES = ("aligned", "no_face", "unreadable", "too_costly", "not_an_image", "skipped_existing",
            "error")
_SCAN = json.JSONDecoder().scan_once       # json.loads' parser, less its checks around the value
_SCAN_TEXT = json.JSONDecoder(parse_float=str).scan_once     # the same checks, floats as text

# Permanent and retried failures, the one rule. A failure that comes from the file's content
# (not an image, corrupt, truncated, a decompression bomb, a symlink loop) is permanent: status
# "unreadable" or "not_an_image", never retried; so is "too_costly", a photo whose detection
# under these options would pass align.detect's bounds (other options are another job). A failure that comes from the state of the file system or of the machine, which
# may be otherwise at the next run, is status "error", retried by every run until it passes:
# the errnos below (the file vanished or is not readable now, an I/O error, a full disk or
# quota, a name or path too long for where OUTPUT_DIR is, too many open files, a read-only or
# stale file system) and MemoryError; and any failure to write an output, whatever it is.
TRANSIENT_ERRNOS = frozenset({
    errno.ENOENT, errno.EACCES, errno.EPERM, errno.EIO, errno.ENOSPC, errno.EDQUOT,
    errno.ENAMETOOLONG, errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EAGAIN, errno.EINTR,
    errno.EBUSY, errno.EROFS, errno.ESTALE, errno.ETIMEDOUT, errno.ENOTCONN, errno.ENXIO,
})


def is_transient(e: BaseException | None) -> bool:
    """Whether the failure `e` (or what it was raised from) is the machine's or the file
    system's, not the file's: see TRANSIENT_ERRNOS."""
    while e is not None:
        if isinstance(e, MemoryError) or (isinstance(e, OSError) and e.errno in TRANSIENT_ERRNOS):
            return True
        e = e.__cause__
    return False


def needs_work(record: dict | None) -> bool:
    """Whether an input with this record (None: none yet) is to be aligned by this run."""
    return record is None or record["status"] == "error"


def dumps(record: dict) -> str:
    return json.dumps(record, separators=(", ", ": "))


CHUNK_BYTES = 1 << 20       # a record file is read this much at a time (faces.jsonl may be GBs)


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off for a block that parses millions of records:
    they hold no cycles, and with a job's million tasks alive each collection walks them all
    (it doubled the CPU time of a scan of 1M records)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class Journal:
    """An append-only record file: a shard's journal, or faces.jsonl read as one."""

    def __init__(self, path: Path):
        self.path = path

    def load(self) -> dict[str, dict]:
        """{input path: record} of the complete lines (a later line for an input replaces an
        earlier one); cuts a torn tail off the file."""
        return {record["input"]: record for _, _, record in self.entries()}

    def entries(self, floats: bool = True) -> list[tuple[int, bytes, dict]]:
        """Every (byte offset, line, record) of chunks(), in one list."""
        return [entry for chunk in self.chunks(floats) for entry in chunk]

    def chunks(self, floats: bool = True, chunk_bytes: int = CHUNK_BYTES) -> Iterator[list[tuple[int, bytes, dict]]]:
        """(byte offset, line, record) of each complete line, in file order, a list per
        `chunk_bytes` read; then cuts a torn tail (a last line without its newline, or a line
        that is not JSON, and all after it) off the file. floats=False leaves the records'
        non-integer numbers as their JSON text (for a reader that copies lines: it parses
        them much faster)."""
        scan = _SCAN if floats else _SCAN_TEXT
        try:
            f = open(self.path, "rb")
        except FileNotFoundError:
            return
        good, rest, torn = 0, b"", False
        with f:
            size = os.fstat(f.fileno()).st_size
            while not torn:
                block = f.read(chunk_bytes)
                if not block:
                    break
                data = rest + block
                cut = data.rfind(b"\n") + 1
                rest = data[cut:]
                entries, used, torn = _parse_lines(data[:cut], good, scan, floats)
                good += used
                if entries:
                    yield entries
        if good != size:
            with open(self.path, "r+b") as f:
                f.truncate(good)

    def append(self, records: list[dict]) -> None:
        if not records:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write("".join(dumps(r) + "\n" for r in records))
            f.flush()
            os.fsync(f.fileno())


def _parse_lines(data: bytes, offset: int, scan, floats: bool) -> tuple[list, int, bool]:
    """(entries, bytes used, whether a bad line stopped it) for `data`, whole lines starting
    at byte `offset` of their file. json.loads(line) for each line, as one scan of the text
    where it is ASCII (as dumps writes it) and the line starts as a record does: a third
    faster."""
    text = data.decode("ascii") if data.isascii() else None
    entries, pos = [], 0
    for line in data.split(b"\n")[:-1]:
        end = pos + len(line)
        record = None
        if text is not None and line.startswith(b'{"'):
            try:
                record, stop = scan(text, pos)
                if stop != end:                 # not one value before the newline
                    record = None
            except (ValueError, StopIteration):
                record = None
        if record is None:
            try:
                record = json.loads(line, parse_float=None if floats else str)
            except ValueError:
                return entries, pos, True
        entries.append((offset + pos, data[pos:end + 1], record))
        pos = end + 1
    return entries, pos, False


class StateDir:
    """OUTPUT_DIR/.align_dataset/: the state of a run that has not finished (see above)."""

    def __init__(self, output_dir: Path):
        self.root = output_dir / STATE
        self.journals = self.root / "journal"
        self._lock = None

    def lock(self) -> bool:
        """Take the folder's lock; False when another run holds it. A lock file that a
        finishing run removed while this one opened it is not a lock: taken anew."""
        while True:
            self.journals.mkdir(parents=True, exist_ok=True)
            f = open(self.root / "lock", "a+")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                f.close()
                return False
            try:
                same = os.path.samestat(os.fstat(f.fileno()), os.stat(self.root / "lock"))
            except FileNotFoundError:
                same = False
            if same:
                self._lock = f
                return True
            f.close()

    def unlock(self) -> None:
        if self._lock:
            self._lock.close()
            self._lock = None

    def remove(self) -> None:
        """Fold the state away, under the lock, once its records are in the top-level files:
        the journals first (what is left of them repeats faces.jsonl), then the rest."""
        for name in self.each_journal_name():
            (self.journals / f"{name}.jsonl").unlink(missing_ok=True)
        shutil.rmtree(self.root, ignore_errors=True)
        self.unlock()

    def journal(self, shard_key: str) -> Journal:
        return Journal(self.journals / f"{shard_key}.jsonl")

    def journal_paths(self, prefix: str = "") -> list[Path]:
        """Every journal (whose name starts with `prefix`), in the order their records are
        combined."""
        return [self.journals / f"{name}.jsonl" for name in self.journal_names(prefix)]

    def journal_names(self, prefix: str = "") -> list[str]:
        """The shard keys of the journals (those starting with `prefix`), sorted."""
        return sorted(self.each_journal_name(prefix))

    def each_journal_name(self, prefix: str = "") -> Iterator[str]:
        """The shard keys of the journals (those starting with `prefix`), as the folder lists
        them: a job's journals (a file per shard) are not held."""
        try:
            with os.scandir(self.journals) as entries:
                for e in entries:
                    if e.name.endswith(".jsonl") and e.name.startswith(prefix):
                        yield e.name[:-6]
        except FileNotFoundError:
            return

    def any_journal(self) -> bool:
        return next(self.each_journal_name(), None) is not None

    def each_record(self) -> Iterator[dict]:
        """Every record of every journal (an input's overridden ones too), one journal in
        memory at a time."""
        for path in self.journal_paths():
            yield from Journal(path).load().values()

    def load_all(self) -> dict[str, dict]:
        """{input path: record} over every journal. An input can have records in two
        journals when runs cut their shards differently: an "error" in one and the retry's
        outcome in another. The one that needs no more work wins. (All in memory: a run
        uses Records, which applies the same rule.)"""
        records = {}
        for path in self.journal_paths():
            for rel, record in Journal(path).load().items():
                if needs_work(records.get(rel)):
                    records[rel] = record
        return records

    def options(self) -> dict | None:
        try:
            return json.loads((self.root / "options.json").read_text())
        except FileNotFoundError:
            return None

    def set_options(self, options: dict) -> None:
        write_atomic(self.root / "options.json", (json.dumps(options, indent=1) + "\n").encode())

    def reset(self) -> None:
        for path in self.journals.glob("*.jsonl"):
            path.unlink()
        for folder in (PARTS, PREVIOUS):
            shutil.rmtree(self.root / folder, ignore_errors=True)
        self.legacy_marker.unlink(missing_ok=True)

    @property
    def legacy_marker(self) -> Path:
        """Present when the first run found thumbnails it had not written (facenet's): those
        are skipped as facenet skipped them, by that run and by every rerun that resumes it."""
        return self.root / "legacy_outputs"


def finished_summary(output_dir: Path) -> dict | None:
    """summary.json of the last run that finished on `output_dir`, when that run was one of
    this layout's (it holds the options); else None."""
    try:
        summary = json.loads((output_dir / SUMMARY).read_text())
    except (OSError, ValueError):        # none, or not ours (a folder, unreadable, not JSON)
        return None
    return summary if isinstance(summary, dict) and isinstance(summary.get("options"), dict) else None


def bounding_box_lines(record: dict, output_dir: str, packed: bool = False) -> list[str]:
    """facenet's bounding_boxes.txt lines for one record (none for inputs that are not
    images or that could not be read: facenet printed an error and wrote nothing). Each names
    the output as a path under `output_dir`, or with `packed` (rec, webdataset) by its sample
    key (align.writers.sample_key)."""
    def name(output: str) -> str:
        return sample_key(output) if packed else os.path.join(output_dir, output)
    if record["status"] == "aligned":
        return [f"{name(w['output'])} {' '.join(map(str, w['crop_box']))}\n" for w in record["written"]]
    if record["status"] == "no_face":
        return [f"{name(record['output'])}\n"]
    return []


_CODE = {status: code for code, status in enumerate(STATUSES)}
_TO_DO = frozenset(_CODE[s] for s in STATUSES if needs_work({"status": s}))
MAX_OPEN_JOURNALS = 64                          # file handles the merge keeps open
SORT_ENTRIES = 100_000                          # journal entries sorted in memory at once
MERGE_FAN_IN = 128                              # sorted runs merged at once (an open file each)
SPILL_BLOCK = 256                               # entries a sorted run holds in one pickle
COPY_PIECE = 8 << 20                            # bytes the merge copies at once
RUN_PREFIX = "r"                                # journals of run N: r<N:09d>-<shard>.jsonl


class UnorderedRecords(RuntimeError):
    """faces.jsonl is not in input order, as every run writes it: edited by hand?"""


class MissingRecord(RuntimeError):
    """An input of the job has no record: a journal of this run was lost (removed, or written
    by a worker on a file system the others do not see)."""


def input_key(rel: str) -> str:
    """A key that sorts as the walk orders inputs (identity folders by name, then their files by
    name): the identity and the file name joined by NUL, which no name holds."""
    return rel.replace("/", "\0", 1)


def run_prefix(state: StateDir) -> str:
    """The journal-name prefix of a new run: after every journal there is (earlier releases'
    journals, named by their shard alone, sort before every run's)."""
    last = 0
    for name in state.each_journal_name(RUN_PREFIX):
        head = name.split("-", 1)[0]
        if head[1:].isdigit():
            last = max(last, int(head[1:]))
    return f"{RUN_PREFIX}{last + 1:09d}-"


# An entry: where the record of one input lies and what the merge needs of it, without the record:
# (input_key, source, byte offset, length, status code, faces written, bounding_boxes.txt bytes);
# source: the record file, BASE for faces.jsonl, else the journal's name (shard key). Sorted,
# entries are in input order and, for one input, in the order its records were written: the last
# finished run's first, then the journals by name (an earlier release's, named by their shard,
# then run by run), each in file order.
_KEY, _SOURCE, _OFFSET, _LENGTH, _STATUS, _FACES, _BOXES = range(7)
BASE = ""                                       # the source faces.jsonl: before every journal


def _wins(current: tuple | None, entry: tuple) -> bool:
    """Whether `entry`, written after `current` for the same input, is its record: the last line
    within one file; across files, a record replaces one that needs work (as load_all)."""
    return current is None or current[_SOURCE] == entry[_SOURCE] or current[_STATUS] in _TO_DO


def _resolved(entries: Iterator[tuple]) -> Iterator[tuple]:
    """Sorted entries, one per input: the one that wins (_wins)."""
    current = None
    for entry in entries:
        if current is not None and entry[_KEY] != current[_KEY]:
            yield current
            current = None
        if _wins(current, entry):
            current = entry
    if current is not None:
        yield current


class Records:
    """The records of a job, streamed in input order, for tens of millions of inputs: what the
    process holds grows with neither the photos nor the journals; what does is in temporary
    files in the state folder (gone with the process).

    Pass 1, `plan(tasks)`: the walk's tasks (input order) joined with the records there are: the
    last finished run's faces.jsonl (`base`, in input order already) and the journals over it
    (sorted by input, SORT_ENTRIES at a time, then merged); every task is spooled with its
    record's entry, and those that need work are yielded, in input order, as the walk goes.
    Pass 2, `merge()`: the spool joined with the journals the run wrote (sorted likewise) into
    faces.jsonl (each record's line copied as it is) and bounding_boxes.txt. Records are
    parsed once, when their file is read."""

    def __init__(self, state: StateDir, output_dir_arg: str, base: Path | None = None,
                 packed: bool = False):
        self.state, self.output_dir_arg, self.base = state, output_dir_arg, base
        self.packed = packed                        # bounding_boxes.txt names sample keys
        self.dropped = 0                            # records of inputs gone from INPUT_DIR
        self.tasks = self.done = 0                  # pass 1: tasks walked, of them needing no work
        self.extra_statuses: dict[str, int] = {}    # statuses this version does not know
        self._spool = tempfile.TemporaryFile(dir=state.root)
        self._had_journals = False
        self._counts: dict | None = None
        self._identities: set[str] = set()

    # --- pass 1 ---------------------------------------------------------------------------------
    def plan(self, tasks: Iterable[Task]) -> Iterator[Task]:
        """Yields the tasks that need work (needs_work), in input order, as `tasks` (in input
        order) are walked; spools every task with its record. Cuts the journals' torn tails."""
        journals = self._sorted(self.state.each_journal_name())
        self._had_journals = bool(journals)
        streams = [self._base_entries()] if self.base else []
        records = _resolved(heapq.merge(*streams, *journals))
        record = next(records, None)
        block: list = []
        last = None
        # (the cyclic collector stays on: this generator is suspended while the engine runs)
        for task in tasks:
            key = input_key(task.rel)
            if last is not None and key <= last:
                raise RuntimeError(f"the walk is not in input order at {task.rel}")
            last = key
            while record is not None and record[_KEY] < key:
                self.dropped += 1               # an input gone from INPUT_DIR since
                record = next(records, None)
            found = None
            if record is not None and record[_KEY] == key:
                found, record = record[1:], next(records, None)
            block.append((task, found))
            if len(block) == SPILL_BLOCK:
                pickle.dump(block, self._spool, pickle.HIGHEST_PROTOCOL)
                block = []
            self.tasks += 1
            if found is None or found[_STATUS - 1] in _TO_DO:
                yield task
            else:
                self.done += 1
        self.dropped += sum(1 for _ in itertools.chain([record] if record else [], records))
        pickle.dump(block, self._spool, pickle.HIGHEST_PROTOCOL)

    def base_alone(self) -> bool:
        """Whether the records are the last finished run's, unchanged: after plan(), no journal
        was found and no input of faces.jsonl is gone from INPUT_DIR."""
        return self.base is not None and not self._had_journals and self.dropped == 0

    # --- pass 2 ---------------------------------------------------------------------------------
    def merge(self, output_dir: Path, prefix: str | None = None) -> dict:
        """faces.jsonl and bounding_boxes.txt, in input order, each written atomically: each
        spooled task's record, or the one the journals named `prefix`... (this run's) hold for
        it (the run's own outcome, where the spool's needs work); returns counts(). Closes the
        spool. Raises MissingRecord, leaving both files as they were, when a task has no record."""
        self._spool.seek(0)
        run = self.state.each_journal_name(prefix) if prefix is not None else ()
        news = _resolved(heapq.merge(*self._sorted(run)))
        new = next(news, None)
        counts = np.zeros(len(STATUSES), np.int64)
        faces_written = 0
        identities = self._identities
        journals: dict[str, int] = {}               # record file (source) -> open fd
        piece = [None, 0, 0]                        # a run of bytes of one file still to copy

        def flush(dest) -> None:
            if piece[2]:
                fd = journals.get(piece[0])
                if fd is None:
                    if len(journals) >= MAX_OPEN_JOURNALS:
                        for fd in journals.values():
                            os.close(fd)
                        journals.clear()
                    fd = journals[piece[0]] = os.open(self._path(piece[0]), os.O_RDONLY)
                _copy(fd, piece[1], piece[2], dest)
            piece[:] = [None, 0, 0]

        try:
            with gc_paused(), atomic_file(output_dir / RECORDS, 1 << 20) as faces, \
                    atomic_file(output_dir / BOXES, 1 << 20) as boxes:
                for block in _blocks(self._spool):
                    for task, entry in block:
                        key = input_key(task.rel)
                        while new is not None and new[_KEY] < key:     # not a task of the job
                            new = next(news, None)
                        if new is not None and new[_KEY] == key:
                            if entry is None or entry[_STATUS - 1] in _TO_DO:
                                entry = new[1:]
                            new = next(news, None)
                        if entry is None:
                            raise MissingRecord(f"{task.rel} has no record")
                        source, offset, length, status, n_faces, box_lines = entry
                        if piece[0] == source and piece[1] + piece[2] == offset:
                            piece[2] += length
                        else:
                            flush(faces)
                            piece[:] = [source, offset, length]
                        boxes.write(box_lines)
                        if status >= len(counts):
                            counts = np.append(counts, np.zeros(status + 1 - len(counts), np.int64))
                        counts[status] += 1
                        if n_faces:
                            faces_written += n_faces
                            identities.add(task.out_base.split("/", 1)[0])
                flush(faces)
        finally:
            for fd in journals.values():
                os.close(fd)
            self._spool.close()
        self._counts = {s: int(counts[_CODE[s]]) if _CODE[s] < len(counts) else 0 for s in STATUSES}
        self._counts.update((s, int(counts[code]) if code < len(counts) else 0)
                            for s, code in self.extra_statuses.items())
        self._counts["faces_written"] = faces_written
        return dict(self._counts)

    def counts(self) -> dict:
        """After merge(): {status: inputs} over STATUSES (and any other status found), and
        faces_written."""
        return dict(self._counts)

    def identities_written(self) -> set[str]:
        """After merge(): the output identities (folder names of the folders layout) with a
        face written."""
        return set(self._identities)

    # --- reading record files -------------------------------------------------------------------
    def _path(self, source: str) -> Path:
        return self.base if source == BASE else self.state.journals / f"{source}.jsonl"

    def _entries(self, source: str) -> Iterator[list[tuple]]:
        """The entries of the record file `source`, a list per chunk, in file order."""
        for chunk in Journal(self._path(source)).chunks(floats=False):
            yield [(input_key(record["input"]), source, offset, len(line), self._code(record["status"]),
                    len(record.get("written") or ()),
                    "".join(bounding_box_lines(record, self.output_dir_arg, self.packed)).encode("utf-8", "surrogateescape"))
                   for offset, line, record in chunk]

    def _base_entries(self) -> Iterator[tuple]:
        """faces.jsonl's entries, in its order: input order, as every merge writes it."""
        last = None
        for chunk in self._entries(BASE):
            for entry in chunk:
                if last is not None and entry[_KEY] <= last:
                    raise UnorderedRecords(f"{self.base} is not in input order (at "
                                           f"{entry[_KEY].replace(chr(0), '/')!r}): was it edited?")
                last = entry[_KEY]
                yield entry

    def _sorted(self, sources: Iterable[str]) -> list[Iterator[tuple]]:
        """The entries of the journals `sources`, as sorted streams to merge (an empty list
        when there is none): SORT_ENTRIES at a time sorted in memory and spilled to a temporary
        file, MERGE_FAN_IN such runs merged into one as they come (an open file each), but the
        last, kept in memory."""
        runs: list[Iterator[tuple]] = []
        entries: list[tuple] = []
        read = False
        with gc_paused():
            for source in sources:
                read = True
                for chunk in self._entries(source):
                    entries += chunk
                    if len(entries) >= SORT_ENTRIES:
                        entries.sort()
                        runs.append(self._spill(entries))
                        entries = []
                        if len(runs) == MERGE_FAN_IN:
                            runs = [self._spill(heapq.merge(*runs))]
        entries.sort()
        return runs + [iter(entries)] if read else []

    def _spill(self, entries: Iterable[tuple]) -> Iterator[tuple]:
        """Sorted `entries` through a temporary file in the state folder, read back as needed."""
        f = tempfile.TemporaryFile(dir=self.state.root)
        it = iter(entries)
        while block := list(itertools.islice(it, SPILL_BLOCK)):
            pickle.dump(block, f, pickle.HIGHEST_PROTOCOL)
        f.seek(0)
        return (entry for block in _blocks(f, close=True) for entry in block)

    def _code(self, status: str) -> int:
        code = _CODE.get(status)
        if code is None:
            code = self.extra_statuses.setdefault(status, len(STATUSES) + len(self.extra_statuses))
        return code


def _blocks(f, close: bool = False) -> Iterator[list]:
    """The pickled lists of a spool file, from where it stands; closes it at the end if `close`."""
    try:
        while True:
            try:
                yield pickle.load(f)
            except EOFError:
                return
    finally:
        if close:
            f.close()


def _copy(fd: int, offset: int, length: int, dest) -> None:
    """`length` bytes of `fd` from `offset` into the file `dest`, COPY_PIECE at a time (a run
    of a finished job's records is all of faces.jsonl)."""
    end = offset + length
    while offset < end:
        data = os.pread(fd, min(COPY_PIECE, end - offset), offset)
        if not data:
            raise RuntimeError(f"a journal changed while its records were merged (fd {fd})")
        dest.write(data)
        offset += len(data)


def write_summary(output_dir: Path, summary: dict) -> None:
    write_atomic(output_dir / SUMMARY, (json.dumps(summary, indent=1) + "\n").encode())
