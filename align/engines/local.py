"""The local engine: a pool of worker processes on this machine, one set of nets each.

Workers are spawned (not forked: TensorFlow does not survive a fork), die with the parent
(PR_SET_PDEATHSIG), start on the photos together once the last has its nets, and send progress
events on a queue that a thread of the parent pumps into the progress display.
"""
from __future__ import annotations

import atexit
import contextlib
import ctypes
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool

from align.config import bounded_workers, usable_cores
from align.dataset import Shard
from align.engines import IN_FLIGHT, EngineRun, ShardFeed, Interrupted, JobError
from align.nets_server import NetsServer
from align.worker import Progress, ShardDone, ShardJob, load_nets, run_shard

START_WAIT_S = 300.0    # how long a ready worker waits for the others before it starts anyway

# glibc malloc serves blocks this large from mmap by default, and gives them back on free: every
# large array (a P-Net map of a multi-megapixel photo is ~100 MB) then costs its pages' faults
# and zeroing again, about a third of a memory-bound TF op's time. Workers keep them instead.
WORKER_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 32), "MALLOC_TRIM_THRESHOLD_": str(1 << 32)}


# --- worker side ---------------------------------------------------------------------------------
_job: ShardJob | None = None
_events = None


def _die_with_parent(parent: int) -> None:
    """Linux: have the kernel kill this worker when the parent dies (kill -9 included), so no
    orphan keeps writing into a folder that a rerun is already working on. The first thing a
    worker does; a parent that died before it (while the worker was starting Python) is no
    longer its parent, and then the worker exits at once."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:
        os._exit(1)


def _init_worker(parent: int, job: ShardJob, threads: int, events, start, nets_server: str | None) -> None:
    global _job, _events
    _die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)    # the parent handles Ctrl-C
    load_nets(threads, job.config.gpu_memory_fraction, nets_server)
    _job, _events = job, events
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


def _run_shard(shard: Shard) -> ShardDone:
    return run_shard(_job, shard, lambda n, faces, failed: _events.put(("done", n, faces, failed)))


# --- parent side ---------------------------------------------------------------------------------
def _pump(events, progress: Progress, ready: list, workers: int, start, stop: threading.Event) -> None:
    """Workers' events into `progress` until `stop` is set and the queue is empty. `stop` is
    set once every worker has exited, and an exiting worker flushes its events first. Sets
    `start` once all `workers` are ready."""
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
            progress(n, faces, failed)


@contextlib.contextmanager
def worker_malloc_env():
    """WORKER_MALLOC_ENV in os.environ while workers start (glibc reads it at process start),
    except where the user has set those variables; the caller's environment is restored."""
    added = {k: v for k, v in WORKER_MALLOC_ENV.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


class LocalEngine:
    """Up to `workers` processes on this machine, TensorFlow on usable cores / workers threads
    in each."""
    name = "local"

    def __init__(self, workers: int):
        self.workers = workers

    def run(self, job: ShardJob, feed: ShardFeed, progress: Progress) -> EngineRun:
        ctx = mp.get_context("spawn")
        events = ctx.Queue()
        workers, warning = bounded_workers(self.workers, len(feed.peek(self.workers)))
        if warning:
            print(f"align_dataset: {warning}", file=sys.stderr, flush=True)
        feed.workers = workers
        threads = max(1, usable_cores() // workers)
        start, stop = ctx.Event(), threading.Event()
        ready: list[float] = []
        with worker_malloc_env():           # --device: one process runs the nets of every worker
            server = NetsServer(job.config.device, usable_cores()) if job.config.device else None
        pump = threading.Thread(target=_pump, args=(events, progress, ready, workers, start, stop),
                                daemon=True)
        pump.start()
        pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                                   initargs=(os.getpid(), job, threads, events, start,
                                             server and server.address))
        previous_term = signal.signal(signal.SIGTERM, signal.default_int_handler)
        try:
            futures: set = set()

            def fill() -> bool:
                """Shards handed out up to IN_FLIGHT a worker; False once there are no more."""
                while len(futures) < IN_FLIGHT * workers:
                    shard = next(feed, None)
                    if shard is None:
                        return False
                    futures.add(pool.submit(_run_shard, shard))
                return True

            with worker_malloc_env():       # submit starts the workers (spawn: one each, on demand)
                more = fill()
            while futures:
                finished, futures = wait(futures, timeout=0.5, return_when=FIRST_COMPLETED)
                for f in finished:
                    f.result()
                if more:
                    more = fill()
            done_at = time.perf_counter()
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
            start.set()                     # a worker that died starting must not hold the rest
            signal.signal(signal.SIGTERM, previous_term)
            pool.shutdown(wait=True, cancel_futures=True)
            if server:
                server.stop()
            stop.set()
            pump.join()
        return EngineRun(workers, max(ready), done_at)
