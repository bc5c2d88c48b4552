"""TensorRT engines from a bundle's ONNX files (not exercised in the CPU-only development environment).

Written against NVIDIA's documented Python API (see docs/export.md for the pages): ``trt.Builder``,
``create_network``, ``trt.OnnxParser.parse_from_file``, one optimisation profile whose batch range is
1..max (opt = K for the learners), ``build_serialized_network``. FP16: on TensorRT 10 the builder flag
``BuilderFlag.FP16`` on the fp32 ONNX; on TensorRT 11, which removed the precision flags (every network is
strongly typed), the fp16 ONNX that :func:`patchflannel.export.onnx.export_onnx` writes with
``precision="fp16"`` (fp16 inside, fp32 inputs and outputs), parsed into a network created with
``NetworkDefinitionCreationFlag.STRONGLY_TYPED``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from patchflannel.bundle import (
    Bundle,
    ModelEntry,
    StagedFiles,
    add_file,
    is_default_bundle,
    library_versions,
    load_bundle,
    role_of,
    write_bundle,
)
from patchflannel.engine.backends.tensorrt_backend import TensorRTBackend, import_tensorrt
from patchflannel.errors import BackendUnavailableError, BundleError, ConfigError

WORKSPACE_BYTES = 4 << 30


def learner_k_max(k_max: int | None, k: int) -> int:
    """A patch learner's batch limit (``--k-max``): 4 K by default; refused below an image's K patches, which a
    learner takes in one call."""
    k_max = 4 * k if k_max is None else k_max
    if k_max < k:
        raise ConfigError(f"--k-max {k_max} is below the bundle's K={k}: each learner takes an image's K patches in "
                          "one call")
    return k_max


def _tensorrt() -> Any:
    """The ``tensorrt`` module where a CUDA device is visible too (building and checking engines needs one)."""
    trt = import_tensorrt()
    import torch

    if not torch.cuda.is_available():
        raise BackendUnavailableError("TensorRT engines need a CUDA device; none is visible")
    return trt


def trt_major(trt: Any) -> int:
    """The TensorRT major version."""
    return int(trt.__version__.split(".")[0])


def _batch_range(bundle: Bundle, entry: ModelEntry, k_max: int, k_opt: int, max_images: int) -> tuple[int, int, int]:
    if role_of(bundle, entry) == "patch":
        return 1, k_opt, k_max
    return 1, min(4, max_images), max_images


def build_engine(onnx_path: Path, plan_path: Path, input_name: str, shape: Sequence[int], batch: tuple[int, int, int],
                 fp16: bool, workspace: int = WORKSPACE_BYTES) -> None:
    """Parse ``onnx_path`` and write a serialised engine with one profile over ``batch`` (min, opt, max)."""
    trt = _tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    strongly_typed = fp16 and trt_major(trt) >= 11
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BundleError(f"{onnx_path}: TensorRT cannot parse it: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)
    if fp16 and not strongly_typed:
        config.set_flag(trt.BuilderFlag.FP16)
    elif not fp16 and hasattr(trt.BuilderFlag, "TF32"):  # on by default: fp32 engines compute in fp32
        config.clear_flag(trt.BuilderFlag.TF32)
    profile = builder.create_optimization_profile()
    profile.set_shape(input_name, *[(b, *shape) for b in batch])
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BundleError(f"{onnx_path}: TensorRT failed to build an engine (see its log above)")
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    plan_path.write_bytes(bytes(serialized))


def build_engines(bundle: Bundle | str | Path | None, *, k_max: int | None = None, k_opt: int | None = None,
                  max_images: int = 16, fp16: bool = True, models: Sequence[str] | None = None) -> Bundle:
    """Build a TensorRT engine for each network of ``bundle`` from its ONNX files and record it in bundle.json.

    Learners get the profile batch 1..``k_max`` (default 4 K), opt ``k_opt`` (default K); segmentation and
    the ensemble 1..``max_images``. Each engine is checked against the ONNX export's saved reference outputs
    and the result recorded (``extra.parity``). Raises BackendUnavailableError without TensorRT or a GPU.
    """
    from patchflannel.export.onnx import TOLERANCES, parity_report, select_models

    b = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
    if is_default_bundle(b.root):
        raise BundleError("the default bundle is part of the installed package and has no ONNX files: export "
                          "a copy with `patchflannel export onnx --out DIR`, then build its engines")
    k = int(b.preprocessing["k"])
    k_opt = k if k_opt is None else k_opt
    k_max = learner_k_max(k_max, k)
    if not 1 <= k_opt <= k_max or max_images < 1:
        raise ConfigError(f"need 1 <= --k-opt <= --k-max and max_images >= 1 (got --k-opt {k_opt}, --k-max {k_max}, "
                          f"max_images {max_images})")
    entries = select_models(b, models)
    trt = _tensorrt()
    import torch

    precision = "fp16" if fp16 else "fp32"
    onnx_precision = "fp16" if fp16 and trt_major(trt) >= 11 else "fp32"
    missing = [m.name for m in entries if not any(f.format == "onnx" and f.precision == onnx_precision for f in m.files)]
    if missing:
        why = " (TensorRT 11 builds fp16 engines from fp16 ONNX files)" if onnx_precision == "fp16" else ""
        raise BundleError(f"{b.root}: no {onnx_precision} ONNX file for {', '.join(missing)}{why}; make them with "
                          f"`patchflannel export onnx {b.root} --precision {onnx_precision}`")
    done = []
    with StagedFiles(b.root) as stage:
        for entry in entries:
            src = entry.file("onnx", onnx_precision)
            inp, out = entry.inputs[0], entry.outputs[0]
            batch = _batch_range(b, entry, k_max, k_opt, max_images)
            rel = str(Path(src.path).with_suffix("")).removesuffix(".fp16") + f".{precision}.plan"
            path = stage.path(rel)
            build_engine(b.path_of(src), path, inp["name"], inp["shape"][1:], batch, fp16)
            ref = np.load(b.root / src.extra["reference"])
            rows = batch[2]  # the reference inputs the profile takes
            try:  # checked as the engine runs it (one input, one output, on the current stream; .cpu() waits)
                x = torch.from_numpy(ref[inp["name"]][:rows])
                got = TensorRTBackend(path, torch.device("cuda")).run(x).cpu().numpy()
            except (RuntimeError, BundleError, ConfigError) as exc:
                raise BundleError(f"{rel}: TensorRT could not run the engine it has just built: {exc}; the bundle "
                                  "is left as it was") from exc
            report = {**parity_report(ref[out["name"]][:rows], got, role_of(b, entry), *TOLERANCES[precision]),
                      "runtime": f"TensorRT {trt.__version__}"}
            if not report["passed"]:
                raise BundleError(f"{rel}: TensorRT output differs from torch: {report['failure']}; "
                                  "the bundle is left as it was")
            done.append((entry, src, inp, batch, rel, report))
        stage.commit()
    for entry, src, inp, batch, rel, report in done:
        new = add_file(b.root, rel, "tensorrt", precision=precision, trt_version=trt.__version__,
                       device=torch.cuda.get_device_name(), onnx=src.path,
                       profile={inp["name"]: {"min": batch[0], "opt": batch[1], "max": batch[2]}}, parity=report)
        entry.files = [f for f in entry.files if not (f.format == "tensorrt" and f.precision == precision)] + [new]
    b.versions.update(library_versions())
    write_bundle(b)
    return load_bundle(b.root)
