"""OUTPUT_DIR as a finished run leaves it: a training set as it stands (identity folders of
thumbnails, plain records at the top, no state folder, no empty folder), and every resume
promise kept from the top-level records alone: a kill during the fold, the previous release's
layout, photos added later, error records retried, options refused, no photo re-read."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from PIL import Image

from test_cli import (REPO, TOP_FILES, assert_same_tree, assert_training_set, describe, kill_group,
                      ok, one_error_line, read_jsonl, records, run_align, sample, sample_dir,  # noqa: F401
                      snapshot, start_align, summary)

STATE = ".align_dataset"
PREVIOUS_RELEASE = "36fdfce"        # the last commit that left .align_dataset/ after a finished run


@pytest.fixture(scope="module")
def job(sample_dir, tmp_path_factory) -> Path:
    """12 inputs in 5 identities: copies of the samples, an identity whose only photo has no
    face, and a file that is not an image."""
    root = tmp_path_factory.mktemp("layout") / "in"
    photos = [sample(sample_dir, n) for n in ("astronaut.png", "grace_hopper.jpg", "t1.jpg")]
    for identity, n in {"Ann": 4, "Bob": 3, "Cid": 3}.items():
        (root / identity).mkdir(parents=True)
        for i in range(n):
            src = photos[(i + len(identity)) % 3]
            shutil.copyfile(src, root / identity / f"{i:02d}{src.suffix}")
    (root / "Bob" / "notes.jpg").write_text("not a photo\n")
    (root / "Zed").mkdir()
    with Image.open(photos[0]) as im:
        im.crop((300, 300, 512, 512)).save(root / "Zed" / "arm.png")     # the suit's arm: no face
    return root


@pytest.fixture(scope="module")
def finished(job, tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("finished")
    ok(run_align(job, "out", "--workers", 1, "--quiet", cwd=cwd))
    return cwd / "out"


def copy_of(finished: Path, tmp_path: Path) -> Path:
    shutil.copytree(finished, tmp_path / "out")
    return tmp_path / "out"


def pictures(report: Path) -> list[str]:
    return sorted(re.findall(r'src="(data:[^"]+)"', report.read_text()))


def test_a_finished_run_is_a_training_set(finished):
    assert_training_set(finished)
    assert sorted(p.name for p in finished.iterdir()) == sorted(["Ann", "Bob", "Cid", *TOP_FILES])
    s = summary(finished)
    assert (s["images"], s["aligned"], s["no_face"], s["not_an_image"]) == (12, 10, 1, 1)
    assert s["options"]["image_size"] == 182 and s["legacy_outputs"] is False
    assert [r["status"] for r in records(finished) if r["input"].startswith("Zed/")] == ["no_face"]


def test_a_refused_rerun_leaves_the_folder_as_it_was(job, finished, tmp_path):
    out = copy_of(finished, tmp_path)
    before = snapshot(out)
    p = run_align(job, out, "--workers", 1, "--margin", 10, timeout=120)
    assert p.returncode == 2 and "margin 44 -> 10" in one_error_line(p), describe(p)
    assert snapshot(out) == before
    assert_training_set(out)


def test_a_kill_while_the_run_folds_its_state_away_then_the_rerun(job, finished, tmp_path):
    """kill -9 once the records are written and the state folder is still there (the report is
    being drawn, or the state removed): the rerun ends with the uninterrupted run's bytes."""
    out = tmp_path / "out"
    proc = start_align(job, "out", "--workers", 1, "--quiet", cwd=tmp_path)
    deadline = time.monotonic() + 300
    while not ((out / "summary.json").exists() and (out / STATE).exists()):
        assert proc.poll() is None, "the run ended before it was caught folding (try again)"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)
    kill_group(proc)
    assert (out / STATE).exists()
    ok(run_align(job, "out", "--workers", 1, "--quiet", cwd=tmp_path))
    assert summary(out)["processed_this_run"] == 0
    assert_same_tree(finished, out, ignore_summary_keys=["processed_this_run"])


