"""Backends: torch precisions, ONNX Runtime against torch, TensorRT where it exists."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
import torch

from patchflannel.bundle import random_bundle
from patchflannel.engine.backends import make_backend, resolve_backend, resolve_precision
from patchflannel.engine.backends.onnxruntime_backend import OnnxRuntimeBackend
from patchflannel.engine.backends.torch_backend import TorchBackend, fold_batchnorm
from patchflannel.errors import BackendUnavailableError, BundleError, ConfigError
from patchflannel.models import get_model, list_models

needs_trt_gpu = pytest.mark.skipif(
    importlib.util.find_spec("tensorrt") is None or not torch.cuda.is_available(),
    reason="the tensorrt backend needs TensorRT (extra 'tensorrt') and a CUDA device")


@pytest.fixture(scope="module")
def net() -> torch.nn.Module:
    torch.manual_seed(0)
    return get_model("shufflenet_v2_x0_5").eval()


@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    return torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(1))


def test_torch_backend_fp32_is_the_module_and_bf16_is_close(net, batch):
    with torch.inference_mode():
        want = net(batch)
    got = TorchBackend(net, torch.device("cpu"), "fp32").run(batch)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    twin = get_model("shufflenet_v2_x0_5").eval()
    twin.load_state_dict(net.state_dict())
    low = TorchBackend(twin, torch.device("cpu"), "bf16").run(batch)
    assert low.dtype == torch.float32
    assert (low.argmax(1) == want.argmax(1)).float().mean() >= 2 / 3
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    with pytest.raises(ConfigError, match="unknown precision"):
        resolve_precision("fp8", torch.device("cpu"))


@pytest.mark.parametrize("name", list_models("classifier") + list_models("segmentation"))
def test_batchnorm_folding_keeps_every_registered_network_s_outputs(name):
    torch.manual_seed(0)
    net = get_model(name).eval()
    norms = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for bn in norms:  # trained-looking statistics, so that folding has something to change
        bn.running_mean.uniform_(-0.2, 0.2), bn.running_var.uniform_(0.5, 2.0), bn.weight.data.uniform_(0.5, 1.5)
    channels, size = (1, 64) if name.startswith("fcdensenet") else (3, 96 if name != "inception_v3" else 299)
    x = torch.randn(2, channels, size, size, generator=torch.Generator().manual_seed(1))
    folded, n = fold_batchnorm(net)
    assert n == len(norms) - sum(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    if name in list_models("classifier") and norms:  # conv -> BatchNorm pairs (FC-DenseNet's come BN first)
        assert n > 0
    with torch.inference_mode():
        torch.testing.assert_close(folded(x), net(x), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
                    reason="torch.compile on a CPU needs a C++ compiler")
def test_compiled_torch_backend_agrees_with_eager(net, batch):
    """torch.compile (frozen weights) over the folded module; needs a C++ compiler on a CPU."""
    with torch.inference_mode():
        want = net(batch)
    backend = TorchBackend(net, torch.device("cpu"), "fp32", compile=True)
    got = backend.run(batch)
    assert backend.compiled, backend.compile_error
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_onnxruntime_backend_matches_torch(net, batch, tmp_path):
    from patchflannel.export.onnx import export_module

    path = tmp_path / "net.onnx"
    export_module(net, batch[:1], path, "patches", "logits")
    backend = OnnxRuntimeBackend(path, torch.device("cpu"))
    with torch.inference_mode():
        want = net(batch)
    torch.testing.assert_close(backend.run(batch), want, rtol=1e-4, atol=1e-4)
    assert backend.providers[0] == "CPUExecutionProvider"


def test_backend_choice_and_missing_files(tmp_path):
    bundle = random_bundle(tmp_path, segmentation="fcdensenet56", learners=("shufflenet_v2_x0_5",))
    cpu = torch.device("cpu")
    assert resolve_backend("auto", bundle, cpu) == "torch"
    with pytest.raises(ConfigError, match="unknown backend"):
        resolve_backend("tvm", bundle, cpu)
    with pytest.raises(BundleError, match=r"has no onnx file.*make one with `patchflannel export onnx BUNDLE --out DIR`"):
        make_backend("onnxruntime", bundle, bundle.learners[0], cpu, "fp32")
    with pytest.raises(BundleError, match=f"bundle {tmp_path} has no onnx file for segmentation, shufflenet_v2_x0_5_patch "
                                          r"\(backend onnxruntime runs them\): make them with `patchflannel export onnx"):
        resolve_backend("onnxruntime", bundle, cpu)  # before any network is loaded
    if importlib.util.find_spec("tensorrt") is None:
        with pytest.raises(BackendUnavailableError, match="tensorrt"):
            make_backend("tensorrt", bundle, bundle.learners[0], cpu, "fp16")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_torch_backend_fp16_on_gpu_is_close_to_fp32(net, batch):
    ref = TorchBackend(net, torch.device("cuda"), "fp32")  # each backend folds a copy: net is left as it is
    half = TorchBackend(net, torch.device("cuda"), "fp16")
    want, got = ref.run(batch.cuda()), half.run(batch.cuda())
    assert got.dtype == torch.float32 and got.device.type == "cuda"
    torch.testing.assert_close(got, want, rtol=5e-2, atol=5e-2)


@pytest.mark.gpu
@needs_trt_gpu
def test_tensorrt_backend_matches_torch(net, batch, tmp_path: Path):
    from patchflannel.engine.backends.tensorrt_backend import TensorRTBackend
    from patchflannel.export.onnx import export_module
    from patchflannel.export.tensorrt import build_engine

    export_module(net, batch[:1], tmp_path / "net.onnx", "patches", "logits")
    build_engine(tmp_path / "net.onnx", tmp_path / "net.plan", "patches", (3, 224, 224), (1, 3, 8), fp16=False)
    backend = TensorRTBackend(tmp_path / "net.plan", torch.device("cuda"), "fp32")
    with torch.inference_mode():
        want = net(batch)
    torch.testing.assert_close(backend.run(batch.cuda()).cpu(), want, rtol=1e-2, atol=1e-2)
