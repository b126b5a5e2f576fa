"""Run a job: check the folders and options, take OUTPUT_DIR's lock, walk INPUT_DIR, cut what is
left to do into shards, hand them to an engine, merge the journals into the records.

Knows nothing of faces (align/aligner.py) or of where the shards run (align/engines/).
`align_dataset` is the Python entry point; the CLI is a thin layer on it.
"""
from __future__ import annotations

import dataclasses
import errno
import itertools
import os
import resource
import sys
import time
from pathlib import Path
from typing import Iterator

from align.config import FORMATS, Config
from align.dataset import LinkIntoOutput, Task, output_identity, shuffled, walk_identities
from align.durable import TEMP_PREFIX, TEMP_SUFFIX
from align.engines import Interrupted, JobError, OptionsError, ShardFeed, make_engine  # noqa: F401 (API)
from align.records import (BOXES, RECORDS, SUMMARY, Journal, MissingRecord, Records, StateDir, UnorderedRecords,
                           finished_summary, run_prefix, write_summary)
from align.report import REPORT, report_or_warn
from align.splits import fold_splits, format_splits, parse_splits, top_folders
from align.worker import ShardJob
from align.writers import labels_of, make_writer, packed_files
from facenet_nets import backend_name
from facenet_nets.weights import verify_weights

# options whose change changes the output: a resumed run must use the same ones
OUTPUT_OPTIONS = ("image_size", "margin", "detect_multiple_faces", "min_face_size",
                  "thresholds", "factor", "format", "align", "output_format")
LOG_EVERY_S = 10.0
REFRESH_S = 0.2            # the walk redraws the bar at most this often
RANDOM_WINDOW = 1 << 16     # --random_order shuffles the tasks of each window of this many


def _check_dirs(input_dir: Path, output_dir: Path) -> None:
    if not input_dir.is_dir():
        raise OptionsError(f"INPUT_DIR {input_dir} is not a folder")
    i, o = input_dir.resolve(), output_dir.resolve()
    if o == i or i in o.parents:
        raise OptionsError(f"OUTPUT_DIR {output_dir} is inside INPUT_DIR {input_dir}: pick a folder outside it")
    if o in i.parents:
        raise OptionsError(f"INPUT_DIR {input_dir} is inside OUTPUT_DIR {output_dir}: pick another OUTPUT_DIR")
    if output_dir.exists() and not output_dir.is_dir():
        raise OptionsError(f"OUTPUT_DIR {output_dir} exists and is not a folder")
    above = next((p for p in output_dir.absolute().parents if p.exists()), None)
    if above is not None and not above.is_dir():
        raise OptionsError(f"OUTPUT_DIR {output_dir} cannot be made: {above} is a file, not a folder")


def _os_error(e: OSError, output_dir: Path) -> JobError:
    """One line for a failure of the file system under the job (a read-only or full disk, a
    file where a folder must go): what failed, on which path, and what to do."""
    where = f" ({os.fsdecode(e.filename)})" if e.filename else ""
    what = e.strerror or str(e)
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        todo = "free some space, then rerun the same command to resume"
    elif e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        todo = f"OUTPUT_DIR {output_dir} must be writable: pick another or fix its permissions"
    elif e.errno in (errno.EEXIST, errno.ENOTDIR):
        todo = "a file is where a folder must go: move it away, then rerun"
    else:
        todo = "rerun the same command to resume once that is fixed"
    return JobError(f"{what}{where}: {todo}")


def _remove_stale_temporaries(output_dir: Path, tops) -> None:
    """Temporary files of writes that a killed run left half-done (never renamed into place):
    in OUTPUT_DIR, and in the folders of `tops` (OUTPUT_DIR itself, "", and --split's trees)
    and the identity folders in them."""
    folders = [output_dir]
    for top in tops:
        if top and not (output_dir / top).is_dir():
            continue
        folders += [p for p in (output_dir / top).iterdir() if p.is_dir()]
    for folder in folders:
        for tmp in folder.glob(f"{TEMP_PREFIX}*{TEMP_SUFFIX}"):
            tmp.unlink(missing_ok=True)


