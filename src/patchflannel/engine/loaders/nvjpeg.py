"""The ``nvjpeg`` loader: torchvision's GPU JPEG decoder (nvJPEG) for a batch of JPEG bytes.

Non-JPEG inputs, and any JPEG the GPU decoder refuses, go through the ``cpu`` loader.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torchvision.io import ImageReadMode, decode_jpeg

from patchflannel.engine.loaders import DecodeResult, eight_bit_channels
from patchflannel.engine.loaders.cpu import CpuLoader
from patchflannel.errors import BackendUnavailableError
from patchflannel.ops.preprocess import to_unit


class NvjpegLoader:
    """Decodes 8-bit JPEGs on a CUDA device in one batched call; the rest on the host."""

    name = "nvjpeg"

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise BackendUnavailableError("the nvjpeg loader needs a CUDA device (use loader='cpu' or 'dali')")
        self._cpu = CpuLoader(self.device)

    def _gpu(self, datas: list[bytes]) -> list[torch.Tensor]:
        encoded = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
        decoded = decode_jpeg(encoded, mode=ImageReadMode.GRAY, device=self.device)
        return [to_unit(img[0]) for img in decoded]  # levels to floats as the cpu loader maps them

    def decode(self, items: Sequence[tuple[str, bytes]]) -> list[DecodeResult]:
        """Each ``(label, data)`` in order; the error of a bad input is returned, not raised."""
        results: list[DecodeResult | None] = [None] * len(items)
        channels = {i: c for i, (_, data) in enumerate(items) if (c := eight_bit_channels(data, ("jpeg",)))}
        todo = list(channels)
        if todo:
            try:
                images = self._gpu([items[i][1] for i in todo])
            except RuntimeError:
                images = []  # the cpu loader decodes them and names any bad input
            for i, img in zip(todo, images):
                h, w = img.shape
                results[i] = (img, {"format": "jpeg", "shape": (h, w), "channels": channels[i], "bit_depth": 8,
                                    "decoder": "nvjpeg"})
        return [r if r is not None else self._cpu.decode_one(*items[i]) for i, r in enumerate(results)]
