"""One frozen Config for a run: every default is decided here, read by the CLI, the Python
entry point and `make align` alike."""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field

from align.splits import SPLIT_BY, Splits, check_splits, parse_splits


FORMATS = ("png", "jpg")
ENGINES = ("local", "dask")
ALIGNS = ("box", "arcface")
OUTPUT_FORMATS = ("folders", "rec", "webdataset")   # align/writers.py
# what image_size and margin are, per align mode, when they are not given
ALIGN_DEFAULTS = {"box": (182, 44), "arcface": (112, None)}


class Default(int):
    """An image_size or margin that was not given: the default of the run's align mode, which
    Config fills in again when dataclasses.replace changes the mode (a given value it keeps)."""
    __slots__ = ()


@dataclass(frozen=True)
class DetectParams:
    """minsize: smallest face searched for, pixels of the input image; thresholds: P/R/O-Net
    face probabilities to pass; factor: scale step between pyramid levels."""
    minsize: float = 20
    thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7)
    factor: float = 0.709

    def __post_init__(self):
        if not 0 < self.minsize < math.inf:
            raise ValueError(f"minsize must be a number > 0, not {self.minsize}")
        if len(self.thresholds) != 3 or not all(0 <= t <= 1 for t in self.thresholds):
            raise ValueError(f"thresholds must be three numbers in [0, 1], not {self.thresholds}")
        if not 0 < self.factor < 1:
            raise ValueError(f"factor must be in (0, 1), not {self.factor}")
        object.__setattr__(self, "thresholds", tuple(float(t) for t in self.thresholds))


WORKER_MEMORY_BYTES = 1_500_000_000     # resident peak of one worker on multi-megapixel photos
MAX_TAR_SHARD_MB = 100_000     # 100 GB: a shard is one file
MAX_IMAGE_SIZE = 4096   # thumbnail side, pixels: 50 MB a thumbnail (30000 would be 2.7 GB)