def _remove_unjournaled_outputs(output_dir: Path, tasks, tops=("",)) -> None:
    """--overwrite: thumbnails a killed run renamed into place but did not journal yet are
    not in the records the start-over deletes; remove every file named as one of `tasks`'
    outputs could be, under any option (`<out_base>[_<face>].<format>`)."""
    stems: dict[str, set[str]] = {}
    for t in tasks:
        identity, stem = t.out_base.split("/", 1)
        stems.setdefault(identity, set()).add(stem)
    extensions = tuple("." + f for f in FORMATS)
    for (identity, names), top in itertools.product(stems.items(), tops):
        if not (output_dir / top / identity).is_dir():
            continue
        for entry in os.scandir(output_dir / top / identity):
            stem, ext = os.path.splitext(entry.name)
            if ext not in extensions or not entry.is_file(follow_symlinks=False):
                continue
            base, _, face = stem.rpartition("_")
            if stem in names or (face.isdigit() and face.isascii() and base in names):
                os.unlink(entry.path)


class _Progress:
    """A tqdm bar on a terminal, else a line every LOG_EVERY_S seconds; nothing when quiet.
    The job's size is known once the walk ends: until then the total is what it has found."""

    def __init__(self, quiet: bool):
        self.total, self.before, self.done, self.faces, self.failed = 0, 0, 0, 0, 0
        self.walked = False
        self.start = time.perf_counter()
        self.quiet = quiet
        self.bar = None
        self.last_log = self.start
        if not quiet and sys.stdout.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=None, unit="img", dynamic_ncols=True)

    def found(self, total: int, before: int, walked: bool = False) -> None:
        """The walk so far: `total` inputs, of them `before` done by earlier runs."""
        self.done += before - self.before
        self.total, self.before, self.walked = total, before, walked
        if self.bar and (walked or time.perf_counter() - self.last_log >= REFRESH_S):
            self.last_log = time.perf_counter()
            self.bar.total = total
            self.bar.n = self.done
            self.bar.refresh()

    def update(self, n: int, faces: int, failed: int) -> None:
        self.done += n
        self.faces += faces
        self.failed += failed
        if self.bar:
            self.bar.update(n)
            self.bar.set_postfix(faces=self.faces, failed=self.failed, refresh=False)
        elif not self.quiet and time.perf_counter() - self.last_log >= LOG_EVERY_S:
            self.last_log = time.perf_counter()
            rate = self.done / max(1e-9, self.last_log - self.start)
            total = self.total if self.walked else f"{self.total}+"
            print(f"align_dataset: {self.done}/{total} images, {self.faces} faces written, "
                  f"{self.failed} failed, {rate:.1f} images/s", flush=True)

    def close(self) -> None:
        if self.bar:
            self.bar.close()


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def align_dataset(input_dir, output_dir, config: Config | None = None, *, client=None,
                  **options) -> dict:
    """Align every identity folder of `input_dir` into `output_dir` (see README); resumes what
    a previous run on `output_dir` left unfinished unless overwrite. Options are Config's
    fields (engine="dask", scheduler="tcp://host:8786" run it on a Dask cluster; or pass a
    connected distributed.Client as `client`). Returns the summary (also in
    OUTPUT_DIR/summary.json). Raises JobError when the job cannot start and Interrupted on
    Ctrl-C."""
    for name, folder in (("input_dir", input_dir), ("output_dir", output_dir)):
        if not isinstance(folder, (str, os.PathLike)):
            raise TypeError(f"{name} must be a path (str or os.PathLike), not {type(folder).__name__}")
    config = dataclasses.replace(config or Config(), **options)
    t0 = time.perf_counter()
    engine = make_engine(config.engine, config.workers, config.scheduler, client)
    output_arg = os.path.expanduser(str(output_dir))
    input_dir, output_dir = Path(os.path.expanduser(str(input_dir))), Path(output_arg)
    _check_dirs(input_dir, output_dir)
    verify_weights()        # once, here: not a fetch or a traceback in every worker
    state = StateDir(output_dir)
    try:
        finished = finished_summary(output_dir)
        found_outputs = (output_dir.is_dir() and any(output_dir.iterdir()) and not state.root.exists()
                         and finished is None)
        output_dir.mkdir(parents=True, exist_ok=True)
        unfinished = state.root.exists()
        if not state.lock():
            raise JobError(f"another align_dataset run is writing to {output_dir}; wait for it to finish")
        try:
            return _run(config, engine, input_dir, output_dir, output_arg, state, finished,
                        found_outputs, t0)
        except BaseException:
            if not unfinished and not state.any_journal():      # refused, or stopped before any work
                state.remove()
            raise
        finally:
            state.unlock()
    except OSError as e:        # the file system under OUTPUT_DIR: what is journaled is kept
        raise _os_error(e, output_dir) from None


