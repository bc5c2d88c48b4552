"""Lung masks from the segmentation model, computed once and cached on disk.

A mask is stored at the segmentation size (256) as ``<root>/<key[:2]>/<key>.npz``. The key hashes the
image's bytes, the segmentation weights file's sha256, its architecture and options and the segmentation
preprocessing, so a changed image, model or preprocessing never reads a stale mask.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from patchflannel.bundle import Bundle, load_bundle, load_torch_model
from patchflannel.io import content_hash, read_image
from patchflannel.io.files import save_atomic
from patchflannel.ops.mask import predict_lung_masks
from patchflannel.training.loop import progress_bar


def model_key(bundle: Bundle) -> str:
    """sha256 of what decides a mask besides the image: weights hash, architecture, options, preprocessing."""
    seg = bundle.segmentation
    ident = {"weights": seg.file("torch").sha256, "arch": seg.arch, "arch_config": seg.arch_config,
             "preprocessing": bundle.preprocessing["segmentation"]}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


class MaskCache:
    """Lung masks (256 x 256 bool, post-processed) of image files, cached under ``root``.

    ``bundle`` is a bundle path or loaded bundle; ``None`` uses the package's default bundle.
    """

    def __init__(self, root: str | Path, bundle: Bundle | str | Path | None = None, *,
                 device: str | torch.device = "cpu", batch_size: int = 4) -> None:
        self.root = Path(root)
        self.bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
        self.model_key = model_key(self.bundle)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self._model: torch.nn.Module | None = None

    def key(self, image_sha256: str) -> str:
        """Cache key of an image (its bytes' sha256) under this segmentation model."""
        return hashlib.sha256(f"{image_sha256}:{self.model_key}".encode()).hexdigest()

    def file(self, image_sha256: str) -> Path:
        """Where the mask of an image is (or will be) cached."""
        k = self.key(image_sha256)
        return self.root / k[:2] / f"{k}.npz"

    def _net(self) -> torch.nn.Module:
        if self._model is None:
            self._model = load_torch_model(self.bundle, self.bundle.segmentation).to(self.device)
        return self._model

    def _compute(self, images: list[np.ndarray]) -> list[np.ndarray]:
        seg = self.bundle.preprocessing["segmentation"]
        return list(predict_lung_masks(self._net(), images, seg["size"], seg["gamma"], seg["threshold"], self.device))

    def masks(self, paths: list[str | Path], image_sha256: list[str] | None = None) -> list[np.ndarray]:
        """The cached masks of ``paths`` (computing and storing the missing ones in batches).

        ``image_sha256`` (the files' sha256, when the caller has them) saves re-reading the bytes.
        """
        shas = image_sha256 or [content_hash(p) for p in paths]
        out: list[np.ndarray | None] = [None] * len(paths)
        todo: list[int] = []
        for i, sha in enumerate(shas):
            f = self.file(sha)
            if f.is_file():
                out[i] = np.load(f)["mask"]
            else:
                todo.append(i)
        with progress_bar() as bar:  # a cold cache of a thousand images takes minutes on a CPU
            task = bar.add_task("lung masks", total=len(todo), status="", visible=bool(todo))
            for start in range(0, len(todo), self.batch_size):
                chunk = todo[start:start + self.batch_size]
                for i, mask in zip(chunk, self._compute([read_image(paths[i]) for i in chunk])):
                    out[i] = mask.astype(bool)
                    save_atomic(self.file(shas[i]), lambda tmp, m=out[i]: np.savez_compressed(tmp, mask=m))
                bar.advance(task, len(chunk))
        return out  # type: ignore[return-value]
