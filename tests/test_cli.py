"""align_dataset end to end: the command in a subprocess of its own, on real photos.

Every run here is a real process (`python -m align ...`, as the console script runs it), on the
sample photos of data/samples.py (and, where ../shared is present, a few more real photos);
nothing is mocked. Runs cost several seconds of TensorFlow start-up each, so the runs that
several tests check are module-scoped fixtures.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import site
import stat
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
from conftest import SHARED  # ../shared beside the checkout, when there is one
LFW_GWB = SHARED / "faces" / "lfw_gwb"
DEV = SHARED / "faces" / "dev"
DEV_REFERENCE = SHARED / "reference" / "facenet_dev.jsonl"

TIMING_KEYS = ("wall_s", "processing_s", "images_per_s", "first_shard_s", "peak_rss_mb")
SAMPLE_FILES = ["Eileen_Collins/astronaut.png", "Grace_Hopper/grace_hopper.jpg", "Group/t1.jpg"]
STATUSES = {"aligned", "no_face", "unreadable", "not_an_image", "skipped_existing"}


# --- running the command -------------------------------------------------------------------------

def cli_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def align_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "align", *(os.fspath(a) if isinstance(a, Path) else str(a) for a in args)]


def run_align(*args, cwd=None, timeout=300, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(align_cmd(*args), cwd=cwd, env={**cli_env(), **(env or {})},
                          capture_output=True, text=True, errors="replace", timeout=timeout)


def _as_from_a_terminal() -> None:
    """In the child before it runs: SIGINT as a terminal's command has it, even where the
    suite itself was started in the background of a script (which ignores SIGINT, and that is
    inherited)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_align(*args, cwd=None, env=None) -> subprocess.Popen:
    """The command in the background, as the leader of a process group of its own (its
    workers included), so that the group can be signalled as a terminal would."""
    return subprocess.Popen(align_cmd(*args), cwd=cwd, env={**cli_env(), **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, errors="replace",
                            start_new_session=True, preexec_fn=_as_from_a_terminal)


def describe(p) -> str:
    return f"exit {p.returncode}\n--- stdout\n{p.stdout}\n--- stderr\n{p.stderr}"


def ok(p: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert p.returncode == 0, describe(p)
    return p


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the command and its workers; wait until the group is gone."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.communicate(timeout=30)
    deadline = time.monotonic() + 10
    while live_group_members(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.05)  # workers being torn down


def processes() -> list[tuple[int, str, int, int]]:
    """(pid, state, parent pid, process group) of every process (Linux /proc; [] elsewhere)."""
    table = []
    for entry in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = entry.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        table.append((int(entry.parent.name), fields[0], int(fields[1]), int(fields[2])))
    return table


def live_group_members(pgid: int) -> list[int]:
    """Processes of process group pgid that are not zombies."""
    return [pid for pid, state, _, group in processes() if state != "Z" and group == pgid]


def journal_dir(out: Path) -> Path:
    """Where a run keeps its shards' journals while it runs (one `<shard key>.jsonl` each)."""
    return out / ".align_dataset" / "journal"


def journal_records(out: Path) -> list[dict]:
    """Every complete line of every journal under `out`, journal by journal (sorted by name),
    in each one's append order, each with its journal's shard key as "_shard"."""
    lines = []
    for p in sorted(journal_dir(out).glob("*.jsonl")):
        for line in p.read_bytes().decode("utf-8", "surrogateescape").splitlines(keepends=True):
            if line.endswith("\n"):
                lines.append({**json.loads(line), "_shard": p.stem})
    return lines


def journal_lines(out: Path) -> int:
    journal = journal_dir(out)
    n = 0
    for p in journal.glob("*.jsonl") if journal.is_dir() else ():
        try:
            n += p.read_bytes().count(b"\n")
        except FileNotFoundError:
            pass
    return n


def wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 180) -> None:
    """Poll `condition()` while `proc` runs; fail if it ends first or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if proc.poll() is not None:
            stdout, stderr = proc.communicate()
            pytest.fail(f"the run ended (exit {proc.returncode}) before {what}\n{stdout}\n{stderr}")
        time.sleep(0.05)
    kill_group(proc)
    pytest.fail(f"timed out waiting for {what}")


def kill_after_a_journal_line(proc: subprocess.Popen, out: Path, inputs: int) -> int:
    """kill -9 the command and its workers once a first record is journaled; returns how
    many records were, checking that the run was killed half-way."""
    wait_for(lambda: journal_lines(out) >= 1, proc, "a journal line was written")
    kill_group(proc)
    assert proc.returncode == -signal.SIGKILL
    done = journal_lines(out)
    assert 1 <= done < inputs, "the run was not killed half-way"
    return done


# --- reading what a run left ---------------------------------------------------------------------

def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_bytes().decode("utf-8", "surrogateescape").splitlines()]


def records(out: Path) -> list[dict]:
    return read_jsonl(out / "faces.jsonl")


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


JOURNALS = os.path.join(".align_dataset", "journal")


def snapshot(out: Path, ignore_summary_keys=()) -> dict:
    """{relative path: content} of every file and folder under `out`: bytes for files, the
    parsed summary.json less its timings (and `ignore_summary_keys`); the lock is left out, and
    report.html counts as present or not (its pictures are compared byte for byte).
    The journals count as one entry, their lines sorted: how a run cuts its shards (and so
    names its journals) depends on --workers and --random_order, what they record must not."""
    tree = {JOURNALS + "/*": []}
    for dirpath, dirnames, filenames in os.walk(out):
        for name in dirnames:
            tree[os.path.relpath(os.path.join(dirpath, name), out) + "/"] = None
        for name in filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, out)
            if rel == os.path.join(".align_dataset", "lock"):
                continue
            if rel == "report.html":    # shows the timings: its presence is compared, not its bytes
                tree[rel] = "report"
                continue
            data = Path(path).read_bytes()
            if os.path.dirname(rel) == JOURNALS:
                tree[JOURNALS + "/*"] = sorted(tree[JOURNALS + "/*"] + data.splitlines())
                continue
            if rel == "summary.json":
                s = json.loads(data)
                for key in (*TIMING_KEYS, "workers", *ignore_summary_keys):
                    assert key in s, f"summary.json lacks {key!r}"
                    s.pop(key)
                data = s
            tree[rel] = data
    return tree


TOP_FILES = {"faces.jsonl", "bounding_boxes.txt", "summary.json", "report.html"}


def assert_training_set(out: Path) -> None:
    """What a finished run leaves: at the top, the records as plain files and folders that
    each hold files only (the identities with at least one thumbnail), nothing hidden."""
    top = {p.name: p for p in out.iterdir()}
    assert {n for n, p in top.items() if not p.is_dir()} <= TOP_FILES, sorted(top)
    assert not [n for n in top if n.startswith(".")], f"hidden entries in {out}: {sorted(top)}"
    for name, path in top.items():
        if path.is_dir():
            inside = list(path.iterdir())
            assert inside, f"{path} is an empty identity folder"
            assert all(p.is_file() and not p.name.startswith(".") for p in inside), inside


def as_killed_before_any_record(out: Path) -> None:
    """Turn a finished OUTPUT_DIR into what a run killed before its first journal line leaves
    (its state folder, options and all, and no records), the thumbnails kept."""
    s = summary(out)
    state = out / ".align_dataset"
    (state / "journal").mkdir(parents=True)
    (state / "options.json").write_text(json.dumps(s["options"]))
    if s["legacy_outputs"]:
        (state / "legacy_outputs").touch()
    for name in TOP_FILES:
        (out / name).unlink(missing_ok=True)


def assert_same_tree(a: Path, b: Path, ignore_summary_keys=()) -> None:
    for finished in (a, b):
        assert_training_set(finished)
    ta, tb = snapshot(a, ignore_summary_keys), snapshot(b, ignore_summary_keys)
    assert sorted(ta) == sorted(tb), (f"only in {a}: {sorted(set(ta) - set(tb))}; "
                                      f"only in {b}: {sorted(set(tb) - set(ta))}")
    differ = sorted(k for k in ta if ta[k] != tb[k])
    detail = ""
    if differ and isinstance(ta[differ[0]], bytes) and differ[0].endswith((".jsonl", ".txt", ".json")):
        la, lb = ta[differ[0]].splitlines(), tb[differ[0]].splitlines()
        first = next((i for i, (x, y) in enumerate(zip(la, lb)) if x != y), min(len(la), len(lb)))
        detail = (f"\nfirst difference in {differ[0]}, line {first + 1}:\n"
                  f"{la[first] if first < len(la) else '<none>'}\n{lb[first] if first < len(lb) else '<none>'}")
    elif differ and differ[0] == "summary.json":
        detail = f"\n{ta['summary.json']}\n{tb['summary.json']}"
    assert not differ, f"files that differ between {a} and {b}: {differ}{detail}"


def png_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.format == "PNG", path
        assert im.mode == "RGB", (path, im.mode)
        return np.asarray(im)


def facenet_crop(image_path: Path, box, margin: int, size: int) -> tuple[list[int], np.ndarray]:
    """facenet's align_dataset_mtcnn.py recipe for one face box: (crop box, thumbnail)."""
    with Image.open(image_path) as im:
        img = np.asarray(im.convert("RGB"))
    h, w = img.shape[:2]
    bb = np.zeros(4, dtype=np.int32)
    bb[0] = np.maximum(box[0] - margin / 2, 0)
    bb[1] = np.maximum(box[1] - margin / 2, 0)
    bb[2] = np.minimum(box[2] + margin / 2, w)
    bb[3] = np.minimum(box[3] + margin / 2, h)
    cropped = img[bb[1]:bb[3], bb[0]:bb[2], :]
    scaled = np.asarray(Image.fromarray(cropped).resize((size, size), Image.BILINEAR))
    return [int(v) for v in bb], scaled


def facenet_choice(boxes, width: int, height: int) -> int:
    """facenet's single face: the largest, with some extra weight on the centering."""
    b = np.asarray(boxes, dtype=np.float64)
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    offsets = np.vstack([(b[:, 0] + b[:, 2]) / 2 - width / 2, (b[:, 1] + b[:, 3]) / 2 - height / 2])
    return int(np.argmax(area - np.sum(np.power(offsets, 2.0), 0) * 2.0))


def bbox_lines(out: Path) -> list[str]:
    return (out / "bounding_boxes.txt").read_bytes().decode("utf-8", "surrogateescape").splitlines()


def one_error_line(p: subprocess.CompletedProcess) -> str:
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:"), describe(p)
    return lines[0]


# --- inputs --------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def sample_dir(tmp_path_factory) -> Path:
    """The three sample photos as <person>/<file> (fetched once, then cached)."""
    sys.path.insert(0, str(REPO / "data"))
    try:
        import samples
    finally:
        sys.path.remove(str(REPO / "data"))
    root = samples.build(tmp_path_factory.mktemp("samples") / "in")
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*.*")) == SAMPLE_FILES
    return root


def sample(sample_dir: Path, name: str) -> Path:
    return next(sample_dir.glob(f"*/{name}"))


@pytest.fixture(scope="module")
def big_dir(sample_dir, tmp_path_factory) -> Path:
    """~45 images in 6 identities (one of them two detection batches long): copies of the
    samples, and a few LFW photos when ../shared has them. Takes ~20 s to align."""
    root = tmp_path_factory.mktemp("big") / "in"
    photos = [sample_dir / f for f in SAMPLE_FILES]
    counts = {"Alpha": 20, "Bravo": 6, "Charlie": 6, "Delta": 5, "Echo": 4, "Foxtrot": 3}
    k = 0
    for identity, n in counts.items():
        (root / identity).mkdir(parents=True)
        for i in range(n):
            src = photos[k % len(photos)]
            k += 1
            shutil.copyfile(src, root / identity / f"{identity.lower()}_{i:02d}{src.suffix}")
    if LFW_GWB.is_dir():
        lfw = sorted(p for p in LFW_GWB.rglob("*.jpg") if p.is_file())[:6]
        if lfw:
            (root / "George_W_Bush").mkdir()
            for p in lfw:
                shutil.copyfile(p, root / "George_W_Bush" / p.name)
    return root


def n_inputs(root: Path) -> int:
    return sum(1 for d in root.iterdir() if d.is_dir() for f in d.iterdir())


@pytest.fixture(scope="module")
def reference_run(big_dir, tmp_path_factory) -> Path:
    """An uninterrupted run on big_dir: 1 worker, output 'out' relative to its own cwd."""
    cwd = tmp_path_factory.mktemp("reference")
    ok(run_align(big_dir, "out", "--workers", 1, "--quiet", cwd=cwd))
    return cwd / "out"


# --- 1. a default run on the samples -------------------------------------------------------------

@pytest.fixture(scope="module")
def default_run(sample_dir, tmp_path_factory):
    cwd = tmp_path_factory.mktemp("default")
    p = run_align(sample_dir, "out", "--workers", 1, "--image_size", 160, cwd=cwd)
    return p, cwd / "out"


def test_default_run_writes_three_thumbnails(default_run):
    p, out = default_run
    ok(p)
    assert "3 images: 3 aligned" in p.stdout, p.stdout
    for rel in ["Eileen_Collins/astronaut.png", "Grace_Hopper/grace_hopper.png", "Group/t1.png"]:
        assert png_rgb(out / rel).shape == (160, 160, 3), rel
    thumbnails = sorted(p.relative_to(out).as_posix() for p in out.glob("*/*") if p.parent.name != ".align_dataset")
    assert thumbnails == ["Eileen_Collins/astronaut.png", "Grace_Hopper/grace_hopper.png", "Group/t1.png"]
    assert not list(out.rglob(".*.tmp"))


def test_default_run_records(default_run, sample_dir):
    _, out = default_run
    recs = records(out)
    assert [r["input"] for r in recs] == SAMPLE_FILES
    assert [r["status"] for r in recs] == ["aligned"] * 3
    for r in recs:
        assert r["reason"] is None
        assert set(r) >= {"input", "status", "reason", "size", "output", "faces", "written"}
        with Image.open(sample_dir / r["input"]) as im:
            assert r["size"] == list(im.size)
        assert len(r["written"]) == 1
        for f in r["faces"]:
            assert len(f["box"]) == 4 and len(f["landmarks"]) == 5 and 0.7 < f["score"] <= 1
            x1, y1, x2, y2 = f["box"]
            assert x1 < x2 and y1 < y2
            # the landmarks of a face lie in (or next to) its box
            for x, y in f["landmarks"]:
                assert x1 - 5 <= x <= x2 + 5 and y1 - 5 <= y <= y2 + 5, (r["input"], f)
    by_input = {r["input"]: r for r in recs}
    assert len(by_input["Eileen_Collins/astronaut.png"]["faces"]) == 1
    assert len(by_input["Grace_Hopper/grace_hopper.jpg"]["faces"]) == 1
    group = by_input["Group/t1.jpg"]
    assert len(group["faces"]) == 6
    chosen = facenet_choice([f["box"] for f in group["faces"]], *group["size"])
    assert group["written"][0]["face"] == chosen
    assert [w["output"] for r in recs for w in r["written"]] == \
        ["Eileen_Collins/astronaut.png", "Grace_Hopper/grace_hopper.png", "Group/t1.png"]


def test_default_run_thumbnails_are_facenets_crops(default_run, sample_dir):
    _, out = default_run
    for r in records(out):
        (w,) = r["written"]
        box = r["faces"][w["face"]]["box"]
        bb, expected = facenet_crop(sample_dir / r["input"], box, margin=44, size=160)
        assert w["crop_box"] == bb, r["input"]
        actual = png_rgb(out / w["output"])
        assert np.array_equal(actual, expected), \
            f"{w['output']}: {np.count_nonzero(actual != expected)} values differ from facenet's crop"


def test_default_run_bounding_boxes_txt(default_run):
    _, out = default_run
    lines = bbox_lines(out)
    expected = [f"out/{w['output']} {' '.join(str(v) for v in w['crop_box'])}"
                for r in records(out) for w in r["written"]]
    assert lines == expected
    assert len(lines) == 3
    for line in lines:
        path, *box = line.split(" ")
        assert len(box) == 4 and all(v.lstrip("-").isdigit() for v in box), line
        assert (out.parent / path).is_file(), line


def test_default_run_summary_and_state(default_run, sample_dir):
    _, out = default_run
    s = summary(out)
    assert (s["images"], s["aligned"], s["faces_written"]) == (3, 3, 3)
    assert (s["no_face"], s["unreadable"], s["skipped"]) == (0, 0, 0)
    assert s["output_dir"] == "out" and s["input_dir"] == str(sample_dir)
    assert s["workers"] == 1 and s["processed_this_run"] == 3
    for key in TIMING_KEYS:
        assert key in s
    assert s["wall_s"] >= s["processing_s"] > 0
    options = s["options"]
    assert options["image_size"] == 160 and options["margin"] == 44
    assert options["detect_multiple_faces"] is False and options["format"] == "png"
    assert s["legacy_outputs"] is False
    assert not (out / ".align_dataset").exists(), "the finished run left its state folder"
    assert_training_set(out)


def test_rerun_of_a_finished_job_changes_nothing(default_run, sample_dir, tmp_path):
    _, default_out = default_run
    shutil.copytree(default_out, tmp_path / "out")
    p = ok(run_align(sample_dir, "out", "--workers", 1, "--image_size", 160, cwd=tmp_path))
    assert "nothing left to do" in p.stdout, p.stdout
    s = summary(tmp_path / "out")
    assert (s["processed_this_run"], s["workers"], s["images"], s["aligned"]) == (0, 0, 3, 3)
    assert_same_tree(default_out, tmp_path / "out", ignore_summary_keys=["processed_this_run"])


# --- 2. the output does not depend on workers or order ------------------------------------------

def test_workers_and_random_order_give_the_same_bytes(big_dir, reference_run, tmp_path):
    """--workers 3 --random_order, killed once records are journaled: the journals so far
    hold shards that are not runs of the input order; the rerun ends with the bytes of one
    worker in input order."""
    (tmp_path / "b").mkdir()
    args = (big_dir, "out", "--workers", 3, "--random_order", "--quiet")
    out = tmp_path / "b" / "out"
    kill_after_a_journal_line(start_align(*args, cwd=tmp_path / "b"), out, n_inputs(big_dir))
    position = {r["input"]: i for i, r in enumerate(records(reference_run))}
    shards: dict[str, list[int]] = {}
    for r in journal_records(out):
        shards.setdefault(r["_shard"], []).append(position[r["input"]])
    assert any(done != list(range(done[0], done[0] + len(done))) for done in shards.values()), \
        f"every shard ran a run of the input order: {shards}"
    ok(run_align(*args, cwd=tmp_path / "b"))
    assert summary(out)["workers"] >= 2 and summary(reference_run)["workers"] == 1
    assert summary(out)["images"] == n_inputs(big_dir)
    assert_same_tree(reference_run, out, ignore_summary_keys=["processed_this_run"])


def test_the_readmes_margin_example_is_facenets_crop_at_that_margin(sample_dir, default_run, tmp_path):
    """`align_dataset sample sample_aligned_160 --image_size 160 --margin 32 --random_order`:
    facenet's crop box and thumbnail at margin 32 (not the default run's 44)."""
    ok(run_align(sample_dir, "sample_aligned_160", "--image_size", 160, "--margin", 32, "--random_order",
                 cwd=tmp_path))
    out = tmp_path / "sample_aligned_160"
    recs = records(out)
    assert [r["status"] for r in recs] == ["aligned"] * 3
    at_44 = {r["input"]: r["written"][0]["crop_box"] for r in records(default_run[1])}
    for r in recs:
        (w,) = r["written"]
        bb, expected = facenet_crop(sample_dir / r["input"], r["faces"][w["face"]]["box"], margin=32, size=160)
        assert w["crop_box"] == bb != at_44[r["input"]], r["input"]
        assert np.array_equal(png_rgb(out / w["output"]), expected), w["output"]
    assert bbox_lines(out) == [f"sample_aligned_160/{r['written'][0]['output']} "
                               f"{' '.join(map(str, r['written'][0]['crop_box']))}" for r in recs]


def test_format_jpg_end_to_end(sample_dir, tmp_path):
    """--format jpg: JPEG thumbnails named .jpg in the records and bounding_boxes.txt, which
    decode to facenet's crop (less the JPEG loss); no PNG is written."""
    ok(run_align(sample_dir, "out", "--format", "jpg", "--workers", 1, "--quiet", cwd=tmp_path))
    out = tmp_path / "out"
    recs = records(out)
    assert [w["output"] for r in recs for w in r["written"]] == \
        ["Eileen_Collins/astronaut.jpg", "Grace_Hopper/grace_hopper.jpg", "Group/t1.jpg"]
    assert [r["output"] for r in recs] == [w["output"] for r in recs for w in r["written"]]
    assert [line.split(" ")[0] for line in bbox_lines(out)] == [f"out/{r['output']}" for r in recs]
    thumbnails = sorted(p.relative_to(out).as_posix() for p in out.glob("*/*") if p.parent.name != ".align_dataset")
    assert thumbnails == sorted(r["output"] for r in recs)
    for r in recs:
        (w,) = r["written"]
        assert (out / w["output"]).read_bytes()[:3] == b"\xff\xd8\xff"
        with Image.open(out / w["output"]) as im:
            assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (182, 182))
            got = np.asarray(im).astype(np.int16)
        _, expected = facenet_crop(sample_dir / r["input"], r["faces"][w["face"]]["box"], margin=44, size=182)
        assert np.abs(got - expected).mean() < 2, (w["output"], np.abs(got - expected).mean())


