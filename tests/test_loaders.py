"""Loaders: cpu (PIL/pydicom), DALI (CPU pipeline here, GPU where available), nvJPEG on a GPU."""

from __future__ import annotations

import importlib.util
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from patchflannel.engine.loaders import eight_bit_channels, make_loader
from patchflannel.errors import ConfigError, ImageReadError
from patchflannel.io import read_image

HAS_DALI = importlib.util.find_spec("nvidia.dali") is not None
needs_dali = pytest.mark.skipif(not HAS_DALI, reason="NVIDIA DALI is not installed (extra 'dali')")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


def _tiff(pages: int) -> bytes:
    frames = [Image.fromarray(np.full((64, 64), 40 * i, np.uint8)) for i in range(pages)]
    buf = io.BytesIO()
    frames[0].save(buf, "TIFF", save_all=True, append_images=frames[1:])
    return buf.getvalue()


@pytest.fixture(scope="module")
def real_items(cxr4_dir: Path) -> list[tuple[str, bytes]]:
    paths = sorted((cxr4_dir / "images").rglob("*.jpg"))[:4]
    return [(str(p), p.read_bytes()) for p in paths]


def test_cpu_loader_is_the_reader(real_items):
    loader = make_loader("cpu", torch.device("cpu"))
    out = loader.decode(real_items + [("junk", b"junk")])
    for (label, _), (image, meta) in zip(real_items, out[:-1]):
        np.testing.assert_array_equal(image.numpy(), read_image(label))
        assert meta["format"] == "jpeg" and image.dtype == torch.float32
    assert isinstance(out[-1], ImageReadError) and "junk" in str(out[-1])


def test_routing_by_header():
    grey8 = _png(np.zeros((64, 64), np.uint8))
    grey16 = _png(np.zeros((64, 64), np.uint16))
    tiny = _png(np.zeros((8, 8), np.uint8))
    assert eight_bit_channels(grey8, ("png",)) == 1 and eight_bit_channels(grey8, ("jpeg",)) is None
    assert eight_bit_channels(_png(np.zeros((64, 64, 3), np.uint8)), ("png",)) == 3
    assert not eight_bit_channels(grey16, ("png",)) and not eight_bit_channels(tiny, ("png",))
    assert not eight_bit_channels(b"\x89PNG\r\n\x1a\ntruncated", ("png",))
    assert eight_bit_channels(_tiff(1), ("tiff",)) == 1
    assert eight_bit_channels(_tiff(2), ("tiff",)) is None  # pages: the cpu loader
    exif = Image.Exif()
    exif[0x0112] = 6  # to be turned upright: the GPU decoders would not, the cpu loader does
    turned = io.BytesIO()
    Image.fromarray(np.zeros((64, 96), np.uint8)).save(turned, "JPEG", exif=exif)
    assert not eight_bit_channels(turned.getvalue(), ("jpeg",))
    assert make_loader("auto", torch.device("cpu")).name == "cpu"
    with pytest.raises(ConfigError, match="unknown loader"):
        make_loader("magic", torch.device("cpu"))


def _rgb_jpeg(item: tuple[str, bytes]) -> tuple[str, bytes]:
    """A colour JPEG of a real image (its grey levels tinted)."""
    grey = np.asarray(Image.open(io.BytesIO(item[1])).convert("L"), dtype=np.float32)
    buf = io.BytesIO()
    Image.fromarray(np.stack([grey, grey * 0.9, grey * 0.8], -1).astype(np.uint8)).save(buf, "JPEG", quality=95)
    return "rgb.jpg", buf.getvalue()


@needs_dali
def test_dali_cpu_pipeline_matches_cpu_loader_on_real_jpegs(real_items):
    items = real_items + [_rgb_jpeg(real_items[0])]
    dali = make_loader("dali", torch.device("cpu"))
    ref = make_loader("cpu", torch.device("cpu")).decode(items)
    for (img, meta), (want, want_meta) in zip(dali.decode(items), ref):
        assert meta.pop("decoder") == "dali-cpu" and img.shape == want.shape
        assert meta == want_meta  # format, shape, channels (3 for the colour one), bit depth
        diff = (img - want).abs()
        assert float(diff.mean()) < 1 / 255 and float(diff.max()) <= 4 / 255


