"""DICOM to grey float32 in [0, 1]: modality LUT, VOI LUT or window, MONOCHROME1 inverted, colour to luma.

pydicom (the ``patchflannel[dicom]`` extra) is imported only when a DICOM input is read; compressed transfer
syntaxes decode through its pixel-data plugins (pylibjpeg, pylibjpeg-libjpeg, pylibjpeg-openjpeg, pyjpegls).
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Any

import numpy as np

from patchflannel.errors import ImageReadError
from patchflannel.io.readers import check_size, luma

if TYPE_CHECKING:
    from pydicom.dataset import Dataset
    from pydicom.uid import UID

META_KEYWORDS = (
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "PhotometricInterpretation",
    "Modality",
    "ViewPosition",
)
"""DICOM attributes copied into the meta when present, under their keywords."""


def read_dicom(data: bytes, label: str, *, has_preamble: bool = True) -> tuple[np.ndarray, dict[str, Any]]:
    """Decode one single-frame DICOM image from ``data``; ``label`` names it in errors.

    ``has_preamble=False`` accepts a bare data set (no 128-byte preamble, possibly no file meta).
    """
    try:
        import pydicom
        import pydicom.pixels  # noqa: F401 - the decoders' module, used by _decode
    except ImportError:
        raise ImageReadError(label, "reading DICOM needs pydicom: install the patchflannel[dicom] extra") from None

    zeros = data.find(ZERO_RUN)  # to the end of the file (a large empty element before the pixels is no damage)
    if (zeros >= 0 and data.find(PIXEL_GROUP_LE, 0, zeros) < 0 and data.find(PIXEL_GROUP_BE, 0, zeros) < 0
            and not np.frombuffer(data, np.uint8, offset=zeros).any()):
        raise ImageReadError(label, f"DICOM holds only zero bytes from byte {zeros} on, before any pixel data: the "
                                    "file was not written whole (a copy or transfer that stopped early)")
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=not has_preamble)
    except Exception as exc:  # any parser failure on untrusted bytes is a bad input
        raise ImageReadError(label, f"cannot parse DICOM: {exc}") from None
    cut = _cut_short(ds)  # pydicom reads a header cut short without a word, and keeps a partial last value
    if cut is not None:
        del ds[cut[0]]  # a partial UID is no UID
    attributes = _attributes(ds)
    try:
        if cut is not None:
            raise ImageReadError(label, f"DICOM file cut short (inside its {cut[1]} element): truncated or corrupt")
        grey, pixels = _decode(ds, label)
    except ImageReadError as exc:  # an error row still names the study and the instance
        raise ImageReadError(label, exc.reason, meta={"format": "dicom", **attributes}) from None
    return grey, {"format": "dicom", **pixels, **attributes}


PIXEL_DATA = 0x7FE00010
"""The (7FE0,0010) PixelData tag."""

PIXEL_GROUP_LE, PIXEL_GROUP_BE = b"\xe0\x7f", b"\x7f\xe0"
"""The pixel data group (7FE0) as little- and big-endian bytes."""

ZERO_RUN = bytes(1 << 20)
"""A megabyte of zeros: before any pixel data, and running to the end of the file, the mark of a file not written
whole (pydicom would read it as empty elements, eight bytes at a time: seconds per 32 MB)."""


def _cut_short(ds: Dataset) -> tuple[int, str] | None:
    """The tag and name of a header element (before the pixel data) whose value holds fewer bytes than its
    declared length. Pixel data cut short is the decoder's to judge (a missing pad byte is no loss), and what
    follows it (trailing padding) is not read."""
    from pydicom.datadict import keyword_for_tag

    for tag, raw in ds._dict.items():  # the elements as read, before any conversion
        if tag >= PIXEL_DATA:
            break
        declared, value = getattr(raw, "length", None), getattr(raw, "value", None)
        if isinstance(value, bytes) and declared is not None and declared != 0xFFFFFFFF and len(value) < declared:
            return tag, keyword_for_tag(tag) or f"({tag >> 16:04X},{tag & 0xFFFF:04X})"
    return None


NOT_IMAGES = {"1.2.840.10008.1.3.10": "a DICOMDIR (a media export's index of the images beside it)"}
"""SOP classes without pixel data that turn up among images, named in their error."""


def _decode(ds: Dataset, label: str) -> tuple[np.ndarray, dict[str, Any]]:
    """The grey image of a parsed single-frame data set and what it says of its pixels."""
    from pydicom.pixels import get_decoder

    try:
        if "PixelData" not in ds:
            if len(ds) == 0:
                raise ImageReadError(label, "DICOM holds no data set (empty, or cut short within its header)")
            if "Rows" in ds and "Columns" in ds:
                raise ImageReadError(label, "DICOM describes an image (Rows, Columns) but holds no PixelData: "
                                            "truncated or corrupt")
            what = NOT_IMAGES.get(str(ds.get("SOPClassUID", "")) or str(ds.file_meta.get("MediaStorageSOPClassUID", "")))
            raise ImageReadError(label, f"DICOM has no PixelData ({what or 'not an image'})")
        frames = int(ds.get("NumberOfFrames") or 1)
        rows, columns = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
        if not rows or not columns:
            raise ImageReadError(label, "DICOM has no Rows/Columns")
    except ImageReadError:
        raise
    except Exception as exc:
        raise ImageReadError(label, f"cannot parse DICOM: {exc}") from None
    if frames > 1:
        raise ImageReadError(label, f"multi-frame DICOM ({frames} frames) is not supported")
    check_size(label, rows, columns)

    tsyntax = _transfer_syntax(ds, label)
    try:
        decoder = get_decoder(tsyntax)
    except NotImplementedError:
        raise ImageReadError(label, f"unsupported DICOM transfer syntax {tsyntax.name} ({tsyntax})") from None
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies)
        raise ImageReadError(label, f"cannot decode DICOM transfer syntax {tsyntax.name} ({tsyntax}): no decoder "
                             f"installed (pip install 'patchflannel[dicom]' installs them; {missing})")
    _fit_native_length(ds, tsyntax, rows, columns, label)
    try:
        grey = _to_grey(ds.pixel_array, ds, label)
    except ImageReadError:
        raise
    except Exception as exc:  # truncated or corrupt pixel data surfaces here
        raise ImageReadError(label, f"cannot decode DICOM pixel data ({tsyntax.name}): {exc}") from None
    meta = {"shape": (rows, columns), "channels": int(ds.get("SamplesPerPixel") or 1),
            "bit_depth": int(ds.get("BitsStored") or ds.BitsAllocated), "TransferSyntaxUID": str(tsyntax)}
    return grey, meta


def _fit_native_length(ds: Dataset, tsyntax: UID, rows: int, columns: int, label: str) -> None:
    """Refuse uncompressed pixel data longer than the header's image by a row or more: its Rows or Columns are
    wrong, and the decoder would silently read a crop of it (pydicom only warns of "excess padding"). Less than
    a row of trailing padding is cut off here, as the decoder would, without its warning (which names no file)."""
    if tsyntax.is_compressed:
        return
    samples, bits = int(ds.get("SamplesPerPixel") or 1), int(ds.get("BitsAllocated") or 0)
    if not bits:
        return  # the decoder names what is missing
    expected = (rows * columns * samples * bits + 7) // 8
    held = len(ds.PixelData)
    row = (columns * samples * bits + 7) // 8
    if held - expected >= max(row, 2):  # a pad byte to even length is allowed
        raise ImageReadError(label, f"DICOM PixelData holds {held} bytes, {held - expected} more than its {rows} "
                                    f"Rows x {columns} Columns x {samples} samples x {bits} bits need ({expected}): "
                                    "the header's image size or sample layout (Rows, Columns, SamplesPerPixel, "
                                    "BitsAllocated) is wrong; read as it is, the image would be cut short")
    if held > expected + expected % 2:
        ds.PixelData = ds.PixelData[:expected + expected % 2]


def _attributes(ds: Dataset) -> dict[str, str]:
    """The identifying attributes of :data:`META_KEYWORDS` that the file holds and that can be read (a corrupt
    element is left out: the pixels may still be good), as the file has them: read without pydicom's value
    conversion, so that a malformed UID is reported as it is, without a warning on stderr that names no file."""
    out = {}
    for key in META_KEYWORDS:
        try:
            element = ds.get_item(key)
            if element is not None and isinstance(element.value, bytes) and element.VR in (None, "UI", "CS"):
                value = element.value.decode("ascii", "replace").strip("\0 ")  # ASCII, padded with a NUL or spaces
            else:
                value = ds.get(key)  # converted by pydicom (another VR than the standard's: it may fail)
        except Exception:  # noqa: BLE001 - e.g. an unknown value representation
            continue
        if value not in (None, ""):
            out[key] = str(value)
    return out


def _transfer_syntax(ds: Dataset, label: str) -> UID:
    """The data set's transfer syntax; for a bare data set without file meta, the encoding it was read with."""
    from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    if "TransferSyntaxUID" in ds.file_meta:
        return UID(ds.file_meta.TransferSyntaxUID)
    by_encoding = {
        (True, True): ImplicitVRLittleEndian,
        (False, True): ExplicitVRLittleEndian,
        (False, False): ExplicitVRBigEndian,
    }
    tsyntax = by_encoding.get(tuple(ds.original_encoding))
    if tsyntax is None:
        raise ImageReadError(label, "DICOM has no transfer syntax and its encoding is unknown")
    ds.file_meta.TransferSyntaxUID = tsyntax
    return tsyntax


