"""--align arcface against insightface 2.1's own norm_crop, on every face of a folder.

Usage: python bench/parity_warp_dev.py [FACES_DIR] [--keep OUT]     (default ../shared/faces/dev)

Aligns FACES_DIR with `align_dataset --align arcface --detect_multiple_faces` (112 px), then, for
every written face, runs insightface's estimate_norm and norm_crop (tests/insightface_reference.py:
the insightface==2.1 wheel's face_align.py, test-only) on the decoded photo and the landmarks
that faces.jsonl records, and compares: at 112 px the PNG the run wrote; at 128, 224 and 256 px
align.warp's thumbnail of the same landmarks. Prints, per size, the faces compared, the largest
matrix and pixel differences and the share of pixel values that differ at all; writes them to
bench/out/parity_warp_<folder>.json. Exit 1 when a matrix differs by more than 1e-5 or a pixel by
more than 1 gray level.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import insightface_reference as ref  # noqa: E402
from align import align_dataset  # noqa: E402
from align.imageio import decode_image  # noqa: E402
from align.warp import face_transform, warp  # noqa: E402

SHARED = ROOT.parent / "shared"


def compare_all(faces_dir: Path, out: Path) -> dict:
    stats = {s: {"faces": 0, "matrix_max_abs_diff": 0.0, "pixel_max_abs_diff": 0,
                 "values_differing": 0, "values": 0} for s in ref.SIZES}
    for line in (out / "faces.jsonl").read_text(encoding="utf-8", errors="surrogateescape").splitlines():
        record = json.loads(line)
        if not record["written"]:
            continue
        image = decode_image(faces_dir / record["input"])
        for w in record["written"]:
            landmarks = np.array(record["faces"][w["face"]]["landmarks"])
            for size in ref.SIZES:
                m_ref, thumb_ref = ref.norm_crop(image, landmarks, size)
                if size == 112:
                    matrix = np.array(w["matrix"])
                    with Image.open(out / w["output"]) as im:
                        thumb = np.asarray(im.convert("RGB"))
                else:
                    matrix, shape = face_transform(landmarks, size)
                    thumb = warp(image, matrix, shape)
                most, differing = ref.compare(thumb, thumb_ref)
                s = stats[size]
                s["faces"] += 1
                s["matrix_max_abs_diff"] = max(s["matrix_max_abs_diff"], float(np.abs(matrix - m_ref).max()))
                s["pixel_max_abs_diff"] = max(s["pixel_max_abs_diff"], most)
                s["values_differing"] += differing
                s["values"] += thumb.size
    for s in stats.values():
        s["share_differing"] = s["values_differing"] / s["values"] if s["values"] else None
    return stats


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("faces_dir", nargs="?", default=str(SHARED / "faces" / "dev"))
    ap.add_argument("--keep", metavar="OUT", help="align into OUT and keep it (default: a temporary folder)")
    args = ap.parse_args(argv)
    faces_dir = Path(args.faces_dir)
    if not faces_dir.is_dir():
        ap.error(f"{faces_dir} is not a folder")
    with tempfile.TemporaryDirectory(prefix="parity-warp-") as tmp:
        out = Path(args.keep or Path(tmp) / "out")
        t0 = time.perf_counter()
        summary = align_dataset(faces_dir, out, align="arcface", detect_multiple_faces=True,
                                quiet=True, overwrite=True)
        t1 = time.perf_counter()
        stats = compare_all(faces_dir, out)
        t2 = time.perf_counter()
    print(f"{faces_dir}: {summary['images']} photos, {summary['aligned']} aligned, "
          f"{summary['faces_written']} faces written (align {t1 - t0:.0f} s, compare {t2 - t1:.0f} s)")
    for size, s in stats.items():
        share = "n/a" if s["share_differing"] is None else f"{s['share_differing']:.4%}"
        print(f"  S={size}: {s['faces']} faces, matrix max |diff| {s['matrix_max_abs_diff']:.1e}, "
              f"pixel max |diff| {s['pixel_max_abs_diff']}, values differing {share}")
    (BENCH / "out").mkdir(exist_ok=True)
    path = BENCH / "out" / f"parity_warp_{faces_dir.resolve().name}.json"
    path.write_text(json.dumps({"faces_dir": str(faces_dir), "summary": {k: summary[k] for k in (
        "images", "aligned", "no_face", "unreadable", "faces_written")}, "sizes": stats}, indent=1))
    print(f"report: {path}")
    bad = any(s["matrix_max_abs_diff"] > 1e-5 or s["pixel_max_abs_diff"] > 1 for s in stats.values())
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
