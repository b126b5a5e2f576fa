"""What the trainers' own loaders see in an OUTPUT_DIR: the test oracle of the output layout.

Usage: python tests/loaders.py KIND PATH... [--image-size N]   (a JSON object per PATH, a line each)
From Python: run(KIND, PATH) -> result; run_paths(KIND, [PATH, ...]) -> [result, ...] (one
process, one import of the library for all); run_all(PATH) -> {KIND: result} for the four
folder loaders; by_key(result) -> {key: (label, h, w, sha256)}; file_pixels(FILE) -> (h, w,
sha256) as PIL decodes it; pixel_sha256(array); mxnet_python() -> MXNet's venv's python.

Each loader is the real one, called as its users call it; none is re-implemented here:

  facenet        facenet 1.0.5's `get_dataset(PATH)` and `get_image_paths_and_labels`, what its
                 train_softmax.py / train_tripletloss.py call. Its facenet.py imports TF1-era
                 modules at the top, so only those definitions (and its `import os`) are taken
                 from the installed wheel's source with `ast` and run (`exec_definitions`). Each
                 path is decoded with PIL, as its trainer's `misc.imread` did.
  imagefolder    torchvision 0.28.0's `datasets.ImageFolder(PATH)` with its defaults (its own
                 default_loader), on CPU torch 2.13.0, every sample read through `ds[i]`. PyPI's
                 torchvision carries a CUDA-built extension that CPU torch cannot load, so its
                 `datasets/folder.py`, `datasets/vision.py` and `utils.py` are taken from the
                 wheel (sha256-checked, cached in the user cache as tests/insightface_reference.py
                 does) and imported under a `torchvision` package holding only the wheel's own
                 `get_image_backend` (from its __init__.py).
  keras          `tf.keras.utils.image_dataset_from_directory(PATH, labels="inferred",
                 shuffle=False, batch_size=None, image_size=S)`, iterated to the end. Keras
                 resizes every image to S: S is `--image-size`, or by default the size of the
                 first file it lists. On thumbnails of that one size the resize is the identity,
                 so its pixels are the decoded file's: the sha256 proves each file was decoded
                 (and the count of images yielded is checked against its file list). A file it
                 cannot decode stops its iteration: that is the result's `error`.
  hf_imagefolder Hugging Face `datasets.load_dataset("imagefolder", data_files={"train":
                 "PATH/**"})`, every row decoded; classes are its `label` feature's names. (With
                 `data_dir`, it takes folder names such as `x_test` for splits.) It skips hidden
                 and empty folders.
  mxnet_rec      MXNet 1.9.1's `mx.recordio.MXIndexedRecordIO(idx, rec, "r")`, `unpack` and
                 `mx.image.imdecode`, as arcface_torch's MXFaceDataset uses them: record 0's
                 header with flag > 0 gives the keys range(1, label[0]), else all keys; a label
                 that is a list counts by its first element. PATH is the folder of train.rec and
                 train.idx, or a .rec file. It runs in a venv of its own (MXNet needs
                 numpy < 1.24), built once in the user cache by `mxnet_python()` on first use
                 (so by the first test that reads a rec, in CI too); the wheel links the
                 system's libgomp.so.1 and libquadmath.so.0 (Debian: libgomp1, libquadmath0,
                 which come with gcc).
  webdataset     `wds.WebDataset(shards, shardshuffle=False).decode("rgb")` (float RGB: x255 and
                 rounded back to uint8, exactly). PATH is a folder (its *.tar, sorted), a
                 shard, or a brace pattern.
  hf_webdataset  `datasets.load_dataset("webdataset", data_files={"train": shards})`. It takes
                 its columns from the first shard: it refuses a shard whose samples mix image
                 extensions, and a later sample with another extension comes without image
                 (a decode error here).
  tar_members    Python's `tarfile` listing of one uncompressed tar: each member's metadata,
                 in archive order, with the format of its header block (typeflag and magic).

Every loader runs in a process of its own: TensorFlow, torch and MXNet do not share one well,
and facenet's code is TF1-era. A loader's result is a dict:

  {"loader": KIND,
   "error": None | {"type": "FileNotFoundError", "message": "..."},   # it refused PATH
   "classes": [names, in label order] | None,       # None: the format carries no names
   "samples": [[key, label, h, w, sha256], ...],    # in the loader's order, each one decoded
   "decode_errors": [{"key", "label", "type", "message"}, ...],   # samples it failed to decode
   "meta": [dict per sample] | None}                # packed formats: what else a sample carries

key is the path relative to PATH for the folder loaders, the record index for mxnet_rec (whose
result also has "header0": [label[0], label[1]] | None), the `__key__` for the WebDataset
readers. label is a class NAME where the loader has a class list (its integer label mapped
through it), the integer label where the format has none (rec header, .cls). sha256 is that of
the decoded RGB uint8 pixels in C order (`pixel_sha256`). tar_members gives {"loader", "error",
"members": [{"name", "size", "mode", "uid", "gid", "mtime", "uname", "gname", "type", "format",
"pax_headers", "sha256" (of the content)}], "pax_headers" (the archive's global ones)}.
A failure outside the loader (an import, the set-up, no JSON) raises LoaderCrash.
"""
from __future__ import annotations

