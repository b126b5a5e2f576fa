"""Run the shards of a job: a pool of worker processes, one Aligner (one set of nets) each;
a progress bar; Ctrl-C; the lock; the merged records at the end.

Knows nothing of faces. `align_dataset` is the Python entry point; the CLI is a thin layer on it.
"""
from __future__ import annotations

import atexit
import contextlib
import ctypes
import dataclasses
import multiprocessing as mp
import os
import random
import resource
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from align.config import Config, usable_cores
from align.dataset import Shard, cut_shards, walk
from align.records import RecordIndex, StateDir, write_summary
from facenet_nets.weights import verify_weights
from align.durable import TEMP_PREFIX, TEMP_SUFFIX

# options whose change changes the output: a resumed run must use the same ones
OUTPUT_OPTIONS = ("image_size", "margin", "detect_multiple_faces", "min_face_size",
                  "thresholds", "factor", "format")
LOG_EVERY_S = 10.0
START_WAIT_S = 300.0    # how long a ready worker waits for the others before it starts anyway


class JobError(Exception):
    """The job cannot start (bad folders, options, another run); the message says why."""


class OptionsError(JobError, ValueError):
    """The folders or options given cannot work (a usage error)."""


class Interrupted(Exception):
    """Ctrl-C (or SIGTERM): the run stopped cleanly; rerunning the command resumes it."""


# --- worker side: the loaded nets are the only state a worker keeps ---------------------------
_aligner = None
_events = None


def _die_with_parent() -> None:
    """Linux: have the kernel kill this worker when the parent dies (kill -9 included), so no
    orphan keeps writing into a folder that a rerun is already working on."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _configure_threads(threads: int, gpu_memory_fraction: float) -> None:
    """Threads of this worker's OpenCV and TensorFlow, and TF's GPU memory. Where TF has
    already started in the process (a caller's script re-imported by spawn, say), it keeps
    what it has."""
    import cv2
    import tensorflow as tf
    cv2.setNumThreads(threads)
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


class _QuietStderr:
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


def _init_worker(config: Config, input_dir: Path, output_dir: Path, threads: int, events,
                 start) -> None:
    global _aligner, _events
    signal.signal(signal.SIGINT, signal.SIG_IGN)    # the parent handles Ctrl-C
    _die_with_parent()
    with _QuietStderr():
        _configure_threads(threads, config.gpu_memory_fraction)
        from align.aligner import Aligner
        _aligner = Aligner(config, input_dir, output_dir)
        _aligner.detector.warm_up()
    _events = events
    events.put(("ready", 0, 0, 0))
    atexit.register(_exit_without_teardown)
    # every worker starts on the photos at once, when the last has its nets: then the run's
    # photos/s (timed from that moment) counts no photo done before it
    start.wait(START_WAIT_S)


def _exit_without_teardown() -> None:
    """A worker's last step: TensorFlow's teardown at interpreter exit takes 1-2 s per worker,
    and the run's end waits for every worker. Nothing is left to lose by then: multiprocessing
    has flushed the events queue and sent the last result, the journals and thumbnails are
    fsync'ed. (Registered last, so atexit runs it first.)"""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _run_shard(shard: Shard, legacy_outputs: bool) -> list[dict]:
    journal = StateDir(_aligner.output_dir).journal(shard.key)
    report = lambda n, faces, failed: _events.put(("done", n, faces, failed))
    return _aligner.run_shard(shard, journal, legacy_outputs, report)


# --- parent side ---------------------------------------------------------------------------------
def _check_dirs(input_dir: Path, output_dir: Path) -> None:
    if not input_dir.is_dir():
        raise OptionsError(f"INPUT_DIR {input_dir} is not a folder")
    i, o = input_dir.resolve(), output_dir.resolve()
    if o == i or i in o.parents:
        raise OptionsError(f"OUTPUT_DIR {output_dir} is inside INPUT_DIR {input_dir}: pick a folder outside it")
    if o in i.parents:
        raise OptionsError(f"INPUT_DIR {input_dir} is inside OUTPUT_DIR {output_dir}: pick another OUTPUT_DIR")
    if output_dir.exists() and not output_dir.is_dir():
        raise OptionsError(f"OUTPUT_DIR {output_dir} exists and is not a folder")


def _remove_stale_temporaries(output_dir: Path) -> None:
    """Temporary files of writes that a killed run left half-done (never renamed into place)."""
    for folder in [output_dir, *(p for p in output_dir.iterdir() if p.is_dir())]:
        for tmp in folder.glob(f"{TEMP_PREFIX}*{TEMP_SUFFIX}"):
            tmp.unlink(missing_ok=True)


class _Progress:
    """A tqdm bar on a terminal, else a line every LOG_EVERY_S seconds; nothing when quiet."""

    def __init__(self, total: int, done: int, quiet: bool):
        self.total, self.done, self.faces, self.failed = total, done, 0, 0
        self.start = time.perf_counter()
        self.quiet = quiet
        self.bar = None
        self.last_log = self.start
        if not quiet and sys.stdout.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=done, unit="img", dynamic_ncols=True)

    def update(self, n: int, faces: int, failed: int) -> None:
        self.done += n
        self.faces += faces
        self.failed += failed
        if self.bar:
            self.bar.update(n)
            self.bar.set_postfix(faces=self.faces, failed=self.failed, refresh=False)
        elif not self.quiet and time.perf_counter() - self.last_log >= LOG_EVERY_S:
            self.last_log = time.perf_counter()
            rate = self.done / max(1e-9, self.last_log - self.start)
            print(f"align_dataset: {self.done}/{self.total} images, {self.faces} faces written, "
                  f"{self.failed} failed, {rate:.1f} images/s", flush=True)

    def close(self) -> None:
        if self.bar:
            self.bar.close()