def test_a_fold_cut_short_after_half_the_journals(job, finished, tmp_path):
    """The state a kill leaves half-way through removing the journals (the top-level records
    written, some journals left, holding what faces.jsonl holds): resumed without work."""
    out = copy_of(finished, tmp_path)
    lines = (out / "faces.jsonl").read_bytes().splitlines(keepends=True)
    (out / STATE / "journal").mkdir(parents=True)
    (out / STATE / "journal" / "b.jsonl").write_bytes(b"".join(lines[5:9]))
    (out / STATE / "journal" / "c.jsonl").write_bytes(b"".join(lines[10:]))
    (out / STATE / "options.json").write_text(json.dumps(summary(out)["options"]))
    p = ok(run_align(job, "out", "--workers", 1, cwd=tmp_path))
    assert "nothing left to do" in p.stdout
    assert_same_tree(finished, out, ignore_summary_keys=["processed_this_run"])


def previous_release(tmp_path: Path) -> Path | None:
    """The source of PREVIOUS_RELEASE (from this checkout's history), or None without one."""
    git = shutil.which("git")
    if not git or subprocess.run([git, "-C", REPO, "cat-file", "-e", PREVIOUS_RELEASE],
                                 capture_output=True).returncode != 0:
        return None
    src = tmp_path / "previous"
    src.mkdir()
    archive = subprocess.run([git, "-C", REPO, "archive", PREVIOUS_RELEASE, "align", "facenet_nets", "data"],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", src], input=archive, check=True)
    return src


def test_the_previous_releases_output_resumes_into_the_new_layout(job, finished, weights, tmp_path):
    """OUTPUT_DIR as the previous release's finished run left it (.align_dataset/ with its
    journals, report pictures and options; an empty folder for the identity without a face),
    then two photos added: this release aligns those two and ends with the uninterrupted
    run's tree, the state folder gone."""
    src = previous_release(tmp_path)
    if src is None:
        pytest.skip(f"this checkout has no git history with {PREVIOUS_RELEASE} (a source tarball?)")
    partial = tmp_path / "in"
    shutil.copytree(job, partial)
    added = sorted((partial / "Ann").iterdir())[-2:]
    for p in added:
        p.unlink()
    env = {"PYTHONPATH": str(src), "ALIGN_WEIGHTS_DIR": str(weights)}
    ok(run_align(partial, "out", "--workers", 1, "--quiet", cwd=tmp_path, env=env))
    out = tmp_path / "out"
    assert (out / STATE / "journal").is_dir() and (out / STATE / "report").is_dir()
    assert (out / "Zed").is_dir() and not any((out / "Zed").iterdir())
    for p in added:
        shutil.copyfile(job / "Ann" / p.name, p)
    ok(run_align(partial, "out", "--workers", 1, "--quiet", cwd=tmp_path))
    assert summary(out)["processed_this_run"] == 2
    ignore = ["processed_this_run", "input_dir"]
    assert_same_tree(finished, out, ignore_summary_keys=ignore)


def test_photos_added_after_a_finished_run_are_the_only_work(job, finished, tmp_path):
    partial = tmp_path / "in"
    shutil.copytree(job, partial)
    added = [partial / "Bob" / "01.jpg", partial / "Zed" / "arm.png", partial / "Cid" / "02.png"]
    added = [p for p in added if p.exists()]
    held = tmp_path / "held"
    held.mkdir()
    for p in added:
        shutil.move(p, held / f"{p.parent.name}-{p.name}")
    ok(run_align(partial, "out", "--workers", 1, "--quiet", cwd=tmp_path))
    out = tmp_path / "out"
    assert_training_set(out)
    for p in added:
        p.parent.mkdir(exist_ok=True)
        shutil.move(held / f"{p.parent.name}-{p.name}", p)
    ok(run_align(partial, "out", "--workers", 1, "--quiet", cwd=tmp_path))
    assert summary(out)["processed_this_run"] == len(added)
    assert_same_tree(finished, out, ignore_summary_keys=["processed_this_run", "input_dir"])


def test_error_records_of_a_finished_run_are_retried(job, finished, tmp_path):
    """A finished run whose records hold an "error" (a photo that could not be read then): the
    rerun aligns that photo alone, from faces.jsonl, with no journal to go by."""
    out = copy_of(finished, tmp_path)
    rows = read_jsonl(out / "faces.jsonl")
    victim = next(r for r in rows if r["input"].startswith("Cid/") and r["status"] == "aligned")
    for w in victim["written"]:
        (out / w["output"]).unlink()
    failed = dict(victim, status="error", reason="[Errno 5] Input/output error", faces=[], written=[])
    (out / "faces.jsonl").write_text("".join(json.dumps(failed if r is victim else r, separators=(", ", ": ")) + "\n"
                                             for r in rows))
    ok(run_align(job, "out", "--workers", 1, "--quiet", cwd=tmp_path))
    assert summary(out)["processed_this_run"] == 1
    assert_same_tree(finished, out, ignore_summary_keys=["processed_this_run"])


def test_a_rerun_of_a_finished_job_reads_no_photo(job, finished, tmp_path):
    """Every input photo replaced by other bytes under its name: a rerun reads none of them
    (the records come from faces.jsonl, the report's pictures from the previous report)."""
    changed = tmp_path / "in"
    shutil.copytree(job, changed)
    for p in changed.glob("*/*"):
        p.write_bytes(b"read me and you will see")
    out = copy_of(finished, tmp_path)
    ok(run_align(changed, "out", "--workers", 1, "--quiet", cwd=tmp_path))
    assert (out / "faces.jsonl").read_bytes() == (finished / "faces.jsonl").read_bytes()
    assert pictures(out / "report.html") == pictures(finished / "report.html")
    assert summary(out)["workers"] == 0


def test_an_identity_linked_into_output_dir_is_refused(job, finished, tmp_path):
    """INPUT2/Ann -> OUTPUT_DIR/Ann: aligning INPUT2 into OUTPUT_DIR would write over Ann's
    thumbnails, its own inputs. A usage error that changes nothing; a linked file likewise."""
    out = copy_of(finished, tmp_path)
    before = snapshot(out)
    for name, target in (("Ann", out / "Ann"), ("Bob", next((out / "Cid").iterdir()))):
        second = tmp_path / f"in-{name}"
        shutil.copytree(job, second)
        if target.is_dir():
            shutil.rmtree(second / name)
            (second / name).symlink_to(target)
        else:
            linked = sorted((second / "Bob").iterdir())[0]
            linked.unlink()
            linked.symlink_to(target)
        p = run_align(second, out, "--workers", 1, timeout=120)
        assert p.returncode == 2, describe(p)
        line = one_error_line(p)
        assert "link into OUTPUT_DIR" in line and str(second) in line, line
        assert snapshot(out) == before


def test_a_photo_too_costly_for_the_options_has_its_own_status(sample_dir, tmp_path):
    (tmp_path / "in" / "Big").mkdir(parents=True)
    with Image.open(sample(sample_dir, "t1.jpg")) as im:
        im.convert("RGB").resize((2048, 1418)).save(tmp_path / "in" / "Big" / "big.jpg")
    shutil.copyfile(sample(sample_dir, "grace_hopper.jpg"), tmp_path / "in" / "Big" / "small.jpg")
    p = ok(run_align(tmp_path / "in", tmp_path / "out", "--workers", 1, "--min_face_size", 4))
    assert "1 too costly for the options" in p.stdout, p.stdout
    s = summary(tmp_path / "out")
    assert (s["too_costly"], s["aligned"], s["unreadable"]) == (1, 1, 0)
    (big,) = [r for r in records(tmp_path / "out") if r["status"] == "too_costly"]
    assert big["input"] == "Big/big.jpg" and "raise --min_face_size" in big["reason"]
    html = (tmp_path / "out" / "report.html").read_text()
    assert "too costly" in html and "Big/big.jpg" in html
    assert_training_set(tmp_path / "out")
