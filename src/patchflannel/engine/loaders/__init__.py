"""Image loaders: encoded bytes -> grey float32 (H, W) tensors in [0, 1] on the engine's device.

A loader has a ``name``, a ``device`` and ``decode(items)``, where ``items`` is a sequence of
``(label, data)`` pairs; it returns, in order, ``(image, meta)`` or the :class:`ImageReadError` of that
input (a bad input never fails the batch). ``cpu`` reads every format (PIL, pydicom); ``dali`` and
``nvjpeg`` decode 8-bit JPEG (and for DALI PNG/TIFF) on the GPU (DALI also on CPU) and hand anything else,
DICOM and 16-bit included, to the ``cpu`` loader. The choice among them is made here, in :func:`make_loader`.
"""

from __future__ import annotations

import importlib.util
from typing import Any, Protocol, Sequence, Union

import torch

from patchflannel.errors import ConfigError, ImageReadError

Decoded = tuple[torch.Tensor, dict[str, Any]]
DecodeResult = Union[Decoded, ImageReadError]
LOADERS = ("cpu", "dali", "nvjpeg")


class Loader(Protocol):
    """Decodes a batch of encoded images."""

    name: str
    device: torch.device

    def decode(self, items: Sequence[tuple[str, bytes]]) -> list[DecodeResult]: ...


JPEG_TAIL = 4096
"""Bytes at the end of a JPEG searched for its end-of-image marker (trailers after it are allowed)."""


def eight_bit_channels(data: bytes, formats: tuple[str, ...]) -> int | None:
    """The channel count (1 grey, 3 RGB) of ``data`` when it is a single, upright 8-bit grey or RGB image of
    one of ``formats`` whose size the readers accept (a JPEG with its end-of-image marker in its last
    :data:`JPEG_TAIL` bytes); ``None`` for anything else.

    Only the header is parsed (no pixel decoding; except that Pillow reads a whole PNG to look for an EXIF
    orientation after its pixels): anything else goes to the ``cpu`` loader, which reads every format and gives
    the precise error for a bad input.
    """
    import io

    from PIL import Image

    from patchflannel.io.readers import EXIF_ORIENTATION, MAX_PIXELS, MIN_SIDE, detect_format, jpeg_corruption

    fmt = detect_format(data)
    if fmt not in formats:
        return None
    if fmt == "jpeg":
        eoi = data.rfind(b"\xff\xd9", max(2, len(data) - JPEG_TAIL))
        if eoi < 0 or data.find(b"\xff\xda", eoi) >= 0:
            # No end-of-image marker near the end, after the last start of scan (FF DA; not an EXIF
            # thumbnail's): cut short. A GPU decoder may return a partly grey image, and DALI fails its whole
            # batch (decoded again on the host) and logs libjpeg's complaint. (FF D9 cannot occur inside the
            # entropy-coded data, which stuffs every FF; a trailer after the marker is allowed.)
            return None
    try:
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size
            single = getattr(img, "n_frames", 1) == 1  # multi-page TIFFs: the cpu loader refuses them
            upright = img.getexif().get(EXIF_ORIENTATION, 1) == 1  # the cpu loader turns the others upright
            fits = img.mode in ("L", "RGB") and single and upright and min(w, h) >= MIN_SIDE and w * h <= MAX_PIXELS
            channels = len(img.getbands())
    except Exception:  # noqa: BLE001 - unreadable header: the cpu loader reports why
        return None
    # A JPEG damaged inside (checked once its size is known to be sane): the GPU decoders would decode what is left.
    return channels if fits and (fmt != "jpeg" or jpeg_corruption(data) is None) else None


def available_loaders(device: torch.device) -> list[str]:
    """Loaders that can run on ``device`` here, best first."""
    out = []
    if device.type == "cuda":
        if importlib.util.find_spec("nvidia.dali") is not None:
            out.append("dali")
        out.append("nvjpeg")
    out.append("cpu")
    return out


def make_loader(name: str, device: torch.device) -> Loader:
    """The loader ``name`` ('auto' = best available) for ``device``."""
    if name == "auto":
        name = available_loaders(device)[0]
    if name == "cpu":
        from patchflannel.engine.loaders.cpu import CpuLoader

        return CpuLoader(device)
    if name == "dali":
        from patchflannel.engine.loaders.dali import DaliLoader

        return DaliLoader(device)
    if name == "nvjpeg":
        from patchflannel.engine.loaders.nvjpeg import NvjpegLoader

        return NvjpegLoader(device)
    raise ConfigError(f"unknown loader {name!r}; expected one of auto, {', '.join(LOADERS)}")
