"""Compiled torch artifacts for GPUs without TensorRT: AOTInductor packages (``.pt2``) via torch.export.

Each network is captured with ``torch.export`` with a dynamic batch dimension and compiled ahead of time
by ``torch._inductor.aoti_compile_and_package`` for one device type (``cpu`` needs a C++ compiler, ``cuda``
a GPU); the package is checked against eager torch on the ONNX export's reference inputs and recorded in
bundle.json as format ``torch_export``. A package runs only with the torch version and device type it was
built for. AOTInductor has crashed while building large models on some GPUs (SPEC.md: resnet152 on an
H200), so the engine keeps eager fp16 and ``torch.compile`` as its fallback rather than relying on these.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from patchflannel.bundle import (
    Bundle,
    ModelEntry,
    StagedFiles,
    add_file,
    library_versions,
    load_bundle,
    load_torch_model,
    role_of,
    write_bundle,
)
from patchflannel.devices import resolve_device
from patchflannel.errors import BundleError, ConfigError
from patchflannel.export.onnx import TOLERANCES, CastIO, export_target, parity_data_dir, parity_report, reference_inputs

MAX_BATCH = 4096
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def compile_module(module: torch.nn.Module, example: torch.Tensor, path: Path, max_batch: int = MAX_BATCH) -> Path:
    """AOTInductor package of ``module`` at ``path`` for ``example``'s device, batch dimension dynamic."""
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    with torch.no_grad():
        program = torch.export.export(module.eval(), (example,), dynamic_shapes=({0: batch},))
        path.parent.mkdir(parents=True, exist_ok=True)
        return Path(torch._inductor.aoti_compile_and_package(program, package_path=str(path)))


def load_compiled(path: str | Path) -> Any:
    """Load an AOTInductor package; call it with a batch tensor on its device."""
    return torch._inductor.aoti_load_package(str(path))


def export_compiled(bundle: Bundle | str | Path | None = None, out: str | Path | None = None, *,
                    models: Sequence[str] | None = None, device: str = "cpu", precision: str = "fp32",
                    data_dir: str | Path | None = None, max_batch: int = MAX_BATCH) -> Bundle:
    """Add an AOTInductor package for each network of ``bundle`` (or of ``models``), parity-checked on ``device``.

    Raises BackendUnavailableError when ``device`` is not one this machine has, BundleError when the package
    does not reproduce eager torch (fp32) within the tolerance of ``precision``.
    """
    device = str(resolve_device(device))
    if precision not in DTYPES:
        raise ConfigError(f"precision must be one of {', '.join(DTYPES)}, got {precision!r}")
    rtol, atol = TOLERANCES[precision]
    data = parity_data_dir(data_dir)
    with export_target(bundle, out, models) as (b, entries):
        _compile_entries(b, entries, data, device, precision, rtol, atol, max_batch)
    return load_bundle(b.root)


def _compile_entries(b: Bundle, entries: list[ModelEntry], data: Path | None, device: str, precision: str,
                     rtol: float, atol: float, max_batch: int) -> None:
    kind = torch.device(device).type
    done = []
    with StagedFiles(b.root) as stage:
        for entry in entries:
            module = load_torch_model(b, entry)
            x, source = reference_inputs(b, entry, data)
            with torch.no_grad():
                ref = module(x).numpy()
            wrapped = CastIO(module, DTYPES[precision]).to(device)
            rel = str(Path(entry.file("torch").path).with_suffix("")) + f".{kind}.{precision}.pt2"
            path = stage.path(rel)
            compile_module(wrapped, x[:2].to(device), path, max_batch)
            with torch.no_grad():
                got = load_compiled(path)(x.to(device)).cpu().numpy()
            report = {**parity_report(ref, got, role_of(b, entry), rtol, atol), "inputs": source,
                      "batch": int(x.shape[0]), "runtime": f"AOTInductor on {device}"}
            if not report["passed"]:
                raise BundleError(f"{rel}: compiled output differs from eager torch: {report['failure']}; "
                                  "the bundle is left as it was")
            done.append((entry, rel, report))
        stage.commit()
    for entry, rel, report in done:
        new = add_file(b.root, rel, "torch_export", precision, device=kind, torch=torch.__version__,
                       batch={"min": 1, "max": max_batch}, parity=report)
        entry.files = [f for f in entry.files
                       if not (f.format == "torch_export" and f.precision == precision and f.extra.get("device") == kind)]
        entry.files.append(new)
    b.versions.update(library_versions())
    write_bundle(b)

