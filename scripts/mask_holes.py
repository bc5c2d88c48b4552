"""How large are the holes that mask post-processing fills? (the heart must never be one)

Usage: python scripts/mask_holes.py MANIFEST [EVERY]
Segments every EVERY-th image of a manifest (default 4) with the default bundle's model at its size, keeps
the two largest components as ``ops.mask.postprocess_mask`` does, and prints percentiles of each image's
largest filled hole as a fraction of the image, and the images with the largest ones.
"""

from __future__ import annotations

import sys

import numpy as np
import torch
from scipy import ndimage

from patchflannel.bundle import default_bundle_path, load_bundle, load_torch_model
from patchflannel.data import read_manifest
from patchflannel.io import read_image
from patchflannel.ops.mask import fill_holes, largest_components, lung_masks
from patchflannel.ops.preprocess import segmentation_input


def main(manifest: str, every: int = 4) -> None:
    bundle = load_bundle(default_bundle_path())
    net = load_torch_model(bundle, bundle.segmentation).eval()
    seg = bundle.preprocessing["segmentation"]
    rows = read_manifest(manifest).rows[::every]
    largest = []
    with torch.inference_mode():
        for row in rows:
            x = segmentation_input(torch.from_numpy(read_image(row["path"])), seg["size"], seg["gamma"])[None]
            raw = lung_masks(net(x), seg["threshold"])[0].numpy()
            kept = largest_components(raw)
            holes, n = ndimage.label(fill_holes(kept) & ~kept)
            largest.append((np.bincount(holes.ravel())[1:].max() / raw.size if n else 0.0, row["path"]))
    fractions = [f for f, _ in largest]
    print(f"{len(rows)} images; largest filled hole an image, fraction of the image: median "
          f"{np.percentile(fractions, 50):.4f}, 90% {np.percentile(fractions, 90):.4f}, "
          f"99% {np.percentile(fractions, 99):.4f}, max {max(fractions):.4f}")
    for f, path in sorted(largest, reverse=True)[:5]:
        print(f"  {f:.4f}  {path}")


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) == 3 else 4)
