"""Shards and journals: how a run cuts its work, and how records of several runs combine."""
from __future__ import annotations

import json

import pytest

from align.dataset import MIN_SHARD, SHARD_SIZE, Task, cut_shards, walk
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
