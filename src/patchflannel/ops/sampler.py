"""Lung-centred patch sampling (SPEC.md stage 2), batched over images, no Python loop over patches.

A draw is split in two so that every implementation (torch here, CuPy in ``sampler_cupy``) gives the
same centres for the same seed: the K uniform numbers of an image come from a CPU ``torch.Generator``
seeded with the image's seed, and the mapping uniform -> lung pixel is exact integer arithmetic
(the ``floor(u * n)``-th lung pixel in row-major order, a joint draw of (row, col) among mask pixels).
"""

from __future__ import annotations

import torch

PATCH_SIZE = 224
DEFAULT_K = 100
MIN_LUNG_FRACTION = 0.01


def patch_uniforms(seeds: list[int], k: int) -> torch.Tensor:
    """(len(seeds), k) float64 uniforms in [0, 1), one seeded CPU generator per image."""
    out = torch.empty(len(seeds), k, dtype=torch.float64)
    for i, seed in enumerate(seeds):
        g = torch.Generator().manual_seed(int(seed))
        out[i] = torch.rand(k, generator=g, dtype=torch.float64)
    return out


def effective_masks(masks: torch.Tensor, min_fraction: float = MIN_LUNG_FRACTION) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace masks covering less than ``min_fraction`` of their image, and empty masks, by all-ones masks.

    Returns ``(masks, fallback)`` for (B, H, W) bool masks; ``fallback`` (B,) bool flags the replaced ones:
    their patches are drawn uniformly over the unmasked image, and the result must say so.
    """
    fraction = masks.flatten(1).sum(1, dtype=torch.float64) / (masks.shape[-2] * masks.shape[-1])
    fallback = (fraction < min_fraction) | (fraction == 0)  # empty masks too, whatever the bundle's minimum
    # No `if fallback.any()`: on a GPU that test would make the host wait for every queued kernel.
    return masks | fallback[:, None, None], fallback


def centres_from_uniforms(masks: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Map (B, K) uniforms to (B, K, 2) (row, col) centres among the True pixels of (B, H, W) masks.

    Every mask must hold at least one True pixel (see :func:`effective_masks`).
    """
    b, h, w = masks.shape
    dtype = torch.int32 if h * w < 2**31 else torch.int64  # exact either way; int32 halves the memory traffic
    counts = masks.reshape(b, h * w).to(dtype).cumsum(1, dtype=dtype)
    n = counts[:, -1:]
    if bool((n == 0).any()):
        raise ValueError("a mask has no lung pixel; pass masks through effective_masks first")
    u = uniforms.to(device=masks.device, dtype=torch.float64)
    idx = torch.minimum((u * n.to(torch.float64)).floor().to(dtype), n - 1)
    flat = torch.searchsorted(counts, idx, right=True)
    return torch.stack((flat // w, flat % w), dim=-1)


def window_origins(centres: torch.Tensor, height: int, width: int, patch: int = PATCH_SIZE) -> torch.Tensor:
    """Top-left corners of ``patch`` x ``patch`` windows centred on ``centres``, shifted inside the image."""
    if patch > height or patch > width:
        raise ValueError(f"patch {patch} does not fit an image of {height}x{width}")
    half = patch // 2
    rows = (centres[..., 0] - half).clamp(0, height - patch)
    cols = (centres[..., 1] - half).clamp(0, width - patch)
    return torch.stack((rows, cols), dim=-1)


def gather_patches(images: torch.Tensor, origins: torch.Tensor, patch: int = PATCH_SIZE) -> torch.Tensor:
    """One advanced-indexing gather: (B, H, W) images and (B, K, 2) origins -> (B, K, patch, patch)."""
    b, k, _ = origins.shape
    offs = torch.arange(patch, device=images.device)
    rows = (origins[..., 0, None] + offs)[:, :, :, None]  # (B, K, P, 1)
    cols = (origins[..., 1, None] + offs)[:, :, None, :]  # (B, K, 1, P)
    batch = torch.arange(b, device=images.device)[:, None, None, None]
    return images[batch, rows, cols]


def draw_patches(
    images: torch.Tensor,
    masks: torch.Tensor,
    seeds: list[int],
    k: int = DEFAULT_K,
    patch: int = PATCH_SIZE,
    min_fraction: float = MIN_LUNG_FRACTION,
) -> dict[str, torch.Tensor]:
    """The whole patch stage for (B, H, W) images and their (B, H, W) bool masks at the same size.

    Returns ``patches`` (B, K, patch, patch) cut from the masked images (the unmasked image where the mask
    fell back), ``centres`` and ``origins`` (B, K, 2) and ``fallback`` (B,) bool. ``images`` may be of any
    dtype (uint8 images give uint8 patches).
    """
    masks, fallback = effective_masks(masks, min_fraction)
    centres = centres_from_uniforms(masks, patch_uniforms(seeds, k))
    origins = window_origins(centres, images.shape[-2], images.shape[-1], patch)
    if 8 * k * patch * patch <= images.shape[-2] * images.shape[-1]:  # a few patches: mask them, not the image
        patches = gather_patches(images, origins, patch) * gather_patches(masks, origins, patch).to(images.dtype)
    else:
        patches = gather_patches(images * masks.to(images.dtype), origins, patch)
    return {"patches": patches, "centres": centres, "origins": origins, "fallback": fallback}
