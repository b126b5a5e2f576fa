"""Faults and hostile options: which failures a rerun retries, and the bounds on one photo's
work and on a run's resources (each checked before the work)."""
from __future__ import annotations

import errno
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from align.aligner import Aligner
from align.config import MAX_IMAGE_SIZE, WORKER_MEMORY_BYTES, Config, DetectParams, bounded_workers
from align.dataset import Shard, Task
from align.detect import MAX_PYRAMID_LEVEL_PIXELS, TooCostly
from align.imageio import UnreadableImage
from align.records import StateDir, is_transient, needs_work
from test_cli import sample_dir  # noqa: F401 (a fixture)


def shard_of(*names: str) -> Shard:
    return Shard("k", tuple(Task(f"p/{n}", f"p/{n.rsplit('.', 1)[0]}") for n in names))


def run(detector, root, shard, **options) -> list[dict]:
    state = StateDir(root / "out")
    state.journals.mkdir(parents=True, exist_ok=True)
    aligner = Aligner(Config(workers=1, image_size=32, **options), root / "in", root / "out", detector)
    return aligner.run_shard(shard, state.journal(shard.key))


def test_a_photo_that_vanished_is_retried_once_it_is_back(detector, sample_paths, tmp_path):
    """Deleted (or mid-replace) between the walk and its read: "error", not "unreadable", so
    the next run looks at it again and aligns it."""
    (tmp_path / "in" / "p").mkdir(parents=True)
    shutil.copyfile(sample_paths["grace_hopper.jpg"], tmp_path / "in" / "p" / "a.jpg")
    shard = shard_of("a.jpg", "b.jpg")              # b.jpg was listed, then vanished
    first = run(detector, tmp_path, shard)
    assert [r["status"] for r in first] == ["aligned", "error"]
    assert first[1]["reason"] == "no such file or directory"
    assert needs_work(first[1])
    shutil.copyfile(sample_paths["grace_hopper.jpg"], tmp_path / "in" / "p" / "b.jpg")
    second = run(detector, tmp_path, shard)
    assert [r["status"] for r in second] == ["aligned", "aligned"]
    assert second[0] == first[0]                    # done once, not redone
    loaded = StateDir(tmp_path / "out").load_all()
    assert {rel: r["status"] for rel, r in loaded.items()} == {"p/a.jpg": "aligned", "p/b.jpg": "aligned"}


@pytest.mark.parametrize("error, transient", [
    (OSError(errno.ENOENT, "x"), True), (OSError(errno.EACCES, "x"), True),
    (OSError(errno.EIO, "x"), True), (OSError(errno.ENOSPC, "x"), True),
    (OSError(errno.ENAMETOOLONG, "x"), True), (MemoryError(), True),
    (OSError(errno.ELOOP, "x"), False), (UnreadableImage("truncated image: x"), False),
    (ValueError("x"), False), (TooCostly("x"), False)])
def test_which_failures_are_retried(error, transient):
    wrapped = UnreadableImage("reason")
    wrapped.__cause__ = error
    assert is_transient(error) is transient
    assert is_transient(wrapped) is transient


