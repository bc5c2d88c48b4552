"""Read PNG, JPEG, TIFF and DICOM inputs into one grey float32 image in [0, 1].

The format is detected from the content (magic bytes), never from the file name. Every failure raises
:class:`~patchflannel.errors.ImageReadError` naming the input and the reason. An EXIF orientation is applied
(the image comes back upright, as a viewer shows it).
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import stat
import warnings
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from patchflannel.errors import ImageReadError

Source = str | os.PathLike[str] | bytes | bytearray | memoryview
"""A path to an image file, or the file's bytes."""

MIN_SIDE = 32
"""Images with a side shorter than this many pixels are refused."""

MAX_PIXELS = 100_000_000
"""Images with more pixels than this are refused (a guard against decompression bombs)."""

MAX_FILE_BYTES = 1 << 30
"""Image files larger than this (1 GiB) are refused unread: MAX_PIXELS pixels of 16-bit RGB take 600 MB."""

EXIF_ORIENTATION = 0x0112
"""The EXIF tag of the orientation a viewer applies."""

LUMA_601 = np.array([0.299, 0.587, 0.114], dtype=np.float32)
"""ITU-R BT.601 luma weights for R, G, B."""

_PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "tiff": "TIFF"}


def read_image(source: Source, *, name: str | None = None) -> np.ndarray:
    """Read ``source`` (a path or the file's bytes) into a 2-D float32 array in [0, 1].

    ``name`` labels raw bytes in error messages.
    """
    return read_image_with_meta(source, name=name)[0]


def read_image_with_meta(source: Source, *, name: str | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """Read ``source`` like :func:`read_image` and also return what the file says about itself.

    The meta always holds ``format`` ('png' | 'jpeg' | 'tiff' | 'dicom'), ``shape`` (rows, columns of the
    image returned, upright), ``channels`` and ``bit_depth`` (and ``exif_orientation`` when one was applied);
    DICOM adds its identifying attributes under their keywords.
    """
    data, label = _load_bytes(source, name)
    if not data:
        raise ImageReadError(label, "empty file (0 bytes)")
    dicom = read_dicom_bytes(data, label)
    if dicom is not None:
        return dicom
    fmt = detect_format(data)
    if fmt is None:
        raise ImageReadError(label, "not a recognised image format (expected PNG, JPEG, TIFF or DICOM)")
    try:
        return _read_pil(data, label, fmt)
    except ImageReadError:
        raise
    except Exception as exc:  # noqa: BLE001 - any other failure on untrusted bytes is a bad input, not a crash
        raise ImageReadError(label, f"cannot decode {fmt.upper()}: {type(exc).__name__}: {exc}") from None


def read_dicom_bytes(data: bytes, label: str) -> tuple[np.ndarray, dict[str, Any]] | None:
    """The grey image and meta of DICOM bytes (a file, or a bare data set without preamble); None when ``data``
    is not DICOM. ImageReadError when it is DICOM that cannot be decoded (its ``meta`` holds the UIDs read)."""
    fmt = detect_format(data)
    if fmt != "dicom" and not (fmt is None and _looks_like_bare_dicom(data)):
        return None
    from patchflannel.io.dicom import read_dicom  # dicom.py uses this module's helpers

    try:
        return read_dicom(data, label, has_preamble=fmt == "dicom")
    except ImageReadError:
        raise
    except Exception as exc:  # noqa: BLE001 - any other failure on untrusted bytes is a bad input, not a crash
        raise ImageReadError(label, f"cannot decode DICOM: {type(exc).__name__}: {exc}") from None


def content_hash(source: Source) -> str:
    """The content hash of a file (the same for a path and for its bytes): see :func:`bytes_hash`."""
    return bytes_hash(_load_bytes(source, None)[0])


def bytes_hash(data: bytes) -> str:
    """SHA-256 hex digest of an encoded image: of all its bytes, except for DICOM, of the grey image it decodes
    to (:func:`image_hash`): anonymising or losslessly re-encoding a film leaves the hash, and the patches it
    seeds, unchanged. A DICOM file that cannot be decoded hashes whole (reading it gives the error)."""
    try:
        dicom = read_dicom_bytes(data, "hash")
    except ImageReadError:
        dicom = None
    return image_hash(dicom[0]) if dicom is not None else raw_hash(data)


def raw_hash(data: bytes) -> str:
    """SHA-256 hex digest of all of ``data``: the content hash of an encoded image that is not (decodable) DICOM."""
    return hashlib.sha256(data).hexdigest()


def image_hash(grey: np.ndarray) -> str:
    """The content hash of a decoded DICOM image: SHA-256 of its shape and float32 values."""
    h = hashlib.sha256(b"dicom-image:")
    h.update(repr(grey.shape).encode())
    h.update(np.ascontiguousarray(grey, dtype=np.float32).tobytes())
    return h.hexdigest()


def detect_format(data: bytes) -> str | None:
    """The format named by the magic bytes of ``data``, or None when none matches.

    DICOM is tested first: its 128-byte preamble may itself hold a TIFF header (dual-format files).
    """
    if data[128:132] == b"DICM":
        return "dicom"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8"):
        return "jpeg"
    if data.startswith((b"II*\x00", b"MM\x00*")):
        return "tiff"
    return None


def check_size(label: str, rows: int, columns: int) -> None:
    """Refuse an image smaller than :data:`MIN_SIDE` on a side or larger than :data:`MAX_PIXELS`."""
    if min(rows, columns) < MIN_SIDE:
        raise ImageReadError(label, f"image too small: {columns}x{rows} pixels, each side must be >= {MIN_SIDE}")
    if rows * columns > MAX_PIXELS:
        raise ImageReadError(label, f"image too large: {columns}x{rows} pixels exceeds the limit of {MAX_PIXELS}")


def luma(rgb: np.ndarray) -> np.ndarray:
    """Grey from the first three channels of an (..., C>=3) array by ITU-R BT.601 luma (alpha ignored)."""
    return rgb[..., :3].astype(np.float32) @ LUMA_601


def _load_bytes(source: Source, name: str | None) -> tuple[bytes, str]:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source), name or "<bytes>"
    return read_file_bytes(source), name or os.fspath(source)


