"""The client's memory and time at a million records (not a timed test: run it by hand).

    .venv/bin/python bench/million.py [--photos 1000000] [--root /tmp/align-million]

Builds once (and keeps under --root) a job of --photos inputs whose every photo is done:
  input/    identity folders of 300 empty files each (VGGFace2 has ~360 a person): the real
            walk lists them, as it would photos;
  state/    .align_dataset/ as a run leaves it before its end: options.json, and one journal
            per shard of the first run (cut_shards, 2 workers: shards of 32), with realistic
            records (90% aligned, one face of box/score/landmarks and its written entry, some
            with two faces found; no_face, unreadable, not_an_image), 1% of them "error"; then
            the journals of a second run that retried those errors (its own shards) and
            aligned them. No thumbnails: nothing reads them.
Then, each in a fresh process (its peak RSS its own), on output/ made anew from state/ (hard
links) for each:
  parts:     the walk joined with the journals (Records.plan: the journals sorted by input,
             merged, joined), then the merge (faces.jsonl, bounding_boxes.txt), timed apart;
  journals:  align_dataset(input, output) on the journals: what every rerun of a finished job
             did before OUTPUT_DIR became a training set (the state was kept), and what the end
             of a run does now (it then folds the state away);
  finished:  align_dataset again on what that left, a finished run's OUTPUT_DIR (faces.jsonl,
             no state): the no-op resume of this release.
  previous:  (--previous) the journals step run by the previous release's code (git archive of
             PREVIOUS_RELEASE), for the before/after figure.
Prints peak RSS (ru_maxrss) and the wall times, and checks that all wrote the same bytes.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, os.environ.get("ALIGN_CODE", str(REPO)))    # the code measured
PREVIOUS_RELEASE = "36fdfce"

PER_IDENTITY = 300
ERROR_RATE = 0.01


def rss_mb() -> tuple[float, float]:
    """(current, peak) resident set of this process, MB."""
    with open("/proc/self/statm") as f:
        current = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    return current, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def fake_record(rel: str, out_base: str, rng: random.Random, status: str) -> dict:
    """A record shaped as Aligner makes it (png thumbnails, facenet's single face)."""
    out = out_base + ".png"
    r = {"input": rel, "status": status, "reason": None, "size": None, "output": out,
         "faces": [], "written": []}
    if status == "error":
        r["reason"] = "MemoryError: Unable to allocate 1.53 GiB for an array with shape (8000, 10000, 3)"
    elif status == "unreadable":
        r["reason"] = "image file is truncated (12 bytes not processed)"
    elif status == "not_an_image":
        r["reason"] = "cannot identify image file"
    if status in ("aligned", "no_face"):
        w, h = rng.randint(120, 1024), rng.randint(120, 1024)
        r["size"] = [w, h]
    if status == "aligned":
        for _ in range(1 if rng.random() < 0.85 else 2):
            x, y = rng.uniform(0, w / 2), rng.uniform(0, h / 2)
            s = rng.uniform(40, min(w, h) / 2)
            r["faces"].append({"box": [x, y, x + s, y + s * 1.2], "score": rng.uniform(0.9, 1.0),
                               "landmarks": [[x + rng.uniform(0, s), y + rng.uniform(0, s)] for _ in range(5)]})
        x1, y1, x2, y2 = (int(v) for v in r["faces"][0]["box"])
        r["written"] = [{"face": 0, "crop_box": [max(0, x1 - 22), max(0, y1 - 22), min(w, x2 + 22),
                                                 min(h, y2 + 22)], "output": out}]
    return r


def build(root: Path, photos: int) -> None:
    from align.config import Config
    from align.dataset import cut_shards, walk
    from align.records import StateDir, dumps
    from align.runner import OUTPUT_OPTIONS

    input_dir, output_dir = root / "input", root / "state"
    t0 = time.perf_counter()
    if not (root / "input.complete").exists():
        for i in range(0, photos, PER_IDENTITY):
            folder = input_dir / f"n{i // PER_IDENTITY:06d}"
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(i, min(photos, i + PER_IDENTITY)):
                os.close(os.open(folder / f"{k % PER_IDENTITY:04d}_{k % 7:02d}.jpg", os.O_CREAT | os.O_WRONLY, 0o644))
        (root / "input.complete").touch()
    print(f"input tree: {time.perf_counter() - t0:.1f} s", flush=True)

    t0 = time.perf_counter()
    state = StateDir(output_dir)
    state.journals.mkdir(parents=True, exist_ok=True)
    config = Config()
    options = {k: getattr(config, k) for k in OUTPUT_OPTIONS}
    options["thresholds"] = list(options["thresholds"])
    state.set_options(options)
    rng = random.Random(11)
    tasks = walk(input_dir).tasks
    assert len(tasks) == photos, len(tasks)
    statuses = ["aligned"] * 900 + ["no_face"] * 70 + ["unreadable"] * 10 + ["not_an_image"] * 10 + \
               ["error"] * int(1000 * ERROR_RATE)
    errors = []
    for run in (1, 2):                      # run 2 retries run 1's errors, cut in its own shards
        for shard in cut_shards(tasks if run == 1 else errors, 2):
            lines = []
            for t in shard.tasks:
                status = rng.choice(statuses) if run == 1 else "aligned"
                if status == "error":
                    errors.append(t)
                lines.append(dumps(fake_record(t.rel, t.out_base, rng, status)) + "\n")
            with open(state.journals / f"{shard.key}.jsonl", "a", encoding="utf-8") as f:
                f.write("".join(lines))         # as Journal.append, less its fsync
    (root / "state.complete").touch()
    print(f"journals: {len(list(state.journals.iterdir()))} files, "
          f"{sum(p.stat().st_size for p in state.journals.iterdir()) / 2**20:.0f} MB, "
          f"{len(errors)} errors retried; {time.perf_counter() - t0:.1f} s", flush=True)


def fresh_output(root: Path) -> Path:
    """output/ anew: the built state, hard-linked (the runs read the journals, never write them)."""
    out = root / "output"
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(root / "state", out, copy_function=os.link)
    return out


def parts(root: Path) -> dict:
    from align.dataset import walk_identities
    from align.records import Records, StateDir

    output = fresh_output(root)
    out = {"rss_start_mb": rss_mb()[0]}
    t0, c0 = time.perf_counter(), time.process_time()
    records = Records(StateDir(output), str(output))
    tasks = (t for _, ts in walk_identities(root / "input") for t in ts)
    pending = sum(1 for _ in records.plan(tasks))
    out["scan_s"], out["scan_cpu_s"] = time.perf_counter() - t0, time.process_time() - c0
    out["rss_after_scan_mb"] = rss_mb()[0]
    t0, c0 = time.perf_counter(), time.process_time()
    out["counts"] = records.merge(output)
    out["merge_s"], out["merge_cpu_s"] = time.perf_counter() - t0, time.process_time() - c0
    out["tasks"], out["pending"] = records.tasks, pending
    out["rss_end_mb"], out["peak_rss_mb"] = rss_mb()
    out["faces_sha1"] = sha1(output / "faces.jsonl")
    return out


def resume(root: Path, fresh: bool = True) -> dict:
    """align_dataset on output/: made anew from the journals (fresh), or as the last step
    left it; timed whole, report and all."""
    from align.runner import align_dataset
    output = fresh_output(root) if fresh else root / "output"
    t0, c0 = time.perf_counter(), time.process_time()
    summary = align_dataset(root / "input", output, quiet=True, workers=2)
    out = {"resume_s": time.perf_counter() - t0, "resume_cpu_s": time.process_time() - c0,
           "peak_rss_mb": rss_mb()[1], "state_left": (output / ".align_dataset").exists(),
           "processed_this_run": summary["processed_this_run"], "workers": summary["workers"],
           "images": summary["images"], "faces_sha1": sha1(output / "faces.jsonl")}
    return out


def old(root: Path) -> dict:
    """The in-memory merge of releases before the streamed one (every record in a dict, faces.jsonl and
    bounding_boxes.txt built as strings), for comparison; writes nothing."""
    from align.dataset import walk
    from align.records import StateDir, bounding_box_lines, dumps
    t0, c0 = time.perf_counter(), time.process_time()
    tasks = walk(root / "input").tasks
    records = StateDir(root / "state").load_all()
    ordered = [records[t.rel] for t in tasks]
    faces = "".join(dumps(r) + "\n" for r in ordered).encode("utf-8", "surrogateescape")
    boxes = "".join(line for r in ordered for line in bounding_box_lines(r, str(root / "state")))
    boxes = boxes.encode("utf-8", "surrogateescape")
    return {"old_s": time.perf_counter() - t0, "old_cpu_s": time.process_time() - c0,
            "peak_rss_mb": rss_mb()[1], "faces_sha1": hashlib.sha1(faces).hexdigest()}


def sha1(path: Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def previous_code(root: Path) -> Path:
    """PREVIOUS_RELEASE's source, from this checkout's history (built once under root)."""
    code = root / "previous"
    if not (code / "align").is_dir():
        code.mkdir(exist_ok=True)
        archive = subprocess.run(["git", "-C", REPO, "archive", PREVIOUS_RELEASE, "align", "facenet_nets", "data"],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", code], input=archive, check=True)
    return code


def in_child(step: str, args, code: Path | None = None) -> dict:
    """Run one step in a fresh interpreter (with the code at `code`, else this checkout's);
    its JSON result."""
    env = dict(os.environ, ALIGN_CODE=str(code)) if code else None
    proc = subprocess.run([sys.executable, __file__, "--step", step, "--root", str(args.root),
                           "--photos", str(args.photos)], capture_output=True, text=True, env=env)
    if proc.returncode:
        sys.exit(f"{step} failed:\n{proc.stdout}{proc.stderr[-5000:]}")
    print(proc.stdout, end="", flush=True)
    return json.loads(proc.stdout.splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--photos", type=int, default=1_000_000)
    p.add_argument("--root", type=Path, default=Path("/tmp/align-million"))
    p.add_argument("--old", action="store_true",
                   help="also run the in-memory merge of earlier releases (several GB at 1M)")
    p.add_argument("--previous", action="store_true",
                   help=f"also time the no-op resume of the previous release ({PREVIOUS_RELEASE})")
    p.add_argument("--step", choices=["build", "parts", "journals", "finished", "old"], help=argparse.SUPPRESS)
    args = p.parse_args()
    root = args.root / str(args.photos)
    if args.step:
        if args.step == "build":
            build(root, args.photos)
            print(json.dumps({}))
        else:
            steps = {"parts": parts, "journals": resume, "finished": lambda r: resume(r, fresh=False),
                     "old": old}
            print(json.dumps(steps[args.step](root)))
        return
    if not (root / "state.complete").exists():
        in_child("build", args)
    a, b, f = in_child("parts", args), in_child("journals", args), in_child("finished", args)
    for run in (b, f):
        assert run["processed_this_run"] == 0 and run["workers"] == 0 and not run["state_left"], run
    assert a["pending"] == 0, a
    assert a["faces_sha1"] == b["faces_sha1"] == f["faces_sha1"], "the resumes wrote other bytes than the merge"
    n = a["tasks"]
    print(f"\n{n} photos, {a['counts']['faces_written']} faces written ({a['counts']})")
    print(f"walk and journal scan {a['scan_s']:.1f} s, merge {a['merge_s']:.1f} s; "
          f"peak RSS {a['peak_rss_mb']:.0f} MB")
    print(f"  CPU (user+sys) of the same: walk and scan {a['scan_cpu_s']:.1f} s, "
          f"merge {a['merge_cpu_s']:.1f} s; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"RSS: start {a['rss_start_mb']:.0f} MB, after the walk and scan {a['rss_after_scan_mb']:.0f} MB "
          f"({(a['rss_after_scan_mb'] - a['rss_start_mb']) * 2**20 / n:.0f} B/photo)")
    print(f"a run's end on the journals (align_dataset, nothing pending; then it folds them away): "
          f"{b['resume_s']:.1f} s ({b['resume_cpu_s']:.1f} s CPU), peak RSS {b['peak_rss_mb']:.0f} MB")
    print(f"no-op resume of the finished job (align_dataset on faces.jsonl, no state): "
          f"{f['resume_s']:.1f} s ({f['resume_cpu_s']:.1f} s CPU), peak RSS {f['peak_rss_mb']:.0f} MB")
    if args.previous:
        c = in_child("journals", args, previous_code(args.root))
        assert c["faces_sha1"] == a["faces_sha1"], "the previous release made other bytes"
        print(f"no-op resume of the finished job by the previous release ({PREVIOUS_RELEASE}, from its "
              f"journals): {c['resume_s']:.1f} s ({c['resume_cpu_s']:.1f} s CPU), peak RSS "
              f"{c['peak_rss_mb']:.0f} MB")
    if args.old:
        c = in_child("old", args)
        assert c["faces_sha1"] == a["faces_sha1"], "the in-memory merge made other bytes"
        print(f"in-memory merge of earlier releases: {c['old_s']:.1f} s ({c['old_cpu_s']:.1f} s CPU), "
              f"peak RSS {c['peak_rss_mb']:.0f} MB; the same faces.jsonl bytes")


if __name__ == "__main__":
    main()
