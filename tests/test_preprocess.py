"""Preprocessing ops against naive numpy references and on a real cxr4 image."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from patchflannel.io import read_image
from patchflannel.ops.preprocess import (
    equalize_hist,
    gamma_correct,
    learner_image,
    masked_image,
    resize,
    resize_mask,
    segmentation_input,
    to_unit,
)


def naive_equalize(image: np.ndarray) -> np.ndarray:
    levels = np.round(np.clip(image, 0, 1) * 255).astype(int)
    cdf = np.cumsum(np.bincount(levels.ravel(), minlength=256)).astype(np.float64)
    cdf_min = cdf[levels.min()]
    return ((cdf[levels] - cdf_min) / max(cdf[-1] - cdf_min, 1)).astype(np.float32)


def test_equalize_matches_naive_cdf_mapping_and_constant_maps_to_zero():
    img = np.random.default_rng(0).beta(2, 5, size=(37, 53)).astype(np.float32)
    np.testing.assert_allclose(equalize_hist(torch.from_numpy(img)).numpy(), naive_equalize(img), atol=1e-6)
    assert equalize_hist(torch.full((8, 8), 0.4)).abs().max() == 0


def test_gamma_resize_and_mask_upsampling():
    x = torch.tensor([[0.0, 0.25], [1.0, 0.81]])
    torch.testing.assert_close(gamma_correct(x), torch.tensor([[0.0, 0.5], [1.0, 0.9]]))
    assert resize(torch.rand(30, 40), 64).shape == (64, 64)
    mask = torch.tensor([[True, False], [False, True]])
    up = resize_mask(mask, 4)
    assert up.dtype == torch.bool and torch.equal(up, mask.repeat_interleave(2, 0).repeat_interleave(2, 1))
    assert masked_image(torch.ones(8, 8), mask, 4).sum() == 8


def test_resize_of_a_tall_narrow_image_shrinks_its_height_first():
    """torch widens the whole image before shrinking its height: a 600000 x 33 image took 14 s and 2.4 GB to
    reach 1024 x 1024. Height first is the same separable filter, up to float rounding."""
    import torch.nn.functional as F

    for shape, size in (((4000, 33), (256, 256)), ((3, 5000, 40), (64, 96)), ((1, 1, 300, 50), (20, 200)),
                        ((40, 1), (32, 32))):  # one column: left to one call (torch repeats a 1 -> 1 column's first row)
        x = torch.rand(shape)
        whole = F.interpolate(x.reshape(-1, 1, *shape[-2:]), size=size, mode="bilinear", antialias=True)
        torch.testing.assert_close(resize(x, size), whole.reshape(*shape[:-2], *size), atol=1e-5, rtol=0)


def test_segmentation_input_of_a_real_image(cxr4_dir):
    path = sorted((cxr4_dir / "images").rglob("*.jpg"))[0]
    image = torch.from_numpy(read_image(path))
    seg = segmentation_input(image)
    assert seg.shape == (1, 256, 256) and seg.dtype == torch.float32
    assert 0 <= float(seg.min()) and float(seg.max()) <= 1 and float(seg.std()) > 0.1
    # SPEC stage 1's order: equalise, gamma-correct, then resize (each other order gives another input).
    assert torch.equal(seg[0], resize(gamma_correct(equalize_hist(image)), 256))
    for other in (gamma_correct(equalize_hist(resize(image, 256))), resize(equalize_hist(gamma_correct(image)), 256)):
        assert float((seg[0] - other).abs().max()) > 0.05


def test_mask_resize_is_centre_nearest_as_pil_resizes():
    """Nearest neighbour at pixel centres (PIL's NEAREST, an independent implementation), at factors that are
    not whole numbers (256 -> 1024 is x4 and cannot tell the conventions apart)."""
    from PIL import Image

    rng = np.random.default_rng(3)
    mask = rng.random((37, 53)) > 0.5
    for size in ((100, 80), (1024, 1024), (20, 30)):
        pil = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(size[::-1], Image.NEAREST)) > 0
        assert np.array_equal(resize_mask(torch.from_numpy(mask), size).numpy(), pil)


def test_learner_image_holds_the_8_bit_levels_training_caches() -> None:
    """What the learners' inputs are cut from: resized, then exactly the values a uint8 cache round-trips."""
    image = torch.rand(300, 250)
    x = learner_image(image, 64)
    assert x.shape == (64, 64) and x.min() >= 0 and x.max() <= 1
    as_uint8 = (resize(image, 64).clamp(0, 1) * 255).round().to(torch.uint8)
    assert torch.equal(x, as_uint8.float() / 255)
    assert not torch.equal(x, resize(image, 64))


def test_levels_become_the_readers_float32_values() -> None:
    """to_unit gives the bits the file readers give (numpy float32 division), for 8- and 16-bit levels."""
    for top, dtype in ((255, torch.uint8), (65535, torch.int32)):
        want = np.arange(top + 1, dtype=np.float32) / np.float32(top)
        assert np.array_equal(to_unit(torch.arange(top + 1, dtype=dtype), top).numpy(), want)
    half = learner_image(torch.rand(300, 250).half(), 64)  # resized and rounded in float32 whatever comes in
    assert half.dtype == torch.float32 and torch.equal(half, to_unit((half * 255).round()))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_levels_have_the_same_bits_on_a_gpu() -> None:
    """CUDA divides by a Python number through its reciprocal (an ulp off for some levels); to_unit does not."""
    for top in (255, 65535):
        levels = torch.arange(top + 1, dtype=torch.int32)
        assert torch.equal(to_unit(levels.cuda(), top).cpu(), to_unit(levels, top))
    x = learner_image(torch.rand(300, 250, device="cuda"), 64).cpu()
    assert torch.equal(x, to_unit((x * 255).round()))


def test_segmentation_inputs_take_flipped_views_and_levels():
    """A numpy view with negative strides (np.fliplr of an image) and 8-bit levels are taken as their copies
    (torch holds no negative strides: Segmenter.predict raised on them)."""
    from patchflannel.ops.preprocess import segmentation_inputs

    grey = np.random.default_rng(1).random((70, 90))
    flipped = np.fliplr(grey)
    assert torch.equal(segmentation_inputs([flipped], 64), segmentation_inputs([flipped.copy()], 64))
    levels = (grey * 255).astype(np.uint8)[::-1]
    assert torch.equal(segmentation_inputs([levels], 64), segmentation_inputs([levels.astype(np.float32)], 64))