# --- 3. kill -9 and rerun ------------------------------------------------------------------------

def test_killed_run_resumes_to_the_same_bytes(big_dir, reference_run, tmp_path):
    args = (big_dir, "out", "--workers", 2, "--quiet")
    proc = start_align(*args, cwd=tmp_path)
    out = tmp_path / "out"
    done = kill_after_a_journal_line(proc, out, n_inputs(big_dir))
    assert not (out / "faces.jsonl").exists()

    again = ok(run_align(*args, cwd=tmp_path))
    s = summary(out)
    assert s["images"] == n_inputs(big_dir)
    assert s["processed_this_run"] <= n_inputs(big_dir) - done, (s, done)
    assert not list(out.rglob(".*.tmp")), "temporary files left behind"
    assert_same_tree(reference_run, out, ignore_summary_keys=["processed_this_run"])
    assert "Traceback" not in again.stderr, again.stderr


def test_a_journal_lost_mid_run_is_one_error_line_and_the_rerun_completes(big_dir, reference_run, tmp_path):
    """A shard's journal removed while the run goes on (as a worker writing where the others
    cannot see would lose it): the inputs it held have no record, so the run ends with one
    Error: line and writes no faces.jsonl; the rerun aligns them again, to the same tree."""
    args = (big_dir, "out", "--workers", 2, "--quiet")
    proc = start_align(*args, cwd=tmp_path)
    out = tmp_path / "out"

    def remove_a_written_journal() -> bool:
        for p in journal_dir(out).glob("*.jsonl") if journal_dir(out).is_dir() else ():
            with contextlib.suppress(FileNotFoundError):
                if p.read_bytes().count(b"\n"):
                    p.unlink()
                    return True
        return False
    wait_for(remove_a_written_journal, proc, "a journal line was written")
    stdout, stderr = proc.communicate(timeout=300)
    failed = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    assert failed.returncode == 1, describe(failed)
    line = one_error_line(failed)
    assert "has no record" in line and "rerun" in line, line
    assert not (out / "faces.jsonl").exists()

    ok(run_align(*args, cwd=tmp_path))
    assert_same_tree(reference_run, out, ignore_summary_keys=["processed_this_run"])


