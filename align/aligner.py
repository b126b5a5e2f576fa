"""One shard: read -> detect (batched) -> choose faces -> crop or warp -> write -> journal.

Knows nothing of processes: every engine's workers call it through `align.worker.run_shard`. Decoding runs a batch ahead of detection, and encoding and
writing a batch behind it, each on a thread of its own, so the nets wait for neither.
"""
from __future__ import annotations

import hashlib
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np

from align.config import Config
from align.crop import choose_faces, crop_box, thumbnail
from align.dataset import Shard, Task
from align.detect import Detector, Faces, TooCostly, cost_refusal
from align.imageio import NotAnImage, UnreadableImage, decode_image, encode_image
from align.records import Journal, is_transient, needs_work
from align.splits import split_of, split_of_identity
from align.warp import face_transform, footprint, warp
from align.writers import make_writer

BATCH = 16                      # images per detect_batch call, at most
MAX_BATCH_PIXELS = 20_000_000   # decoded pixels per batch: a batch lives in up to 3 stages

Progress = Callable[[int, int, int], None]      # (images, faces written, failures)
_NOTHING_READ = hashlib.sha256().digest()       # a file that could not be opened, or is empty


class ShardCancelled(Exception):
    """The shard's results are no longer wanted (its run is gone): nothing more was written."""


def _read(path: Path, hasher=None) -> tuple[np.ndarray | None, str | None, str | None]:
    """(image, None, None), or (None, status, reason) when it cannot be used now. PIL's
    warnings about the file (a decompression bomb, corrupt EXIF) are not printed: what they
    mean is in the record. `hasher` (hashlib) is fed the file's bytes when they are read.
    (Only the shard's one reader thread calls this.)"""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return decode_image(path, hasher=hasher), None, None
    except UnreadableImage as e:
        if is_transient(e):     # vanished, not readable now, an I/O error: retried
            return None, "error", str(e)
        return None, "not_an_image" if isinstance(e, NotAnImage) else "unreadable", str(e)
    except Exception as e:      # MemoryError and the like: the file may be fine; retried
        return None, "error", _describe(e)


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())}"[:300]


def error_record(task: Task, config: Config, reason: str) -> dict:
    """The record of an image that failed for a reason that says nothing about it; the next
    run retries it."""
    return image_record(task, config, "error", reason, None)


def task_split(task: Task, config: Config, digest: bytes | None = None) -> str | None:
    """The split of a task (align/splits.py): of its identity's name, or of its photo's bytes
    (`digest`, their sha256; None: not read, no split); None without --split."""
    if config.split is None:
        return None
    if config.split_by == "identity":
        return split_of_identity(task.rel.split("/", 1)[0], config.split_seed, config.split)
    return None if digest is None else split_of(digest, config.split_seed, config.split)


def image_record(task: Task, config: Config, status: str, reason: str | None,
                 image: np.ndarray | None, split: str | None = None) -> dict:
    split = split or task_split(task, config)
    top = f"{split}/" if split else ""
    record = {"input": task.rel, "status": status, "reason": reason,
              "size": None if image is None else [image.shape[1], image.shape[0]],
              "output": f"{top}{task.out_base}{config.extension}", "faces": [], "written": []}
    if task.natural is not None:    # facenet's name could not be used (align.dataset says why)
        record["natural_output"] = f"{task.natural}{config.extension}"
    if split:
        record["split"] = split
    return record


def _face_record(faces: Faces, i: int) -> dict:
    return {"box": [float(v) for v in faces.boxes[i]], "score": float(faces.scores[i]),
            "landmarks": [[float(x), float(y)] for x, y in faces.landmarks[i]]}


