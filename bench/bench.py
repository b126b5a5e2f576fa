"""Photos per second of align_dataset against facenet's original loop, on one folder.

Usage: python bench/bench.py DATA [--rounds 3] [--arcface] [--engine dask]
       (make bench DATA=... BENCH_ARGS=--arcface ENGINE=dask)

DATA is a folder in LFW layout (DATA/<identity>/<photos>). Measured on the same photos:

  facenet 1.0.5 loop   bench/facenet_loop.py in a process of its own: facenet's own
                       detect_face (TF1 graph mode, via tensorflow.compat.v1) in the loop of
                       its align_dataset_mtcnn.py (decode, detect, choose a face, crop with
                       margin 44, resize to 160, write PNG); TF intra-op threads = cores,
                       inter-op 1.
  align_dataset        `align_dataset DATA OUT --image_size 160 --margin 44 --overwrite
                       --quiet` in a process of its own, with the threads it chooses; its
                       numbers are read from OUT/summary.json.

  --align arcface      with --arcface: `align_dataset DATA OUT --align arcface --overwrite
                       --quiet` (112 px warps onto the ArcFace template) in the same rounds,
                       beside the box mode above; its photos/s and the ratio to box mode are
                       printed too.

and for each a detect-only figure: every photo decoded first (as facenet decodes), then only
the detector is timed (facenet: detect_face per photo; ours: Detector.detect_batch over chunks
of 64 photos after a one-photo warm-up, `bench.py --detect-only-ours`).

What is timed: photos/s counts only the work on the photos. Process start, imports and model
loading are excluded (facenet: the clock starts after its session and nets exist and stops
at its last photo; ours: processing_s starts once every worker has its nets and stops when
the last shard's records are in). The whole run's wall time, model loading included, is
printed too (facenet: process start to its last photo; ours: the align_dataset call, its
workers' start and exit included, and beside it the process's wall time).

With --engine dask, each round also runs `align_dataset ... --engine dask` (a LocalCluster of
as many worker processes as the local engine starts) after ours, and the table gives its
photos/s beside the local engine's and their ratio.

Each measurement runs --rounds times (default 3) in fresh processes, the order alternating
between rounds (facenet first in odd rounds, ours first in even ones), and the best round
counts (highest photos/s, lowest wall; peak memory is the highest seen, ru_maxrss). Aligned
photos go to a temporary folder, deleted afterwards. Other load on the machine is measured
(/proc/stat) and warned about, as it skews the timings. The report is printed and written,
with every round, to bench/out/bench-<DATA folder name>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path[:0] = [p for p in (str(BENCH), str(ROOT)) if p not in sys.path]

import facenet_loop  # noqa: E402  (no TensorFlow at import)
from align.config import usable_cores  # noqa: E402

OUT_DIR = BENCH / "out"
CHUNK = 64                   # photos per detect_batch call in ours' detect-only pass
TIMEOUT_S = 3 * 3600         # per process
ALIGN_ARGS = ["--image_size", "160", "--margin", "44", "--overwrite", "--quiet"]
FACENET, OURS = "facenet 1.0.5 loop", "align_dataset"
# further runs of align_dataset, each compared with OURS in the same round: name -> (label, args)
VARIANTS = {
    "dask": ("align_dataset --engine dask", ALIGN_ARGS + ["--engine", "dask", "--workers", str(usable_cores())]),
    "arcface": ("align_dataset --align arcface", ["--align", "arcface", "--overwrite", "--quiet"]),
}


# ---------------------------------------------------------------- the machine

def child_env() -> dict:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def tf_info() -> dict:
    """TF version and visible GPUs, asked of a process that imports TF (this one must not)."""
    code = ("import json, tensorflow as tf; print(json.dumps({'tf': tf.__version__, 'gpus': "
            "[d.name for d in tf.config.list_physical_devices('GPU')]}))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=child_env(), cwd=ROOT)
    try:
        return json.loads(p.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {"tf": None, "gpus": None, "error": p.stderr[-2000:]}


def machine() -> dict:
    info = tf_info()
    return {"cores": usable_cores(), "cpu": cpu_model(), "tf": info.get("tf"),
            "gpus": info.get("gpus"), "python": platform.python_version(),
            "platform": platform.platform()}


# ---------------------------------------------------------------- running one measurement

def busy_cpu_s() -> float | None:
    """CPU seconds the whole machine has spent busy since boot (/proc/stat; steal included,
    as time the VM could not run)."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)       # idle + iowait
    busy = sum(fields[:8]) - idle                                  # up to steal, not guest
    return busy / os.sysconf("SC_CLK_TCK")


