"""OUTPUT_DIR/report.html: what a run aligned, for a person to look at before training.

Rebuilt at the end of every run from the records alone (faces.jsonl and summary.json, which
holds the options), so the report of a resumed run covers the whole job, and a rerun of a
finished job rebuilds it. One self-contained file, to open from the file system, mail, or attach
to a dataset card: inline CSS, charts as inline SVG, pictures embedded as data: URIs; no script,
nothing from the network or from beside it.

Memory is bounded whatever the job's size: faces.jsonl is read one line at a time, and what is
kept is histogram counts, two counters per identity, and capped samples chosen by a hash of
the input path (the same job gives the same pictures, whatever order its records are in).

Pictures: at most SAMPLE + AMBIGUOUS + NO_FACE (24 + 24 + 48 = 96) JPEGs of at most PICTURE_SIDE
(320) pixels a side, each re-encoded smaller should it exceed PICTURE_BYTES (30 kB), and beside
each at most THUMBS_PER_CARD of its thumbnails, as JPEGs of at most THUMB_SIDE pixels and
THUMB_BYTES: MAX_PICTURE_BYTES in all (under 7 MB as base64), however many photos the job has.
A photo's picture is drawn again only when what it shows changes (its key, a hash of the
record's boxes, is kept beside it in the page; its thumbnails' keys add their index): a rerun
reuses the previous report's, and reads no input photo or thumbnail (no packed file, in the
rec and webdataset formats) whose record is unchanged.
"""
from __future__ import annotations

import base64
import hashlib
import heapq
import html
import io
import json
import os
import re
import platform
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from align.crop import choice_values
from align.durable import write_atomic
from align.records import RECORDS, STATUSES, SUMMARY, gc_paused

REPORT = "report.html"
SAMPLE, AMBIGUOUS, NO_FACE = 24, 24, 48     # pictures per section, at most
FAILED_ROWS = 500                   # rows of the unreadable/error list, at most
IDENTITY_ROWS = 500                 # rows of the few-photos list, at most
MIN_ALIGNED = 5                     # identities with fewer aligned photos are listed
PICTURE_SIDE = 320                  # pixels, the longer side of a drawn photo
PICTURE_BYTES = 30_000
THUMBS_PER_CARD = 4                 # thumbnails shown beside a photo, at most
THUMB_SIDE = 112                    # pixels, the longer side of a thumbnail as shown
THUMB_BYTES = 10_000
PICTURE_VERSION = "2"               # change to redraw every picture
MAX_PICTURE_BYTES = (SAMPLE + AMBIGUOUS + NO_FACE) * PICTURE_BYTES + \
    (SAMPLE + AMBIGUOUS) * THUMBS_PER_CARD * THUMB_BYTES
FAILED = ("unreadable", "too_costly", "error", "not_an_image")     # listed with their reasons

# "clearly wins" (see clearly_wins)
CLEAR_AREA_RATIO = 2.0
CLEAR_VALUE_MARGIN = 0.25

SIZE_BINS = [20, 30, 40, 60, 80, 120, 160, 240, 320, 480, 640]         # pixels
SCORE_BINS = [0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999]
FACE_COUNT_BINS = [1, 2, 3, 4, 5, 6, 10]
IDENTITY_BINS = [1, 2, 3, 5, 10, 20, 50, 100, 1000]
IDENTITY_BARS = 40                  # up to this many identities: a bar each

CHOSEN, OTHER = (40, 200, 60), (255, 140, 0)
VERSIONS = ("align-dataset", "tensorflow", "numpy", "pillow", "opencv-python-headless",
            "scipy", "click")


# --- facenet's choice, and when it is a clear one ---------------------------------------------
def choice_margins(boxes, image_hw: tuple[int, int], chosen: int) -> tuple[float, float]:
    """(area ratio, value margin) of the chosen face against the others: the largest other
    box's area over the chosen box's area, and the chosen face's lead in facenet's value
    (align.crop.choice_values) over the best other face, over the chosen box's area. Boxes are
    x1, y1, x2, y2 in pixels of the input image; image_hw its height and width."""
    boxes = np.asarray(boxes, dtype=np.float64)[:, :4]
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    values = choice_values(boxes, image_hw)
    others = np.arange(len(boxes)) != chosen
    own = max(float(area[chosen]), 1e-9)
    return float(area[others].max() / own), float((values[chosen] - values[others].max()) / own)


def clearly_wins(boxes, image_hw: tuple[int, int], chosen: int) -> bool:
    """Whether the face facenet's rule chose clearly beats every other face of the photo:
    its box is at least CLEAR_AREA_RATIO (2) times the area of every other box (size alone
    would pick it), and its value (area - 2 x squared distance from the image centre, pixels²)
    leads every other face's by at least CLEAR_VALUE_MARGIN (1/4) of its own area (a few
    pixels of centring would not change the choice). A photo with one face is a clear win."""
    if len(boxes) < 2:
        return True
    ratio, margin = choice_margins(boxes, image_hw, chosen)
    return ratio <= 1 / CLEAR_AREA_RATIO and margin >= CLEAR_VALUE_MARGIN


