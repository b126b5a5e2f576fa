"""The dask engine: the shards as tasks on a Dask cluster, one set of nets per worker process.

- The cluster: a connected `distributed.Client`, or the scheduler at an address (or
  DASK_SCHEDULER_ADDRESS), or a LocalCluster of `workers` processes, one thread each, started
  for the run and closed after it (as many as there are shards and as memory holds, as for
  the local engine).
- Before any shard is sent, every worker checks that it sees INPUT_DIR, can write into
  OUTPUT_DIR and has the weights: they must be at the same paths on every worker (a shared file
  system). A worker that cannot is named in the error.
- A WorkerPlugin loads the nets once per worker process (TensorFlow on the worker's nthreads
  threads), on the workers there are and on any that join later.
- Shards go out as they are cut (`client.submit(..., pure=False, retries=RETRIES)` into one
  `as_completed`), IN_FLIGHT per worker thread connected at most, so neither the client nor
  the scheduler holds more than that whatever the job's size; as a shard finishes, the
  threads are counted again (at most every THREADS_EVERY_S), and shards are cut for them:
  workers that join mid-run (adaptive scaling, dask-jobqueue) get shards, and a worker that
  leaves has its shard rerun elsewhere (the journal keeps what it finished). A shard that fails on every try gets "error" records
  for its images, which the next run retries.
- Progress is per batch of photos: each batch's counts are a worker event on a topic of the
  run's, which the client subscribes to.
- No worker writes after the client is gone: the scheduler then releases the client's tasks,
  and a running shard asks its worker before writing each batch whether its task is still
  wanted (it stops within one batch). A LocalCluster's processes die with the client.
- A LocalCluster started for the run logs nothing below CRITICAL: what fails in a shard is
  recorded (and retried) by the engine, and its shutdown races (a worker's heartbeat to a
  scheduler that just closed) would otherwise print tracebacks.
- Workers that declare a GPU resource (`dask worker ... --resources GPU=1`) get one shard at a
  time per GPU, when every worker declares one.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading
import time
import uuid
from pathlib import Path

import dask
import distributed
from distributed.diagnostics.plugin import WorkerPlugin

from align.config import bounded_workers
from align.dataset import Shard
from align.durable import write_atomic
from align.engines import IN_FLIGHT, EngineRun, Interrupted, JobError, ShardFeed
from align.engines.local import worker_malloc_env
from align.worker import Progress, ShardDone, ShardJob, failed_shard, load_nets, run_shard

RETRIES = 2                     # reruns of a shard whose task raised, on top of the first try
PLUGIN = "align-dataset-nets"
CONNECT_TIMEOUT_S = 30
THREADS_EVERY_S = 1.0           # how often the client asks the scheduler how many threads it has


class NetsPlugin(WorkerPlugin):
    """Loads the nets into the worker process when the worker starts (or when registered),
    off the worker's event loop, TensorFlow on the worker's nthreads threads. In the workers
    of a LocalCluster started for the run, `quiet_sigint`: Ctrl-C at the terminal reaches the
    whole process group, and the client alone handles it (it closes the cluster)."""
    idempotent = True

    def __init__(self, gpu_memory_fraction: float = 1.0, quiet_sigint: bool = False):
        self.gpu_memory_fraction = gpu_memory_fraction
        self.quiet_sigint = quiet_sigint

    async def setup(self, worker):
        if self.quiet_sigint and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        await asyncio.get_running_loop().run_in_executor(
            None, load_nets, worker.state.nthreads, self.gpu_memory_fraction)


def _probe(input_dir: str, output_dir: str, first_input: str | None) -> str | None:
    """On a worker: None when it sees INPUT_DIR (and its first input), can write into
    OUTPUT_DIR's state folder and has the weights; else what it cannot do."""
    from align.records import StateDir
    from facenet_nets.weights import WeightsError, verify_weights
    if not Path(input_dir).is_dir():
        return f"does not see INPUT_DIR {input_dir}"
    if first_input and not (Path(input_dir) / first_input).exists():
        return f"does not see {first_input} in INPUT_DIR {input_dir}"
    probe = StateDir(Path(output_dir)).root / f"probe-{uuid.uuid4().hex}"
    try:
        write_atomic(probe, b"")
        probe.unlink()
    except OSError as e:
        return f"cannot write into OUTPUT_DIR {output_dir} ({e.strerror or e})"
    try:
        verify_weights()
    except WeightsError as e:
        return f"has no usable MTCNN weights: {e}"
    return None


def _still_wanted():
    """On a worker, in a task: a function telling whether the scheduler still wants the task
    (it releases the tasks of a client that went away)."""
    worker = distributed.get_worker()
    key = worker.get_current_task()

    def cancelled() -> bool:
        task = worker.state.tasks.get(key)
        return task is None or task.state in ("cancelled", "released", "forgotten")
    return cancelled


def _shard_task(shard: Shard, job: ShardJob, topic: str) -> ShardDone:
    worker = distributed.get_worker()
    return run_shard(job, shard, lambda *counts: worker.log_event(topic, counts), _still_wanted())