@needs_dali
def test_dali_hands_other_inputs_to_cpu_and_keeps_order(real_items):
    dali = make_loader("dali", torch.device("cpu"))
    grey16 = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16
    items = [real_items[0], ("junk", b"junk"), ("g16", _png(grey16)), real_items[1],
             ("truncated", real_items[2][1][:200]), ("pages", _tiff(2))]
    out = dali.decode(items)
    assert out[0][1]["decoder"] == "dali-cpu" and out[3][1]["decoder"] == "dali-cpu"
    assert isinstance(out[1], ImageReadError) and "not a recognised image format" in str(out[1])
    assert out[2][1]["bit_depth"] == 16 and "decoder" not in out[2][1]
    np.testing.assert_allclose(out[2][0].numpy(), grey16 / 65535.0, atol=1e-6)
    assert isinstance(out[4], ImageReadError) and "truncated" in str(out[4])
    assert isinstance(out[5], ImageReadError) and "multi-page TIFF (2 pages) is not supported" in str(out[5])
    # The pipeline survives a failed batch (it is rebuilt) and decodes the next one.
    assert dali.decode([real_items[0]])[0][1]["decoder"] == "dali-cpu"


@needs_dali
def test_a_truncated_jpeg_never_reaches_dali(real_items, capfd):
    """A JPEG without its end marker goes to the cpu loader, which names it: DALI would fail the whole batch
    (decoded again on the host) and print libjpeg's message; the good images stay on DALI."""
    data = real_items[0][1]
    assert not eight_bit_channels(data[: len(data) // 3], ("jpeg",))
    assert eight_bit_channels(data + b"\r\n" + b"\xff" * 100, ("jpeg",))  # padding or a trailer after the marker
    capfd.readouterr()
    out = make_loader("dali", torch.device("cpu")).decode([("cut", data[: len(data) // 3]), real_items[1]])
    assert isinstance(out[0], ImageReadError) and "cut: cannot decode JPEG: image file is truncated" in str(out[0])
    assert out[1][1]["decoder"] == "dali-cpu"
    assert "libjpeg" not in capfd.readouterr().err


@pytest.mark.gpu
@needs_cuda
def test_nvjpeg_matches_cpu_loader_on_gpu():
    from patchflannel.bench.harness import phantom_jpegs

    items = phantom_jpegs(3, size=512) + [("junk", b"junk"), ("png", _png(np.full((64, 64), 7, np.uint8)))]
    loader = make_loader("nvjpeg", torch.device("cuda"))
    out = loader.decode(items)
    ref = make_loader("cpu", torch.device("cpu")).decode(items)
    for (img, meta), (want, want_meta) in zip(out[:3], ref[:3]):
        assert img.device.type == "cuda" and meta.pop("decoder") == "nvjpeg" and meta == want_meta
        diff = (img.cpu() - want).abs()
        assert float(diff.mean()) < 1 / 255 and float(diff.max()) <= 8 / 255
    assert isinstance(out[3], ImageReadError)
    assert out[4][0].device.type == "cuda" and "decoder" not in out[4][1]
    assert make_loader("auto", torch.device("cuda")).name == ("dali" if HAS_DALI else "nvjpeg")


@pytest.mark.gpu
@needs_cuda
@needs_dali
def test_dali_gpu_pipeline_matches_cpu_loader():
    from patchflannel.bench.harness import phantom_jpegs

    items = phantom_jpegs(3, size=512)
    out = make_loader("dali", torch.device("cuda")).decode(items)
    for (img, meta), (want, want_meta) in zip(out, make_loader("cpu", torch.device("cpu")).decode(items)):
        assert img.device.type == "cuda" and meta.pop("decoder") == "dali-mixed" and meta == want_meta
        assert float((img.cpu() - want).abs().mean()) < 1 / 255
