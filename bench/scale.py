"""Issue #18: the client and the scheduler stay bounded, whatever the job's size (not a timed
test: run it by hand, niced, one at a time).

    nice -n 10 .venv/bin/python bench/scale.py [--photos 10000000] [--root /work/scale]
                                               [--engines "local dask"] [--skip-resume]

1. Builds once (and keeps) a synthetic INPUT_DIR, ROOT/<photos>/input: --photos empty files,
   100 per identity folder (id0000000/0000.jpg ...; 10M photos are 100k identities), then
   writes ROOT/<photos>/input.complete, so a later run skips the build (an interrupted build
   resumes from its last folder). Free inodes and disk space are checked first.
2. For each engine, in a fresh process (its peak RSS its own), with ALIGN_BENCH_NO_NETS=1:
   align_dataset(input, ROOT/<photos>/output-<engine>, workers=2, quiet=True, report=False) on
   an OUTPUT_DIR removed beforehand. With dask the process starts its own
   LocalCluster(n_workers=2, threads_per_worker=1, processes=True) and passes a Client of it,
   so the scheduler lives in the measured process (as the engine's own LocalCluster does).
   A thread samples every 0.5 s this process's RSS (/proc/self/statm) and, with dask, the
   tasks the scheduler holds (len(cluster.scheduler.tasks)); the peak RSS is ru_maxrss.
   Another polls OUTPUT_DIR/.align_dataset/journal/ for the first journal (the fallback for
   summary.json's first_shard_s, where the code has none).
   ALIGN_CODE=/path/to/a/checkout measures that checkout's code instead of this one's
   (its workers get it on PYTHONPATH).
3. Then, in another fresh process, the same call on the finished OUTPUT_DIR: the no-op resume.
4. Prints a table and appends one JSON line per engine to ROOT/results.jsonl (the RSS time
   series in it, at most ~120 points). "run wall s" is the whole align_dataset call, from
   after its imports to its return: walk, scan, shards, merge and the fold of the state
   folder (summary.json's wall_s stops when the engine is done).

ALIGN_BENCH_NO_NETS (align/worker.py) is for benchmarks only: the shard function then reads no
photo, loads no net, and journals a made-up "aligned" record per photo without fsync, so what
is measured is the client, the scheduler and the records, not the detector. The OUTPUT_DIRs it
leaves (records of faces that were never detected, no thumbnails) are NOT a training set:
never train on them, never point a real run at them.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CODE = Path(os.environ.get("ALIGN_CODE", str(REPO))).absolute()    # the code measured
sys.path.insert(0, str(CODE))

PER_IDENTITY = 100
SAMPLE_S = 0.5
POLL_S = 0.05
MARK = "SCALE-RESULT "          # the child's result line on stdout
# what a run needs besides the input tree, from a 20k-photo run of the made-up records
# (~560 bytes a record in the journals, again in faces.jsonl, ~70 in bounding_boxes.txt; a
# journal file of up to 32 records per shard), with room to spare
OUTPUT_BYTES_PER_PHOTO = 2000
DIR_BYTES = 4096                # an identity folder of 100 short names: one block
SPARE_INODES = 100_000


# --- build ---------------------------------------------------------------------------------------
def job_root(root: Path, photos: int) -> Path:
    return root / str(photos)


def check_room(path: Path, inodes: int, nbytes: int, what: str) -> None:
    """Refuse (exit 2) when the file system under `path` lacks `inodes` free inodes or `nbytes`
    free bytes for `what`."""
    st = os.statvfs(path)
    free_bytes = st.f_bavail * st.f_frsize
    short = []
    if st.f_files and st.f_favail < inodes:    # f_files 0: a file system with no inode limit
        short.append(f"{inodes:,} inodes needed, {st.f_favail:,} free")
    if free_bytes < nbytes:
        short.append(f"{nbytes / 2**30:.1f} GiB needed, {free_bytes / 2**30:.1f} GiB free")
    if short:
        sys.exit(f"scale: not enough room on {path} for {what}: {'; '.join(short)}. "
                 f"Free some, or pick another --root (or fewer --photos).")


def existing_parent(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path


def build(root: Path, photos: int) -> Path:
    """ROOT/<photos>/input, built once: `photos` empty files, PER_IDENTITY a folder."""
    jroot = job_root(root, photos)
    input_dir, marker = jroot / "input", jroot / "input.complete"
    if marker.exists():
        print(f"input: {input_dir} ({photos:,} photos) already built", flush=True)
        return input_dir
    identities = -(-photos // PER_IDENTITY)
    # the inputs, their folders, and one run's output (journals: a file per 32 photos)
    check_room(existing_parent(jroot), photos + identities + photos // 16 + SPARE_INODES,
               identities * DIR_BYTES + photos * OUTPUT_BYTES_PER_PHOTO,
               f"{photos:,} input files in {identities:,} folders and a run's output")
    input_dir.mkdir(parents=True, exist_ok=True)
    # an interrupted build: its folders are complete but the last, which is redone
    done = [n for n in os.listdir(input_dir) if n.startswith("id")]
    start = max(0, max((int(n[2:]) for n in done), default=0))
    t0 = last = time.perf_counter()
    flags = os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC
    for ident in range(start, identities):
        folder = os.path.join(input_dir, f"id{ident:07d}")
        try:
            os.mkdir(folder)
        except FileExistsError:
            pass
        for k in range(min(PER_IDENTITY, photos - ident * PER_IDENTITY)):
            os.close(os.open(os.path.join(folder, f"{k:04d}.jpg"), flags, 0o644))
        now = time.perf_counter()
        if now - last >= 10 or ident + 1 == identities:
            last = now
            made = (ident + 1 - start) * PER_IDENTITY
            print(f"input: {min(photos, (ident + 1) * PER_IDENTITY):,}/{photos:,} files, "
                  f"{made / (now - t0):,.0f} files/s", flush=True)
    marker.touch()
    print(f"input: {input_dir} built in {time.perf_counter() - t0:.1f} s", flush=True)
    return input_dir


# --- the measured process ------------------------------------------------------------------------
def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def cpu_s() -> float:
    """CPU seconds (user + system) of this process so far: with dask, the scheduler's too."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def child(input_dir: str, output_dir: str, engine: str, phase: str) -> None:
    """One measured call of align_dataset in this process; prints MARK + one JSON line."""
    os.environ["ALIGN_BENCH_NO_NETS"] = "1"         # before any worker starts: they inherit it
    from align.records import STATE
    from align.runner import __file__ as align_file, align_dataset     # before the clock starts

    cluster = client = None
    t_cluster = None
    if engine == "dask":
        import logging
        import distributed
        t = time.perf_counter()
        cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                           dashboard_address=":0", silence_logs=logging.ERROR)
        client = distributed.Client(cluster)
        t_cluster = time.perf_counter() - t

    journals = os.path.join(output_dir, STATE, "journal")
    stop = threading.Event()
    out: dict = {"phase": phase, "engine": engine, "code": os.path.dirname(os.path.dirname(align_file)),
                 "rss_start_mb": round(rss_mb(), 1),
                 "cluster_start_s": None if t_cluster is None else round(t_cluster, 2)}
    samples: list[tuple[float, float, int | None]] = []
    first_journal: list[float] = []

    def sample():
        while True:
            tasks = len(cluster.scheduler.tasks) if cluster is not None else None
            samples.append((time.perf_counter() - t0, rss_mb(), tasks))
            if stop.wait(SAMPLE_S):
                return

    def poll():
        while not stop.is_set():
            try:
                with os.scandir(journals) as it:
                    if next(it, None) is not None:
                        first_journal.append(time.perf_counter() - t0)
                        return
            except FileNotFoundError:
                pass
            stop.wait(POLL_S)

    t0, cpu0 = time.perf_counter(), cpu_s()
    threads = [threading.Thread(target=sample, daemon=True)]
    if phase == "run":
        threads.append(threading.Thread(target=poll, daemon=True))
    for th in threads:
        th.start()
    error = None
    try:
        summary = align_dataset(input_dir, output_dir, workers=2, quiet=True, report=False,
                                engine=engine, client=client)
    except BaseException as e:          # reported, not raised: the parent prints the row
        summary, error = {}, f"{type(e).__name__}: {e}"
    wall, cpu = time.perf_counter() - t0, cpu_s() - cpu0
    stop.set()
    for th in threads:
        th.join()
    samples.append((wall, rss_mb(), len(cluster.scheduler.tasks) if cluster is not None else None))

    tasks = [s[2] for s in samples if s[2] is not None]
    step = max(1, len(samples) // 120)          # at most ~120 points of the time series
    out.update({
        "error": error,
        "wall_s": round(wall, 2),
        "cpu_s": round(cpu, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "sampled_peak_rss_mb": round(max(s[1] for s in samples), 1),
        "end_rss_mb": round(samples[-1][1], 1),
        "scheduler_peak_tasks": max(tasks) if tasks else None,
        "first_journal_s": round(first_journal[0], 3) if first_journal else None,
        "series": [[round(t, 1), round(r, 1), n] for t, r, n in samples[::step]],
        "summary": {k: summary.get(k) for k in ("images", "processed_this_run", "first_shard_s",
                                                "wall_s", "processing_s", "workers", "engine")
                    if k in summary},
    })
    if client is not None:
        client.close()
        cluster.close()
    print(MARK + json.dumps(out), flush=True)


# --- the driver ----------------------------------------------------------------------------------
def measure(input_dir: Path, output_dir: Path, engine: str, phase: str) -> dict:
    """`child` in a fresh interpreter, its stderr passed through."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", phase, "--engine", engine,
           "--input", str(input_dir), "--output", str(output_dir)]
    env = dict(os.environ, ALIGN_BENCH_NO_NETS="1")
    if os.environ.get("ALIGN_CODE"):        # the workers (spawned) import it too
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.environ["ALIGN_CODE"], env.get("PYTHONPATH")]))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)]
    for ln in proc.stdout.splitlines():
        if not ln.startswith(MARK):
            print(f"  [{engine} {phase}] {ln}", flush=True)
    if proc.returncode or not lines:
        return {"phase": phase, "engine": engine,
                "error": f"child exited {proc.returncode} without a result"}
    result = json.loads(lines[-1][len(MARK):])
    result["process_s"] = round(time.perf_counter() - t0, 2)    # interpreter start and exit too
    return result


def git_head() -> str | None:
    try:
        head = subprocess.run(["git", "-C", str(CODE), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(CODE), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def fmt(v, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--photos", type=int, default=10_000_000)
    ap.add_argument("--root", type=Path, default=Path("/work/scale"))
    ap.add_argument("--engines", default="local dask", help='space- or comma-separated: "local dask"')
    ap.add_argument("--skip-resume", action="store_true", help="no no-op resume after each run")
    ap.add_argument("--child", choices=("run", "resume"), help=argparse.SUPPRESS)
    ap.add_argument("--engine", help=argparse.SUPPRESS)
    ap.add_argument("--input", help=argparse.SUPPRESS)
    ap.add_argument("--output", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.input, args.output, args.engine, args.child)
        return

    engines = args.engines.replace(",", " ").split()
    for e in engines:
        if e not in ("local", "dask"):
            ap.error(f"--engines: unknown engine {e!r} (local, dask)")
    if args.photos < 1:
        ap.error("--photos must be >= 1")
    root = args.root.expanduser().absolute()
    input_dir = build(root, args.photos)
    jroot = job_root(root, args.photos)
    head = git_head()

    rows = []
    for engine in engines:
        output_dir = jroot / f"output-{engine}"
        shutil.rmtree(output_dir, ignore_errors=True)
        check_room(jroot, args.photos // 16 + SPARE_INODES, args.photos * OUTPUT_BYTES_PER_PHOTO,
                   f"the output of {args.photos:,} photos")
        print(f"{engine}: run on {args.photos:,} photos -> {output_dir}", flush=True)
        run = measure(input_dir, output_dir, engine, "run")
        print(f"{engine}: run {fmt(run.get('wall_s'))} s, peak {fmt(run.get('peak_rss_mb'))} MB"
              + (f", ERROR {run['error']}" if run.get("error") else ""), flush=True)
        resume = None
        if not args.skip_resume and not run.get("error"):
            resume = measure(input_dir, output_dir, engine, "resume")
            print(f"{engine}: no-op resume {fmt(resume.get('wall_s'))} s, "
                  f"peak {fmt(resume.get('peak_rss_mb'))} MB"
                  + (f", ERROR {resume['error']}" if resume.get("error") else ""), flush=True)
        row = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "git": head, "code": str(CODE), "photos": args.photos, "engine": engine,
               "input": str(input_dir),
               "run": run, "resume": resume}
        rows.append(row)
        with open(root / "results.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    head_cols = ("photos", "engine", "run wall s", "client CPU s", "client peak MB", "first shard s",
                 "first journal s", "sched peak tasks", "resume wall s", "resume peak MB")
    table = [head_cols]
    for row in rows:
        run, resume = row["run"], row["resume"] or {}
        summ = run.get("summary", {})
        table.append((f"{row['photos']:,}", row["engine"], fmt(run.get("wall_s")), fmt(run.get("cpu_s")),
                      fmt(run.get("peak_rss_mb")), fmt(summ.get("first_shard_s"), ".2f"),
                      fmt(run.get("first_journal_s"), ".2f"), fmt(run.get("scheduler_peak_tasks"), ","),
                      fmt(resume.get("wall_s")), fmt(resume.get("peak_rss_mb"))))
    widths = [max(len(r[i]) for r in table) for i in range(len(head_cols))]
    print()
    for r in table:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))
    for row in rows:
        for phase in ("run", "resume"):
            r = row[phase] or {}
            if r.get("error"):
                print(f"{row['engine']} {phase}: {r['error']}")
            elif r and r.get("summary", {}).get("images") != row["photos"]:
                print(f"{row['engine']} {phase}: summary says {r['summary'].get('images')} images, "
                      f"not {row['photos']}")
    print(f"results appended to {root / 'results.jsonl'} (code {CODE}, git {head})")


if __name__ == "__main__":
    main()
