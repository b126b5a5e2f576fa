"""The engines against each other: the dask engine on a real cluster (a LocalCluster of worker
processes, or a scheduler and workers started as commands) writes the tree the local engine
writes, reruns the shard of a killed worker, names a worker that cannot see INPUT_DIR, write
OUTPUT_DIR or find the weights, records a shard that fails on every try as errors for the next
run, and leaves nothing running or writing when its client dies."""
from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import SHARED
from test_cli import (assert_same_tree, cli_env, describe, journal_dir, journal_lines, journal_records,
                      kill_group, ok, one_error_line, read_jsonl, records, run_align, start_align, summary, wait_for)

psutil = pytest.importorskip("psutil", reason="psutil comes with distributed (the dask extra)")
pytest.importorskip("distributed", reason="the dask extra is not installed")

DEV = SHARED / "faces" / "dev"
IGNORE = ["engine", "processed_this_run"]     # besides the timings and the worker count
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def photos(sample_paths, tmp_path_factory) -> Path:
    """36 photos in 7 identities: copies of the samples."""
    root = tmp_path_factory.mktemp("engines") / "in"
    files = list(sample_paths.values())
    k = 0
    for identity, n in {"Ann": 9, "Bob": 6, "Cid": 6, "Dee": 5, "Eve": 4, "Fay": 3, "Gus": 3}.items():
        (root / identity).mkdir(parents=True)
        for i in range(n):
            src = files[k % len(files)]
            k += 1
            shutil.copyfile(src, root / identity / f"{i:02d}{src.suffix}")
    return root


