"""The streaming merge (Records): which record of an input wins, input order, torn journals,
and the bytes of faces.jsonl and bounding_boxes.txt against the records each test wrote into the
journals, laid out by hand (expected_merge)."""
from __future__ import annotations

import json
import os
import pickle

import pytest

from align.dataset import Shard, Task, walk
from align.records import Journal, MissingRecord, Records, StateDir

OUTPUT_ARG = "~/out dir/é"      # as the user typed it: bounding_boxes.txt repeats it


# --- the expected files, by hand: from the records each test says must win, in input order -------
def line(record: dict) -> str:
    """A record as faces.jsonl (and a journal) holds it: one JSON object, ASCII, ", " and ": "."""
    return json.dumps(record, separators=(", ", ": ")) + "\n"


def expected_merge(winners: list[dict]) -> tuple[bytes, bytes, dict]:
    """(faces.jsonl, bounding_boxes.txt, counts) of a job whose records, in input order, are
    `winners`: one line each; facenet's box lines (OUTPUT_ARG/output x1 y1 x2 y2 per face
    written, the output alone for no face, nothing for the rest)."""
    faces = "".join(line(r) for r in winners)
    boxes = []
    for r in winners:
        if r["status"] == "aligned":
            boxes += [f"{OUTPUT_ARG}/{w['output']} {' '.join(str(v) for v in w['crop_box'])}\n" for w in r["written"]]
        elif r["status"] == "no_face":
            boxes.append(f"{OUTPUT_ARG}/{r['output']}\n")
    counts = dict.fromkeys(["aligned", "no_face", "unreadable", "too_costly", "not_an_image", "skipped_existing", "error"], 0)
    for r in winners:
        counts[r["status"]] += 1
    counts["faces_written"] = sum(len(r["written"]) for r in winners)
    return faces.encode("ascii"), "".join(boxes).encode("utf-8", "surrogateescape"), counts


def merged(state: StateDir, tasks: list[Task]) -> tuple[bytes, bytes, dict]:
    out = state.root.parent
    index = Records(state, OUTPUT_ARG)
    list(index.plan(iter(tasks)))
    counts = index.merge(out)
    return (out / "faces.jsonl").read_bytes(), (out / "bounding_boxes.txt").read_bytes(), counts


def reference_journal_load(path) -> dict[str, dict]:
    """Journal.load as it was: json.loads of each line, until the first that is torn."""
    records, good = {}, 0
    data = path.read_bytes()
    for line in data.splitlines(keepends=True):
        if not line.endswith(b"\n"):
            break
        try:
            record = json.loads(line)
        except ValueError:
            break
        records[record["input"]] = record
        good += len(line)
    with open(path, "r+b") as f:
        f.truncate(good)
    return records


# --- hand-made journals -----------------------------------------------------------------------------
def task(rel: str) -> Task:
    return Task(rel, os.path.splitext(rel)[0])


def record(rel: str, status: str, faces: int = 1, reason: str | None = None) -> dict:
    out = os.path.splitext(rel)[0] + ".png"
    r = {"input": rel, "status": status, "reason": reason, "size": None, "output": out,
         "faces": [], "written": []}
    if status in ("aligned", "no_face"):
        r["size"] = [250, 187]
    if status == "aligned":
        r["faces"] = [{"box": [10.123456789012345 + k, 20.5, 110.25, 140.0000001], "score": 0.9999740123748779,
                       "landmarks": [[40.1, 60.2], [80.3, 60.4], [60.5, 80.6], [45.7, 100.8], [75.9, 100.0]]}
                      for k in range(faces)]
        r["written"] = [{"face": k, "crop_box": [0, 1 + k, 150, 170], "output": out if faces == 1 else
                         f"{os.path.splitext(rel)[0]}_{k}.png"} for k in range(faces)]
    return r


@pytest.fixture
def state(tmp_path) -> StateDir:
    s = StateDir(tmp_path / "out")
    s.journals.mkdir(parents=True)
    return s


# the walk's order, which is not the order of the input paths as strings ("a b/" < "a/"):
# identities by name ("a" < "a b" < "z" < "é"), then their files by name ("10" < "2"); names that
# are not ASCII, and one that was not valid UTF-8 (a surrogate escape, as os.fsdecode gives it)
TASKS = [task(rel) for rel in ("a/10.jpg", "a/2.jpg", "a b/x.jpg", "z/cat.txt", "z/dog.jpg",
                               "z/\udcff.jpg", "é/ü.jpg")]
STATUS = ["no_face", "aligned", "aligned", "not_an_image", "aligned", "unreadable", "aligned"]