import argparse
import ast
import fcntl
import functools
import glob
import hashlib
import importlib
import importlib.util
import io
import json
import os
import subprocess
import sys
import tempfile
import types
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent

FOLDER_LOADERS = ("facenet", "imagefolder", "keras", "hf_imagefolder")
PACKED_LOADERS = ("mxnet_rec", "webdataset", "hf_webdataset", "tar_members")
KINDS = FOLDER_LOADERS + PACKED_LOADERS

TORCHVISION_WHEEL = "torchvision==0.28.0"       # the release paired with torch 2.13.0
TORCHVISION_MEMBERS = {
    "torchvision/__init__.py": "775cb7a87f9b26eb9fcb498f79313560a4878968d458acaf95b9b5ae6b4656d3",
    "torchvision/utils.py": "5a0a5d9aa6b0c7d74523b29f9a0fe616127a7b38afd3c8f55f0a22fac101ba1c",
    "torchvision/datasets/vision.py": "f5f20cf68ff2caa7717298ff6e5798ca6bbb028a3aa7747bdf4343e1425a0f3b",
    "torchvision/datasets/folder.py": "b2a36e520cf451d82b993e6fdaa1266d8526ef6a402dcf401f23f0c9cd0a8efa",
}
MXNET_REQUIREMENTS = ("mxnet==1.9.1", "numpy==1.23.5", "graphviz==0.8.4", "requests")


class LoaderCrash(RuntimeError):
    """A loader's process failed outside the loader itself (import, set-up, no JSON)."""


# --------------------------------------------------------------------------- running loaders

def run(kind: str, path: str | os.PathLike, image_size: int | None = None,
        timeout: float = 600) -> dict:
    """The result (see the module docstring) of loader `kind` on `path`, run in a subprocess."""
    return run_paths(kind, [path], image_size=image_size, timeout=timeout)[0]


