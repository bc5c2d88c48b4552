"""CUDA stream helpers of the engine: events, stream contexts and device -> host copies that do not wait.

On a CPU each is a no-op: no event, no stream, tensors already on the host.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, ContextManager

import torch


@dataclass
class HostCopy:
    """Tensors on their way from the device to host memory; :meth:`wait` returns them once they are there."""

    tensors: tuple[torch.Tensor, ...]
    done: torch.cuda.Event | None

    def wait(self) -> tuple[torch.Tensor, ...]:
        """The host tensors, once their copy from the device has finished."""
        if self.done is not None:
            self.done.synchronize()
        return self.tensors


def to_host(*tensors: torch.Tensor) -> HostCopy:
    """Start copying ``tensors`` into pinned host memory without waiting (on a CPU they are already there)."""
    cuda = [t for t in tensors if t.is_cuda]
    host = tuple(torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True) if t.is_cuda
                 else t for t in tensors)
    return HostCopy(host, record_event(cuda[0].device) if cuda else None)


def record_event(device: torch.device) -> torch.cuda.Event | None:
    """An event recorded on ``device``'s current stream (None on a CPU)."""
    if device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    return event


def on_stream(stream: torch.cuda.Stream | None) -> ContextManager[Any]:
    """Run on ``stream`` (None: stay on the current one, as on a CPU)."""
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
