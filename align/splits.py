"""Train / validation / test splits (--split, --split_by, --split_seed).

A photo's split is a pure function of the photo (the sha256 of its file's bytes, so that exact
copies under two names land together) or, with --split_by identity, of its identity folder's
name, and of the seed and the fractions: not of the order, the engine, the workers or the kills,
and photos added later never move one already written. Thumbnails go to
OUTPUT_DIR/<split>/<identity>/; the record of each photo names its split ("split").

With --split_by photo every split tree must hold the same identity folders (Keras and
torchvision number classes by the sorted folder names of each tree): an identity whose written
faces do not cover every split is held out, its thumbnails in OUTPUT_DIR/held_out/<identity>/,
its records marked "held_out": true, until later photos make it cover every split (then they
move back). `fold_splits`, at the end of a run, derives all of it from faces.jsonl and what is
on disk, so it is idempotent and a kill anywhere is finished by the rerun.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from collections import defaultdict
from pathlib import Path
from typing import Iterator

from align.durable import atomic_file

HELD_OUT = "held_out"           # OUTPUT_DIR/held_out/<identity>/: not a split name
SPLIT_BY = ("photo", "identity")
NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*")
SUM_TOLERANCE = 1e-6

Splits = tuple[tuple[str, float], ...]      # (name, fraction of the photos), in the order given


def parse_splits(text: str) -> Splits:
    """`train=0.8,validation=0.1,test=0.1` -> (("train", 0.8), ...). Names: letters, digits,
    "_" and "-", not starting with "-", unique, not "held_out"; fractions > 0 summing to 1
    (within 1e-6). Raises ValueError with what is wrong."""
    splits = []
    for part in text.split(","):
        name, eq, value = part.strip().partition("=")
        try:
            fraction = float(value) if eq else None
        except ValueError:
            fraction = None
        if fraction is None:
            raise ValueError(f"splits are NAME=FRACTION,... like train=0.8,validation=0.1,test=0.1, "
                             f"not {text!r}")
        splits.append((name.strip(), fraction))
    return check_splits(tuple(splits))


def check_splits(splits) -> Splits:
    """`splits` as a Splits, validated as parse_splits says."""
    splits = tuple((str(n), float(f)) for n, f in splits)
    names = [n for n, _ in splits]
    if not splits:
        raise ValueError("--split needs at least one NAME=FRACTION")
    for name in names:
        if not NAME.fullmatch(name):
            raise ValueError(f"split name {name!r}: letters, digits, '_' and '-' only, not starting "
                             f"with '-'")
        if name == HELD_OUT:
            raise ValueError(f"split name {HELD_OUT!r} is where identities too small for every "
                             f"split go: pick another name")
    if len({n.lower() for n in names}) != len(names):     # one folder each, on any file system
        raise ValueError(f"split names must be unique (whatever their case): {','.join(names)}")
    if not all(0 < f <= 1 for _, f in splits):
        raise ValueError(f"split fractions must be in (0, 1]: {splits}")
    if abs(sum(f for _, f in splits) - 1) > SUM_TOLERANCE:
        raise ValueError(f"split fractions must sum to 1, not {sum(f for _, f in splits):g}")
    return splits


def format_splits(splits: Splits) -> str:
    return ",".join(f"{n}={f:g}" for n, f in splits)


def unit_interval(digest: bytes, seed: int) -> float:
    """A number in [0, 1) from a digest (of a photo's bytes or an identity's name) and the seed:
    the first 64 bits of sha256(seed, digest), over 2**64."""
    mixed = hashlib.sha256(f"{seed}:".encode() + digest).digest()
    return int.from_bytes(mixed[:8], "big") / 2 ** 64


def split_of(digest: bytes, seed: int, splits: Splits) -> str:
    """The split whose share of [0, 1) (cumulative fractions, in the order given) holds
    unit_interval(digest, seed)."""
    u, edge = unit_interval(digest, seed), 0.0
    for name, fraction in splits:
        edge += fraction
        if u < edge:
            return name
    return splits[-1][0]        # u over the rounded sum of the fractions


def identity_digest(identity: str) -> bytes:
    """What --split_by identity hashes: the input identity folder's name, as bytes."""
    return hashlib.sha256(os.fsencode(identity)).digest()


def split_of_identity(identity: str, seed: int, splits: Splits) -> str:
    return split_of(identity_digest(identity), seed, splits)


# --- the end of a run -------------------------------------------------------------------------


def _moved(output: str, top: str) -> str:
    """`output` (`<split or held_out>/<identity>/<name>`) under another top folder."""
    return f"{top}/{output.split('/', 1)[1]}"


def _identity(record: dict) -> str:
    return record["input"].split("/", 1)[0]