class DaskEngine:
    name = "dask"

    def __init__(self, workers: int, scheduler: str | None = None, client=None):
        self.workers = workers
        self.scheduler = scheduler or dask.config.get("scheduler-address", None)
        self.client = client
        self.own_cluster = client is None and not self.scheduler

    @contextlib.contextmanager
    def _connect(self, feed: ShardFeed):
        """A client on the cluster; closed afterwards if opened here (a LocalCluster too)."""
        if self.client is not None:
            yield self.client
            return
        if self.scheduler:
            try:
                client = distributed.Client(self.scheduler, timeout=CONNECT_TIMEOUT_S)
            except (OSError, asyncio.TimeoutError, ValueError) as e:
                raise JobError(f"cannot reach the Dask scheduler at {self.scheduler}: {e}") from None
            with client:
                yield client
            return
        workers, warning = bounded_workers(self.workers, len(feed.peek(self.workers)))
        if warning:
            print(f"align_dataset: {warning}", file=sys.stderr, flush=True)
        with worker_malloc_env():
            cluster = distributed.LocalCluster(
                n_workers=workers, threads_per_worker=1, processes=True,
                dashboard_address=":0", silence_logs=logging.CRITICAL)
        with cluster, distributed.Client(cluster) as client:
            yield client

    def run(self, job: ShardJob, feed: ShardFeed, progress: Progress) -> EngineRun:
        try:
            with self._connect(feed) as client:
                return self._run(client, job, feed, progress)
        except KeyboardInterrupt:
            raise Interrupted() from None

    def _run(self, client, job: ShardJob, feed: ShardFeed, progress: Progress) -> EngineRun:
        if not job.config.quiet and "dashboard" in client.scheduler_info().get("services", {}):
            print(f"align_dataset: Dask dashboard at {client.dashboard_link}", flush=True)
        try:
            client.wait_for_workers(1, timeout=CONNECT_TIMEOUT_S)
        except (asyncio.TimeoutError, TimeoutError):
            raise JobError(f"no Dask worker joined the scheduler within {CONNECT_TIMEOUT_S} s: "
                           f"start workers (dask worker ADDRESS --nthreads 1), then rerun") from None
        first = feed.peek(1)
        problems = client.run(_probe, os.fspath(job.input_dir), os.fspath(job.output_dir),
                              first[0].tasks[0].rel if first else None)
        for address, problem in sorted(problems.items()):
            if problem:
                raise JobError(f"Dask worker {address} {problem}: INPUT_DIR and OUTPUT_DIR must be "
                               f"at the same paths on every worker (a shared file system)")
        client.register_plugin(NetsPlugin(job.config.gpu_memory_fraction, self.own_cluster), name=PLUGIN)
        workers = client.scheduler_info()["workers"].values()
        gpus = bool(workers) and all("GPU" in w.get("resources", {}) for w in workers)
        topic = f"align-progress-{uuid.uuid4().hex}"
        client.subscribe_topic(topic, lambda event: progress(*event[1]))
        threads = _Threads(client)
        feed.workers = threads.count
        ready_at = time.perf_counter()
        in_flight: dict[str, tuple[Shard, distributed.Future]] = {}
        futures = distributed.as_completed()

        def fill() -> None:
            """Shards handed out up to IN_FLIGHT a connected thread."""
            feed.workers = threads.now()
            while len(in_flight) < IN_FLIGHT * feed.workers:
                shard = next(feed, None)
                if shard is None:
                    return
                future = client.submit(_shard_task, shard, job, topic, pure=False, retries=RETRIES,
                                       resources={"GPU": 1} if gpus else None,
                                       key=f"align-shard-{shard.key}-{uuid.uuid4().hex[:8]}")
                in_flight[future.key] = shard, future
                futures.add(future)

        try:
            fill()
            for future in futures:
                shard, _ = in_flight.pop(future.key)
                if future.status != "finished":
                    done = failed_shard(job, shard, _failure(future))
                    progress(done.images, done.faces, done.failed)
                future.release()
                fill()
        except BaseException:
            client.cancel([future for _, future in in_flight.values()])
            raise
        finally:
            client.unsubscribe_topic(topic)
        return EngineRun(threads.most, ready_at, time.perf_counter())


class _Threads:
    """The worker threads connected to the scheduler, asked at most every THREADS_EVERY_S."""

    def __init__(self, client):
        self.client = client
        self.count = self.most = 1
        self.asked = -THREADS_EVERY_S
        self.now()

    def now(self) -> int:
        if time.perf_counter() - self.asked >= THREADS_EVERY_S:
            self.asked = time.perf_counter()
            self.count = max(1, sum(self.client.nthreads().values()))
            self.most = max(self.most, self.count)
        return self.count


def _failure(future) -> str:
    try:
        e = future.exception()
    except Exception as e2:     # the future was cancelled, or its worker lost for good
        e = e2
    return f"failed on every try (Dask): {type(e).__name__}: {' '.join(str(e).split())}"[:300]