def _to_grey(pixels: np.ndarray, ds: Dataset, label: str) -> np.ndarray:
    """Grey float32 in [0, 1] from decoded pixels (colour arrives as RGB: pydicom converts YBR)."""
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

    photometric = str(ds.PhotometricInterpretation)
    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(pixels, ds)
        return np.ascontiguousarray(luma(rgb) / np.float32(np.iinfo(rgb.dtype).max))
    if pixels.ndim == 3:
        full_scale = np.float32(2 ** int(ds.get("BitsStored") or ds.BitsAllocated) - 1)
        return np.ascontiguousarray(np.clip(luma(pixels) / full_scale, 0.0, 1.0))
    try:
        modality = apply_modality_lut(pixels, ds)
    except (TypeError, ValueError):  # a rescale that is no number ('1,5', empty): the values cannot be known
        written = ", ".join(f"{key} {_written(ds, key)!r}" for key in ("RescaleSlope", "RescaleIntercept") if key in ds)
        raise ImageReadError(label, f"DICOM rescale is not a number ({written}): its pixel values are unknown") from None
    try:
        values = apply_voi_lut(modality, ds).astype(np.float32)  # float32: exact for 16-bit data, half the memory
    except (TypeError, ValueError):  # an invalid window (WindowWidth 0, 'abc'): the pixels are good, the full
        values = modality.astype(np.float32)  # range is shown
    padding = _padding(pixels, ds)  # outside the image: left out of the range, shown black
    real = values[~padding] if padding.any() and not padding.all() else values
    lo, hi = float(real.min()), float(real.max())
    # MONOCHROME1 shows low values white; a MONOCHROME2 image may ask for the same with an INVERSE Presentation
    # LUT Shape (with MONOCHROME1, INVERSE is what the DX standard requires: the same inversion, not a second).
    # Inverted as (hi - v) / (hi - lo), not 1 - (v - lo) / (hi - lo): the same float32 values, so the same hash,
    # as a MONOCHROME2 copy of the film whose stored values were inverted.
    inverse = photometric == "MONOCHROME1" or str(ds.get("PresentationLUTShape", "")).upper() == "INVERSE"
    offset = (np.float32(hi) - values) if inverse else (values - np.float32(lo))
    scaled = np.clip(offset / np.float32(hi - lo), 0.0, 1.0) if hi > lo else np.zeros_like(values)
    scaled[padding] = 0.0
    return scaled.astype(np.float32)