def run_paths(kind: str, paths: list[str | os.PathLike], image_size: int | None = None,
              timeout: float = 600) -> list[dict]:
    """The results of loader `kind` on each of `paths`, in one subprocess (one import of its
    library for all: TensorFlow's alone takes seconds)."""
    if kind not in KINDS:
        raise ValueError(f"unknown loader {kind!r}; one of {', '.join(KINDS)}")
    python = str(mxnet_python()) if kind == "mxnet_rec" else sys.executable
    cmd = [python, str(Path(__file__).resolve()), kind, *map(str, paths)]
    if image_size is not None:
        cmd += ["--image-size", str(image_size)]
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=pythonpath, TF_CPP_MIN_LOG_LEVEL="2",
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise LoaderCrash(f"{kind} on {paths} exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    try:
        results = [json.loads(line) for line in proc.stdout.splitlines()]
    except json.JSONDecodeError as e:
        raise LoaderCrash(f"{kind} printed no JSON ({e}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    if len(results) != len(paths):
        raise LoaderCrash(f"{kind} printed {len(results)} results for {len(paths)} paths")
    return results


def run_all(path: str | os.PathLike, kinds: tuple[str, ...] = FOLDER_LOADERS,
            image_size: int | None = None) -> dict[str, dict]:
    """{kind: result} of each loader in `kinds` on `path`, one after the other."""
    return {kind: run(kind, path, image_size=image_size) for kind in kinds}


def by_key(result: dict) -> dict[Any, tuple]:
    """{key: (label, h, w, sha256)} of a result's samples; raises if a key repeats."""
    table = {}
    for key, label, h, w, sha in result["samples"]:
        key = tuple(key) if isinstance(key, list) else key
        if key in table:
            raise ValueError(f"{result['loader']} gave the key {key!r} twice")
        table[key] = (label, h, w, sha)
    return table


def pixel_sha256(pixels) -> str:
    """sha256 of an (H, W, 3) uint8 RGB image's bytes in C order."""
    import numpy as np
    a = np.ascontiguousarray(pixels)
    if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"expected (H, W, 3) uint8 pixels, got {a.shape} {a.dtype}")
    return hashlib.sha256(a.tobytes()).hexdigest()


def file_pixels(path: str | os.PathLike) -> tuple[int, int, str]:
    """(h, w, sha256 of the RGB pixels) of an image file as PIL decodes it."""
    pixels = _pil_rgb(path)
    return pixels.shape[0], pixels.shape[1], pixel_sha256(pixels)


# --------------------------------------------------------------------------- result helpers

def _error(e: BaseException) -> dict:
    return {"type": type(e).__name__, "message": str(e)}


def _result(kind: str, classes=None, samples=None, decode_errors=None, meta=None,
            error: BaseException | None = None) -> dict:
    return {"loader": kind, "error": None if error is None else _error(error),
            "classes": classes, "samples": samples if samples is not None else [],
            "decode_errors": decode_errors or [], "meta": meta}


def _decode_each(kind: str, classes, items, decode: Callable[[Any], Any], meta_of=None) -> dict:
    """Decode every (key, label, handle) of `items` with `decode` (handle -> RGB uint8 array)
    into a result; a sample that fails to decode goes to decode_errors."""
    samples, errors, meta = [], [], ([] if meta_of else None)
    for key, label, handle in items:
        try:
            pixels = decode(handle)
        except Exception as e:      # the loader's own failure on this sample is what we report
            errors.append({"key": key, "label": label, **_error(e)})
            continue
        samples.append([key, label, int(pixels.shape[0]), int(pixels.shape[1]), pixel_sha256(pixels)])
        if meta_of:
            meta.append(meta_of(handle))
    return _result(kind, classes, samples, errors, meta)


def _import_repo() -> None:
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))


def _relative(path: str, root: str) -> str:
    return os.path.relpath(path, root)


def exec_definitions(source_path: str | os.PathLike, names: set[str],
                     imports: set[str] = frozenset()) -> dict:
    """Run only the top-level definitions `names` (functions, classes, assignments) of a Python
    file, and its `import X` statements for X in `imports`; return the namespace they made."""
    path = str(source_path)
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    keep = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name in names:
            keep.append(node)
        elif isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id in names for t in node.targets):
            keep.append(node)
        elif isinstance(node, ast.Import) and all(a.name in imports for a in node.names):
            keep.append(node)
    found = {getattr(n, "name", None) for n in keep} | {t.id for n in keep if isinstance(n, ast.Assign)
                                                         for t in n.targets if isinstance(t, ast.Name)}
    if names - found:
        raise LoaderCrash(f"{path} no longer defines {sorted(names - found)}")
    namespace = {"__name__": Path(path).stem, "__file__": path}
    exec(compile(ast.Module(body=keep, type_ignores=[]), path, "exec"), namespace)
    return namespace


# --------------------------------------------------------------------------- folder loaders

def _pil_rgb(path: str | os.PathLike):
    import numpy as np
    from PIL import Image
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def load_facenet(path: str) -> dict:
    """facenet 1.0.5's get_dataset + get_image_paths_and_labels, each path decoded with PIL."""
    spec = importlib.util.find_spec("facenet")
    if spec is None:
        raise LoaderCrash("facenet==1.0.5 is not installed (the Makefile installs it --no-deps)")
    source = Path(spec.submodule_search_locations[0]) / "src" / "facenet.py"
    fn = exec_definitions(source, {"ImageClass", "get_dataset", "get_image_paths",
                                   "get_image_paths_and_labels"}, imports={"os"})
    try:
        dataset = fn["get_dataset"](path)
        paths, labels = fn["get_image_paths_and_labels"](dataset)
    except Exception as e:
        return _result("facenet", error=e)
    classes = [c.name for c in dataset]
    items = [(_relative(p, path), classes[i], p) for p, i in zip(paths, labels)]
    return _decode_each("facenet", classes, items, _pil_rgb)


