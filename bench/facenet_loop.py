"""facenet's align_dataset_mtcnn.py loop (facenet==1.0.5), timed, for bench/bench.py.

Usage: python bench/facenet_loop.py INPUT_DIR OUTPUT_DIR --json RESULT.json
           [--image_size 160] [--margin 44]

What runs is facenet's own detect_face module from the installed wheel, loaded as
tests/facenet_reference.py loads it (read from site-packages, `import tensorflow.compat.v1 as
tf` shim, TF1 graph mode); nothing of facenet is copied here. Around it, the loop of
align_dataset_mtcnn.py: identity folders in sorted order, every file in them; decode (PIL, as
scipy.misc.imread did), gray -> RGB, [:, :, 0:3]; detect_face(img, 20, pnet, rnet, onet,
[0.6, 0.7, 0.7], 0.709); the largest, most central face; box +- margin/2, clipped; crop;
resize with PIL bilinear (what misc.imresize did); write OUTPUT_DIR/<identity>/<stem>.png and
the bounding_boxes_*.txt list. It prints no line per image (ours runs with --quiet too).

A failure on one image (undecodable file, detect_face raising) is counted and reported, and
the loop goes on (facenet's script catches decoding errors only; a detect_face error would
end it).

Timed: the loop over images only, after the session and nets are built (seconds_loop); then
a detect-only pass: all images decoded first, then only detect_face over them
(seconds_detect). seconds_to_loop_end: from the start of this script (imports, model
loading) to the end of the loop. Threads: TF intra-op = cores available, inter-op 1; cv2 the
same. Peak RSS is ru_maxrss: peak_rss_mb_loop when the loop ends, peak_rss_mb_detect after
the detect-only pass (which holds every decoded image in memory at once).
"""
from __future__ import annotations

import time

T_START = time.perf_counter()  # before the heavy imports: the process's own start is close

import argparse
import json
import os
import resource
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [p for p in (str(ROOT), str(ROOT / "tests")) if p not in sys.path]
from align.config import usable_cores  # noqa: E402  (no TensorFlow at import)
MINSIZE, THRESHOLDS, FACTOR = 20, [0.6, 0.7, 0.7], 0.709
MAX_ERRORS_LISTED = 20


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux


def list_images(input_dir: str | os.PathLike) -> list[tuple[str, Path]]:
    """(identity, path) of every file in every identity folder, as facenet.get_dataset lists
    them (folders sorted, loose files at the top level ignored); files sorted for a stable
    order."""
    root = Path(input_dir).expanduser()
    return [(d.name, f) for d in sorted(p for p in root.iterdir() if p.is_dir())
            for f in sorted(p for p in d.iterdir() if p.is_file())]


def decode_like_facenet(path: str | os.PathLike) -> np.ndarray:
    """HxWx3 uint8 RGB as facenet got it from scipy.misc.imread (PIL, no EXIF rotation):
    gray stacked to RGB, alpha dropped ([:, :, 0:3]); palette and any other mode converted to
    RGB, as the reference outputs in shared/reference were decoded."""
    with Image.open(path) as im:
        if im.mode not in ("L", "RGB", "RGBA"):
            im = im.convert("RGB")
        img = np.asarray(im)
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=2)
    return img[:, :, 0:3]


def pick_face(det: np.ndarray, img_size: np.ndarray) -> np.ndarray:
    """The one face facenet keeps: largest area minus twice the squared offset from the
    centre (det: N x 4 boxes; img_size: height, width)."""
    if det.shape[0] == 1:
        return np.squeeze(det)
    area = (det[:, 2] - det[:, 0]) * (det[:, 3] - det[:, 1])
    centre = img_size / 2
    offsets = np.vstack([(det[:, 0] + det[:, 2]) / 2 - centre[1],
                         (det[:, 1] + det[:, 3]) / 2 - centre[0]])
    return det[np.argmax(area - np.sum(np.power(offsets, 2.0), 0) * 2.0), :]


def crop_box(det: np.ndarray, img_size: np.ndarray, margin: int) -> np.ndarray:
    """x1, y1, x2, y2 (int32, truncated as facenet's assignment truncates), margin/2 around
    the box, clipped to the image."""
    bb = np.zeros(4, dtype=np.int32)
    bb[0] = np.maximum(det[0] - margin / 2, 0)
    bb[1] = np.maximum(det[1] - margin / 2, 0)
    bb[2] = np.minimum(det[2] + margin / 2, img_size[1])
    bb[3] = np.minimum(det[3] + margin / 2, img_size[0])
    return bb


