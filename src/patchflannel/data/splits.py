"""Patient-grouped, label-stratified train/test split and cross-validation folds (SPEC.md, "Data").

No patient appears in two partitions or two folds, whatever labels their images carry. Both cuts use
scikit-learn's StratifiedGroupKFold (shuffled, seeded): the first fold of ``round(1 / test_frac)`` is
the test set, and the rest is cut into ``folds`` folds (fold k is validation in run k).
"""

from __future__ import annotations

import warnings

import numpy as np

from patchflannel.data.manifest import Row
from patchflannel.errors import ConfigError

SPLIT_COLUMNS: tuple[str, ...] = ("split", "fold")


def make_splits(rows: list[Row], *, seed: int = 0, test_frac: float = 0.2, folds: int = 5) -> list[Row]:
    """Copies of ``rows`` with ``split`` (``train``/``test``) and ``fold`` (``"0"``..``"folds-1"`` for
    training rows, ``""`` for test rows). Deterministic for a given seed and row order.

    ConfigError when a class ends up missing from the test set or from a fold (too few patients of it).
    """
    if not 0.0 < test_frac <= 0.5:
        raise ConfigError(f"test_frac (--test-frac) must be in (0, 0.5], got {test_frac}")
    if folds < 2:
        raise ConfigError(f"folds must be at least 2, got {folds}")
    if not 0 <= seed < 2**32:
        raise ConfigError(f"seed (--seed) must be from 0 to 2**32 - 1, got {seed}")
    test_cuts = round(1.0 / test_frac)
    if abs(1.0 / test_cuts - test_frac) > 1e-6:  # the test set is one of test_cuts patient groups
        raise ConfigError(f"test_frac (--test-frac) must be 1/n (0.5, 0.333.., 0.25, 0.2, ...): the test set is one "
                          f"of n patient groups; {test_frac} would give 1/{test_cuts} = {1.0 / test_cuts:.3g}")
    labels = np.array([row["label"] for row in rows])
    groups = np.array([row["patient_id"] for row in rows])
    _need_patients(groups, test_cuts + folds - 1, f"a test set of 1/{test_cuts} and {folds} folds")

    from sklearn.model_selection import StratifiedGroupKFold  # here: the CLI starts without scikit-learn's second

    with warnings.catch_warnings():  # sklearn's "least populated class" warning counts images: checked below
        warnings.simplefilter("ignore", UserWarning)
        try:
            outer = StratifiedGroupKFold(n_splits=test_cuts, shuffle=True, random_state=seed)
            train_index, test_index = next(outer.split(labels, labels, groups))
            _need_patients(groups[train_index], folds, f"{folds} folds of the training set")
            fold = np.full(len(rows), -1)
            inner = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
            for k, (_, held_out) in enumerate(inner.split(train_index, labels[train_index], groups[train_index])):
                fold[train_index[held_out]] = k
        except ValueError as exc:  # a class has fewer images than cuts
            few = [f"{c} ({n})" for c, n in zip(*np.unique(labels, return_counts=True)) if n < max(test_cuts, folds)]
            raise ConfigError(f"too few images of class {', '.join(few)} for a test set of 1/{test_cuts} and {folds} "
                              f"folds: each class needs at least {max(test_cuts, folds)}" if few else
                              f"no test set of 1/{test_cuts} and {folds} folds: {exc}") from None
    _every_class_everywhere(labels, groups, test_index, fold, folds)

    test = np.zeros(len(rows), dtype=bool)
    test[test_index] = True
    return [
        {**row, "split": "test" if test[i] else "train", "fold": "" if test[i] else str(fold[i])}
        for i, row in enumerate(rows)
    ]


def _every_class_everywhere(labels: np.ndarray, groups: np.ndarray, test_index: np.ndarray, fold: np.ndarray,
                            folds: int) -> None:
    """ConfigError naming each class missing from the test set or a fold, with its number of patients."""
    parts = {"the test set": labels[test_index], **{f"fold {k}": labels[fold == k] for k in range(folds)}}
    problems = []
    for label in sorted(set(labels)):
        missing = [name for name, part in parts.items() if label not in part]
        if missing:
            patients = len(np.unique(groups[labels == label]))
            problems.append(f"class {label} ({patients} patients) is missing from {', '.join(missing)}")
    if problems:
        raise ConfigError("; ".join(problems) + f": each class needs patients in the test set and in all {folds} "
                          "folds (fewer folds, a larger test fraction, or more patients of that class)")


def _need_patients(groups: np.ndarray, needed: int, purpose: str) -> None:
    """ConfigError when there are fewer distinct patients than ``needed``."""
    found = len(np.unique(groups))
    if found < needed:
        raise ConfigError(f"{purpose} needs at least {needed} patients; the manifest has {found}")