def _written(ds: Dataset, key: str) -> str:
    """The value of the element ``key`` as text ('' when empty)."""
    value = ds[key].value
    return "" if value is None else str(value)


def _signed(value: int, ds: Dataset) -> int:
    """A padding value of signed pixels that was written unsigned, as the signed number it stands for: two's
    complement in BitsStored bits (a 12-bit 0x800 is -2048) or in BitsAllocated bits (0x8000 is -32768)."""
    stored, allocated = int(ds.get("BitsStored") or 16), int(ds.get("BitsAllocated") or 16)
    for bits in (stored, allocated):
        if 1 << (bits - 1) <= value < 1 << bits:
            return value - (1 << bits)
    return value


def _padding(pixels: np.ndarray, ds: Dataset) -> np.ndarray:
    """Pixels whose stored value is the PixelPaddingValue (to PixelPaddingRangeLimit, when given)."""
    pad = ds.get("PixelPaddingValue")
    if pad is None:
        return np.zeros(pixels.shape, bool)
    limit = ds.get("PixelPaddingRangeLimit")
    if int(ds.get("PixelRepresentation") or 0) == 1:  # signed pixels: a value written as US is read as signed
        pad, limit = (None if v is None else _signed(int(v), ds) for v in (pad, limit))
    lo, hi = (min(pad, limit), max(pad, limit)) if limit is not None else (pad, pad)
    return (pixels >= lo) & (pixels <= hi)