def _start_over(output_dir: Path, state: StateDir, tops=("",)) -> None:
    """--overwrite: every thumbnail the records name, the packed files of any format (in
    OUTPUT_DIR or the `tops` folders of --split), then the records themselves."""
    finished = (r for chunk in Journal(output_dir / RECORDS).chunks() for _, _, r in chunk)
    for record in itertools.chain(finished, state.each_record()):
        for written in record.get("written", ()):
            (output_dir / written["output"]).unlink(missing_ok=True)
    state.reset()
    for path in packed_files(output_dir, tops):
        path.unlink()
    _remove_empty_folders(output_dir, [top for top in tops if top])     # earlier splits' trees
    for name in (RECORDS, BOXES, SUMMARY, REPORT):
        (output_dir / name).unlink(missing_ok=True)


def _written_faces(output_dir: Path, top: str | None = None) -> Iterator[tuple[dict, dict]]:
    """(record, written entry) of every face of faces.jsonl (under the folder `top`, with
    --split), in input order, streamed."""
    for chunk in Journal(output_dir / RECORDS).chunks():
        for _, _, record in chunk:
            for written in record.get("written") or ():
                if top is None or written["output"].startswith(top + "/"):
                    yield record, written


def _remove_empty_folders(output_dir: Path, tops=("",)) -> None:
    """The identity folders that hold nothing (no face found in any of the identity's photos,
    say): a loader would take each for a class without samples. `tops`: the folders that hold
    identity folders (the split trees and held_out, then removed when empty too), listed as
    they are read."""
    for top in tops:
        try:
            with os.scandir(output_dir / top) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        try:
                            os.rmdir(entry.path)
                        except OSError:     # not empty
                            pass
        except FileNotFoundError:
            continue
        if top:
            try:
                os.rmdir(output_dir / top)
            except OSError:
                pass


def _in_the_way(folder: Path) -> JobError:
    return JobError(f"{folder} is a file, where identity {folder.name}'s thumbnails go: "
                    f"move it away, then rerun the same command")


def _refuse_files_in_the_way(input_dir: Path, output_dir: Path) -> None:
    """Before any work: a file at the top of OUTPUT_DIR named as an identity folder of
    INPUT_DIR (one stat a file there, none an identity)."""
    with os.scandir(output_dir) as entries:
        for entry in entries:
            if (not entry.is_dir() and output_identity(entry.name) == entry.name
                    and (input_dir / entry.name).is_dir()):
                raise _in_the_way(output_dir / entry.name)


