"""Image input: real CXR JPEGs, PNG/TIFF/DICOM written here from a real image, and every kind of bad file."""

from __future__ import annotations

import csv
import hashlib
import io
import os
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from patchflannel.errors import ImageReadError
from patchflannel.io import MAX_PIXELS, MIN_SIDE, content_hash, read_image, read_image_with_meta

pydicom = pytest.importorskip("pydicom", reason="pydicom (the patchflannel[dicom] extra) is not installed")
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.pixels import get_encoder  # noqa: E402
from pydicom.uid import (  # noqa: E402
    MPEG2MPML,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

LUMA = np.array([0.299, 0.587, 0.114])
PYDICOM_SAMPLES = Path(pydicom.__file__).parent / "data" / "test_files"


# ---------------------------------------------------------------- helpers and fixtures


def _manifest_paths(cxr4_dir: Path) -> list[Path]:
    with open(cxr4_dir / "manifest.csv", newline="") as fh:
        return [cxr4_dir / row["path"] for row in csv.DictReader(fh)]


@pytest.fixture(scope="module")
def real_u8(cxr4_dir: Path) -> np.ndarray:
    """A 256x320 crop (not square, to catch transposes) of the first real CXR large enough for it."""
    for path in sorted(_manifest_paths(cxr4_dir)):
        with Image.open(path) as img:
            if img.height >= 256 and img.width >= 320:
                return np.asarray(img.convert("L"))[:256, :320].copy()
    raise AssertionError("no CXR of at least 256x320 in the manifest")


@pytest.fixture(scope="module")
def real_u16(real_u8: np.ndarray) -> np.ndarray:
    """A 16-bit image from the real crop whose low byte varies too (so 8-bit rounding would show)."""
    low = np.random.default_rng(7).integers(0, 256, real_u8.shape)
    return (real_u8.astype(np.uint16) << 8) | low.astype(np.uint16)


def _luma(rgb: np.ndarray, full_scale: float) -> np.ndarray:
    return rgb[..., :3].astype(np.float64) @ LUMA / full_scale


def _dicom(pixels: np.ndarray, photometric: str, bits_stored: int, **attrs: object) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "DX"
    ds.set_pixel_data(pixels, photometric, bits_stored)
    for key, value in attrs.items():
        setattr(ds, key, value)
    return ds


def _save(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height 8-bit grey pixels (the pixel data is a stub)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


def _assert_refused(source: object, *words: str, name: str | None = None) -> ImageReadError:
    with pytest.raises(ImageReadError) as info:
        read_image(source, name=name)  # type: ignore[arg-type]
    message = str(info.value)
    label = name if name is not None else Path(str(source)).name
    assert label in message, message
    for word in words:
        assert word in message, message
    return info.value


# ---------------------------------------------------------------- real JPEGs, PNG, TIFF


def test_real_jpegs_equal_pil_decode(cxr4_dir: Path) -> None:
    paths = _manifest_paths(cxr4_dir)
    chosen = {p.parent.name: p for p in paths}  # the last image of each label
    for path in list(chosen.values()) + paths[:4]:
        image, meta = read_image_with_meta(path)
        with Image.open(path) as img:
            assert img.mode == "L"
            expected = np.asarray(img, dtype=np.float32) / 255
        assert image.dtype == np.float32 and image.ndim == 2 and image.flags.c_contiguous
        assert image.shape == expected.shape == meta["shape"]
        assert 0.0 <= image.min() and image.max() <= 1.0
        np.testing.assert_array_equal(image, expected)
        assert meta["format"] == "jpeg" and meta["bit_depth"] == 8 and meta["channels"] == 1


@pytest.mark.parametrize("fmt", ["png", "tiff"])
def test_8bit_round_trip(tmp_path: Path, real_u8: np.ndarray, fmt: str) -> None:
    path = tmp_path / f"grey.{fmt}"
    Image.fromarray(real_u8).save(path)
    image, meta = read_image_with_meta(path)
    np.testing.assert_allclose(image, real_u8 / 255.0, atol=1e-7)
    assert meta == {"format": fmt, "shape": real_u8.shape, "channels": 1, "bit_depth": 8}


@pytest.mark.parametrize("writer", ["pil-png", "pil-tiff", "tifffile"])
def test_16bit_scaled_by_65535(tmp_path: Path, real_u16: np.ndarray, writer: str) -> None:
    path = tmp_path / ("deep.png" if writer == "pil-png" else "deep.tif")
    if writer == "tifffile":
        tifffile.imwrite(path, real_u16)
    else:
        Image.fromarray(real_u16).save(path)
    image, meta = read_image_with_meta(path)
    np.testing.assert_allclose(image, real_u16 / 65535.0, atol=0.5 / 65535)
    assert meta["bit_depth"] == 16 and meta["shape"] == real_u16.shape


def test_float_tiff_is_clipped(tmp_path: Path, real_u8: np.ndarray) -> None:
    span = float(real_u8.max()) - float(real_u8.min())
    values = ((real_u8 - float(real_u8.min())) / span * 2.0 - 0.5).astype(np.float32)  # spans [-0.5, 1.5]
    path = tmp_path / "float.tif"
    tifffile.imwrite(path, values)
    image, meta = read_image_with_meta(path)
    np.testing.assert_array_equal(image, np.clip(values, 0, 1))
    assert meta["bit_depth"] == 32 and image.min() == 0.0 and image.max() == 1.0


def test_rgb_rgba_palette_and_grey_alpha_to_luma(tmp_path: Path, real_u8: np.ndarray) -> None:
    rgb = np.stack([real_u8, 255 - real_u8, np.roll(real_u8, 17, axis=1)], axis=-1)
    alpha = np.random.default_rng(1).integers(0, 256, real_u8.shape, dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(np.dstack([rgb, alpha])).save(tmp_path / "rgba.png")
    Image.fromarray(rgb).save(tmp_path / "rgb.tif")
    expected = _luma(rgb, 255.0)
    for name in ("rgb.png", "rgba.png", "rgb.tif"):
        image, meta = read_image_with_meta(tmp_path / name)
        np.testing.assert_allclose(image, expected, atol=1e-6, err_msg=name)
        assert meta["channels"] == (4 if name == "rgba.png" else 3)

    palette = Image.fromarray(rgb).quantize(64)
    palette.save(tmp_path / "palette.png")
    np.testing.assert_allclose(
        read_image(tmp_path / "palette.png"), _luma(np.asarray(palette.convert("RGB")), 255.0), atol=1e-6
    )

    Image.fromarray(np.dstack([real_u8, alpha]), mode="LA").save(tmp_path / "la.png")
    np.testing.assert_allclose(read_image(tmp_path / "la.png"), real_u8 / 255.0, atol=1e-7)


def test_bytes_equal_path_and_hash(cxr4_dir: Path, tmp_path: Path, real_u16: np.ndarray) -> None:
    jpeg = _manifest_paths(cxr4_dir)[0]
    dcm = _save(_dicom(real_u16, "MONOCHROME2", 16), tmp_path / "x.dcm")
    for path in (jpeg, dcm):
        data = path.read_bytes()
        from_path, meta_path = read_image_with_meta(path)
        from_bytes, meta_bytes = read_image_with_meta(data, name="upload-1")
        np.testing.assert_array_equal(from_path, from_bytes)
        assert meta_path == meta_bytes
        assert content_hash(path) == content_hash(data) == content_hash(bytearray(data))
    assert content_hash(jpeg) == hashlib.sha256(jpeg.read_bytes()).hexdigest()  # DICOM: its pixels (test below)
    assert content_hash(jpeg) != content_hash(dcm)


def test_format_from_content_not_extension(tmp_path: Path, cxr4_dir: Path, real_u8: np.ndarray) -> None:
    Image.fromarray(real_u8).save(tmp_path / "png-really.jpg", format="PNG")
    jpeg = _manifest_paths(cxr4_dir)[0]
    (tmp_path / "jpeg-really.dcm").write_bytes(jpeg.read_bytes())
    dual = _dicom(real_u8, "MONOCHROME2", 8)
    dual.preamble = b"II*\x00" + bytes(124)  # a TIFF header in the preamble (dual-format file)
    _save(dual, tmp_path / "dicom-really.tif")

    image, meta = read_image_with_meta(tmp_path / "png-really.jpg")
    assert meta["format"] == "png"
    np.testing.assert_allclose(image, real_u8 / 255.0, atol=1e-7)
    image, meta = read_image_with_meta(tmp_path / "jpeg-really.dcm")
    assert meta["format"] == "jpeg"
    np.testing.assert_array_equal(image, read_image(jpeg))
    image, meta = read_image_with_meta(tmp_path / "dicom-really.tif")
    assert meta["format"] == "dicom"
    lo, hi = float(real_u8.min()), float(real_u8.max())
    np.testing.assert_allclose(image, (real_u8 - lo) / (hi - lo), atol=1e-6)


# ---------------------------------------------------------------- DICOM


def test_dicom_monochrome2_minmax_and_meta(tmp_path: Path, real_u16: np.ndarray) -> None:
    pixels = real_u16 >> 4  # 12 bits stored
    ds = _dicom(pixels, "MONOCHROME2", 12, ViewPosition="PA")
    image, meta = read_image_with_meta(_save(ds, tmp_path / "mono2.dcm"))
    lo, hi = pixels.min(), pixels.max()
    np.testing.assert_allclose(image, (pixels - lo) / (hi - lo), atol=1e-6)
    assert image.dtype == np.float32 and image.min() == 0.0 and image.max() == 1.0
    assert meta == {
        "format": "dicom",
        "shape": pixels.shape,
        "channels": 1,
        "bit_depth": 12,
        "TransferSyntaxUID": "1.2.840.10008.1.2.1",
        "StudyInstanceUID": ds.StudyInstanceUID,
        "SeriesInstanceUID": ds.SeriesInstanceUID,
        "SOPInstanceUID": ds.SOPInstanceUID,
        "PhotometricInterpretation": "MONOCHROME2",
        "Modality": "DX",
        "ViewPosition": "PA",
    }


def test_dicom_malformed_uid_is_reported_as_written_without_a_warning(tmp_path: Path, real_u16: np.ndarray) -> None:
    """A PACS export with a malformed UID (letters, an empty component): the meta holds the file's value, and
    pydicom's validation warning (on stderr, naming no file) is not raised by reading it."""
    ds = _dicom(real_u16 >> 4, "MONOCHROME2", 12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # writing it warns too: the point is what reading does
        ds.StudyInstanceUID = "1.2.abc..3"
        path = _save(ds, tmp_path / "bad_uid.dcm")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        image, meta = read_image_with_meta(path)
    assert meta["StudyInstanceUID"] == "1.2.abc..3" and meta["Modality"] == "DX"
    np.testing.assert_array_equal(image, read_image(_save(_dicom(real_u16 >> 4, "MONOCHROME2", 12), tmp_path / "ok.dcm")))


def test_dicom_monochrome1_is_inverted(tmp_path: Path, real_u16: np.ndarray) -> None:
    mono2 = read_image(_save(_dicom(real_u16, "MONOCHROME2", 16), tmp_path / "m2.dcm"))
    mono1 = read_image(_save(_dicom(real_u16, "MONOCHROME1", 16), tmp_path / "m1.dcm"))
    np.testing.assert_allclose(mono1, 1.0 - mono2, atol=1e-6)
    assert not np.allclose(mono1, mono2, atol=0.1)
    # An INVERSE Presentation LUT Shape inverts a MONOCHROME2 image; with MONOCHROME1 (as the DX standard has
    # it) it is the same inversion, not a second one.
    inverse2 = read_image(_save(_dicom(real_u16, "MONOCHROME2", 16, PresentationLUTShape="INVERSE"), tmp_path / "i2.dcm"))
    inverse1 = read_image(_save(_dicom(real_u16, "MONOCHROME1", 16, PresentationLUTShape="INVERSE"), tmp_path / "i1.dcm"))
    np.testing.assert_allclose(inverse2, mono1, atol=1e-6)
    np.testing.assert_allclose(inverse1, mono1, atol=1e-6)
    # A PACS that converts MONOCHROME1 to MONOCHROME2 on export inverts the stored values: the same image, bit for
    # bit, so the same content hash and patches.
    converted = _save(_dicom(real_u16.max() + real_u16.min() - real_u16, "MONOCHROME2", 16), tmp_path / "conv.dcm")
    assert np.array_equal(read_image(converted), mono1)
    assert content_hash(converted) == content_hash(tmp_path / "m1.dcm")


def test_dicom_rescale_then_window(tmp_path: Path, real_u16: np.ndarray) -> None:
    pixels = real_u16 >> 4
    slope, intercept = 2.0, -1024.0
    hu = pixels * slope + intercept
    center, width = float(np.percentile(hu, 50)), float(np.percentile(hu, 80) - np.percentile(hu, 20))
    ds = _dicom(pixels, "MONOCHROME2", 12, RescaleSlope=slope, RescaleIntercept=intercept,
                WindowCenter=center, WindowWidth=width)
    image = read_image(_save(ds, tmp_path / "window.dcm"))
    # PS3.3 C.11.2.1.2.1 linear window on the rescaled values; both ends saturate, so min-max keeps it.
    expected = np.clip((hu - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)
    np.testing.assert_allclose(image, expected, atol=1e-5)
    assert (image == 0.0).mean() > 0.02 and (image == 1.0).mean() > 0.02  # the window clips both ends


def test_dicom_with_an_invalid_window_shows_the_full_range(tmp_path: Path, real_u16: np.ndarray) -> None:
    """WindowWidth 0 is invalid (PS3.3 C.11.2.1.2): the pixels are still good, read as if no window were set."""
    pixels = real_u16 >> 4
    plain = read_image(_save(_dicom(pixels, "MONOCHROME2", 12), tmp_path / "plain.dcm"))
    zero = read_image(_save(_dicom(pixels, "MONOCHROME2", 12, WindowCenter=2000.0, WindowWidth=0.0), tmp_path / "w0.dcm"))
    np.testing.assert_array_equal(zero, plain)
    letters = _dicom(pixels, "MONOCHROME2", 12, WindowWidth=400.0)
    _raw(letters, "WindowCenter", "DS", "abc")  # no number: as if no window were set (it raised a TypeError)
    np.testing.assert_array_equal(read_image(_save(letters, tmp_path / "wabc.dcm")), plain)


def test_dicom_rescale_that_is_no_number_is_refused_naming_it(tmp_path: Path, real_u16: np.ndarray) -> None:
    """A decimal comma (a European PACS) or an empty slope: the pixel values cannot be known (it was an error
    row quoting numpy: "ufunc 'multiply' did not contain a loop")."""
    for slope in ("1,5", ""):
        ds = _dicom(real_u16 >> 4, "MONOCHROME2", 12, RescaleIntercept=-1024.0)
        _raw(ds, "RescaleSlope", "DS", slope)
        _assert_refused(_save(ds, tmp_path / "rescale.dcm"),
                        f"DICOM rescale is not a number (RescaleSlope '{slope}', RescaleIntercept '-1024.0')")


def _raw(ds: Dataset, keyword: str, vr: str, text: str) -> None:
    """Set ``keyword`` to ``text`` as a file would hold it, unchecked (pydicom refuses to set a bad value)."""
    from pydicom.datadict import tag_for_keyword
    from pydicom.dataelem import RawDataElement

    value = text.encode() + b" " * (len(text) % 2)
    tag = tag_for_keyword(keyword)
    ds[tag] = RawDataElement(tag, vr, len(value), value, 0, False, True)


def test_dicom_rgb_and_ybr_to_luma(tmp_path: Path, real_u8: np.ndarray) -> None:
    from pydicom.pixels import convert_color_space

    rgb = np.stack([real_u8, 255 - real_u8, np.roll(real_u8, 17, axis=1)], axis=-1)
    image, meta = read_image_with_meta(_save(_dicom(rgb, "RGB", 8), tmp_path / "rgb.dcm"))
    np.testing.assert_allclose(image, _luma(rgb, 255.0), atol=1e-6)
    assert meta["channels"] == 3 and meta["PhotometricInterpretation"] == "RGB"

    ybr = convert_color_space(rgb, "RGB", "YBR_FULL")
    image = read_image(_save(_dicom(ybr, "YBR_FULL", 8), tmp_path / "ybr.dcm"))
    np.testing.assert_allclose(image, _luma(rgb, 255.0), atol=2.0 / 255)


def test_dicom_palette_color(tmp_path: Path, real_u8: np.ndarray) -> None:
    ds = _dicom(real_u8, "PALETTE COLOR", 8)
    inverted_ramp = (65535 - np.arange(256, dtype=np.uint16) * 257).astype("<u2").tobytes()
    for colour in ("Red", "Green", "Blue"):
        setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [256, 0, 16])
        setattr(ds, f"{colour}PaletteColorLookupTableData", inverted_ramp)
    image = read_image(_save(ds, tmp_path / "palette.dcm"))
    np.testing.assert_allclose(image, 1.0 - real_u8 / 255.0, atol=1e-6)


@pytest.mark.parametrize("tsyntax", [RLELossless, JPEG2000Lossless, JPEGLSLossless], ids=lambda u: u.name)
def test_dicom_lossless_transfer_syntaxes(tmp_path: Path, real_u16: np.ndarray, tsyntax: object) -> None:
    encoder = get_encoder(tsyntax)
    if not encoder.is_available:
        pytest.skip(f"no {tsyntax.name} encoder here: {'; '.join(encoder.missing_dependencies)}")
    pixels = real_u16 >> 4
    plain = read_image(_save(_dicom(pixels, "MONOCHROME2", 12), tmp_path / "plain.dcm"))
    ds = _dicom(pixels, "MONOCHROME2", 12)
    ds.compress(tsyntax)
    image, meta = read_image_with_meta(_save(ds, tmp_path / "packed.dcm"))
    assert meta["TransferSyntaxUID"] == str(tsyntax)
    np.testing.assert_array_equal(image, plain)


def test_dicom_content_hash_is_its_pixels_not_its_patient_fields(tmp_path: Path, real_u16: np.ndarray) -> None:
    """Anonymising a film (patient and study attributes) keeps its hash, hence its patches; pixels or windowing do not."""
    base = _dicom(real_u16 >> 4, "MONOCHROME2", 12, PatientName="Doe^Jane", PatientID="12345", WindowCenter=2000,
                  WindowWidth=3000)
    original = content_hash(_save(base, tmp_path / "a.dcm"))
    base.PatientName, base.PatientID, base.StudyInstanceUID = "ANON", "0", generate_uid()
    assert content_hash(_save(base, tmp_path / "anon.dcm")) == original
    assert (tmp_path / "a.dcm").read_bytes() != (tmp_path / "anon.dcm").read_bytes()
    implicit = tmp_path / "implicit.dcm"  # re-saved in another transfer syntax, the same pixels
    base.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    base.save_as(implicit, implicit_vr=True, little_endian=True, enforce_file_format=True)
    assert read_image_with_meta(implicit)[1]["TransferSyntaxUID"] == str(ImplicitVRLittleEndian)
    assert content_hash(implicit) == original
    if get_encoder(RLELossless).is_available:
        packed = _dicom(real_u16 >> 4, "MONOCHROME2", 12, WindowCenter=2000, WindowWidth=3000)
        packed.compress(RLELossless)
        assert content_hash(_save(packed, tmp_path / "rle.dcm")) == original
    base = _dicom(real_u16 >> 4, "MONOCHROME2", 12, PatientName="Doe^Jane", PatientID="12345", WindowCenter=2000,
                  WindowWidth=3000)
    base.WindowCenter = 1000
    assert content_hash(_save(base, tmp_path / "window.dcm")) != original
    pixels = real_u16 >> 4
    pixels[-1, -1] ^= 1  # inside the window (a pixel the window clips to black stays black: the same image)
    assert content_hash(_save(_dicom(pixels, "MONOCHROME2", 12, PatientName="Doe^Jane", PatientID="12345",
                                     WindowCenter=2000, WindowWidth=3000), tmp_path / "pixel.dcm")) != original
    png = tmp_path / "a.png"
    Image.fromarray(real_u16).save(png)
    assert content_hash(png) == hashlib.sha256(png.read_bytes()).hexdigest()  # other formats: the file's bytes


def test_dicom_without_its_decoder_names_the_extra(tmp_path: Path, real_u16: np.ndarray) -> None:
    """A JPEG-LS file read where no JPEG-LS decoder is installed (the plugins hidden from a fresh interpreter)."""
    encoder = get_encoder(JPEGLSLossless)
    if not encoder.is_available:
        pytest.skip(f"no JPEG-LS encoder here: {'; '.join(encoder.missing_dependencies)}")
    ds = _dicom(real_u16 >> 4, "MONOCHROME2", 12)
    ds.compress(JPEGLSLossless)
    path = _save(ds, tmp_path / "jls.dcm")
    hide = "; ".join(f"sys.modules[{m!r}] = None" for m in ("jpeg_ls", "libjpeg", "gdcm", "pylibjpeg"))
    code = f"import sys; {hide}\nfrom patchflannel.io import read_image\nread_image({str(path)!r})"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "ImageReadError" in run.stderr, run.stderr[-2000:]
    assert "jls.dcm: cannot decode DICOM transfer syntax JPEG-LS" in run.stderr
    assert "pip install 'patchflannel[dicom]'" in run.stderr


def test_dicom_jpeg_lossless_sv1_sample() -> None:
    # No JPEG Lossless (Process 14 SV1) encoder exists in pydicom or its plugins, so decode pydicom's own
    # bundled sample and compare with the RLE Lossless file of the same picture.
    jpeg_ll, rle = PYDICOM_SAMPLES / "SC_rgb_jpeg_gdcm.dcm", PYDICOM_SAMPLES / "SC_rgb_rle.dcm"
    if not (jpeg_ll.exists() and rle.exists()):
        pytest.skip(f"pydicom's bundled samples are not at {PYDICOM_SAMPLES}")
    image, meta = read_image_with_meta(jpeg_ll)
    assert meta["TransferSyntaxUID"] == "1.2.840.10008.1.2.4.70"
    np.testing.assert_array_equal(image, read_image(rle))
    np.testing.assert_allclose(image, _luma(pydicom.dcmread(rle).pixel_array, 255.0), atol=1e-6)


def test_dicom_without_preamble(tmp_path: Path, real_u16: np.ndarray) -> None:
    ds = _dicom(real_u16, "MONOCHROME2", 16)
    with_preamble = read_image(_save(ds, tmp_path / "full.dcm"))
    del ds.file_meta
    ds.preamble = None
    buffer = io.BytesIO()
    ds.save_as(buffer, implicit_vr=True, little_endian=True)
    assert buffer.getvalue()[128:132] != b"DICM"
    image, meta = read_image_with_meta(buffer.getvalue(), name="bare")
    np.testing.assert_array_equal(image, with_preamble)
    assert meta["TransferSyntaxUID"] == "1.2.840.10008.1.2"


# ---------------------------------------------------------------- bad inputs


def test_missing_empty_text_and_directory(tmp_path: Path) -> None:
    _assert_refused(tmp_path / "nowhere.png", "not found")
    _assert_refused("", "'': an empty path names no file")  # the message named nothing: ": file not found"
    (tmp_path / "empty.png").write_bytes(b"")
    _assert_refused(tmp_path / "empty.png", "empty")
    (tmp_path / "notes.png").write_text("this is not an image\n")
    _assert_refused(tmp_path / "notes.png", "not a recognised image format")
    (tmp_path / "folder.png").mkdir()
    _assert_refused(tmp_path / "folder.png", "not a regular file")
    os.mkfifo(tmp_path / "pipe.png")  # reading it would block for ever: refused without opening it
    _assert_refused(tmp_path / "pipe.png", "not a regular file")
    _assert_refused(b"\x00garbage" * 40, "not a recognised image format", name="upload-7")
    with pytest.raises(ImageReadError, match="not found"):
        content_hash(tmp_path / "nowhere.png")


@pytest.mark.parametrize("fmt", ["jpeg", "png"])
def test_truncated_files(tmp_path: Path, real_u8: np.ndarray, fmt: str) -> None:
    buffer = io.BytesIO()
    Image.fromarray(real_u8).save(buffer, format=fmt.upper())
    path = tmp_path / f"cut.{fmt}"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    _assert_refused(path, "cannot decode")


def test_truncated_real_jpeg(tmp_path: Path, cxr4_dir: Path) -> None:
    data = _manifest_paths(cxr4_dir)[0].read_bytes()
    path = tmp_path / "real-cut.jpg"
    path.write_bytes(data[: len(data) * 2 // 3])
    _assert_refused(path, "cannot decode", "JPEG")


def test_a_jpeg_damaged_inside_is_refused_not_decoded_into_another_image(tmp_path: Path, cxr4_dir: Path) -> None:
    """Bytes zeroed, lost or changed inside the compressed data, the end-of-image marker intact: Pillow (and nvJPEG)
    only print libjpeg's warning, naming no file, and decode what is left (the changed byte leaves libjpeg 14 bytes
    short of the end: "extraneous bytes before marker 0xd9"); stray bytes between the header's markers are no
    damage to the image and are read as before."""
    from patchflannel.engine.loaders import eight_bit_channels

    data = _manifest_paths(cxr4_dir)[0].read_bytes()
    middle, scan = len(data) // 2, data.index(b"\xff\xda")
    changed = bytearray(data)
    changed[scan + 5000] ^= 0x55
    for name, damaged in (("zeroed", data[:middle] + bytes(3000) + data[middle + 3000:]),
                          ("cut", data[:middle] + data[middle + 20000:]), ("changed", bytes(changed))):
        (tmp_path / f"{name}.jpg").write_bytes(damaged)
        _assert_refused(tmp_path / f"{name}.jpg", "cannot decode JPEG: Corrupt JPEG data", "the file is damaged")
        assert not eight_bit_channels(damaged, ("jpeg",))  # the GPU loaders leave it to the cpu loader's refusal
    for stray in (data[:scan] + b"\0\0" + data[scan:],  # before the start-of-scan marker: libjpeg's warning
                  data[:-2] + b"\0\0" + data[-2:]):  # zeros before the end-of-image marker: read as padding
        np.testing.assert_array_equal(read_image(stray), read_image(data))
        assert eight_bit_channels(stray, ("jpeg",))
    assert eight_bit_channels(data, ("jpeg",))


@pytest.mark.parametrize("side", [(1, 1), (MIN_SIDE - 1, 200), (200, MIN_SIDE - 1)])
def test_too_small(tmp_path: Path, side: tuple[int, int]) -> None:
    path = tmp_path / "tiny.png"
    Image.new("L", side, 128).save(path)
    _assert_refused(path, "too small")
    Image.new("L", (MIN_SIDE, MIN_SIDE), 128).save(tmp_path / "ok.png")
    assert read_image(tmp_path / "ok.png").shape == (MIN_SIDE, MIN_SIDE)


def test_decompression_bomb_refused_without_warning(tmp_path: Path) -> None:
    side = int(MAX_PIXELS**0.5) + 1  # just over the limit, and over PIL's own warning threshold
    for width, height, name, size in ((side, side, "bomb.png", f"{side}x{side} pixels"),
                                      (60_000, 60_000, "huge.png", "3600000000 pixels")):  # Pillow refuses this one
        path = tmp_path / name
        path.write_bytes(_png_header_only(width, height))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            _assert_refused(path, f"image too large: {size} exceeds the limit of {MAX_PIXELS}")  # ours, not Pillow's


def test_exif_orientation_is_applied(tmp_path: Path, real_u8: np.ndarray) -> None:
    """A JPEG whose EXIF says 'rotate 90 degrees clockwise to view' (orientation 6) comes back upright."""
    stored = real_u8[:96, :128]
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / "turned.jpg", quality=95, exif=exif)
    Image.fromarray(stored).save(tmp_path / "plain.jpg", quality=95)
    image, meta = read_image_with_meta(tmp_path / "turned.jpg")
    assert image.shape == meta["shape"] == (128, 96) and meta["exif_orientation"] == 6
    np.testing.assert_array_equal(image, np.rot90(read_image(tmp_path / "plain.jpg"), k=-1))


def test_corrupt_structures_are_bad_inputs_not_crashes(tmp_path: Path, real_u8: np.ndarray, real_u16: np.ndarray) -> None:
    """A TIFF whose next-page offset points at an empty directory, a DICOM with a corrupt identifying element."""
    buf = io.BytesIO()
    Image.fromarray(real_u8[:96, :128]).save(buf, "TIFF")
    data = bytearray(buf.getvalue())
    ifd = struct.unpack_from("<I", data, 4)[0]
    entries = struct.unpack_from("<H", data, ifd)[0]
    struct.pack_into("<I", data, ifd + 2 + 12 * entries, len(data))  # next directory: 0 entries, then junk
    (tmp_path / "pages.tif").write_bytes(bytes(data) + b"\0\0\xff\xff\xff\xff")
    _assert_refused(tmp_path / "pages.tif", "cannot decode TIFF")
    raw = _save(_dicom(real_u16 >> 4, "MONOCHROME2", 12), tmp_path / "ok.dcm").read_bytes()
    at = raw.index(b"\x08\x00\x18\x00UI")  # (0008,0018) SOPInstanceUID, explicit VR
    (tmp_path / "bad_vr.dcm").write_bytes(raw[:at + 4] + b"\x55\x0c" + raw[at + 6:])
    image, meta = read_image_with_meta(tmp_path / "bad_vr.dcm")
    np.testing.assert_array_equal(image, read_image(tmp_path / "ok.dcm"))
    assert "SOPInstanceUID" not in meta and meta["Modality"] == "DX"


def test_dicom_padding_is_left_out_of_the_range(tmp_path: Path, real_u16: np.ndarray) -> None:
    pixels = (real_u16 >> 4) + 100
    pixels[:, :20] = 0  # a padded border outside the image
    image = read_image(_save(_dicom(pixels, "MONOCHROME2", 12, PixelPaddingValue=0), tmp_path / "pad.dcm"))
    real = pixels[:, 20:]
    np.testing.assert_allclose(image[:, 20:], (real - real.min()) / (real.max() - real.min()), atol=1e-6)
    assert (image[:, :20] == 0).all()
    signed = pixels.astype(np.int16) - 2000
    signed[:, :20] = -32768  # the padding of signed pixels, written (as some exporters do) as US 0x8000
    ds = _dicom(signed, "MONOCHROME2", 16)
    ds.add_new(0x00280120, "US", 0x8000)  # PixelPaddingValue
    image = read_image(_save(ds, tmp_path / "signed_pad.dcm"))
    np.testing.assert_allclose(image[:, 20:], (real - real.min()) / (real.max() - real.min()), atol=1e-6)
    assert (image[:, :20] == 0).all()
    signed12 = (pixels >> 4).astype(np.int16) - 1000  # 12 bits stored in 16: the padding -2048 written as 0x800
    signed12[:, :20] = -2048
    ds = _dicom(signed12, "MONOCHROME2", 12)
    ds.add_new(0x00280120, "US", 0x800)
    image = read_image(_save(ds, tmp_path / "signed12_pad.dcm"))
    assert (image[:, :20] == 0).all() and image[:, 20:].min() == 0 and image[:, 20:].max() == 1


def test_tiff_multipage_nan_and_int32_refused(tmp_path: Path, real_u8: np.ndarray) -> None:
    tifffile.imwrite(tmp_path / "pages.tif", np.stack([real_u8, real_u8]))
    _assert_refused(tmp_path / "pages.tif", "multi-page")
    values = (real_u8 / 255.0).astype(np.float32)
    values[3, 5] = np.nan
    tifffile.imwrite(tmp_path / "nan.tif", values)
    _assert_refused(tmp_path / "nan.tif", "NaN")
    tifffile.imwrite(tmp_path / "int32.tif", real_u8.astype(np.int32) * 1000)
    _assert_refused(tmp_path / "int32.tif", "unsupported pixel type")


def test_dicom_refusals(tmp_path: Path, real_u16: np.ndarray) -> None:
    ds = _dicom(real_u16, "MONOCHROME2", 16)
    del ds.PixelData
    _assert_refused(_save(ds, tmp_path / "nopixels.dcm"), "no PixelData")

    frames = _dicom(np.stack([real_u16, real_u16]), "MONOCHROME2", 16)
    _assert_refused(_save(frames, tmp_path / "frames.dcm"), "multi-frame", "2 frames")

    _assert_refused(_save(_dicom(real_u16[:16, :16], "MONOCHROME2", 16), tmp_path / "small.dcm"), "too small")

    fewer_rows = _dicom(real_u16, "MONOCHROME2", 16)
    fewer_rows.Rows = real_u16.shape[0] // 2  # the header says half the rows the pixel data holds
    _assert_refused(_save(fewer_rows, tmp_path / "rows.dcm"), f"{real_u16.size * 2} bytes", "image size or sample layout")
    padded = _dicom(real_u16, "MONOCHROME2", 16)
    padded.PixelData = padded.PixelData + b"\0\0"  # less than a row of trailing padding: read as it is
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and without pydicom's "excess padding" warning, which names no file
        np.testing.assert_array_equal(read_image(_save(padded, tmp_path / "padded.dcm")),
                                      read_image(_save(_dicom(real_u16, "MONOCHROME2", 16), tmp_path / "plain.dcm")))

    data = _save(_dicom(real_u16, "MONOCHROME2", 16), tmp_path / "whole.dcm").read_bytes()
    (tmp_path / "cut.dcm").write_bytes(data[:-1000])
    _assert_refused(tmp_path / "cut.dcm", "cannot decode DICOM pixel data")  # the pixel data: the decoder judges
    # Cut inside a UID: an error naming the element, and no partial UID among the attributes it reports.
    uid = str(pydicom.dcmread(tmp_path / "whole.dcm").StudyInstanceUID)
    (tmp_path / "header.dcm").write_bytes(data[:data.index(uid.encode()) + 8])
    error = _assert_refused(tmp_path / "header.dcm", "cut short (inside its StudyInstanceUID element)")
    assert "StudyInstanceUID" not in error.meta and error.meta["format"] == "dicom"
    (tmp_path / "meta_only.dcm").write_bytes(data[:200])
    _assert_refused(tmp_path / "meta_only.dcm", "holds no data set")
    index = Dataset()  # a media export's DICOMDIR: named for what it is
    index.file_meta = FileMetaDataset()
    index.file_meta.MediaStorageSOPClassUID = index.SOPClassUID = "1.2.840.10008.1.3.10"
    index.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    index.file_meta.MediaStorageSOPInstanceUID = index.SOPInstanceUID = generate_uid()
    index.FileSetID = "EXPORT"
    _assert_refused(_save(index, tmp_path / "DICOMDIR"), "no PixelData (a DICOMDIR")

    mpeg = _dicom(real_u16 >> 4, "MONOCHROME2", 12)
    mpeg.compress(RLELossless)
    mpeg.file_meta.TransferSyntaxUID = MPEG2MPML
    _assert_refused(_save(mpeg, tmp_path / "mpeg.dcm"), "unsupported DICOM transfer syntax", MPEG2MPML)


def test_files_not_written_whole_or_too_large_are_refused_quickly(tmp_path: Path, real_u16: np.ndarray) -> None:
    """A DICOM header followed by zeros (a transfer that stopped early; pydicom took 5 s to read 32 MB of them
    as empty elements), and a file over 1 GiB (a 2 GB sparse file was read whole, then parsed for minutes)."""
    data = _save(_dicom(real_u16, "MONOCHROME2", 16), tmp_path / "whole.dcm").read_bytes()
    header = data[:data.index(b"\xe0\x7f\x10\x00")]
    (tmp_path / "zeros.dcm").write_bytes(header + bytes(40 << 20))
    error = _assert_refused(tmp_path / "zeros.dcm", "DICOM holds only zero bytes from byte", "not written whole")
    assert len(header) - 8 < int(str(error).split("from byte ")[1].split()[0]) <= len(header)  # its last value's 0s
    black = _dicom(np.zeros((1024, 1024), np.uint16), "MONOCHROME2", 16)  # zeros after the pixel data's tag: read
    assert read_image(_save(black, tmp_path / "black.dcm")).max() == 0
    overlay = _dicom(real_u16, "MONOCHROME2", 16)  # an empty overlay of a 3000 x 3000 detector, before the pixels
    overlay.add_new(0x60003000, "OW", bytes(3000 * 3000 // 8))
    np.testing.assert_array_equal(read_image(_save(overlay, tmp_path / "overlay.dcm")),
                                  read_image(tmp_path / "whole.dcm"))
    with open(tmp_path / "huge.png", "wb") as fh:  # sparse: no disk used
        fh.truncate((1 << 30) + 1)
    _assert_refused(tmp_path / "huge.png", "file too large: 1.0 GiB, over the limit of 1 GiB")


def test_dicom_without_pydicom_names_the_extra(tmp_path: Path, real_u16: np.ndarray, monkeypatch) -> None:
    path = _save(_dicom(real_u16, "MONOCHROME2", 16), tmp_path / "x.dcm")
    monkeypatch.setitem(sys.modules, "pydicom", None)  # as if the extra were not installed
    _assert_refused(path, "patchflannel[dicom]")


def test_errors_cross_process_boundaries_whole() -> None:
    """cv's worker processes and Ray pickle an error to send it back: it must come back with its parts (it used
    to fail to unpickle, hiding the real error behind a TypeError)."""
    import pickle

    from patchflannel.errors import ManifestError

    err = pickle.loads(pickle.dumps(ImageReadError("scan.dcm", "multi-frame DICOM", meta={"SOPInstanceUID": "1.2"})))
    assert (str(err), err.reason, err.meta) == ("scan.dcm: multi-frame DICOM", "multi-frame DICOM", {"SOPInstanceUID": "1.2"})
    many = pickle.loads(pickle.dumps(ManifestError("m.csv", ["line 2: empty path", "line 3: unknown label 'x'"])))
    assert many.problems == ["line 2: empty path", "line 3: unknown label 'x'"] and str(many).startswith("m.csv: 2 problem(s)")