# --- bounded, deterministic samples -------------------------------------------------------------
def path_hash(text: str) -> int:
    """A stable 64-bit hash of a path (the same in every process and run)."""
    data = text.encode("utf-8", "surrogateescape")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


class Smallest:
    """The k items of smallest key offered so far (keys: tuples of numbers), in O(k) memory."""

    def __init__(self, k: int):
        self.k, self.heap, self.offered = k, [], 0

    def offer(self, key: tuple, item) -> None:
        self.offered += 1
        entry = (tuple(-v for v in key), self.offered, item)    # a max-heap of the kept keys
        if len(self.heap) < self.k:
            heapq.heappush(self.heap, entry)
        elif entry[0] > self.heap[0][0]:
            heapq.heapreplace(self.heap, entry)

    def items(self) -> list:
        """The kept items, smallest key first."""
        return [item for _, _, item in sorted(self.heap, key=lambda e: e[0], reverse=True)]

    @property
    def left_out(self) -> int:
        return self.offered - len(self.heap)


class SpreadSample:
    """k records spread over identities: the k identities of smallest hash, up to k records of
    each (smallest path hash first), then taken in turns, one of each identity per turn. At
    most k x k records are held."""

    def __init__(self, k: int):
        self.k = k
        self.groups: dict[str, Smallest] = {}
        self.identity_hash: dict[str, int] = {}

    def offer(self, identity: str, rel: str, record: dict) -> None:
        if identity not in self.groups:
            h = path_hash(identity)
            if len(self.groups) >= self.k:
                worst = max(self.identity_hash, key=self.identity_hash.get)
                if h >= self.identity_hash[worst]:
                    return
                del self.groups[worst], self.identity_hash[worst]
            self.groups[identity], self.identity_hash[identity] = Smallest(self.k), h
        self.groups[identity].offer((path_hash(rel),), record)

    def items(self) -> list[dict]:
        queues = [self.groups[i].items() for i in sorted(self.groups, key=self.identity_hash.get)]
        picked = []
        for turn in range(self.k):
            picked += [q[turn] for q in queues if turn < len(q)]
        picked = picked[:self.k]
        return sorted(picked, key=lambda r: r["input"])


# --- reading the records -----------------------------------------------------------------------
def _bin(value: float, edges: list) -> int:
    """Index of the bin of `value`: 0 below edges[0], i below edges[i], len(edges) above."""
    for i, edge in enumerate(edges):
        if value < edge:
            return i
    return len(edges)


def _identity(rel: str) -> str:
    return rel.split("/", 1)[0]


def read_records(path: Path):
    """The records of faces.jsonl, one at a time."""
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                yield json.loads(line.decode("utf-8", "surrogateescape"))


class Tally:
    """Everything the report shows, gathered in one pass over the records."""

    def __init__(self, multiple: bool):
        self.multiple = multiple
        self.statuses = {s: 0 for s in STATUSES}
        self.images = self.faces = self.written = 0
        self.size_all = [0] * (len(SIZE_BINS) + 1)
        self.size_written = [0] * (len(SIZE_BINS) + 1)
        self.score_all = [0] * (len(SCORE_BINS) + 1)
        self.score_written = [0] * (len(SCORE_BINS) + 1)
        self.faces_per_photo = [0] * (len(FACE_COUNT_BINS) + 1)
        self.identities: dict[str, list[int]] = {}      # {identity: [photos, aligned]}
        self.several = 0                                # photos with several faces
        self.sample = SpreadSample(SAMPLE)
        self.ambiguous = Smallest(AMBIGUOUS)
        self.no_face = Smallest(NO_FACE)
        self.failed = []
        self.failed_total = 0

    def add(self, r: dict) -> None:
        status, rel = r["status"], r["input"]
        self.images += 1
        self.statuses[status] = self.statuses.get(status, 0) + 1
        counts = self.identities.setdefault(_identity(rel), [0, 0])
        counts[0] += 1
        if status in ("aligned", "skipped_existing"):
            counts[1] += 1
        if status in FAILED:
            self.failed_total += 1
            if len(self.failed) < FAILED_ROWS:
                self.failed.append((status, rel, r.get("reason") or ""))
            return
        if status not in ("aligned", "no_face"):
            return
        faces, written = r.get("faces") or [], r.get("written") or []
        chosen = {w["face"] for w in written}
        self.faces += len(faces)
        self.written += len(written)
        self.faces_per_photo[_bin(len(faces), FACE_COUNT_BINS)] += 1
        for i, face in enumerate(faces):
            x1, y1, x2, y2 = face["box"][:4]
            size, score = _bin(max(x2 - x1, y2 - y1), SIZE_BINS), _bin(face["score"], SCORE_BINS)
            self.size_all[size] += 1
            self.score_all[score] += 1
            if i in chosen:
                self.size_written[size] += 1
                self.score_written[score] += 1
        h = path_hash(rel)
        if status == "no_face":
            self.no_face.offer((h,), r)
            return
        self.sample.offer(_identity(rel), rel, r)
        if len(faces) > 1:
            self.several += 1
            if self.multiple:
                self.ambiguous.offer((-len(faces), h), r)
            elif written and r.get("size"):
                w, hgt = r["size"]
                boxes = [f["box"] for f in faces]
                if not clearly_wins(boxes, (hgt, w), written[0]["face"]):
                    ratio, margin = choice_margins(boxes, (hgt, w), written[0]["face"])
                    self.ambiguous.offer((-ratio, h), dict(r, _ratio=ratio, _margin=margin))