def _pump(events, progress: _Progress, ready: list, workers: int, start,
          stop: threading.Event) -> None:
    """Workers' events into the progress until `stop` is set and the queue is empty. `stop`
    is set once every worker has exited, and an exiting worker flushes its events first.
    Sets `start` once all `workers` are ready."""
    while True:
        try:
            kind, n, faces, failed = events.get(timeout=0.2)
        except Exception:   # queue.Empty; or a message torn by a worker killed on Ctrl-C
            if stop.is_set():
                return
            continue
        if kind == "ready":
            ready.append(time.perf_counter())
            if len(ready) == workers:
                start.set()
        else:
            progress.update(n, faces, failed)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def align_dataset(input_dir, output_dir, config: Config | None = None, **options) -> dict:
    """Align every identity folder of `input_dir` into `output_dir` (see README); resumes what
    a previous run on `output_dir` left unfinished unless overwrite. Options are Config's
    fields. Returns the summary (also in OUTPUT_DIR/summary.json). Raises JobError when the
    job cannot start and Interrupted on Ctrl-C."""
    config = dataclasses.replace(config or Config(), **options)
    t0 = time.perf_counter()
    output_arg = os.path.expanduser(str(output_dir))
    input_dir, output_dir = Path(os.path.expanduser(str(input_dir))), Path(output_arg)
    _check_dirs(input_dir, output_dir)
    verify_weights()        # once, here: not a fetch or a traceback in every worker
    state = StateDir(output_dir)
    found_outputs = output_dir.is_dir() and any(output_dir.iterdir()) and not state.root.exists()
    output_dir.mkdir(parents=True, exist_ok=True)
    if not state.lock():
        raise JobError(f"another align_dataset run is writing to {output_dir}; wait for it to finish")
    try:
        return _run(config, input_dir, output_dir, output_arg, state, found_outputs, t0)
    finally:
        state.unlock()


