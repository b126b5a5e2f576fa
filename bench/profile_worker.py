"""Where one worker's time goes: per-stage milliseconds per photo, one process, 1 TF thread.

Usage: python bench/profile_worker.py DATA [MAX_PHOTOS]

Runs Aligner.run_shard over DATA's shards into a temporary folder, after one warm-up shard,
with the stages wrapped in timers: wall time for what runs on the detecting thread (the nets
run there too), CPU time of their own thread for decoding and writing, which run beside it.
"""
from __future__ import annotations

import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import tensorflow as tf

tf.config.threading.set_intra_op_parallelism_threads(1)
tf.config.threading.set_inter_op_parallelism_threads(1)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import align.aligner as aligner  # noqa: E402
import align.detect as detect  # noqa: E402
from align.config import Config  # noqa: E402
from align.dataset import cut_shards, walk  # noqa: E402
from align.records import StateDir  # noqa: E402

SPENT: dict[str, float] = defaultdict(float)


def timed(owner, name: str, label: str, clock=time.perf_counter) -> None:
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        t = clock()
        try:
            return original(*args, **kwargs)
        finally:
            SPENT[label] += clock() - t
    setattr(owner, name, wrapper)


def main(data: Path, max_photos: int) -> None:
    job = walk(data)
    shards = cut_shards(job.tasks, 1)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        for task in job.tasks:
            (out / task.out_base.split("/")[0]).mkdir(exist_ok=True)
        state = StateDir(out)
        state.journals.mkdir(parents=True)
        worker = aligner.Aligner(Config(image_size=160), data, out)
        worker.run_shard(shards[0], state.journal("warm-up"))
        timed(detect.Detector, "_stage1", "P-Net stage (pyramid, P-Net, NMS)")
        timed(detect, "_crops", "24/48 crops (summed-area table, gathers)")
        timed(detect, "_run_split", "R-Net + O-Net")
        timed(detect.Detector, "detect_batch", "detect_batch, all")
        timed(aligner, "_read", "decode (reader thread, CPU)", time.thread_time)
        timed(aligner.Aligner, "_write", "crop, resize, PNG, journal (writer thread, CPU)", time.thread_time)
        n, t0 = 0, time.perf_counter()
        for shard in shards[1:]:
            if n >= max_photos:
                break
            worker.run_shard(shard, state.journal(shard.key))
            n += len(shard.tasks)
        wall = time.perf_counter() - t0
    print(f"{data}: {n} photos, {n / wall:.1f} photos/s in one worker (1 TF thread)")
    for label, seconds in SPENT.items():
        print(f"  {label:50s} {1000 * seconds / n:7.1f} ms/photo")


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 300)
