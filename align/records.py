"""What a run leaves beside the thumbnails, and how a killed run picks up where it stopped.

OUTPUT_DIR/.align_dataset/ holds the run's state:
  lock                  flock'ed by the running command; a second run on the folder refuses
  options.json          the options that shape the output; a rerun with others is refused
  journal/<shard>.jsonl one record per finished image, appended only after its thumbnails are
                        renamed into place (fsync'ed); a torn last line is dropped on reading
From the journals, at the end of every run, come (written atomically, in input order):
  faces.jsonl           one record per input file
  bounding_boxes.txt    facenet's format: "<output path> x1 y1 x2 y2", or "<output path>" alone
  summary.json          counts and timings
"""
from __future__ import annotations

import fcntl
import json
import os
import tempfile
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from align.dataset import Shard, Task
from align.durable import atomic_file, write_atomic

STATE = ".align_dataset"
# "error": a failure that says nothing about the file (out of memory, a full disk, a name too
# long for the file system): recorded with its reason, and retried by the next run
STATUSES = ("aligned", "no_face", "unreadable", "not_an_image", "skipped_existing", "error")


def needs_work(record: dict | None) -> bool:
    """Whether an input with this record (None: none yet) is to be aligned by this run."""
    return record is None or record["status"] == "error"


def dumps(record: dict) -> str:
    return json.dumps(record, separators=(", ", ": "))


class Journal:
    """The append-only record file of one shard."""

    def __init__(self, path: Path):
        self.path = path

    def load(self) -> dict[str, dict]:
        """{input path: record} of the complete lines (a later line for an input replaces an
        earlier one); cuts a torn tail off the file."""
        return {record["input"]: record for _, _, record in self.entries()}

    def entries(self) -> list[tuple[int, bytes, dict]]:
        """(byte offset, line, record) of each complete line, in file order; cuts a torn tail
        (a last line without its newline, or a line that is not JSON, and all after it) off
        the file."""
        entries, good = [], 0
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return entries
        for line in data.splitlines(keepends=True):
            if not line.endswith(b"\n"):
                break
            try:
                record = json.loads(line)
            except ValueError:
                break
            entries.append((good, line, record))
            good += len(line)
        if good != len(data):
            with open(self.path, "r+b") as f:
                f.truncate(good)
        return entries

    def append(self, records: list[dict]) -> None:
        if not records:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write("".join(dumps(r) + "\n" for r in records))
            f.flush()
            os.fsync(f.fileno())