# --- pictures ------------------------------------------------------------------------------------
def _open_small(path: Path, size: list[int] | None):
    """The photo as a PIL RGB image no larger than needed for PICTURE_SIDE, upright as the
    pipeline saw it, and the scale from record pixels to its pixels."""
    from PIL import Image, ImageOps
    from align.imageio import decode_image
    with Image.open(path) as im:
        if im.format == "JPEG":     # decode at 1/2, 1/4 or 1/8 scale: far faster on big photos
            im.draft("RGB", (PICTURE_SIDE, PICTURE_SIDE))
            im.load()
            try:
                im = ImageOps.exif_transpose(im)
            except Exception:
                pass
            im = im.convert("RGB")
        else:
            im = Image.fromarray(decode_image(path))
    w, h = size or im.size
    scale = min(PICTURE_SIDE / max(w, h), 1.0)
    target = (max(1, round(w * scale)), max(1, round(h * scale)))
    if im.size != target:
        im = im.resize(target, Image.BILINEAR)
    return im, scale


def draw_picture(input_path: Path, record: dict) -> bytes:
    """A small JPEG of the input photo with every detected box and its five landmarks: the
    face(s) written in green with their crop box dashed, the others in orange, numbered as in
    the record's `faces`."""
    from PIL import ImageDraw
    im, s = _open_small(input_path, record.get("size"))
    draw = ImageDraw.Draw(im)
    chosen = {w["face"]: w for w in record.get("written") or []}
    faces = record.get("faces") or []
    for i in sorted(range(len(faces)), key=lambda i: i in chosen):    # the chosen drawn last
        face = faces[i]
        colour = CHOSEN if i in chosen else OTHER
        x1, y1, x2, y2 = (v * s for v in face["box"][:4])
        draw.rectangle([x1, y1, x2, y2], outline=colour, width=3 if i in chosen else 2)
        for x, y in face.get("landmarks") or []:
            r = max(1.5, (x2 - x1) / 40)
            draw.ellipse([x * s - r, y * s - r, x * s + r, y * s + r], fill=colour)
        draw.text((x1 + 2, max(0, y1 - 12)), str(i), fill=colour)
        if i in chosen and chosen[i].get("crop_box"):
            left, top, right, bottom = (v * s for v in chosen[i]["crop_box"])
            for a, b in (((left, top), (right, top)), ((right, top), (right, bottom)),
                         ((right, bottom), (left, bottom)), ((left, bottom), (left, top))):
                _dashed(draw, a, b, colour)
    return _jpeg(im, PICTURE_BYTES)


def _jpeg(im, limit: int) -> bytes:
    """A PIL image as a JPEG of at most `limit` bytes where a lower quality gets it there."""
    for quality in (80, 60, 40, 25):
        buffer = io.BytesIO()
        im.save(buffer, format="JPEG", quality=quality)
        if buffer.tell() <= limit:
            break
    return buffer.getvalue()


