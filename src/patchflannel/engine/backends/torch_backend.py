"""The ``torch`` backend: an ``nn.Module`` in eval/inference mode, cast to the chosen precision."""

from __future__ import annotations

import copy
import threading
import time

import torch
from torch import nn
from torch.fx.experimental.optimization import fuse

from patchflannel.engine.backends import DTYPES

_COMPILE_LOCK = threading.Lock()
"""Compiling is not thread-safe: first calls at a new shape (which compile) run one at a time, process-wide."""


class TorchBackend:
    """Runs ``module`` on ``device`` in ``precision`` (channels_last on 4-D inputs).

    BatchNorm layers that follow a convolution are folded into it first, on a copy (:func:`fold_batchnorm`).
    With ``compile=True`` the module goes through ``torch.compile`` with frozen weights (static shapes: each
    new input shape compiles once, its wall time added to ``compile_seconds``); when compiling fails the
    backend falls back to eager and keeps the reason in ``compile_error``.
    """

    name = "torch"

    def __init__(self, module: nn.Module, device: torch.device, precision: str = "fp32", *, compile: bool = False) -> None:
        self.device = torch.device(device)
        self.precision = precision
        self.dtype = DTYPES[precision]
        self.module, self.folded_batchnorms = fold_batchnorm(module)
        self.module = self.module.to(device=self.device, dtype=self.dtype, memory_format=torch.channels_last)
        self.compile_error: str | None = None
        self.compile_seconds = 0.0
        self._compiled: nn.Module | None = None
        self.compiled_shapes: set[tuple[int, ...]] = set()
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
                    return self._run_compiled(x)
                except Exception as exc:  # noqa: BLE001 - any compiler failure falls back to eager
                    self.compile_error = f"{type(exc).__name__}: {exc}"[:500]
                    self._compiled = None
            return self.module(x).float()

    def _run_compiled(self, x: torch.Tensor) -> torch.Tensor:
        shape = tuple(x.shape)
        if shape in self.compiled_shapes:
            return self._compiled(x).float()
        with _COMPILE_LOCK:
            start = time.perf_counter()
            out = self._compiled(x).float()
            self.compile_seconds += time.perf_counter() - start
            self.compiled_shapes.add(shape)
        return out


def fold_batchnorm(module: nn.Module) -> tuple[nn.Module, int]:
    """An eval-mode copy of ``module`` with every conv -> BatchNorm pair folded into one conv, and their number.

    torch.fx's ``fuse`` on the whole module, or, where a module's forward cannot be traced (control flow on
    shapes or flags), on each of its children in turn. Same outputs up to float rounding, one memory-bound
    layer fewer per pair (1.3-2.5x faster on a CPU for the small learners).
    """
    before = _batchnorms(module)
    folded = _fold(copy.deepcopy(module).eval())
    return folded, before - _batchnorms(folded)


def _fold(module: nn.Module) -> nn.Module:
    bns = _batchnorms(module)
    if bns == 0 or next(module.children(), None) is None:
        return module
    try:
        fused = fuse(module, inplace=True)
    except Exception:  # noqa: BLE001 - torch.fx cannot trace this forward: fold inside its children
        for name, child in module.named_children():
            setattr(module, name, _fold(child))
        return module
    return fused if _batchnorms(fused) < bns else module  # nothing to fold: keep the module as it was


def _batchnorms(module: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())
