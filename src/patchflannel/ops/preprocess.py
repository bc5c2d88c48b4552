"""Image preprocessing of SPEC.md: segmentation input, resizing, mask upsampling and masking."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

SEG_SIZE = 256
IMAGE_SIZE = 1024
GAMMA = 0.5
LEVELS = 256


def as_tensor(image: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A grey image in [0, 1] as a float32 (H, W) tensor (a numpy view with negative strides, a flipped
    image, is copied: torch cannot hold one)."""
    t = torch.as_tensor(np.ascontiguousarray(image) if isinstance(image, np.ndarray) else image)
    if t.ndim != 2:
        raise ValueError(f"expected a 2-D grey image, got shape {tuple(t.shape)}")
    return t.to(torch.float32)


def to_unit(levels: torch.Tensor, top: int = LEVELS - 1) -> torch.Tensor:
    """Integer grey levels ``0..top`` (any dtype) as float32 ``level / top``, the same bits on every device.

    The divisor is a tensor on the levels' device: CUDA divides by a Python number through its reciprocal,
    which is an ulp off for about half the 8-bit levels.
    """
    return levels.to(torch.float32) / torch.full((), float(top), device=levels.device)


def is_blank(image: torch.Tensor) -> torch.Tensor:
    """Whether an image is one grey level (nothing in it to classify): a 0-d bool tensor on its device."""
    return torch.eq(*torch.aminmax(image))


def equalize_hist(images: torch.Tensor) -> torch.Tensor:
    """Histogram equalisation over 256 grey levels of each (..., H, W) image in [0, 1]; result in [0, 1].

    The classic CDF mapping ``(cdf(v) - cdf_min) / (N - cdf_min)``; a constant image maps to 0.
    """
    shape = images.shape
    flat = images.reshape(-1, shape[-2] * shape[-1])
    levels = (flat.clamp(0, 1) * (LEVELS - 1)).round().long()
    hist = torch.zeros(flat.shape[0], LEVELS, device=flat.device, dtype=torch.float64)
    hist.scatter_add_(1, levels, torch.ones_like(levels, dtype=torch.float64))
    cdf = hist.cumsum(1)
    cdf_min = cdf.gather(1, levels.min(dim=1, keepdim=True).values)
    total = cdf[:, -1:]
    denom = (total - cdf_min).clamp(min=1)
    out = (cdf.gather(1, levels) - cdf_min) / denom
    return out.to(torch.float32).reshape(shape)


def normalize(grey: torch.Tensor, preprocessing: dict[str, Any]) -> torch.Tensor:
    """Grey (..., H, W) in [0, 1] -> (..., 3, H, W) normalised with the bundle's mean and std (what the learners
    take, in training and in the exports' checks; the engine keeps its own on the device)."""
    norm = preprocessing["normalization"]
    mean = torch.tensor(norm["mean"], dtype=torch.float32, device=grey.device)[:, None, None]
    std = torch.tensor(norm["std"], dtype=torch.float32, device=grey.device)[:, None, None]
    return (grey.unsqueeze(-3).expand(*grey.shape[:-2], 3, *grey.shape[-2:]) - mean) / std


def gamma_correct(images: torch.Tensor, gamma: float = GAMMA) -> torch.Tensor:
    """Gamma correction ``255 * (x / 255) ** gamma`` expressed on [0, 1] images."""
    return images.clamp(0, 1).pow(gamma)


def _interpolate(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)


def resize(images: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Bilinear, antialiased resize of (H, W), (B, H, W) or (B, C, H, W) images."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    x = images
    squeeze = 4 - x.ndim
    for _ in range(squeeze):
        x = x.unsqueeze(0)
    (h, w), (out_h, out_w) = x.shape[-2:], size
    # torch resizes the width first: a tall narrow image (600000 x 33) would be widened whole (to 600000 x 1024,
    # 2.4 GB) before its height shrinks. Not one column: torch's antialiased 1 -> 1 columns repeats the first row.
    if w > 1 and h * out_w > 4 * out_h * w:
        x = _interpolate(x, (out_h, w))
    out = _interpolate(x, size)
    for _ in range(squeeze):
        out = out.squeeze(0)
    return out


def learner_image(images: torch.Tensor, size: int) -> torch.Tensor:
    """Images resized to ``size`` x ``size`` and rounded to 256 grey levels: what the learners' inputs are cut
    from (patches from the 1024 image, the global crop from the 336 one). Training caches this image in 8 bits,
    so the rounding makes the learners see the same values at inference (SPEC: preprocessing used identically)."""
    return to_unit((resize(images.float(), size).clamp(0, 1) * (LEVELS - 1)).round())


def global_view(image: torch.Tensor, size: int, crop: int) -> torch.Tensor:
    """FLANNEL's whole-image input (SPEC.md, global base classifiers) of one (H, W) image: its
    :func:`learner_image` at ``size``, then the centre ``crop`` x ``crop``."""
    top = (size - crop) // 2
    return learner_image(image, size)[top:top + crop, top:top + crop]


def segmentation_input(image: torch.Tensor, size: int = SEG_SIZE, gamma: float = GAMMA) -> torch.Tensor:
    """SPEC stage 1 input of one (H, W) image: equalise, gamma-correct, resize; returns (1, size, size)."""
    return resize(gamma_correct(equalize_hist(image), gamma), size).unsqueeze(0)


def segmentation_inputs(images: Sequence[np.ndarray | torch.Tensor], size: int = SEG_SIZE,
                        gamma: float = GAMMA) -> torch.Tensor:
    """:func:`segmentation_input` of each grey (H, W) image, stacked: (B, 1, size, size)."""
    return torch.stack([segmentation_input(as_tensor(image), size, gamma) for image in images])


def resize_mask(masks: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resize of boolean (H, W) or (B, H, W) masks; returns bool."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    x = masks.to(torch.float32)
    batched = x.ndim == 3
    x = x.unsqueeze(1) if batched else x[None, None]
    out = F.interpolate(x, size=size, mode="nearest-exact")
    out = out[:, 0] if batched else out[0, 0]
    return out > 0.5


def masked_image(image: torch.Tensor, mask: torch.Tensor, size: int = IMAGE_SIZE) -> torch.Tensor:
    """SPEC stage 2: the image's :func:`learner_image` at ``size`` times the mask upsampled to that size (nearest)."""
    return learner_image(image, size) * resize_mask(mask, size).to(image.dtype)
