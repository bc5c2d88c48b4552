"""The ``torch`` backend: an ``nn.Module`` in eval/inference mode, cast to the chosen precision."""

from __future__ import annotations

import torch
from torch import nn

from patchflannel.engine.backends import DTYPES


class TorchBackend:
    """Runs ``module`` on ``device`` in ``precision`` (channels_last on 4-D inputs).

    With ``compile=True`` the module goes through ``torch.compile`` with frozen weights; when compiling fails
    (at the first call) the backend falls back to eager and keeps the reason in ``compile_error``.
    """

    name = "torch"

    def __init__(self, module: nn.Module, device: torch.device, precision: str = "fp32", *, compile: bool = False) -> None:
        self.device = torch.device(device)
        self.precision = precision
        self.dtype = DTYPES[precision]
        self.module = module.eval().to(device=self.device, dtype=self.dtype, memory_format=torch.channels_last)
        self.compile_error: str | None = None
        self._compiled: nn.Module | None = None
        if compile:
            import torch._inductor.config as inductor_config

            inductor_config.freezing = True
            self._compiled = torch.compile(self.module, dynamic=False)

    @property
    def compiled(self) -> bool:
        """Whether calls go through the compiled module."""
        return self._compiled is not None

    def run(self, batch: torch.Tensor) -> torch.Tensor:
        """Float32 outputs for a float (N, C, H, W) batch on the device."""
        x = batch.to(device=self.device, dtype=self.dtype).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            if self._compiled is not None:
                try:
                    return self._compiled(x).float()
                except Exception as exc:  # noqa: BLE001 - any compiler failure falls back to eager
                    self.compile_error = f"{type(exc).__name__}: {exc}"[:500]
                    self._compiled = None
            return self.module(x).float()
