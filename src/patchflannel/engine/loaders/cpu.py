"""The ``cpu`` loader: every format through :func:`patchflannel.io.read_image_with_meta`."""

from __future__ import annotations

from typing import Sequence

import torch

from patchflannel.engine.loaders import DecodeResult
from patchflannel.errors import ImageReadError
from patchflannel.io import read_image_with_meta


def to_device(image: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Move a CPU tensor to ``device`` (through pinned memory, asynchronously, for CUDA)."""
    if device.type == "cuda":
        return image.pin_memory().to(device, non_blocking=True)
    return image.to(device)


class CpuLoader:
    """Decodes with PIL / pydicom on the host, then moves the image to the device."""

    name = "cpu"

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)

    def decode_one(self, label: str, data: bytes) -> DecodeResult:
        """One input; the error of a bad input is returned, not raised."""
        try:
            image, meta = read_image_with_meta(data, name=label)
        except ImageReadError as exc:
            return exc
        return to_device(torch.from_numpy(image), self.device), meta

    def decode(self, items: Sequence[tuple[str, bytes]]) -> list[DecodeResult]:
        """Each ``(label, data)`` in order."""
        return [self.decode_one(label, data) for label, data in items]
