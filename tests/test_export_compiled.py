"""AOTInductor packages: dynamic batch, parity with eager torch (CPU here; CUDA where a GPU exists)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from patchflannel.bundle import load_bundle, random_bundle
from patchflannel.errors import BackendUnavailableError, ConfigError
from patchflannel.export.compiled import export_compiled, load_compiled


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cuda_without_a_gpu_is_refused(tmp_path: Path) -> None:
    random_bundle(tmp_path, segmentation="fcdensenet56", learners=("squeezenet1_1",))
    with pytest.raises(BackendUnavailableError, match="'cuda' requested but CUDA is not available"):
        export_compiled(tmp_path, device="cuda")
    with pytest.raises(ConfigError, match="unknown device 'banana'"):
        export_compiled(tmp_path, device="banana")


@pytest.mark.slow
def test_cpu_package_of_the_ensemble_runs_any_batch(tmp_path: Path) -> None:
    random_bundle(tmp_path, segmentation="fcdensenet56", learners=("squeezenet1_1", "squeezenet1_1"))
    b = export_compiled(tmp_path, models=["ensemble"])
    f = b.ensemble.file("torch_export")
    assert f.path.endswith(".cpu.fp32.pt2") and f.extra["parity"]["passed"]
    assert load_bundle(tmp_path).ensemble.file("torch_export").sha256 == f.sha256
    package = load_compiled(b.path_of(f))
    x = torch.softmax(torch.randn(9, 2, 4), -1)
    from patchflannel.bundle import load_torch_model

    with torch.no_grad():
        for batch in (1, 9):
            assert torch.allclose(package(x[:batch]), load_torch_model(b, b.ensemble)(x[:batch]), atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_fp16_package_of_a_learner_matches_torch(tmp_path: Path) -> None:
    random_bundle(tmp_path, segmentation="fcdensenet56", learners=("resnet18",))
    b = export_compiled(tmp_path, models=["resnet18_patch"], device="cuda", precision="fp16")
    assert b.learners[0].file("torch_export", "fp16").extra["parity"]["passed"]
