"""How many near-copies (re-encoded, resized) a perceptual hash of the aligned faces would pair up.

Usage: python bench/copies.py [PHOTOS_DIR] [--photos N] [--align box|arcface] [--out bench/out/copies]

Takes N real photos of PHOTOS_DIR/<identity>/ (default ../shared/faces/lfw_gwb: 530 photos of
one person, so every pair of distinct photos is a "same identity" pair, the hardest case for
false pairs), plants beside each original copies re-encoded as JPEG (quality 50, 70, 90) and
resized (0.5, 0.65, 0.8 of each side, saved as JPEG quality 95), aligns the lot with
`align_dataset --split train=0.8,validation=0.1,test=0.1`, then computes a 64-bit DCT
perceptual hash (pHash, as imagehash.phash: gray, 32x32 Lanczos, 2-D DCT-II, the 8x8 lowest
frequencies against their median) of every aligned thumbnail, and prints, per Hamming distance
threshold: the share of (original, copy) pairs it would catch, per kind of copy, and the
pairs of distinct originals it would pair up (false pairs); then the same for the hash of the
whole input photo, for comparison. Also: how many copies the split by bytes put in another
split than their original (what a hash would prevent).
"""
from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.fft import dctn

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
QUALITIES = (50, 70, 90)
SCALES = (0.5, 0.65, 0.8)
THRESHOLDS = (0, 2, 4, 6, 8, 10, 12, 14, 16)


def phash(path: Path) -> int:
    """64-bit DCT perceptual hash of an image file (imagehash.phash's recipe)."""
    with Image.open(path) as im:
        gray = np.asarray(im.convert("L").resize((32, 32), Image.LANCZOS), dtype=np.float64)
    low = dctn(gray, type=2, norm="ortho")[:8, :8]
    bits = (low > np.median(low)).ravel()
    return int("".join("1" if b else "0" for b in bits), 2)


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


def plant(originals: list[Path], into: Path) -> dict[str, tuple[str, str]]:
    """Copy each original into `into`/<identity>/ with its near-copies; returns {copy input:
    (original input, kind)}."""
    copies = {}
    for src in originals:
        identity = src.parent.name
        folder = into / identity
        folder.mkdir(parents=True, exist_ok=True)
        data = src.read_bytes()
        (folder / src.name).write_bytes(data)
        original = f"{identity}/{src.name}"
        with Image.open(io.BytesIO(data)) as im:
            rgb = im.convert("RGB")
        for q in QUALITIES:
            name = f"{src.stem}__q{q}.jpg"
            rgb.save(folder / name, format="JPEG", quality=q)
            copies[f"{identity}/{name}"] = (original, f"jpeg q{q}")
        for s in SCALES:
            name = f"{src.stem}__x{int(s * 100)}.jpg"
            size = (max(1, round(rgb.width * s)), max(1, round(rgb.height * s)))
            rgb.resize(size, Image.LANCZOS).save(folder / name, format="JPEG", quality=95)
            copies[f"{identity}/{name}"] = (original, f"resized x{s:g}")
    return copies


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("photos", nargs="?", default=str(SHARED / "faces" / "lfw_gwb"))
    ap.add_argument("--photos", dest="n", type=int, default=60)
    ap.add_argument("--align", default="box", choices=("box", "arcface"))
    ap.add_argument("--out", default=str(REPO / "bench" / "out" / "copies"))
    args = ap.parse_args()
    out = Path(args.out)
    if out.exists():
        import shutil
        shutil.rmtree(out)
    originals = sorted(p for p in Path(args.photos).rglob("*") if p.is_file()
                       and p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:args.n]
    copies = plant(originals, out / "in")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "align", str(out / "in"), str(out / "aligned"), "--quiet",
                    "--split", "train=0.8,validation=0.1,test=0.1", "--align", args.align], check=True,
                   env=dict(os.environ, PYTHONPATH=str(REPO)))
    align_s = time.perf_counter() - t0
    records = {}
    for line in (out / "aligned" / "faces.jsonl").read_text().splitlines():
        r = json.loads(line)
        records[r["input"]] = r
    aligned = {rel: phash(out / "aligned" / r["written"][0]["output"])
               for rel, r in records.items() if r["written"]}
    photos = {rel: phash(out / "in" / rel) for rel in records}
    straddle = {}
    for c, (o, kind) in copies.items():
        if c in records and o in records:
            straddle.setdefault(kind, []).append(records[c]["split"] != records[o]["split"])
    print(f"{len(originals)} originals, {len(copies)} planted copies, {len(aligned)} faces aligned "
          f"(--align {args.align}) in {align_s:.1f} s")
    print("copies put in another split than their original by the split by bytes: "
          + ", ".join(f"{k} {sum(v)}/{len(v)}" for k, v in sorted(straddle.items())))
    for what, hashes in ((f"pHash of the aligned face (--align {args.align})", aligned),
                         ("pHash of the whole input photo", photos)):
        print(f"\n{what}")
        table(hashes, copies)


def table(hashes: dict[str, int], copies: dict[str, tuple[str, str]]) -> None:
    originals_rel = sorted({o for o, _ in copies.values()} & set(hashes))
    kinds = sorted({k for _, k in copies.values()})
    pairs = {k: [hamming(hashes[c], hashes[o]) for c, (o, kind) in copies.items()
                 if kind == k and c in hashes and o in hashes] for k in kinds}
    false = [hamming(hashes[a], hashes[b]) for a, b in itertools.combinations(originals_rel, 2)]
    print(f"{len(false)} pairs of distinct originals; hamming distance of copy to original, median/max: "
          + ", ".join(f"{k} {int(np.median(pairs[k]))}/{max(pairs[k])}" for k in kinds))
    print(f"distinct originals: min {min(false)}, 1st percentile {np.percentile(false, 1):.0f}, "
          f"median {np.median(false):.0f}")
    head = "threshold  " + "  ".join(f"{k:>14}" for k in kinds) + "   false pairs"
    print(head)
    for t in THRESHOLDS:
        caught = "  ".join(f"{np.mean(np.array(pairs[k]) <= t):>14.1%}" for k in kinds)
        wrong = sum(d <= t for d in false)
        print(f"{t:>9}  {caught}   {wrong} ({wrong / len(false):.2%})")


if __name__ == "__main__":
    main()
