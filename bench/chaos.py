"""Fault injection (not in CI): kill -9 the command or one of its workers at random moments,
or the command while a finished run folds its state away, rerun after each kill, and compare
the final tree with an uninterrupted run's, byte for byte.

    .venv/bin/python bench/chaos.py                      # 2,000 photos (lfw_gwb x 4), 50 kills
    .venv/bin/python bench/chaos.py --photos 120 --kills 5 --no-tmpfs   # a small trial

A trial is one OUTPUT_DIR, killed and rerun until a run finishes; then its tree is compared
with the uninterrupted run's (thumbnails, faces.jsonl, bounding_boxes.txt, summary.json less
its timings and run counters, the journals' lines; report.html ignored) and the next kill starts
a new trial. A share of the kills (--fold_share) waits for the end of a run: the moment its
records are written and its state folder is not yet removed. Counts: kills survived (in trials whose tree came out identical, with no traceback
anywhere), trees identical (of the trials), orphans (processes of the run alive 2 s after its
parent ended: killed, or ended by the death of a worker). As root, --tmpfs also
runs the job on a small tmpfs that fills up, is given room, and is rerun.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
IGNORED_SUMMARY = ("wall_s", "processing_s", "images_per_s", "peak_rss_mb", "workers",
                   "processed_this_run", "engine")
ORPHAN_WAIT_S = 2.0


def command(src: Path, out: str, workers: int) -> list[str]:
    return [sys.executable, "-m", "align", str(src), out, "--workers", str(workers), "--quiet"]


def env() -> dict:
    e = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    e["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [e.get("PYTHONPATH")])])
    return e


def build_input(source: Path, dest: Path, copies: int, photos: int | None) -> int:
    files = sorted(p for p in source.rglob("*") if p.is_file() and p.parent != source)
    if photos:
        files = files[:max(1, photos // copies)]
    for k in range(copies):
        for f in files:
            target = dest / f"{f.parent.name}_{k}" / f.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, target)
    return len(files) * copies


def snapshot(out: Path) -> dict:
    """{relative path: content}: files as bytes (a state folder left behind shows as its
    files), the journals' lines as one sorted list (how a run cuts its shards names its
    journals), summary.json less timings and run counters."""
    tree: dict = {"journal lines": []}
    for dirpath, _, filenames in os.walk(out):
        for name in filenames:
            path = Path(dirpath) / name
            rel = path.relative_to(out).as_posix()
            if rel in (".align_dataset/lock", "report.html"):
                continue
            data = path.read_bytes()
            if rel.startswith(".align_dataset/journal/"):
                tree["journal lines"] += data.splitlines()
            elif rel == "summary.json":
                s = json.loads(data)
                tree[rel] = {k: v for k, v in s.items() if k not in IGNORED_SUMMARY}
            else:
                tree[rel] = data
    tree["journal lines"].sort()
    return tree


def differences(a: dict, b: dict) -> list[str]:
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def live_processes() -> list[tuple[int, int, int]]:
    """(pid, parent pid, process group) of every process that is not a zombie (Linux /proc)."""
    table = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z":
            table.append((int(stat.parent.name), int(fields[1]), int(fields[2])))
    return table


def group_members(pgid: int) -> list[int]:
    return [pid for pid, _, group in live_processes() if group == pgid]


def children(pid: int) -> list[int]:
    return [child for child, parent, _ in live_processes() if parent == pid]


def workers_of(pid: int) -> list[int]:
    """The pool's workers: children running multiprocessing's spawn (not its resource tracker)."""
    found = []
    for child in children(pid):
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:
            continue
        if b"spawn_main" in cmdline:
            found.append(child)
    return found


def reap_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run_to_end(src: Path, cwd: Path, workers: int, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(command(src, "out", workers), cwd=cwd, env=env(), capture_output=True,
                          text=True, errors="replace", timeout=timeout)


def folding(out: Path, since_ns: int) -> bool:
    """Whether the run started at `since_ns` (time.time_ns) has written its records and not
    yet removed its state folder."""
    try:
        return (out / "summary.json").stat().st_mtime_ns >= since_ns and (out / ".align_dataset").exists()
    except FileNotFoundError:
        return False


def chaos(src: Path, work: Path, kills: int, workers: int, full_s: float, rng: random.Random,
          latest: float, reference: dict, fold_share: float) -> dict:
    """`kills` kills, each followed by a rerun (the next iteration's run). A trial is one
    OUTPUT_DIR from its first run to a run that finishes; its tree is then compared with the
    reference, and the next kill starts a new trial on a fresh OUTPUT_DIR."""
    figures = {"kills": 0, "parent_kills": 0, "worker_kills": 0, "fold_kills": 0, "kills_survived": 0,
               "orphans": 0, "tracebacks": 0, "trials": 0, "trees_identical": 0, "differing": []}
    trial, killed_in_trial = 0, 0

    def finish(proc_err: str) -> None:
        nonlocal trial, killed_in_trial
        tree = snapshot(work / f"trial{trial}" / "out")
        differ = differences(reference, tree)
        figures["trials"] += 1
        figures["trees_identical"] += not differ
        figures["differing"] += differ[:5]
        figures["kills_survived"] += killed_in_trial if not differ and "Traceback" not in proc_err else 0
        print(f"trial {trial}: {killed_in_trial} kills, tree {'identical' if not differ else differ[:3]}", flush=True)
        shutil.rmtree(work / f"trial{trial}", ignore_errors=True)
        trial, killed_in_trial = trial + 1, 0

    while figures["kills"] < kills:
        cwd = work / f"trial{trial}"
        cwd.mkdir(exist_ok=True)
        started_ns = time.time_ns() - 1_000_000_000     # file times are coarser than the clock
        proc = subprocess.Popen(command(src, "out", workers), cwd=cwd, env=env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                errors="replace", start_new_session=True)
        if rng.random() < fold_share:       # the end of the run, as it folds its state away
            victim = "fold"
            while not folding(cwd / "out", started_ns) and proc.poll() is None:
                time.sleep(0.002)
        else:                               # a random moment: start-up included (nets load first)
            deadline = time.monotonic() + rng.uniform(0.02, latest) * full_s
            victim = "parent" if rng.random() < 0.5 else "worker"
            while time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.02)
        if proc.poll() is not None:          # the trial's job is done: compare, start another
            _, err = proc.communicate()
            figures["tracebacks"] += "Traceback" in err
            finish(err)
            continue
        pool = workers_of(proc.pid)
        if victim == "worker" and pool:
            os.kill(rng.choice(pool), signal.SIGKILL)
            figures["worker_kills"] += 1
            try:
                _, err = proc.communicate(timeout=120)
            except subprocess.TimeoutExpired:
                reap_group(proc.pid)
                _, err = proc.communicate()
                err += "\n(the run did not end within 120 s of its worker's death)"
            figures["tracebacks"] += "Traceback" in err
        else:
            victim = "fold" if victim == "fold" else "parent"
            os.kill(proc.pid, signal.SIGKILL)
            figures["fold_kills" if victim == "fold" else "parent_kills"] += 1
            proc.communicate()
        time.sleep(ORPHAN_WAIT_S)           # the parent has ended: nothing of it may be left
        figures["orphans"] += len(group_members(proc.pid))
        reap_group(proc.pid)
        figures["kills"] += 1
        killed_in_trial += 1
        print(f"kill {figures['kills']}/{kills}: {victim} (trial {trial})", flush=True)
    final = run_to_end(src, work / f"trial{trial}", workers, timeout=full_s * 10 + 600)
    figures["tracebacks"] += "Traceback" in final.stderr
    figures["final_exit"] = final.returncode
    finish(final.stderr)
    return figures


def full_disk(src: Path, work: Path, workers: int, reference: dict, size: str) -> dict:
    fs = work / "tmpfs"
    fs.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(fs)], check=True)
    try:
        first = run_to_end(src, fs, workers, timeout=3600)
        errors = [l for l in snapshot(fs / "out")["journal lines"] if b'"status": "error"' in l]
        subprocess.run(["mount", "-o", "remount,size=4g", str(fs)], check=True)
        second = run_to_end(src, fs, workers, timeout=3600)
        tree = snapshot(fs / "out")
        ref = dict(reference)
        return {"first_exit": first.returncode, "first_error_line": first.stderr.strip()[-300:],
                "error_records_first_run": len(errors),
                "rerun_exit": second.returncode, "tracebacks": ("Traceback" in first.stderr) + ("Traceback" in second.stderr),
                "tree_identical": not differences(ref, tree)}
    finally:
        subprocess.run(["umount", "-l", str(fs)], capture_output=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", type=Path, default=REPO.parent / "shared" / "faces" / "lfw_gwb")
    ap.add_argument("--copies", type=int, default=4)
    ap.add_argument("--photos", type=int, default=None, help="at most this many photos in all")
    ap.add_argument("--kills", type=int, default=50)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--latest", type=float, default=0.6,
                    help="kill at a moment up to this fraction of an uninterrupted run's time")
    ap.add_argument("--fold_share", type=float, default=0.3,
                    help="the share of the kills made as a finished run folds its state away")
    ap.add_argument("--tmpfs", default="3m", help="size of the tmpfs that fills up (root only)")
    ap.add_argument("--no-tmpfs", action="store_true")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="chaos-"))
    src = work / "in"
    n = build_input(args.source, src, args.copies, args.photos)
    print(f"{n} photos in {src}", flush=True)
    (work / "reference").mkdir()
    t0 = time.monotonic()
    ref = run_to_end(src, work / "reference", args.workers, timeout=36000)
    full_s = time.monotonic() - t0
    assert ref.returncode == 0, ref.stderr
    reference = snapshot(work / "reference" / "out")
    print(f"uninterrupted run: {full_s:.0f} s", flush=True)
    figures = chaos(src, work, args.kills, args.workers, full_s, random.Random(args.seed),
                    args.latest, reference, args.fold_share)
    figures.update(photos=n, uninterrupted_s=round(full_s, 1))
    if not args.no_tmpfs and os.geteuid() == 0:
        figures["full_disk"] = full_disk(src, work, args.workers, reference, args.tmpfs)
    print(json.dumps(figures, indent=1))
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
