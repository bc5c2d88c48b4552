"""The model registry: every registered architecture builds and maps its input to the documented output."""

from __future__ import annotations

import pytest
import torch

from patchflannel.classes import NUM_CLASSES
from patchflannel.errors import ConfigError
from patchflannel.models import get_model, list_models, model_family, register_model
from patchflannel.models.classifiers import CPU_LEARNERS, FLANNEL_LEARNERS


def test_families_partition_the_registry() -> None:
    names = list_models()
    by_family = sorted(list_models("segmentation") + list_models("classifier") + list_models("ensemble"))
    assert names == by_family
    assert set(FLANNEL_LEARNERS) <= set(list_models("classifier"))
    assert set(CPU_LEARNERS) <= set(list_models("classifier"))
    assert model_family("fcdensenet103") == "segmentation"


@pytest.mark.parametrize("name", list_models("classifier"))
def test_classifier_outputs_four_logits(name: str) -> None:
    torch.manual_seed(0)
    model = get_model(name).eval()
    with torch.inference_mode():
        out = model(torch.rand(2, 3, 224, 224))
    assert out.shape == (2, NUM_CLASSES)
    assert torch.isfinite(out).all()


def test_inception_trains_with_auxiliary_head_on_224_patches() -> None:
    model = get_model("inception_v3").train()
    out = model(torch.rand(2, 3, 224, 224))
    assert out.logits.shape == (2, NUM_CLASSES) and out.aux_logits.shape == (2, NUM_CLASSES)


def test_unknown_and_duplicate_names_are_refused() -> None:
    with pytest.raises(ConfigError, match="unknown model 'nope'"):
        get_model("nope")
    with pytest.raises(ConfigError, match="model 'fcdensenet56' does not take these options \\(growth\\)"):
        get_model("fcdensenet56", growth=3)
    with pytest.raises(ValueError, match="registered twice"):
        register_model("classifier", "resnet18")(lambda: torch.nn.Identity())
    with pytest.raises(ValueError, match="unknown model family"):
        register_model("detector", "x")


def test_imagenet_weights_come_from_a_local_file_only(tmp_path) -> None:
    import torchvision

    reference = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18_imagenet.pth"
    torch.save(reference.state_dict(), path)
    model = get_model("resnet18", imagenet_weights=str(path))
    assert torch.equal(model.conv1.weight, reference.conv1.weight)
    assert model.fc.out_features == NUM_CLASSES
    from patchflannel.errors import ConfigError

    with pytest.raises(ConfigError, match="not found"):
        get_model("resnet18", imagenet_weights=str(tmp_path / "missing.pth"))
    with pytest.raises(ConfigError, match="resnet18_imagenet.pth: not a SqueezeNet state dict: keys 52 missing "
                                          "\\(e.g. features.0.weight, features.0.bias, features.3.squeeze.weight\\); "
                                          "\\d+ unexpected \\(e.g. conv1.weight"):  # another network's
        get_model("squeezenet1_1", imagenet_weights=str(path))
    (tmp_path / "notes.pth").write_text("not weights")
    with pytest.raises(ConfigError, match="notes.pth: cannot be read as torch weights"):
        get_model("resnet18", imagenet_weights=str(tmp_path / "notes.pth"))
    torch.save({"epoch": 3, "model": reference.state_dict()}, tmp_path / "checkpoint.pth")  # a training checkpoint
    with pytest.raises(ConfigError, match="checkpoint.pth: not a state dict \\(a mapping of parameter names to tensors"):
        get_model("resnet18", imagenet_weights=str(tmp_path / "checkpoint.pth"))
