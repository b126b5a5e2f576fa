"""Each --output_format on the same photos: photos/s end to end, and the file system calls on
OUTPUT_DIR (files created, fsyncs, renames) counted by strace; then MXNet's im2rec packing the
folders output into a rec, beside ours writing it directly.

    python bench/formats.py DATA [--copies 4] [--workers 2] [--im2rec-python PYTHON]

DATA's identity folders are copied --copies times (as <identity>_<i>) into a temporary
INPUT_DIR. Each format runs once, timed, under
`strace -f --seccomp-bpf -y -e trace=openat,fsync,fdatasync,rename,renameat2,mkdir` (only those
calls stop the process: a few per photo) to count the calls whose path is in OUTPUT_DIR (fsyncs
by the file they name). --im2rec-python: a Python with mxnet 1.9.1
and OpenCV (its own venv: MXNet needs numpy < 1.24), for `python -m mxnet.tools.im2rec`.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parent.parent
FORMATS = ("folders", "rec", "webdataset")


def build_input(data: Path, copies: int, root: Path) -> tuple[Path, int]:
    src = root / "in"
    n = 0
    for identity in sorted(p for p in data.iterdir() if p.is_dir()):
        for i in range(copies):
            dest = src / f"{identity.name}_{i}"
            dest.mkdir(parents=True)
            for photo in sorted(identity.iterdir()):
                shutil.copyfile(photo, dest / photo.name)
                n += 1
    return src, n


def command(src: Path, out: Path, fmt: str, workers: int) -> list[str]:
    return [sys.executable, "-m", "align", str(src), str(out), "--output_format", fmt,
            "--workers", str(workers), "--quiet", "--no-report"]


def env() -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="2")


CALL = re.compile(r"^(\w+)\((.*)\)\s+= (-?\d+)")
PID = re.compile(r"^(?:\[pid\s+(\d+)\] |(\d+)\s+)?(.*)$")
RESUMED = re.compile(r"^<\.\.\. \w+ resumed>")


def calls(log: Path) -> Iterator[str]:
    """strace's lines, a call cut by another thread's (`<unfinished ...>`, then `<... resumed>`)
    joined again, less the pid."""
    pending: dict[str, str] = {}
    for line in log.read_text(errors="replace").splitlines():
        m = PID.match(line)
        pid, text = m.group(1) or m.group(2) or "", m.group(3)
        if text.endswith("<unfinished ...>"):
            pending[pid] = text[:-len("<unfinished ...>")].rstrip()
        elif RESUMED.match(text):
            yield pending.pop(pid, "") + RESUMED.sub("", text)
        else:
            yield text


def traced(cmd: list[str], out: Path, log: Path) -> tuple[float, dict[str, int]]:
    """(seconds, {call: count}) of the command under strace."""
    t0 = time.perf_counter()
    subprocess.run(["strace", "-f", "--seccomp-bpf", "-y", "-qq", "-o", str(log), "-e",
                    "trace=openat,fsync,fdatasync,rename,renameat2,mkdir", *cmd], check=True, env=env())
    seconds = time.perf_counter() - t0
    counts = {"created": 0, "appended": 0, "fsync": 0, "rename": 0, "mkdir": 0}
    where = str(out.resolve())
    for line in calls(log):
        m = CALL.match(line)
        if not m or int(m.group(3)) < 0 or where not in m.group(2):
            continue
        call, args = m.group(1), m.group(2)
        if call == "openat" and "O_CREAT" in args:
            counts["appended" if "O_APPEND" in args else "created"] += 1
        elif call in ("fsync", "fdatasync"):
            counts["fsync"] += 1
        elif call.startswith("rename"):
            counts["rename"] += 1
        elif call == "mkdir":
            counts["mkdir"] += 1
    return seconds, counts


def im2rec(python: str, folders: Path, root: Path, *pack_args: str) -> float:
    """`python -m mxnet.tools.im2rec` twice, as arcface_torch's prepare_custom_dataset.md
    does (the list, then the pack, with `pack_args`); seconds for both."""
    prefix = Path(tempfile.mkdtemp(dir=root)) / "train"
    t0 = time.perf_counter()
    subprocess.run([python, "-m", "mxnet.tools.im2rec", "--list", "--recursive", str(prefix), str(folders)],
                   check=True, capture_output=True)
    subprocess.run([python, "-m", "mxnet.tools.im2rec", "--num-thread", "2", *pack_args, str(prefix),
                    str(folders)], check=True, capture_output=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data", type=Path)
    ap.add_argument("--copies", type=int, default=4)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--im2rec-python")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-formats-") as tmp:
        root = Path(tmp)
        src, n = build_input(a.data, a.copies, root)
        print(f"{n} photos, {a.workers} workers")
        results = {}
        for fmt in FORMATS:
            out = root / f"out_{fmt}"
            seconds, counts = traced(command(src, out, fmt, a.workers), out, root / f"strace_{fmt}.log")
            summary = json.loads((out / "summary.json").read_text())
            if fmt == "folders":
                shutil.move(out, root / "folders_kept")
            else:
                shutil.rmtree(out)
            results[fmt] = {"wall_s": round(seconds, 1), "photos_per_s": round(n / seconds, 1),
                            "processing_photos_per_s": summary["images_per_s"],
                            "faces": summary["faces_written"], **counts,
                            "per_photo": round(sum(counts.values()) / n, 3)}
            print(fmt, json.dumps(results[fmt]), flush=True)
        if a.im2rec_python:
            for what, args in (("as prepare_custom_dataset.md (JPEG, quality 100)", ("--quality", "100")),
                               ("--pass-through (the PNG bytes as they are)", ("--pass-through",))):
                s = im2rec(a.im2rec_python, root / "folders_kept", root, *args)
                print(f"im2rec list + pack {what}, 2 threads: {s:.1f} s "
                      f"({results['folders']['faces'] / s:.0f} faces/s)", flush=True)

if __name__ == "__main__":
    main()