def big_photo(sample_paths, tmp_path, side=2048) -> Path:
    (tmp_path / "in" / "p").mkdir(parents=True)
    with Image.open(sample_paths["t1.jpg"]) as im:
        im.convert("RGB").resize((side, side * 886 // 1280)).save(tmp_path / "in" / "p" / "big.jpg")
    return tmp_path / "in" / "p" / "big.jpg"


@pytest.mark.parametrize("options, says", [({"min_face_size": 1}, "raise --min_face_size"),
                                           ({"factor": 0.999}, "lower --factor"),
                                           ({"thresholds": (0, 0, 0)}, "raise --thresholds")])
def test_a_photo_too_costly_for_the_options_is_one_permanent_record(detector, sample_paths, tmp_path,
                                                                     options, says):
    """A 2.9 Mpx photo at --min_face_size 1 would need a 400 Mpx pyramid level; at --factor
    0.999 a thousand levels; at --thresholds 0,0,0 every window passes and NMS would take
    minutes. Each is refused before that work, as a record no rerun retries."""
    big_photo(sample_paths, tmp_path)
    (record,) = run(detector, tmp_path, shard_of("big.jpg"), **options)
    assert record["status"] == "too_costly", record
    assert record["reason"].startswith("too costly for the options") and says in record["reason"]
    assert not needs_work(record)
    assert record["written"] == []


def test_detect_faces_refuses_a_pyramid_level_too_large(detector, sample_images):
    """detect_faces(..., minsize=0.05) would ask for a 10 GiB level: a ValueError, at once."""
    with pytest.raises(TooCostly, match="raise --min_face_size") as e:
        detector.detect(sample_images["t1.jpg"], DetectParams(minsize=0.05))
    assert isinstance(e.value, ValueError) and str(MAX_PYRAMID_LEVEL_PIXELS) in str(e.value)


def test_more_r_net_candidates_than_o_net_takes_are_refused(detector, sample_images):
    """A 1920 px mosaic of 6,400 faces of 24 px (t1.jpg's six, tiled) with R-Net passing every
    candidate (--thresholds 0.98,0,0.7) leaves 10,097 candidates for O-Net: refused, over
    MAX_ONET_CANDIDATES, before O-Net runs on them."""
    from align.detect import MAX_ONET_CANDIDATES
    group = sample_images["t1.jpg"]
    tiles = [np.asarray(Image.fromarray(group[max(0, y1):y2, max(0, x1):x2]).resize((24, 24)))
             for x1, y1, x2, y2 in detector.detect(group).boxes.astype(int)]
    assert len(tiles) == 6
    mosaic = np.concatenate([np.concatenate([tiles[(i * 80 + j) % 6] for j in range(80)], axis=1)
                             for i in range(80)])
    assert mosaic.shape == (1920, 1920, 3)
    with pytest.raises(TooCostly, match=f"R-Net candidates for O-Net \\(limit {MAX_ONET_CANDIDATES}\\); "
                                        f"raise --thresholds") as e:
        detector.detect(mosaic, DetectParams(thresholds=(0.98, 0, 0.7)))
    assert MAX_ONET_CANDIDATES == 5_000 and int(str(e.value).split()[5]) > 2 * MAX_ONET_CANDIDATES


def test_default_options_never_hit_the_pyramid_bounds():
    """The largest photo imageio decodes, at the default options, is searched as before."""
    from align.detect import cost_refusal
    from align.imageio import MAX_PIXELS
    for w, h in [(10_000, 6_000), (7_746, 7_746), (60_000, 1_000), (MAX_PIXELS, 1)]:
        assert cost_refusal(h, w, DetectParams()) is None, (w, h)


@pytest.mark.parametrize("options", [{"min_face_size": math.inf}, {"min_face_size": math.nan},
                                     {"image_size": MAX_IMAGE_SIZE + 1}, {"image_size": 30000}])
def test_options_without_bounds_are_refused(options):
    with pytest.raises(ValueError):
        Config(**options)


def test_workers_are_bounded_by_shards_cores_and_memory():
    gb = 1_000_000_000
    assert WORKER_MEMORY_BYTES == 1.5 * gb
    assert bounded_workers(8, 3, available=64 * gb, cores=64) == (3, None)    # the shards bound them
    assert bounded_workers(1, 0, available=64 * gb, cores=64) == (1, None)
    assert bounded_workers(4, 10, available=6 * gb, cores=64) == (4, None)    # exactly 4 x 1.5 GB
    assert bounded_workers(5, 10, available=6 * gb, cores=64)[0] == 4         # one more does not fit
    n, warning = bounded_workers(10_000, 10_000, available=int(6.9 * gb), cores=64)
    assert n == 4
    assert warning == ("--workers 10000: this machine has 64 usable core(s); starting 64 at most; "
                       "--workers 10000: 6.9 GB of memory available holds 4 worker(s) of ~1.5 GB; "
                       "starting 4")
    n, warning = bounded_workers(3, 10, available=gb, cores=64)              # less than one worker's
    assert n == 1 and "holds 1 worker(s)" in warning
    n, warning = bounded_workers(200, 10_000, available=64 * gb, cores=2)     # the cores bound them
    assert (n, warning) == (2, "--workers 200: this machine has 2 usable core(s); starting 2 at most")
    # by default, the cores usable and the memory available now: no 10,000 workers here
    n, warning = bounded_workers(10_000, 10_000)
    assert 1 <= n <= os.cpu_count() and "usable core(s)" in warning and "--workers 10000" in warning


def test_more_workers_than_cores_are_capped_with_a_warning(sample_dir, tmp_path):
    """--workers 200 on this machine: as many workers as usable cores (each a framework's
    memory), a warning line, and the run as with the default."""
    from test_cli import ok, run_align, summary
    p = run_align(sample_dir, tmp_path / "out", "--workers", 200, "--quiet")
    ok(p)
    assert f"--workers 200: this machine has {len(os.sched_getaffinity(0))} usable core(s)" in p.stderr, p.stderr
    assert summary(tmp_path / "out")["workers"] <= len(os.sched_getaffinity(0))


@pytest.mark.parametrize("spelling, value", [("--detect_multiple_faces=True", True),
                                             ("--detect_multiple_faces=False", False),
                                             ("--detect-multiple-faces=yes", True),
                                             ("--detect_multiple_faces", True), ("", False)])
def test_detect_multiple_faces_spellings(spelling, value, tmp_path):
    from align.cli import main
    ctx = main.make_context("align_dataset", [str(tmp_path), str(tmp_path / "out"), *filter(None, [spelling])])
    assert ctx.params["detect_multiple_faces"] is value


@pytest.mark.parametrize("args", [(None, "out"), ("in", None), (3, "out")])
def test_align_dataset_wants_paths(args, tmp_path, monkeypatch):
    from align import align_dataset
    monkeypatch.chdir(tmp_path)
    (tmp_path / "None").mkdir()                 # what a None used to be taken for
    (tmp_path / "in").mkdir()
    with pytest.raises(TypeError, match="must be a path"):
        align_dataset(*args)
    assert not (tmp_path / "out").exists()
