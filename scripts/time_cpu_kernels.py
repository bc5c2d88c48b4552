"""The CPU micro-timings quoted in the docs: hole filling against scipy's, and the default bundle's segmenter
and first learner in fp32 and bf16 (through the engine's torch backend).

Usage: python scripts/time_cpu_kernels.py   (a minute on 2 cores; milliseconds, median of repeats)
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from scipy import ndimage

from patchflannel.bundle import load_bundle, load_torch_model
from patchflannel.engine.backends.torch_backend import TorchBackend
from patchflannel.ops.mask import fill_holes


def ms(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def main() -> None:
    yy, xx = np.mgrid[:256, :256]
    lungs = (((yy - 128) / 90) ** 2 + ((xx - 75) / 45) ** 2 < 1) | (((yy - 128) / 90) ** 2 + ((xx - 180) / 45) ** 2 < 1)
    mask = lungs ^ (np.random.default_rng(0).random((256, 256)) < 0.01)  # two lungs, 1% noise: islands and holes
    print(f"fill holes, 256x256: fill_holes {ms(lambda: fill_holes(mask), 200):.2f} ms, "
          f"scipy binary_fill_holes {ms(lambda: ndimage.binary_fill_holes(mask), 200):.2f} ms")
    bundle = load_bundle(None)
    cpu = torch.device("cpu")
    for entry, shape in ((bundle.segmentation, (1, 1, 256, 256)), (bundle.learners[0], (8, 3, 224, 224))):
        x = torch.rand(shape)
        for precision in ("fp32", "bf16"):
            backend = TorchBackend(load_torch_model(bundle, entry), cpu, precision)
            print(f"{entry.name} {tuple(shape)} {precision}: {ms(lambda: backend.run(x), 5):.1f} ms")


if __name__ == "__main__":
    main()
