"""ONNX export of a bundle's networks, each checked with ``onnx.checker`` and against torch with ONNX Runtime.

Every network gets a dynamic batch axis (one call carries the K patches of an image, or of several). The
parity check runs torch and ONNX Runtime on reference inputs made the way the engine makes them, from real
images when the shared data is present (segmentation inputs from the lung-segmentation set, patches cut from
the 4-class set with this package's preprocessing and sampler), else from synthetic ones (recorded as such).
The result (max abs difference, the tolerance it was held to, label agreement) goes into bundle.json under
the file's ``extra.parity``; the inputs and torch outputs are saved beside the model as ``.npz`` so that other
runtimes (TensorRT through Polygraphy, for one) can be checked against them later.

The legacy TorchScript exporter (``dynamo=False``) is used: with torch 2.14 it exports every architecture of
the registry with the same numerics as the dynamo exporter and several times faster.
"""

from __future__ import annotations

import contextlib
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from patchflannel.bundle import (
    Bundle,
    ModelEntry,
    StagedFiles,
    add_file,
    io_signature,
    is_default_bundle,
    library_versions,
    load_bundle,
    load_torch_model,
    random_bundle,
    role_of,
    write_bundle,
)
from patchflannel.data.manifest import read_csv
from patchflannel.data.shared import shared_data_dir

# The parity check runs each file as the engine will, through its backend.
from patchflannel.engine.backends.onnxruntime_backend import OnnxRuntimeBackend
from patchflannel.errors import BundleError, ConfigError
from patchflannel.io.files import copy_contents, first_missing, made_folders_removed_on_failure, remove_written
from patchflannel.ops.preprocess import normalize

OPSET = 17
"""Default opset: run by ONNX Runtime >= 1.14 and parsed by TensorRT 8.6, 10 and 11."""
OPSETS = (13, 20)
"""The opsets export takes: 13 and up export every network here; 20 is the TorchScript exporter's last."""
RTOL = 1e-3
ATOL = 1e-4
TOLERANCES = {"fp32": (RTOL, ATOL), "fp16": (5e-2, 1e-2)}
"""(rtol, atol) of the parity check by precision of the exported network (ONNX, AOTInductor, TensorRT): in fp16 the
shipped bundle's shufflenet differs from torch fp32 by 0.026 on real images with logits up to 1.05."""


def parity_data_dir(path: str | Path | None = None) -> Path | None:
    """The real-data folder of the parity check: ``path`` if given (ConfigError unless it holds ``lungseg/``
    and ``cxr4/``), else :func:`~patchflannel.data.shared.shared_data_dir`; None if absent."""
    if path is not None:
        if not all((Path(path) / sub).is_dir() for sub in ("lungseg", "cxr4")):
            raise ConfigError(f"{path}: not a data folder with lungseg/ and cxr4/ (the parity check's real images)")
        return Path(path)
    return shared_data_dir()


def _manifest_paths(folder: Path, column: str, n: int, by: str | None = None) -> list[Path]:
    """The first ``n`` paths of ``column`` in folder/manifest.csv, one per distinct ``by`` value first."""
    columns, records = read_csv(folder / "manifest.csv")
    rows = [dict(zip(columns, record)) for _, record in records]
    if by is not None:
        firsts: dict[str, dict[str, str]] = {}
        for r in rows:
            firsts.setdefault(r[by], r)
        rows = list(firsts.values()) + rows
    seen: list[Path] = []
    for r in rows:
        p = folder / r[column]
        if p not in seen:
            seen.append(p)
        if len(seen) == n:
            break
    return seen


def _read(paths: list[Path]) -> list[torch.Tensor]:
    from patchflannel.io import read_image

    return [torch.from_numpy(read_image(p)) for p in paths]


def _seg_inputs(images: list[torch.Tensor], preprocessing: dict[str, Any]) -> torch.Tensor:
    from patchflannel.ops.preprocess import segmentation_inputs

    seg = preprocessing["segmentation"]
    return segmentation_inputs(images, seg["size"], seg["gamma"])


