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

__all__ = [
    "CLASSES",
    "NUM_CLASSES",
    "BackendUnavailableError",
    "BundleError",
    "ConfigError",
    "ImageReadError",
    "ManifestError",
    "PatchflannelError",
    "__version__",
]
