"""--output_format rec and webdataset, read back by the trainers' own readers (tests/loaders.py:
MXNet 1.9.1's recordio as arcface_torch's MXFaceDataset calls it, webdataset, Hugging Face's
webdataset builder, tarfile), against the folders layout's thumbnails; and the same bytes
whatever the engine, kills, or photos added after a finished run."""
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

import loaders
from conftest import SHARED
from test_cli import (align_cmd, cli_env, describe, kill_after_a_journal_line, n_inputs, ok,
                      one_error_line, read_jsonl, run_align, snapshot, start_align)

LFW = SHARED / "faces" / "lfw_gwb" / "George_W_Bush"
ARGS = ("--image_size", 256, "--tar_shard_mb", 1, "--quiet")     # 1 MB: 2 or 3 shards
# identities with a dot, a space and letters outside ASCII; "Aaron" is added after a first run
# (it sorts first: every label moves), and so is one photo of George_W_Bush
LAYOUT = {"Ann.Lee": ["p.1.jpg", "p.2.jpg", "p3.jpg"], "George_W_Bush": [f"g{i}.jpg" for i in range(5)],
          "Zoë Ünicode": ["z1.jpg", "z2.jpg"], "Zed": ["a.jpg", "b\udcffd.jpg"]}   # b<0xff>d: not UTF-8
ADDED = {"Aaron": ["a1.jpg", "a2.jpg"], "George_W_Bush": ["g5.jpg"]}


def build(root: Path, layout: dict[str, list[str]], photos: list[Path], start: int = 0) -> int:
    k = start
    for identity, names in layout.items():
        (root / identity).mkdir(parents=True, exist_ok=True)
        for name in names:
            shutil.copyfile(photos[k % len(photos)], root / identity / name)
            k += 1
    return k


@pytest.fixture(scope="module")
def photos(sample_paths, tmp_path_factory) -> tuple[Path, Path]:
    """(all the photos, the same less ADDED): 16 LFW photos (where ../shared has them; else
    copies of the three sample photos) in 5 identities, and a text file."""
    sources = sorted(LFW.glob("*.jpg")) if LFW.is_dir() else sorted(sample_paths.values())
    root = tmp_path_factory.mktemp("formats")
    full, first = root / "full", root / "first"
    k = build(full, LAYOUT, sources)
    build(full, ADDED, sources, k)
    build(first, LAYOUT, sources)
    for folder in (full, first):
        (folder / "Zed" / "notes.txt").write_text("not a photo\n")
    return full, first


def aligned(photos: Path, out: Path, fmt: str, *more) -> Path:
    ok(run_align(photos, out, "--workers", 1, "--output_format", fmt, *ARGS, *more))
    return out


@pytest.fixture(scope="module")
def runs(photos, tmp_path_factory) -> dict[str, Path]:
    """One uninterrupted run per format on all the photos: {format: OUTPUT_DIR}."""
    root = tmp_path_factory.mktemp("runs")
    return {fmt: aligned(photos[0], root / fmt, fmt) for fmt in ("folders", "rec", "webdataset")}


def written_outputs(out: Path) -> list[str]:
    return [w["output"] for r in read_jsonl(out / "faces.jsonl") for w in r["written"]]


def key(output: str) -> str:
    """The README's rule for a sample's key."""
    key = output.rsplit(".", 1)[0].replace("%", "%25").replace(".", "%2E")
    return "".join(f"%{ord(c) - 0xDC00:02X}" if 0xDC80 <= ord(c) <= 0xDCFF else c for c in key)


@pytest.fixture(scope="module")
def folders(runs) -> dict[str, tuple]:
    """{sample key: (class name, h, w, pixel sha256)} of the folders layout, as ImageFolder
    reads it, and its classes in label order."""
    result = loaders.run("imagefolder", runs["folders"])
    assert result["error"] is None and not result["decode_errors"], result
    return {key(k): tuple(v) for k, v in loaders.by_key(result).items()}, result["classes"]


def shards(out: Path) -> list[str]:
    return sorted(p.name for p in out.glob("*.tar"))


def test_the_top_of_output_dir_holds_plain_files_only(runs):
    n = len(shards(runs["webdataset"]))
    assert n >= 2, "the photos fill one tar shard of 1 MB: the test needs several"
    expected = {"rec": {"train.rec", "train.idx", "property"},
                "webdataset": {f"faces-{i:06d}.tar" for i in range(n)}}
    assert json.loads((runs["webdataset"] / "summary.json").read_text())["packed"] == f"faces-{{000000..{n - 1:06d}}}.tar"
    for fmt, files in expected.items():
        top = {p.name: p for p in runs[fmt].iterdir()}
        assert all(p.is_file() for p in top.values()), sorted(top)
        assert set(top) == files | {"faces.jsonl", "bounding_boxes.txt", "summary.json", "report.html"}, sorted(top)


