"""Metrics against scikit-learn and torchmetrics on constructed predictions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score, precision_recall_fscore_support, roc_auc_score

from patchflannel.training.metrics import (
    bootstrap_ci,
    classification_metrics,
    fast_roc_auc,
    flat_scores,
    mean_std,
    scores_from_confusion,
)


def _predictions(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, n)
    logits = rng.normal(size=(n, 4)) + 1.5 * np.eye(4)[labels]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return labels, probs.argmax(1), probs


def test_classification_metrics_match_sklearn_and_torchmetrics() -> None:
    from torchmetrics.classification import MulticlassAUROC, MulticlassF1Score

    labels, preds, probs = _predictions(300, 0)
    m = classification_metrics(labels, preds, probs)
    p, r, f, s = precision_recall_fscore_support(labels, preds, labels=[0, 1, 2, 3])
    for c, name in enumerate(("covid", "viral", "bacterial", "normal")):
        assert m["per_class"][name]["precision"] == pytest.approx(p[c])
        assert m["per_class"][name]["recall"] == pytest.approx(r[c])
        assert m["per_class"][name]["f1"] == pytest.approx(f[c])
        assert m["per_class"][name]["support"] == s[c]
        assert m["per_class"][name]["roc_auc"] == pytest.approx(roc_auc_score(labels == c, probs[:, c]))
    assert m["macro_f1"] == pytest.approx(f1_score(labels, preds, average="macro"))
    tm_f1 = MulticlassF1Score(num_classes=4, average="macro")(torch.tensor(preds), torch.tensor(labels))
    assert m["macro_f1"] == pytest.approx(float(tm_f1), abs=1e-6)
    tm_auc = MulticlassAUROC(num_classes=4, average=None)(torch.tensor(probs, dtype=torch.float64), torch.tensor(labels))
    assert [m["per_class"][c]["roc_auc"] for c in ("covid", "viral", "bacterial", "normal")] == pytest.approx(
        tm_auc.tolist(), abs=1e-6)
    cm = np.array(m["confusion"])
    assert cm.sum() == 300 and np.trace(cm) == int((labels == preds).sum())
    assert np.allclose(np.array(m["confusion_normalized"]).sum(1), 1.0)


def test_absent_class_gives_zero_f1_and_no_auc() -> None:
    labels = np.array([0, 0, 1, 1, 2])
    preds = np.array([0, 1, 1, 1, 2])
    probs = np.eye(4)[preds] * 0.7 + 0.075
    m = classification_metrics(labels, preds, probs)
    assert m["per_class"]["normal"]["f1"] == 0.0 and m["per_class"]["normal"]["roc_auc"] is None
    assert m["macro_f1"] == pytest.approx(f1_score(labels, preds, labels=[0, 1, 2, 3], average="macro", zero_division=0))
    assert m["confusion_normalized"][3] == [0.0, 0.0, 0.0, 0.0]


def test_confusion_scores_and_fast_auc_equal_sklearn() -> None:
    labels, preds, probs = _predictions(200, 1)
    preds[:30] = 3  # make some classes over-predicted
    cm = np.bincount(labels * 4 + preds, minlength=16).reshape(4, 4)
    s = scores_from_confusion(cm)
    p, r, f, _ = precision_recall_fscore_support(labels, preds, labels=[0, 1, 2, 3], zero_division=0)
    assert np.allclose(s["precision"], p) and np.allclose(s["recall"], r) and np.allclose(s["f1"], f)
    tied = np.round(probs[:, 2], 1)  # ties matter for the Mann-Whitney form
    assert fast_roc_auc(labels == 2, tied) == pytest.approx(roc_auc_score(labels == 2, tied))
    assert fast_roc_auc(np.zeros(5, bool), np.arange(5.0)) is None


def test_mean_std_over_folds() -> None:
    mean, std = mean_std([{"a": 0.5, "b": None}, {"a": 0.7, "b": 0.2}, {"a": 0.9, "b": 0.4}])
    assert mean["a"] == pytest.approx(0.7) and std["a"] == pytest.approx(0.2)
    assert mean["b"] == pytest.approx(0.3) and std["b"] == pytest.approx(np.std([0.2, 0.4], ddof=1))
    mean, std = mean_std([{"a": 0.5}])
    assert mean["a"] == 0.5 and std["a"] is None  # one fold: no spread to report


def test_bootstrap_resamples_patients_and_brackets_the_estimate() -> None:
    labels, preds, probs = _predictions(400, 2)
    patients = np.repeat(np.arange(100), 4)
    ci = bootstrap_ci(labels, preds, probs, patients, n_boot=300, seed=0)
    point = flat_scores(classification_metrics(labels, preds, probs))
    for key in ("macro_f1", "f1_covid", "roc_auc_normal", "accuracy"):
        lo, hi = ci[key]
        assert lo < point[key] < hi
        assert hi - lo < 0.3
    # one patient holding every row: every resample is the full set, so the interval collapses to the point
    one = bootstrap_ci(labels, preds, probs, np.zeros(400), n_boot=20, seed=0)
    assert one["macro_f1"] == pytest.approx([point["macro_f1"]] * 2)
    # patient-level resampling is wider than row-level when a patient's rows are all right or all wrong
    y = np.repeat(np.arange(20) % 4, 20)
    right = np.repeat(np.arange(20) < 14, 20)
    yhat = np.where(right, y, (y + 1) % 4)
    pr = np.eye(4)[yhat]
    wide = bootstrap_ci(y, yhat, pr, np.repeat(np.arange(20), 20), n_boot=300, seed=0)["accuracy"]
    narrow = bootstrap_ci(y, yhat, pr, np.arange(400), n_boot=300, seed=0)["accuracy"]
    assert wide[1] - wide[0] > 2 * (narrow[1] - narrow[0])


def test_macro_f1_present_and_its_interval_skip_absent_classes() -> None:
    """A source holding covid and normal only: F1 averaged over those two, in each resample over what it holds
    (a perfect model's interval is the point, not pulled down by resamples that miss the one covid image)."""
    labels = np.array([0] + [3] * 9)
    m = classification_metrics(labels, labels, np.eye(4)[labels])
    assert m["macro_f1_present"] == 1.0 and m["macro_f1"] == 0.5
    assert bootstrap_ci(labels, labels, np.eye(4)[labels], np.arange(10), n_boot=200, seed=0)["macro_f1_present"] == [1.0, 1.0]
    preds = np.array([3] + [3] * 9)  # the covid image missed
    m = classification_metrics(labels, preds, np.eye(4)[preds])
    assert m["macro_f1_present"] == pytest.approx(f1_score(labels, preds, labels=[0, 3], average="macro", zero_division=0))