def _patch_inputs(bundle: Bundle, images: list[torch.Tensor], k: int) -> torch.Tensor:
    """K patches of each image, cut the engine's way: segment, post-process the mask, sample, mask, normalise."""
    from patchflannel.ops.mask import lung_masks, postprocess_masks
    from patchflannel.ops.preprocess import learner_image, resize_mask
    from patchflannel.ops.sampler import draw_patches

    pre = bundle.preprocessing
    size = pre["image_size"]
    with torch.no_grad():
        logits = load_torch_model(bundle, bundle.segmentation)(_seg_inputs(images, pre))
    masks = torch.from_numpy(postprocess_masks(lung_masks(logits, pre["segmentation"]["threshold"])))
    full = torch.stack([learner_image(im, size) for im in images])
    drawn = draw_patches(full, resize_mask(masks, size), seeds=list(range(len(images))), k=k,
                         patch=pre["patch_size"], min_fraction=pre["min_lung_fraction"])
    return normalize(drawn["patches"].flatten(0, 1), pre)


def _global_inputs(images: list[torch.Tensor], preprocessing: dict[str, Any]) -> torch.Tensor:
    from patchflannel.ops.preprocess import global_view

    g = preprocessing["global"]
    return normalize(torch.stack([global_view(im, g["resize"], g["crop"]) for im in images]), preprocessing)


def _vote_fractions(n: int, n_learners: int, n_classes: int, k: int, seed: int = 0) -> torch.Tensor:
    """(n, n_learners, n_classes) vote fractions: K votes drawn from a random class distribution each."""
    g = torch.Generator().manual_seed(seed)
    probs = torch.distributions.Dirichlet(torch.full((n_classes,), 0.5)).sample((n * n_learners,))
    votes = torch.multinomial(probs, k, replacement=True, generator=g)
    counts = torch.nn.functional.one_hot(votes, n_classes).sum(1).float()
    return (counts / k).reshape(n, n_learners, n_classes)


def reference_inputs(bundle: Bundle, entry: ModelEntry, data_dir: Path | None, *, n_images: int = 3,
                     k: int = 2) -> tuple[torch.Tensor, str]:
    """Inputs for ``entry``'s parity check and a note saying where they came from.

    Real images when ``data_dir`` holds ``lungseg/`` and ``cxr4/``: ``n_images`` segmentation inputs, or ``k``
    patches of each of ``n_images`` images (one image per class first), or their global crops; the ensemble
    gets vote fractions. Synthetic inputs of the same shapes otherwise.
    """
    role = role_of(bundle, entry)
    pre = bundle.preprocessing
    torch.manual_seed(0)
    if role == "ensemble":
        n_learners = int(entry.arch_config.get("n_learners", len(bundle.learners)))
        return _vote_fractions(4 * n_images, n_learners, len(bundle.classes), pre["k"]), "vote fractions of K draws"
    real = data_dir is not None and (data_dir / "lungseg").is_dir() and (data_dir / "cxr4").is_dir()
    if role == "segmentation":
        if real:
            paths = _manifest_paths(data_dir / "lungseg", "image", n_images)
            return _seg_inputs(_read(paths), pre), "real: " + ", ".join(p.name for p in paths)
        size = pre["segmentation"]["size"]
        return torch.rand(n_images, 1, size, size), "synthetic (no real data found)"
    if real:
        paths = _manifest_paths(data_dir / "cxr4", "path", n_images, by="label")
        images = _read(paths)
        x = _patch_inputs(bundle, images, k) if role == "patch" else _global_inputs(images, pre)
        return x, "real: " + ", ".join(p.name for p in paths)
    size = pre["patch_size"] if role == "patch" else pre["global"]["crop"]
    n = n_images * k if role == "patch" else n_images
    return normalize(torch.rand(n, size, size), pre), "synthetic (no real data found)"


def labels_of(output: np.ndarray, role: str) -> np.ndarray:
    """What a network decides: the class argmax, or the lung pixels for segmentation logits."""
    return output > 0 if role == "segmentation" else output.argmax(-1)