class StateDir:
    def __init__(self, output_dir: Path):
        self.root = output_dir / STATE
        self.journals = self.root / "journal"
        self._lock = None

    def lock(self) -> bool:
        """Take the folder's lock; False when another run holds it."""
        self.journals.mkdir(parents=True, exist_ok=True)
        f = open(self.root / "lock", "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            return False
        self._lock = f
        return True

    def unlock(self) -> None:
        if self._lock:
            self._lock.close()
            self._lock = None

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
        self.legacy_marker.unlink(missing_ok=True)

    @property
    def legacy_marker(self) -> Path:
        """Present when the first run found thumbnails it had not written (facenet's): those
        are skipped as facenet skipped them, by that run and by every rerun that resumes it."""
        return self.root / "legacy_outputs"


def bounding_box_lines(record: dict, output_dir: str) -> list[str]:
    """facenet's bounding_boxes.txt lines for one record (none for inputs that are not
    images or that could not be read: facenet printed an error and wrote nothing)."""
    if record["status"] == "aligned":
        return [f"{os.path.join(output_dir, w['output'])} {' '.join(str(v) for v in w['crop_box'])}\n"
                for w in record["written"]]
    if record["status"] == "no_face":
        return [f"{os.path.join(output_dir, record['output'])}\n"]
    return []


_NONE = -1                                      # RecordIndex.status of an input without a record
_CODE = {status: code for code, status in enumerate(STATUSES)}
_TO_DO = [_NONE] + [_CODE[s] for s in STATUSES if needs_work({"status": s})]
MAX_OPEN_JOURNALS = 64                          # file handles the merge keeps open


class RecordIndex:
    """Where the record of each task of a job lies, for millions of tasks: per task (its index
    in `tasks`) a status code, its faces written, the record's line in a journal (file number,
    byte offset, length) and its bounding_boxes.txt lines in a spool file (offset, length).
    Numpy arrays, about 50 bytes a task; records are parsed once, when their journal is
    scanned, and the merge copies bytes. The spool is an unnamed temporary file in the
    state folder (gone with the process)."""

    def __init__(self, tasks: Sequence[Task], state: StateDir, output_dir_arg: str):
        self.tasks, self.state, self.output_dir_arg = tasks, state, output_dir_arg
        n = len(tasks)
        hashes = np.fromiter((hash(t.rel) for t in tasks), np.int64, n)
        self._order = np.argsort(hashes, kind="stable")     # tasks by hash of rel: the lookup
        self._hashes = hashes[self._order]
        self.status = np.full(n, _NONE, np.int8)
        self.faces = np.zeros(n, np.int32)
        self.journal = np.full(n, -1, np.int32)
        self.offset = np.zeros(n, np.int64)
        self.length = np.zeros(n, np.int32)
        self.spool_offset = np.zeros(n, np.int64)
        self.spool_length = np.zeros(n, np.int32)
        self.paths: list[str] = []                  # journal numbers -> paths
        self._path_numbers: dict[str, int] = {}
        self._spool = tempfile.TemporaryFile(dir=state.root)
        self._spool_size = 0
        self.extra_statuses: dict[str, int] = {}    # statuses this version does not know

    def scan(self) -> None:
        """Every journal, combined as StateDir.load_all combines them: in a journal the last
        line for an input counts; across journals, a record replaces one that needs work.
        Cuts torn tails as Journal.load does."""
        for path in self.state.journal_paths():
            for i, entry in self._read(path).items():
                if self.status[i] in _TO_DO:
                    self._set(i, *entry)

    def update(self, shards: Iterable[Shard]) -> None:
        """What a run's shards did: each task of `shards` takes the last record for it in
        its shard's journal (the run's own outcome, even where an older journal holds
        another "error" for it)."""
        for shard in shards:
            entries = self._read(self.state.journals / f"{shard.key}.jsonl")
            for t in shard.tasks:
                i = self._find(t.rel)
                if i in entries:
                    self._set(i, *entries[i])

    def pending(self) -> list[Task]:
        """The tasks that need work (needs_work), in input order."""
        return [self.tasks[i] for i in np.flatnonzero(np.isin(self.status, _TO_DO))]

    def counts(self) -> dict:
        """{status: inputs} over STATUSES, and faces_written."""
        found = np.bincount(self.status[self.status >= 0], minlength=len(STATUSES) + len(self.extra_statuses))
        counts = {s: int(found[_CODE[s]]) for s in STATUSES}
        counts.update((s, int(found[code])) for s, code in self.extra_statuses.items())
        counts["faces_written"] = int(self.faces[self.status >= 0].sum())
        return counts

    def merge(self, output_dir: Path) -> dict:
        """faces.jsonl (each task's journal line, as it is) and bounding_boxes.txt, in input
        order, each written atomically; returns counts(). Closes the spool. Raises
        RuntimeError when a task has no record (a run that ended without finishing it)."""
        missing = np.flatnonzero(self.status == _NONE)
        if len(missing):
            raise RuntimeError(f"{len(missing)} inputs have no record, {self.tasks[missing[0]].rel} "
                               f"the first")
        self._spool.flush()
        spool = self._spool.fileno()
        journals: dict[int, int] = {}               # journal number -> open fd
        try:
            with atomic_file(output_dir / "faces.jsonl", 1 << 20) as faces, \
                    atomic_file(output_dir / "bounding_boxes.txt", 1 << 20) as boxes:
                for j, offset, length, s_offset, s_length in zip(
                        self.journal.tolist(), self.offset.tolist(), self.length.tolist(),
                        self.spool_offset.tolist(), self.spool_length.tolist()):
                    fd = journals.get(j)
                    if fd is None:
                        if len(journals) >= MAX_OPEN_JOURNALS:
                            for fd in journals.values():
                                os.close(fd)
                            journals.clear()
                        fd = journals[j] = os.open(self.paths[j], os.O_RDONLY)
                    faces.write(_pread(fd, length, offset))
                    if s_length:
                        boxes.write(_pread(spool, s_length, s_offset))
        finally:
            for fd in journals.values():
                os.close(fd)
            self._spool.close()
        return self.counts()

    def _find(self, rel: str) -> int | None:
        """The index of the task whose rel is `rel`; None when no task has it."""
        h = hash(rel)
        pos = int(np.searchsorted(self._hashes, h))
        while pos < len(self._hashes) and self._hashes[pos] == h:
            i = int(self._order[pos])
            if self.tasks[i].rel == rel:
                return i
            pos += 1
        return None

    def _read(self, path: Path) -> dict[int, tuple]:
        """{task index: (status code, faces, journal number, offset, length, spool offset,
        spool length)} of the last line for each of the job's inputs in the journal at
        `path`; its bounding_boxes.txt lines go to the spool."""
        key = str(path)
        number = self._path_numbers.get(key)
        if number is None:
            number = self._path_numbers[key] = len(self.paths)
            self.paths.append(key)
        latest: dict[int, tuple] = {}
        for offset, line, record in Journal(path).entries():
            i = self._find(record["input"])
            if i is None:
                continue                            # an input gone from INPUT_DIR since
            boxes = "".join(bounding_box_lines(record, self.output_dir_arg)).encode("utf-8", "surrogateescape")
            self._spool.write(boxes)
            latest[i] = (self._code(record["status"]), len(record.get("written", ())), number,
                         offset, len(line), self._spool_size, len(boxes))
            self._spool_size += len(boxes)
        return latest

    def _code(self, status: str) -> int:
        code = _CODE.get(status)
        if code is None:
            code = self.extra_statuses.setdefault(status, len(STATUSES) + len(self.extra_statuses))
        return code

    def _set(self, i: int, status, faces, journal, offset, length, s_offset, s_length) -> None:
        self.status[i], self.faces[i], self.journal[i] = status, faces, journal
        self.offset[i], self.length[i] = offset, length
        self.spool_offset[i], self.spool_length[i] = s_offset, s_length


def _pread(fd: int, length: int, offset: int) -> bytes:
    data = os.pread(fd, length, offset)
    if len(data) != length:
        raise RuntimeError(f"a journal changed while its records were merged (fd {fd})")
    return data


def write_summary(output_dir: Path, summary: dict) -> None:
    write_atomic(output_dir / "summary.json", (json.dumps(summary, indent=1) + "\n").encode())
