"""Shards and journals: how a run cuts its work, and how records of several runs combine."""
from __future__ import annotations

import json
import os

import pytest

from align.dataset import MIN_SHARD, NAME_MAX, RESERVED, SHARD_SIZE, SUFFIX_ROOM, Task, cut_shards, walk
from align.records import StateDir


def tasks(n: int, per_identity: int = 1) -> list[Task]:
    return [Task(f"id{i // per_identity:05d}/{i:05d}.jpg", f"id{i // per_identity:05d}/{i:05d}")
            for i in range(n)]


@pytest.mark.parametrize("n, workers", [(1, 1), (7, 2), (530, 2), (530, 1), (5000, 16), (100, 64)])
def test_shards_cover_the_tasks_in_order_and_shrink_toward_the_end(n, workers):
    todo = tasks(n)
    shards = cut_shards(todo, workers)
    assert [t for s in shards for t in s.tasks] == todo
    sizes = [len(s.tasks) for s in shards]
    assert max(sizes) <= SHARD_SIZE
    assert all(size >= MIN_SHARD for size in sizes[:-1])
    assert sizes == sorted(sizes, reverse=True)
    assert len({s.key for s in shards}) == len(shards)


def test_two_workers_finish_within_a_small_shard_of_each_other():
    """530 photos on 2 workers: 16 shards of 32 and one of 18 left one worker a whole shard
    alone at the end; the shrinking cut leaves it at most MIN_SHARD photos more."""
    sizes = [len(s.tasks) for s in cut_shards(tasks(530), 2)]
    assert sizes == [32] * 13 + [29, 22, 16, 12, 9, 8, 8, 8, 2]
    finish = [0, 0]
    for size in sizes:                      # each shard to the worker that is free first
        finish[finish.index(min(finish))] += size
    assert abs(finish[0] - finish[1]) <= MIN_SHARD


def test_one_photo_identities_share_shards():
    """LFW: most identities hold one photo; they must not each make a shard (a journal, a
    detection batch) of their own."""
    shards = cut_shards(tasks(1000), 2)
    assert len(shards) < 1000 / MIN_SHARD
    assert len({t.rel.split("/")[0] for t in shards[0].tasks}) == SHARD_SIZE


def test_walk_lists_identities_then_files_sorted(tmp_path):
    for rel in ("b/2.jpg", "b/1.jpg", "a/x.png", "a/x.jpg"):
        (tmp_path / rel).parent.mkdir(exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    (tmp_path / "stray.jpg").write_bytes(b"")
    job = walk(tmp_path)
    assert [t.rel for t in job.tasks] == ["a/x.jpg", "a/x.png", "b/1.jpg", "b/2.jpg"]
    assert [t.out_base for t in job.tasks] == ["a/x.jpg", "a/x.png", "b/1", "b/2"]
    assert job.skipped == ["stray.jpg"]


def record(rel: str, status: str) -> dict:
    return {"input": rel, "status": status, "reason": None, "size": None, "output": rel,
            "faces": [], "written": []}


@pytest.mark.parametrize("error_journal, retry_journal", [("a", "b"), ("b", "a")])
def test_a_finished_record_wins_over_an_error_in_another_journal(tmp_path, error_journal, retry_journal):
    """Run 1 recorded "error" for x in one shard's journal; run 2, cutting its shards
    otherwise, retried x into another journal. Whichever journal sorts last, x is done."""
    state = StateDir(tmp_path)
    state.journals.mkdir(parents=True)
    state.journal(error_journal).append([record("p/x.jpg", "error"), record("p/y.jpg", "aligned")])
    state.journal(retry_journal).append([record("p/x.jpg", "aligned"), record("p/z.jpg", "error")])
    loaded = state.load_all()
    assert {rel: r["status"] for rel, r in loaded.items()} == {
        "p/x.jpg": "aligned", "p/y.jpg": "aligned", "p/z.jpg": "error"}
    lines = (state.journals / f"{error_journal}.jsonl").read_text().splitlines()
    assert [json.loads(line)["status"] for line in lines] == ["error", "aligned"]   # untouched


# --- names that cannot be used as they are ---------------------------------------------------

def make(root, *rels, folders=()):
    for rel in rels:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"")
    for rel in folders:
        (root / rel).mkdir(parents=True)