def read_file_bytes(path: str | os.PathLike[str]) -> bytes:
    """The bytes of the regular file at ``path``; ImageReadError naming it when it is missing, unreadable, larger
    than :data:`MAX_FILE_BYTES`, or not a regular file (a folder, or a pipe, socket or device, whose reading
    could block)."""
    label = os.fspath(path)
    if not label:
        raise ImageReadError("''", "an empty path names no file")
    try:
        info = os.stat(label)
        if not stat.S_ISREG(info.st_mode):
            raise ImageReadError(label, "not a regular file (a folder, pipe, socket or device is not read)")
        if info.st_size > MAX_FILE_BYTES:
            raise ImageReadError(label, f"file too large: {info.st_size / (1 << 30):.1f} GiB, over the limit of "
                                        f"{MAX_FILE_BYTES >> 30} GiB for an image")
        with open(label, "rb") as fh:
            return fh.read()
    except FileNotFoundError:
        raise ImageReadError(label, "file not found") from None
    except OSError as exc:
        raise ImageReadError(label, f"cannot read file: {exc.strerror or exc}") from None


def _looks_like_bare_dicom(data: bytes) -> bool:
    """A DICOM stream without the 128-byte preamble starts with a group 0002 or 0008 tag."""
    return data[:2] in (b"\x02\x00", b"\x08\x00", b"\x00\x02", b"\x00\x08") and len(data) >= 8


CORRUPT_JPEG = "Corrupt JPEG data"
"""How libjpeg's warnings about damaged compressed data begin (a file cut short, "Premature end of JPEG file",
Pillow refuses itself: "image file is truncated")."""


