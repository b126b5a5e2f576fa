"""Reading photos robustly and writing thumbnails.

`decode_image` turns any photo PIL can read into an HxWx3 uint8 RGB array, or raises
`UnreadableImage` with a one-line reason; `sniff` names the format found in a file's content;
`encode_image` encodes thumbnails reproducibly (align.durable.write_atomic writes them).

Nothing here changes PIL's global settings (Image.MAX_IMAGE_PIXELS,
ImageFile.LOAD_TRUNCATED_IMAGES, warning filters): the pixel limit is checked per call on the
header size, and truncated files are refused.
"""
from __future__ import annotations

import io
import os
import stat
from typing import BinaryIO, Union

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError


__all__ = ["MAX_PIXELS", "UnreadableImage", "NotAnImage", "sniff", "decode_image", "encode_image"]

MAX_PIXELS: int = 60_000_000
"""Images with more pixels (width x height, from the header) are refused before decoding."""

JPEG_QUALITY = 95
PNG_PARAMS = [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_PAETH,
              cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE]

PathArg = Union[str, bytes, os.PathLike]


class UnreadableImage(Exception):
    """An input that cannot be decoded; str(e) is a short, one-line human reason, such as
    'empty file (0 bytes)', 'not an image (no known image format)', 'truncated image: ...',
    'decompression bomb: ...', 'permission denied', 'too many levels of symbolic links'."""