def parity_report(reference: np.ndarray, output: np.ndarray, role: str, rtol: float = RTOL, atol: float = ATOL) -> dict[str, Any]:
    """Compare another runtime's ``output`` with torch's ``reference``; ``passed`` when of the same shape and
    within tolerance (``failure`` says why not).

    The tolerance is ``atol + rtol * max|reference|`` on the max abs difference (randomly initialised networks
    reach logits of 1e10, so the bound scales with the outputs); label agreement is recorded beside it.
    """
    if output.shape != reference.shape:
        return {"passed": False, "failure": f"output shape {output.shape} differs from torch's {reference.shape}",
                "rtol": rtol, "atol": atol}
    diff = float(np.abs(output.astype(np.float64) - reference.astype(np.float64)).max())
    scale = float(np.abs(reference).max())
    tolerance = atol + rtol * scale
    agreement = float((labels_of(output, role) == labels_of(reference, role)).mean())
    passed = bool(diff <= tolerance)
    return {"max_abs_diff": diff, "tolerance": tolerance, "rtol": rtol, "atol": atol, "output_scale": scale,
            "label_agreement": agreement, "passed": passed,
            **({} if passed else {"failure": f"max abs diff {diff:.3g} > tolerance {tolerance:.3g}"})}


class CastIO(nn.Module):
    """``module`` in ``dtype`` behind fp32 inputs and outputs (in fp16: the strongly typed graph TensorRT 11
    builds; the compiled export's reduced precision too)."""

    def __init__(self, module: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.module, self.dtype = module.to(dtype), dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x.to(self.dtype)).float()


def _onnx_path(entry: ModelEntry, precision: str) -> str:
    stem = Path(entry.file("torch").path).with_suffix("")
    return f"{stem}.onnx" if precision == "fp32" else f"{stem}.{precision}.onnx"


def export_module(module: nn.Module, example: torch.Tensor, path: Path, input_name: str, output_name: str,
                  opset: int = OPSET) -> None:
    """Export ``module`` (eval mode) to ONNX at ``path`` with a dynamic batch axis, then run onnx.checker."""
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    module.eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # TorchScript tracer warnings about shape-dependent branches
        torch.onnx.export(module, (example,), str(path), dynamo=False, opset_version=opset,
                          input_names=[input_name], output_names=[output_name],
                          dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}})
    onnx.checker.check_model(str(path), full_check=True)


@contextlib.contextmanager
def export_target(bundle: Bundle | str | Path | None, out: str | Path | None,
                  models: Sequence[str] | None) -> Iterator[tuple[Bundle, list[ModelEntry]]]:
    """The bundle an export writes into and the entries it exports: ``bundle`` itself, or a copy of it at
    ``out`` (a new or empty folder), which is removed again when the export fails. Unknown ``models`` are
    refused before anything is copied."""
    source = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
    select_models(source, models)
    if out is None or Path(out).resolve() == source.root.resolve():
        if is_default_bundle(source.root):
            raise BundleError("the default bundle is part of the installed package: export into a copy (--out DIR)")
        yield source, select_models(source, models)
        return
    out = Path(out)
    if source.root.resolve() in out.resolve().parents:
        raise BundleError(f"{out}: inside the bundle it would copy ({source.root}); choose a folder outside it")
    if (out / "bundle.json").exists():
        raise BundleError(f"{out}: already holds a bundle; choose an empty folder or export in place")
    if out.exists() and any(out.iterdir()):
        raise BundleError(f"{out}: not empty; choose a new or empty folder for the bundle's copy")
    made = first_missing(out)  # the topmost folder the copy makes (None: out exists)
    try:
        copy_contents(source.root, out)
        copy = load_bundle(out)
        yield copy, select_models(copy, models)
    except BaseException:
        remove_written(made or out, existed=made is None)  # nothing half-made is left behind, nor folders above
        raise


def select_models(bundle: Bundle, models: Sequence[str] | None) -> list[ModelEntry]:
    """The bundle's networks named in ``models`` (all of them when none is named); BundleError for an unknown name."""
    entries = bundle.models()
    if not models:
        return entries
    names = {m.name for m in entries}
    unknown = [m for m in models if m not in names]
    if unknown:
        raise BundleError(f"bundle {bundle.root} has no model(s) {', '.join(unknown)} (has: {', '.join(sorted(names))})")
    return [m for m in entries if m.name in models]