def run_child(cmd: list[str], log: Path) -> dict:
    """Run cmd to its end; its exit code, wall seconds, CPU seconds and the peak RSS of the
    largest process of its tree (from wait4, which covers the children it reaped), and how
    many cores other processes kept busy meanwhile."""
    with open(log, "w") as out:
        busy0 = busy_cpu_s()
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=child_env(),
                             cwd=ROOT, start_new_session=True)
        timer = threading.Timer(TIMEOUT_S, os.killpg, (p.pid, signal.SIGKILL))
        timer.start()
        try:
            _, status, usage = os.wait4(p.pid, 0)
        except BaseException:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            raise
        finally:
            timer.cancel()
        wall = time.perf_counter() - t0
        busy1 = busy_cpu_s()
    p.returncode = os.waitstatus_to_exitcode(status)
    result = {"exit_code": p.returncode, "process_wall_s": round(wall, 2),
              "process_tree_peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
              "cpu_s": round(usage.ru_utime + usage.ru_stime, 2)}
    if busy0 is not None and busy1 is not None and wall > 0:
        # cores kept busy by anything else while it ran: >0.1 means the timing is disturbed
        result["other_cores_busy"] = round(max(0.0, busy1 - busy0 - result["cpu_s"]) / wall, 2)
    if p.returncode != 0:
        result["error"] = log.read_text(errors="replace")[-3000:]
    return result


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def count_written(out: Path) -> int:
    """Thumbnails written: image files in the identity folders of an output folder."""
    return sum(1 for f in out.glob("*/*") if f.suffix.lower() in (".png", ".jpg"))


def align_command() -> list[str]:
    """The installed console script beside this interpreter, else `python -m align`."""
    script = Path(sys.executable).parent / "align_dataset"
    return [str(script)] if script.exists() else [sys.executable, "-m", "align"]


def run_facenet(data: Path, work: Path) -> dict:
    out, res = work / "facenet", work / "facenet.json"
    run = run_child([sys.executable, str(BENCH / "facenet_loop.py"), str(data), str(out),
                     "--json", str(res), "--image_size", "160", "--margin", "44"],
                    work / "facenet.log")
    r = read_json(res)
    run.update(photos=r.get("images"), written=count_written(out),
               e2e_per_s=r.get("photos_per_s_loop"), detect_per_s=r.get("photos_per_s_detect"),
               e2e_s=r.get("seconds_loop"), detect_s=r.get("seconds_detect"),
               wall_s=r.get("seconds_to_loop_end"),
               e2e_peak_rss_mb=r.get("peak_rss_mb_loop"),
               detect_peak_rss_mb=r.get("peak_rss_mb_detect"), raw=r)
    shutil.rmtree(out, ignore_errors=True)
    return run


def run_ours(data: Path, work: Path, args: list[str] = ALIGN_ARGS) -> dict:
    out = work / "ours"
    run = run_child(align_command() + [str(data), str(out)] + args, work / "ours.log")
    s = read_json(out / "summary.json")
    per_s = s.get("images_per_s")
    if per_s is None and s.get("images") and s.get("processing_s"):
        per_s = s["images"] / s["processing_s"]
    run.update(photos=s.get("images"), written=count_written(out),
               e2e_per_s=round(per_s, 2) if per_s else None, e2e_s=s.get("processing_s"),
               wall_s=s.get("wall_s"), e2e_peak_rss_mb=s.get("peak_rss_mb"), raw=s)
    shutil.rmtree(out, ignore_errors=True)
    return run


def run_ours_detect(data: Path, work: Path) -> dict:
    res = work / "ours_detect.json"
    run = run_child([sys.executable, str(Path(__file__).resolve()), "--detect-only-ours",
                     str(data), str(res)], work / "ours_detect.log")
    r = read_json(res)
    run.update(detect_per_s=r.get("photos_per_s_detect"), detect_s=r.get("seconds_detect"),
               detect_peak_rss_mb=r.get("peak_rss_mb"), raw=r)
    return run


# ---------------------------------------------------------------- ours, detect only (in a child)