class NotAnImage(UnreadableImage):
    """The file was read, and holds nothing PIL knows as an image (an empty file included)."""


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _reason(e: BaseException) -> str:
    """A short reason for an exception raised while opening or decoding an image."""
    if isinstance(e, OSError) and e.errno is not None:  # the file system, not PIL
        return _one_line(e.strerror or os.strerror(e.errno)).lower()
    message = _one_line(str(e)) or type(e).__name__
    if isinstance(e, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return f"decompression bomb: {message}"
    if "truncated" in message or isinstance(e, EOFError):
        return f"truncated image: {message}"
    return f"corrupt image: {type(e).__name__}: {message}"


def _open_file(path: PathArg) -> tuple[BinaryIO, int]:
    """Open a regular file for reading; returns (file, size in bytes). Raises UnreadableImage."""
    try:
        st = os.stat(path)
        if stat.S_ISDIR(st.st_mode):
            raise NotAnImage("is a directory")
        if not stat.S_ISREG(st.st_mode):  # a FIFO or a device would block or never end
            raise UnreadableImage("not a regular file")
        return open(path, "rb"), st.st_size
    except OSError as e:
        raise UnreadableImage(_reason(e)) from e
    except ValueError as e:  # a NUL in the path
        raise UnreadableImage(f"bad path: {e}") from e


def sniff(path: PathArg) -> str | None:
    """The image format PIL finds in the file's content ('JPEG', 'PNG', 'WEBP', 'GIF', 'BMP',
    'TIFF', ...), whatever the file's extension. Reads the header only, no pixels, so a
    truncated image still gets its format.

    Returns None when the file was read but holds no image PIL can identify, an empty file
    included. Raises UnreadableImage when the file cannot be read at all (missing, permission
    denied, a symlink loop, a directory), and for a header so large that PIL itself refuses to
    open it (over 2 x Image.MAX_IMAGE_PIXELS, about 179 million pixels).
    """
    f, size = _open_file(path)
    with f:
        if size == 0:
            return None
        try:
            with Image.open(f) as im:
                return im.format
        except UnidentifiedImageError:
            return None
        except MemoryError:
            raise                   # the machine's state, not the file's: not a verdict on it
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise UnreadableImage(_reason(e)) from e
        except OSError as e:
            if e.errno is not None:
                raise UnreadableImage(_reason(e)) from e
            return None  # a known signature with a header PIL cannot parse
        except Exception:
            return None


def decode_image(path: PathArg, max_pixels: int = MAX_PIXELS, hasher=None) -> np.ndarray:
    """The image in the file as an HxWx3 uint8 RGB array (H, W in pixels, after EXIF rotation).

    - The EXIF orientation is applied (PIL.ImageOps.exif_transpose); EXIF that cannot be
      parsed is ignored, since the pixels themselves are fine.
    - Animated images (GIF, WEBP, APNG) give their first frame.
    - Alpha is dropped, not composited (as facenet did); palette transparency too.
    - 16-bit samples (modes I;16*, and I, clipped to 0..65535) become v >> 8, i.e. the high
      byte, as OpenCV and libpng's strip-16 do. 32-bit float samples (F) are taken as 0..255
      intensities, rounded and clipped (NaN becomes 0). Gray and 1-bit images are repeated
      into three channels; CMYK, YCbCr, LAB, HSV go through PIL's convert('RGB').
    - Images over max_pixels (width x height from the header) are refused before any pixel
      is decoded. PIL's own guard also refuses headers over 2 x Image.MAX_IMAGE_PIXELS
      (about 179 million pixels) whatever max_pixels says.
    - Truncated files are refused, not half-decoded.

    Every failure of the file raises UnreadableImage (NotAnImage when it holds no image) with
    a one-line reason. MemoryError, which says nothing about the file, passes through.

    hasher: a hashlib object (sha256()) that is fed the file's bytes (all read first, then
    decoded from memory), before any decoding fails: a file that opens is hashed.
    """
    f, size = _open_file(path)
    with f:
        if size == 0:
            raise NotAnImage("empty file (0 bytes)")
        if hasher is not None:
            try:
                data = f.read()
            except OSError as e:
                raise UnreadableImage(_reason(e)) from e
            hasher.update(data)
            f = io.BytesIO(data)
        try:
            with Image.open(f) as im:
                width, height = im.size
                if width * height > max_pixels:
                    raise UnreadableImage(
                        f"decompression bomb: {width}x{height} = {width * height} pixels, "
                        f"over the limit of {max_pixels}")
                im.load()
                return _to_rgb(_exif_transposed(im))
        except (UnreadableImage, MemoryError):
            raise
        except UnidentifiedImageError as e:
            raise NotAnImage("not an image (no known image format)") from e
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, EOFError, ...
            raise UnreadableImage(_reason(e)) from e


def _exif_transposed(im: Image.Image) -> Image.Image:
    """im turned upright by its EXIF orientation; im itself when the EXIF cannot be parsed."""
    try:
        return ImageOps.exif_transpose(im)
    except MemoryError:
        raise
    except Exception:
        return im


def _to_rgb(im: Image.Image) -> np.ndarray:
    """HxWx3 uint8 RGB array of a loaded image of any mode; see decode_image for the rules."""
    mode = im.mode
    if mode == "RGB":
        return np.array(im)
    if mode == "I" or mode.startswith("I;16"):
        gray = (np.clip(np.asarray(im), 0, 65535).astype(np.uint16) >> 8).astype(np.uint8)
    elif mode == "F":
        values = np.nan_to_num(np.asarray(im, dtype=np.float32), nan=0.0)
        gray = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    elif mode in ("1", "L"):
        gray = np.asarray(im.convert("L"))
    elif mode in ("LA", "La"):
        gray = np.asarray(im.getchannel(0))
    else:
        if mode == "P":
            im.info.pop("transparency", None)  # dropped anyway; PIL warns about it otherwise
        return np.array(im.convert("RGB"))
    return np.repeat(gray[:, :, None], 3, axis=2)


def encode_image(array: np.ndarray, fmt: str) -> bytes:
    """array (HxWx3 uint8 RGB) encoded as fmt: 'png' (zlib level 1) or 'jpg'/'jpeg'
    (quality 95), with no metadata. The same array gives the same bytes every time, in every
    process (for a given OpenCV and libpng, or Pillow and libjpeg)."""
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise ValueError(f"expected an HxWx3 uint8 array, got {array.shape} {array.dtype}")
    kind = fmt.lower()
    if kind == "png":
        # OpenCV's libpng at zlib level 1, Paeth filter, RLE matching: 1.6 ms for a 160x160
        # face, files of 45 KiB; Pillow at level 1 took 3.2 ms for 47 KiB (it tries every
        # filter on every row), at its default level 6 about 10 ms
        ok, png = cv2.imencode(".png", np.ascontiguousarray(array[:, :, ::-1]), PNG_PARAMS)
        if not ok:
            raise ValueError("OpenCV could not encode the thumbnail as PNG")
        return png.tobytes()
    if kind in ("jpg", "jpeg"):
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="JPEG", quality=JPEG_QUALITY)
        return buffer.getvalue()
    raise ValueError(f"unknown thumbnail format {fmt!r}: expected 'png' or 'jpg'")
