"""The loader harness (tests/loaders.py) itself: on folders and packed files made here, each real
loader's classes, samples, labels and pixels come out as that loader really behaves."""
from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import loaders

SIZE = (40, 48)         # (h, w) of every hand-made "thumbnail"
PNGS = {"alice/a.png": 0, "bob/c.png": 1, "carol/d.png": 2, "carol/e.png": 0}
JPEG = "alice/b.jpg"
HIDDEN_JPEG = ".state/preview.jpg"


def crop(photo: np.ndarray, i: int) -> np.ndarray:
    """A SIZE crop of a real photo, a different one for each i."""
    h, w = SIZE
    return np.ascontiguousarray(photo[10 + 7 * i: 10 + 7 * i + h, 20 + 9 * i: 20 + 9 * i + w])


def encode(pixels: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def photos(sample_images) -> list[np.ndarray]:
    return [sample_images[name] for name in sorted(sample_images)]


@pytest.fixture(scope="module")
def folders(photos, tmp_path_factory) -> dict[str, Path]:
    """Three folders: "messy" (alice, bob, carol, a hidden .state/ with a JPEG and a journal, an
    empty zz_empty/), "hidden" (messy without zz_empty/), "clean" (the identities only)."""
    clean = tmp_path_factory.mktemp("clean")
    for i, rel in enumerate([*PNGS, JPEG]):
        (clean / rel).parent.mkdir(exist_ok=True)
        pixels = crop(photos[PNGS.get(rel, 1)], i)
        (clean / rel).write_bytes(encode(pixels, "JPEG" if rel.endswith(".jpg") else "PNG"))
    hidden = tmp_path_factory.mktemp("hidden")
    shutil.copytree(clean, hidden, dirs_exist_ok=True)
    (hidden / ".state").mkdir()
    (hidden / HIDDEN_JPEG).write_bytes(encode(crop(photos[2], 5), "JPEG"))
    (hidden / ".state" / "journal").write_text('{"done": 3}\n')
    messy = tmp_path_factory.mktemp("messy")
    shutil.copytree(hidden, messy, dirs_exist_ok=True)
    (messy / "zz_empty").mkdir()
    return {"messy": messy, "hidden": hidden, "clean": clean}


@pytest.fixture(scope="module")
def seen(folders) -> dict[tuple[str, str], dict]:
    """{(folder, loader): result} for every loader on clean and messy, ImageFolder on hidden."""
    jobs = {kind: ["clean", "messy"] for kind in loaders.FOLDER_LOADERS}
    jobs["imagefolder"].append("hidden")
    with ThreadPoolExecutor(2) as pool:
        results = dict(zip(jobs, pool.map(lambda k: loaders.run_paths(k, [folders[f] for f in jobs[k]]), jobs)))
    return {(f, kind): result for kind in jobs for f, result in zip(jobs[kind], results[kind])}


def expected_pixels(folder: Path, rels) -> dict[str, tuple[int, int, str]]:
    """(h, w, sha256) of each file as PIL decodes it: the PNGs' are the crops written."""
    return {rel: loaders.file_pixels(folder / rel) for rel in rels}


def test_pngs_decode_to_the_pixels_written(folders, photos):
    """The oracle of the tests below: PIL gives back a PNG's pixels exactly."""
    for i, rel in enumerate(PNGS):
        h, w, sha = loaders.file_pixels(folders["clean"] / rel)
        assert (h, w, sha) == (*SIZE, loaders.pixel_sha256(crop(photos[PNGS[rel]], i)))


def test_every_loader_sees_a_clean_folder_alike(seen, folders):
    clean = {k: seen["clean", k] for k in loaders.FOLDER_LOADERS}
    want = expected_pixels(folders["clean"], [*PNGS, JPEG])
    for kind, result in clean.items():
        assert result["error"] is None and result["decode_errors"] == [], kind
        assert result["classes"] == ["alice", "bob", "carol"], kind
        table = loaders.by_key(result)
        assert sorted(table) == sorted(want), kind
        for rel, (label, h, w, sha) in table.items():
            assert label == rel.split("/")[0] and (h, w) == SIZE, (kind, rel)
            if rel in PNGS or kind != "keras":      # TF's JPEG decoder is not PIL's
                assert sha == want[rel][2], (kind, rel)


def test_keras_decodes_the_jpeg_with_tensorflow(seen, folders):
    import tensorflow as tf
    pixels = tf.io.decode_jpeg((folders["clean"] / JPEG).read_bytes(), channels=3).numpy()
    assert loaders.by_key(seen["clean", "keras"])[JPEG][3] == loaders.pixel_sha256(pixels)


def test_facenet_takes_every_folder_and_every_file(seen, folders):
    result = seen["messy", "facenet"]
    assert result["error"] is None
    assert result["classes"] == [".state", "alice", "bob", "carol", "zz_empty"]
    table = loaders.by_key(result)
    assert sorted(table) == sorted([*PNGS, JPEG, HIDDEN_JPEG])
    assert table[HIDDEN_JPEG][0] == ".state"
    assert table[HIDDEN_JPEG][1:] == expected_pixels(folders["messy"], [HIDDEN_JPEG])[HIDDEN_JPEG]
    [error] = result["decode_errors"]
    assert (error["key"], error["label"], error["type"]) == (".state/journal", ".state", "UnidentifiedImageError")


def test_imagefolder_refuses_an_empty_class_as_a_structured_error(seen):
    result = seen["messy", "imagefolder"]
    assert result["error"]["type"] == "FileNotFoundError"
    assert "zz_empty" in result["error"]["message"]
    assert result["classes"] is None and result["samples"] == []


def test_imagefolder_takes_a_hidden_folder_of_images_for_a_class(seen, folders):
    result = seen["hidden", "imagefolder"]
    assert result["error"] is None and result["decode_errors"] == []
    assert result["classes"] == [".state", "alice", "bob", "carol"]
    table = loaders.by_key(result)
    assert sorted(table) == sorted([*PNGS, JPEG, HIDDEN_JPEG])     # not the journal: no image extension
    assert table[HIDDEN_JPEG] == (".state", *expected_pixels(folders["hidden"], [HIDDEN_JPEG])[HIDDEN_JPEG])


def test_keras_skips_the_hidden_folder_and_keeps_the_empty_class(seen):
    result = seen["messy", "keras"]
    assert result["error"] is None and result["decode_errors"] == []
    assert result["classes"] == ["alice", "bob", "carol", "zz_empty"]
    assert sorted(loaders.by_key(result)) == sorted([*PNGS, JPEG])


def test_hf_imagefolder_drops_the_hidden_and_the_empty_folder(seen):
    result = seen["messy", "hf_imagefolder"]
    assert result["error"] is None and result["decode_errors"] == []
    assert result["classes"] == ["alice", "bob", "carol"]
    assert loaders.by_key(result) == loaders.by_key(seen["clean", "hf_imagefolder"])


def test_a_loader_that_refuses_the_path_is_an_error_not_a_crash(tmp_path):
    result = loaders.run("facenet", tmp_path / "absent")
    assert result["error"]["type"] == "FileNotFoundError" and result["samples"] == []
    with pytest.raises(ValueError, match="unknown loader"):
        loaders.run("caffe", tmp_path)


def test_the_command_line_prints_a_json_line_per_path_and_nothing_else(folders):
    proc = subprocess.run([sys.executable, loaders.__file__, "facenet", str(folders["clean"]),
                           str(folders["hidden"])], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    clean, hidden = map(json.loads, proc.stdout.splitlines())
    assert clean["classes"] == ["alice", "bob", "carol"]
    assert hidden["classes"] == [".state", "alice", "bob", "carol"]


# ------------------------------------------------------------------------ packed formats

WRITE_REC = """
import json, sys
import mxnet as mx
spec = json.load(open(sys.argv[1]))
rec = mx.recordio.MXIndexedRecordIO(spec["idx"], spec["rec"], "w")
for idx, flag, label, payload in spec["records"]:
    data = open(payload, "rb").read() if payload else b""
    rec.write_idx(idx, mx.recordio.pack(mx.recordio.IRHeader(flag, label, idx, 0), data))
rec.close()
"""


def write_rec(folder: Path, records: list) -> None:
    """train.rec + train.idx in folder, written by MXNet's own MXIndexedRecordIO and pack:
    records are [index, flag, label, payload file or None]."""
    spec = folder / "spec.json"
    spec.write_text(json.dumps({"rec": str(folder / "train.rec"), "idx": str(folder / "train.idx"),
                                "records": [[i, f, lab, p and str(p)] for i, f, lab, p in records]}))
    proc = subprocess.run([str(loaders.mxnet_python()), "-c", WRITE_REC, str(spec)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def thumbs(photos, tmp_path_factory) -> list[tuple[Path, str]]:
    """Four PNG files of real pixels: (path, sha256 of their pixels)."""
    folder = tmp_path_factory.mktemp("thumbs")
    out = []
    for i in range(4):
        pixels = crop(photos[i % len(photos)], i)
        path = folder / f"{i}.png"
        path.write_bytes(encode(pixels, "PNG"))
        out.append((path, loaders.pixel_sha256(pixels)))
    return out


def test_mxnet_rec_with_insightface_header_lists_only_the_image_records(thumbs, tmp_path):
    # insightface's layout: record 0 says images are 1..3, identities 4..5 ([first, end) each)
    write_rec(tmp_path, [[0, 2, [4, 6], None],
                         [1, 0, 0.0, thumbs[0][0]], [2, 0, [1.0, 7.0], thumbs[1][0]],
                         [3, 0, 1.0, thumbs[2][0]],
                         [4, 2, [1, 2], None], [5, 2, [2, 4], None]])
    result = loaders.run("mxnet_rec", tmp_path)
    assert result["error"] is None and result["decode_errors"] == []
    assert result["header0"] == [4, 6] and result["classes"] is None
    assert result["samples"] == [[1, 0, *SIZE, thumbs[0][1]], [2, 1, *SIZE, thumbs[1][1]],
                                 [3, 1, *SIZE, thumbs[2][1]]]
    assert result["meta"][1]["label"] == [1.0, 7.0]


def test_mxnet_rec_without_header_lists_every_key(thumbs, tmp_path):
    write_rec(tmp_path, [[i, 0, float(i % 2), path] for i, (path, _) in enumerate(thumbs[:3])])
    result = loaders.run("mxnet_rec", tmp_path / "train.rec")
    assert result["error"] is None and result["header0"] is None
    assert result["samples"] == [[i, i % 2, *SIZE, sha] for i, (_, sha) in enumerate(thumbs[:3])]


def test_mxnet_rec_that_is_absent_is_an_error(tmp_path):
    assert loaders.run("mxnet_rec", tmp_path)["error"] is not None


@pytest.fixture(scope="module")
def shards(thumbs, photos, tmp_path_factory) -> tuple[Path, dict[str, tuple[int, str, dict]]]:
    """Two tar shards written by webdataset's own TarWriter (fixed mtime, user, group), and
    {key: (label, pixel sha256, json)} of their samples; one sample is a JPEG."""
    import webdataset as wds
    folder = tmp_path_factory.mktemp("shards")
    jpeg = encode(crop(photos[1], 6), "JPEG")
    samples = [(f"id{i % 2}_{i:04d}", "png", path.read_bytes(), i % 2) for i, (path, _) in enumerate(thumbs)]
    samples.append(("id1_0004", "jpg", jpeg, 1))
    want = {}
    for shard in range(2):
        with wds.TarWriter(str(folder / f"faces-{shard:06d}.tar"), mtime=1700000000,
                           user="align", group="align") as writer:
            for key, ext, data, label in samples[shard * 3: shard * 3 + 3]:
                record = {"identity": f"id{label}", "key": key}
                writer.write({"__key__": key, ext: data, "cls": label, "json": record})
                want[key] = (label, loaders.pixel_sha256(np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))), record)
    return folder, want


@pytest.mark.parametrize("kind", ["webdataset", "hf_webdataset"])
def test_webdataset_readers_see_every_sample(shards, kind):
    folder, want = shards
    result = loaders.run(kind, folder)
    assert result["error"] is None
    if kind == "hf_webdataset":
        # HF takes its columns from the first shard: the later .jpg sample comes without image
        [error] = result["decode_errors"]
        assert (error["key"], error["type"]) == ("id1_0004", "ValueError")
        want = {k: v for k, v in want.items() if k != "id1_0004"}
    else:
        assert result["decode_errors"] == []
    assert [s[0] for s in result["samples"]] == list(want)          # shard order, then tar order
    for (key, label, h, w, sha), meta in zip(result["samples"], result["meta"]):
        assert (label, sha, meta["json"]) == want[key] and (h, w) == SIZE
        assert meta["image"] == ("jpg" if key == "id1_0004" else "png")


def test_hf_webdataset_refuses_a_shard_that_mixes_extensions(thumbs, photos, tmp_path):
    import webdataset as wds
    with wds.TarWriter(str(tmp_path / "mixed-000000.tar"), mtime=0) as writer:
        writer.write({"__key__": "a", "png": thumbs[0][0].read_bytes(), "cls": 0})
        writer.write({"__key__": "b", "jpg": encode(crop(photos[0], 1), "JPEG"), "cls": 0})
    result = loaders.run("hf_webdataset", tmp_path)
    assert result["error"]["type"] == "ValueError" and "same types" in result["error"]["message"]
    assert len(loaders.run("webdataset", tmp_path)["samples"]) == 2


def test_tar_members_as_written(shards):
    folder, want = shards
    result = loaders.run("tar_members", folder / "faces-000000.tar")
    assert result["error"] is None and result["pax_headers"] == {}
    members = result["members"]
    assert [m["name"] for m in members] == [f"{k}.{e}" for k in list(want)[:3] for e in ("cls", "json", "png")]
    for m in members:
        assert (m["mode"], m["uid"], m["gid"], m["uname"], m["gname"], m["mtime"], m["type"], m["format"]) \
            == (0o444, 0, 0, "align", "align", 1700000000, "REGTYPE", "ustar")
    assert members[0]["sha256"] == "5feceb66ffc86f38d952786c6d696c79c2dbc239dd4e91b46729d73a27fb57e9"  # b"0"


@pytest.mark.parametrize("fmt, expected", [(tarfile.PAX_FORMAT, "pax"), (tarfile.GNU_FORMAT, "gnu"),
                                           (tarfile.USTAR_FORMAT, "ustar")])
def test_tar_members_tell_the_header_format(tmp_path, fmt, expected):
    path = tmp_path / "a.tar"
    long_name = "x" * 120 if fmt != tarfile.USTAR_FORMAT else "short"    # ustar has no long names
    with tarfile.open(path, "w", format=fmt) as tar:
        info = tarfile.TarInfo(long_name)
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    [member] = loaders.load_tar_members(str(path))["members"]
    assert (member["name"], member["format"], member["size"]) == (long_name, expected, 3)
    assert (member["pax_headers"] != {}) == (expected == "pax")