@functools.cache
def torchvision_folder() -> types.ModuleType:
    """torchvision.datasets.folder from the torchvision wheel (cached, sha256-checked), imported
    without the wheel's compiled extension."""
    _import_repo()
    from facenet_nets.wheelfile import fetch_members, sha256_of, user_cache_dir
    root = user_cache_dir("reference") / TORCHVISION_WHEEL.replace("==", "-")
    wanted = {m: (sha, root / m) for m, sha in TORCHVISION_MEMBERS.items()}
    if not all(dest.is_file() and sha256_of(dest) == sha for sha, dest in wanted.values()):
        fetch_members(TORCHVISION_WHEEL, wanted)
    package = types.ModuleType("torchvision")
    package.__path__ = [str(root / "torchvision")]
    package.__dict__.update(exec_definitions(root / "torchvision" / "__init__.py",
                                             {"_image_backend", "get_image_backend"}))
    package.__name__ = "torchvision"
    datasets = types.ModuleType("torchvision.datasets")
    datasets.__path__ = [str(root / "torchvision" / "datasets")]
    sys.modules["torchvision"], sys.modules["torchvision.datasets"] = package, datasets
    package.datasets = datasets
    return importlib.import_module("torchvision.datasets.folder")


def load_imagefolder(path: str) -> dict:
    """torchvision's ImageFolder(path) with its defaults; every sample read through it."""
    import numpy as np
    folder = torchvision_folder()
    try:
        ds = folder.ImageFolder(path)
    except Exception as e:
        return _result("imagefolder", error=e)
    items = [(_relative(p, path), ds.classes[t], i) for i, (p, t) in enumerate(ds.samples)]
    return _decode_each("imagefolder", list(ds.classes), items, lambda i: np.asarray(ds[i][0]))


def load_keras(path: str, image_size: int | None = None) -> dict:
    """Keras image_dataset_from_directory(shuffle=False), every image decoded (and resized to
    image_size: by default the size of the first file it lists)."""
    import numpy as np
    import tensorflow as tf

    def dataset(size):
        return tf.keras.utils.image_dataset_from_directory(
            path, labels="inferred", label_mode="int", shuffle=False, batch_size=None,
            image_size=size)
    try:
        ds = dataset((256, 256))    # Keras's default size; only its file list is used
        if image_size is not None:
            size = (image_size, image_size)
        elif ds.file_paths:
            size = _pil_rgb(ds.file_paths[0]).shape[:2]
        else:
            size = (256, 256)
        if tuple(size) != (256, 256):
            ds = dataset(tuple(size))
        classes, paths = list(ds.class_names), list(ds.file_paths)
        decoded = [(np.asarray(img), int(label)) for img, label in ds.as_numpy_iterator()]
    except Exception as e:
        return _result("keras", error=e)
    if len(decoded) != len(paths):
        return _result("keras", error=LoaderCrash(f"{len(paths)} files listed, {len(decoded)} decoded"))
    items = [(_relative(p, path), classes[label], img) for p, (img, label) in zip(paths, decoded)]
    return _decode_each("keras", classes, items, lambda img: np.round(img).astype(np.uint8))


def _hf_rgb(image):
    import numpy as np
    return np.asarray(image.convert("RGB"))


def load_hf_imagefolder(path: str) -> dict:
    """datasets.load_dataset("imagefolder", data_files={"train": path/**}), every row decoded."""
    import datasets
    with tempfile.TemporaryDirectory(prefix="hf-cache-") as cache:
        try:
            ds = datasets.load_dataset("imagefolder", data_files={"train": os.path.join(path, "**")},
                                       split="train", cache_dir=cache)
        except Exception as e:
            return _result("hf_imagefolder", error=e)
        label = ds.features.get("label")
        classes = list(label.names) if label is not None else None
        files = ds.cast_column("image", datasets.Image(decode=False))["image"]
        names = [classes[i] for i in ds["label"]] if classes is not None else [None] * len(ds)
        items = [(_relative(f["path"], path), name, i) for i, (f, name) in enumerate(zip(files, names))]
        return _decode_each("hf_imagefolder", classes, items, lambda i: _hf_rgb(ds[i]["image"]))


# --------------------------------------------------------------------------- packed loaders

