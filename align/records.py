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
(RecordIndex); at its end they are merged into the top-level files (each written atomically),
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
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from align.dataset import Shard, Task
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
        for path in self.journal_paths():
            path.unlink(missing_ok=True)
        shutil.rmtree(self.root, ignore_errors=True)
        self.unlock()

    def journal(self, shard_key: str) -> Journal:
        return Journal(self.journals / f"{shard_key}.jsonl")

    def journal_paths(self) -> list[Path]:
        """Every journal, in the order their records are combined."""
        return sorted(self.journals.glob("*.jsonl"))

    def each_record(self) -> Iterator[dict]:
        """Every record of every journal (an input's overridden ones too), one journal in
        memory at a time."""
        for path in self.journal_paths():
            yield from Journal(path).load().values()

    def load_all(self) -> dict[str, dict]:
        """{input path: record} over every journal. An input can have records in two
        journals when runs cut their shards differently: an "error" in one and the retry's
        outcome in another. The one that needs no more work wins. (All in memory: a run
        uses RecordIndex, which applies the same rule.)"""
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


_NONE = -1                                      # the status of an input without a record
_CODE = {status: code for code, status in enumerate(STATUSES)}
_TO_DO = [_NONE] + [_CODE[s] for s in STATUSES if needs_work({"status": s})]
# per task: status code, faces written, the record's line (journal number, byte offset,
# length), its bounding_boxes.txt lines in the spool (byte offset, length)
ROW = np.dtype([("status", "i1"), ("faces", "i4"), ("journal", "i4"), ("offset", "i8"),
                ("length", "i4"), ("spool_offset", "i8"), ("spool_length", "i4")])
MAX_OPEN_JOURNALS = 64                          # file handles the merge keeps open
MERGE_CHUNK = 1 << 16                           # tasks the merge takes from the arrays at once
COPY_PIECE = 8 << 20                            # bytes the merge copies at once