class Aligner:
    """The detector of one worker and the config of the run."""

    def __init__(self, config: Config, input_dir: Path, output_dir: Path,
                 detector: Detector | None = None):
        self.config = config
        self.input_dir = Path(input_dir)
        self.output_dir = Path(output_dir)
        self.detector = detector or Detector()
        self.writer = make_writer(config, self.output_dir)
        self._splits: dict[str, str] = {}     # input path -> split, from the reader to the writer

    def output_name(self, task: Task, face: int | None = None, split: str | None = None) -> str:
        suffix = "" if face is None else f"_{face}"
        top = f"{split}/" if split else ""
        return f"{top}{task.out_base}{suffix}{self.config.extension}"

    def run_shard(self, shard: Shard, journal: Journal, legacy_outputs: bool = False,
                  progress: Progress | None = None,
                  cancelled: Callable[[], bool] | None = None) -> list[dict]:
        """Align the shard's images that `journal` lacks or records as "error"; returns every
        record of the shard.
        legacy_outputs: the output folder predates our journals, so an image whose thumbnail
        exists is skipped, as facenet skipped it.
        cancelled: asked before each batch is written; once true, raises ShardCancelled."""
        done = journal.load()
        todo = [t for t in shard.tasks if needs_work(done.get(t.rel))]
        if legacy_outputs:
            multiple = self.config.detect_multiple_faces
            skipped = [self._record(t, "skipped_existing", None, None) for t in todo
                       if (self.output_dir / self.output_name(t, 0 if multiple else None)).exists()]
            journal.append(skipped)
            done.update((r["input"], r) for r in skipped)
            todo = [t for t in todo if t.rel not in done]
        with self.writer.shard(shard.key) as sink, ThreadPoolExecutor(1) as reader, \
                ThreadPoolExecutor(1) as writer:
            pending = reader.submit(self._read_batch, todo, 0) if todo else None
            writes = []
            while pending:
                batch, following = pending.result()
                pending = reader.submit(self._read_batch, todo, following) if following < len(todo) else None
                detected = self._detect(batch)
                if cancelled and cancelled():
                    raise ShardCancelled(shard.key)
                writes.append(writer.submit(self._write, detected, sink, journal, progress))
            records = [r for w in writes for r in w.result()]
        done.update((r["input"], r) for r in records)
        return [done[t.rel] for t in shard.tasks]

    def _read_batch(self, tasks: list[Task], start: int) -> tuple[list[tuple], int]:
        """Decode tasks from `start` until BATCH images or MAX_BATCH_PIXELS decoded pixels;
        returns [(task, image, status, reason)] and the index of the first task left."""
        batch, pixels, i = [], 0, start
        while i < len(tasks) and len(batch) < BATCH and pixels < MAX_BATCH_PIXELS:
            hasher = hashlib.sha256() if self.config.split and self.config.split_by == "photo" else None
            image, status, reason = _read(self.input_dir / tasks[i].rel, hasher)
            if hasher and status != "error" and hasher.digest() != _NOTHING_READ:
                self._splits[tasks[i].rel] = task_split(tasks[i], self.config, hasher.digest())
            if image is not None:
                refusal = cost_refusal(*image.shape[:2], self.config.detect_params)
                if refusal:         # the photo's size under these options: permanent
                    image, status, reason = None, "too_costly", refusal
            batch.append((tasks[i], image, status, reason))
            pixels += 0 if image is None else image.shape[0] * image.shape[1]
            i += 1
        return batch, i

    def _detect(self, batch: list[tuple]) -> list[tuple]:
        """[(task, image, status, reason, faces)]; when the batch fails (out of memory, say),
        each image alone, so that one image's failure is that image's record only."""
        images = [im for _, im, _, _ in batch if im is not None]
        try:
            found = iter(self.detector.detect_batch(images, self.config.detect_params))
            return [(t, im, s, r, next(found) if im is not None else None) for t, im, s, r in batch]
        except Exception:
            pass
        out = []
        for task, image, status, reason in batch:
            faces = None
            if image is not None:
                try:
                    faces = self.detector.detect(image, self.config.detect_params)
                except TooCostly as e:     # the photo under these options: permanent
                    image, status, reason = None, "too_costly", str(e)
                except Exception as e:
                    image, status, reason = None, "error", _describe(e)
            out.append((task, image, status, reason, faces))
        return out

    def _record(self, task: Task, status: str, reason: str | None,
                image: np.ndarray | None) -> dict:
        return image_record(task, self.config, status, reason, image, self._splits.pop(task.rel, None))

    def _write(self, results, sink, journal: Journal, progress: Progress | None) -> list[dict]:
        """Thumbnails of one batch handed to the writer's `sink` and made durable, then its
        records journaled. A failure on one image (a name too long for the file system, a full
        disk) becomes that image's "error" record, which the next run retries."""
        records = []
        for task, image, status, reason, faces in results:
            if image is None:
                records.append(self._record(task, status, reason, None))
                continue
            try:
                record = self._aligned(task, image, faces, sink)
            except Exception as e:
                record = self._record(task, "error", _describe(e), image)
            records.append(record)
        sink.commit()
        journal.append(records)
        if progress:
            failed = sum(r["status"] in ("unreadable", "too_costly", "error") for r in records)
            progress(len(records), sum(len(r["written"]) for r in records), failed)
        return records

    def _aligned(self, task: Task, image: np.ndarray, faces: Faces, sink) -> dict:
        record = self._record(task, "aligned" if len(faces) else "no_face", None, image)
        record["faces"] = [_face_record(faces, i) for i in range(len(faces))]
        multiple = self.config.detect_multiple_faces
        for n, i in enumerate(choose_faces(faces.boxes, image.shape[:2], multiple)):
            if self.config.align == "box":
                box = crop_box(faces.boxes[i], image.shape[:2], self.config.margin)
                thumb, fields = thumbnail(image, box, self.config.image_size), {"crop_box": list(box)}
            else:
                thumb, fields = self._warped(image, faces.landmarks[i])
            if thumb is None:
                continue
            name = self.output_name(task, n if multiple else None, record.get("split"))
            sink.add(name, encode_image(thumb, self.config.format))
            record["written"].append({"face": i, **fields, "output": name})
        if len(faces) and not record["written"]:
            reason = "every face's crop is empty" if self.config.align == "box" else \
                "no face's landmarks fix a similarity transform"
            record.update(status="no_face", reason=reason)
        return record

    def _warped(self, image: np.ndarray, landmarks: np.ndarray) -> tuple[np.ndarray | None, dict]:
        """The face warped onto the template, and its record's fields: crop_box (the part of
        the input the thumbnail shows), the matrix (input pixels -> output pixels) and the
        template's name; (None, {}) when the landmarks fix no transform (coincident)."""
        try:
            matrix, size = face_transform(landmarks, self.config.image_size, self.config.align)
        except ValueError:
            return None, {}
        return warp(image, matrix, size), {
            "crop_box": list(footprint(matrix, size, image.shape[:2])),
            "matrix": [[float(v) for v in row] for row in matrix], "template": self.config.align}
