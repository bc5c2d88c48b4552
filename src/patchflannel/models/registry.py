"""A registry of architectures by name (``get_model(name, **cfg)``), as torchvision and timm do.

Families: ``segmentation`` (lung masks), ``classifier`` (4-class base learners), ``ensemble``.
Builders register themselves when their module is imported; :func:`get_model` imports them all.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Callable

from torch import nn

from patchflannel.errors import ConfigError

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
    """Build the registered architecture ``name`` with its options (random weights); ConfigError for an
    unknown name or options its builder does not take."""
    _load_builders()
    if name not in _REGISTRY:
        raise ConfigError(f"unknown model {name!r}; registered: {', '.join(sorted(_REGISTRY))}")
    builder = _REGISTRY[name][1]
    try:
        inspect.signature(builder).bind(**cfg)
    except TypeError as exc:
        raise ConfigError(f"model {name!r} does not take these options ({', '.join(cfg)}): {exc}") from None
    return builder(**cfg)


def list_models(family: str | None = None) -> list[str]:
    """Registered names, optionally of one family, sorted."""
    _load_builders()
    return sorted(n for n, (f, _) in _REGISTRY.items() if family is None or f == family)


def model_family(name: str) -> str:
    """The family a registered name belongs to."""
    _load_builders()
    if name not in _REGISTRY:
        raise ConfigError(f"unknown model {name!r}; registered: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name][0]
