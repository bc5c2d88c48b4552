"""How much does a result move when the same picture is handed over another way (other bytes, other seed)?

Usage: python scripts/path_vs_array.py [K] [EVERY]
Predicts every EVERY-th cxr4 film (default 150, at most 8) with the default bundle at K (default 100), once
from its path and once as its decoded array (which hashes, hence seeds its patches, differently), and prints
the largest difference in a class probability and both labels.
"""

from __future__ import annotations

import sys
from pathlib import Path

from patchflannel import Engine
from patchflannel.bench.harness import default_images
from patchflannel.io import read_image


def main(k: int = 100, every: int = 150) -> None:
    images = default_images()
    if images is None:
        sys.exit("no cxr4 data: set $PATCHFLANNEL_SHARED_DATA to the folder holding cxr4/ (patchflannel.data.shared)")
    paths = sorted(Path(images).rglob("*.jpg"))[::every][:8]
    engine = Engine.from_bundle(device="cpu", k=k)
    for path in paths:
        a, b = engine.predict(path), engine.predict(read_image(path))
        diff = max(abs(a.probabilities[c] - b.probabilities[c]) for c in a.probabilities)
        print(f"{diff:.3f}  {a.label:9} {b.label:9} {path.name}")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:3]))