def test_records_are_the_folders_records_and_boxes_name_keys(runs):
    reference = (runs["folders"] / "faces.jsonl").read_bytes()
    boxes = (runs["folders"] / "bounding_boxes.txt").read_bytes().decode("utf-8", "surrogateescape").splitlines()
    for fmt in ("rec", "webdataset"):
        assert (runs[fmt] / "faces.jsonl").read_bytes() == reference
        keyed = []
        for line in boxes:          # "<path> x1 y1 x2 y2"; a path may hold spaces
            path, *box = line.rsplit(" ", 4)
            keyed.append(" ".join([key(os.path.relpath(path, runs["folders"])), *box]))
        assert (runs[fmt] / "bounding_boxes.txt").read_text("utf-8").splitlines() == keyed   # keys are UTF-8
        s = json.loads((runs[fmt] / "summary.json").read_text())
        assert s["num_classes"] == 5 and s["faces_written"] == 15 and s["options"]["output_format"] == fmt


def test_mxnet_reads_train_rec_as_arcface_torch_does(runs, folders):
    by_key, classes = folders
    result = loaders.run("mxnet_rec", runs["rec"])
    assert result["error"] is None and not result["decode_errors"], result
    assert result["header0"] is None        # every record is a face (see README)
    outputs = written_outputs(runs["rec"])
    assert [s[0] for s in result["samples"]] == list(range(len(outputs)))
    for (index, label, h, w, sha), output in zip(result["samples"], outputs):
        name, fh, fw, fsha = by_key[key(output)]
        assert (classes[label], h, w, sha) == (name, fh, fw, fsha), output
    assert [m["flag"] for m in result["meta"]] == [0] * len(outputs)
    assert (runs["rec"] / "property").read_text() == f"{len(classes)},256,256\n"


def test_webdataset_and_hugging_face_read_the_shards(runs, folders):
    by_key, classes = folders
    outputs = written_outputs(runs["webdataset"])
    for kind in ("webdataset", "hf_webdataset"):
        result = loaders.run(kind, runs["webdataset"])
        assert result["error"] is None and not result["decode_errors"], result
        assert [s[0] for s in result["samples"]] == [key(o) for o in outputs]
        for k, label, h, w, sha in result["samples"]:
            assert (classes[label], h, w, sha) == by_key[k], k
        for meta, output in zip(result["meta"], outputs):
            text = output.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
            assert meta["image"] == "png" and meta["json"]["output"] == text
            assert classes[meta["json"]["label"]] == output.split("/")[0]
    assert {m["url"] for m in result["meta"]} == {str(runs["webdataset"] / n) for n in shards(runs["webdataset"])}


def test_tar_members_are_plain_ustar_or_pax_with_fixed_metadata(runs):
    names = []
    for shard in sorted(runs["webdataset"].glob("*.tar")):
        result = loaders.run("tar_members", shard)
        assert result["error"] is None and result["pax_headers"] == {}, result
        assert shard.stat().st_size <= 1_000_000 + 10240
        for m in result["members"]:
            assert (m["mode"], m["uid"], m["gid"], m["mtime"], m["uname"], m["gname"], m["type"]) == \
                (0o644, 0, 0, 0, "", "", "REGTYPE"), m
            assert m["format"] == ("pax" if not m["name"].isascii() else "ustar"), m
            names.append(m["name"])
    assert {"Zo\u00eb \u00dcnicode/z1.cls", "Ann%2ELee/p%2E1.png", "Zed/b%FFd.json"} <= set(names)


def test_the_report_shows_the_packed_thumbnails(runs):
    pages = {fmt: (runs[fmt] / "report.html").read_text() for fmt in runs}
    for fmt in ("rec", "webdataset"):
        assert "missing</div>" not in pages[fmt]
        assert pages[fmt].count('class="thumb"') == pages["folders"].count('class="thumb"') > 0


def test_a_rebuilt_report_reuses_its_thumbnails_without_reading_the_packed_files(runs, tmp_path):
    """A rerun that changed no record rebuilds the report from the previous one's pictures:
    no scan of millions of packed samples for a few hundred thumbnails."""
    from align.report import write_report
    out = tmp_path / "out"
    shutil.copytree(runs["webdataset"], out)
    for shard in out.glob("*.tar"):
        shard.rename(tmp_path / shard.name)
    page = write_report(out).read_text()
    assert "missing</div>" not in page
    assert page.count('class="thumb"') == (runs["webdataset"] / "report.html").read_text().count('class="thumb"')


