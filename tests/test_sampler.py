"""Patch sampling: the ops against a naive numpy reference, their properties, and the CuPy twin on a GPU."""

from __future__ import annotations

import importlib.util
import time

import numpy as np
import pytest
import torch

from patchflannel.engine.samplers import TorchSampler, make_sampler
from patchflannel.ops.sampler import (
    centres_from_uniforms,
    draw_patches,
    effective_masks,
    gather_patches,
    patch_uniforms,
    window_origins,
)


def naive_centres(masks: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
    """The floor(u * n)-th lung pixel in row-major order, one image and one patch at a time."""
    out = np.zeros(uniforms.shape + (2,), np.int64)
    for b in range(masks.shape[0]):
        lung = np.flatnonzero(masks[b])
        for j, u in enumerate(uniforms[b]):
            idx = min(int(np.floor(u * len(lung))), len(lung) - 1)
            out[b, j] = divmod(lung[idx], masks.shape[2])
    return out


def random_masks(b: int, h: int, w: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    masks = torch.rand(b, h, w, generator=g) < 0.3
    masks[:, 0, 0] = True  # never empty
    return masks


def test_centres_match_naive_reference_and_lie_in_the_lung():
    masks = random_masks(3, 50, 70, seed=1)
    u = patch_uniforms([11, 12, 13], 40)
    got = centres_from_uniforms(masks, u).numpy()
    np.testing.assert_array_equal(got, naive_centres(masks.numpy(), u.numpy()))
    b = np.arange(3)[:, None]
    assert masks.numpy()[b, got[..., 0], got[..., 1]].all()


def test_uniforms_depend_only_on_the_image_seed():
    a = patch_uniforms([5, 6], 10)
    b = patch_uniforms([6, 5], 10)
    torch.testing.assert_close(a[0], b[1], rtol=0, atol=0)
    assert not torch.equal(a[0], a[1])
    assert ((a >= 0) & (a < 1)).all()


def test_windows_stay_inside_and_gather_equals_slicing():
    h, w, p = 300, 260, 64
    images = torch.rand(2, h, w)
    centres = torch.tensor([[[0, 0], [299, 259], [150, 130]], [[10, 250], [290, 5], [100, 100]]])
    origins = window_origins(centres, h, w, p)
    # Centred on the centre (row, col), shifted only as far as the border needs.
    assert origins[0, 2].tolist() == [150 - p // 2, 130 - p // 2] and origins[1, 2].tolist() == [100 - 32, 100 - 32]
    assert origins[0, 0].tolist() == [0, 0] and origins[0, 1].tolist() == [h - p, w - p]
    assert origins[1, 0].tolist() == [10 - 10, w - p] and origins[1, 1].tolist() == [h - p, 0]
    assert (origins >= 0).all() and (origins[..., 0] <= h - p).all() and (origins[..., 1] <= w - p).all()
    patches = gather_patches(images, origins, p)
    for b in range(2):
        for j in range(3):
            r, c = origins[b, j].tolist()
            torch.testing.assert_close(patches[b, j], images[b, r:r + p, c:c + p], rtol=0, atol=0)
    with pytest.raises(ValueError, match="does not fit"):
        window_origins(centres, 32, 32, p)


def test_tiny_masks_fall_back_to_the_whole_image_and_are_flagged():
    masks = torch.zeros(2, 100, 100, dtype=torch.bool)
    masks[0, 40:60, 40:60] = True  # 4 %: kept
    masks[1, 0, 0] = True  # 0.01 %: replaced
    eff, fallback = effective_masks(masks, 0.01)
    assert fallback.tolist() == [False, True]
    assert torch.equal(eff[0], masks[0]) and eff[1].all()
    out = draw_patches(torch.rand(2, 100, 100), masks, [1, 2], k=5, patch=32)
    assert out["fallback"].tolist() == [False, True] and out["patches"].shape == (2, 5, 32, 32)


def test_an_empty_mask_falls_back_whatever_the_minimum_fraction():
    """A bundle may set min_lung_fraction 0: an empty mask must still fall back, not stop the batch."""
    masks = torch.zeros(2, 50, 50, dtype=torch.bool)
    masks[0, 10, 10] = True
    eff, fallback = effective_masks(masks, 0.0)
    assert fallback.tolist() == [False, True] and eff[1].all() and torch.equal(eff[0], masks[0])
    out = draw_patches(torch.rand(2, 50, 50), masks, [1, 2], k=3, patch=16, min_fraction=0.0)
    assert out["centres"][0].tolist() == [[10, 10]] * 3 and out["fallback"].tolist() == [False, True]


def test_engine_torch_sampler_is_the_op():
    masks = random_masks(2, 40, 40, seed=3)
    u = patch_uniforms([1, 2], 16)
    assert torch.equal(TorchSampler().centres(masks, u), centres_from_uniforms(masks, u))
    assert make_sampler("auto", torch.device("cpu")).name == "torch"


needs_cupy_gpu = pytest.mark.skipif(
    importlib.util.find_spec("cupy") is None or not torch.cuda.is_available(),
    reason="the CuPy sampler needs CuPy and a CUDA device (neither is required elsewhere)")


@pytest.mark.gpu
@needs_cupy_gpu
def test_cupy_sampler_agrees_with_torch_on_gpu():
    import cupy

    from patchflannel.ops.sampler_cupy import centres_from_uniforms_cupy

    masks = random_masks(4, 1024, 1024, seed=7).cuda()
    masks[2] = False
    masks[2, 500:520, 10:30] = True  # a small lung
    u = patch_uniforms([1, 2, 3, 4], 100)
    ref = centres_from_uniforms(masks, u.cuda())
    direct = torch.from_dlpack(centres_from_uniforms_cupy(cupy.from_dlpack(masks), cupy.from_dlpack(u.cuda())))
    via_engine = make_sampler("auto", torch.device("cuda")).centres(masks, u)
    assert make_sampler("auto", torch.device("cuda")).name == "cupy"
    assert torch.equal(direct, ref) and torch.equal(via_engine, ref)
    np.testing.assert_array_equal(ref.cpu().numpy(), naive_centres(masks.cpu().numpy(), u.numpy()))
    none = centres_from_uniforms_cupy(cupy.from_dlpack(masks[:0]), cupy.from_dlpack(u[:0].cuda()))
    assert none.shape == tuple(centres_from_uniforms(masks[:0], u[:0].cuda()).shape) == (0, 100, 2)


@pytest.mark.gpu
@needs_cupy_gpu
def test_cupy_sampler_runs_on_torchs_current_stream():
    """The engine samples on its preparation stream while the learners keep the caller's stream busy: the
    CuPy sampler must queue on torch's current stream, not on CuPy's default (the legacy default stream,
    which would wait for the busy one)."""
    sampler = make_sampler("cupy", torch.device("cuda"))
    masks = random_masks(8, 1024, 1024, seed=11).cuda()
    u = patch_uniforms(list(range(8)), 100).cuda()
    ref = centres_from_uniforms(masks, u)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):  # CuPy compiles its kernels and fills its pool for this stream on first use
        sampler.centres(masks, u)
    torch.cuda.synchronize()
    torch.cuda._sleep(3_000_000_000)  # the default stream busy for a second or more
    start = time.perf_counter()
    with torch.cuda.stream(side):
        got = sampler.centres(masks, u)
        side.synchronize()
    waited = time.perf_counter() - start
    torch.cuda.synchronize()
    assert torch.equal(got, ref)
    assert waited < 0.5, f"the sampler waited {waited:.2f} s for the busy default stream"