def jpeg_corruption(data: bytes) -> str | None:
    """libjpeg's complaint about a JPEG's compressed data (bytes changed, lost or zeroed inside it), which Pillow and
    nvJPEG only warn of on stderr, decoding what is left into a wrong image; None when it decodes cleanly, or
    libjpeg-turbo cannot judge it (a CMYK or 12-bit JPEG). Stray bytes between the header's markers are not damage
    to the image; left-over bytes before a restart or the end-of-image marker are: the decoder lost its place in
    the compressed data. A strict grey decode by simplejpeg: about 2.4 ms a cxr4 film on this project's CPU."""
    import simplejpeg

    try:
        simplejpeg.decode_jpeg(data, colorspace="GRAY", strict=True)
    except ValueError as exc:
        message = str(exc)
        stray = re.search(r"extraneous bytes before marker 0x([0-9a-f]{2})", message)
        if message.startswith(CORRUPT_JPEG) and (stray is None or 0xD0 <= int(stray.group(1), 16) <= 0xD9):
            return message
    return None


def _read_pil(data: bytes, label: str, fmt: str) -> tuple[np.ndarray, dict[str, Any]]:
    try:
        with warnings.catch_warnings():
            # Our own MAX_PIXELS check below gives the clear refusal; PIL's warning would only be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=[_PIL_FORMATS[fmt]])
    except Image.DecompressionBombError as exc:  # over twice Pillow's own limit: refused from the header too
        count = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{count.group(1)} pixels" if count else str(exc)
        raise ImageReadError(label, f"image too large: {size} exceeds the limit of {MAX_PIXELS}") from None
    except Image.UnidentifiedImageError:
        raise ImageReadError(label, f"cannot decode {fmt.upper()}: not a readable {fmt.upper()} file") from None
    except Exception as exc:  # any parser failure on untrusted bytes is a bad input
        raise ImageReadError(label, f"cannot decode {fmt.upper()}: {exc}") from None
    with img:
        columns, rows = img.size
        check_size(label, rows, columns)  # (before any decoding: a decompression bomb is refused from its header)
        if fmt == "jpeg" and (damage := jpeg_corruption(data)) is not None:
            raise ImageReadError(label, f"cannot decode JPEG: {damage} (the file is damaged)")
        try:
            if getattr(img, "n_frames", 1) > 1 and fmt == "tiff":
                raise ImageReadError(label, f"multi-page TIFF ({img.n_frames} pages) is not supported")
            img.load()
            orientation = img.getexif().get(EXIF_ORIENTATION, 1)
            grey, bit_depth = _pil_grey(ImageOps.exif_transpose(img), label)  # upright, as a viewer shows it
        except ImageReadError:
            raise
        except Exception as exc:  # truncated or corrupt data surfaces here
            raise ImageReadError(label, f"cannot decode {fmt.upper()}: {exc}") from None
        meta = {"format": fmt, "shape": grey.shape, "channels": len(img.getbands()), "bit_depth": bit_depth}
        if orientation != 1:
            meta["exif_orientation"] = int(orientation)
    return grey, meta


def _pil_grey(img: Image.Image, label: str) -> tuple[np.ndarray, int]:
    """Grey float32 in [0, 1] and the sample bit depth of a loaded PIL image."""
    if Image.getmodebase(img.mode) in ("RGB", "P"):  # RGB(A), palette, CMYK, YCbCr
        return np.ascontiguousarray(luma(np.asarray(img.convert("RGB"))) / np.float32(255.0)), 8
    arr = np.asarray(img.getchannel(0) if len(img.getbands()) > 1 else img)  # grey + alpha: alpha ignored
    if arr.dtype == np.bool_:
        return arr.astype(np.float32), 1
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / np.float32(255.0), 8
    if arr.dtype.kind == "u" and arr.dtype.itemsize == 2:
        return arr.astype(np.float32) / np.float32(65535.0), 16
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all():
            raise ImageReadError(label, "floating-point image contains NaN or infinite values")
        return np.clip(arr, 0.0, 1.0).astype(np.float32), arr.dtype.itemsize * 8
    raise ImageReadError(label, f"unsupported pixel type {img.mode} ({arr.dtype})")
