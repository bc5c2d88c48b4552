"""Compare two `score --predictions` CSVs of the same images (e.g. fp32 against bf16, or two engine versions).

Usage: python scripts/compare_predictions.py A.csv B.csv
Prints the images in common, how many predicted classes differ, mean and max |p_A - p_B| over the four
class probabilities, and each file's macro-F1 against the carried labels.
"""

from __future__ import annotations

import sys

import numpy as np
from sklearn.metrics import f1_score

from patchflannel.training.report import read_predictions


def main(a_path: str, b_path: str) -> None:
    a = {r["path"]: r for r in read_predictions(a_path)}
    b = {r["path"]: r for r in read_predictions(b_path)}
    common = [p for p in a if p in b]
    diff = np.abs(np.array([a[p]["probs"] for p in common]) - np.array([b[p]["probs"] for p in common]))
    print(f"{len(common)} images in common; predicted class differs for "
          f"{sum(a[p]['pred'] != b[p]['pred'] for p in common)}; |dp| mean {diff.mean():.4f} max {diff.max():.4f}")
    for rows, path in ((a, a_path), (b, b_path)):
        f1 = f1_score([rows[p]["label"] for p in common], [rows[p]["pred"] for p in common], average="macro")
        print(f"{path}: macro-F1 {f1:.4f}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