def _run(config, input_dir, output_dir, output_arg, state, found_outputs, t0) -> dict:
    options = {k: getattr(config, k) for k in OUTPUT_OPTIONS}
    options["thresholds"] = list(options["thresholds"])
    previous = state.options()
    if config.overwrite:
        for record in state.each_record():           # start over: what we wrote goes too
            for written in record.get("written", ()):
                (output_dir / written["output"]).unlink(missing_ok=True)
        state.reset()
    elif previous is not None and previous != options:
        diff = ", ".join(f"{k} {previous.get(k)} -> {v}" for k, v in options.items() if previous.get(k) != v)
        raise OptionsError(f"{output_dir} was aligned with other options ({diff}): rerun with the "
                       f"same options to resume, or add --overwrite to start over")
    state.set_options(options)
    if found_outputs and not config.overwrite:
        state.legacy_marker.touch()
    legacy_outputs = state.legacy_marker.exists()
    _remove_stale_temporaries(output_dir)

    job = walk(input_dir)
    for identity in {t.out_base.split("/")[0] for t in job.tasks}:
        (output_dir / identity).mkdir(exist_ok=True)
    index = RecordIndex(job.tasks, state, output_arg)     # where each task's record lies
    index.scan()
    pending = index.pending()
    if config.random_order:
        random.shuffle(pending)
    todo = cut_shards(pending, config.workers)
    done_before = len(job.tasks) - len(pending)
    progress = _Progress(len(job.tasks), done_before, config.quiet)
    ready: list[float] = []
    t_work = time.perf_counter()
    try:
        workers, t_done = _run_pool(config, input_dir, output_dir, todo, legacy_outputs, progress,
                                    ready, None) if todo else (0, None)
    finally:
        progress.close()
    t_end = time.perf_counter()

    index.update(todo)
    counts = index.merge(output_dir)        # faces.jsonl and bounding_boxes.txt, in input order
    # from every worker holding its nets (they start together) to the last shard's records
    processing_s = (t_done or t_end) - (max(ready) if ready else t_work)
    summary = {
        "input_dir": str(input_dir), "output_dir": output_arg, "images": len(job.tasks),
        "aligned": counts["aligned"], "no_face": counts["no_face"],
        "unreadable": counts["unreadable"], "errors": counts["error"],
        "skipped": counts["not_an_image"] + counts["skipped_existing"] + len(job.skipped),
        "faces_written": counts["faces_written"],
        "not_an_image": counts["not_an_image"], "skipped_existing": counts["skipped_existing"],
        "skipped_entries": job.skipped,
        "processed_this_run": len(pending),
        "workers": workers,
        "wall_s": round(t_end - t0, 3), "processing_s": round(processing_s, 3),
        "images_per_s": round(len(pending) / processing_s, 2) if processing_s > 0 else None,
        "peak_rss_mb": round(_peak_rss_mb(), 1),
    }
    write_summary(output_dir, summary)
    return summary


# glibc malloc serves blocks this large from mmap by default, and gives them back on free: every
# large array (a P-Net map of a multi-megapixel photo is ~100 MB) then costs its pages' faults
# and zeroing again, about a third of a memory-bound TF op's time. Workers keep them instead.
WORKER_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 32), "MALLOC_TRIM_THRESHOLD_": str(1 << 32)}


@contextlib.contextmanager
def _worker_malloc_env():
    """WORKER_MALLOC_ENV in os.environ while workers start (glibc reads it at process start),
    except where the user has set those variables; the caller's environment is restored."""
    added = {k: v for k, v in WORKER_MALLOC_ENV.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def _run_pool(config, input_dir, output_dir, todo, legacy_outputs, progress, ready,
              records) -> tuple[int, float]:
    """Run the shards on a pool of workers (each shard's records go to its journal; `records`
    is unused); returns how many workers it started and when (perf_counter) the last shard's
    records came in."""
    ctx = mp.get_context("spawn")
    events = ctx.Queue()
    workers = min(config.workers, len(todo))
    threads = max(1, usable_cores() // workers)     # TF threads per worker
    start, stop = ctx.Event(), threading.Event()
    pump = threading.Thread(target=_pump, args=(events, progress, ready, workers, start, stop),
                            daemon=True)
    pump.start()
    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                               initargs=(config, input_dir, output_dir, threads, events, start))
    previous_term = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        with _worker_malloc_env():          # submit starts the workers (spawn: one each, on demand)
            futures = {pool.submit(_run_shard, s, legacy_outputs) for s in todo}
        while futures:
            finished, futures = wait(futures, timeout=0.5, return_when=FIRST_COMPLETED)
            for f in finished:
                f.result()                  # raises a shard's error; its records are in its journal
        t_done = time.perf_counter()
    except KeyboardInterrupt:
        # the workers ignore SIGINT; the executor has no public way to stop running tasks
        for p in list(getattr(pool, "_processes", {}).values()):
            p.kill()
        pool.shutdown(wait=False, cancel_futures=True)
        raise Interrupted() from None
    except BrokenProcessPool:
        raise JobError("a worker process died (killed, or out of memory?): what it had finished "
                       "is kept; rerun the same command to resume, with fewer --workers if "
                       "memory ran out") from None
    finally:
        start.set()                         # a worker that died starting must not hold the rest
        signal.signal(signal.SIGTERM, previous_term)
        pool.shutdown(wait=True, cancel_futures=True)
        stop.set()
        pump.join()
    return workers, t_done
