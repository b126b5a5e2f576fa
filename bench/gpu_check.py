"""What bench/gpu.sh measures and compares on the GPU machine (no TensorFlow there).

  python bench/gpu_check.py detect-only DATA [--device gpu]
      every photo of DATA decoded first (as bench/bench.py's detect-only pass), then only
      Detector.detect_batch timed, over chunks of 64 photos, in this one process, with the
      nets on the device (Keras's backend: KERAS_BACKEND); prints photos/s
  python bench/gpu_check.py compare CPU_OUT OUT [--by-name] [--json FILE]
      OUT's records and thumbnails against those of a CPU run (CPU_OUT, carried from the
      development machine): photos with the same face count, the box differences of their
      faces (max, percentiles, share within 0.5 px), thumbnails byte-identical, and the
      largest gray-level difference of those that are not. --by-name matches photos by file
      name alone (OUT holds copies of CPU_OUT's photos under other identity folders).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH), str(BENCH.parent)]

import facenet_loop  # noqa: E402  (no TensorFlow at import)

CHUNK = 64


def detect_only(data: str, device: str) -> dict:
    import keras
    from align.detect import Detector, LocalNets
    from align.nets_server import GPU_MAX_ROWS, keras_device
    decoded, skipped = facenet_loop.decode_all(facenet_loop.list_images(data))
    with keras.device(keras_device(device)):
        detector = Detector(nets=LocalNets(max_rows=GPU_MAX_ROWS))
        detector.detect_batch(decoded[:1])
        t0 = time.perf_counter()
        faces = sum(len(f) for s in range(0, len(decoded), CHUNK)
                    for f in detector.detect_batch(decoded[s:s + CHUNK]))
        seconds = time.perf_counter() - t0
    return {"data": data, "backend": keras.backend.backend(), "device": device,
            "photos": len(decoded), "skipped": len(skipped), "faces": faces,
            "seconds": round(seconds, 3), "photos_per_s": round(len(decoded) / seconds, 1)}


def _records(out: Path, by_name: bool) -> dict[str, dict]:
    records = {}
    for line in (out / "faces.jsonl").read_text(encoding="utf-8", errors="surrogateescape").splitlines():
        r = json.loads(line)
        records.setdefault(Path(r["input"]).name if by_name else r["input"], []).append(r)
    return records


def _pixels(path: Path) -> np.ndarray:
    from PIL import Image
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).astype(np.int16)


def compare(cpu_out: Path, out: Path, by_name: bool) -> dict:
    cpu, ours = _records(cpu_out, by_name), _records(out, by_name)
    photos = same_count = identical = thumbs = 0
    deltas, gray = [], []
    for key, rows in ours.items():
        ref = cpu.get(key, [None])[0]
        if ref is None:
            continue
        for r in rows:
            photos += 1
            if len(r["faces"]) != len(ref["faces"]):
                continue
            same_count += 1
            for a, b in zip(r["faces"], ref["faces"]):
                deltas.append(np.abs(np.subtract(a["box"], b["box"])).max())
            for a, b in zip(r["written"], ref["written"]):
                mine, theirs = out / a["output"], cpu_out / b["output"]
                if not theirs.exists():     # the bundle keeps a fifth of lfw_gwb's (64 MiB)
                    continue
                thumbs += 1
                if mine.read_bytes() == theirs.read_bytes():
                    identical += 1
                elif (p := _pixels(mine)).shape == (q := _pixels(theirs)).shape:
                    gray.append(int(np.abs(p - q).max()))
                else:
                    gray.append(255)
    d = np.asarray(deltas)
    pct = {f"box_delta_p{q}_px": round(float(np.percentile(d, q)), 5) for q in (50, 99, 99.5)} if len(d) else {}
    return {"photos": photos, "same_face_count": same_count,
            "same_face_count_share": round(same_count / photos, 5) if photos else None,
            "faces": len(d), "box_delta_max_px": round(float(d.max()), 5) if len(d) else None, **pct,
            "within_half_px_share": round(float((d <= 0.5).mean()), 5) if len(d) else None,
            "thumbnails": thumbs, "thumbnails_identical": identical,
            "thumbnail_gray_max_diff": max(gray, default=0),
            "thumbnails_over_1_gray": sum(g > 1 for g in gray)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)
    d = sub.add_parser("detect-only")
    d.add_argument("data")
    d.add_argument("--device", default="gpu")
    c = sub.add_parser("compare")
    c.add_argument("cpu_out", type=Path)
    c.add_argument("out", type=Path)
    c.add_argument("--by-name", action="store_true")
    for p in (d, c):
        p.add_argument("--json", type=Path)
    args = ap.parse_args()
    result = detect_only(args.data, args.device) if args.what == "detect-only" else \
        compare(args.cpu_out, args.out, args.by_name)
    print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
