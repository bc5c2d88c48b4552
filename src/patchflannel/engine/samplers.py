"""Patch-centre samplers: (B, H, W) bool masks and (B, K) uniforms -> (B, K, 2) centres, on the masks' device.

``torch`` is :func:`patchflannel.ops.sampler.centres_from_uniforms`; ``cupy`` is the CuPy twin
:func:`patchflannel.ops.sampler_cupy.centres_from_uniforms_cupy`, reached through DLPack (no copy). Both map
uniforms to lung pixels with the same integer arithmetic, so they give identical centres.
"""

from __future__ import annotations

import importlib.util
from typing import Protocol

import torch

from patchflannel.errors import BackendUnavailableError, ConfigError
from patchflannel.ops.sampler import centres_from_uniforms

SAMPLERS = ("torch", "cupy")


class Sampler(Protocol):
    """Maps uniforms to lung-pixel centres."""

    name: str

    def centres(self, masks: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor: ...


class TorchSampler:
    """The reference sampler (any device)."""

    name = "torch"

    def centres(self, masks: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
        """(B, K, 2) int64 (row, col) centres."""
        return centres_from_uniforms(masks, uniforms)


class CupySampler:
    """The CuPy sampler for CUDA tensors."""

    name = "cupy"

    def __init__(self) -> None:
        if importlib.util.find_spec("cupy") is None:
            raise BackendUnavailableError("the cupy sampler needs CuPy (pip install 'patchflannel[gpu]')")

    def centres(self, masks: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
        """(B, K, 2) int64 (row, col) centres, computed by CuPy on the masks' CUDA device, on torch's current
        stream (CuPy's own default would be the legacy default stream, which may be busy with other work)."""
        import cupy

        from patchflannel.ops.sampler_cupy import centres_from_uniforms_cupy

        if masks.device.type != "cuda":
            raise BackendUnavailableError("the cupy sampler needs masks on a CUDA device")
        u = uniforms.to(device=masks.device, dtype=torch.float64)
        index = masks.device.index if masks.device.index is not None else torch.cuda.current_device()
        stream = torch.cuda.current_stream(masks.device).cuda_stream
        with cupy.cuda.Device(index), cupy.cuda.ExternalStream(stream, index):
            out = centres_from_uniforms_cupy(cupy.from_dlpack(masks.contiguous()), cupy.from_dlpack(u))
            return torch.from_dlpack(out).clone()  # in torch's memory: record_stream then covers it


def make_sampler(name: str, device: torch.device) -> Sampler:
    """The sampler ``name`` ('auto': CuPy on CUDA when installed, else torch)."""
    if name == "auto":
        name = "cupy" if device.type == "cuda" and importlib.util.find_spec("cupy") is not None else "torch"
    if name == "torch":
        return TorchSampler()
    if name == "cupy":
        if device.type != "cuda":
            raise BackendUnavailableError("the cupy sampler needs a CUDA device (use sampler='torch')")
        return CupySampler()
    raise ConfigError(f"unknown sampler {name!r}; expected auto, {', '.join(SAMPLERS)}")
