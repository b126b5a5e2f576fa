"""align_dataset: align a face dataset with facenet's MTCNN.

Exit codes: 0 done (unreadable images are reported in faces.jsonl, not failures of the run);
1 the job could not run (weights, another run on OUTPUT_DIR); 2 usage error (bad option or
folder, or options that differ from those of the run to resume); 130 interrupted (rerun the
same command to resume).
"""
from __future__ import annotations

import os
import sys

import click
from click.core import ParameterSource

from align.config import ALIGN_DEFAULTS, ALIGNS, Config, ENGINES, FORMATS, MAX_TAR_SHARD_MB, OUTPUT_FORMATS
from align.splits import SPLIT_BY, parse_splits

DEFAULTS = Config()
BOOL_WORDS = {"true", "false", "1", "0", "yes", "no"}


def _facenet_bool_values(args: list[str]) -> list[str]:
    """facenet took `--detect_multiple_faces True|False` (and argparse's `=True`); accept that
    beside the bare flag."""
    out, i = [], 0
    while i < len(args):
        a = args[i]
        flag, eq, word = a.partition("=")
        if eq and flag in ("--detect_multiple_faces", "--detect-multiple-faces") and word.lower() in BOOL_WORDS:
            out.append("--detect_multiple_faces" if word.lower() in ("true", "1", "yes") else "--no-detect_multiple_faces")
            i += 1
            continue
        if a in ("--detect_multiple_faces", "--detect-multiple-faces") and i + 1 < len(args) \
                and args[i + 1].lower() in BOOL_WORDS:
            value = args[i + 1].lower() in ("true", "1", "yes")
            out.append("--detect_multiple_faces" if value else "--no-detect_multiple_faces")
            i += 2
            continue
        out.append(a)
        i += 1
    return out


class _Command(click.Command):
    def parse_args(self, ctx, args):
        return super().parse_args(ctx, _facenet_bool_values(args))

    def main(self, *args, **kwargs):
        """Usage errors as one line on stderr, exit 2; everything else as click does it."""
        try:
            return super().main(*args, standalone_mode=False, **kwargs)
        except click.UsageError as e:
            click.echo(f"Error: {e.format_message()} (see --help)", err=True)
            sys.exit(2)
        except click.ClickException as e:
            e.show()
            sys.exit(e.exit_code)
        except click.Abort:
            sys.exit(130)


def _version() -> str:
    """The installed package's version (its metadata); a checkout that is not installed says so."""
    from importlib import metadata
    try:
        return metadata.version("align-dataset")
    except metadata.PackageNotFoundError:
        return "(not installed: a source checkout)"


def _thresholds(ctx, param, value: str) -> tuple[float, float, float]:
    try:
        t = tuple(float(v) for v in value.replace(",", " ").split())
    except ValueError:
        t = ()
    if len(t) != 3 or not all(0 <= v <= 1 for v in t):
        raise click.BadParameter(f"three probabilities in [0, 1] like 0.6,0.7,0.7, not {value!r}")
    return t


def _splits(ctx, param, value: str | None):
    if value is None:
        return None
    try:
        return parse_splits(value)
    except ValueError as e:
        raise click.BadParameter(str(e))


def _opt(*names, **kw):
    """An option under facenet's underscore spelling and the hyphenated one."""
    spellings = dict.fromkeys([names[0], names[0].replace("_", "-")])
    return click.option(*spellings, *names[1:], show_default=True, **kw)