def build_mtcnn(threads: int):
    """facenet's detect_face module and its three nets in a TF1 session (graph mode)."""
    import cv2
    import tensorflow.compat.v1 as tf
    from facenet_reference import load_detect_face
    from facenet_nets.weights import weights_dir

    tf.disable_v2_behavior()
    cv2.setNumThreads(threads)
    df = load_detect_face()
    with tf.Graph().as_default():
        sess = tf.Session(config=tf.ConfigProto(intra_op_parallelism_threads=threads,
                                                inter_op_parallelism_threads=1))
        with sess.as_default():
            pnet, rnet, onet = df.create_mtcnn(sess, str(weights_dir()))
    return df, (pnet, rnet, onet)


def align_loop(df, nets, images, output_dir: Path, image_size: int, margin: int) -> dict:
    """align_dataset_mtcnn.py's loop over (identity, path); counts of each outcome."""
    counts = {"aligned": 0, "unable": 0, "errors": 0}
    errors = []
    output_dir.mkdir(parents=True, exist_ok=True)
    with open(output_dir / f"bounding_boxes_{np.random.randint(0, 99999):05d}.txt", "w") as txt:
        for identity, path in images:
            class_dir = output_dir / identity
            class_dir.mkdir(exist_ok=True)
            out = class_dir / (path.stem + ".png")
            if out.exists():
                continue
            try:
                img = decode_like_facenet(path)
                boxes, _ = df.detect_face(img, MINSIZE, *nets, THRESHOLDS, FACTOR)
                if boxes.shape[0] == 0:
                    counts["unable"] += 1
                    txt.write(f"{out}\n")
                    continue
                img_size = np.asarray(img.shape)[0:2]
                bb = crop_box(pick_face(boxes[:, 0:4], img_size), img_size, margin)
                cropped = img[bb[1]:bb[3], bb[0]:bb[2], :]
                Image.fromarray(cropped).resize((image_size, image_size), Image.BILINEAR).save(out)
                counts["aligned"] += 1
                txt.write(f"{out} {bb[0]} {bb[1]} {bb[2]} {bb[3]}\n")
            except Exception as e:  # one bad image must not end the run
                counts["errors"] += 1
                errors.append(f"{path}: {type(e).__name__}: {e}")
    return {**counts, "error_messages": errors[:MAX_ERRORS_LISTED]}


def detectable(img) -> bool:
    """What both detect-only passes take: decoded HxWx3 uint8 arrays, not empty."""
    return (img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
            and img.shape[0] > 0 and img.shape[1] > 0)


def decode_all(images) -> tuple[list[np.ndarray], list[str]]:
    """Decoded arrays that both detect-only passes take, and why the others were left out."""
    decoded, skipped = [], []
    for _, path in images:
        try:
            img = decode_like_facenet(path)
        except Exception as e:
            skipped.append(f"{path}: {type(e).__name__}: {e}")
            continue
        if detectable(img):
            decoded.append(img)
        else:
            skipped.append(f"{path}: not HxWx3 uint8 ({img.dtype}, {img.shape})")
    return decoded, skipped


def detect_only(df, nets, decoded: list[np.ndarray]) -> tuple[float, int]:
    """Seconds to run detect_face over the decoded images, and how many raised."""
    failed = 0
    t0 = time.perf_counter()
    for img in decoded:
        try:
            df.detect_face(img, MINSIZE, *nets, THRESHOLDS, FACTOR)
        except Exception:
            failed += 1
    return time.perf_counter() - t0, failed


def per_s(n: int, seconds: float) -> float | None:
    return round(n / seconds, 2) if seconds > 0 else None


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("input_dir")
    ap.add_argument("output_dir")
    ap.add_argument("--json", required=True, help="where to write the timings")
    ap.add_argument("--image_size", type=int, default=160)
    ap.add_argument("--margin", type=int, default=44)
    args = ap.parse_args(argv)

    threads = usable_cores()
    t0 = time.perf_counter()
    df, nets = build_mtcnn(threads)
    setup_s = time.perf_counter() - t0
    images = list_images(args.input_dir)

    t0 = time.perf_counter()
    loop = align_loop(df, nets, images, Path(args.output_dir), args.image_size, args.margin)
    loop_end = time.perf_counter()
    loop_s = loop_end - t0
    rss_loop = peak_rss_mb()

    decoded, skipped = decode_all(images)
    detect_s, detect_failed = detect_only(df, nets, decoded)

    result = {
        "implementation": "facenet 1.0.5 loop", "threads": threads,
        "images": len(images), **loop,
        "seconds_setup": round(setup_s, 3),
        "seconds_loop": round(loop_s, 3), "photos_per_s_loop": per_s(len(images), loop_s),
        "seconds_to_loop_end": round(loop_end - T_START, 3),
        "detect_images": len(decoded), "detect_skipped": skipped[:MAX_ERRORS_LISTED],
        "detect_failed": detect_failed,
        "seconds_detect": round(detect_s, 3), "photos_per_s_detect": per_s(len(decoded), detect_s),
        "peak_rss_mb_loop": rss_loop, "peak_rss_mb_detect": peak_rss_mb(),
    }
    Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
