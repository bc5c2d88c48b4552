"""The one reading of a device setting ('auto', 'cpu', 'cuda', 'cuda:N') for every command and API."""

from __future__ import annotations

import torch

from patchflannel.errors import BackendUnavailableError, ConfigError


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto`` is CUDA when present, else the CPU. ConfigError for a value that names no device,
    BackendUnavailableError for a CUDA device this machine does not have."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown device {device!r}: expected 'auto', 'cpu', 'cuda' or 'cuda:N'") from None
    if d.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {device!r} is not supported: expected 'auto', 'cpu', 'cuda' or 'cuda:N'")
    if d.type == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailableError(f"device {device!r} requested but CUDA is not available")
    if d.type == "cuda" and d.index is not None and d.index >= torch.cuda.device_count():
        raise BackendUnavailableError(
            f"device {device!r} requested but this machine has {torch.cuda.device_count()} CUDA device(s)")
    return d