@click.command(cls=_Command, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("input_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("output_dir", type=click.Path(file_okay=False))
@_opt("--align", type=click.Choice(ALIGNS), default=DEFAULTS.align,
      help="box: facenet's crop, the face box grown by --margin and resized (for facenet-style "
           "training). arcface: the face rotated, scaled and moved so that its five landmarks "
           "land on insightface's 112x112 template, exactly as insightface's norm_crop "
           "(for arcface_torch and most trainers since 2018).")
@_opt("--image_size", type=click.IntRange(min=1), default=DEFAULTS.image_size,
      help=f"Side of the square thumbnails, pixels ({ALIGN_DEFAULTS['arcface'][0]} with --align "
           "arcface). arcface: the 112x112 template is scaled by image_size/112 when that is "
           "whole, else by image_size/128 and centred when that is (insightface's rule); other "
           "sizes, which insightface refuses, scale it by image_size/112.")
@_opt("--margin", type=click.IntRange(min=0), default=DEFAULTS.margin,
      help="Margin around the face box, pixels of the input image (half on each side). "
           "--align box only.")
@click.option("--detect_multiple_faces/--no-detect_multiple_faces", "--detect-multiple-faces/--no-detect-multiple-faces",
              default=DEFAULTS.detect_multiple_faces, show_default=True,
              help="Write every face (<stem>_<i>), not only the central, largest one. "
                   "facenet's '--detect_multiple_faces True|False' works too.")
@_opt("--random_order", is_flag=True, default=DEFAULTS.random_order,
      help="Process the images in random order (the output is the same).")
@_opt("--gpu_memory_fraction", type=click.FloatRange(0, 1, min_open=True), default=DEFAULTS.gpu_memory_fraction,
      help="Upper bound on the GPU memory each worker may use.")
@_opt("--workers", type=click.IntRange(min=1), default=DEFAULTS.workers,
      help="Worker processes (default: this machine's cores); with --engine dask and no "
           "scheduler, the LocalCluster's.")
@_opt("--engine", type=click.Choice(ENGINES), default=DEFAULTS.engine,
      help="Where the work runs: a process pool here, or a Dask cluster "
           "(pip install 'align-dataset[dask]').")
@_opt("--scheduler", metavar="ADDRESS", default=None,
      help="Dask scheduler address, e.g. tcp://HOST:8786 (default: DASK_SCHEDULER_ADDRESS, else "
           "a LocalCluster of --workers processes). INPUT_DIR and OUTPUT_DIR must be at the same "
           "paths on every worker.")
@_opt("--device", metavar="cpu|gpu|gpu:N", default=None,
      help="Run the nets for every worker in one process that owns this device, batched over "
           "their photos (for one GPU and many cores); default: each worker runs its own. "
           "The backend is Keras's: KERAS_BACKEND=tensorflow|jax|torch.")
@_opt("--min_face_size", type=click.FloatRange(min=1), default=DEFAULTS.min_face_size,
      help="Smallest face searched for, pixels of the input image (facenet's minsize).")
@_opt("--thresholds", default=",".join(str(t) for t in DEFAULTS.thresholds), callback=_thresholds,
      help="P-Net, R-Net, O-Net face probability thresholds.")
@_opt("--factor", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=DEFAULTS.factor,
      help="Scale step of the image pyramid.")
@_opt("--format", "fmt", type=click.Choice(FORMATS), default=DEFAULTS.format, help="Thumbnail format.")
@_opt("--output_format", type=click.Choice(OUTPUT_FORMATS), default=DEFAULTS.output_format,
      help="folders: OUTPUT_DIR/<identity>/<stem>.png. rec: train.rec + train.idx, as "
           "arcface_torch reads them (config.rec = OUTPUT_DIR), and property. webdataset: tar "
           "shards faces-000000.tar, ... of <key>.png, <key>.cls, <key>.json.")
@_opt("--tar_shard_mb", type=click.IntRange(1, MAX_TAR_SHARD_MB), default=DEFAULTS.tar_shard_mb,
      help="--output_format webdataset: the size a tar shard stays under, MB.")
@_opt("--split", metavar="NAME=FRACTION,...", default=None, callback=_splits,
      help="Write one tree per split, OUTPUT_DIR/<split>/<identity>/<thumbnail>, e.g. "
           "train=0.8,validation=0.1,test=0.1 (fractions of the photos, summing to 1). A "
           "photo's split depends only on its bytes (or its identity's name), the fractions "
           "and --split_seed. With rec or webdataset: one set of files in each OUTPUT_DIR/<split>/.")
@_opt("--split_by", type=click.Choice(SPLIT_BY), default=DEFAULTS.split_by,
      help="photo: every identity in every split (for a classifier; identities with too few "
           "photos go to OUTPUT_DIR/held_out). identity: no identity in two splits (for "
           "verification sets).")
@_opt("--split_seed", type=int, default=DEFAULTS.split_seed,
      help="Seed mixed into the split hash: another seed, another split.")
@_opt("--overwrite", is_flag=True, default=False, help="Start over instead of resuming.")
@_opt("--quiet", "-q", is_flag=True, default=False, help="Print nothing but errors.")
@click.option("--report/--no-report", default=DEFAULTS.report, show_default=True,
              help="Write OUTPUT_DIR/report.html (open it in a browser) at the end of the run.")
@click.version_option(_version(), "--version", prog_name="align_dataset",
                      message="%(prog)s %(version)s")
def main(input_dir, output_dir, fmt, **options):
    """Detect, crop and resize the faces of INPUT_DIR/<identity>/<image> into
    OUTPUT_DIR/<identity>/<stem>.png, as facenet's align_dataset_mtcnn.py does; with
    --align arcface, warp each face onto insightface's ArcFace template instead.

    A killed run resumes where it stopped when the same command runs again.
    Records: OUTPUT_DIR/faces.jsonl, bounding_boxes.txt, summary.json; OUTPUT_DIR/report.html
    shows them with pictures."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from align.runner import Interrupted, JobError, OptionsError, align_dataset
    from facenet_nets.weights import WeightsError

    ctx = click.get_current_context()
    for name in ("image_size", "margin"):   # not given: the --align mode's default
        if ctx.get_parameter_source(name) is ParameterSource.DEFAULT:
            options[name] = None
    try:
        config = Config(format=fmt, **options)
    except ValueError as e:
        raise click.UsageError(str(e))
    try:
        summary = align_dataset(input_dir, output_dir, config)
    except OptionsError as e:
        raise click.UsageError(str(e))
    except (JobError, WeightsError) as e:
        raise click.ClickException(str(e))
    except Interrupted:
        click.echo(f"\nInterrupted. Run the same command again to resume:\n  {_command_line()}", err=True)
        sys.exit(130)
    if not options["quiet"]:
        _print_summary(summary, options["report"])


def _command_line() -> str:
    """The command as typed, less --overwrite (which would throw the progress away)."""
    import shlex
    args = [a for a in sys.argv[1:] if a not in ("--overwrite",)]
    return " ".join(shlex.quote(a) for a in ["align_dataset", *args])


def _print_summary(s: dict, report_written: bool) -> None:
    rate = f"{s['images_per_s']} images/s" if s["images_per_s"] else "nothing left to do"
    errors = f", {s['errors']} failed (retried by the next run)" if s["errors"] else ""
    costly = (f", {s['too_costly']} too costly for the options (faces.jsonl says which option to change)"
              if s.get("too_costly") else "")
    click.echo(f"{s['images']} images: {s['aligned']} aligned, {s['no_face']} no face, "
               f"{s['unreadable']} unreadable, {s['skipped']} skipped{costly}{errors}; {s['faces_written']} "
               f"faces written in {s['wall_s']:.1f} s ({rate}). Records: {s['output_dir']}/faces.jsonl")
    if s.get("packed") and s.get("splits"):
        click.echo(f"Training files in {s['output_dir']}: {s['packed']}")
    elif s.get("packed"):
        click.echo(f"Training files: {os.path.join(s['output_dir'], s['packed'])} ({s['num_classes']} "
                   f"classes, {s['faces_written']} faces)")
    if s.get("splits"):
        parts = ", ".join(f"{name} {v['faces']} faces of {v['identities']} identities ({v['fraction']:.1%} of the photos)"
                          for name, v in s["splits"]["splits"].items() if v["fraction"] is not None)
        held = s["splits"]["held_out"]
        click.echo(f"Splits: {parts}; held out: {held['identities']} identities ({held['faces']} faces)")
    report = os.path.join(s["output_dir"], "report.html")
    if report_written and os.path.isfile(report):
        click.echo(f"Report: {report} (open it in a browser)")


if __name__ == "__main__":
    main()
