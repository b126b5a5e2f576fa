"""What a run leaves beside the thumbnails, and how a killed run picks up where it stopped.

OUTPUT_DIR/.align_dataset/ holds the run's state:
  lock                  flock'ed by the running command; a second run on the folder refuses
  options.json          the options that shape the output; a rerun with others is refused
  journal/<shard>.jsonl one record per finished image, appended only after its thumbnails are
                        renamed into place (fsync'ed); a torn last line is dropped on reading
From the journals, at the end of every run, come (written atomically, in input order):
  faces.jsonl           one record per input file
  bounding_boxes.txt    facenet's format: "<output path> x1 y1 x2 y2" (a written face's
                        crop_box), or "<output path>" alone (an image without a face)
  summary.json          counts and timings
Each written face's record: "face" (its index in "faces"), "output", and "crop_box": the part of
the input the thumbnail shows, integer pixel edges (left, top, right, bottom) clipped to the
image: with --align box facenet's margin box, the very pixels cropped; with --align arcface the
smallest box of whole input pixels that holds the (rotated) square the thumbnail was warped
from. --align arcface adds "matrix", 2x3, mapping input pixels to thumbnail pixels
([u, v] = M @ [x, y, 1]), and "template", the name of the template ("arcface").
"""
from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

from align.durable import write_atomic

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
        """{input path: record} of the complete lines; cuts a torn tail off the file."""
        records, good = {}, 0
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return records
        for line in data.splitlines(keepends=True):
            if not line.endswith(b"\n"):
                break
            try:
                record = json.loads(line)
            except ValueError:
                break
            records[record["input"]] = record
            good += len(line)
        if good != len(data):
            with open(self.path, "r+b") as f:
                f.truncate(good)
        return records

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

    def load_all(self) -> dict[str, dict]:
        """{input path: record} over every journal. An input can have records in two
        journals when runs cut their shards differently: an "error" in one and the retry's
        outcome in another. The one that needs no more work wins."""
        records = {}
        for path in sorted(self.journals.glob("*.jsonl")):
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


def write_results(output_dir: Path, output_dir_arg: str, records: list[dict], summary: dict) -> None:
    """faces.jsonl, bounding_boxes.txt and summary.json, each written atomically."""
    write_atomic(output_dir / "faces.jsonl",
                 "".join(dumps(r) + "\n" for r in records).encode("utf-8", "surrogateescape"))
    lines = [line for r in records for line in bounding_box_lines(r, output_dir_arg)]
    write_atomic(output_dir / "bounding_boxes.txt", "".join(lines).encode("utf-8", "surrogateescape"))
    write_atomic(output_dir / "summary.json", (json.dumps(summary, indent=1) + "\n").encode())


def count(records: list[dict]) -> dict:
    counts = {s: 0 for s in STATUSES}
    for r in records:
        counts[r["status"]] += 1
    counts["faces_written"] = sum(len(r.get("written", ())) for r in records)
    return counts