def load_mxnet_rec(path: str) -> dict:
    """MXNet's indexed RecordIO read as arcface_torch's MXFaceDataset reads it."""
    import numbers

    import mxnet as mx
    rec = path if path.endswith(".rec") else os.path.join(path, "train.rec")
    idx = rec[:-4] + ".idx"
    try:
        imgrec = mx.recordio.MXIndexedRecordIO(idx, rec, "r")
        header, _ = mx.recordio.unpack(imgrec.read_idx(0))
        if header.flag > 0:
            header0 = [int(header.label[0]), int(header.label[1])]
            imgidx = list(range(1, int(header.label[0])))
        else:
            header0 = None
            imgidx = list(imgrec.keys)
    except Exception as e:
        return _result("mxnet_rec", error=e)

    def read(i):
        header, img = mx.recordio.unpack(imgrec.read_idx(i))
        label = header.label
        if not isinstance(label, numbers.Number):
            label = label[0]
        return header, int(label), img

    items, headers = [], {}
    for i in imgidx:
        try:
            header, label, img = read(i)
        except Exception as e:
            items.append((int(i), None, e))
            continue
        headers[int(i)] = header
        items.append((int(i), label, (int(i), img)))

    def decode(handle):
        if isinstance(handle, Exception):
            raise handle
        return mx.image.imdecode(handle[1]).asnumpy()

    def meta(handle):
        h = headers[handle[0]]
        label = [float(x) for x in h.label] if not isinstance(h.label, numbers.Number) else float(h.label)
        return {"flag": int(h.flag), "label": label, "id": int(h.id), "id2": int(h.id2)}
    result = _decode_each("mxnet_rec", None, items, decode, meta)
    result["header0"] = header0
    return result


def _shards(path: str) -> list[str] | str:
    if os.path.isdir(path):
        return sorted(glob.glob(os.path.join(path, "*.tar")))
    return path


def _image_field(sample: dict) -> str:
    import numpy as np
    found = [k for k, v in sample.items() if not k.startswith("__") and isinstance(v, np.ndarray)]
    if len(found) != 1:
        raise ValueError(f"sample {sample.get('__key__')!r} has {len(found)} images: {found}")
    return found[0]


def load_webdataset(path: str) -> dict:
    """webdataset's WebDataset(shards, shardshuffle=False).decode("rgb"), every sample."""
    import numpy as np
    import webdataset as wds
    try:
        rows = []
        for sample in wds.WebDataset(_shards(path), shardshuffle=False).decode("rgb"):
            field = _image_field(sample)
            rgb = np.round(sample[field] * 255.0).astype(np.uint8)   # "rgb" is uint8 / 255, float32
            meta = {"url": sample.get("__url__"), "image": field,
                    "json": sample.get("json"), "fields": sorted(sample)}
            rows.append((sample["__key__"], sample.get("cls"), (rgb, meta)))
    except Exception as e:
        return _result("webdataset", error=e)
    return _decode_each("webdataset", None, rows, lambda h: h[0], lambda h: h[1])


def load_hf_webdataset(path: str) -> dict:
    """datasets.load_dataset("webdataset", data_files={"train": shards}), every row decoded."""
    import datasets
    with tempfile.TemporaryDirectory(prefix="hf-cache-") as cache:
        try:
            ds = datasets.load_dataset("webdataset", data_files={"train": _shards(path)},
                                       split="train", cache_dir=cache)
            images = [k for k, f in ds.features.items() if isinstance(f, datasets.Image)]
            label = ds.features.get("cls")
            classes = list(label.names) if isinstance(label, datasets.ClassLabel) else None
            keys, labels = ds["__key__"], ds["cls"] if "cls" in ds.features else [None] * len(ds)
        except Exception as e:
            return _result("hf_webdataset", error=e)
        if classes is not None:
            labels = [classes[i] for i in labels]
        items = [(k, lab, i) for i, (k, lab) in enumerate(zip(keys, labels))]

        def image_field(row: dict) -> str:
            # its columns come from the first shard's samples: another extension is dropped
            found = [k for k in images if row[k] is not None]
            if len(found) != 1:
                raise ValueError(f"{len(found)} images in the columns {images} (features: {sorted(ds.features)})")
            return found[0]

        def meta(i):
            row = ds[i]
            return {"url": row.get("__url__"), "image": image_field(row), "json": row.get("json"),
                    "fields": sorted(ds.features)}

        def decode(i):
            row = ds[i]
            return _hf_rgb(row[image_field(row)])
        result = _decode_each("hf_webdataset", classes, items, decode, meta)
        result["features"] = {k: repr(f) for k, f in ds.features.items()}
        return result