def test_merge_writes_the_records_in_input_order_whatever_journal_holds_them(state):
    recs = [record(t.rel, s, faces=2 if i == 6 else 1) for i, (t, s) in enumerate(zip(TASKS, STATUS))]
    state.journal("c").append([recs[4], recs[1]])           # journal order is not input order
    state.journal("a").append([recs[6], recs[3], recs[0]])
    state.journal("b").append([recs[5], recs[2], record("gone/x.jpg", "aligned")])  # not in the walk
    faces, boxes, counts = merged(state, TASKS)
    assert [json.loads(line)["input"] for line in faces.splitlines()] == [t.rel for t in TASKS]
    assert (faces, boxes, counts) == expected_merge(recs)
    assert counts == {"aligned": 4, "no_face": 1, "unreadable": 1, "too_costly": 0, "not_an_image": 1,
                      "skipped_existing": 0, "error": 0, "faces_written": 5}
    assert boxes.decode("utf-8", "surrogateescape").splitlines() == [
        "~/out dir/é/a/10.png", "~/out dir/é/a/2.png 0 1 150 170",
        "~/out dir/é/a b/x.png 0 1 150 170", "~/out dir/é/z/dog.png 0 1 150 170",
        "~/out dir/é/é/ü_0.png 0 1 150 170", "~/out dir/é/é/ü_1.png 0 2 150 170"]
    assert b"\\udcff" in faces                     # the journal's JSON escape, copied as it is


@pytest.mark.parametrize("error_journal, retry_journal", [("a", "b"), ("b", "a")])
def test_a_finished_record_wins_over_an_error_in_another_journal(state, error_journal, retry_journal):
    tasks = [task("p/x.jpg"), task("p/y.jpg"), task("p/z.jpg")]
    state.journal(error_journal).append([record("p/x.jpg", "error", reason="MemoryError: "),
                                         record("p/y.jpg", "aligned")])
    state.journal(retry_journal).append([record("p/x.jpg", "aligned"),
                                         record("p/z.jpg", "error", reason="OSError: full")])
    index = Records(state, OUTPUT_ARG)
    assert list(index.plan(iter(tasks))) == [tasks[2]]
    faces, boxes, counts = merged(state, tasks)
    assert [json.loads(line)["status"] for line in faces.splitlines()] == ["aligned", "aligned", "error"]
    assert (faces, boxes, counts) == expected_merge([record("p/x.jpg", "aligned"), record("p/y.jpg", "aligned"),
                                                     record("p/z.jpg", "error", reason="OSError: full")])
    assert counts["error"] == 1 and counts["aligned"] == 2


def test_within_a_journal_the_last_line_of_an_input_counts(state):
    tasks = [task("p/x.jpg")]
    state.journal("a").append([record("p/x.jpg", "error", reason="first")])
    state.journal("a").append([record("p/x.jpg", "no_face")])       # the retry, same shard
    assert merged(state, tasks) == expected_merge([record("p/x.jpg", "no_face")])


@pytest.mark.parametrize("old, new", [("a", "b"), ("b", "a")])
def test_a_runs_own_outcome_wins_over_an_older_error(state, old, new):
    """x failed in an old journal and fails again in this run's shard (another reason): the
    run reports its own failure, wherever the journals sort (as the in-memory merge did)."""
    tasks = [task("p/x.jpg"), task("p/y.jpg")]
    state.journal(old).append([record("p/x.jpg", "error", reason="old"), record("p/y.jpg", "aligned")])
    index = Records(state, OUTPUT_ARG)
    assert list(index.plan(iter(tasks))) == [tasks[0]]
    shard = Shard(new, (tasks[0],))
    state.journal(new).append([record("p/x.jpg", "error", reason="new")])     # what the run did
    index.merge(state.root.parent, shard.key)          # the run's journals: those named so
    faces = (state.root.parent / "faces.jsonl").read_bytes()
    assert faces == expected_merge([record("p/x.jpg", "error", reason="new"), record("p/y.jpg", "aligned")])[0]


def test_torn_tails_are_cut_as_journal_load_cuts_them(state):
    tasks = [task(f"p/{i}.jpg") for i in range(4)]
    state.journal("a").append([record(t.rel, "aligned") for t in tasks[:2]])
    with open(state.journals / "a.jsonl", "ab") as f:                     # killed mid-write
        f.write(line(record(tasks[2].rel, "aligned")).encode()[:50])
    state.journal("b").append([record(tasks[3].rel, "no_face")])
    with open(state.journals / "b.jsonl", "ab") as f:                     # a line of garbage
        f.write(b'{"input": "p/2.jpg", "status": "aligned", \x00\x00\n')
        f.write(line(record(tasks[2].rel, "no_face")).encode())
    index = Records(state, OUTPUT_ARG)
    assert list(index.plan(iter(tasks))) == [tasks[2]]                # neither torn line counts
    for name in ("a", "b"):                             # both cut after their last good line
        assert state.journal(name).path.read_bytes().endswith(b"]}\n")
        assert len(state.journal(name).path.read_bytes().splitlines()) == {"a": 2, "b": 1}[name]
    state.journal("c").append([record(tasks[2].rel, "aligned")])
    assert merged(state, tasks) == expected_merge([record(tasks[0].rel, "aligned"), record(tasks[1].rel, "aligned"),
                                                   record(tasks[2].rel, "aligned"), record(tasks[3].rel, "no_face")])