def canonical(record: dict, held: bool) -> dict:
    """The record as it is for an identity held out (`held`: outputs under held_out/, marked
    "held_out": true) or not (outputs under its split, no mark). Only records with a split
    change."""
    split = record.get("split")
    if split is None:
        return record
    top = HELD_OUT if held else split
    record["output"] = _moved(record["output"], top)
    for w in record.get("written") or ():
        w["output"] = _moved(w["output"], top)
    if held:
        record["held_out"] = True
    else:
        record.pop("held_out", None)
    return record


def _entries(path: Path) -> Iterator[tuple[int, bytes, dict]]:
    from align.records import Journal
    for chunk in Journal(path).chunks(floats=False):
        yield from chunk


def fold_splits(output_dir: Path, output_arg: str, splits: Splits, by: str,
                packed: bool = False, settled: bool = False) -> tuple[dict, dict[str, set[str]]]:
    """At the end of a run with splits, after the merge: hold out (or take back) the
    identities that (do not) cover every split (--split_by photo), rewrite faces.jsonl and
    bounding_boxes.txt where a record changes (atomically), move the thumbnails to where the
    records say (a rename each, those already there left alone; none with a `packed` output
    format, whose files are assembled from the records after, nor when `settled`: the
    records are those of a run that finished, and none changes). Returns the summary's
    "splits" entry and {top folder: the identity folders (output names) with a face there}.
    Derived from faces.jsonl and the files on disk only: run again after a kill anywhere
    (the run's state folder, and so its journals, are still there: not `settled`), it ends in
    the same tree. Reads faces.jsonl once, twice where records change."""
    from align.records import BOXES, RECORDS, bounding_box_lines, dumps
    names = [n for n, _ in splits]
    # per input identity: {split: [photos, faces written]}, its "held_out" marks now, its folder
    tally: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    marks: dict[str, set[bool]] = defaultdict(set)
    folder: dict[str, str] = {}
    for _, _, record in _entries(output_dir / RECORDS):
        split = record.get("split")
        if split is None:
            continue
        identity = _identity(record)
        counts = tally[identity][split]
        counts[0] += 1
        counts[1] += len(record.get("written") or ())
        marks[identity].add(bool(record.get("held_out")))
        folder[identity] = record["output"].split("/", 2)[1]
    covered = {i: {s for s, (_, faces) in t.items() if faces} for i, t in tally.items()}
    held = {i for i, c in covered.items() if c and len(c) < len(names)} if by == "photo" else set()
    changed = any(m != {i in held} for i, m in marks.items())

    if changed:
        with atomic_file(output_dir / RECORDS, 1 << 20) as faces, atomic_file(output_dir / BOXES, 1 << 20) as boxes:
            for _, line, record in _entries(output_dir / RECORDS):
                want = record.get("split") is not None and _identity(record) in held
                if record.get("split") is not None and bool(record.get("held_out")) != want:
                    record = canonical(json.loads(line), want)
                    line = (dumps(record) + "\n").encode()
                faces.write(line)
                boxes.write("".join(bounding_box_lines(record, output_arg, packed)).encode("utf-8", "surrogateescape"))
    if not packed and (changed or not settled):
        for _, _, record in _entries(output_dir / RECORDS):
            if record.get("split") is not None:
                for w in record.get("written") or ():
                    _put_in_place(output_dir, w["output"], record["split"])

    tops: dict[str, set[str]] = defaultdict(set)
    for identity, t in tally.items():
        for split, (_, faces) in t.items():
            if faces:
                tops[HELD_OUT if identity in held else split].add(folder[identity])
    photos = {n: sum(t[n][0] for t in tally.values() if n in t) for n in names}
    total = sum(photos.values())
    stats = {n: {"photos": photos[n],
                 "faces": sum(t[n][1] for i, t in tally.items() if n in t and i not in held),
                 "identities": sum(1 for i, c in covered.items() if n in c and i not in held),
                 "fraction": round(photos[n] / total, 4) if total else None} for n in names}
    return {
        "by": by, "fractions": dict(splits), "splits": stats,
        "held_out": {"identities": len(held),
                     "photos": sum(c[0] for i in held for c in tally[i].values()),
                     "faces": sum(c[1] for i in held for c in tally[i].values())},
        "num_classes": len({i for i, c in covered.items() if c and i not in held}),
    }, dict(tops)


def _put_in_place(output_dir: Path, output: str, split: str) -> None:
    """The thumbnail the record names `output` renamed there from its split's or held_out's
    folder, where a run (or a kill between two renames) left it."""
    target = output_dir / output
    if os.path.lexists(target):
        return
    for top in (split, HELD_OUT):
        source = output_dir / _moved(output, top)
        if source != target and os.path.lexists(source):
            target.parent.mkdir(parents=True, exist_ok=True)
            os.rename(source, target)
            return


def top_folders(splits: Splits | None) -> list[str]:
    """The folders at the top of OUTPUT_DIR that hold identity folders: the splits and
    held_out, or OUTPUT_DIR itself ("")."""
    return [n for n, _ in splits] + [HELD_OUT] if splits else [""]