# --- 4. Ctrl-C -----------------------------------------------------------------------------------

def test_sigint_exits_130_and_the_rerun_completes(big_dir, reference_run, tmp_path):
    args = (big_dir, "out", "--workers", 2)
    proc = start_align(*args, cwd=tmp_path)
    out = tmp_path / "out"
    wait_for(lambda: journal_lines(out) >= 1, proc, "a journal line was written")
    os.killpg(proc.pid, signal.SIGINT)
    t0 = time.monotonic()
    try:
        stdout, stderr = proc.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        pytest.fail("the run did not stop within 15 s of SIGINT")
    assert time.monotonic() - t0 < 10
    assert proc.returncode == 130, f"exit {proc.returncode}\n{stdout}\n{stderr}"
    assert "resume" in stderr, stderr
    assert "Traceback" not in stderr, stderr
    # no worker outlives the command (zombies waiting for init to reap them do not count)
    deadline = time.monotonic() + 5
    while live_group_members(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not live_group_members(proc.pid), "processes of the run are still running"

    ok(run_align(*args, "--quiet", cwd=tmp_path))
    recs = records(out)
    assert len(recs) == n_inputs(big_dir)
    assert len({r["input"] for r in recs}) == len(recs)
    assert all(r["status"] == "aligned" for r in recs)
    assert_same_tree(reference_run, out, ignore_summary_keys=["processed_this_run"])


# --- 5, 6. awkward inputs ------------------------------------------------------------------------

def patched_png_header(data: bytes, width: int, height: int) -> bytes:
    """A PNG with IHDR's width and height replaced and its CRC fixed."""
    assert data[12:16] == b"IHDR"
    ihdr = struct.pack(">II", width, height) + data[24:29]
    chunk = b"IHDR" + ihdr
    return data[:8] + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk)) + data[33:]


