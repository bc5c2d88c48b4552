"""Datasets of the base learners over a splits file, in ``global`` and ``patch`` mode (SPEC.md stage 2).

Images are prepared once and cached as uint8 ``.npy`` files (keyed by the image bytes' sha256, the mode
and, in patch mode, the mask cache key): in ``global`` mode the grey image resized to 336 x 336, in
``patch`` mode the masked image at 1024 x 1024 (the lung mask at 256 is kept beside it to draw
lung-centred patches; where the mask covers too little to sample from, the unmasked image, as the engine
uses it). Epochs then only read arrays. Randomness (crop, patch centre, augmentation) comes
from per-item generators seeded by (run seed, epoch, image), so an epoch is the same whatever the worker
count or resume point.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from torch.utils.data import Dataset

from patchflannel.bundle import LEARNER_MODES
from patchflannel.classes import CLASS_INDEX
from patchflannel.data.manifest import Row, read_manifest
from patchflannel.errors import ConfigError, ManifestError
from patchflannel.io import content_hash, read_image
from patchflannel.io.files import save_atomic
from patchflannel.ops.preprocess import as_tensor, learner_image, masked_image, normalize, resize_mask
from patchflannel.ops.sampler import draw_patches, effective_masks
from patchflannel.ops.seeding import image_seed
from patchflannel.training.loop import progress_bar
from patchflannel.training.mask_cache import MaskCache


@dataclass
class Item:
    """One prepared image: its manifest row, label index, content hash, cached array and (patch) lung mask."""

    row: Row
    label: int
    sha256: str
    array_file: Path
    mask: np.ndarray | None = None


def read_splits(path: str | Path) -> list[Row]:
    """Rows of a splits file (a manifest with ``split`` and ``fold`` columns, from ``patchflannel data split``)."""
    manifest = read_manifest(path)
    missing = [c for c in ("split", "fold") if c not in manifest.columns]
    if missing:
        raise ManifestError(path, [f"missing column '{c}' (make one with `patchflannel data split`)" for c in missing])
    return manifest.rows


def _save_atomic(arr: np.ndarray, path: Path) -> None:
    save_atomic(path, lambda tmp: np.save(tmp, arr))


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def _falls_back(mask: np.ndarray, size: int, min_fraction: float) -> bool:
    """Whether the sampler replaces this lung mask (upsampled to ``size``) by the whole image."""
    return bool(effective_masks(resize_mask(torch.from_numpy(mask), size)[None], min_fraction)[1][0])


def prepare_items(rows: list[Row], mode: str, cache_dir: str | Path, preprocessing: dict[str, Any],
                  masks: MaskCache | None = None) -> list[Item]:
    """Prepare (or find in ``cache_dir``) the cached arrays of ``rows`` for ``mode``; patch mode needs ``masks``."""
    if mode not in LEARNER_MODES:
        raise ConfigError(f"unknown mode {mode!r}; expected one of {LEARNER_MODES}")
    if mode == "patch" and masks is None:
        raise ConfigError("patch mode needs a segmentation model for the lung masks")
    shas = [content_hash(r["path"]) for r in rows]
    lung = masks.masks([r["path"] for r in rows], shas) if mode == "patch" else [None] * len(rows)
    size = preprocessing["image_size"] if mode == "patch" else preprocessing["global"]["resize"]
    items, todo = [], []
    for row, sha, mask in zip(rows, shas, lung):
        # A mask too small to sample from falls back to the whole image, unmasked, as in the engine.
        masked = mode == "patch" and not _falls_back(mask, size, preprocessing["min_lung_fraction"])
        tag = f"{sha}:{mode}:{size}" + (f":{masks.key(sha)}" + ("" if masked else ":unmasked") if mode == "patch" else "")
        key = hashlib.sha256(tag.encode()).hexdigest()
        f = Path(cache_dir) / mode / key[:2] / f"{key}.npy"
        if not f.is_file():
            todo.append((row, mask, masked, f))
        items.append(Item(row=row, label=CLASS_INDEX[row["label"]], sha256=sha, array_file=f, mask=mask))
    with progress_bar() as bar:
        task = bar.add_task(f"caching {mode} images", total=len(todo), status="", visible=bool(todo))
        for row, mask, masked, f in todo:
            image = as_tensor(read_image(row["path"]))
            out = masked_image(image, torch.from_numpy(mask), size) if masked else learner_image(image, size)
            _save_atomic(_to_uint8(out), f)
            bar.advance(task)
    return items


class LearnerDataset(Dataset):
    """Training or evaluation samples of prepared :class:`Item` s.

    Training (``train=True``): one (3, 224, 224) sample and its label per image; call :meth:`set_epoch`
    before each epoch. Global mode: random 224 crop of the 336 image and horizontal flip. Patch mode: one
    lung-centred patch (ops.sampler), horizontal flip p=0.5, rotation within +/-``rotation`` degrees and
    scale jitter within ``scale``. Evaluation: global mode the centre crop (1, 3, 224, 224); patch mode
    ``k`` patches (k, 3, 224, 224) drawn with the image's fixed seed.
    """

    def __init__(self, items: list[Item], mode: str, preprocessing: dict[str, Any], *, train: bool, seed: int = 0,
                 k: int = 100, rotation: float = 5.0, scale: tuple[float, float] = (0.9, 1.1)) -> None:
        self.items, self.mode, self.pre, self.train = items, mode, preprocessing, train
        self.seed, self.k, self.rotation, self.scale = seed, k, rotation, scale
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the random draws of ``epoch``."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    def _patches(self, item: Item, image: torch.Tensor, seed: int, k: int) -> torch.Tensor:
        mask = resize_mask(torch.from_numpy(item.mask), image.shape[-1])
        return draw_patches(image[None], mask[None], [seed], k, self.pre["patch_size"],
                            self.pre["min_lung_fraction"])["patches"][0].float() / 255

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        item = self.items[i]
        image = torch.from_numpy(np.load(item.array_file))  # uint8; only the crops/patches become float
        p = self.pre["patch_size"] if self.mode == "patch" else self.pre["global"]["crop"]
        if not self.train:
            if self.mode == "patch":
                return normalize(self._patches(item, image, image_seed(item.sha256, self.seed), self.k), self.pre), item.label
            return normalize(TF.center_crop(image[None], [p, p]).float() / 255, self.pre), item.label
        draw = self.seed * 1_000_003 + self.epoch + 1
        seed = image_seed(item.sha256, draw)  # the patch centre
        g = torch.Generator().manual_seed(image_seed(item.sha256, -draw))  # crop, rotation, zoom, flip: a stream of their own
        if self.mode == "patch":
            x = self._patches(item, image, seed, 1)  # (1, p, p)
            angle = float(torch.empty(1).uniform_(-self.rotation, self.rotation, generator=g))
            zoom = float(torch.empty(1).uniform_(*self.scale, generator=g))
            x = TF.affine(x, angle=angle, translate=[0, 0], scale=zoom, shear=[0.0, 0.0],
                          interpolation=TF.InterpolationMode.BILINEAR)
        else:
            top, left = (int(torch.randint(0, s - p + 1, (1,), generator=g)) for s in image.shape)
            x = image[None, top:top + p, left:left + p].float() / 255
        if bool(torch.rand(1, generator=g) < 0.5):
            x = TF.horizontal_flip(x)
        return normalize(x[0], self.pre), item.label