def test_a_rerun_with_another_format_is_refused(photos, runs, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(runs["rec"], out)
    p = run_align(photos[0], out, "--workers", 1, "--output_format", "webdataset", *ARGS)
    assert p.returncode == 2 and "output_format rec -> webdataset" in one_error_line(p), describe(p)
    ok(run_align(photos[0], out, "--workers", 1, "--output_format", "webdataset", *ARGS, "--overwrite"))
    assert snapshot(out, ["output_dir"]) == snapshot(runs["webdataset"], ["output_dir"])


@pytest.mark.parametrize("fmt, engines", [("rec", ("local", "dask", "local")),
                                          ("webdataset", ("dask", "local", "dask"))])
def test_killed_resumed_then_photos_added_gives_one_runs_bytes(photos, runs, fmt, engines, tmp_path):
    """kill -9 half-way under one engine, resume under the other; then photos added to the
    finished folder, and the run that adds them killed as it renames the new packed files into
    place, and rerun: the files equal one uninterrupted run's on all the photos."""
    pytest.importorskip("distributed", reason="the dask extra is not installed")
    full, first = photos[0], tmp_path / "in"
    shutil.copytree(photos[1], first)
    args = ("--workers", 1, "--output_format", fmt, *ARGS)
    out = tmp_path / "out"
    proc = start_align(first, out, *args, "--engine", engines[0])
    kill_after_a_journal_line(proc, out, n_inputs(first))
    assert list((out / ".align_dataset" / "parts").glob("*.part"))
    ok(run_align(first, out, *args, "--engine", engines[1]))
    assert not (out / ".align_dataset").exists()
    for identity, names in ADDED.items():
        (first / identity).mkdir(exist_ok=True)
        for name in names:
            shutil.copyfile(full / identity / name, first / identity / name)
    # the renames of the run that adds photos: options.json, faces.jsonl, bounding_boxes.txt,
    # the packed files in place set aside, then the new ones renamed in: killed as the second
    # new one would be (train.idx, faces-000001.tar)
    in_place = len([p for p in out.iterdir() if p.name in ("train.rec", "train.idx", "property")
                    or p.suffix == ".tar"])
    killed = killed_at_a_rename(3 + in_place + 2, first, out, *args, "--engine", engines[2])
    if killed:
        assert (out / ".align_dataset").is_dir()
        first_file = "train.rec" if fmt == "rec" else "faces-000000.tar"
        assert (out / first_file).read_bytes() == (runs[fmt] / first_file).read_bytes()
    ok(run_align(first, out, *args, "--engine", engines[2]))
    assert json.loads((out / "summary.json").read_text())["processed_this_run"] == (0 if killed else 3)
    ignore = ["processed_this_run", "engine", "input_dir", "output_dir"]
    assert snapshot(out, ignore) == snapshot(runs[fmt], ignore)


def killed_at_a_rename(when: int, *args) -> bool:
    """The command under strace, killed (SIGKILL, injected) as it makes its `when`th rename;
    False where strace is absent or may not trace (a container without ptrace)."""
    if not shutil.which("strace"):
        return False
    calls = "rename,renameat,renameat2"
    p = subprocess.run(["strace", "-qq", "-o", os.devnull, "-e", f"trace={calls}", "-e",
                        f"inject={calls}:signal=KILL:when={when}", *align_cmd(*args)],
                       env=cli_env(), capture_output=True, text=True, timeout=300)
    if p.returncode == 1 and "ptrace" in p.stderr:
        return False
    assert p.returncode in (-9, 137), describe(p)
    return True


def mxnet_frames(payloads: list[bytes]) -> bytes:
    """MXNet's own MXRecordIO writing `payloads`, the bytes of the file it wrote."""
    code = ("import sys, mxnet as mx\nw = mx.recordio.MXRecordIO(sys.argv[1], 'w')\n"
            "for p in sys.argv[2:]:\n    w.write(bytes.fromhex(p))\nw.close()\n")
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"frames-{os.getpid()}.rec"
    try:
        subprocess.run([str(loaders.mxnet_python()), "-c", code, str(path), *(p.hex() for p in payloads)],
                       check=True, capture_output=True)
        return path.read_bytes()
    finally:
        path.unlink(missing_ok=True)


def test_rec_frames_are_mxnets_even_where_the_magic_word_is_in_the_data():
    from align.writers import rec_frame, rec_unframe
    magic = struct.pack("<I", 0xCED7230A)
    payloads = [b"", b"abc", b"abcd" * 3, magic + b"xy", b"abcd" + magic + b"efgh" + magic,
                b"a" + magic + b"bcdefgh", magic + magic + b"q", b"abcde" + magic, b"ab" + magic + b"cd" * 3 + magic]
    assert b"".join(map(rec_frame, payloads)) == mxnet_frames(payloads)
    for p in payloads:
        assert rec_unframe(rec_frame(p) + b"junk") == (p, len(rec_frame(p)))


def test_a_train_rec_with_records_cut_at_magic_words_is_a_source(tmp_path):
    """The assembly finds the bytes of each face of a previous train.rec by its id2, records
    cut at magic words included."""
    from align.writers import Sources, rec_frame, rec_payload, scan_rec
    magic = struct.pack("<I", 0xCED7230A)
    images = [b"x" * 10, magic * 3 + b"yy", b"abcd" + magic + b"z" * 7, b"q"]
    with open(tmp_path / "train.rec", "wb") as f:
        for i, image in enumerate(images):
            f.write(rec_frame(rec_payload(0, i, f"k{i}", image)))
    sources = Sources()
    sources.add(tmp_path / "train.rec", scan_rec(tmp_path / "train.rec"), rec=True)
    sources.freeze()
    try:
        assert [sources.read(f"k{i}") for i in range(4)] == images and sources.read("k4") is None
    finally:
        sources.close()
