"""One shard: read -> detect (batched) -> choose faces -> crop -> write -> journal.

Knows nothing of processes: the runner calls `Aligner.run_shard` in each worker, and a cluster
engine could call it the same way. Decoding runs a batch ahead of detection, and encoding and
writing a batch behind it, each on a thread of its own, so the nets wait for neither.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np

from align.config import Config
from align.crop import choose_faces, crop_box, thumbnail
from align.dataset import Shard, Task
from align.detect import Detector, Faces
from align.imageio import UnreadableImage, decode_image, encode_image, sniff, write_atomic
from align.records import Journal

BATCH = 16      # images per detect_batch call

Progress = Callable[[int, int, int], None]      # (images, faces written, failures)


def _read(path: Path) -> tuple[np.ndarray | None, str | None, str | None]:
    """(image, None, None), or (None, status, reason) when it cannot be used."""
    try:
        return decode_image(path), None, None
    except UnreadableImage as e:
        try:
            status = "not_an_image" if sniff(path) is None else "unreadable"
        except UnreadableImage:
            status = "unreadable"
        return None, status, str(e)


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

    def output_name(self, task: Task, face: int | None = None) -> str:
        suffix = "" if face is None else f"_{face}"
        return f"{task.out_base}{suffix}{self.config.extension}"

    def run_shard(self, shard: Shard, journal: Journal, legacy_outputs: bool = False,
                  progress: Progress | None = None) -> list[dict]:
        """Align the shard's images that `journal` lacks; returns every record of the shard.
        legacy_outputs: the output folder predates our journals, so an image whose thumbnail
        exists is skipped, as facenet skipped it."""
        done = journal.load()
        todo = [t for t in shard.tasks if t.rel not in done]
        if legacy_outputs:
            multiple = self.config.detect_multiple_faces
            skipped = [self._record(t, "skipped_existing", None, None) for t in todo
                       if (self.output_dir / self.output_name(t, 0 if multiple else None)).exists()]
            journal.append(skipped)
            done.update((r["input"], r) for r in skipped)
            todo = [t for t in todo if t.rel not in done]
        batches = [todo[k:k + BATCH] for k in range(0, len(todo), BATCH)]
        with ThreadPoolExecutor(1) as reader, ThreadPoolExecutor(1) as writer:
            read = lambda batch: [_read(self.input_dir / t.rel) for t in batch]
            pending = reader.submit(read, batches[0]) if batches else None
            writes = []
            for k, batch in enumerate(batches):
                decoded = pending.result()
                if k + 1 < len(batches):
                    pending = reader.submit(read, batches[k + 1])
                images = [im for im, _, _ in decoded if im is not None]
                found = iter(self.detector.detect_batch(images, self.config.detect_params))
                results = [(t, im, status, reason, next(found) if im is not None else None)
                           for t, (im, status, reason) in zip(batch, decoded)]
                writes.append(writer.submit(self._write, results, journal, progress))
            records = [r for w in writes for r in w.result()]
        done.update((r["input"], r) for r in records)
        return [done[t.rel] for t in shard.tasks]

    def _record(self, task: Task, status: str, reason: str | None,
                image: np.ndarray | None) -> dict:
        return {"input": task.rel, "status": status, "reason": reason,
                "size": None if image is None else [image.shape[1], image.shape[0]],
                "output": self.output_name(task), "faces": [], "written": []}

    def _write(self, results, journal: Journal, progress: Progress | None) -> list[dict]:
        """Thumbnails of one batch, renamed into place, then its records journaled."""
        records = []
        n_faces = n_failed = 0
        for task, image, status, reason, faces in results:
            if image is None:
                records.append(self._record(task, status, reason, None))
                n_failed += status == "unreadable"
                continue
            record = self._record(task, "aligned" if len(faces) else "no_face", None, image)
            record["faces"] = [_face_record(faces, i) for i in range(len(faces))]
            multiple = self.config.detect_multiple_faces
            for n, i in enumerate(choose_faces(faces.boxes, image.shape[:2], multiple)):
                box = crop_box(faces.boxes[i], image.shape[:2], self.config.margin)
                thumb = thumbnail(image, box, self.config.image_size)
                if thumb is None:
                    continue
                name = self.output_name(task, n if multiple else None)
                write_atomic(self.output_dir / name, encode_image(thumb, self.config.format))
                record["written"].append({"face": i, "crop_box": list(box), "output": name})
            if len(faces) and not record["written"]:
                record.update(status="no_face", reason="every face's crop is empty")
            n_faces += len(record["written"])
            records.append(record)
        journal.append(records)
        if progress:
            progress(len(records), n_faces, n_failed)
        return records