NON_UTF8 = os.fsdecode(b"caf\xe9.jpg")
DECODABLE = ["webp.jpg", "gray_alpha.png", "cmyk.jpg", "sixteen_bit.png", "one_pixel.png", NON_UTF8]


def fingerprint(root: Path) -> dict:
    """Every entry under root (bytes paths, symlinks not followed): kind, mode, size, mtime,
    content hash."""
    out = {}
    broot = os.fsencode(root)
    for dirpath, dirnames, filenames in os.walk(broot):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            rel = os.path.relpath(path, broot)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", st.st_mode, st.st_mtime_ns)
            else:
                try:
                    with open(path, "rb") as f:
                        digest = hashlib.sha256(f.read()).hexdigest()
                except PermissionError:
                    digest = None
                out[rel] = ("file", st.st_mode, st.st_size, st.st_mtime_ns, digest)
    return out


@pytest.fixture(scope="module")
def awkward(sample_dir, tmp_path_factory):
    """One run over a folder of awkward files ('bad'), a good identity, and same-stem files."""
    root = tmp_path_factory.mktemp("awkward")
    src = root / "in"
    bad, good, stems = src / "bad", src / "good", src / "stems"
    for d in (bad, good, stems):
        d.mkdir(parents=True)
    astronaut, hopper = sample(sample_dir, "astronaut.png"), sample(sample_dir, "grace_hopper.jpg")
    shutil.copyfile(astronaut, good / "astronaut.png")

    (bad / "empty.jpg").write_bytes(b"")
    jpeg = hopper.read_bytes()
    (bad / "truncated.jpg").write_bytes(jpeg[:len(jpeg) // 2])
    (bad / "text.jpg").write_text("these are not the pixels you are looking for\n")
    with Image.open(astronaut) as im:
        im.convert("RGB").save(bad / "webp.jpg", format="WEBP", quality=90)
        im.convert("LA").save(bad / "gray_alpha.png")
        gray16 = np.asarray(im.convert("L")).astype(np.uint16) * 257
    with Image.open(hopper) as im:
        im.convert("CMYK").save(bad / "cmyk.jpg", format="JPEG", quality=90)
    Image.fromarray(gray16).save(bad / "sixteen_bit.png")
    Image.new("RGB", (1, 1), (200, 150, 120)).save(bad / "one_pixel.png")
    buf = root / "small.png"
    Image.new("RGB", (8, 8), (10, 20, 30)).save(buf)
    (bad / "huge_header.png").write_bytes(patched_png_header(buf.read_bytes(), 100000, 100000))
    shutil.copyfile(hopper, bad / "no_permission.jpg")
    os.chmod(bad / "no_permission.jpg", 0)
    shutil.copyfile(hopper, bad / NON_UTF8)
    # a symlink loop, in a folder of its own beside a good photo (see test_symlink_loop)
    (src / "links").mkdir()
    os.symlink("loop.jpg", src / "links" / "loop.jpg")
    shutil.copyfile(hopper, src / "links" / "hopper.jpg")

    shutil.copyfile(hopper, stems / "a.jpg")
    shutil.copyfile(astronaut, stems / "a.png")
    shutil.copyfile(hopper, stems / "b.jpg")
    (src / "README.txt").write_text("not an identity folder\n")

    with Image.open(bad / "gray_alpha.png") as im:
        assert im.mode == "LA"
    with Image.open(bad / "sixteen_bit.png") as im:
        assert im.mode.startswith("I;16") or im.mode == "I", im.mode
    with Image.open(bad / "cmyk.jpg") as im:
        assert im.mode == "CMYK"
    with Image.open(bad / "webp.jpg") as im:
        assert im.format == "WEBP"

    before = fingerprint(src)
    p = run_align(src, root / "out", "--workers", 1, "--image_size", 160)
    after = fingerprint(src)
    os.chmod(bad / "no_permission.jpg", 0o644)
    return p, src, root / "out", before, after


def test_awkward_inputs_run_completes(awkward):
    p, src, out, _, _ = awkward
    ok(p)
    s = summary(out)
    assert "README.txt" in s["skipped_entries"]
    assert not {"bad", "good", "stems"} & set(s["skipped_entries"])
    recs = records(out)
    assert len(recs) == s["images"]
    good = [r for r in recs if r["input"] == "good/astronaut.png"]
    assert len(good) == 1 and good[0]["status"] == "aligned"
    assert png_rgb(out / "good" / "astronaut.png").shape == (160, 160, 3)


def test_every_awkward_file_gets_one_record(awkward):
    _, src, out, _, _ = awkward
    recs = records(out)
    inputs = [r["input"] for r in recs]
    expected = sorted(f"bad/{os.fsdecode(n)}" for n in os.listdir(os.fsencode(src / "bad")))
    assert len(expected) == 11
    missing = [e for e in expected if e not in inputs]
    assert not missing, f"no record for {missing}"
    assert len(inputs) == len(set(inputs)), "a file has more than one record"
    for r in recs:
        assert r["status"] in STATUSES, r
        if r["status"] in ("unreadable", "not_an_image"):
            assert isinstance(r["reason"], str) and r["reason"].strip(), r
            assert "\n" not in r["reason"]
            assert r["written"] == [] and r["size"] is None


def test_awkward_statuses(awkward):
    _, src, out, _, _ = awkward
    by_input = {r["input"]: r for r in records(out)}
    status = lambda name: by_input[f"bad/{name}"]["status"]
    reason = lambda name: by_input[f"bad/{name}"]["reason"] or ""
    assert status("empty.jpg") in ("unreadable", "not_an_image")
    assert status("text.jpg") == "not_an_image"
    assert status("truncated.jpg") == "unreadable" and "truncated" in reason("truncated.jpg")
    assert status("huge_header.png") == "unreadable"
    assert "decompression bomb" in reason("huge_header.png")
    if os.geteuid() == 0:   # root reads a mode-000 file
        assert status("no_permission.jpg") in ("aligned", "error")
    else:   # the file system's state, not the file's: retried by the next run
        assert status("no_permission.jpg") == "error"
        assert "permission" in reason("no_permission.jpg")
    for name in DECODABLE:
        r = by_input[f"bad/{name}"]
        assert r["status"] in ("aligned", "no_face"), r
        assert r["reason"] is None or r["status"] == "no_face"
    with Image.open(src / "good" / "astronaut.png") as im:
        size = list(im.size)
    for name in ["webp.jpg", "gray_alpha.png", "sixteen_bit.png"]:
        assert by_input[f"bad/{name}"]["size"] == size
        assert by_input[f"bad/{name}"]["status"] == "aligned"   # the astronaut's face is plain
    one = by_input["bad/one_pixel.png"]
    assert (one["status"], one["size"], one["faces"], one["written"]) == ("no_face", [1, 1], [], [])
    for name in ["cmyk.jpg", NON_UTF8]:
        assert by_input[f"bad/{name}"]["status"] == "aligned"


def test_awkward_bounding_boxes_and_outputs(awkward):
    _, src, out, _, _ = awkward
    recs = records(out)
    raw = (out / "bounding_boxes.txt").read_bytes()
    lines = raw.splitlines()
    n_expected = sum(len(r["written"]) if r["status"] == "aligned" else r["status"] == "no_face"
                     for r in recs)
    assert len(lines) == n_expected
    cafe = next(r for r in recs if r["input"] == f"bad/{NON_UTF8}")
    if cafe["status"] in ("aligned", "no_face"):
        assert os.fsencode(out) + b"/bad/caf\xe9.png" in raw
    if cafe["status"] == "aligned":
        assert (out / "bad" / os.fsdecode(b"caf\xe9.png")).is_file()
    for r in recs:
        for w in r["written"]:
            assert png_rgb(out / w["output"]).shape == (160, 160, 3)
    assert f"{out}/bad/one_pixel.png".encode() in lines    # a no-face image: its path alone


def test_symlink_loop(awkward):
    """A symlink loop is one unreadable input; the photos beside it are aligned as usual."""
    _, _, out, _, _ = awkward
    s = summary(out)
    assert s["skipped_entries"] == ["README.txt"]
    by_input = {r["input"]: r for r in records(out)}
    assert by_input["links/hopper.jpg"]["status"] == "aligned"
    loop = by_input["links/loop.jpg"]
    assert loop["status"] == "unreadable" and loop["reason"], loop
    assert loop["written"] == []


def test_awkward_input_folder_is_untouched(awkward):
    _, _, _, before, after = awkward
    assert sorted(before) == sorted(after)
    changed = [k for k in before if before[k] != after[k]]
    assert not changed, changed


def test_same_stem_inputs_keep_their_whole_names(awkward):
    _, src, out, _, _ = awkward
    a_jpg, a_png, b = out / "stems" / "a.jpg.png", out / "stems" / "a.png.png", out / "stems" / "b.png"
    for p in (a_jpg, a_png, b):
        assert png_rgb(p).shape == (160, 160, 3)
    assert a_jpg.read_bytes() != a_png.read_bytes()
    assert not (out / "stems" / "a.png").exists()
    assert sorted(p.name for p in (out / "stems").iterdir()) == ["a.jpg.png", "a.png.png", "b.png"]
    by_input = {r["input"]: r for r in records(out)}
    assert by_input["stems/a.jpg"]["written"][0]["output"] == "stems/a.jpg.png"
    assert by_input["stems/a.png"]["written"][0]["output"] == "stems/a.png.png"
    assert by_input["stems/b.jpg"]["written"][0]["output"] == "stems/b.png"
    # the same photo, the same thumbnail, whatever its output name
    assert a_jpg.read_bytes() == b.read_bytes()


# --- 7. --detect_multiple_faces ------------------------------------------------------------------

def test_detect_multiple_faces(sample_dir, default_run, tmp_path):
    src = tmp_path / "in" / "Group"
    src.mkdir(parents=True)
    shutil.copyfile(sample(sample_dir, "t1.jpg"), src / "t1.jpg")
    out = tmp_path / "out"
    ok(run_align(tmp_path / "in", out, "--detect_multiple_faces", "--workers", 1, "--image_size", 160, "--quiet"))
    assert sorted(p.name for p in (out / "Group").iterdir()) == [f"t1_{i}.png" for i in range(6)]
    lines = bbox_lines(out)
    assert len(lines) == 6
    (r,) = records(out)
    assert [w["face"] for w in r["written"]] == list(range(6))
    assert lines == [f"{out}/Group/t1_{i}.png {' '.join(map(str, w['crop_box']))}"
                     for i, w in enumerate(r["written"])]
    for i, w in enumerate(r["written"]):
        bb, expected = facenet_crop(src / "t1.jpg", r["faces"][i]["box"], 44, 160)
        assert w["crop_box"] == bb
        assert np.array_equal(png_rgb(out / "Group" / f"t1_{i}.png"), expected)
    assert summary(out)["faces_written"] == 6
    # the face a single-face run wrote is one of these, byte for byte
    _, default_out = default_run
    chosen = next(x for x in records(default_out) if x["input"] == "Group/t1.jpg")["written"][0]["face"]
    assert (out / "Group" / f"t1_{chosen}.png").read_bytes() == (default_out / "Group" / "t1.png").read_bytes()
    # --overwrite starts over: the thumbnails of the earlier options go with their records
    ok(run_align(tmp_path / "in", out, "--workers", 1, "--image_size", 160, "--overwrite", "--quiet"))
    assert sorted(p.name for p in (out / "Group").iterdir()) == ["t1.png"]
    assert (out / "Group" / "t1.png").read_bytes() == (default_out / "Group" / "t1.png").read_bytes()


def test_detect_multiple_faces_false_is_the_default(sample_dir, default_run, tmp_path):
    _, default_out = default_run
    ok(run_align(sample_dir, "out", "--detect_multiple_faces", "False", "--workers", 1,
                 "--image_size", 160, cwd=tmp_path))
    assert (tmp_path / "out" / "Group" / "t1.png").is_file()
    assert not list((tmp_path / "out" / "Group").glob("t1_*"))
    assert_same_tree(default_out, tmp_path / "out")


# --- 8. usage errors -----------------------------------------------------------------------------

def test_output_inside_input_is_a_usage_error(sample_dir):
    p = run_align(sample_dir, sample_dir / "aligned", timeout=60)
    assert p.returncode == 2, describe(p)
    assert "inside" in one_error_line(p)
    assert not (sample_dir / "aligned").exists()


@pytest.mark.parametrize("args, word", [(["--thresholds", "1,2"], "--thresholds"),
                                        (["--thresholds", "0.6,0.7,1.5"], "--thresholds"),
                                        (["--format", "gif"], "--format"),
                                        (["--image_size", "0"], "--image_size"),
                                        (["--workers", "0"], "--workers"),
                                        (["--image_size", "30000"], "image_size"),
                                        (["--min_face_size", "inf"], "minsize")])
def test_bad_option_is_a_usage_error(sample_dir, tmp_path, args, word):
    p = run_align(sample_dir, tmp_path / "out", *args, timeout=60)
    assert p.returncode == 2, describe(p)
    assert word in one_error_line(p)
    assert not (tmp_path / "out").exists()


def test_other_options_on_an_existing_output(default_run, sample_dir, tmp_path):
    _, default_out = default_run
    out = tmp_path / "out"
    shutil.copytree(default_out, out)
    before = snapshot(out)
    p = run_align(sample_dir, out, "--workers", 1, "--image_size", 182, timeout=60)
    assert p.returncode == 2, describe(p)
    line = one_error_line(p)
    assert "--overwrite" in line and "image_size" in line
    assert snapshot(out) == before, "a refused run changed the output"

    ok(run_align(sample_dir, out, "--workers", 1, "--image_size", 182, "--overwrite", "--quiet"))
    assert summary(out)["options"]["image_size"] == 182
    for r in records(out):
        (w,) = r["written"]
        bb, expected = facenet_crop(sample_dir / r["input"], r["faces"][w["face"]]["box"], 44, 182)
        assert np.array_equal(png_rgb(out / w["output"]), expected)
    assert summary(out)["processed_this_run"] == 3


# --- 9. the lock ---------------------------------------------------------------------------------

def test_second_run_on_the_same_output_is_refused(big_dir, tmp_path):
    out = tmp_path / "out"
    first = start_align(big_dir, out, "--workers", 1, "--quiet")
    try:
        wait_for(lambda: (out / ".align_dataset" / "options.json").exists(), first,
                 "the first run took the lock")
        second = run_align(big_dir, out, "--workers", 1, "--quiet", timeout=60)
        assert first.poll() is None, "the first run ended before the second one tried"
    finally:
        kill_group(first)
    assert second.returncode == 1, describe(second)
    assert "another" in second.stderr and "writing" in second.stderr, second.stderr
    assert str(out) in second.stderr


# --- 10. --help ----------------------------------------------------------------------------------

def test_help_shows_the_defaults():
    p = ok(run_align("--help", timeout=60))
    text = " ".join(p.stdout.split())
    for expected in ["INPUT_DIR", "OUTPUT_DIR", "--image_size", "default: 182", "--margin", "default: 44",
                     "--detect_multiple_faces", "--random_order", "--workers", "--format",
                     "--overwrite", "--thresholds", "default: 0.6,0.7,0.7", "default: 0.709"]:
        assert expected in text, expected


# --- 11. against facenet's own output on the dev set ---------------------------------------------

def test_dev_set_aligned_like_facenet(dev_run):
    """On every dev photo, what facenet's align_dataset_mtcnn.py did (the reference's `align`,
    margin 44): the same number of faces, the same face chosen, the same crop box."""
    if not DEV_REFERENCE.is_file():
        pytest.skip(f"{DEV_REFERENCE} is not here")
    p, out = dev_run
    ok(p)
    reference = {r["path"]: r for r in read_jsonl(DEV_REFERENCE)}
    ours = {r["input"]: r for r in records(out)}
    assert set(reference) <= set(ours), sorted(set(reference) - set(ours))
    differ = []
    for path, ref in reference.items():
        r = ours[path]
        chosen = ref.get("align", {}).get("selected", [])
        expected = [(face, bb) for face, bb in zip(chosen, ref.get("align", {}).get("bb", []))]
        got = [(w["face"], w["crop_box"]) for w in r["written"]]
        status = "aligned" if chosen else "no_face"
        if (r["status"], len(r["faces"]), got) != (status, ref["n_faces"], expected):
            differ.append(f"{path}: facenet {status}, {ref['n_faces']} faces, wrote {expected}; "
                          f"ours {r['status']}, {len(r['faces'])} faces, wrote {got}")
    aligned = sum(bool(r.get("align", {}).get("selected")) for r in reference.values())
    print(f"\ndev set: {len(reference) - len(differ)} of {len(reference)} photos as facenet aligned them "
          f"({aligned} with a face written)")
    assert aligned == 184
    assert not differ, "\n".join(differ)
    for r in ours.values():
        for w in r["written"]:
            assert (out / w["output"]).is_file()


def test_hostile_names_get_records_and_safe_outputs(sample_dir, tmp_path):
    """Names the file system or bounding_boxes.txt cannot hold get short safe output names
    (the record keeps the natural one) and are aligned; identities named like our records get
    escaped folders; a folder inside an identity gets a record. Nothing is left to retry."""
    src = tmp_path / "in"
    long_ok, lone, clash = "a" * 241 + ".jpg", "l" * 251 + ".jpg", "b" * 251
    inputs = [f"p/{long_ok}", f"p/{lone}", f"p/{clash}.jpg", f"p/{clash}.png", "p/short.jpg",
              "p/two\nlines.jpg", "faces.jsonl/x.jpg", "summary.json/x.jpg", ".align_dataset/x.jpg"]
    for rel in inputs:
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(sample(sample_dir, "grace_hopper.jpg"), src / rel)
    (src / "p" / "x.jpg").mkdir()
    out = tmp_path / "out"
    p = ok(run_align(src, out, "--workers", 1, "--image_size", 32))
    assert "Traceback" not in p.stderr
    by_input = {r["input"]: r for r in records(out)}
    assert sorted(by_input) == sorted(inputs + ["p/x.jpg"])
    folder = by_input["p/x.jpg"]
    assert folder["status"] == "not_an_image" and folder["reason"] == "is a directory"
    for rel in inputs:
        r = by_input[rel]
        assert r["status"] == "aligned", r
        (w,) = r["written"]
        assert (out / w["output"]).is_file()
        assert len(os.fsencode(Path(w["output"]).name)) <= 255
        assert "\n" not in w["output"]
    assert by_input[f"p/{long_ok}"]["written"][0]["output"] == f"p/{'a' * 241}.png"
    assert "natural_output" not in by_input[f"p/{long_ok}"]
    for rel, natural in [(f"p/{lone}", "p/" + "l" * 251 + ".png"), (f"p/{clash}.jpg", f"p/{clash}.jpg.png"),
                         ("p/two\nlines.jpg", "p/two\nlines.png"), ("faces.jsonl/x.jpg", "faces.jsonl/x.png")]:
        assert by_input[rel]["natural_output"] == natural
        assert by_input[rel]["written"][0]["output"] != natural
    outputs = [by_input[rel]["written"][0]["output"] for rel in inputs]
    assert len(set(outputs)) == len(outputs)
    assert by_input["faces.jsonl/x.jpg"]["written"][0]["output"].startswith("faces.jsonl~")
    assert (out / "faces.jsonl").is_file() and (out / "summary.json").is_file()
    lines = bbox_lines(out)
    assert len(lines) == len(inputs)
    assert sorted(line.rsplit(" ", 4)[0] for line in lines) == sorted(f"{out}/{o}" for o in outputs)
    s = summary(out)
    assert (s["errors"], s["aligned"], s["not_an_image"]) == (0, len(inputs), 1)
    # every output is as good as a plain one's: the same photo, the same bytes
    short = (out / by_input["p/short.jpg"]["written"][0]["output"]).read_bytes()
    assert all((out / o).read_bytes() == short for o in outputs)
    ok(run_align(src, out, "--workers", 1, "--image_size", 32, "--quiet"))
    assert summary(out)["processed_this_run"] == 0


def test_folder_aligned_by_facenet_stays_skipped_after_a_kill(sample_dir, tmp_path):
    """Thumbnails found at the first run (facenet's) are skipped by that run and by the rerun
    that resumes it after a kill; --overwrite redoes them."""
    src = tmp_path / "in" / "p"
    src.mkdir(parents=True)
    shutil.copyfile(sample(sample_dir, "grace_hopper.jpg"), src / "a.jpg")
    out = tmp_path / "out"
    (out / "p").mkdir(parents=True)
    (out / "p" / "a.png").write_bytes(b"facenet's thumbnail")
    ok(run_align(tmp_path / "in", out, "--workers", 1, "--quiet"))
    assert records(out)[0]["status"] == "skipped_existing"
    as_killed_before_any_record(out)
    ok(run_align(tmp_path / "in", out, "--workers", 1, "--quiet"))
    assert records(out)[0]["status"] == "skipped_existing"
    assert (out / "p" / "a.png").read_bytes() == b"facenet's thumbnail"
    ok(run_align(tmp_path / "in", out, "--workers", 1, "--quiet", "--overwrite"))
    assert records(out)[0]["status"] == "aligned"
    assert (out / "p" / "a.png").read_bytes().startswith(b"\x89PNG")


def test_corrupt_weights_are_one_clear_error(sample_dir, tmp_path):
    weights = tmp_path / "weights"
    weights.mkdir()
    from facenet_nets.weights import SHA256, weights_dir
    for name in SHA256:
        shutil.copyfile(weights_dir() / name, weights / name)
    with open(weights / "det3.npy", "r+b") as f:
        f.seek(1000)
        f.write(b"\0\0\0\0")
    env = {"ALIGN_WEIGHTS_DIR": str(weights)}
    p = run_align(sample_dir, tmp_path / "out", "--workers", 1, env=env)
    assert p.returncode == 1, p.stderr
    assert "det3.npy has sha256" in p.stderr and "refusing to unpickle" in p.stderr
    assert "Traceback" not in p.stderr


def test_workers_start_with_malloc_settings_and_the_caller_keeps_its_environment(monkeypatch):
    from align.engines.local import worker_malloc_env
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "12345")          # the user's own: kept
    show = "import os; print(os.environ['MALLOC_MMAP_THRESHOLD_'], os.environ['MALLOC_TRIM_THRESHOLD_'])"
    with worker_malloc_env():
        seen = subprocess.run([sys.executable, "-c", show], capture_output=True, text=True).stdout.split()
    assert seen == [str(1 << 32), "12345"]
    assert "MALLOC_MMAP_THRESHOLD_" not in os.environ
    assert os.environ["MALLOC_TRIM_THRESHOLD_"] == "12345"


def children_of(pid: int) -> list[int]:
    return [child for child, _, parent, _ in processes() if parent == pid]


@pytest.mark.parametrize("moment", ["first_worker_exists", "workers_starting", "first_journal_line"])
def test_no_process_outlives_a_killed_parent(big_dir, tmp_path, moment):
    """kill -9 of the command (not its group) at any moment of start-up or work: within 2 s
    none of its processes is left. A worker still starting Python when the parent died used to
    wait START_WAIT_S (300 s), holding its nets."""
    proc = start_align(big_dir, tmp_path / "out", "--workers", 2, "--quiet")
    try:
        if moment == "first_worker_exists":
            wait_for(lambda: children_of(proc.pid), proc, "a worker was started", timeout=60)
        elif moment == "workers_starting":
            wait_for(lambda: len(live_group_members(proc.pid)) >= 3, proc, "the workers were started", timeout=60)
            time.sleep(0.5)
        else:
            wait_for(lambda: journal_lines(tmp_path / "out") >= 1, proc, "a journal line was written")
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=30)
        deadline = time.monotonic() + 2
        while live_group_members(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        left = live_group_members(proc.pid)
    finally:
        kill_group(proc)
    assert not left, f"processes alive 2 s after the parent was killed {moment}: {left}"


# --- set-up failures and a full disk: one Error line, never a traceback ------------------------

def mount_tmpfs(where: Path, options: str) -> None:
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], check=True)


