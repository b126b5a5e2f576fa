"""What a worker process of any engine holds and runs: the nets, loaded once per process (the one
piece of global state), and the shard function, which knows nothing of engines.

Every engine calls `run_shard(job, shard)` in a worker process: the local pool in its own
processes, Dask in its workers. A shard's records go to that shard's journal in OUTPUT_DIR, so
what comes back to the engine is only a count of what was done.
"""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from align.config import Config
from align.dataset import Shard
from align.records import StateDir, dumps


@dataclass(frozen=True)
class ShardJob:
    """What every shard of a run shares: the options, the folders (the same paths on every
    worker), and whether OUTPUT_DIR held facenet's outputs before our first run on it."""
    config: Config
    input_dir: Path
    output_dir: Path
    legacy_outputs: bool = False


@dataclass(frozen=True)
class ShardDone:
    """What one run of a shard did: images aligned or recorded, faces written, failures."""
    images: int = 0
    faces: int = 0
    failed: int = 0


Progress = Callable[[int, int, int], None]      # (images, faces written, failures) so far
Cancelled = Callable[[], bool]                  # True once the shard's results are not wanted

_detector = None
# benchmarks only (bench/scale.py): a shard function that reads no photo and loads no net, and
# journals one made-up "aligned" record per photo without fsync, so that what a benchmark
# measures is the client, the scheduler and the records. Its outputs are not a training set.
BENCH_NO_NETS = "ALIGN_BENCH_NO_NETS"


def configure_threads(threads: int, gpu_memory_fraction: float) -> None:
    """Threads of this process's OpenCV and of Keras's backend, and TF's GPU memory; and the
    nets' arithmetic (full_float32). Where the backend has already started in the process (a
    caller's script re-imported by spawn, say), it keeps what it has."""
    import cv2
    cv2.setNumThreads(threads)
    from facenet_nets import backend_name
    backend = backend_name()
    if backend == "torch":
        import torch
        torch.set_num_threads(threads)
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:
            pass
    elif backend == "jax":
        flags = os.environ.get("XLA_FLAGS", "")
        if "intra_op_parallelism_threads" not in flags:
            os.environ["XLA_FLAGS"] = (f"{flags} --xla_cpu_multi_thread_eigen={str(threads > 1).lower()} "
                                       f"intra_op_parallelism_threads={threads}").strip()
    elif backend == "tensorflow":
        _configure_tensorflow(threads, gpu_memory_fraction)
    full_float32(backend)


def full_float32(backend: str) -> None:
    """On a GPU the nets run in full float32, as facenet's: no TF32, which Ampere and later GPUs
    use by default for convolutions and matrix products (boxes moved by up to 33 px on an H200;
    docs/performance.md). No effect on a CPU."""
    if backend == "torch":
        import torch
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    elif backend == "jax":
        import jax
        jax.config.update("jax_default_matmul_precision", "highest")
    elif backend == "tensorflow":
        import tensorflow as tf
        tf.config.experimental.enable_tensor_float_32_execution(False)


def _configure_tensorflow(threads: int, gpu_memory_fraction: float) -> None:
    import tensorflow as tf
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:
        pass
    gpus = tf.config.list_physical_devices("GPU")
    try:
        for gpu in gpus:
            tf.config.experimental.set_memory_growth(gpu, True)
        if gpus and gpu_memory_fraction < 1:
            # facenet's per_process_gpu_memory_fraction, as a limit on the logical device
            totals = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                                    capture_output=True, text=True, check=True).stdout.split()
            for gpu, total in zip(gpus, totals):
                limit = int(float(total) * gpu_memory_fraction)
                tf.config.set_logical_device_configuration(
                    gpu, [tf.config.LogicalDeviceConfiguration(memory_limit=limit)])
    except (OSError, ValueError, RuntimeError, subprocess.CalledProcessError):
        pass