_TAR_TYPES = ("REGTYPE", "AREGTYPE", "LNKTYPE", "SYMTYPE", "CHRTYPE", "BLKTYPE", "DIRTYPE",
              "FIFOTYPE", "CONTTYPE", "GNUTYPE_LONGNAME", "GNUTYPE_LONGLINK", "GNUTYPE_SPARSE")


def _header_format(raw: bytes) -> str:
    """The format of a member's first header block, from its typeflag and magic (POSIX.1-2001)."""
    import tarfile
    typeflag, magic = raw[156:157], raw[257:265]
    if typeflag in (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE):
        return "pax"
    if magic == tarfile.GNU_MAGIC or typeflag in (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK):
        return "gnu"
    if magic == tarfile.POSIX_MAGIC:
        return "ustar"
    return "v7"


def load_tar_members(path: str) -> dict:
    """tarfile's listing of an uncompressed tar: every member's metadata and content digest."""
    import tarfile
    names = {getattr(tarfile, n): n for n in _TAR_TYPES}
    members = []
    try:
        with tarfile.open(path, "r:") as tar, open(path, "rb") as raw:
            for ti in tar:
                raw.seek(ti.offset)
                data = tar.extractfile(ti).read() if ti.isfile() else b""
                members.append({
                    "name": ti.name, "size": ti.size, "mode": ti.mode, "uid": ti.uid,
                    "gid": ti.gid, "mtime": ti.mtime, "uname": ti.uname, "gname": ti.gname,
                    "type": names.get(ti.type, repr(ti.type)), "format": _header_format(raw.read(512)),
                    "pax_headers": dict(ti.pax_headers), "sha256": hashlib.sha256(data).hexdigest()})
            pax = dict(tar.pax_headers)
    except Exception as e:
        return {"loader": "tar_members", "error": _error(e), "members": None, "pax_headers": None}
    return {"loader": "tar_members", "error": None, "members": members, "pax_headers": pax}


LOADERS: dict[str, Callable[..., dict]] = {
    "facenet": load_facenet, "imagefolder": load_imagefolder, "keras": load_keras,
    "hf_imagefolder": load_hf_imagefolder, "mxnet_rec": load_mxnet_rec,
    "webdataset": load_webdataset, "hf_webdataset": load_hf_webdataset,
    "tar_members": load_tar_members,
}


# --------------------------------------------------------------------------- MXNet's venv

def mxnet_python() -> Path:
    """The python of a venv holding MXNet 1.9.1 (numpy 1.23), built once in the user cache
    (about 300 MB; its first build downloads the 49 MB mxnet wheel)."""
    _import_repo()
    from facenet_nets.wheelfile import user_cache_dir
    venv = user_cache_dir("mxnet-1.9.1-venv")
    python, stamp = venv / "bin" / "python", venv / ".complete"
    if stamp.is_file():
        return python
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / "mxnet-1.9.1-venv.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not stamp.is_file():
            _build_mxnet_venv(venv)
            stamp.write_text(" ".join(MXNET_REQUIREMENTS) + "\n")
    return python


def _build_mxnet_venv(venv: Path) -> None:
    base = getattr(sys, "_base_executable", sys.executable)
    steps = [[base, "-m", "venv", "--clear", str(venv)],
             [str(venv / "bin" / "python"), "-m", "pip", "install", "-q",
              "--disable-pip-version-check", *MXNET_REQUIREMENTS],
             [str(venv / "bin" / "python"), "-c", "import mxnet.recordio, mxnet.image"]]
    for cmd in steps:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise LoaderCrash(f"building MXNet's venv: {' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")


# --------------------------------------------------------------------------- command line

def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Print what a real loader sees in PATH, as JSON.")
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("paths", metavar="PATH", nargs="+")
    parser.add_argument("--image-size", type=int, default=None, help="keras: the size it resizes to")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)       # what loaders print ("Found 3 files...") must not mix with the JSON
    sys.stdout = io.TextIOWrapper(os.fdopen(1, "wb", closefd=False), write_through=True)
    kwargs = {"image_size": args.image_size} if args.kind == "keras" else {}
    for path in args.paths:
        json.dump(LOADERS[args.kind](path, **kwargs), out)
        out.write("\n")
        out.flush()


if __name__ == "__main__":
    main()