class RecordIndex:
    """Where the record of each task of a job lies, for millions of tasks: a ROW per task (in
    the order of `tasks`), 33 bytes, and a lookup from input path to task of 16 bytes a task.
    Records are parsed once, when their journal is scanned; their bounding_boxes.txt lines
    go to a spool (an unnamed temporary file in the state folder, gone with the process);
    the merge copies bytes."""

    def __init__(self, tasks: Sequence[Task], state: StateDir, output_dir_arg: str,
                 base: Path | None = None, packed: bool = False):
        self.tasks, self.state, self.output_dir_arg, self.base = tasks, state, output_dir_arg, base
        self.packed = packed                        # bounding_boxes.txt names sample keys
        self.dropped = 0                            # records of inputs gone from INPUT_DIR
        hashes = np.fromiter((hash(t.rel) for t in tasks), np.int64, len(tasks))
        self._order = np.argsort(hashes, kind="stable")     # tasks by hash of rel: the lookup
        self._hashes = hashes[self._order]
        self.rows = np.zeros(len(tasks), ROW)
        self.rows["status"] = _NONE
        self.rows["journal"] = -1
        self.paths: list[str] = []                  # journal numbers -> paths
        self._spool = tempfile.TemporaryFile(dir=state.root)
        self._spool_size = 0
        self.extra_statuses: dict[str, int] = {}    # statuses this version does not know

    def scan(self) -> None:
        """`base` (the last finished run's faces.jsonl, if any), then every journal, combined
        as StateDir.load_all combines them: in a file the last line for an input counts;
        across files, a record replaces one that needs work. Cuts torn tails as Journal.load
        does."""
        with gc_paused():
            for path in ([self.base] if self.base else []) + self.state.journal_paths():
                number = self._number(path)
                for found, rows in self._read(path, number):
                    take = np.isin(self.rows["status"][found], _TO_DO) | (self.rows["journal"][found] == number)
                    self.rows[found[take]] = rows[take]

    def update(self, shards: Iterable[Shard]) -> None:
        """What a run's shards did: each task of `shards` takes the last record for it in
        its shard's journal (the run's own outcome, even where an older journal holds
        another "error" for it)."""
        for shard in shards:
            mine = [i for i in self._find_all([t.rel for t in shard.tasks]) if i is not None]
            path = self.state.journal(shard.key).path
            for found, rows in self._read(path, self._number(path)):
                take = np.isin(found, mine)
                self.rows[found[take]] = rows[take]

    def pending(self) -> list[Task]:
        """The tasks that need work (needs_work), in input order."""
        return [self.tasks[i] for i in np.flatnonzero(np.isin(self.rows["status"], _TO_DO)).tolist()]

    def base_alone(self) -> bool:
        """Whether the records are the last finished run's, unchanged: after scan(), no journal
        was found and no input of faces.jsonl is gone from INPUT_DIR (before any update())."""
        return self.base is not None and len(self.paths) == 1 and self.dropped == 0

    def identities_written(self) -> set[str]:
        """The output identities (folder names of the folders layout) with a face written."""
        return {self.tasks[i].out_base.split("/", 1)[0] for i in np.flatnonzero(self.rows["faces"] > 0).tolist()}

    def counts(self) -> dict:
        """{status: inputs} over STATUSES (and any other status found), and faces_written."""
        status = self.rows["status"]
        found = np.bincount(status[status >= 0], minlength=len(STATUSES) + len(self.extra_statuses))
        counts = {s: int(found[_CODE[s]]) for s in STATUSES}
        counts.update((s, int(found[code])) for s, code in self.extra_statuses.items())
        counts["faces_written"] = int(self.rows["faces"][status >= 0].sum())
        return counts

    def merge(self, output_dir: Path) -> dict:
        """faces.jsonl (each task's journal line, as it is) and bounding_boxes.txt, in input
        order, each written atomically; returns counts(). Closes the spool. Raises
        RuntimeError when a task has no record (a run that ended without finishing it)."""
        missing = np.flatnonzero(self.rows["status"] == _NONE)
        if len(missing):
            raise RuntimeError(f"{len(missing)} inputs have no record, {self.tasks[missing[0]].rel} "
                               f"the first")
        self._spool.flush()
        journals: dict[int, int] = {}               # journal number -> open fd
        try:
            with atomic_file(output_dir / RECORDS, 1 << 20) as faces:
                for j, offset, length in self._runs("journal", "offset", "length"):
                    fd = journals.get(j)
                    if fd is None:
                        if len(journals) >= MAX_OPEN_JOURNALS:
                            for fd in journals.values():
                                os.close(fd)
                            journals.clear()
                        fd = journals[j] = os.open(self.paths[j], os.O_RDONLY)
                    _copy(fd, offset, length, faces)
            with atomic_file(output_dir / BOXES, 1 << 20) as boxes:
                spool = self._spool.fileno()
                for _, offset, length in self._runs(None, "spool_offset", "spool_length"):
                    _copy(spool, offset, length, boxes)
        finally:
            for fd in journals.values():
                os.close(fd)
            self._spool.close()
        return self.counts()

    def _runs(self, file: str | None, offset: str, length: str) -> Iterator[tuple[int, int, int]]:
        """(file, offset, length) of the byte ranges that hold the tasks' entries in input
        order: one range for each run of entries that lie one after the other in one file
        (a shard's records, in a job's first run)."""
        for start in range(0, len(self.rows), MERGE_CHUNK):
            rows = self.rows[start:start + MERGE_CHUNK]
            files = rows[file] if file else np.zeros(len(rows), np.int32)
            offsets, ends = rows[offset], rows[offset] + rows[length]
            new = np.ones(len(rows), bool)
            new[1:] = (files[1:] != files[:-1]) | (offsets[1:] != ends[:-1])
            starts = np.flatnonzero(new)
            stops = np.append(starts[1:], len(rows)) - 1
            yield from zip(files[starts].tolist(), offsets[starts].tolist(),
                           (ends[stops] - offsets[starts]).tolist())

    def _find_all(self, rels: list[str]) -> list[int | None]:
        """The index of the task of each input path; None for a path no task has."""
        if not len(self._hashes):
            return [None] * len(rels)
        hashes = np.fromiter(map(hash, rels), np.int64, len(rels))
        pos = np.minimum(np.searchsorted(self._hashes, hashes), len(self._hashes) - 1)
        return [i if self.tasks[i].rel == rel else self._find(rel)
                for rel, i in zip(rels, self._order[pos].tolist())]

    def _find(self, rel: str) -> int | None:
        h = hash(rel)
        pos = int(np.searchsorted(self._hashes, h))
        while pos < len(self._hashes) and self._hashes[pos] == h:
            i = int(self._order[pos])
            if self.tasks[i].rel == rel:
                return i
            pos += 1
        return None

    def _number(self, path: Path) -> int:
        self.paths.append(str(path))
        return len(self.paths) - 1

    def _read(self, path: Path, number: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(task indices, their ROWs) of the last line for each of the job's inputs in each
        chunk of the record file at `path`, journal `number` (from _number); their
        bounding_boxes.txt lines go to the spool."""
        for entries in Journal(path).chunks(floats=False):
            latest: dict[int, tuple] = {}
            spooled = []
            for (offset, line, record), i in zip(entries, self._find_all([r["input"] for _, _, r in entries])):
                if i is None:
                    self.dropped += 1                   # an input gone from INPUT_DIR since
                    continue
                boxes = "".join(bounding_box_lines(record, self.output_dir_arg, self.packed)).encode("utf-8", "surrogateescape")
                spooled.append(boxes)
                latest[i] = (self._code(record["status"]), len(record.get("written", ())), number,
                             offset, len(line), self._spool_size, len(boxes))
                self._spool_size += len(boxes)
            self._spool.write(b"".join(spooled))
            yield np.fromiter(latest, np.int64, len(latest)), np.array(list(latest.values()), ROW)

    def _code(self, status: str) -> int:
        code = _CODE.get(status)
        if code is None:
            code = self.extra_statuses.setdefault(status, len(STATUSES) + len(self.extra_statuses))
        return code


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
