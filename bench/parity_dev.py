"""Compare our detections with facenet's on a folder, from the reference JSON lines.

Usage: python bench/parity_dev.py [FACES_DIR] [REFERENCE_JSONL] [--no-lone-cell-quirk]

Prints face-count mismatches (with their boxes), the box deltas of matched faces (max, median,
share within 0.5 px) and the share of images whose aligned/not-aligned outcome matches. Images
are decoded as the reference was (PIL, no EXIF rotation, to RGB).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from align import boxes as bx
from align.detect import Detector

SHARED = Path(__file__).resolve().parents[2] / "shared"


def decode_like_facenet(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def compare(faces_dir: Path, reference: Path, detector: Detector) -> dict:
    rows = [json.loads(line) for line in reference.read_text().splitlines() if line.strip()]
    deltas, mismatches, same_outcome = [], [], 0
    t0 = time.perf_counter()
    for row in rows:
        faces = detector.detect(decode_like_facenet(faces_dir / row["path"]))
        ref = np.asarray(row["boxes"], dtype=np.float64).reshape(-1, 5)
        same_outcome += (len(faces) > 0) == (len(ref) > 0)
        if len(faces) != len(ref):
            mismatches.append({"path": row["path"], "ours": faces.boxes.round(2).tolist(),
                               "ours_scores": faces.scores.round(4).tolist(),
                               "facenet": ref.round(2).tolist()})
            continue
        if len(ref):
            deltas.extend(np.abs(faces.boxes - ref[:, :4]).max(axis=1).tolist())
    d = np.asarray(deltas)
    return {"images": len(rows), "seconds": round(time.perf_counter() - t0, 1),
            "count_mismatches": mismatches,
            "same_count_share": 1 - len(mismatches) / len(rows),
            "aligned_outcome_share": same_outcome / len(rows),
            "matched_faces": len(d), "box_delta_max_px": float(d.max()) if len(d) else 0.0,
            "box_delta_median_px": float(np.median(d)) if len(d) else 0.0,
            "within_half_px_share": float((d <= 0.5).mean()) if len(d) else 1.0}


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    faces_dir = Path(args[0]) if args else SHARED / "faces" / "dev"
    reference = Path(args[1]) if len(args) > 1 else SHARED / "reference" / "facenet_dev.jsonl"
    detector = Detector()
    if "--no-lone-cell-quirk" in sys.argv:
        original = bx.generate_boxes
        bx.generate_boxes = lambda *a, **k: original(*a, **k, mirror_lone_cell=False)
    print(json.dumps(compare(faces_dir, reference, detector), indent=1))