class QuietStderr:
    """Silence fd 2 while TensorFlow starts: it logs CUDA probing and oneDNN notices there
    before any log level applies. Errors still raise, and print once fd 2 is back."""

    def __enter__(self):
        sys.stderr.flush()
        self.saved = os.dup(2)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)

    def __exit__(self, *exc):
        os.dup2(self.saved, 2)
        os.close(self.saved)


def load_nets(threads: int = 1, gpu_memory_fraction: float = 1.0, nets_server: str | None = None):
    """This process's Detector, built and traced on the first call (Keras's backend on
    `threads` threads), or, given the address of a nets server (align.nets_server), one whose
    nets are that server's: then this process loads no net and no framework. Later calls
    return it as it is."""
    global _detector
    if os.environ.get(BENCH_NO_NETS):
        return None
    if _detector is None and nets_server:
        import cv2
        from align.detect import Detector
        from align.nets_server import RemoteNets
        cv2.setNumThreads(threads)
        _detector = Detector(nets=RemoteNets(nets_server))
    if _detector is None:
        with QuietStderr():
            configure_threads(threads, gpu_memory_fraction)
            from align.detect import Detector
            detector = Detector()
            detector.warm_up()
        _detector = detector
    return _detector


def run_shard(job: ShardJob, shard: Shard, progress: Progress | None = None,
              cancelled: Cancelled | None = None) -> ShardDone:
    """Align the shard's images that its journal lacks (or records as "error") into
    job.output_dir; returns what this call did. `progress` hears of every batch once its
    records are journaled; once `cancelled()` is true no further batch is written."""
    if os.environ.get(BENCH_NO_NETS):
        return _made_up_shard(job, shard, progress)
    from align.aligner import Aligner
    aligner = Aligner(job.config, job.input_dir, job.output_dir,
                      load_nets(1, job.config.gpu_memory_fraction))
    done = [0, 0, 0]

    def count(images: int, faces: int, failed: int) -> None:
        done[0] += images
        done[1] += faces
        done[2] += failed
        if progress:
            progress(images, faces, failed)

    journal = StateDir(job.output_dir).journal(shard.key)
    aligner.run_shard(shard, journal, job.legacy_outputs, count, cancelled)
    return ShardDone(*done)


def _made_up_shard(job: ShardJob, shard: Shard, progress: Progress | None) -> ShardDone:
    """BENCH_NO_NETS's shard function: a record shaped as the aligner's (one face, its box,
    landmarks and written entry) for each task, appended without fsync."""
    journal = StateDir(job.output_dir).journal(shard.key)
    records = []
    for i, t in enumerate(shard.tasks):
        x, y = 20.0 + i, 30.5 + i
        out = f"{t.out_base}.{job.config.format}"
        records.append({"input": t.rel, "status": "aligned", "reason": None, "size": [250, 250],
                        "output": out, "faces": [{"box": [x, y, x + 80.25, y + 96.5], "score": 0.99987,
                        "landmarks": [[x + 20.5, y + 30.5], [x + 60.5, y + 30.5], [x + 40.5, y + 50.5],
                                      [x + 25.5, y + 70.5], [x + 55.5, y + 70.5]]}],
                        "written": [{"face": 0, "crop_box": [int(x) - 22, int(y) - 22, int(x) + 102, int(y) + 118],
                                     "output": out}]})
    with open(journal.path, "a", encoding="utf-8") as f:
        f.write("".join(dumps(r) + "\n" for r in records))
    if progress:
        progress(len(records), len(records), 0)
    return ShardDone(len(records), len(records), 0)


def failed_shard(job: ShardJob, shard: Shard, reason: str) -> ShardDone:
    """Journal an "error" record (retried by the next run) for each image of a shard that its
    journal lacks: what an engine does with a shard that failed on every try."""
    from align.aligner import error_record
    journal = StateDir(job.output_dir).journal(shard.key)
    have = journal.load()
    records = [error_record(t, job.config, reason) for t in shard.tasks if t.rel not in have]
    journal.append(records)
    return ShardDone(len(records), 0, len(records))