def export_onnx(bundle: Bundle | str | Path | None = None, out: str | Path | None = None, *,
                models: Sequence[str] | None = None, opset: int = OPSET, data_dir: str | Path | None = None,
                precision: str = "fp32", rtol: float | None = None, atol: float | None = None) -> Bundle:
    """Add an ONNX file for each network of ``bundle`` (None: the package default), parity-checked.

    Writes into ``out`` (a copy of the bundle) when given, else into the bundle itself; ``models`` limits the
    export to those entry names. ``precision="fp16"`` exports the network in half precision with fp32 inputs
    and outputs (for TensorRT 11). Raises BundleError when ONNX Runtime disagrees with the fp32 torch model
    beyond tolerance (default :data:`TOLERANCES`; bundle.json is left unchanged then). Returns the reloaded,
    verified bundle.
    """
    if precision not in TOLERANCES:
        raise ConfigError(f"precision must be one of {', '.join(TOLERANCES)}, got {precision!r}")
    if isinstance(opset, bool) or not isinstance(opset, int) or not OPSETS[0] <= opset <= OPSETS[1]:
        raise ConfigError(f"--opset must be from {OPSETS[0]} to {OPSETS[1]} (torch's TorchScript exporter; "
                          f"{OPSET} by default), got {opset!r}")
    rtol = TOLERANCES[precision][0] if rtol is None else rtol
    atol = TOLERANCES[precision][1] if atol is None else atol
    data = parity_data_dir(data_dir)
    with export_target(bundle, out, models) as (b, entries):
        _export_entries(b, entries, data, opset, precision, rtol, atol)
    return load_bundle(b.root)


def export_random_onnx(out: str | Path, learners: Sequence[str], *, segmentation: str = "fcdensenet56",
                       name: str = "random", **options: Any) -> Bundle:
    """A bundle of random-weight networks (``segmentation``, ``learners``, an ensemble) exported to ONNX into the
    new folder ``out`` (``options`` as for :func:`export_onnx`): made beside ``out``, then exported into it as any
    bundle is. A failure leaves neither ``out`` nor the folders made above it."""
    from patchflannel.models.registry import model_family

    for arch in (segmentation, *learners):
        model_family(arch)  # an unknown name is refused before any folder is made
    out = Path(out)
    with made_folders_removed_on_failure(out.parent):
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=".random-bundle-", ignore_cleanup_errors=True) as tmp:
            source = random_bundle(tmp, segmentation=segmentation, learners=tuple(learners), name=name)
            return export_onnx(source, out, **options)


def _export_entries(b: Bundle, entries: list[ModelEntry], data: Path | None, opset: int, precision: str,
                    rtol: float, atol: float) -> None:
    failures, done = [], []
    with StagedFiles(b.root) as stage:
        for entry in entries:
            role = role_of(b, entry)
            sig = io_signature(role, b.preprocessing, int(entry.arch_config.get("n_learners", len(b.learners))))
            in_name, out_name = sig["inputs"][0]["name"], sig["outputs"][0]["name"]
            module = load_torch_model(b, entry)
            x, source = reference_inputs(b, entry, data)
            rel = _onnx_path(entry, precision)
            with torch.no_grad():
                ref = module(x).numpy()
            path = stage.path(rel)
            typed = CastIO(module, torch.float16) if precision == "fp16" else module
            export_module(typed, x[:2], path, in_name, out_name, opset)
            got = OnnxRuntimeBackend(path, torch.device("cpu")).run(x).numpy()
            report = {**parity_report(ref, got, role, rtol, atol), "inputs": source, "batch": int(x.shape[0]),
                      "runtime": "onnxruntime CPUExecutionProvider"}
            if not report["passed"]:
                failures.append(f"{rel}: {report['failure']}")
            ref_rel = str(Path(_onnx_path(entry, "fp32")).with_suffix(".parity.npz"))
            np.savez_compressed(stage.path(ref_rel), **{in_name: x.numpy(), out_name: ref})
            done.append((entry, sig, rel, ref_rel, report))
        if failures:
            raise BundleError("ONNX Runtime does not reproduce torch (the bundle is left as it was):\n  "
                              + "\n  ".join(failures))
        stage.commit()
    for entry, sig, rel, ref_rel, report in done:
        new = add_file(b.root, rel, "onnx", precision, opset=opset, exporter="torch.onnx (TorchScript, dynamo=False)",
                       parity=report, reference=ref_rel)
        entry.files = [f for f in entry.files if not (f.format == "onnx" and f.precision == precision)] + [new]
        entry.inputs, entry.outputs = sig["inputs"], sig["outputs"]
    b.versions.update(library_versions())
    write_bundle(b)