def test_names_too_long_for_the_file_system_get_short_deterministic_names(tmp_path):
    """A 255-byte name, and two 251-byte names sharing a stem (so keeping their whole, 255-byte
    names): each output name fits NAME_MAX with the face suffix and extension, they differ,
    and the task keeps the natural name."""
    lone, clash = "a" * 251 + ".jpg", "b" * 251
    make(tmp_path, f"p/{lone}", f"p/{clash}.jpg", f"p/{clash}.png", "p/short.jpg", "p/" + "c" * 245 + ".jpg")
    by_rel = {t.rel: t for t in walk(tmp_path).tasks}
    names = {}
    for rel, task in by_rel.items():
        identity, stem = task.out_base.split("/")
        assert identity == "p"
        assert len(os.fsencode(stem)) + SUFFIX_ROOM <= NAME_MAX, rel
        names[rel] = stem
    assert names["p/short.jpg"] == "short" and by_rel["p/short.jpg"].natural is None
    assert names["p/" + "c" * 245 + ".jpg"] == "c" * 245          # the longest stem that fits
    for rel, natural in [(f"p/{lone}", "a" * 251), (f"p/{clash}.jpg", f"{clash}.jpg"),
                         (f"p/{clash}.png", f"{clash}.png")]:
        assert by_rel[rel].natural == f"p/{natural}"
        assert "~" in names[rel] and names[rel].startswith(natural[:100])
    assert names[f"p/{clash}.jpg"] != names[f"p/{clash}.png"]
    assert [t.out_base for t in walk(tmp_path).tasks] == [t.out_base for t in by_rel.values()]


def test_multibyte_names_are_cut_between_characters(tmp_path):
    name = "é" * 125 + "x.jpg"          # 255 bytes of UTF-8
    make(tmp_path, f"p/{name}")
    (task,) = walk(tmp_path).tasks
    stem = task.out_base.split("/")[1]
    stem.encode("utf-8")                # no half character (a surrogate) in it
    assert stem.startswith("é" * 50) and len(stem.encode()) + SUFFIX_ROOM <= NAME_MAX


def test_control_characters_never_reach_an_output_name(tmp_path):
    """bounding_boxes.txt holds one path per line: no output path may hold a newline."""
    make(tmp_path, "p/two\nlines.jpg", "p/tab\there.jpg", "new\nline/x.jpg")
    tasks = walk(tmp_path).tasks
    assert [t.rel for t in tasks] == ["new\nline/x.jpg", "p/tab\there.jpg", "p/two\nlines.jpg"]
    for t in tasks:
        assert not any(ord(c) < 32 for c in t.out_base), t
        assert t.natural is not None
    assert tasks[0].out_base.startswith("new_line~") and tasks[0].out_base.endswith("/x")
    assert tasks[2].out_base.startswith("p/two_lines~")


def test_identities_named_like_our_records_get_escaped_folders(tmp_path):
    names = sorted(RESERVED) + [".tmp-abc.tmp"]
    make(tmp_path, *(f"{n}/x.jpg" for n in names), "plain/x.jpg")
    tasks = {t.rel.split("/")[0]: t for t in walk(tmp_path).tasks}
    assert tasks["plain"].out_base == "plain/x" and tasks["plain"].natural is None
    for n in names:
        identity = tasks[n].out_base.split("/")[0]
        assert identity.startswith(n + "~") and identity not in RESERVED, identity
        assert tasks[n].natural == f"{n}/x"


def test_a_folder_inside_an_identity_is_a_task(tmp_path):
    """Its record (the worker finds no image in it) says so; it does not change the output
    names of the files beside it."""
    make(tmp_path, "p/x.png", folders=["p/x.jpg", "p/sub"])
    tasks = walk(tmp_path).tasks
    assert [t.rel for t in tasks] == ["p/sub", "p/x.jpg", "p/x.png"]
    assert tasks[2].out_base == "p/x"