@pytest.fixture(scope="module")
def local_run(photos, tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("local")
    ok(run_align(photos, "out", "--workers", 2, "--quiet", cwd=cwd))
    return cwd / "out"


def journal_inputs_of(out: Path, shard: str) -> list[str]:
    """The inputs a shard's journal records, in its order."""
    return [r["input"] for r in journal_records(out) if r["_shard"] == shard]


def descendants(pid: int) -> list:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def alive(procs: list) -> list:
    return [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def test_dask_engine_writes_the_local_engines_tree(photos, local_run, tmp_path):
    p = ok(run_align(photos, "out", "--engine", "dask", "--workers", 2, cwd=tmp_path))
    assert "Dask dashboard at http" in p.stdout, p.stdout
    assert p.stdout.count("Dask dashboard") == 1
    assert "Traceback" not in p.stderr, p.stderr
    assert_same_tree(local_run, tmp_path / "out", ignore_summary_keys=IGNORE)


def test_a_killed_dask_client_leaves_nothing_running_and_the_local_engine_finishes(
        photos, local_run, tmp_path):
    proc = start_align(photos, "out", "--engine", "dask", "--workers", 2, "--quiet", cwd=tmp_path)
    out = tmp_path / "out"
    wait_for(lambda: journal_lines(out) >= 1, proc, "a journal line was written")
    ours = descendants(proc.pid)
    assert len(ours) >= 2, ours
    proc.send_signal(signal.SIGKILL)            # the client alone: its cluster must follow it
    proc.communicate(timeout=30)
    deadline = time.monotonic() + 2
    while alive(ours) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(ours), f"still running 2 s after the client died: {alive(ours)}"
    assert journal_lines(out) < 36, "the run was not killed half-way"

    ok(run_align(photos, "out", "--engine", "local", "--workers", 2, "--quiet", cwd=tmp_path))
    assert_same_tree(local_run, out, ignore_summary_keys=IGNORE)


def test_ctrl_c_stops_a_dask_run_cleanly_and_the_rerun_completes(photos, local_run, tmp_path):
    proc = start_align(photos, "out", "--engine", "dask", "--workers", 2, cwd=tmp_path)
    out = tmp_path / "out"
    wait_for(lambda: journal_lines(out) >= 1, proc, "a journal line was written")
    os.killpg(proc.pid, signal.SIGINT)          # as a terminal does: the whole process group
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, f"exit {proc.returncode}\n{stdout}\n{stderr}"
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    assert "resume" in stderr
    ok(run_align(photos, "out", "--engine", "dask", "--workers", 2, "--quiet", cwd=tmp_path))
    assert_same_tree(local_run, out, ignore_summary_keys=IGNORE)


needs_unshare = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"),
                                   reason="needs root and unshare(1) to change what one worker sees")


@pytest.fixture()
def scheduler(tmp_path):
    """A Dask scheduler started as a command, on a free loopback port; its address."""
    log = open(tmp_path / "scheduler.log", "w")
    proc = subprocess.Popen([BIN / "dask", "scheduler", "--host", "127.0.0.1", "--port", "0",
                             "--no-dashboard", "--scheduler-file", tmp_path / "scheduler.json"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 60
    while not (tmp_path / "scheduler.json").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    import json
    address = json.loads((tmp_path / "scheduler.json").read_text())["address"]
    started = []
    yield address, started
    for p in [*started, proc]:
        kill_group(p)


def start_worker(address: str, tmp_path: Path, prefix=(), options=(), env=None) -> subprocess.Popen:
    return subprocess.Popen([*prefix, BIN / "dask", "worker", address, "--nworkers", "1",
                             "--nthreads", "1", "--no-dashboard", "--local-directory", tmp_path, *options],
                            cwd=tmp_path, env={**cli_env(), **(env or {})},
                            stdout=open(tmp_path / "worker.log", "a"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def test_a_killed_dask_worker_has_its_shard_rerun(photos, local_run, scheduler, tmp_path):
    """Two workers (no nanny to restart them) of a scheduler the run finds in
    DASK_SCHEDULER_ADDRESS; the one the scheduler shows processing a shard that has journaled
    nothing yet (a shard's photos are journaled in one batch) is killed: that shard is done by
    the other, every photo once, and the tree is the local engine's."""
    from distributed import Client
    address, started = scheduler
    started += [start_worker(address, tmp_path, options=["--no-nanny"]) for _ in range(2)]
    out = tmp_path / "out"
    with Client(address, timeout=60) as client:
        client.wait_for_workers(2, timeout=120)
        pids = client.run(os.getpid)
        # the scheduler's address from the environment, as Dask itself takes it, not --scheduler
        proc = start_align(photos, "out", "--engine", "dask", "--workers", 3, cwd=tmp_path,
                           env={"DASK_SCHEDULER_ADDRESS": address})
        started.append(proc)
        victim = {}

        def a_shard_in_flight() -> bool:
            """A worker processing an align-shard task whose journal is still empty, once a
            first shard is journaled (the nets are loaded)."""
            if journal_lines(out) < 1:
                return False
            for worker, keys in client.processing().items():
                for key in keys:
                    if str(key).startswith("align-shard-"):
                        shard = str(key)[len("align-shard-"):].rsplit("-", 1)[0]
                        if not journal_inputs_of(out, shard):
                            victim.update(worker=worker, key=str(key), shard=shard)
                            return True
            return False
        # the run's shards are on this scheduler: DASK_SCHEDULER_ADDRESS was used
        wait_for(a_shard_in_flight, proc, "a worker of this scheduler processing a shard", timeout=240)
        killed_at = time.time()
        os.kill(pids[victim["worker"]], signal.SIGKILL)
        deadline = time.monotonic() + 30
        while victim["worker"] in client.scheduler_info()["workers"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert victim["worker"] not in client.scheduler_info()["workers"], "the killed worker is still listed"
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"exit {proc.returncode}\n{stdout}\n{stderr}"
        assert len(client.scheduler_info()["workers"]) == 1
        # the scheduler's transitions of the killed shard's task: done after the kill, by the
        # one worker left (key, start, finish, recommendations, stimulus_id, timestamp)
        story = client.run_on_scheduler(lambda dask_scheduler: list(dask_scheduler.story(victim["key"])))
    print(f"\nkilled {victim['worker']} processing {victim['key']}; the shard was rerun")
    done = [t for t in story if t[2] == "memory"]
    assert done and done[-1][-1] > killed_at, (victim, story)
    assert all(r["status"] == "aligned" for r in records(out)), "a shard failed instead of rerunning"
    assert_same_tree(local_run, out, ignore_summary_keys=IGNORE)


@needs_unshare
def test_a_worker_that_does_not_see_input_dir_is_named(photos, scheduler, tmp_path):
    address, started = scheduler
    hidden = tmp_path / "hidden"
    shutil.copytree(photos, hidden / "in")
    # this worker runs in a mount namespace of its own, where INPUT_DIR's parent is an empty tmpfs
    started.append(start_worker(address, tmp_path, prefix=[
        "unshare", "-m", "--propagation", "private", "sh", "-c",
        f'mount -t tmpfs none "{hidden}" && exec "$0" "$@"']))
    p = run_align(hidden / "in", tmp_path / "out", "--engine", "dask", "--scheduler", address)
    assert p.returncode == 1, describe(p)
    line = one_error_line(p)
    assert "Dask worker tcp://127.0.0.1:" in line and "does not see INPUT_DIR" in line, line
    assert "same paths on every worker" in line
    assert not list((tmp_path / "out").glob("*/*.png"))


def read_only_for_the_worker(folder: Path) -> list:
    """A prefix for start_worker: the worker runs in a mount namespace of its own, where
    `folder` (which must exist) is a read-only bind mount of itself; everyone else writes there."""
    return ["unshare", "-m", "--propagation", "private", "sh", "-c",
            f'mount --bind "{folder}" "{folder}" && mount -o remount,bind,ro "{folder}" && exec "$0" "$@"']


@needs_unshare
def test_a_worker_that_cannot_write_output_dir_is_named(photos, scheduler, tmp_path):
    address, started = scheduler
    out = tmp_path / "out"
    out.mkdir()
    started.append(start_worker(address, tmp_path, prefix=read_only_for_the_worker(out)))
    p = run_align(photos, out, "--engine", "dask", "--scheduler", address)
    assert p.returncode == 1, describe(p)
    line = one_error_line(p)
    assert "Dask worker tcp://127.0.0.1:" in line and f"cannot write into OUTPUT_DIR {out}" in line, line
    assert "Read-only file system" in line
    assert not list(out.glob("*/*.png"))


def test_a_worker_without_the_weights_is_named(photos, scheduler, tmp_path):
    address, started = scheduler
    (tmp_path / "no_weights").mkdir()
    started.append(start_worker(address, tmp_path, env={"ALIGN_WEIGHTS_DIR": str(tmp_path / "no_weights")}))
    p = run_align(photos, tmp_path / "out", "--engine", "dask", "--scheduler", address)
    assert p.returncode == 1, describe(p)
    line = one_error_line(p)
    assert "Dask worker tcp://127.0.0.1:" in line and "has no usable MTCNN weights" in line, line
    assert f"{tmp_path / 'no_weights'} lacks det1.npy, det2.npy, det3.npy" in line
    assert not list((tmp_path / "out").glob("*/*.png"))


@needs_unshare
def test_a_shard_that_fails_on_every_try_becomes_error_records_retried_by_the_next_run(
        sample_paths, scheduler, tmp_path):
    """The one worker sees the journals' folder read-only (its probe, which writes beside it,
    passes): the shard raises on each of its tries, so its photos are recorded "error" by
    the client, and the next run (the local engine) aligns them."""
    address, started = scheduler
    (tmp_path / "in" / "Ann").mkdir(parents=True)
    for name in ("grace_hopper.jpg", "astronaut.png"):
        shutil.copyfile(sample_paths[name], tmp_path / "in" / "Ann" / name)
    out = tmp_path / "out"
    journal_dir(out).mkdir(parents=True)
    started.append(start_worker(address, tmp_path, prefix=read_only_for_the_worker(journal_dir(out))))
    p = ok(run_align(tmp_path / "in", out, "--engine", "dask", "--scheduler", address, "--quiet"))
    recs = read_jsonl(out / "faces.jsonl")
    assert [(r["input"], r["status"]) for r in recs] == [("Ann/astronaut.png", "error"), ("Ann/grace_hopper.jpg", "error")]
    for r in recs:
        assert r["reason"].startswith("failed on every try (Dask): OSError"), r["reason"]
        assert "Read-only file system" in r["reason"]
    assert summary(out)["errors"] == 2
    assert "Traceback" not in p.stderr, describe(p)

    ok(run_align(tmp_path / "in", out, "--quiet"))
    assert [(r["input"], r["status"]) for r in read_jsonl(out / "faces.jsonl")] == [
        ("Ann/astronaut.png", "aligned"), ("Ann/grace_hopper.jpg", "aligned")]
    assert summary(out)["errors"] == 0 and summary(out)["processed_this_run"] == 2


def test_no_worker_writes_after_its_client_is_gone(photos, scheduler, tmp_path):
    """A scheduler and a worker that outlive the client (an existing cluster): once the client
    is killed, the worker stops within the batch it is in."""
    address, started = scheduler
    started.append(start_worker(address, tmp_path))
    out = tmp_path / "out"
    proc = start_align(photos, out, "--engine", "dask", "--scheduler", address, "--quiet")
    wait_for(lambda: journal_lines(out) >= 1, proc, "a journal line was written", timeout=240)
    proc.kill()
    proc.communicate(timeout=30)
    time.sleep(3)                               # the batch in flight may still land
    after = (journal_lines(out), sorted(out.glob("*/*.png")))
    time.sleep(4)
    assert (journal_lines(out), sorted(out.glob("*/*.png"))) == after, "the worker kept writing"
    assert after[0] < 36, "the run was not killed half-way"
    assert started[0].poll() is None, "the worker itself should live on"


def test_a_second_client_on_a_locked_output_is_refused(photos, tmp_path):
    out = tmp_path / "out"
    (out / ".align_dataset" / "journal").mkdir(parents=True)
    with open(out / ".align_dataset" / "lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        p = run_align(photos, out, "--engine", "dask", "--workers", 1)
    assert p.returncode == 1, describe(p)
    assert "another align_dataset run is writing" in one_error_line(p)


def test_without_distributed_the_dask_engine_is_a_usage_error(photos, tmp_path):
    code = ("import sys; sys.modules['distributed'] = None; sys.argv[0] = 'align_dataset'; "
            "from align.cli import main; main()")
    p = subprocess.run([sys.executable, "-c", code, photos, tmp_path / "out", "--engine", "dask"],
                       env=cli_env(), capture_output=True, text=True)
    assert p.returncode == 2, describe(p)
    line = one_error_line(p)
    assert "pip install 'align-dataset[dask]'" in line, line
    assert not (tmp_path / "out").exists()


def test_scheduler_without_the_dask_engine_is_a_usage_error(photos, tmp_path):
    p = run_align(photos, tmp_path / "out", "--scheduler", "tcp://127.0.0.1:8786")
    assert p.returncode == 2, describe(p)
    assert "--engine dask" in one_error_line(p)


@pytest.mark.skipif(not DEV.is_dir(), reason="../shared/faces/dev is not beside this checkout")
def test_dev_set_dask_equals_local(dev_run, tmp_path):
    ok(dev_run[0])
    ok(run_align(DEV, "out", "--engine", "dask", "--workers", 2, "--quiet", cwd=tmp_path))
    assert_same_tree(dev_run[1], tmp_path / "out", ignore_summary_keys=IGNORE)


@pytest.fixture(scope="module")
def many_photos(sample_paths, tmp_path_factory) -> tuple[Path, Path]:
    """(INPUT_DIR, the local engine's OUTPUT_DIR): 192 photos in 24 identities, copies of the
    samples: enough shards of 32 for workers that join half-way to get some."""
    root = tmp_path_factory.mktemp("many") / "in"
    files = list(sample_paths.values())
    for k in range(192):
        src = files[k % len(files)]
        (root / f"id{k // 8:02d}").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, root / f"id{k // 8:02d}" / f"{k % 8}{src.suffix}")
    cwd = tmp_path_factory.mktemp("many_local")
    ok(run_align(root, "out", "--workers", 2, "--quiet", "--no-report", cwd=cwd))
    return root, cwd / "out"


def test_workers_that_join_and_leave_mid_run_get_shards_and_lose_nothing(many_photos, tmp_path, monkeypatch):
    """align_dataset(..., client=) from Python on a LocalCluster of one worker, scaled to three
    once the first batch is journaled (what Dask's adaptive scaling and dask-jobqueue do), then
    back to one once each joining worker has finished a shard and all three hold one: the
    leaving workers' shards are rerun, and the tree is the local engine's."""
    import threading

    from distributed import Client, LocalCluster
    from align import align_dataset
    photos, local_out = many_photos
    monkeypatch.chdir(tmp_path)                 # "out", as the local run's records name it
    out = tmp_path / "out"
    seen: dict = {}

    def finished_by(client) -> set:
        return {t["worker"] for t in client.get_task_stream()
                if str(t["key"]).startswith("align-shard")}

    def conduct(cluster, client) -> None:
        try:
            deadline = time.monotonic() + 240
            while journal_lines(out) < 1 and time.monotonic() < deadline:
                time.sleep(0.05)
            first = set(client.scheduler_info()["workers"])
            cluster.scale(3)
            client.wait_for_workers(3, timeout=120)
            joined = set(client.scheduler_info()["workers"]) - first
            busy: set = set()
            while time.monotonic() < deadline:
                busy = {w for w, keys in client.processing().items() if keys}
                if len(busy) == 3 and joined <= finished_by(client):
                    break
                time.sleep(0.1)
            seen.update(joined=joined, ran=finished_by(client), busy=busy,
                        done_before_leaving=journal_lines(out))
            cluster.scale(1)
        except Exception as e:          # shown by the test's asserts
            seen["error"] = repr(e)

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        client.get_task_stream()            # starts the scheduler's record of finished tasks
        conductor = threading.Thread(target=conduct, args=(cluster, client), daemon=True)
        conductor.start()
        summary = align_dataset(photos, "out", client=client, quiet=True, report=False)
        conductor.join(60)
    assert "error" not in seen, seen
    assert len(seen["joined"]) == 2 and seen["joined"] <= seen["ran"], seen
    assert len(seen["busy"]) == 3, seen
    assert seen["done_before_leaving"] < 192, "the run ended before workers left"
    assert summary["engine"] == "dask" and summary["workers"] == 3 and summary["aligned"] == 192
    assert_same_tree(local_out, out, ignore_summary_keys=IGNORE)


@pytest.mark.parametrize("engine", ["local", "dask"])
def test_progress_comes_per_batch_of_photos_not_per_shard(engine, photos, tmp_path):
    """36 photos in shards of 18, 9, 8 and 1: progress hears of each detection batch (BATCH photos at
    most) as its records are journaled, under either engine."""
    from distributed import Client, LocalCluster
    from align.aligner import BATCH
    from align.config import Config
    from align.dataset import walk
    from align.engines import ShardFeed, make_engine
    from align.records import StateDir
    from align.worker import ShardJob
    out = tmp_path / "out"
    StateDir(out).journals.mkdir(parents=True)
    feed = ShardFeed(iter(walk(photos).tasks), "r000000001-", workers=1)
    assert [len(s.tasks) for s in feed.peek(5)] == [18, 9, 8, 1]     # guided: shrinking to the end
    calls = []
    job = ShardJob(Config(quiet=True), photos, out)
    with contextlib.ExitStack() as stack:
        client = None
        if engine == "dask":
            cluster = stack.enter_context(LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                                                       dashboard_address=None))
            client = stack.enter_context(Client(cluster))
        make_engine(engine, 1, client=client).run(job, feed, lambda *counts: calls.append(counts))
        deadline = time.monotonic() + 10            # worker events may come after the last result
        while sum(n for n, _, _ in calls) < 36 and time.monotonic() < deadline:
            time.sleep(0.05)
    assert sum(n for n, _, _ in calls) == 36 and sum(f for _, f, _ in calls) == 36, calls
    assert max(n for n, _, _ in calls) <= BATCH < 18 and len(calls) >= 5, calls