def detect_only_ours(input_dir: str, json_path: str) -> None:
    """Decode every photo (as facenet_loop does), build the Detector, warm it up on one photo,
    then time detect_batch over chunks of CHUNK photos; write the result to json_path."""
    decoded, skipped = facenet_loop.decode_all(facenet_loop.list_images(input_dir))
    if not decoded:
        raise SystemExit(f"no photo of {input_dir} could be decoded")
    t0 = time.perf_counter()
    from align.detect import Detector
    detector = Detector()
    detector.detect_batch(decoded[:1])
    setup_s = time.perf_counter() - t0

    failed = 0
    t0 = time.perf_counter()
    for start in range(0, len(decoded), CHUNK):
        chunk = decoded[start:start + CHUNK]
        try:
            detector.detect_batch(chunk)
        except Exception:  # then photo by photo, to count the ones that fail
            for img in chunk:
                try:
                    detector.detect_batch([img])
                except Exception:
                    failed += 1
    seconds = time.perf_counter() - t0
    Path(json_path).write_text(json.dumps({
        "implementation": "align.detect.Detector.detect_batch", "chunk": CHUNK,
        "detect_images": len(decoded), "detect_skipped": skipped, "detect_failed": failed,
        "seconds_setup": round(setup_s, 3), "seconds_detect": round(seconds, 3),
        "photos_per_s_detect": facenet_loop.per_s(len(decoded), seconds),
        "peak_rss_mb": facenet_loop.peak_rss_mb()}, indent=1))


# ---------------------------------------------------------------- rounds and the report

def one_round(index: int, data: Path, work: Path, variants: list[str]) -> dict:
    """facenet then ours in odd rounds (1, 3, ...), ours then facenet in even ones; the
    variants right after ours."""
    def ours() -> dict:
        return {**run_ours(data, work), "detect_only": run_ours_detect(data, work)}

    steps = [(FACENET, lambda: run_facenet(data, work)), (OURS, ours)]
    if index % 2:
        steps.reverse()
    at = [name for name, _ in steps].index(OURS) + 1
    steps[at:at] = [(VARIANTS[v][0], lambda v=v: run_ours(data, work, VARIANTS[v][1])) for v in variants]
    result = {"round": index + 1, "order": [name for name, _ in steps]}
    for name, step in steps:
        print(f"  round {index + 1}: {name} ...", file=sys.stderr, flush=True)
        result[name] = step()
    return result


def pick(values, best):
    values = [v for v in values if v is not None]
    return best(values) if values else None


def summarise(rounds: list[dict]) -> dict:
    """Best of the rounds per measurement: max photos/s, min wall, max peak memory."""
    def runs(name, detect=False):
        return [r[name]["detect_only"] if detect else r[name] for r in rounds]

    best = {}
    for name in (FACENET, OURS):
        e2e = runs(name)
        det = runs(name, detect=(name == OURS))
        best[name] = {
            "e2e_per_s": pick([r.get("e2e_per_s") for r in e2e], max),
            "detect_per_s": pick([r.get("detect_per_s") for r in det], max),
            "e2e_peak_rss_mb": pick([r.get("e2e_peak_rss_mb") for r in e2e], max),
            "detect_peak_rss_mb": pick([r.get("detect_peak_rss_mb") for r in det], max),
            "wall_s": pick([r.get("wall_s") for r in e2e], min),
            "process_wall_s": pick([r.get("process_wall_s") for r in e2e], min),
            "photos": pick([r.get("photos") for r in e2e], max),
            "written": pick([r.get("written") for r in e2e], max),
            "failed_runs": sum(r.get("exit_code") != 0 for r in e2e + det),
        }
    busy = [r.get("other_cores_busy") for r in (e for rd in rounds for e in
            (rd[FACENET], rd[OURS], rd[OURS]["detect_only"],
             *(rd[label] for label, _ in VARIANTS.values() if label in rd)))]
    best["max_other_cores_busy"] = pick(busy, max)
    f, o = best[FACENET], best[OURS]
    best["ratio"] = {k: (round(o[k] / f[k], 2) if o[k] and f[k] else None)
                     for k in ("e2e_per_s", "detect_per_s")}
    best["variants"] = {}
    for name in (n for n in rounds[0] if n in {label for label, _ in VARIANTS.values()}):
        per_s = pick([r[name].get("e2e_per_s") for r in rounds], max)
        best["variants"][name] = {
            "e2e_per_s": per_s, "wall_s": pick([r[name].get("wall_s") for r in rounds], min),
            "written": pick([r[name].get("written") for r in rounds], max),
            "failed_runs": sum(r[name].get("exit_code") != 0 for r in rounds),
            "ratio_to_ours": round(per_s / o["e2e_per_s"], 2) if per_s and o["e2e_per_s"] else None}
    return best


def fmt(value, unit="", width=8, digits=1) -> str:
    text = "n/a" if value is None else f"{value:.{digits}f}{unit}"
    return text.rjust(width)


