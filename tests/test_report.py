"""report.html: its parts on plain data, then real runs' reports opened in a real headless
Chromium (tests/browser.py), checked from the rendered page.

The browser tests skip, saying why, where no Chromium starts (`.ci/run` installs Debian's
`chromium` when it is missing). The dev-set test skips without ../shared.
"""
from __future__ import annotations

import base64
import io
import json
import os
import random
import re
import shutil
import struct
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import browser
from conftest import SHARED
from test_cli import ok, patched_png_header, read_jsonl, run_align, summary

from align import report
from align.crop import choose_faces

SECTIONS = ["summary", "charts", "sample", "ambiguous", "no-face", "failed", "identities"]
CHROMIUM = browser.find_chromium()
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium starts here (Debian: apt-get install chromium; "
                             ".ci/run installs it)")


# --- the parts, on plain data ---------------------------------------------------------------------

def box(cx, cy, side):
    return [cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2]


def test_clearly_wins_follows_facenets_rule():
    hw = (1000, 1000)
    cases = {   # boxes, expected clear win of facenet's choice
        "one face": ([box(500, 500, 100)], True),
        "big centred face, small one aside": ([box(500, 500, 200), box(800, 300, 60)], True),
        "two of a size side by side": ([box(400, 500, 150), box(620, 500, 150)], False),
        "a larger face loses on centring": ([box(520, 500, 120), box(850, 500, 160)], False),
        # the other face is tiny, but nearly won on centring: moving a few pixels flips it
        "tiny central face, big one off-centre": ([box(700, 500, 300), box(500, 500, 40)], False),
    }
    for name, (boxes, clear) in cases.items():
        boxes = np.array(boxes)
        chosen = choose_faces(boxes, hw, multiple=False)[0]
        assert report.clearly_wins(boxes, hw, chosen) == clear, name
        if len(boxes) > 1:
            ratio, margin = report.choice_margins(boxes, hw, chosen)
            assert margin >= 0, name        # the chosen face is the rule's best
            assert (ratio <= 0.5 and margin >= 0.25) == clear, name


def synthetic_record(i: int, identity: int, rng: random.Random) -> dict:
    n_faces = rng.choice([0, 1, 1, 1, 2, 3])
    faces = [{"box": box(rng.uniform(100, 900), rng.uniform(100, 900), rng.uniform(15, 400)),
              "score": rng.uniform(0.7, 1.0), "landmarks": [[0.0, 0.0]] * 5} for _ in range(n_faces)]
    rel = f"id{identity:04d}/photo{i:06d}.jpg"
    status = "aligned" if faces else rng.choice(["no_face", "no_face", "unreadable"])
    written = [{"face": 0, "crop_box": [0, 0, 10, 10], "output": rel[:-4] + ".png",
                "matrix": [[1, 0, 0], [0, 1, 0]]}] if faces else []   # extra fields tolerated
    return {"input": rel, "status": status, "reason": None if status != "unreadable" else "truncated",
            "size": [1000, 1000] if status != "unreadable" else None, "output": rel[:-4] + ".png",
            "faces": faces, "written": written}


def test_tally_is_bounded_and_independent_of_record_order():
    """20,000 records of 400 identities: the report keeps capped samples, the same ones
    whatever the order of the records, and counts that add up."""
    rng = random.Random(0)
    records = [synthetic_record(i, i % 400, rng) for i in range(20_000)]
    tallies = []
    for order in (records, list(reversed(records)), rng.sample(records, len(records))):
        t = report.Tally(multiple=False)
        for r in order:
            t.add(r)
        tallies.append(t)
    a, b, c = tallies
    for t in tallies:
        assert len(t.sample.items()) == report.SAMPLE
        assert len(t.ambiguous.heap) <= report.AMBIGUOUS and len(t.no_face.heap) <= report.NO_FACE
        assert len(t.failed) <= report.FAILED_ROWS < t.failed_total
        assert sum(len(g.heap) for g in t.sample.groups.values()) <= report.SAMPLE ** 2
    for get in (lambda t: [r["input"] for r in t.sample.items()],
                lambda t: [r["input"] for r in t.ambiguous.items()],
                lambda t: [r["input"] for r in t.no_face.items()],
                lambda t: (t.size_all, t.score_all, t.faces_per_photo, t.statuses, t.identities)):
        assert get(a) == get(b) == get(c)
    # spread: the sample comes from as many identities as it has photos
    assert len({r["input"].split("/")[0] for r in a.sample.items()}) == report.SAMPLE
    faces = sum(len(r["faces"]) for r in records if r["status"] in ("aligned", "no_face"))
    assert sum(a.size_all) == sum(a.score_all) == a.faces == faces
    assert sum(a.size_written) == a.written == sum(len(r["written"]) for r in records)
    assert a.no_face.offered == sum(r["status"] == "no_face" for r in records)
    assert sum(n for n, _ in a.identities.values()) == len(records)
    # the ambiguous ones are the most doubtful of all: no left-out one is more doubtful
    kept = min(r["_ratio"] for r in a.ambiguous.items())
    doubtful = []
    for r in records:
        if r["status"] == "aligned" and len(r["faces"]) > 1:
            boxes = [f["box"] for f in r["faces"]]
            if not report.clearly_wins(boxes, (1000, 1000), 0):
                doubtful.append(report.choice_margins(boxes, (1000, 1000), 0)[0])
    assert a.ambiguous.offered == len(doubtful)
    assert sorted(doubtful, reverse=True)[report.AMBIGUOUS - 1] == pytest.approx(kept)


