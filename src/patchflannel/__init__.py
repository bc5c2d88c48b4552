"""Patched FLANNEL: lung-centred patch classification of chest X-rays, GPU-batched."""

from patchflannel.classes import CLASSES, NUM_CLASSES
from patchflannel.errors import (
    BackendUnavailableError,
    BundleError,
    ConfigError,
    ImageReadError,
    ManifestError,
    PatchflannelError,
)

__version__ = "0.1.0"

_LAZY = {
    "Engine": "patchflannel.engine.engine",
    "Prediction": "patchflannel.engine.results",
    "load_bundle": "patchflannel.bundle",
}


def __getattr__(name: str) -> object:
    """Import the heavy entry points (torch and the engine) only when first used."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'patchflannel' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "CLASSES",
    "NUM_CLASSES",
    "BackendUnavailableError",
    "BundleError",
    "ConfigError",
    "Engine",
    "ImageReadError",
    "ManifestError",
    "PatchflannelError",
    "Prediction",
    "__version__",
    "load_bundle",
]
