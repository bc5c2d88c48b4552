"""The ``dali`` loader: NVIDIA DALI decodes batches of JPEG/PNG/TIFF bytes, on the GPU or on the CPU.

One pipeline definition serves both devices; only the decoder's placement differs (``mixed`` = GPU
decoding, ``cpu``). The pipeline decodes to 8-bit grey; resizing stays in :mod:`patchflannel.ops.preprocess`
(the one implementation of that stage), so the loaders differ only in their JPEG decoder.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from patchflannel.engine.loaders import DecodeResult, eight_bit_channels
from patchflannel.engine.loaders.cpu import CpuLoader
from patchflannel.errors import BackendUnavailableError
from patchflannel.io.readers import detect_format
from patchflannel.ops.preprocess import to_unit

DALI_FORMATS = ("jpeg", "png", "tiff")


def _dali() -> tuple[Any, Any, Any]:
    try:
        from nvidia.dali import fn, pipeline_def, types
    except ImportError as exc:
        raise BackendUnavailableError("the dali loader needs NVIDIA DALI (pip install 'patchflannel[dali]')") from exc
    return fn, pipeline_def, types


def build_pipeline(decoder_device: str, batch_size: int, device_id: int | None, num_threads: int = 2) -> Any:
    """A built DALI pipeline: external source of encoded bytes ``enc`` -> grey uint8 (H, W, 1) images.

    ``decoder_device`` is 'mixed' (GPU decoding, needs ``device_id``) or 'cpu' (``device_id=None`` works
    without a GPU).
    """
    fn, pipeline_def, types = _dali()

    @pipeline_def
    def decode_grey() -> Any:
        encoded = fn.external_source(name="enc", dtype=types.UINT8, batch=True)
        return fn.decoders.image(encoded, device=decoder_device, output_type=types.GRAY)

    pipe = decode_grey(batch_size=batch_size, num_threads=num_threads, device_id=device_id,
                       prefetch_queue_depth=1, exec_async=False, exec_pipelined=False)
    pipe.build()
    return pipe


class DaliLoader:
    """Batches 8-bit JPEG/PNG/TIFF through DALI; everything else (and any batch DALI fails on) via ``cpu``."""

    name = "dali"

    def __init__(self, device: torch.device, batch_size: int = 32, decoder_device: str | None = None) -> None:
        self.device = torch.device(device)
        self.decoder_device = decoder_device or ("mixed" if self.device.type == "cuda" else "cpu")
        self.batch_size = batch_size
        self._device_id = (self.device.index or 0) if self.decoder_device == "mixed" else None
        self._pipe = build_pipeline(self.decoder_device, batch_size, self._device_id)
        self._cpu = CpuLoader(self.device)

    def _run(self, datas: list[bytes]) -> list[torch.Tensor]:
        self._pipe.feed_input("enc", [np.frombuffer(d, dtype=np.uint8) for d in datas])
        (out,) = self._pipe.run()  # host-synchronous (the pipeline is neither async nor pipelined)
        images = [torch.from_dlpack(out[i])[..., 0] for i in range(len(out))]
        return [to_unit(img.to(self.device)) for img in images]  # levels to floats as the cpu loader maps them

    def decode(self, items: Sequence[tuple[str, bytes]]) -> list[DecodeResult]:
        """Each ``(label, data)`` in order; the error of a bad input is returned, not raised."""
        results: list[DecodeResult | None] = [None] * len(items)
        channels = {i: c for i, (_, data) in enumerate(items) if (c := eight_bit_channels(data, DALI_FORMATS))}
        todo = list(channels)
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start:start + self.batch_size]
            try:
                images = self._run([items[i][1] for i in chunk])
            except RuntimeError:
                # DALI invalidates a pipeline after a decoding error: rebuild it and let the cpu loader
                # decode this chunk, which names the bad input and the reason.
                self._pipe = build_pipeline(self.decoder_device, self.batch_size, self._device_id)
                continue
            for i, img in zip(chunk, images):
                h, w = img.shape
                results[i] = (img, {"format": detect_format(items[i][1]), "shape": (h, w), "channels": channels[i],
                                    "bit_depth": 8, "decoder": f"dali-{self.decoder_device}"})
        return [r if r is not None else self._cpu.decode_one(*items[i]) for i, r in enumerate(results)]
