"""align.imageio: robust decoding of awkward inputs, deterministic encoding, atomic writes.
Every input is a real file written by the test itself."""
from __future__ import annotations

import os
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from align.imageio import MAX_PIXELS, UnreadableImage, decode_image, encode_image, sniff
from align.durable import write_atomic

RED, BLUE = (255, 0, 0), (0, 0, 255)


def noise(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def save(im: Image.Image, path: Path, **params) -> Path:
    im.save(path, **params)
    return path


def refusal(path, **kwargs) -> str:
    with pytest.raises(UnreadableImage) as info:
        decode_image(path, **kwargs)
    reason = str(info.value)
    assert "\n" not in reason and reason
    return reason


def png_chunks(data: bytes) -> list[bytes]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    types, at = [], 8
    while at < len(data):
        length, kind = struct.unpack(">I4s", data[at:at + 8])
        types.append(kind)
        at += 12 + length
    return types


# --- inputs that must be refused --------------------------------------------------------------

def test_zero_byte_file(tmp_path):
    p = tmp_path / "empty.jpg"
    p.write_bytes(b"")
    assert refusal(p) == "empty file (0 bytes)"
    assert sniff(p) is None


def test_truncated_jpeg_is_refused_not_half_decoded(tmp_path):
    whole = save(Image.fromarray(noise(64, 64)), tmp_path / "whole.jpg", quality=90).read_bytes()
    p = tmp_path / "half.jpg"
    p.write_bytes(whole[:len(whole) // 2])
    assert refusal(p).startswith("truncated image: ")
    assert sniff(p) == "JPEG"  # the header is intact


def test_truncated_png_is_refused(tmp_path):
    whole = save(Image.fromarray(noise(64, 64)), tmp_path / "whole.png").read_bytes()
    p = tmp_path / "half.png"
    p.write_bytes(whole[:len(whole) // 2])
    assert refusal(p).startswith(("truncated image: ", "corrupt image: "))


def test_text_file_named_jpg(tmp_path):
    p = tmp_path / "notes.jpg"
    p.write_text("these are not the pixels you are looking for\n")
    assert refusal(p) == "not an image (no known image format)"
    assert sniff(p) is None


def test_png_signature_then_garbage(tmp_path):
    p = tmp_path / "garbage.png"
    p.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    refusal(p)  # an UnreadableImage, nothing else
    assert sniff(p) is None


def test_directory_and_missing_file(tmp_path):
    assert refusal(tmp_path) == "is a directory"
    assert refusal(tmp_path / "missing.jpg") == "no such file or directory"
    with pytest.raises(UnreadableImage, match="no such file"):
        sniff(tmp_path / "missing.jpg")


def test_symlink_loop(tmp_path):
    p = tmp_path / "loop.jpg"
    os.symlink(p, p)
    assert refusal(p) == "too many levels of symbolic links"
    with pytest.raises(UnreadableImage, match="symbolic links"):
        sniff(p)


def test_file_without_read_permission(tmp_path):
    p = save(Image.new("RGB", (8, 6), RED), tmp_path / "secret.png")
    p.chmod(0)
    try:
        if os.geteuid() != 0:
            assert refusal(p) == "permission denied"
            with pytest.raises(UnreadableImage, match="permission denied"):
                sniff(p)
        else:  # root reads it anyway
            assert decode_image(p).shape == (6, 8, 3)
            assert sniff(p) == "PNG"
    finally:
        p.chmod(0o644)


def patched_png_size(small_png: bytes, width: int, height: int) -> bytes:
    """small_png with its IHDR claiming width x height, CRC fixed, pixel data unchanged."""
    assert small_png[12:16] == b"IHDR"
    ihdr = struct.pack(">II", width, height) + small_png[24:29]
    crc = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return small_png[:16] + ihdr + crc + small_png[33:]


@pytest.mark.parametrize("width, height, within_pils_limit", [
    (100_000, 100_000, False),  # PIL's own guard refuses it at open
    (9_000, 9_000, True),       # 81 million pixels: only our check stands in the way
])
def test_decompression_bomb_refused_from_the_header(tmp_path, width, height, within_pils_limit):
    small = save(Image.new("RGB", (4, 4), RED), tmp_path / "small.png").read_bytes()
    p = tmp_path / "bomb.png"
    p.write_bytes(patched_png_size(small, width, height))
    if within_pils_limit:  # the patched header is valid
        with Image.open(p) as im:
            assert im.size == (width, height)
    start = time.perf_counter()
    reason = refusal(p)
    assert time.perf_counter() - start < 1.0
    assert reason.startswith("decompression bomb: ")
    if within_pils_limit:
        assert reason == (f"decompression bomb: {width}x{height} = {width * height} pixels, "
                          f"over the limit of {MAX_PIXELS}")
        assert sniff(p) == "PNG"
    else:
        with pytest.raises(UnreadableImage, match="decompression bomb"):
            sniff(p)


def test_max_pixels_is_per_call(tmp_path):
    p = save(Image.new("RGB", (10, 10), RED), tmp_path / "small.png")
    assert refusal(p, max_pixels=99) == "decompression bomb: 10x10 = 100 pixels, over the limit of 99"
    assert decode_image(p, max_pixels=100).shape == (10, 10, 3)


# --- inputs that decode ------------------------------------------------------------------------

def test_webp_named_jpg(tmp_path):
    pixels = noise(12, 20)
    p = save(Image.fromarray(pixels), tmp_path / "really_webp.jpg", format="WEBP", lossless=True)
    assert sniff(p) == "WEBP"
    out = decode_image(p)
    assert out.dtype == np.uint8 and out.shape == (12, 20, 3)
    np.testing.assert_array_equal(out, pixels)


def test_jpeg_named_png_is_sniffed_as_jpeg(tmp_path):
    p = save(Image.new("RGB", (8, 8), RED), tmp_path / "photo.png", format="JPEG")
    assert sniff(p) == "JPEG"
    assert decode_image(p).shape == (8, 8, 3)


def test_gray_alpha_png_drops_alpha(tmp_path):
    gray = np.array([[0, 100, 200], [255, 50, 7]], dtype=np.uint8)
    alpha = np.array([[255, 0, 128], [0, 255, 1]], dtype=np.uint8)
    im = Image.merge("LA", [Image.fromarray(gray), Image.fromarray(alpha)])
    p = save(im, tmp_path / "la.png")
    with Image.open(p) as check:
        assert check.mode == "LA"
    out = decode_image(p)
    assert out.shape == (2, 3, 3) and out.dtype == np.uint8
    for c in range(3):
        np.testing.assert_array_equal(out[:, :, c], gray)


def test_rgba_png_drops_alpha(tmp_path):
    pixels = noise(5, 7)
    rgba = np.dstack([pixels, np.zeros((5, 7), np.uint8)])  # fully transparent
    p = save(Image.fromarray(rgba), tmp_path / "rgba.png")
    np.testing.assert_array_equal(decode_image(p), pixels)


def test_cmyk_jpeg(tmp_path):
    p = save(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), tmp_path / "cmyk.jpg", quality=95)
    with Image.open(p) as check:
        assert check.mode == "CMYK"
    out = decode_image(p)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - RED).max() <= 3


def test_16bit_png_keeps_the_high_byte(tmp_path):
    values = np.array([[0, 255, 256, 25_700, 65_535, 65_280, 32_896]], dtype=np.uint16)
    p = save(Image.fromarray(values), tmp_path / "deep.png")
    with Image.open(p) as check:
        assert check.mode == "I;16"
    out = decode_image(p)
    assert out.shape == (1, 7, 3) and out.dtype == np.uint8
    for c in range(3):
        np.testing.assert_array_equal(out[0, :, c], [0, 0, 1, 100, 255, 255, 128])


def test_32bit_int_and_float_tiff(tmp_path):
    ints = np.array([[-5, 0, 25_700, 65_535, 70_000]], dtype=np.int32)
    p = save(Image.fromarray(ints), tmp_path / "int.tif")
    with Image.open(p) as check:
        assert check.mode == "I"
    np.testing.assert_array_equal(decode_image(p)[0, :, 1], [0, 0, 100, 255, 255])
    floats = np.array([[-3.0, 0.4, 99.6, 254.5, 300.0, np.nan]], dtype=np.float32)
    p = save(Image.fromarray(floats), tmp_path / "float.tif")
    with Image.open(p) as check:
        assert check.mode == "F"
    np.testing.assert_array_equal(decode_image(p)[0, :, 2], [0, 0, 100, 254, 255, 0])


def test_one_bit_png(tmp_path):
    bits = np.array([[True, False], [False, True]])
    p = save(Image.fromarray(bits), tmp_path / "bits.png")
    with Image.open(p) as check:
        assert check.mode == "1"
    np.testing.assert_array_equal(decode_image(p)[:, :, 0], [[255, 0], [0, 255]])


def test_palette_png_with_transparency(tmp_path, recwarn):
    im = Image.fromarray(np.array([[0, 1], [2, 1]], dtype=np.uint8)).convert("P")
    im.putpalette([10, 20, 30, 200, 100, 50, 0, 255, 0] + [0] * (256 - 3) * 3)
    p = save(im, tmp_path / "palette.png", transparency=bytes([255, 0, 128]))
    with Image.open(p) as check:
        assert check.mode == "P" and "transparency" in check.info
    out = decode_image(p)
    np.testing.assert_array_equal(out, [[[10, 20, 30], [200, 100, 50]],
                                        [[0, 255, 0], [200, 100, 50]]])
    assert not [w for w in recwarn if "Transparency" in str(w.message)]


def test_one_pixel_image(tmp_path):
    p = save(Image.new("RGB", (1, 1), (1, 2, 3)), tmp_path / "dot.png")
    out = decode_image(p)
    assert out.shape == (1, 1, 3) and out.dtype == np.uint8
    assert out[0, 0].tolist() == [1, 2, 3]


def test_non_utf8_file_name(tmp_path):
    name = os.fsdecode(b"\xff\xfe.jpg")
    try:
        p = save(Image.new("RGB", (9, 5), BLUE), tmp_path / name, format="JPEG")
    except OSError as e:  # file systems that insist on UTF-8 names
        pytest.skip(f"cannot create a non-UTF-8 file name here: {e}")
    for path in (p, str(p), os.fsencode(p)):
        out = decode_image(path)
        assert out.shape == (5, 9, 3)
        assert np.abs(out.astype(int) - BLUE).max() <= 3
        assert sniff(path) == "JPEG"


def test_animated_gif_gives_the_first_frame(tmp_path):
    frames = [Image.new("RGB", (6, 4), RED), Image.new("RGB", (6, 4), BLUE)]
    p = save(frames[0], tmp_path / "anim.gif", save_all=True, append_images=frames[1:],
             duration=100, loop=0)
    with Image.open(p) as check:
        assert check.n_frames == 2
    out = decode_image(p)
    assert out.shape == (4, 6, 3)
    assert (out == RED).all()


def test_animated_webp_gives_the_first_frame(tmp_path):
    frames = [Image.new("RGB", (6, 4), BLUE), Image.new("RGB", (6, 4), RED)]
    p = save(frames[0], tmp_path / "anim.webp", save_all=True, append_images=frames[1:],
             duration=100, lossless=True)
    with Image.open(p) as check:
        assert check.n_frames == 2
    assert (decode_image(p) == BLUE).all()


def test_exif_orientation_6_rotates_clockwise(tmp_path):
    stored = np.zeros((32, 48, 3), dtype=np.uint8)  # H=32, W=48 as stored
    stored[:16, :16] = RED  # the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90 degrees clockwise
    p = save(Image.fromarray(stored), tmp_path / "rotated.jpg", exif=exif, quality=95)
    out = decode_image(p)
    assert out.shape == (48, 32, 3)
    assert np.abs(out[4, 28].astype(int) - RED).max() <= 8  # now the top-right corner
    assert out[4, 4].max() <= 8 and out[44, 4].max() <= 8 and out[44, 28].max() <= 8


def test_no_exif_means_no_rotation(tmp_path):
    p = save(Image.fromarray(np.zeros((32, 48, 3), np.uint8)), tmp_path / "plain.jpg")
    assert decode_image(p).shape == (32, 48, 3)


# --- encoding and writing ----------------------------------------------------------------------

ENCODE_IN_CHILD = """
import hashlib, sys
import numpy as np
from align.imageio import encode_image
pixels = np.random.default_rng(7).integers(0, 256, (40, 30, 3), dtype=np.uint8)
print(hashlib.sha256(encode_image(pixels, sys.argv[1])).hexdigest())
"""


@pytest.mark.parametrize("fmt", ["png", "jpg"])
def test_encode_is_deterministic_across_calls_and_processes(fmt):
    import hashlib
    pixels = np.random.default_rng(7).integers(0, 256, (40, 30, 3), dtype=np.uint8)
    first = encode_image(pixels, fmt)
    assert encode_image(pixels.copy(), fmt) == first
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [
        str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")])),
        PYTHONHASHSEED="random")
    child = subprocess.run([sys.executable, "-c", ENCODE_IN_CHILD, fmt], env=env,
                           capture_output=True, text=True, check=True)
    assert child.stdout.strip() == hashlib.sha256(first).hexdigest()


def test_png_round_trips_exactly_and_has_no_metadata(tmp_path):
    pixels = noise(33, 17, seed=3)
    data = encode_image(pixels, "png")
    chunks = png_chunks(data)
    assert chunks[0] == b"IHDR" and chunks[-1] == b"IEND"
    assert set(chunks) == {b"IHDR", b"IDAT", b"IEND"}
    p = tmp_path / "thumb.png"
    p.write_bytes(data)
    np.testing.assert_array_equal(decode_image(p), pixels)


def test_jpeg_quality_95_without_metadata(tmp_path):
    pixels = noise(64, 64, seed=4)
    data = encode_image(pixels, "jpg")
    assert data[:2] == b"\xff\xd8" and b"Exif" not in data and b"ICC_PROFILE" not in data
    p = tmp_path / "thumb.jpg"
    p.write_bytes(data)
    with Image.open(p) as im:
        assert im.format == "JPEG" and im.size == (64, 64) and im.mode == "RGB"
    reference = tmp_path / "reference.jpg"
    Image.fromarray(pixels).save(reference, quality=95)
    assert reference.read_bytes() == data


def test_encode_rejects_bad_input():
    with pytest.raises(ValueError):
        encode_image(np.zeros((4, 4), np.uint8), "png")
    with pytest.raises(ValueError):
        encode_image(np.zeros((4, 4, 3), np.float32), "png")
    with pytest.raises(ValueError):
        encode_image(np.zeros((4, 4, 3), np.uint8), "gif")


def test_encode_accepts_non_contiguous_arrays():
    pixels = noise(8, 10)
    view = pixels[:, ::-1]
    assert not view.flags.c_contiguous
    assert encode_image(view, "png") == encode_image(np.ascontiguousarray(view), "png")


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_write_atomic_replaces_the_destination(tmp_path):
    dest = tmp_path / "out" / "a.png"
    write_atomic(dest, b"first")
    assert dest.read_bytes() == b"first"
    write_atomic(str(dest), b"second")
    assert dest.read_bytes() == b"second"
    assert leftovers(dest.parent) == []


def test_write_atomic_failure_leaves_the_destination_alone(tmp_path):
    dest = tmp_path / "a.png"
    dest.write_bytes(b"old")
    with pytest.raises(TypeError):
        write_atomic(dest, "not bytes")  # type: ignore[arg-type]
    assert dest.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]
