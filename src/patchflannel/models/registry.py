"""A registry of architectures by name (``get_model(name, **cfg)``), as torchvision and timm do.

Families: ``segmentation`` (lung masks), ``classifier`` (4-class base learners), ``ensemble``.
Builders register themselves when their module is imported; :func:`get_model` imports them all.
"""

from __future__ import annotations

import importlib
from typing import Callable

from torch import nn

FAMILIES = ("segmentation", "classifier", "ensemble")
_BUILDER_MODULES = ("fcdensenet", "classifiers", "ensemble")
_REGISTRY: dict[str, tuple[str, Callable[..., nn.Module]]] = {}


def register_model(family: str, name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering ``builder(**cfg) -> nn.Module`` under ``name`` in ``family``."""
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; expected one of {FAMILIES}")

    def wrap(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        _REGISTRY[name] = (family, builder)
        return builder

    return wrap


def _load_builders() -> None:
    for module in _BUILDER_MODULES:
        importlib.import_module(f"patchflannel.models.{module}")


def get_model(name: str, **cfg: object) -> nn.Module:
    """Build the registered architecture ``name`` with its options (random weights)."""
    _load_builders()
    if name not in _REGISTRY:
        raise KeyError(f"unknown model {name!r}; registered: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name][1](**cfg)


def list_models(family: str | None = None) -> list[str]:
    """Registered names, optionally of one family, sorted."""
    _load_builders()
    return sorted(n for n, (f, _) in _REGISTRY.items() if family is None or f == family)


def model_family(name: str) -> str:
    """The family a registered name belongs to."""
    _load_builders()
    if name not in _REGISTRY:
        raise KeyError(f"unknown model {name!r}")
    return _REGISTRY[name][0]