def data_uri(jpeg: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")


def thumbnail_picture(data: bytes) -> bytes | None:
    """A written thumbnail (its encoded bytes) as shown beside its photo: a JPEG of at most
    THUMB_SIDE pixels a side and THUMB_BYTES; None when it cannot be read."""
    from PIL import Image
    try:
        with Image.open(io.BytesIO(data)) as im:
            im = im.convert("RGB")
            im.thumbnail((THUMB_SIDE, THUMB_SIDE), Image.BILINEAR)
            return _jpeg(im, THUMB_BYTES)
    except Exception:
        return None


def _dashed(draw, a, b, colour, dash: float = 5) -> None:
    (x1, y1), (x2, y2) = a, b
    length = max(abs(x2 - x1), abs(y2 - y1))
    steps = int(length // dash)
    for k in range(0, steps, 2):
        t0, t1 = k / max(steps, 1), min(k + 1, steps) / max(steps, 1)
        draw.line([(x1 + (x2 - x1) * t0, y1 + (y2 - y1) * t0),
                   (x1 + (x2 - x1) * t1, y1 + (y2 - y1) * t1)], fill=colour, width=1)


def picture_key(record: dict) -> str:
    """A hash of what a record's picture shows: an unchanged record reuses its picture."""
    shown = {k: record.get(k) for k in ("input", "size", "faces")}
    shown["written"] = [{"face": w.get("face"), "crop_box": w.get("crop_box")}
                        for w in record.get("written") or []]
    key = PICTURE_VERSION + json.dumps(shown, sort_keys=True, ensure_ascii=True)
    return hashlib.blake2b(key.encode(), digest_size=10).hexdigest()


_DRAWN = re.compile(r'<img class="(?:photo|thumb)" data-key="([0-9a-f]+(?:-\d+)?)" src="(data:image/jpeg;base64,[^"]+)"')


def thumb_key(record: dict, n: int) -> str:
    """The key of the picture of a record's n-th written face (its picture key, and n): the
    same record has the same thumbnails, in any output format."""
    return f"{picture_key(record)}-{n}"


def drawn_pictures(page: Path) -> dict[str, str]:
    """{picture key or thumb_key: data URI} of the photos and thumbnails a report shows (none
    where there is no report)."""
    try:
        return dict(_DRAWN.findall(page.read_text("utf-8", "replace")))
    except OSError:
        return {}


def _make_pictures(records: list[dict], input_dir: Path, output_dir: Path,
                   drawn: dict[str, str], output_format: str = "folders",
                   image_format: str = "png", split: str | None = None) -> dict[str, dict]:
    """{input path: {"key": picture key, "photo": data URI or None (the photo cannot be read
    now), "thumbs": [(written entry, data URI or None)]}} for the records shown; `drawn`:
    pictures and thumbnails to reuse, by key. The thumbnails not among them are read as the
    run's output format stores them (align.writers: in rec or webdataset, a scan of the packed
    files, which a rerun that changed no record so never makes)."""
    from align.config import Config
    from align.writers import make_writer
    missing = [w["output"] for r in records for n, w in enumerate((r.get("written") or [])[:THUMBS_PER_CARD])
               if thumb_key(r, n) not in drawn]
    stored = {}
    if missing:
        writer = make_writer(Config(format=image_format, output_format=output_format, workers=1, split=split),
                             output_dir)
        stored = writer.thumbnails(missing)

    def one(record: dict) -> dict:
        key = picture_key(record)
        photo = drawn.get(key)
        if photo is None:
            try:
                photo = data_uri(draw_picture(input_dir / record["input"], record))
            except Exception:           # moved, changed or deleted since it was aligned
                photo = None
        thumbs = []
        for n, w in enumerate((record.get("written") or [])[:THUMBS_PER_CARD]):
            uri = drawn.get(thumb_key(record, n))
            if uri is None:
                data = stored.get(w["output"])
                jpeg = thumbnail_picture(data) if data is not None else None
                uri = data_uri(jpeg) if jpeg else None
            thumbs.append((w, uri))
        return {"key": key, "photo": photo, "thumbs": thumbs}

    unique = list({r["input"]: r for r in records}.values())    # a photo may be in two sections
    with ThreadPoolExecutor(min(4, os.cpu_count() or 1)) as pool:
        return dict(zip((r["input"] for r in unique), pool.map(one, unique)))


# --- charts: inline SVG bars ----------------------------------------------------------------------
def _nice_ticks(top: float) -> list[int]:
    """Whole-number ticks from 0 to at least `top`, at most 6 of them, a step of 1, 2 or 5 x 10^k."""
    step = 1
    while top / step > 5:
        step = step * 5 // 2 if str(step)[0] == "2" else step * 2     # 1, 2, 5, 10, 20, 50, ...
    return [i * step for i in range(-(-max(int(top), 1) // step) + 1)]


def bar_chart(title: str, labels: list[str], series: list[tuple[str, str, list[int]]],
              xlabel: str, ylabel: str, stacked: bool = False) -> str:
    """An SVG bar chart: one group of bars per label, one bar per series (name, colour,
    values), side by side or stacked."""
    width, height, left, right, top = 560, 300, 56, 12, 34
    rotate = len(labels) * max((len(l) for l in labels), default=0) > 60
    bottom = 60 + (min(max((len(l) for l in labels), default=0), 24) * 5 if rotate else 0)
    plot_w, plot_h = width - left - right, height - top - 60
    total_h = top + plot_h + bottom
    totals = [sum(v[i] for _, _, v in series) for i in range(len(labels))] if stacked else \
        [max(v[i] for _, _, v in series) for i in range(len(labels))]
    ticks = _nice_ticks(max(totals, default=0))
    ymax = ticks[-1]
    y = lambda v: top + plot_h - plot_h * v / ymax
    group = plot_w / max(len(labels), 1)
    bar = group * 0.8 / (1 if stacked else len(series))
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" viewBox="0 0 {width} {total_h}" '
           f'width="{width}" height="{total_h}" role="img" aria-label="{_esc(title)}">',
           f'<text x="{left}" y="18" class="title">{_esc(title)}</text>']
    for t in ticks:
        out.append(f'<line x1="{left}" x2="{width - right}" y1="{y(t):.1f}" y2="{y(t):.1f}" class="grid"/>'
                   f'<text x="{left - 6}" y="{y(t) + 4:.1f}" class="tick" text-anchor="end">{t:g}</text>')
    for i, label in enumerate(labels):
        x0 = left + group * i + group * 0.1
        base = 0
        for k, (name, colour, values) in enumerate(series):
            v = values[i]
            bx = x0 if stacked else x0 + k * bar
            lo, hi = (base, base + v) if stacked else (0, v)
            if v:
                out.append(f'<rect class="bar" x="{bx:.1f}" y="{y(hi):.1f}" width="{bar:.1f}" '
                           f'height="{y(lo) - y(hi):.1f}" fill="{colour}"><title>{_esc(label)}: '
                           f'{v} {_esc(name)}</title></rect>')
                if len(labels) <= 16 and not stacked:
                    out.append(f'<text x="{bx + bar / 2:.1f}" y="{y(hi) - 3:.1f}" class="value" '
                               f'text-anchor="middle">{v}</text>')
            base += v
        cx, ly = left + group * (i + 0.5), top + plot_h + 14
        text = _esc(label if len(label) <= 24 else label[:23] + "…")
        if rotate:
            out.append(f'<text x="{cx:.1f}" y="{ly:.1f}" class="tick" text-anchor="end" '
                       f'transform="rotate(-45 {cx:.1f} {ly:.1f})">{text}</text>')
        else:
            out.append(f'<text x="{cx:.1f}" y="{ly:.1f}" class="tick" text-anchor="middle">{text}</text>')
    out.append(f'<line x1="{left}" x2="{width - right}" y1="{y(0):.1f}" y2="{y(0):.1f}" class="axis"/>')
    out.append(f'<text x="{left + plot_w / 2:.1f}" y="{total_h - 6}" class="label" '
               f'text-anchor="middle">{_esc(xlabel)}</text>')
    out.append(f'<text x="14" y="{top + plot_h / 2:.1f}" class="label" text-anchor="middle" '
               f'transform="rotate(-90 14 {top + plot_h / 2:.1f})">{_esc(ylabel)}</text>')
    lx = width - right
    for name, colour, _ in reversed(series):
        lx -= 12 + 7 * len(name) + 16
        out.append(f'<rect x="{lx}" y="8" width="12" height="12" fill="{colour}"/>'
                   f'<text x="{lx + 16}" y="18" class="tick">{_esc(name)}</text>')
    out.append("</svg>")
    return "".join(out)


def _edges_labels(edges: list, fmt=str) -> list[str]:
    return ([f"<{fmt(edges[0])}"] + [f"{fmt(a)}–{fmt(b)}" for a, b in zip(edges, edges[1:])]
            + [f"≥{fmt(edges[-1])}"])


def charts(t: Tally) -> list[str]:
    all_c, written_c, missing_c = "#8da0cb", "#1b9e77", "#d95f02"
    out = [
        bar_chart("Detected face size", _edges_labels(SIZE_BINS),
                  [("all faces", all_c, t.size_all), ("written", written_c, t.size_written)],
                  "longer side of the box, pixels of the input photo", "faces"),
        bar_chart("Detection score", _edges_labels(SCORE_BINS, lambda v: f"{v:g}"),
                  [("all faces", all_c, t.score_all), ("written", written_c, t.score_written)],
                  "O-Net face probability", "faces"),
        bar_chart("Faces per photo", ["0"] + [str(n) for n in FACE_COUNT_BINS[:-2]]
                  + [f"{FACE_COUNT_BINS[-2]}–{FACE_COUNT_BINS[-1] - 1}", f"≥{FACE_COUNT_BINS[-1]}"],
                  [("photos", all_c, t.faces_per_photo)],
                  "faces detected in a photo (photos read)", "photos"),
    ]
    if len(t.identities) <= IDENTITY_BARS:
        names = sorted(t.identities)
        out.append(bar_chart(
            "Photos per identity", names,
            [("aligned", written_c, [t.identities[n][1] for n in names]),
             ("not aligned", missing_c, [t.identities[n][0] - t.identities[n][1] for n in names])],
            "identity", "photos", stacked=True))
    else:
        photos, aligned = [0] * (len(IDENTITY_BINS) + 1), [0] * (len(IDENTITY_BINS) + 1)
        for n, a in t.identities.values():
            photos[_bin(n, IDENTITY_BINS)] += 1
            aligned[_bin(a, IDENTITY_BINS)] += 1
        labels = ["0"] + [str(a) if b - a == 1 else f"{a}–{b - 1}"
                          for a, b in zip(IDENTITY_BINS, IDENTITY_BINS[1:])] + [f"≥{IDENTITY_BINS[-1]}"]
        out.append(bar_chart("Photos per identity", labels,
                             [("photos in the folder", all_c, photos), ("aligned", written_c, aligned)],
                             "photos of an identity", "identities"))
    return out


# --- the page -------------------------------------------------------------------------------------
def _esc(text) -> str:
    """HTML text of any value; undecodable bytes of a file name (surrogates) shown as �."""
    s = str(text).encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return html.escape(s)


def _versions() -> dict[str, str]:
    from importlib import metadata
    out = {"python": platform.python_version()}
    for name in VERSIONS:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed" if name != "align-dataset" else "source checkout"
    return out


CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#222;background:#fafafa}
header{background:#263238;color:#fff;padding:14px 24px}header h1{margin:0;font-size:20px}
header p{margin:4px 0 0;color:#cfd8dc}nav{padding:8px 24px;background:#eceff1;position:sticky;top:0}
nav a{margin-right:14px;color:#37474f}main{padding:8px 24px 40px}section{margin:24px 0}
h2{font-size:17px;border-bottom:1px solid #ccc;padding-bottom:4px}
table{border-collapse:collapse;margin:6px 0}td,th{padding:2px 10px;text-align:left;border-bottom:1px solid #e0e0e0;vertical-align:top}
td.n{text-align:right;font-variant-numeric:tabular-nums}.kv{display:flex;flex-wrap:wrap;gap:0 32px}
.charts{display:flex;flex-wrap:wrap;gap:12px}.chart{background:#fff;border:1px solid #ddd}
.chart .title{font-weight:600;font-size:14px}.chart .tick,.chart .value{font-size:11px;fill:#444}
.chart .label{font-size:12px;fill:#222}.chart .grid{stroke:#eee}.chart .axis{stroke:#888}
.cards{display:flex;flex-wrap:wrap;gap:12px}.card{background:#fff;border:1px solid #ddd;padding:8px;max-width:520px}
.card .pics{display:flex;gap:8px;align-items:flex-start}.card img{display:block}
.thumbs img{width:112px;height:auto;margin-bottom:4px;border:1px solid #ccc}
.card p{margin:6px 0 0;font-size:12px;word-break:break-all}.more{color:#555;font-style:italic}
.missing{width:160px;height:100px;border:1px dashed #aaa;color:#777;font-size:12px;display:flex;align-items:center;justify-content:center}
.legend span{display:inline-block;width:12px;height:12px;vertical-align:middle;margin:0 4px 0 12px}
"""


def _table(rows, head=None, numeric=()) -> str:
    out = ["<table>"]
    if head:
        out.append("<tr>" + "".join(f"<th>{_esc(h)}</th>" for h in head) + "</tr>")
    for row in rows:
        out.append("<tr>" + "".join(f'<td class="n">{_esc(v)}</td>' if i in numeric else f"<td>{_esc(v)}</td>"
                                    for i, v in enumerate(row)) + "</tr>")
    out.append("</table>")
    return "".join(out)


def _card(record: dict, pictures: dict, note: str = "") -> str:
    pic = (f'<img class="photo" data-key="{pictures["key"]}" src="{pictures["photo"]}" '
           f'alt="{_esc(record["input"])}">'
           if pictures["photo"] else '<div class="missing">input photo not readable now</div>')
    thumbs = []
    for n, (w, uri) in enumerate(pictures["thumbs"]):
        out = w.get("output")
        if uri:
            thumbs.append(f'<img class="thumb" data-key="{pictures["key"]}-{n}" src="{uri}" alt="{_esc(out)}" '
                          f'title="face {w.get("face")}: {_esc(out)}">')
        else:
            thumbs.append(f'<div class="missing">{_esc(out)} missing</div>')
    written = len(record.get("written") or [])
    if written > len(thumbs):
        thumbs.append(f'<p class="more">{written - len(thumbs)} more</p>')
    faces = record.get("faces") or []
    scores = ", ".join(f"{i}: {f['score']:.3f}" for i, f in enumerate(faces))
    text = f"<b>{_esc(record['input'])}</b> — {len(faces)} face{'s' if len(faces) != 1 else ''}"
    if scores:
        text += f" (score {_esc(scores)})"
    if record.get("reason"):
        text += f"<br>{_esc(record['reason'])}"
    if note:
        text += f"<br>{note}"
    return (f'<div class="card"><div class="pics">{pic}<div class="thumbs">{"".join(thumbs)}</div></div>'
            f"<p>{text}</p></div>")


def _more(shown: int, total: int, what: str) -> str:
    left = total - shown
    return f'<p class="more">{left} more {what} not shown.</p>' if left > 0 else ""


def write_report(output_dir, min_aligned: int = MIN_ALIGNED) -> Path:
    """Build OUTPUT_DIR/report.html from the run's records; returns its path. Library
    warnings raised while reading photos (PIL's) are not printed."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _write_report(Path(output_dir), min_aligned)


def _splits_section(splits: dict | None) -> list[tuple[str, str, str]]:
    """The "Splits" section of a run with --split: per split the fraction asked and obtained
    (of the photos read), photos, faces and identities in its tree; the held-out count."""
    if not splits:
        return []
    rows = [(name, f"{splits['fractions'].get(name, 0):g}", v["fraction"], v["photos"], v["faces"], v["identities"])
            for name, v in splits["splits"].items()]
    held = splits.get("held_out") or {}
    note = (f"<p>Split by {_esc(splits.get('by'))}: a photo's split depends only on "
            + ("its bytes" if splits.get("by") == "photo" else "its identity's name")
            + " and --split_seed, so photos added later never move one already written; the "
            "fractions obtained differ from those asked by chance.</p>")
    if splits.get("by") == "photo":
        note += (f"<p>{held.get('identities', 0)} identities held out ({held.get('photos', 0)} photos, "
                 f"{held.get('faces', 0)} faces, in OUTPUT_DIR/held_out): they have no face in some "
                 f"split, so they are in none, and every split numbers the same classes.</p>")
    return [("splits", "Splits", note + _table(rows, ("split", "fraction asked", "fraction obtained",
                                                      "photos", "faces", "identities"), numeric=(1, 2, 3, 4, 5)))]


def _write_report(output_dir: Path, min_aligned: int) -> Path:
    t0 = time.perf_counter()
    drawn = drawn_pictures(output_dir / REPORT)
    (output_dir / REPORT).unlink(missing_ok=True)     # no stale report, should this one fail
    summary = json.loads((output_dir / SUMMARY).read_text())
    options = summary.get("options") or {}
    input_dir = Path(summary["input_dir"])
    multiple = bool(options.get("detect_multiple_faces"))
    tally = Tally(multiple)
    with gc_paused():
        for record in read_records(output_dir / RECORDS):
            tally.add(record)

    sample, ambiguous, no_face = tally.sample.items(), tally.ambiguous.items(), tally.no_face.items()
    no_face.sort(key=lambda r: r["input"])
    pictures = _make_pictures(sample + ambiguous + no_face, input_dir, output_dir, drawn,
                              options.get("output_format", "folders"), options.get("format", "png"),
                              options.get("split"))

    few = sorted(((n, a, i) for i, (n, a) in tally.identities.items() if a < min_aligned),
                 key=lambda x: (x[1], -x[0], x[2]))
    s = summary
    status_rows = [(k.replace("_", " "), v) for k, v in tally.statuses.items()]
    run_rows = [("faces detected", tally.faces), ("faces written", tally.written),
                ("photos with several faces", tally.several),
                ("identities", len(tally.identities)),
                ("processed by the last run", s.get("processed_this_run")),
                ("workers", s.get("workers")), ("Keras backend", s.get("backend")),
                ("wall time, s", s.get("wall_s")),
                ("processing time, s", s.get("processing_s")),
                ("images/s", s.get("images_per_s")), ("peak memory of workers, MB", s.get("peak_rss_mb"))]
    legend = (f'<p class="legend">Drawn: every detected box with its five landmarks, numbered as in '
              f'faces.jsonl; <span style="background:rgb{CHOSEN}"></span>the face written (its crop '
              f'box dashed) <span style="background:rgb{OTHER}"></span>the others. Beside it: the '
              f'thumbnail(s) written.</p>')
    if multiple:
        amb_intro = ("<p>This run wrote every face (--detect_multiple_faces): every face of a "
                     "photo with several faces went into that identity's folder, the other "
                     "people's included. The photos with the most faces:</p>")
        amb_what = "photos with several faces"
        amb_total = tally.ambiguous.offered
    else:
        amb_intro = (
            "<p>Photos with several faces where the face written (facenet's rule: the largest "
            "value of box area − 2 × squared distance of the box centre from the photo's centre, "
            "in pixels of the photo) does not <i>clearly</i> win. It clearly wins when its box is "
            f"at least {CLEAR_AREA_RATIO:g} times the area of every other box, and its value leads "
            f"every other face's by at least {CLEAR_VALUE_MARGIN:g} of its own area. Otherwise the "
            "choice between people of similar size was made by their position in the frame: "
            "this is where a wrong identity enters a training set. Most doubtful first (largest "
            "other face relative to the one written).</p>")
        amb_what = "ambiguous photos"
        amb_total = tally.ambiguous.offered

    def amb_note(r):
        if multiple:
            return f"{len(r.get('faces') or [])} faces, {len(r.get('written') or [])} written"
        return (f"largest other face: {r['_ratio']:.2f} × the area of face {r['written'][0]['face']}; "
                f"value lead: {r['_margin']:.2f} of its area")

    sections = [
        ("summary", "Summary", (
            f'<div class="kv"><div><h3>Photos</h3>{_table(status_rows + [("total", tally.images)], numeric=(1,))}</div>'
            f'<div><h3>Run</h3>{_table(run_rows, numeric=(1,))}</div>'
            f'<div><h3>Options</h3>{_table(sorted(options.items()))}</div>'
            f'<div><h3>Versions</h3>{_table(_versions().items())}</div></div>'
            f'<p>INPUT_DIR {_esc(s.get("input_dir"))} → OUTPUT_DIR {_esc(s.get("output_dir"))}</p>')),
        ("charts", "Charts", '<div class="charts">' + "".join(charts(tally)) + "</div>"),
        *_splits_section(s.get("splits")),
        ("sample", f"A sample of aligned photos ({len(sample)} of {tally.statuses['aligned']})",
         legend + '<div class="cards">' + "".join(_card(r, pictures[r["input"]])
                                                  for r in sample) + "</div>"),
        ("ambiguous", f"Ambiguous choices ({amb_total})",
         amb_intro + ('<div class="cards">' + "".join(_card(r, pictures[r["input"]], amb_note(r))
                                                      for r in ambiguous) + "</div>" if ambiguous else
                      "<p>None.</p>") + _more(len(ambiguous), amb_total, amb_what)),
        ("no-face", f"Photos without a face ({tally.no_face.offered})",
         ('<div class="cards">' + "".join(_card(r, pictures[r["input"]]) for r in no_face)
          + "</div>" if no_face else "<p>None.</p>") + _more(len(no_face), tally.no_face.offered, "photos without a face")),
        ("failed", f"Unreadable, too costly, not images, errors ({tally.failed_total})",
         ("<p>Errors (out of memory, a full disk…) are retried by the next run; a photo too costly for the options says which option to change; the others are "
          "verdicts on the file.</p>" + _table(tally.failed, ("status", "input", "reason"))
          if tally.failed else "<p>None.</p>") + _more(len(tally.failed), tally.failed_total, "records")
         + (f"<p>Top-level entries of INPUT_DIR that are not identity folders (skipped): "
            f"{_esc(', '.join(s['skipped_entries'][:50]))}</p>" + _more(min(50, len(s['skipped_entries'])),
                                                                      len(s['skipped_entries']), "entries")
            if s.get("skipped_entries") else "")),
        ("identities", f"Identities with fewer than {min_aligned} aligned photos ({len(few)} of {len(tally.identities)})",
         (_table([(i, n, a, n - a) for n, a, i in few[:IDENTITY_ROWS]],
                 ("identity", "photos", "aligned", "not aligned"), numeric=(1, 2, 3))
          if few else "<p>None.</p>") + _more(min(len(few), IDENTITY_ROWS), len(few), "identities")),
    ]
    built = time.perf_counter() - t0
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    page = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>align_dataset report: {_esc(s.get('output_dir'))}</title><style>{CSS}</style></head><body>",
        f"<header><h1>align_dataset report</h1><p>{tally.images} photos, {tally.statuses['aligned']} "
        f"aligned, {tally.written} faces written: {_esc(s.get('output_dir'))} (built {now})</p></header>",
        "<nav>" + "".join(f'<a href="#{sid}">{_esc(title.split(" (")[0])}</a>' for sid, title, _ in sections) + "</nav><main>",
    ]
    for sid, title, body in sections:
        page.append(f'<section id="{sid}"><h2>{_esc(title)}</h2>{body}</section>')
    page.append(f'<footer><p class="more">Built from faces.jsonl and summary.json in {built:.1f} s. '
                f'Pictures: at most {SAMPLE + AMBIGUOUS + NO_FACE} photos of at most {PICTURE_SIDE} '
                f'px a side and {THUMBS_PER_CARD} thumbnails beside each, embedded in this file '
                f'(under {MAX_PICTURE_BYTES * 4 / 3 / 1e6:.0f} MB).</p></footer></main></body></html>')
    path = output_dir / REPORT
    write_atomic(path, "\n".join(page).encode("utf-8"))
    return path


def report_or_warn(output_dir, config) -> Path | None:
    """write_report unless config.report is False. Its failure never fails the run (the
    records are already written): one warning line on stderr instead."""
    if not getattr(config, "report", True):
        return None
    try:
        return write_report(output_dir)
    except (Exception, KeyboardInterrupt) as e:
        reason = " ".join(f"{type(e).__name__}: {e}".split())[:300]
        print(f"Warning: {Path(output_dir) / REPORT} was not written ({reason}); the records "
              f"are complete (faces.jsonl, summary.json).", file=sys.stderr, flush=True)
        return None