def remount(where: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(where)], check=True)


root_only = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("mount"),
                               reason="mounts a small tmpfs: needs root")


@pytest.fixture
def tmpfs(tmp_path):
    where = tmp_path / "fs"
    where.mkdir()
    yield where
    subprocess.run(["umount", "-l", str(where)], capture_output=True)


def test_output_dir_under_a_file_is_a_usage_error(sample_dir, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    p = run_align(sample_dir, tmp_path / "file" / "out", timeout=60)
    assert p.returncode == 2, describe(p)
    assert "is a file" in one_error_line(p)


def test_identity_folder_that_is_a_file_is_one_error_line(sample_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "Grace_Hopper").write_text("in the way")
    p = run_align(sample_dir, out, "--workers", 1, timeout=120)
    assert p.returncode == 1, describe(p)
    line = one_error_line(p)
    assert "Grace_Hopper" in line and "move it away" in line
    assert (out / "Grace_Hopper").read_text() == "in the way"


@root_only
def test_read_only_output_dir_is_one_error_line(default_run, sample_dir, tmpfs):
    """First run, and a rerun of a finished job, on a read-only file system."""
    mount_tmpfs(tmpfs, "size=4m,ro")
    p = run_align(sample_dir, tmpfs / "out", "--workers", 1, timeout=120)
    assert p.returncode == 1, describe(p)
    assert "Read-only file system" in one_error_line(p)
    remount(tmpfs, "rw")
    shutil.copytree(default_run[1], tmpfs / "out")
    remount(tmpfs, "ro")
    before = snapshot(tmpfs / "out")
    p = run_align(sample_dir, tmpfs / "out", "--workers", 1, "--image_size", 160, timeout=120)
    assert p.returncode == 1, describe(p)
    assert "must be writable" in one_error_line(p)
    assert snapshot(tmpfs / "out") == before


NOBODY = 65534
AS_NOBODY = ([shutil.which("setpriv"), f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
             if shutil.which("setpriv") else ["runuser", "-u", "nobody", "--"] if shutil.which("runuser") else None)


def python_for_nobody(cwd: Path, env: dict) -> str:
    """A Python of this version that nobody can start, and that can start itself again (the
    local engine spawns its workers with sys.executable), with this checkout and the venv's
    packages importable: the venv's own, else the system's (a venv made from an interpreter
    under a private home is not executable by others). Skips the test when there is none."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    tried = []
    for python in dict.fromkeys(filter(None, [sys.executable, shutil.which(version, path="/usr/local/bin:/usr/bin:/bin")])):
        check = ("import subprocess, sys; sys.exit(subprocess.run([sys.executable, '-c', "
                 "'import align.cli, cv2, tensorflow']).returncode)")
        p = subprocess.run([*AS_NOBODY, python, "-c", check], cwd=cwd, env=env, capture_output=True,
                           text=True, errors="replace", timeout=300)
        if p.returncode == 0:
            return python
        tried.append(f"{python}: {(p.stderr.strip().splitlines() or ['exit %d' % p.returncode])[-1]}")
    pytest.skip(f"no Python that user nobody can run with this checkout's packages ({'; '.join(tried)})")


@pytest.mark.skipif(os.geteuid() != 0 or AS_NOBODY is None,
                    reason="runs the command as user nobody: needs root and setpriv(1) or runuser(1)")
def test_permission_errors_as_an_unprivileged_user(sample_dir, weights, tmp_path_factory):
    """As nobody (root reads every file, so this is how the branch runs): a photo it may not
    read is an "error" record, aligned by the rerun once readable; an OUTPUT_DIR it may not
    write is one Error line."""
    import tempfile
    root = Path(tempfile.mkdtemp(prefix="align-nobody-"))      # /tmp/pytest-of-root is root's alone
    try:
        root.chmod(0o755)
        for name in ("home", "out"):
            (root / name).mkdir()
            os.chown(root / name, NOBODY, NOBODY)
        (root / "weights").mkdir()
        for name in ("det1.npy", "det2.npy", "det3.npy"):
            shutil.copyfile(Path(weights) / name, root / "weights" / name)
        (root / "in" / "Grace_Hopper").mkdir(parents=True)
        for name in ("readable.jpg", "locked.jpg"):
            shutil.copyfile(sample(sample_dir, "grace_hopper.jpg"), root / "in" / "Grace_Hopper" / name)
        (root / "in" / "Grace_Hopper" / "locked.jpg").chmod(0)
        (root / "root_out").mkdir()                               # root's, 0755

        env = {**cli_env(), "HOME": str(root / "home"), "ALIGN_WEIGHTS_DIR": str(root / "weights"),
               "PYTHONDONTWRITEBYTECODE": "1"}
        env["PYTHONPATH"] = os.pathsep.join([env["PYTHONPATH"], *site.getsitepackages()])
        python = python_for_nobody(root, env)

        def as_nobody(*args) -> subprocess.CompletedProcess:
            return subprocess.run([*AS_NOBODY, python, *align_cmd(*args)[1:]], cwd=root, env=env,
                                  capture_output=True, text=True, errors="replace", timeout=300)

        p = as_nobody("in", "out", "--workers", 1, "--quiet")
        ok(p)
        status = {r["input"]: (r["status"], r["reason"]) for r in records(root / "out")}
        assert status["Grace_Hopper/readable.jpg"] == ("aligned", None)
        assert status["Grace_Hopper/locked.jpg"][0] == "error"
        assert "permission denied" in status["Grace_Hopper/locked.jpg"][1].lower()
        assert summary(root / "out")["errors"] == 1
        (root / "in" / "Grace_Hopper" / "locked.jpg").chmod(0o644)
        ok(as_nobody("in", "out", "--workers", 1, "--quiet"))
        assert [r["status"] for r in records(root / "out")] == ["aligned", "aligned"]
        assert (summary(root / "out")["errors"], summary(root / "out")["processed_this_run"]) == (0, 1)

        p = as_nobody("in", "root_out", "--workers", 1)
        assert p.returncode == 1, describe(p)
        line = one_error_line(p)
        assert "Permission denied" in line and "must be writable" in line and "fix its permissions" in line, line
        assert list((root / "root_out").iterdir()) == []
    finally:
        shutil.rmtree(root)


@root_only
def test_a_disk_that_fills_up_mid_run_then_the_rerun_completes(big_dir, reference_run, tmpfs):
    mount_tmpfs(tmpfs, "size=600k")
    p = run_align(big_dir, "out", "--workers", 2, "--quiet", cwd=tmpfs)
    assert "Traceback" not in p.stderr, describe(p)
    if p.returncode != 0:
        assert p.returncode == 1 and "No space left" in one_error_line(p), describe(p)
        assert "free some space" in p.stderr
    else:
        assert summary(tmpfs / "out")["errors"] > 0, "the disk did not fill up"
    remount(tmpfs, "size=64m")
    ok(run_align(big_dir, "out", "--workers", 2, "--quiet", cwd=tmpfs))
    assert not list((tmpfs / "out").rglob(".*.tmp"))
    # the same tree, but for the journals' "error" lines of the first run (state, not output)
    ta, tb = (snapshot(o, ["processed_this_run"]) for o in (reference_run, tmpfs / "out"))
    errors = [line for line in tb.pop(JOURNALS + "/*") if b'"status": "error"' in line]
    assert errors or p.returncode == 1
    ta.pop(JOURNALS + "/*")
    assert sorted(ta) == sorted(tb)
    assert [k for k in ta if ta[k] != tb[k]] == []


def test_overwrite_after_a_killed_run_leaves_no_unjournaled_thumbnail(sample_dir, default_run, tmp_path):
    """A --detect_multiple_faces run killed after renaming t1_0..t1_5 into place, before
    journaling them; then --overwrite with the defaults: the tree is a clean run's."""
    ok(run_align(sample_dir, "out", "--detect_multiple_faces", "--workers", 1, "--image_size", 160,
                 "--quiet", cwd=tmp_path))
    out = tmp_path / "out"
    assert len(list((out / "Group").glob("t1_*.png"))) == 6
    as_killed_before_any_record(out)
    ok(run_align(sample_dir, "out", "--overwrite", "--workers", 1, "--image_size", 160, cwd=tmp_path))
    assert_same_tree(default_run[1], out)


# --- 12. --align arcface -------------------------------------------------------------------------

ARCFACE_CLASSES = ["Eileen_Collins", "Grace_Hopper", "Group"]


@pytest.fixture(scope="module")
def arcface_run(sample_dir, tmp_path_factory) -> Path:
    """The samples with --align arcface and every face (t1.jpg has six); defaults otherwise."""
    cwd = tmp_path_factory.mktemp("arcface")
    ok(run_align(sample_dir, "out", "--align", "arcface", "--detect_multiple_faces", "--workers", 1,
                 "--quiet", cwd=cwd))
    return cwd / "out"


def test_arcface_thumbnails_are_insightfaces_norm_crop(arcface_run, sample_dir):
    """Every written face: insightface 2.1's own estimate_norm and norm_crop (tests/
    insightface_reference.py) on the landmarks recorded, the very PNG written, and its records."""
    import insightface_reference as ref
    from align.imageio import decode_image
    from align.warp import footprint
    recs = records(arcface_run)
    assert [r["status"] for r in recs] == ["aligned"] * 3
    assert [len(r["written"]) for r in recs] == [1, 1, 6]
    for r in recs:
        image = decode_image(sample_dir / r["input"])
        for w in r["written"]:
            assert set(w) == {"face", "crop_box", "matrix", "template", "output"}
            assert w["template"] == "arcface"
            matrix, expected = ref.norm_crop(image, np.array(r["faces"][w["face"]]["landmarks"]), 112)
            assert np.abs(np.array(w["matrix"]) - matrix).max() <= 1e-5, w
            most, differing = ref.compare(png_rgb(arcface_run / w["output"]), expected)
            assert differing == 0, f"{w['output']}: {differing} values differ from norm_crop's, by up to {most}"
            assert w["crop_box"] == list(footprint(np.array(w["matrix"]), (112, 112), image.shape[:2]))
            # the face's landmarks lie in the part of the photo the thumbnail shows
            left, top, right, bottom = w["crop_box"]
            for x, y in r["faces"][w["face"]]["landmarks"]:
                assert left <= x < right and top <= y < bottom
    assert bbox_lines(arcface_run) == [f"out/{w['output']} {' '.join(map(str, w['crop_box']))}"
                                       for r in recs for w in r["written"]]
    options = summary(arcface_run)["options"]
    assert (options["align"], options["image_size"], options["margin"]) == ("arcface", 112, None)


def test_arcface_output_is_read_by_keras(arcface_run):
    """A trainer's loader: class folders -> (image, label) batches; the state folder is no class."""
    import tensorflow as tf
    ds = tf.keras.utils.image_dataset_from_directory(arcface_run, image_size=(112, 112), shuffle=False,
                                                     batch_size=4)
    assert ds.class_names == ARCFACE_CLASSES
    images, labels = zip(*((x.numpy(), y.numpy()) for x, y in ds.unbatch()))
    assert len(images) == 8 and list(labels) == [0, 1] + [2] * 6
    assert {im.shape for im in images} == {(112, 112, 3)}
    written = sorted(p for p in arcface_run.glob("*/*.png"))
    for image, path in zip(images, written):     # same order: class, then file name
        assert np.array_equal(image.astype(np.uint8), png_rgb(path)), path   # read unresized


def test_margin_with_arcface_is_a_usage_error(sample_dir, tmp_path):
    for margin in ("44", "0"):
        p = run_align(sample_dir, tmp_path / "out", "--align", "arcface", "--margin", margin, timeout=60)
        assert p.returncode == 2, describe(p)
        assert "margin" in one_error_line(p)
        assert not (tmp_path / "out").exists()


def test_resume_with_another_align_is_refused(arcface_run, sample_dir, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(arcface_run, out)
    before = snapshot(out)
    p = run_align(sample_dir, out, "--detect_multiple_faces", "--workers", 1, timeout=60)
    assert p.returncode == 2, describe(p)
    line = one_error_line(p)
    assert "align arcface -> box" in line and "--overwrite" in line
    assert snapshot(out) == before, "a refused run changed the output"


def test_arcface_from_python_is_the_flag(arcface_run, sample_dir, tmp_path):
    """align_dataset(..., align="arcface") writes what the command writes."""
    from align import align_dataset
    src = tmp_path / "in" / "Group"
    src.mkdir(parents=True)
    shutil.copyfile(sample(sample_dir, "t1.jpg"), src / "t1.jpg")
    s = align_dataset(tmp_path / "in", tmp_path / "out", align="arcface", detect_multiple_faces=True,
                      workers=1, quiet=True)
    assert s["faces_written"] == 6
    for i in range(6):
        name = f"Group/t1_{i}.png"
        assert (tmp_path / "out" / name).read_bytes() == (arcface_run / name).read_bytes(), name
    (r,) = records(tmp_path / "out")
    assert r["written"] == next(x for x in records(arcface_run) if x["input"] == "Group/t1.jpg")["written"]


def test_killed_arcface_run_resumes_to_the_same_bytes(sample_dir, tmp_path):
    """20 photos, one worker: two shards of 10, so a kill after the first shard's journal
    leaves the second to the rerun."""
    src = tmp_path / "in"
    photos = [sample(sample_dir, "astronaut.png"), sample(sample_dir, "grace_hopper.jpg")]
    for k in range(20):
        (src / f"P{k // 10}").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(sample(sample_dir, "t1.jpg") if k == 13 else photos[k % 2],
                        src / f"P{k // 10}" / f"{k:02d}.img")
    args = (src, "out", "--align", "arcface", "--image_size", 128, "--detect_multiple_faces",
            "--workers", 1, "--quiet")
    (tmp_path / "whole").mkdir()
    ok(run_align(*args, cwd=tmp_path / "whole"))
    proc = start_align(*args, cwd=tmp_path)
    out = tmp_path / "out"
    done = kill_after_a_journal_line(proc, out, 20)
    again = ok(run_align(*args, cwd=tmp_path))
    assert summary(out)["processed_this_run"] <= 20 - done
    assert "Traceback" not in again.stderr, again.stderr
    assert_same_tree(tmp_path / "whole" / "out", out, ignore_summary_keys=["processed_this_run"])
    thumbs = list(out.glob("*/*.png"))
    assert len(thumbs) == summary(out)["faces_written"] == 25      # t1.jpg: six faces
    assert {png_rgb(p).shape for p in thumbs} == {(128, 128, 3)}


def test_help_shows_the_align_modes():
    text = " ".join(ok(run_align("--help", timeout=60)).stdout.split())
    for expected in ["--align [box|arcface]", "default: box", "112 with --align arcface",
                     "insightface refuses", "--align box only"]:
        assert expected in text, expected


def test_config_defaults_follow_the_align_mode():
    import dataclasses
    from align.config import Config
    box, arc = Config(), Config(align="arcface")
    assert (box.image_size, box.margin) == (182, 44)
    assert (arc.image_size, arc.margin) == (112, None)
    # align_dataset(..., align=...) is dataclasses.replace on a Config: defaults follow the mode
    assert (dataclasses.replace(box, align="arcface").image_size,
            dataclasses.replace(box, align="arcface").margin) == (112, None)
    assert (dataclasses.replace(arc, align="box").image_size, dataclasses.replace(arc, align="box").margin) == (182, 44)
    given = Config(image_size=160, margin=32)
    assert dataclasses.replace(given, margin=None, align="arcface").image_size == 160
    with pytest.raises(ValueError, match="margin"):
        dataclasses.replace(given, align="arcface")
    with pytest.raises(ValueError, match="margin"):
        Config(align="arcface", margin=44)
    with pytest.raises(ValueError, match="align"):
        Config(align="similarity")
    assert json.dumps([box.image_size, box.margin, arc.margin]) == "[182, 44, null]"