def test_an_input_without_a_record_stops_the_merge_and_leaves_no_output(state):
    tasks = [task("p/x.jpg"), task("p/y.jpg")]
    state.journal("a").append([record("p/x.jpg", "aligned")])
    index = Records(state, OUTPUT_ARG)
    assert list(index.plan(iter(tasks))) == [tasks[1]]
    with pytest.raises(MissingRecord, match="p/y.jpg"):
        index.merge(state.root.parent)
    assert not (state.root.parent / "faces.jsonl").exists()


def test_no_journals_no_records(state):
    index = Records(state, OUTPUT_ARG)
    assert list(index.plan(iter([]))) == []
    assert index.merge(state.root.parent)["faces_written"] == 0
    assert (state.root.parent / "faces.jsonl").read_bytes() == b""


def test_many_journals_more_than_the_merge_keeps_open(state):
    """Records spread over more journals than MAX_OPEN_JOURNALS, interleaved (a random-order
    run's shards), still merge to the reference."""
    tasks = [task(f"id{i % 7}/{i:03d}.jpg") for i in range(300)]
    tasks.sort(key=lambda t: t.rel)
    for j in range(100):
        state.journal(f"{j:03d}").append([record(t.rel, STATUS[k % 4]) for k, t in enumerate(tasks)
                                          if k % 100 == j])
    assert merged(state, tasks) == expected_merge([record(t.rel, STATUS[k % 4]) for k, t in enumerate(tasks)])