def available_memory() -> int | None:
    """Bytes of memory available now (Linux's MemAvailable), None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def bounded_workers(requested: int, shards: int, available: int | None = None,
                    cores: int | None = None) -> tuple[int, str | None]:
    """Worker processes to start on this machine for `shards` shards: `requested`, but no more
    than there are shards, than there are usable `cores` (default: usable_cores(); each worker
    keeps a core busy, and more only share them, a framework's memory each), or than
    `available` bytes of memory hold (WORKER_MEMORY_BYTES each; default: what
    available_memory() finds now); a warning when cores or memory capped them. Checked
    before any worker starts."""
    warnings = []
    cores = usable_cores() if cores is None else cores
    if requested > cores:
        warnings.append(f"--workers {requested}: this machine has {cores} usable core(s); "
                        f"starting {cores} at most")
    n = max(1, min(requested, cores, shards))
    if available is None:
        available = available_memory()
    if available is not None and n > max(1, available // WORKER_MEMORY_BYTES):
        n = max(1, available // WORKER_MEMORY_BYTES)
        warnings.append(f"--workers {requested}: {available / 1e9:.1f} GB of memory available holds "
                        f"{n} worker(s) of ~{WORKER_MEMORY_BYTES / 1e9:.1f} GB; starting {n}")
    return n, "; ".join(warnings) or None


def usable_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def default_workers() -> int:
    """One worker process per usable core (each runs TensorFlow on one thread: on these small
    convolutions two processes do more than one process with two threads), fewer when the
    available memory cannot hold that many workers."""
    cores = usable_cores()
    available = available_memory()
    return cores if available is None else max(1, min(cores, available // WORKER_MEMORY_BYTES))


@dataclass(frozen=True)
class Config:
    """align: "box" (facenet's crop: the detected box grown by margin, resized) or "arcface"
    (the face warped so that its five landmarks land on insightface's 112x112 template, see
    align/warp.py); image_size: side of the written thumbnails, pixels (default 182 for box,
    112 for arcface); margin: box only: pixels of the input image added around the detected
    box in total (half on each side) before cropping (default 44; None for arcface, where
    giving one is an error);
    detect_multiple_faces: write every face, not only the central, largest one;
    random_order: process the images in random order; the output is the same;
    gpu_memory_fraction: upper bound of GPU memory per worker process, when a GPU is used;
    workers: processes; min_face_size, thresholds, factor: the detector's (see DetectParams);
    format: of the thumbnails; overwrite: redo everything instead of resuming;
    quiet: no progress output; engine: where the shards run ("local": a process pool here,
    "dask": a Dask cluster); scheduler: the Dask scheduler's address (None: the
    DASK_SCHEDULER_ADDRESS environment variable, else a LocalCluster of `workers` processes);
    report: write OUTPUT_DIR/report.html at the end (align.report);
    device: None (every worker runs the nets itself), or "cpu", "gpu", "gpu:N": one process
    holds the nets on that device and runs them for every worker, batched over their photos
    (align/nets_server.py; the local engine only); output_format: "folders" (a thumbnail file
    per face), "rec" (train.rec and train.idx, MXNet's indexed RecordIO, as arcface_torch
    reads it) or "webdataset" (tar shards), see align/writers.py; tar_shard_mb: webdataset
    only, the size a tar shard stays under, MB (10^6 bytes; one sample at least);
    split: None, or ((name, fraction of the photos), ...) (or its text,
    "train=0.8,validation=0.1,test=0.1"): thumbnails go to OUTPUT_DIR/<split>/<identity>/
    (align/splits.py); split_by: "photo" (a photo's split from its bytes) or "identity" (from
    its identity folder's name: no identity in two splits); split_seed: mixed into the hash."""
    image_size: int | None = None
    margin: int | None = None
    detect_multiple_faces: bool = False
    random_order: bool = False
    gpu_memory_fraction: float = 1.0
    workers: int = field(default_factory=default_workers)
    min_face_size: float = DetectParams.minsize
    thresholds: tuple[float, float, float] = DetectParams.thresholds
    factor: float = DetectParams.factor
    format: str = "png"
    overwrite: bool = False
    quiet: bool = False
    engine: str = "local"
    scheduler: str | None = None
    report: bool = True
    align: str = "box"
    device: str | None = None
    output_format: str = "folders"
    tar_shard_mb: int = 256
    split: Splits | str | None = None
    split_by: str = "photo"
    split_seed: int = 0

    def __post_init__(self):
        if self.align not in ALIGNS:
            raise ValueError(f"align must be one of {ALIGNS}, not {self.align!r}")
        size, margin = ALIGN_DEFAULTS[self.align]
        if self.image_size is None or isinstance(self.image_size, Default):
            object.__setattr__(self, "image_size", Default(size))
        if self.margin is None or isinstance(self.margin, Default):
            object.__setattr__(self, "margin", None if margin is None else Default(margin))
        elif margin is None:
            raise ValueError(f"margin is for --align box (facenet's crop); --align {self.align} "
                             f"crops by its template: leave margin out")
        if not 1 <= self.image_size <= MAX_IMAGE_SIZE:
            raise ValueError(f"image_size must be in 1..{MAX_IMAGE_SIZE} pixels, not {self.image_size}")
        if self.margin is not None and self.margin < 0:
            raise ValueError(f"margin must be >= 0, not {self.margin}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, not {self.workers}")
        if not 0 < self.gpu_memory_fraction <= 1:
            raise ValueError(f"gpu_memory_fraction must be in (0, 1], not {self.gpu_memory_fraction}")
        if self.format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, not {self.format!r}")
        if self.output_format not in OUTPUT_FORMATS:
            raise ValueError(f"output_format must be one of {OUTPUT_FORMATS}, not {self.output_format!r}")
        if not 1 <= self.tar_shard_mb <= MAX_TAR_SHARD_MB:
            raise ValueError(f"tar_shard_mb must be in 1..{MAX_TAR_SHARD_MB}, not {self.tar_shard_mb}")
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, not {self.engine!r}")
        if self.device is not None and not re.fullmatch(r"(cpu|gpu)(:\d+)?", self.device):
            raise ValueError(f"device must be cpu, gpu or gpu:N, not {self.device!r}")
        if self.device is not None and self.engine != "local":
            raise ValueError("--device is for the local engine (one nets process on this machine)")
        if self.scheduler and self.engine != "dask":
            raise ValueError("a scheduler address is for the dask engine (--engine dask)")
        if isinstance(self.split, str):
            object.__setattr__(self, "split", parse_splits(self.split))
        elif self.split is not None:
            object.__setattr__(self, "split", check_splits(self.split))
        if self.split_by not in SPLIT_BY:
            raise ValueError(f"split_by must be one of {SPLIT_BY}, not {self.split_by!r}")
        if not isinstance(self.split_seed, int) or isinstance(self.split_seed, bool):
            raise ValueError(f"split_seed must be an integer, not {self.split_seed!r}")
        object.__setattr__(self, "thresholds", tuple(float(t) for t in self.thresholds))
        object.__setattr__(self, "min_face_size", float(self.min_face_size))   # as the CLI gives it
        self.detect_params  # validates the detector's parameters too

    @property
    def detect_params(self) -> DetectParams:
        return DetectParams(self.min_face_size, self.thresholds, self.factor)

    @property
    def extension(self) -> str:
        return "." + self.format