def _run(config, engine, input_dir, output_dir, output_arg, state, finished, found_outputs,
         t0) -> dict:
    options = {k: getattr(config, k) for k in OUTPUT_OPTIONS}
    options["thresholds"] = list(options["thresholds"])
    if config.output_format == "webdataset":
        options["tar_shard_mb"] = config.tar_shard_mb
    if config.split is not None:        # absent without --split: the options of earlier runs
        options.update(split=format_splits(config.split), split_by=config.split_by,
                       split_seed=config.split_seed)
    tops = top_folders(config.split)
    writer = make_writer(config, output_dir)
    previous = state.options()
    if previous is None and finished is not None:
        previous = finished["options"]
    if previous is not None:
        previous.setdefault("align", "box")     # a run begun before --align existed
        previous.setdefault("output_format", "folders")     # ... or before --output_format
    legacy_outputs = state.legacy_marker.exists() or bool(finished and finished.get("legacy_outputs"))
    earlier = top_folders(parse_splits(previous["split"])) if previous and previous.get("split") else []
    if config.overwrite:
        _start_over(output_dir, state, dict.fromkeys(["", *tops, *earlier]))
        legacy_outputs = False
    elif previous is not None and previous != options:
        diff = ", ".join(f"{k} {previous.get(k)} -> {options.get(k)}" for k in dict.fromkeys([*options, *previous])
                         if previous.get(k) != options.get(k))
        raise OptionsError(f"{output_dir} was aligned with other options ({diff}): rerun with the "
                       f"same options to resume, or add --overwrite to start over")
    state.set_options(options)
    if found_outputs and not config.overwrite:
        legacy_outputs = True
    if legacy_outputs and (writer.packed or config.split is not None):
        what = "--split" if config.split is not None else f"--output_format {config.output_format}"
        raise OptionsError(f"{output_dir} holds files align_dataset did not write (facenet's "
                           f"thumbnails?): {what} needs an empty OUTPUT_DIR, or one of its own runs")
    if legacy_outputs:
        state.legacy_marker.touch()
    trees = list(dict.fromkeys([*tops, *earlier, ""]))  # the folders that hold identity folders
    _remove_stale_temporaries(output_dir, trees)

    _refuse_files_in_the_way(input_dir, output_dir)
    skipped: list[str] = []

    def tasks() -> Iterator[Task]:
        """The walk, one identity folder at a time, each checked (and, with --overwrite,
        cleared of what a killed run left unjournaled) before its tasks go out."""
        try:
            for identity, its_tasks in walk_identities(input_dir, output_dir, skipped):
                folder = output_dir / identity
                if folder.exists() and not folder.is_dir():     # (one output_identity renamed)
                    raise _in_the_way(folder)
                if config.overwrite:
                    _remove_unjournaled_outputs(output_dir, its_tasks, trees)
                yield from its_tasks
                progress.found(records.tasks, records.done)
        except LinkIntoOutput as e:
            raise OptionsError(str(e)) from None
        progress.found(records.tasks, records.done, walked=True)

    # the last finished run's records, under the journals (none when it was facenet's folder)
    base = output_dir / RECORDS if previous is not None and not config.overwrite else None
    records = Records(state, output_arg, base, writer.packed)
    progress = _Progress(config.quiet)
    pending = records.plan(tasks())         # the walk joined with the records, streamed
    if config.random_order:
        pending = shuffled(pending, RANDOM_WINDOW)
    prefix = run_prefix(state)
    feed = ShardFeed(pending, prefix, config.workers)
    t_work = time.perf_counter()
    try:
        first = feed.peek(1)                # the walk, up to the first task to do: maybe all of it
        ran = engine.run(ShardJob(config, input_dir.absolute(), output_dir.absolute(), legacy_outputs),
                         feed, progress.update) if first else None
    except UnorderedRecords as e:
        raise JobError(f"{e} Rerun with --overwrite to start over") from None
    except KeyboardInterrupt:           # in the walk and the join, before any engine took it
        raise Interrupted() from None
    finally:
        progress.close()
    t_end = time.perf_counter()

    unchanged = records.base_alone()        # the records, and so the packed files, are the last run's
    try:
        counts = records.merge(output_dir, prefix)  # faces.jsonl, bounding_boxes.txt
    except MissingRecord as e:
        raise JobError(f"{e}: a journal of this run is gone from {state.root}; "
                       f"rerun to align what it held") from None
    labels = labels_of(records.identities_written())
    splits = None
    if config.split:
        splits, tops_identities = fold_splits(output_dir, output_arg, config.split, config.split_by,
                                              writer.packed, settled=unchanged and not ran)
    if writer.packed and not (unchanged and not ran and writer.complete()):
        if config.split:        # one set of files per split (and held_out), labelled per folder
            writer.assemble_in(state.root, [(output_dir / top, _written_faces(output_dir, top),
                                             labels_of(tops_identities.get(top, ()))) for top in tops])
        else:
            writer.assemble(state.root, _written_faces(output_dir), labels)
    # from every worker holding its nets (they start together) to the last shard's records
    processing_s = (ran.done_at - ran.ready_at) if ran else t_end - t_work
    summary = {
        "input_dir": str(input_dir), "output_dir": output_arg, "images": records.tasks,
        "aligned": counts["aligned"], "no_face": counts["no_face"],
        "unreadable": counts["unreadable"], "too_costly": counts["too_costly"],
        "errors": counts["error"],
        "skipped": counts["not_an_image"] + counts["skipped_existing"] + len(skipped),
        "faces_written": counts["faces_written"], "num_classes": len(labels),
        "output_format": config.output_format, "packed": writer.describe(),
        "not_an_image": counts["not_an_image"], "skipped_existing": counts["skipped_existing"],
        "skipped_entries": skipped,
        "processed_this_run": records.tasks - records.done,
        "engine": engine.name,
        "backend": backend_name(),
        "workers": ran.workers if ran else 0,
        "wall_s": round(t_end - t0, 3), "processing_s": round(processing_s, 3),
        "images_per_s": round((records.tasks - records.done) / processing_s, 2) if processing_s > 0 else None,
        "first_shard_s": round(feed.first_at - t0, 3) if feed.first_at else None,
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "options": options, "legacy_outputs": legacy_outputs,
    }
    if splits is not None:      # classes: the identities of the split trees
        summary["num_classes"] = splits.pop("num_classes")
        summary["splits"] = splits
    write_summary(output_dir, summary)
    report_or_warn(output_dir, config)
    _remove_empty_folders(output_dir, trees)
    state.remove()          # the run is finished: OUTPUT_DIR is a training set as it stands
    return summary