def test_report_memory_stays_bounded_on_a_large_job(tmp_path):
    """write_report streams faces.jsonl: on 15,000 records (a file of 7.6 MB, which takes
    53 MB parsed into a list) the Python memory it holds at its peak is under the file's size
    (4.7 MB here, mostly the capped samples). The input photos do not exist: the page says
    so in place of their pictures."""
    import tracemalloc
    rng = random.Random(1)
    with open(tmp_path / "faces.jsonl", "w") as f:
        for i in range(15_000):
            f.write(json.dumps(synthetic_record(i, i % 750, rng)) + "\n")
    size = (tmp_path / "faces.jsonl").stat().st_size
    (tmp_path / "summary.json").write_text(json.dumps({"input_dir": str(tmp_path / "nowhere"),
                                                       "output_dir": str(tmp_path)}))
    tracemalloc.start()
    try:
        path = report.write_report(tmp_path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert size > 7e6 and peak < size, (size, peak)
    html = path.read_text()
    assert "15000 photos" in html and "input photo not readable now" in html
    assert sorted(p.name for p in tmp_path.iterdir()) == ["faces.jsonl", "report.html", "summary.json"]


def test_pictures_stay_within_their_caps_on_a_large_job(tmp_path):
    """20,000 records whose photos and thumbnails all exist (hard links to one photo of noise,
    drawn at its own size of 320 px: the worst case for JPEG): at most 96 photos of at most
    PICTURE_BYTES and 4 thumbnails beside each of at most THUMB_BYTES, embedded: a page under
    the README's 7 MB, every picture a JPEG it shows."""
    rng = random.Random(2)
    noise = np.random.default_rng(2).integers(0, 256, (320, 320, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "noise.png")
    Image.fromarray(noise[:182, :182]).save(tmp_path / "thumb.png")
    records = [synthetic_record(i, i % 400, rng) for i in range(20_000)]
    for r in records:
        r["size"] = r["size"] and [320, 320]
    inputs, out = tmp_path / "in", tmp_path / "out"
    for identity in range(400):
        (inputs / f"id{identity:04d}").mkdir(parents=True)
        (out / f"id{identity:04d}").mkdir(parents=True)
    for r in records:
        os.link(tmp_path / "noise.png", inputs / r["input"])
        for w in r["written"]:
            if not (out / w["output"]).exists():
                os.link(tmp_path / "thumb.png", out / w["output"])
    (out / "faces.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (out / "summary.json").write_text(json.dumps({"input_dir": str(inputs), "output_dir": str(out)}))
    html = report.write_report(out).read_text()
    embedded = {kind: [base64.b64decode(b) for b in re.findall(
        rf'<img class="{kind}" [^>]*src="data:image/jpeg;base64,([^"]+)"', html)] for kind in ("photo", "thumb")}
    photos, thumbs = embedded["photo"], embedded["thumb"]
    print(f"\n{len(photos)} photos ({sum(map(len, photos)) / 1e6:.2f} MB), {len(thumbs)} thumbnails "
          f"({sum(map(len, thumbs)) / 1e6:.2f} MB): a page of {len(html) / 1e6:.2f} MB")
    assert 90 <= len(photos) <= 96 and 0 < len(thumbs) <= (report.SAMPLE + report.AMBIGUOUS) * report.THUMBS_PER_CARD
    assert max(map(len, photos)) <= report.PICTURE_BYTES and max(map(len, thumbs)) <= report.THUMB_BYTES
    assert len(html) < 7_000_000
    for jpeg, side in [(p, report.PICTURE_SIDE) for p in photos] + [(t, report.THUMB_SIDE) for t in thumbs]:
        with Image.open(io.BytesIO(jpeg)) as im:
            assert im.format == "JPEG" and max(im.size) <= side
    assert "input photo not readable now" not in html and " missing<" not in html


def test_version_is_the_installed_packages():
    import configparser
    import subprocess
    import sys
    from test_cli import cli_env
    setup = configparser.ConfigParser()
    setup.read(Path(__file__).resolve().parent.parent / "setup.cfg")
    p = subprocess.run([sys.executable, "-m", "align", "--version"], env=cli_env(),
                       capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout == f"align_dataset {setup['metadata']['version']}\n", p


def test_bar_chart_is_valid_svg_with_a_bar_per_count():
    svg = report.bar_chart("Sizes <&>", ["a", "b", "c"], [("all", "#888", [3, 0, 7]),
                                                        ("written", "#080", [1, 0, 2])], "x", "y")
    root = ET.fromstring(svg)
    bars = [e for e in root.iter("{http://www.w3.org/2000/svg}rect") if e.get("class") == "bar"]
    assert len(bars) == 4
    heights = sorted(float(e.get("height")) for e in bars)
    assert heights[-1] > heights[0] > 0


# --- real runs, in a real browser -------------------------------------------------------------------

@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """The sample photos, plus an identity of awkward real photos: one with corrupt EXIF
    (PIL warns), a palette PNG with transparency (PIL warns), a header that claims 100
    megapixels (PIL's DecompressionBombWarning), a crop of a photo with no face, a text file."""
    import samples
    root = samples.build(tmp_path_factory.mktemp("report") / "in")
    hopper = root / "Grace_Hopper" / "grace_hopper.jpg"
    extra = root / "Extra"
    extra.mkdir()
    jpeg = hopper.read_bytes()
    tiff = (b"II*\x00" + struct.pack("<IH", 8, 1) + struct.pack("<HHII", 0x010F, 2, 100, 1000)
            + struct.pack("<I", 0))     # Make: 100 bytes at offset 1000, past the EXIF's end
    exif = b"Exif\x00\x00" + tiff
    (extra / "corrupt_exif.jpg").write_bytes(jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(exif) + 2)
                                             + exif + jpeg[2:])
    with Image.open(hopper) as im:
        im.convert("P", palette=Image.ADAPTIVE).save(extra / "palette.png",
                                                     transparency=bytes([0] * 255 + [255]))
    with Image.open(root / "Eileen_Collins" / "astronaut.png") as im:
        im.crop((300, 300, 512, 512)).save(extra / "no_face.png")     # the suit's arm, no face
    small = extra / "small.png"
    Image.new("RGB", (8, 8), (10, 20, 30)).save(small)
    (extra / "bomb.png").write_bytes(patched_png_header(small.read_bytes(), 10_000, 10_000))
    small.unlink()
    (extra / "notes.txt").write_text("not a photo\n")
    from PIL import ImageOps
    with pytest.warns(UserWarning):                 # they do make PIL warn
        with Image.open(extra / "corrupt_exif.jpg") as im:
            ImageOps.exif_transpose(im)
    with pytest.warns(Image.DecompressionBombWarning):
        Image.open(extra / "bomb.png").close()
    return root


@pytest.fixture(scope="module")
def default_run(photos, tmp_path_factory):
    cwd = tmp_path_factory.mktemp("default_run")
    return ok(run_align(photos, "out", "--workers", 1, cwd=cwd)), cwd / "out"


@pytest.fixture(scope="module")
def chromium():
    if CHROMIUM is None:
        pytest.skip("no Chromium starts here (Debian: apt-get install chromium; .ci/run installs it)")
    with browser.Browser(CHROMIUM) as b:
        yield b


def rendered(chromium, out: Path) -> tuple[browser.Page, dict]:
    """The report opened from the file system, and what its rendered DOM says."""
    page = chromium.open((out / "report.html").resolve().as_uri())
    facts = page.evaluate("""(() => ({
        sections: [...document.querySelectorAll('section')].map(s => s.id),
        headings: Object.fromEntries([...document.querySelectorAll('section')].map(
            s => [s.id, s.querySelector('h2').textContent])),
        charts: [...document.querySelectorAll('#charts svg')].map(s => ({
            title: s.querySelector('.title').textContent,
            bars: s.querySelectorAll('rect.bar').length,
            height: s.getBoundingClientRect().height})),
        images: [...document.images].map(i => ({src: i.getAttribute('src'), ok: i.complete &&
            i.naturalWidth > 0, w: i.naturalWidth, section: i.closest('section').id,
            kind: i.className, alt: i.getAttribute('alt')})),
        text: Object.fromEntries([...document.querySelectorAll('section')].map(
            s => [s.id, s.innerText])),
    }))()""")
    return page, facts


def assert_renders(page: browser.Page, facts: dict) -> None:
    """Every section, four charts with bars, every picture decoded from the page itself;
    nothing failed to load, nothing came from outside the file system, nothing logged an
    error."""
    assert facts["sections"] == SECTIONS
    assert [c["title"] for c in facts["charts"]] == ["Detected face size", "Detection score",
                                                    "Faces per photo", "Photos per identity"]
    assert all(c["bars"] > 0 and c["height"] > 100 for c in facts["charts"]), facts["charts"]
    assert facts["images"], "no pictures"
    assert all(i["ok"] for i in facts["images"]), [i for i in facts["images"] if not i["ok"]]
    assert all(i["src"].startswith("data:image/jpeg;base64,") for i in facts["images"])
    assert not page.failed, page.failed
    assert not page.errors, page.errors
    fetched = [u for u in page.requests if not u.startswith("data:")]    # the page alone
    assert len(fetched) == 1 and fetched[0].startswith("file://") and fetched[0].endswith("/report.html"), fetched


def test_default_run_report_renders(default_run, photos, chromium, tmp_path):
    p, out = default_run
    assert "Report: out/report.html" in p.stdout
    alone = tmp_path / "mailed"             # the file alone, as an attachment: it shows the same
    alone.mkdir()
    shutil.copyfile(out / "report.html", alone / "report.html")
    page, facts = rendered(chromium, alone)
    assert_renders(page, facts)
    sample = [i for i in facts["images"] if i["section"] == "sample"]
    photos_shown = [i for i in sample if i["kind"] == "photo"]
    thumbs = [i for i in sample if i["kind"] == "thumb"]
    assert len(photos_shown) == 5 and len(thumbs) == 5      # every aligned photo of this small job
    assert all(i["w"] <= report.PICTURE_SIDE for i in photos_shown)
    assert all(i["w"] <= report.THUMB_SIDE for i in thumbs)
    assert sorted(i["alt"] for i in thumbs) == sorted(w["output"] for r in read_jsonl(out / "faces.jsonl")
                                                      for w in r["written"])
    assert not (out / ".align_dataset").exists()
    text = facts["text"]
    assert "Group/t1.jpg" in text["ambiguous"] and "Extra/palette.png" not in text["ambiguous"]
    assert "Extra/no_face.png" in text["no-face"]
    assert [i for i in facts["images"] if i["section"] == "no-face"]
    assert "Extra/bomb.png" in text["failed"] and "decompression bomb" in text["failed"]
    assert "Extra/notes.txt" in text["failed"]
    for identity in ("Eileen_Collins", "Grace_Hopper", "Group", "Extra"):
        assert identity in text["identities"]
    shot = page.screenshot(tmp_path / "report.png", height=2400)
    with Image.open(shot) as im:
        pixels = np.asarray(im.convert("L"))
    assert pixels.shape == (2400, 1200) and pixels.std() > 30     # a page, not a blank


def test_library_warnings_stay_off_the_terminal(default_run):
    """PIL warned on three of the photos (see `photos`); the terminal shows none of it, the
    records say what matters."""
    p, out = default_run
    assert "warn" not in p.stderr.lower(), p.stderr
    records = {r["input"]: r for r in read_jsonl(out / "faces.jsonl")}
    assert records["Extra/corrupt_exif.jpg"]["status"] == "aligned"
    assert records["Extra/palette.png"]["status"] == "aligned"
    assert records["Extra/bomb.png"]["status"] == "unreadable"
    assert records["Extra/bomb.png"]["reason"].startswith("decompression bomb")


def test_multiple_faces_run_report_renders(photos, chromium, tmp_path):
    ok(run_align(photos, tmp_path / "out", "--workers", 1, "--detect_multiple_faces"))
    page, facts = rendered(chromium, tmp_path / "out")
    assert_renders(page, facts)
    assert "--detect_multiple_faces" in facts["text"]["ambiguous"]
    assert "Group/t1.jpg" in facts["text"]["ambiguous"] and "6 faces, 6 written" in facts["text"]["ambiguous"]
    t1_thumbs = [i for i in facts["images"] if i["section"] == "sample" and i["alt"].startswith("Group/t1_")]
    assert len(t1_thumbs) == report.THUMBS_PER_CARD == 4         # and "2 more" beside them
    assert "2 more" in facts["text"]["sample"]


def test_rerun_rebuilds_the_report_and_no_report_skips_it(default_run, photos, tmp_path):
    _, out = default_run
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    (copy / "report.html").unlink()
    p = ok(run_align(photos, copy, "--workers", 1, "--no-report"))
    assert not (copy / "report.html").exists() and "Report:" not in p.stdout
    ok(run_align(photos, copy, "--workers", 1))
    assert summary(copy)["processed_this_run"] == 0
    html = (copy / "report.html").read_text()
    assert "8 photos, 5 aligned" in html        # the whole job, not this run's nothing
    pictures = lambda page: sorted(re.findall(r'src="(data:[^"]+)"', page))
    assert pictures(html) == pictures((out / "report.html").read_text())     # the same pictures


def test_a_failing_report_is_one_warning_and_loses_nothing(default_run, photos, tmp_path):
    _, out = default_run
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    (copy / "report.html").unlink()
    (copy / "report.html").mkdir()      # where the report goes, a folder: writing it fails
    p = ok(run_align(photos, copy, "--workers", 1))
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Warning:") and "report.html" in lines[0], p.stderr
    assert "Report:" not in p.stdout
    assert (copy / "faces.jsonl").read_bytes() == (out / "faces.jsonl").read_bytes()
    assert summary(copy)["images"] == 8


def test_dev_set_report_renders_and_lists_the_ambiguous_photos(dev_run, chromium):
    p, out = dev_run
    ok(p)
    assert "warn" not in p.stderr.lower(), p.stderr
    page, facts = rendered(chromium, out)
    assert_renders(page, facts)
    ambiguous = facts["text"]["ambiguous"]
    # the photos of several faces of similar size
    for name in ("face_recognition_obama_and_biden.jpg", "face_recognition_two_people.jpg",
                 "face_recognition_kit_with_rose.jpg", "facenet_pytorch_multiface.jpg",
                 "insightface_t1.jpg", "insightface_attr_7242/7242.jpg"):
        assert name in ambiguous, name
    for name in ("Barack_Obama/obama.jpg", "insightface_attr_1423/1423.jpg"):    # a small face aside
        assert name not in ambiguous, name
    records = read_jsonl(out / "faces.jsonl")
    listed = [r for r in records if r["input"] in ambiguous]
    assert listed and all(len(r["faces"]) > 1 for r in listed)
    no_face = [r["input"] for r in records if r["status"] == "no_face"]
    assert no_face and all(n in facts["text"]["no-face"] for n in no_face)


def test_a_photo_in_two_sections_gets_one_picture(sample_paths, tmp_path):
    """The sample and the ambiguous list may show the same photo: it is drawn once, and its
    picture and thumbnail are embedded JPEGs."""
    path = sample_paths["t1.jpg"]
    (tmp_path / "in" / "Group").mkdir(parents=True)
    shutil.copyfile(path, tmp_path / "in" / "Group" / "t1.jpg")
    (tmp_path / "out" / "Group").mkdir(parents=True)
    Image.new("RGB", (182, 182), (90, 60, 30)).save(tmp_path / "out" / "Group" / "t1.png")
    with Image.open(path) as im:
        size = list(im.size)
    record = {"input": "Group/t1.jpg", "status": "aligned", "size": size,
              "faces": [{"box": [10.0, 10.0, 50.0, 60.0], "score": 0.99,
                         "landmarks": [[20.0, 30.0]] * 5}],
              "written": [{"face": 0, "crop_box": [0, 0, 60, 70], "output": "Group/t1.png"}]}
    pictures = report._make_pictures([record] * 8, tmp_path / "in", tmp_path / "out", {})
    assert list(pictures) == ["Group/t1.jpg"]
    (w, thumb), = pictures["Group/t1.jpg"]["thumbs"]
    for uri, side in ((pictures["Group/t1.jpg"]["photo"], report.PICTURE_SIDE), (thumb, report.THUMB_SIDE)):
        assert uri.startswith("data:image/jpeg;base64,")
        with Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))) as im:
            assert im.format == "JPEG" and max(im.size) == side