def table(report: dict) -> str:
    m, best = report["machine"], report["best"]
    gpu = ", ".join(m["gpus"]) if m["gpus"] else ("none" if m["gpus"] is not None else "?")
    lines = [
        f"data: {report['data']} ({report['photos']} photos)   machine: {m['cores']} cores, "
        f"{m['cpu']}, TF {m['tf']}, GPU: {gpu}, Python {m['python']}",
        f"best of {report['rounds']} rounds, order alternating; photos/s excludes process "
        f"start and model loading",
        f"{'':22} {'end-to-end':>11} {'detect-only':>12}   peak MB (end-to-end / detect-only)",
    ]
    for name in (FACENET, OURS):
        b = best[name]
        lines.append(f"{name:22} {fmt(b['e2e_per_s'], ' /s', 11)} {fmt(b['detect_per_s'], ' /s', 12)}"
                     f"   {fmt(b['e2e_peak_rss_mb'], '', 6, 0)} / {fmt(b['detect_peak_rss_mb'], '', 0, 0)}")
    r = best["ratio"]
    lines.append(f"{'ratio ours/facenet':22} {fmt(r['e2e_per_s'], 'x', 11, 2)} "
                 f"{fmt(r['detect_per_s'], 'x', 12, 2)}")
    f, o = best[FACENET], best[OURS]
    lines.append(f"whole run, model loading included: {FACENET} {fmt(f['wall_s'], ' s', 0)}, "
                 f"{OURS} {fmt(o['wall_s'], ' s', 0)} (process wall {fmt(o['process_wall_s'], ' s', 0)})")
    for name, v in best.get("variants", {}).items():
        lines.append(f"{name:22} {fmt(v['e2e_per_s'], ' /s', 11)}   {fmt(v['ratio_to_ours'], 'x', 0, 2)} "
                     f"of {OURS}'s photos/s in the same rounds; whole run {fmt(v['wall_s'], ' s', 0)}, "
                     f"{v['written']} thumbnails")
    lines.append(f"thumbnails written: {FACENET} {f['written']}, {OURS} {o['written']}"
                 f" (of {report['photos']} photos; images counted: {f['photos']} / {o['photos']})")
    for name, b in [(FACENET, best[FACENET]), (OURS, best[OURS]), *best["variants"].items()]:
        if b["failed_runs"]:
            lines.append(f"WARNING: {b['failed_runs']} run(s) of {name} failed; see "
                         f"'error' in 'runs' of the JSON report")
    if (best["max_other_cores_busy"] or 0) > 0.1:
        lines.append(f"WARNING: other processes kept up to {best['max_other_cores_busy']:.2f} "
                     f"cores busy during a run: timings are disturbed")
    def most(name, key, detect=False):
        return max((((r[name]["detect_only"] if detect else r[name]).get("raw") or {}).get(key) or 0
                    for r in report["runs"]), default=0)

    for what, n in (("facenet's loop failed on", most(FACENET, "errors")),
                    ("facenet's detect-only pass failed on", most(FACENET, "detect_failed")),
                    ("ours' detect-only pass failed on", most(OURS, "detect_failed", True))):
        if n:
            lines.append(f"note: {what} {n} photo(s) (counted, skipped)")
    return "\n".join(lines)


def bench(data: Path, rounds: int, variants: list[str] = ()) -> dict:
    photos = len(facenet_loop.list_images(data))
    report = {"data": str(data), "photos": photos, "rounds": rounds, "machine": machine(),
              "commands": {FACENET: "bench/facenet_loop.py DATA OUT --json RESULT",
                           OURS: " ".join(align_command() + ["DATA", "OUT"] + ALIGN_ARGS)},
              "chunk": CHUNK, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    for v in variants:
        report["commands"][VARIANTS[v][0]] = " ".join(align_command() + ["DATA", "OUT"] + VARIANTS[v][1])
    with tempfile.TemporaryDirectory(prefix="align-bench-") as tmp:
        report["runs"] = [one_round(i, data, Path(tmp), list(variants)) for i in range(rounds)]
    report["best"] = summarise(report["runs"])
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", nargs="?", help="folder in LFW layout: DATA/<identity>/<photos>")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--engine", choices=["local", "dask"], default="local",
                    help="dask: also run align_dataset --engine dask in every round")
    ap.add_argument("--arcface", action="store_true",
                    help="also time align_dataset --align arcface in every round, beside box mode")
    ap.add_argument("--detect-only-ours", nargs=2, metavar=("INPUT", "RESULT_JSON"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.detect_only_ours:
        detect_only_ours(*args.detect_only_ours)
        return 0
    if not args.data or not Path(args.data).is_dir():
        ap.error("DATA must be a folder of identity folders")
    if args.rounds < 1:
        ap.error("--rounds must be >= 1")
    data = Path(args.data).resolve()
    report = bench(data, args.rounds, ["dask"] * (args.engine == "dask") + ["arcface"] * args.arcface)
    print(table(report))
    OUT_DIR.mkdir(exist_ok=True)
    path = OUT_DIR / f"bench-{data.name}.json"
    path.write_text(json.dumps(report, indent=1))
    print(f"report: {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
