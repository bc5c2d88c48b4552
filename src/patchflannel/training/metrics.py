"""Classification metrics of SPEC.md "Evaluation": per class one-vs-rest precision, recall, F1, macro-F1,
confusion matrix, per-class ROC-AUC, fold mean and standard deviation, and bootstrap intervals by patient.

The point metrics come from scikit-learn. The bootstrap repeats them thousands of times, so it uses the
same definitions computed from a confusion matrix (:func:`scores_from_confusion`) and the Mann-Whitney
form of ROC-AUC (:func:`fast_roc_auc`); tests pin both to scikit-learn.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support, roc_auc_score

from patchflannel.classes import CLASSES, NUM_CLASSES

LABELS = list(range(NUM_CLASSES))


def _auc_or_none(labels: np.ndarray, scores: np.ndarray, c: int) -> float | None:
    positive = labels == c
    if positive.all() or not positive.any():
        return None
    return float(roc_auc_score(positive, scores[:, c]))


def macro_f1_present(per_class: dict[str, dict[str, Any]]) -> float | None:
    """Mean F1 over the classes with images (support > 0), None when there are none.

    This is the macro-F1 of a data source that holds only some classes: over all four classes the absent ones
    score 0 and pull it down whatever the model does. Predictions into an absent class still count, as missed
    images of the present ones.
    """
    f1 = [m["f1"] for m in per_class.values() if m["support"] > 0]
    return float(np.mean(f1)) if f1 else None


def classification_metrics(labels: np.ndarray, preds: np.ndarray, probs: np.ndarray) -> dict[str, Any]:
    """scikit-learn metrics of one set of predictions (class indices and (N, C) probabilities).

    Returns ``per_class`` {class: precision, recall, f1, support, roc_auc (None when the class is absent or
    alone)}, ``macro_f1`` (over the four classes, absent ones scoring 0 as scikit-learn does with
    ``zero_division=0``), ``macro_f1_present`` (over the classes with images: :func:`macro_f1_present`),
    ``accuracy``, ``n``, ``confusion`` (counts) and ``confusion_normalized`` (rows sum to 1; a class with no
    image has a zero row).
    """
    labels, preds, probs = np.asarray(labels), np.asarray(preds), np.asarray(probs, dtype=np.float64)
    p, r, f, s = precision_recall_fscore_support(labels, preds, labels=LABELS, zero_division=0)
    cm = confusion_matrix(labels, preds, labels=LABELS)
    rows = cm.sum(1, keepdims=True)
    per_class = {
        name: {"precision": float(p[c]), "recall": float(r[c]), "f1": float(f[c]), "support": int(s[c]),
               "roc_auc": _auc_or_none(labels, probs, c)}
        for c, name in enumerate(CLASSES)
    }
    return {
        "n": int(len(labels)),
        "per_class": per_class,
        "macro_f1": float(f.mean()),
        "macro_f1_present": macro_f1_present(per_class),
        "accuracy": float((labels == preds).mean()) if len(labels) else float("nan"),
        "confusion": cm.tolist(),
        "confusion_normalized": np.divide(cm, rows, out=np.zeros(cm.shape), where=rows > 0).tolist(),
    }


def flat_scores(metrics: dict[str, Any]) -> dict[str, float | None]:
    """The scalar scores of :func:`classification_metrics` under flat names (``f1_covid``, ``macro_f1``, ...)."""
    out: dict[str, float | None] = {key: metrics[key] for key in ("macro_f1", "macro_f1_present", "accuracy")}
    for name, m in metrics["per_class"].items():
        for key in ("precision", "recall", "f1", "roc_auc"):
            out[f"{key}_{name}"] = m[key]
    return out


def mean_std(values: list[dict[str, float | None]]) -> tuple[dict[str, float | None], dict[str, float | None]]:
    """Mean and sample standard deviation (ddof=1; None for one value: undefined) of each flat score over folds.

    A score undefined in some fold (None) is averaged over the folds where it is defined.
    """
    keys = list(dict.fromkeys(k for v in values for k in v))
    mean: dict[str, float | None] = {}
    std: dict[str, float | None] = {}
    for k in keys:
        xs = np.array([v[k] for v in values if v.get(k) is not None], dtype=np.float64)
        mean[k] = float(xs.mean()) if len(xs) else None
        std[k] = float(xs.std(ddof=1)) if len(xs) > 1 else None
    return mean, std


def scores_from_confusion(cm: np.ndarray) -> dict[str, np.ndarray]:
    """Precision, recall, F1 (zero where undefined, as scikit-learn's ``zero_division=0``) from (..., C, C) counts."""
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diagonal(cm, axis1=-2, axis2=-1)
    predicted, actual = cm.sum(-2), cm.sum(-1)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros_like(tp), where=actual > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    return {"precision": precision, "recall": recall, "f1": f1}


def fast_roc_auc(positive: np.ndarray, scores: np.ndarray) -> float | None:
    """One-vs-rest ROC-AUC by the Mann-Whitney U statistic (ties count one half), None if one class is absent."""
    positive = np.asarray(positive, dtype=bool)
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = rankdata(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def bootstrap_ci(labels: np.ndarray, preds: np.ndarray, probs: np.ndarray, groups: np.ndarray, *,
                 n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict[str, list[float] | None]:
    """Percentile bootstrap intervals of the flat scores, resampling ``groups`` (patients) with replacement.

    Every row of a drawn patient enters the resample as often as the patient was drawn. ``macro_f1_present``
    averages over the classes present in each resample, as the point figure does over the rows it has (a rare
    class missing from a resample would otherwise score 0 there and pull the lower bound down). A score
    undefined in more than half the resamples gets None.
    """
    labels, preds = np.asarray(labels), np.asarray(preds)
    probs = np.asarray(probs, dtype=np.float64)
    _, row_group = np.unique(np.asarray(groups), return_inverse=True)
    n_groups = int(row_group.max()) + 1 if len(row_group) else 0
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {}
    for _ in range(n_boot):
        draws = np.bincount(rng.integers(0, n_groups, n_groups), minlength=n_groups)
        idx = np.repeat(np.arange(len(labels)), draws[row_group])
        y, yhat, pr = labels[idx], preds[idx], probs[idx]
        cm = np.bincount(y * NUM_CLASSES + yhat, minlength=NUM_CLASSES**2).reshape(NUM_CLASSES, NUM_CLASSES)
        s = scores_from_confusion(cm)
        samples.setdefault("macro_f1", []).append(float(s["f1"].mean()))
        present = cm.sum(1) > 0
        samples.setdefault("macro_f1_present", []).append(float(s["f1"][present].mean()) if present.any() else np.nan)
        samples.setdefault("accuracy", []).append(float((y == yhat).mean()))
        for c, name in enumerate(CLASSES):
            for key in ("precision", "recall", "f1"):
                samples.setdefault(f"{key}_{name}", []).append(float(s[key][c]))
            auc = fast_roc_auc(y == c, pr[:, c])
            samples.setdefault(f"roc_auc_{name}", []).append(np.nan if auc is None else auc)
    tail = (1 - level) / 2 * 100
    out: dict[str, list[float] | None] = {}
    for k, xs in samples.items():
        arr = np.array(xs)
        ok = arr[~np.isnan(arr)]
        out[k] = None if len(ok) * 2 < len(arr) or not len(ok) else [float(np.percentile(ok, tail)),
                                                                      float(np.percentile(ok, 100 - tail))]
    return out
