"""Inference backends: one network each, ``run(batch) -> output`` on the engine's device.

``torch`` (eager, fp32/fp16/bf16, channels_last, optionally ``torch.compile`` with frozen weights),
``onnxruntime`` (the bundle's ONNX files) and ``tensorrt`` (the bundle's serialised engines). The choice is
made here, in :func:`make_backend` / :func:`resolve_backend`.
"""

from __future__ import annotations

import importlib.util
from typing import Protocol

import torch

from patchflannel.bundle import PRECISIONS, Bundle, ModelEntry, export_hint
from patchflannel.errors import BackendUnavailableError, BundleError, ConfigError

BACKENDS = ("torch", "onnxruntime", "tensorrt")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class Backend(Protocol):
    """One network ready to run: a float32 (N, ...) batch on the device in, float32 outputs out.

    A backend whose calls have a largest batch (a TensorRT engine's profile) says so in ``max_batch``.
    """

    name: str
    precision: str

    def run(self, batch: torch.Tensor) -> torch.Tensor: ...


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' is fp16 on CUDA and fp32 elsewhere."""
    if precision == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; expected auto, {', '.join(PRECISIONS)}")
    return precision


def _has_file(entry: ModelEntry, fmt: str) -> bool:
    return any(f.format == fmt for f in entry.files)


def resolve_backend(name: str, bundle: Bundle, device: torch.device) -> str:
    """'auto' picks TensorRT on CUDA when installed and the segmenter and every learner have an engine file, else
    torch; a named backend that reads exported files needs its runtime (BackendUnavailableError) and a file for
    the segmenter and every learner (BundleError)."""
    if name == "auto":
        if (device.type == "cuda" and importlib.util.find_spec("tensorrt") is not None
                and all(_has_file(m, "tensorrt") for m in [bundle.segmentation, *bundle.learners])):
            return "tensorrt"
        return "torch"
    if name not in BACKENDS:
        raise ConfigError(f"unknown backend {name!r}; expected auto, {', '.join(BACKENDS)}")
    if name == "tensorrt":
        from patchflannel.engine.backends.tensorrt_backend import import_tensorrt

        import_tensorrt()  # a missing runtime is the first thing to say
    if name == "onnxruntime" and importlib.util.find_spec("onnxruntime") is None:
        from patchflannel.engine.backends.onnxruntime_backend import MISSING

        raise BackendUnavailableError(MISSING)
    fmt = {"onnxruntime": "onnx", "tensorrt": "tensorrt"}.get(name)
    missing = [m.name for m in (bundle.segmentation, *bundle.learners) if fmt and not _has_file(m, fmt)]
    if missing:
        raise BundleError(f"bundle {bundle.root} has no {fmt} file for {', '.join(missing)} (backend {name} runs "
                          f"them): make them with {export_hint(fmt)}")
    return name


def make_backend(name: str, bundle: Bundle, entry: ModelEntry, device: torch.device, precision: str,
                 compile: bool = False) -> Backend:
    """The backend ``name`` for the bundle's network ``entry``; its ``precision`` is the one it runs at (an
    exported file in ``precision`` where the bundle has one, else the fp32 file)."""
    if name == "torch":
        from patchflannel.bundle import load_torch_model
        from patchflannel.engine.backends.torch_backend import TorchBackend

        return TorchBackend(load_torch_model(bundle, entry), device, precision, compile=compile)
    if name == "onnxruntime":
        from patchflannel.engine.backends.onnxruntime_backend import OnnxRuntimeBackend

        f = _pick(entry, "onnx", precision)
        return OnnxRuntimeBackend(bundle.path_of(f), device, f.precision)
    if name == "tensorrt":
        from patchflannel.engine.backends.tensorrt_backend import TensorRTBackend, import_tensorrt

        import_tensorrt()  # a missing runtime is the first thing to say
        f = _pick(entry, "tensorrt", precision)
        return TensorRTBackend(bundle.path_of(f), device, f.precision)
    raise ConfigError(f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")


def _pick(entry: ModelEntry, fmt: str, precision: str):  # noqa: ANN202 - ModelFile
    """The file of ``fmt`` in ``precision``, else the fp32 one (the runtime casts at the boundary)."""
    try:
        return entry.file(fmt, precision)
    except BundleError:
        pass
    try:
        return entry.file(fmt)
    except BundleError as exc:  # fmt is also the export command's name
        raise BundleError(f"{exc}; make one with {export_hint(fmt)}") from None

