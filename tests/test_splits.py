"""--split / --split_by / --split_seed: the split function on plain values, then the command end
to end on real LFW photos: one tree per split that Keras's image_dataset_from_directory and
torchvision's ImageFolder number alike, identities short of a split held out, planted exact
copies in one split, splits that do not move when photos are added or the run is killed."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections import defaultdict
from pathlib import Path

import pytest

import loaders
from test_cli import (LFW_GWB, kill_after_a_journal_line, n_inputs, ok, records, run_align, snapshot,
                      start_align, summary)
from align.splits import (HELD_OUT, check_splits, parse_splits, split_of, split_of_identity,
                          unit_interval)

SPLITS = "train=0.5,validation=0.25,test=0.25"
NAMES = ["train", "validation", "test"]
COMMON = ("--split", SPLITS, "--image_size", 32, "--workers", 1, "--quiet")
TOP = {"faces.jsonl", "bounding_boxes.txt", "summary.json", "report.html"}


# --- the split function ----------------------------------------------------------------------------

def test_parse_splits():
    assert parse_splits("train=0.8,validation=0.1,test=0.1") == (("train", 0.8), ("validation", 0.1), ("test", 0.1))
    assert parse_splits(" a = 0.5 , b-2=0.5") == (("a", 0.5), ("b-2", 0.5))
    assert parse_splits("all=1") == (("all", 1.0),)
    assert check_splits([("x", 1 / 3), ("y", 1 / 3), ("z", 1 / 3)])[2] == ("z", 1 / 3)
    for bad in ("train=0.8,test=0.1", "train=0.8,train=0.2", "train=0.8,Train=0.2", "held_out=0.5,b=0.5", ".x=0.5,b=0.5",
                "a/b=0.5,c=0.5", "a=0,b=1", "a=-0.5,b=1.5", "train", "train=x", "", "-a=1"):
        with pytest.raises(ValueError):
            parse_splits(bad)


def test_split_of_is_a_function_of_the_digest_seed_and_fractions():
    splits = parse_splits(SPLITS)
    digests = [hashlib.sha256(str(i).encode()).digest() for i in range(20000)]
    first = [split_of(d, 0, splits) for d in digests]
    assert first == [split_of(d, 0, splits) for d in digests]
    shares = {n: first.count(n) / len(first) for n in NAMES}
    assert all(abs(shares[n] - f) < 0.015 for n, f in splits), shares
    other_seed = [split_of(d, 1, splits) for d in digests]
    assert 0.5 < sum(a != b for a, b in zip(first, other_seed)) / len(first) < 0.7
    assert all(0 <= unit_interval(d, 7) < 1 for d in digests[:100])
    # fractions in another order: the same u, other names; one split takes everything
    assert {split_of(d, 0, (("all", 1.0),)) for d in digests[:100]} == {"all"}
    assert split_of_identity("Ann", 0, splits) == split_of(hashlib.sha256(b"Ann").digest(), 0, splits)


# --- inputs and runs -------------------------------------------------------------------------------

def photo_split(path: Path) -> str:
    return split_of(hashlib.sha256(path.read_bytes()).digest(), 0, parse_splits(SPLITS))


def _covering(pool: list[Path], n: int) -> list[Path]:
    """n photos of the pool (taken from it) whose splits cover every split."""
    chosen, left = [], list(pool)
    for name in NAMES:
        p = next(p for p in left if photo_split(p) == name)
        chosen.append(p)
        left.remove(p)
    chosen += left[:n - len(chosen)]
    for p in chosen:
        pool.remove(p)
    return chosen


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """{"full": INPUT_DIR, "partial": the same less Dan's photos but one}: real LFW photos as
    identities Ann, Bob, Cid (7 photos each, covering every split), Dan (7, covering; 1 in
    "partial") and Eve (1: held out); planted exact copies: Ann/again.jpg (Ann's first photo),
    Bob/from_ann.jpg (Ann's second)."""
    if not LFW_GWB.is_dir():
        pytest.skip(f"{LFW_GWB} is absent (../shared beside the checkout)")
    pool = sorted(LFW_GWB.rglob("*.jpg"))[:120]
    root = tmp_path_factory.mktemp("split_inputs")
    full, partial = root / "full", root / "partial"
    for identity, n in (("Ann", 7), ("Bob", 7), ("Cid", 7), ("Dan", 7), ("Eve", 1)):
        photos = _covering(pool, n) if n > 1 else [pool.pop(0)]
        (full / identity).mkdir(parents=True)
        for p in photos:
            shutil.copyfile(p, full / identity / p.name)
    ann = sorted((full / "Ann").iterdir())
    shutil.copyfile(ann[0], full / "Ann" / "again.jpg")
    shutil.copyfile(ann[1], full / "Bob" / "from_ann.jpg")
    shutil.copytree(full, partial)
    for p in sorted((partial / "Dan").iterdir())[1:]:
        p.unlink()
    return {"full": full, "partial": partial}


@pytest.fixture(scope="module")
def runs(inputs, tmp_path_factory) -> dict[str, Path]:
    """{name: finished OUTPUT_DIR}: "full" (one run on the full input), "grown" (the partial
    input, then the full one: photos added), "killed" (kill -9 after a first journal line of
    a run with 2 workers in random order, then the same command with 1), "identity" (--split_by identity --align arcface)."""
    root = tmp_path_factory.mktemp("split_runs")
    out = {name: root / name for name in ("full", "grown", "killed", "identity")}
    ok(run_align(inputs["full"], out["full"], *COMMON))
    ok(run_align(inputs["partial"], out["grown"], *COMMON))
    shutil.copytree(out["grown"], root / "partial")
    out["partial"] = root / "partial"
    ok(run_align(inputs["full"], out["grown"], *COMMON))
    kill_after_a_journal_line(start_align(inputs["full"], out["killed"], *COMMON[:-1], "--random_order",
                                          "--workers", 2),
                              out["killed"], n_inputs(inputs["full"]))
    ok(run_align(inputs["full"], out["killed"], *COMMON))
    ok(run_align(inputs["full"], out["identity"], "--split", "train=0.5,test=0.5", "--split_by", "identity",
                 "--align", "arcface", "--image_size", 56, "--workers", 1, "--quiet"))
    return out


def trees(out: Path) -> dict[str, set[str]]:
    """{top folder: its identity folders} of an OUTPUT_DIR."""
    return {p.name: {q.name for q in p.iterdir()} for p in out.iterdir() if p.is_dir()}


def assert_split_training_set(out: Path, names: list[str]) -> None:
    """Plain records at the top, split trees (and held_out) of identity folders of thumbnails,
    nothing empty, nothing hidden."""
    top = {p.name for p in out.iterdir()}
    assert top - set(names) - {HELD_OUT} <= TOP, sorted(top)
    for split in top - TOP:
        identities = list((out / split).iterdir())
        assert identities, f"{split} is empty"
        for folder in identities:
            if folder.is_file():        # a packed format's files
                assert folder.name in ("train.rec", "train.idx", "property") or \
                    re.fullmatch(r"faces-\d{6}\.tar", folder.name), folder
                continue
            inside = list(folder.iterdir())
            assert inside and all(p.is_file() and not p.name.startswith(".") for p in inside), folder


def on_disk(out: Path) -> list[str]:
    return sorted(p.relative_to(out).as_posix() for p in out.glob("*/*/*"))


# --- end to end ------------------------------------------------------------------------------------

def test_photo_split_trees(runs, inputs):
    out = runs["full"]
    assert_split_training_set(out, NAMES)
    assert trees(out) == {"train": {"Ann", "Bob", "Cid", "Dan"}, "validation": {"Ann", "Bob", "Cid", "Dan"},
                          "test": {"Ann", "Bob", "Cid", "Dan"}, HELD_OUT: {"Eve"}}
    recs = records(out)
    assert len(recs) == n_inputs(inputs["full"]) and all(r["status"] == "aligned" for r in recs)
    for r in recs:      # the split is the photo's bytes' and the thumbnail is where it says
        assert r["split"] == photo_split(inputs["full"] / r["input"]), r["input"]
        top = HELD_OUT if r["input"].startswith("Eve/") else r["split"]
        assert r.get("held_out", False) == (top == HELD_OUT)
        assert [w["output"] for w in r["written"]] == [f"{top}/{r['input'].rsplit('.', 1)[0]}.png"]
    assert on_disk(out) == sorted(w["output"] for r in recs for w in r["written"])
    boxes = (out / "bounding_boxes.txt").read_text().splitlines()
    assert [b.split()[0] for b in boxes] == [os.path.join(str(out), w["output"]) for r in recs for w in r["written"]]
    s = summary(out)
    assert s["options"]["split"] == SPLITS and s["options"]["split_by"] == "photo"
    assert s["splits"]["held_out"] == {"identities": 1, "photos": 1, "faces": 1}
    assert sum(v["photos"] for v in s["splits"]["splits"].values()) == len(recs)
    assert s["num_classes"] == 4
    report = (out / "report.html").read_text()
    assert "held out" in report and "validation" in report


def test_exact_copies_land_in_one_split(runs, inputs):
    by_bytes = defaultdict(set)
    for r in records(runs["full"]):
        by_bytes[hashlib.sha256((inputs["full"] / r["input"]).read_bytes()).hexdigest()].add(r["split"])
    assert len(by_bytes) == n_inputs(inputs["full"]) - 2          # the two planted copies
    assert all(len(splits) == 1 for splits in by_bytes.values())
    split = {r["input"]: r["split"] for r in records(runs["full"])}
    ann = sorted(p.name for p in (inputs["full"] / "Ann").iterdir() if p.name != "again.jpg")
    assert split["Ann/again.jpg"] == split[f"Ann/{ann[0]}"] and split["Bob/from_ann.jpg"] == split[f"Ann/{ann[1]}"]


def test_no_input_in_two_splits(runs):
    for name in ("full", "identity"):
        stems = defaultdict(set)
        for path in on_disk(runs[name]):
            top, rest = path.split("/", 1)
            stems[rest].add(top)
        assert all(len(tops) == 1 for tops in stems.values()), name


def test_identity_split(runs, inputs):
    out = runs["identity"]
    assert_split_training_set(out, ["train", "test"])
    found = trees(out)
    assert HELD_OUT not in found and set(found) <= {"train", "test"}
    assert not set.intersection(*found.values()) if len(found) > 1 else True
    for r in records(out):
        identity = r["input"].split("/")[0]
        assert r["split"] == split_of_identity(identity, 0, parse_splits("train=0.5,test=0.5"))
        assert identity in found[r["split"]] and "held_out" not in r
        assert r["written"][0]["template"] == "arcface"
    assert sorted(set().union(*found.values())) == ["Ann", "Bob", "Cid", "Dan", "Eve"]


def test_loaders_number_classes_alike_in_every_split(runs):
    paths = [runs["full"] / n for n in NAMES] + [runs["identity"] / n for n in ("train", "test")
                                                 if (runs["identity"] / n).is_dir()]
    for kind in ("keras", "imagefolder"):
        results = loaders.run_paths(kind, paths)
        for path, result in zip(paths, results):
            assert result["error"] is None and result["decode_errors"] == [], (kind, path, result["error"])
            expected = sorted(p.relative_to(path).as_posix() for p in path.glob("*/*"))
            assert sorted(loaders.by_key(result)) == expected, (kind, path)
        photo = [r["classes"] for r in results[:3]]
        assert photo == [["Ann", "Bob", "Cid", "Dan"]] * 3, (kind, photo)
        identity = [set(r["classes"]) for r in results[3:]]
        assert sum(map(len, identity)) == len(set().union(*identity)) == 5, (kind, identity)


FLOW = """
import json, sys
from tensorflow.keras.preprocessing.image import ImageDataGenerator
OUTPUT_DIR = sys.argv[1]
for split in sys.argv[2:]:      # as the README shows it
    flow = ImageDataGenerator(rescale=1 / 255).flow_from_directory(OUTPUT_DIR + '/' + split, target_size=(32, 32))
    print(json.dumps([flow.class_indices, flow.samples]))
"""


def test_flow_from_directory_numbers_classes_alike_in_every_split(runs):
    import subprocess
    import sys
    from test_cli import cli_env
    p = subprocess.run([sys.executable, "-c", FLOW, str(runs["full"]), *NAMES], capture_output=True,
                       text=True, env={**cli_env(), "TF_CPP_MIN_LOG_LEVEL": "3"}, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    seen = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("[")]
    assert [classes for classes, _ in seen] == [{"Ann": 0, "Bob": 1, "Cid": 2, "Dan": 3}] * 3
    assert [n for _, n in seen] == [summary(runs["full"])["splits"]["splits"][s]["faces"] for s in NAMES]


def _splits_of(out: Path) -> dict[str, str]:
    return {r["input"]: r["split"] for r in records(out)}


def test_added_photos_move_no_photo_and_bring_a_held_out_identity_in(runs):
    before, after = _splits_of(runs["partial"]), _splits_of(runs["grown"])
    assert all(after[k] == v for k, v in before.items())
    assert trees(runs["partial"])[HELD_OUT] == {"Dan", "Eve"}
    assert trees(runs["grown"])[HELD_OUT] == {"Eve"}
    assert summary(runs["partial"])["splits"]["held_out"]["identities"] == 2
    assert_same_tree_of_splits(runs["full"], runs["grown"])


def test_kill_and_rerun_give_the_same_tree(runs):
    assert_same_tree_of_splits(runs["full"], runs["killed"])


def assert_same_tree_of_splits(a: Path, b: Path) -> None:
    for out in (a, b):
        assert_split_training_set(out, NAMES)
    ta, tb = (snapshot(o, ["processed_this_run"]) for o in (a, b))
    for t in (ta, tb):
        t["summary.json"].pop("input_dir")
        t["summary.json"].pop("output_dir")
    boxes = {o: (o / "bounding_boxes.txt").read_bytes().replace(os.fsencode(o), b"OUT") for o in (a, b)}
    ta["bounding_boxes.txt"], tb["bounding_boxes.txt"] = boxes[a], boxes[b]
    assert sorted(ta) == sorted(tb)
    assert [k for k in ta if ta[k] != tb[k]] == []


@pytest.mark.parametrize("moment", ["before the records are rewritten", "between two moves"])
def test_a_fold_cut_short_is_finished_by_the_rerun(runs, inputs, tmp_path, moment):
    """What a kill -9 during the end's split fold leaves: the state folder (journals and all),
    Eve's thumbnail still in its split, and her record as the aligner journaled it (before
    the rewrite) or already held out (between two moves). The rerun ends in the same tree."""
    from align.records import dumps
    from align.splits import canonical
    out = tmp_path / "out"
    shutil.copytree(runs["full"], out)
    lines = (out / "faces.jsonl").read_bytes().splitlines(keepends=True)
    n, line = next((n, line) for n, line in enumerate(lines) if line.startswith(b'{"input": "Eve/'))
    journaled = (dumps(canonical(json.loads(line), False)) + "\n").encode()
    state = out / ".align_dataset"
    (state / "journal").mkdir(parents=True)
    (state / "journal" / "0123456789abcdef0123.jsonl").write_bytes(journaled)
    (state / "options.json").write_text(json.dumps(summary(out)["options"]))
    if moment == "before the records are rewritten":
        lines[n] = journaled
        (out / "faces.jsonl").write_bytes(b"".join(lines))
    eve = next((out / HELD_OUT / "Eve").iterdir())
    split = json.loads(line)["split"]
    (out / split / "Eve").mkdir()
    eve.rename(out / split / "Eve" / eve.name)
    ok(run_align(inputs["full"], out, *COMMON))
    assert_same_tree_of_splits(runs["full"], out)


def test_other_split_options_are_refused_and_overwrite_starts_over(runs, inputs, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(runs["full"], out)
    for args in (("--split_seed", 1), ("--split", "train=0.6,validation=0.2,test=0.2"), ()):
        base = COMMON[2:] if not args else COMMON
        p = run_align(inputs["full"], out, *base, *args)
        assert p.returncode == 2 and "--overwrite" in p.stderr, (args, p.stderr)
    ok(run_align(inputs["full"], out, *COMMON[2:], "--output_format", "rec", "--overwrite"))
    assert sorted(p.name for p in out.iterdir()) == sorted(TOP | {"train.rec", "train.idx", "property"})
    for bad in ("train=0.5,test=0.4", "held_out=0.5,test=0.5", "a=1,a=0"):
        p = run_align(inputs["full"], tmp_path / "new", "--split", bad)
        assert p.returncode == 2 and p.stderr.startswith("Error:"), p.stderr


# --- packed formats: one set of files per split ------------------------------------------------------

@pytest.fixture(scope="module")
def packed(inputs, tmp_path_factory) -> dict[str, Path]:
    """{name: OUTPUT_DIR}: "wds" (webdataset, one run on the full input), "wds_grown" (the
    partial input, then the full one: Dan's thumbnails move from held_out's shards into the
    splits'), "rec" (--split_by identity, rec)."""
    root = tmp_path_factory.mktemp("split_packed")
    out = {name: root / name for name in ("wds", "wds_grown", "rec")}
    ok(run_align(inputs["full"], out["wds"], *COMMON, "--output_format", "webdataset"))
    ok(run_align(inputs["partial"], out["wds_grown"], *COMMON, "--output_format", "webdataset"))
    ok(run_align(inputs["full"], out["wds_grown"], *COMMON, "--output_format", "webdataset"))
    ok(run_align(inputs["full"], out["rec"], "--split", "train=0.5,test=0.5", "--split_by", "identity",
                 "--output_format", "rec", "--image_size", 32, "--workers", 1, "--quiet"))
    return out


def test_webdataset_shards_per_split_label_alike(packed, runs):
    out = packed["wds"]
    assert sorted(p.name for p in out.iterdir()) == sorted(TOP | {*NAMES, HELD_OUT})
    tops = [out / n for n in NAMES] + [out / HELD_OUT]
    results = loaders.run_paths("webdataset", tops)
    recs = records(out)
    assert recs == records(runs["full"])            # the records are the same in every format
    labels = {}
    for top, result in zip(tops, results):
        assert result["error"] is None and result["decode_errors"] == [], (top, result["error"])
        expected = sorted(w["output"].split("/", 1)[1].rsplit(".", 1)[0] for r in recs for w in r["written"]
                          if w["output"].startswith(top.name + "/"))
        assert sorted(k for k, *_ in result["samples"]) == expected, top
        labels[top.name] = {key.split("/")[0]: label for key, label, *_ in result["samples"]}
    assert [labels[n] for n in NAMES] == [{"Ann": 0, "Bob": 1, "Cid": 2, "Dan": 3}] * 3
    assert labels[HELD_OUT] == {"Eve": 0}
    for top, result in zip(tops, results):      # the pixels are the folders layout's thumbnails
        for key, _, h, w, sha in result["samples"]:
            assert loaders.file_pixels(runs["full"] / top.name / f"{key}.png") == (h, w, sha)


def test_webdataset_with_photos_added_is_one_runs_bytes(packed):
    assert_same_tree_of_splits(packed["wds"], packed["wds_grown"])


def test_rec_per_split_with_the_identity_split(packed):
    from align.writers import IR_HEADER, rec_unframe
    out = packed["rec"]
    recs = records(out)
    for split in ("train", "test"):
        identities = sorted({r["input"].split("/")[0] for r in recs if r["split"] == split})
        if not identities:
            continue
        assert (out / split / "property").read_text() == f"{len(identities)},32,32\n"
        data, labels = (out / split / "train.rec").read_bytes(), []
        for line in (out / split / "train.idx").read_text().splitlines():
            payload, _ = rec_unframe(data[int(line.split("\t")[1]):])
            labels.append(int(IR_HEADER.unpack_from(payload)[1]))
        expected = [identities.index(r["input"].split("/")[0]) for r in recs if r["split"] == split
                    for _ in r["written"]]
        assert labels == expected, split
