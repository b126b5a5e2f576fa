"""Engines run a job's shards somewhere and know nothing of faces.

Each engine takes the shards of one run from a ShardFeed, cut as the walk goes, keeps at most
IN_FLIGHT shards a worker thread handed out, and calls `align.worker.run_shard` on each, in
worker processes that load the nets once; it reports progress as the shards' batches finish,
and stops its workers on Ctrl-C. The shards' records go to their journals in OUTPUT_DIR, never through
the engine, so engines are interchangeable on one OUTPUT_DIR.

    local   a process pool on this machine (align/engines/local.py)
    dask    a Dask cluster, or a LocalCluster started for the run (align/engines/dask.py)
"""
from __future__ import annotations

import collections
import importlib.util
import time
from dataclasses import dataclass
from typing import Iterator, Protocol

from align.dataset import Shard, Task, shards
from align.worker import Progress, ShardJob

IN_FLIGHT = 2       # shards handed out per worker thread, at most: one running, one waiting


class JobError(Exception):
    """The job cannot start or go on (bad folders, options, another run, a dead worker); the
    message says why and what to do."""


class OptionsError(JobError, ValueError):
    """The folders or options given cannot work (a usage error)."""


class Interrupted(Exception):
    """Ctrl-C (or SIGTERM): the run stopped cleanly; rerunning the command resumes it."""


@dataclass(frozen=True)
class EngineRun:
    """What an engine's run was: the worker processes it used, when (time.perf_counter) every
    one of them held its nets, and when the last shard's records were journaled."""
    workers: int
    ready_at: float
    done_at: float


class ShardFeed:
    """The shards of a run, cut from its tasks as they come (align.dataset.shards), sized for
    `workers`: the worker threads there are, which an engine sets and updates as workers come
    and go. `first_at`: when (time.perf_counter) the first shard was taken."""

    def __init__(self, tasks: Iterator[Task], prefix: str = "", workers: int = 1):
        self.workers = workers
        self.first_at: float | None = None
        self._cut = shards(tasks, lambda: self.workers, prefix)
        self._ahead: collections.deque[Shard] = collections.deque()

    def peek(self, n: int) -> list[Shard]:
        """The next `n` shards (fewer at the end), still to be taken."""
        while len(self._ahead) < n:
            shard = next(self._cut, None)
            if shard is None:
                break
            self._ahead.append(shard)
        return list(self._ahead)[:n]

    def __iter__(self) -> Iterator[Shard]:
        return self

    def __next__(self) -> Shard:
        shard = self._ahead.popleft() if self._ahead else next(self._cut)
        if self.first_at is None:
            self.first_at = time.perf_counter()
        return shard


class Engine(Protocol):
    name: str

    def run(self, job: ShardJob, feed: ShardFeed, progress: Progress) -> EngineRun:
        """Run every shard to completion; raises Interrupted on Ctrl-C, JobError when it
        cannot go on."""


def make_engine(name: str, workers: int, scheduler: str | None = None, client=None) -> Engine:
    """The engine called `name` (a Config.engine, one of config.ENGINES); dask: on `client`,
    else the scheduler at `scheduler` (or DASK_SCHEDULER_ADDRESS), else a LocalCluster of
    `workers` processes. A client makes it dask whatever `name` says."""
    if client is None and name == "local":
        from align.engines.local import LocalEngine
        return LocalEngine(workers)
    if importlib.util.find_spec("distributed") is None:
        raise OptionsError("--engine dask needs Dask's distributed package: "
                           "pip install 'align-dataset[dask]' (or 'dask[distributed]')")
    from align.engines.dask import DaskEngine
    return DaskEngine(workers, scheduler, client)
