"""Base learners: torchvision architectures with a 4-class head (SPEC.md stage 2 and the global baseline).

The five FLANNEL architectures and CPU-sized ones for recipes that train on 2 cores. ImageNet
initialisation only from a local torchvision weights file (``imagenet_weights=PATH``); nothing is
downloaded. Inception v3 keeps its auxiliary head for training (eval mode returns only the main logits)
and resizes its input to 299, the size its auxiliary head needs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
import torchvision.models as tvm
from torch import nn

from patchflannel.classes import NUM_CLASSES
from patchflannel.errors import ConfigError, first_line
from patchflannel.models.registry import register_model

FLANNEL_LEARNERS = ("densenet161", "inception_v3", "resnet152", "resnext101_32x8d", "vgg19_bn")
CPU_LEARNERS = ("mobilenet_v3_small", "shufflenet_v2_x0_5", "mnasnet0_5", "shufflenet_v2_x1_0", "regnet_x_400mf")


def _imagenet(model: nn.Module, path: str | Path | None) -> nn.Module:
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"ImageNet weights file not found: {p}")
        try:
            state = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - not a torch file, or one holding more than tensors
            raise ConfigError(f"ImageNet weights file {p}: cannot be read as torch weights ({first_line(exc)})") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ConfigError(f"ImageNet weights file {p}: not a state dict (a mapping of parameter names to tensors)")
        own = model.state_dict()
        problems = [f"{len(keys)} {what} (e.g. {', '.join(keys[:3])})" for what, keys in (
            ("missing", [k for k in own if k not in state]), ("unexpected", [k for k in state if k not in own]),
            ("of another shape", [k for k in own if k in state and state[k].shape != own[k].shape])) if keys]
        if problems:
            raise ConfigError(f"ImageNet weights file {p}: not a {type(model).__name__} state dict: keys "
                              f"{'; '.join(problems)}")
        model.load_state_dict(state)
    return model


def _replace_linear(model: nn.Module, attr: str, n: int) -> nn.Module:
    """Replace the Linear at dotted ``attr`` (``classifier.6``, ``fc``) by one with ``n`` outputs."""
    parent_name, _, child = attr.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child) if not child.isdigit() else parent[int(child)]
    new = nn.Linear(old.in_features, n)
    if child.isdigit():
        parent[int(child)] = new
    else:
        setattr(parent, child, new)
    return model


class InceptionPatch(nn.Module):
    """Inception v3 that resizes its input to 299 x 299 (bilinear) before the network."""

    def __init__(self, net: nn.Module, size: int = 299) -> None:
        super().__init__()
        self.net = net
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return self.net(x)


def _torchvision(name: str, head: str) -> Callable[..., nn.Module]:
    def build(num_classes: int = NUM_CLASSES, imagenet_weights: str | None = None) -> nn.Module:
        model = _imagenet(getattr(tvm, name)(weights=None), imagenet_weights)
        return _replace_linear(model, head, num_classes)

    build.__name__ = name
    build.__doc__ = f"torchvision {name} with a {NUM_CLASSES}-class head."
    return build


_HEADS = {
    "densenet161": "classifier",
    "resnet152": "fc",
    "resnext101_32x8d": "fc",
    "vgg19_bn": "classifier.6",
    "mobilenet_v3_small": "classifier.3",
    "shufflenet_v2_x0_5": "fc",
    "shufflenet_v2_x1_0": "fc",
    "regnet_x_400mf": "fc",
    "mnasnet0_5": "classifier.1",
    "mobilenet_v2": "classifier.1",
    "resnet18": "fc",
}
for _name, _head in _HEADS.items():
    register_model("classifier", _name)(_torchvision(_name, _head))


def pretrained_config(arch: str) -> dict[str, Any]:
    """The architecture options that ``arch``'s ImageNet weights need, to record with a model trained from them:
    torchvision's inception_v3 weights expect its ``transform_input`` (ImageNet-normalised inputs mapped to the
    (x - 0.5) / 0.5 they were trained on), which torchvision turns on when it loads them itself."""
    return {"transform_input": True} if arch == "inception_v3" else {}


@register_model("classifier", "inception_v3")
def inception_v3(num_classes: int = NUM_CLASSES, imagenet_weights: str | None = None,
                 transform_input: bool = False) -> nn.Module:
    """torchvision inception_v3 (auxiliary head kept for training) with a 4-class head, input resized to 299;
    ``transform_input`` for ImageNet weights (:func:`pretrained_config`)."""
    net = _imagenet(tvm.inception_v3(weights=None, aux_logits=True, init_weights=True, transform_input=transform_input),
                    imagenet_weights)
    net.fc = nn.Linear(net.fc.in_features, num_classes)
    net.AuxLogits.fc = nn.Linear(net.AuxLogits.fc.in_features, num_classes)
    return InceptionPatch(net)


@register_model("classifier", "squeezenet1_1")
def squeezenet1_1(num_classes: int = NUM_CLASSES, imagenet_weights: str | None = None) -> nn.Module:
    """torchvision squeezenet1_1 with its final 1x1 conv replaced by a 4-class one."""
    net = _imagenet(tvm.squeezenet1_1(weights=None), imagenet_weights)
    net.classifier[1] = nn.Conv2d(512, num_classes, kernel_size=1)
    return net
