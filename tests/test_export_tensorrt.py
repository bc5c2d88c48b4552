"""TensorRT engines: built and checked where TensorRT and a GPU exist; a clear refusal elsewhere."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from patchflannel.bundle import load_bundle, random_bundle
from patchflannel.errors import BackendUnavailableError, BundleError, ConfigError
from patchflannel.export.onnx import export_onnx

HAVE_TRT = importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available()


@pytest.mark.skipif(HAVE_TRT, reason="TensorRT and a GPU are present: the refusal path does not apply")
def test_missing_tensorrt_or_gpu_is_refused_clearly(tmp_path: Path) -> None:
    from patchflannel.export.tensorrt import build_engines

    random_bundle(tmp_path, segmentation="fcdensenet56", learners=("squeezenet1_1",))
    with pytest.raises(BackendUnavailableError, match="TensorRT is not installed|need a CUDA device"):
        build_engines(tmp_path)


def test_bundle_and_batch_range_are_checked_before_tensorrt_is_needed(tmp_path: Path) -> None:
    from patchflannel.export.tensorrt import build_engines

    with pytest.raises(BundleError, match="default bundle is part of the installed package"):
        build_engines(None)
    random_bundle(tmp_path, segmentation="fcdensenet56", learners=("squeezenet1_1",))
    with pytest.raises(ConfigError, match="--k-opt 200, --k-max 100"):
        build_engines(tmp_path, k_opt=200, k_max=100)
    with pytest.raises(ConfigError, match="--k-opt 0, --k-max"):  # not taken as "the default"
        build_engines(tmp_path, k_opt=0)
    k = int(load_bundle(tmp_path).preprocessing["k"])
    with pytest.raises(ConfigError, match=f"--k-max {k - 1} is below the bundle's K={k}"):
        build_engines(tmp_path, k_max=k - 1)
    with pytest.raises(BundleError, match="has no model.s. nothere"):
        build_engines(tmp_path, models=["nothere"])


@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_TRT, reason="needs the tensorrt package and a CUDA GPU (not available here)")
def test_a_missing_onnx_file_names_the_export_command(tmp_path: Path) -> None:
    import tensorrt as trt

    from patchflannel.export.tensorrt import build_engines, trt_major

    random_bundle(tmp_path, segmentation="fcdensenet56", learners=("resnet18",))
    needed = "fp16" if trt_major(trt) >= 11 else "fp32"
    with pytest.raises(BundleError, match=f"no {needed} ONNX file for segmentation, .*--precision {needed}"):
        build_engines(tmp_path)


@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_TRT, reason="needs the tensorrt package and a CUDA GPU (not available here)")
def test_engines_build_with_a_batch_profile_and_match_torch(tmp_path: Path) -> None:
    import tensorrt as trt

    from patchflannel.export.tensorrt import build_engines, trt_major

    random_bundle(tmp_path, segmentation="fcdensenet56", learners=("resnet18",))
    export_onnx(tmp_path)
    if trt_major(trt) >= 11:
        export_onnx(tmp_path, precision="fp16")
    b = build_engines(tmp_path, k_max=16, k_opt=8)
    for entry in b.models():
        f = entry.file("tensorrt", "fp16")
        assert f.extra["parity"]["passed"], (entry.name, f.extra["parity"])
        assert f.extra["trt_version"] == trt.__version__
    profile = b.learners[0].file("tensorrt").extra["profile"]["patches"]
    assert profile == {"min": 1, "opt": 8, "max": 16}
