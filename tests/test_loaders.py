"""The trainers' own loaders on OUTPUT_DIR as align_dataset leaves it: facenet's get_dataset,
torchvision's ImageFolder, Keras's image_dataset_from_directory and Hugging Face's imagefolder
(tests/loaders.py runs each, for real). Each must see exactly the identities with a face as its
classes and exactly the written thumbnails as its samples, labelled by identity, every one
decoded to the file's pixels: after a default run (an identity without a face, a file that is
not an image), --detect_multiple_faces, --align arcface, a killed-then-resumed run, a Dask run,
and a folder where photos were added after a finished run."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import loaders
from test_cli import (assert_training_set, kill_after_a_journal_line, n_inputs, ok, records,
                      run_align, sample_dir, start_align)  # noqa: F401 (sample_dir: a fixture)
from test_layout import job  # noqa: F401 (a fixture)

RUNS = ("default", "multiple", "arcface", "resumed", "dask", "added")


@pytest.fixture(scope="module")
def outputs(job, tmp_path_factory) -> dict[str, Path]:     # noqa: F811
    """{run: its finished OUTPUT_DIR}, each a real run of the command on `job`."""
    root = tmp_path_factory.mktemp("loaders")
    out = {name: root / name for name in RUNS}
    common = ("--workers", 1, "--quiet")
    ok(run_align(job, out["default"], *common))
    ok(run_align(job, out["multiple"], "--detect_multiple_faces", *common))
    ok(run_align(job, out["arcface"], "--align", "arcface", *common))
    kill_after_a_journal_line(start_align(job, out["resumed"], "--workers", 2, "--quiet"),
                              out["resumed"], n_inputs(job))
    ok(run_align(job, out["resumed"], *common))
    ok(run_align(job, out["dask"], "--engine", "dask", "--workers", 2, "--quiet"))
    partial = root / "partial-in"
    shutil.copytree(job, partial)
    held = sorted((partial / "Ann").iterdir())[-2:]
    for p in held:
        p.rename(root / p.name)
    ok(run_align(partial, out["added"], *common))
    for p in held:
        (root / p.name).rename(p)
    ok(run_align(partial, out["added"], *common))
    return out


def on_disk(out: Path) -> dict[str, tuple]:
    """{relative path: (identity, h, w, sha256 of the pixels)} of every thumbnail under `out`,
    read from the file system (PIL), the expectation every loader is held to."""
    found = {}
    for path in sorted(out.glob("*/*")):
        found[path.relative_to(out).as_posix()] = (path.parent.name, *loaders.file_pixels(path))
    return found


@pytest.fixture(scope="module")
def seen(outputs) -> dict[str, list[dict]]:
    """{loader: [its result on each run's OUTPUT_DIR, in RUNS order]}."""
    return {kind: loaders.run_paths(kind, [outputs[r] for r in RUNS]) for kind in loaders.FOLDER_LOADERS}


def test_the_outputs_are_training_sets(outputs):
    for name, out in outputs.items():
        assert_training_set(out)
        written = sorted(w["output"] for r in records(out) for w in r["written"])
        assert written == sorted(on_disk(out)), name
        assert "Zed" not in {p.name for p in out.iterdir()}, f"{name}: the identity without a face"
    assert (outputs["multiple"] / "Ann").is_dir() and len(on_disk(outputs["multiple"])) > len(on_disk(outputs["default"]))


@pytest.mark.parametrize("kind", loaders.FOLDER_LOADERS)
def test_each_loader_sees_the_identities_and_the_thumbnails(outputs, seen, kind):
    for name, result in zip(RUNS, seen[kind]):
        expected = on_disk(outputs[name])
        assert result["error"] is None, (name, result["error"])
        assert result["decode_errors"] == [], (name, result["decode_errors"])
        assert result["classes"] == sorted({identity for identity, *_ in expected.values()}), name
        assert loaders.by_key(result) == expected, name