# --- Task ---------------------------------------------------------------------------------------------
def test_task_keeps_its_fields_through_pickle_and_compares_by_value(tmp_path):
    for rel in ("a/x.jpg", "a/x.png", "b/1.jpg"):
        (tmp_path / rel).parent.mkdir(exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    tasks = walk(tmp_path).tasks
    assert [(t.rel, t.out_base) for t in tasks] == [("a/x.jpg", "a/x.jpg"), ("a/x.png", "a/x.png"),
                                                    ("b/1.jpg", "b/1")]
    other = Task("a/x.jpg", "elsewhere/x")              # an out_base that is no prefix of rel
    for t in [*tasks, other]:
        assert pickle.loads(pickle.dumps(t)) == t
        assert hash(pickle.loads(pickle.dumps(t))) == hash(t)
    assert other.out_base == "elsewhere/x" and other != tasks[0]
    assert not hasattr(tasks[0], "__dict__")


A = '{"input": "p/a.jpg", "status": "aligned", "written": []}'
B = '{"input": "p/b.jpg", "status": "no_face", "written": []}'


@pytest.mark.parametrize("text", [
    f"{A}\n{B}\n",
    f"{A}  \n{B}\n",                              # trailing blanks: json.loads takes them
    f" {A}\n\t{B}\n",                             # leading blanks too
    f"{A} x\n{B}\n",                               # but not what follows the value
    f'{A}\n{{"input": "p/c.jpg", "x": [1,\n2]}}\n{B}\n',   # a value over two lines
    f'{A}\n{{"input": "p/\u00e9.jpg", "status": "aligned"}}\n{B}\n',   # not ASCII
    f'{A}\n{{"input": "p/c.jpg", "status": "ali\x00\x00\x00\x00\n{B}\n',  # zeros of a crash
    f"{A}\n{B}",                                   # torn tail
    f"{A}\n[1, 2]\n",                             # JSON, not a record: both fail alike
])
def test_journal_reads_each_line_as_json_loads_does(tmp_path, text):
    ours, theirs = tmp_path / "ours.jsonl", tmp_path / "theirs.jsonl"
    for path in (ours, theirs):
        path.write_bytes(text.encode("utf-8"))
    try:
        expected = reference_journal_load(theirs)
    except TypeError:                               # a line that is JSON but no record
        with pytest.raises(TypeError):
            Journal(ours).load()
        return
    assert Journal(ours).load() == expected
    assert ours.read_bytes() == theirs.read_bytes()  # cut at the same place


# --- streaming -----------------------------------------------------------------------------------
def test_journals_sorted_on_disk_merge_as_those_sorted_in_memory(state, monkeypatch):
    """More records than SORT_ENTRIES: sorted a few at a time into temporary files, then merged;
    the same bytes as when all fit in memory."""
    tasks = [task(f"id{i % 7}/{i:03d}.jpg") for i in range(300)]
    tasks.sort(key=lambda t: t.rel)
    for j in range(30):
        state.journal(f"{j:03d}").append([record(t.rel, STATUS[k % 4]) for k, t in enumerate(tasks)
                                          if k % 30 == j])
    in_memory = merged(state, tasks)
    monkeypatch.setattr("align.records.SORT_ENTRIES", 7)
    monkeypatch.setattr("align.records.SPILL_BLOCK", 3)
    spilled = merged(state, tasks)
    assert spilled == in_memory == expected_merge([record(t.rel, STATUS[k % 4]) for k, t in enumerate(tasks)])
    assert not list(state.root.glob("tmp*")), "a temporary file left in the state folder"


def test_the_walk_is_joined_as_it_goes(state):
    """plan() yields a task to do before the walk has gone further than the next record: the
    first shard of a job of any size goes out at once."""
    state.journal("a").append([record(f"p/{i:04d}.jpg", "aligned") for i in range(10)])
    pulled = []

    def walk():
        for i in range(10**9):                  # a walk that never ends
            pulled.append(i)
            yield task(f"p/{i:04d}.jpg")

    from align.engines import ShardFeed
    feed = ShardFeed(Records(state, OUTPUT_ARG).plan(walk()), "r000000001-", workers=2)
    shard = next(feed)
    assert shard.key.startswith("r000000001-") and shard.tasks[0].rel == "p/0010.jpg"
    assert len(shard.tasks) == 32 and len(pulled) <= 10 + 2 * 32 * 2 + 1, len(pulled)


def test_a_faces_jsonl_out_of_input_order_is_refused(state):
    out = state.root.parent
    (out / "faces.jsonl").write_text(line(record("p/b.jpg", "aligned")) + line(record("p/a.jpg", "aligned")))
    from align.records import UnorderedRecords
    with pytest.raises(UnorderedRecords, match="not in input order .at .p.a.jpg.*was it edited"):
        list(Records(state, OUTPUT_ARG, base=out / "faces.jsonl").plan(iter([task("p/a.jpg"), task("p/b.jpg")])))


def test_the_run_prefix_follows_every_journal(state):
    from align.records import run_prefix
    assert run_prefix(state) == "r000000001-"
    state.journal("0123abcd").append([record("p/a.jpg", "aligned")])     # an earlier release's
    state.journal("r000000007-0123abcd").append([record("p/a.jpg", "aligned")])
    assert run_prefix(state) == "r000000008-"
    assert state.journal_names() == ["0123abcd", "r000000007-0123abcd"]  # the order they count in


@pytest.mark.parametrize("status", ["aligned", "error"])
def test_faces_jsonl_counts_before_every_journal(state, status):
    """An input with a record in the last finished run's faces.jsonl and another in a journal
    (a --split fold rewrote faces.jsonl, held out, then the run was killed before the journals
    were removed): faces.jsonl's counts first, so it stays where it needs no work; an "error"
    is replaced by the journal's outcome (as a retry's)."""
    out = state.root.parent
    old = dict(record("p/a.jpg", status), reason="faces.jsonl") if status == "error" else \
        dict(record("p/a.jpg", status), held_out=True)
    (out / "faces.jsonl").write_text(line(record("p/0.jpg", "aligned")) + line(old))
    new = dict(record("p/a.jpg", status), reason="journal") if status == "error" else record("p/a.jpg", status)
    state.journal("r000000001-0123").append([new])
    tasks = [task("p/0.jpg"), task("p/a.jpg")]
    index = Records(state, OUTPUT_ARG, base=out / "faces.jsonl")
    assert list(index.plan(iter(tasks))) == ([tasks[1]] if status == "error" else [])
    index.merge(out)
    winner = new if status == "error" else old
    assert (out / "faces.jsonl").read_bytes() == expected_merge([record("p/0.jpg", "aligned"), winner])[0]


def test_more_sorted_runs_than_open_files_merge_in_stages(state, monkeypatch):
    """More spilled runs than MERGE_FAN_IN: merged in stages, the same bytes."""
    import align.records as records_module
    tasks = sorted((task(f"id{i % 5}/{i:03d}.jpg") for i in range(200)), key=lambda t: t.rel)
    for j in range(40):
        state.journal(f"{j:03d}").append([record(t.rel, STATUS[k % 4]) for k, t in enumerate(tasks) if k % 40 == j])
    in_memory = merged(state, tasks)
    monkeypatch.setattr(records_module, "SORT_ENTRIES", 3)
    monkeypatch.setattr(records_module, "MERGE_FAN_IN", 4)
    assert merged(state, tasks) == in_memory == expected_merge([record(t.rel, STATUS[k % 4]) for k, t in enumerate(tasks)])
