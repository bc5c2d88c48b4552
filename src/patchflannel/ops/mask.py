"""Lung masks from segmentation logits, their post-processing and their coverage."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy import ndimage

from patchflannel.ops.preprocess import segmentation_inputs

KEEP_COMPONENTS = 2
"""Connected components kept by :func:`postprocess_mask`: the two lungs."""


def lung_masks(logits: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """(B, 1, h, w) segmentation logits to (B, h, w) boolean masks: ``sigmoid(logits) > threshold``."""
    if logits.ndim != 4 or logits.shape[1] != 1:
        raise ValueError(f"expected (B, 1, h, w) logits, got shape {tuple(logits.shape)}")
    return torch.sigmoid(logits[:, 0]) > threshold


def postprocess_mask(mask: np.ndarray) -> np.ndarray:
    """Keep the two largest 8-connected components (the lungs) and fill their holes; bool in, bool out.

    Small islands the network marks outside the lungs are dropped; holes inside a lung (a nodule, a
    pacemaker lead, the hilum's vessels) are filled. An empty mask stays empty.
    """
    return fill_holes(largest_components(mask))


def postprocess_masks(masks: np.ndarray | torch.Tensor) -> np.ndarray:
    """:func:`postprocess_mask` of each of a batch of (B, h, w) boolean masks (on the host)."""
    return np.stack([postprocess_mask(m) for m in np.asarray(masks)])


@torch.inference_mode()
def predict_lung_masks(model: torch.nn.Module, images: Sequence[np.ndarray], size: int, gamma: float,
                       threshold: float, device: str | torch.device = "cpu") -> np.ndarray:
    """Post-processed (B, size, size) boolean lung masks of grey images: SPEC's segmentation input, ``model``
    (a torch segmentation network on ``device``), ``sigmoid > threshold``, :func:`postprocess_masks`."""
    x = segmentation_inputs(images, size, gamma).to(device)
    return postprocess_masks(lung_masks(model(x).float(), threshold).cpu())


def largest_components(mask: np.ndarray, keep: int = KEEP_COMPONENTS) -> np.ndarray:
    """The ``keep`` largest 8-connected components of a bool mask."""
    mask = np.asarray(mask, dtype=bool)
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if n <= keep:
        return mask
    sizes = np.bincount(labels.ravel())[1:]
    return np.isin(labels, np.argsort(sizes, kind="stable")[::-1][:keep] + 1)


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """``scipy.ndimage.binary_fill_holes`` with its default (4-connected) structure, 3-4x faster.

    The background is labelled once; its components that touch the border stay background, every other
    one (a hole) is filled. scipy's version dilates the border inwards one pixel an iteration.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.size == 0:
        return mask.copy()
    background, n = ndimage.label(~mask)
    outside = np.zeros(n + 1, dtype=bool)
    outside[np.concatenate([background[0], background[-1], background[:, 0], background[:, -1]])] = True
    outside[0] = False  # label 0: the mask's own pixels
    return ~outside[background]


def mask_fraction(masks: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
    """Fraction of pixels inside each mask: (H, W) -> scalar, (B, H, W) -> (B,)."""
    if isinstance(masks, torch.Tensor):
        return masks.to(torch.float32).mean(dim=(-2, -1))
    return np.asarray(masks, dtype=bool).mean(axis=(-2, -1))
