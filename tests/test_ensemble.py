"""The FLANNEL ensemble: weight module shapes and gradients, focal loss against a direct formula, training."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from patchflannel.errors import ConfigError
from patchflannel.models import get_model
from patchflannel.models.losses import class_alpha, focal_loss
from patchflannel.training.ensemble import confidence_matrix, load_ensemble, predict_ensemble, train_ensemble


def test_focal_loss_equals_direct_formula_on_hand_made_inputs() -> None:
    logits = torch.tensor([[2.0, 0.0, -1.0, 0.5], [0.1, 0.2, 0.3, 0.4], [-3.0, 4.0, 0.0, 0.0]])
    targets = torch.tensor([0, 3, 2])
    alpha = torch.tensor([0.1, 0.2, 0.3, 0.4])
    expected = 0.0
    for row, t in zip(logits.tolist(), targets.tolist()):
        p = math.exp(row[t]) / sum(math.exp(v) for v in row)
        expected += -alpha[t].item() * (1 - p) ** 2 * math.log(p)
    assert float(focal_loss(logits, targets, alpha, gamma=2.0)) == pytest.approx(expected / 3, rel=1e-6)
    # gamma 0 with uniform alpha 1 is cross-entropy
    ce = torch.nn.functional.cross_entropy(logits, targets)
    assert float(focal_loss(logits, targets, torch.ones(4), gamma=0.0)) == pytest.approx(float(ce), rel=1e-6)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_focal_loss_gradients_stay_finite_on_a_certain_prediction(gamma: float) -> None:
    """p rounds to 1: (1 - p)^gamma has an infinite slope there for 0 < gamma < 1."""
    logits = torch.tensor([[60.0, -60.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]], requires_grad=True)
    loss = focal_loss(logits, torch.tensor([0, 1]), torch.full((4,), 0.25), gamma=gamma)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all() and logits.grad[1].abs().sum() > 0


def test_class_alpha_is_normalised_inverse_frequency() -> None:
    alpha = class_alpha(torch.tensor([0, 0, 0, 1, 2, 2]))
    inv = np.array([1 / 3, 1, 1 / 2, 0])
    assert alpha.tolist() == pytest.approx((inv / inv.sum()).tolist())


def test_weight_module_shapes_and_gradients() -> None:
    torch.manual_seed(0)
    model = get_model("flannel", n_learners=5)
    conf = torch.rand(7, 5, 4).softmax(-1).requires_grad_(True)
    w = model.learner_weights(conf)
    assert w.shape == (7, 5) and bool((w.abs() < 1).all())
    f = conf.detach().flatten(1)
    assert torch.allclose(w, torch.tanh(model.dense((f[:, :, None] * f[:, None, :]).flatten(1))), atol=1e-6)
    out = model(conf)
    assert out.shape == (7, 4)
    assert torch.allclose(out, (w[:, :, None] * conf).sum(1), atol=1e-6)
    focal_loss(out, torch.tensor([0, 1, 2, 3, 0, 1, 2]), torch.full((4,), 0.25)).backward()
    assert model.dense.weight.grad is not None and model.dense.weight.grad.abs().sum() > 0
    assert conf.grad is not None and conf.grad.shape == conf.shape


def _confidences(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Three learners: one informative, two noisy (the ensemble must learn to trust the first)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n)
    good = np.eye(4)[y] * 0.7 + 0.075
    noise = rng.dirichlet(np.ones(4), size=(n, 2))
    return np.concatenate([good[:, None], noise], 1).astype(np.float32), y


def test_train_ensemble_learns_and_resumes_exactly(tmp_path: Path) -> None:
    x, y = _confidences(200, 0)
    vx, vy = _confidences(60, 1)
    cfg = {"seed": 3, "ensemble": {"epochs": 6, "patience": 6, "lr": 1e-2, "batch_size": 20}}
    names = ["a", "b", "c"]
    summary = train_ensemble(x, y, vx, vy, cfg, tmp_path / "full", learners=names)
    assert summary["best"]["val_macro_f1"] > 0.9 and summary["epochs_run"] == 6
    model = load_ensemble(tmp_path / "full")
    probs = predict_ensemble(model, vx)
    assert probs.shape == (60, 4) and np.allclose(probs.sum(1), 1, atol=1e-5)
    assert (probs.argmax(1) == vy).mean() > 0.9
    # stop after 3 epochs, then resume to 6: same final weights as the uninterrupted run
    train_ensemble(x, y, vx, vy, {**cfg, "ensemble": {**cfg["ensemble"], "epochs": 3}}, tmp_path / "part", learners=names)
    train_ensemble(x, y, vx, vy, cfg, tmp_path / "part", learners=names, resume=True)
    full = torch.load(tmp_path / "full" / "last.pt", weights_only=True)["model"]
    part = torch.load(tmp_path / "part" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(full[k], part[k]) for k in full)
    assert (tmp_path / "full" / "config.yaml").is_file() and (tmp_path / "full" / "log.csv").read_text().count("\n") == 7


def test_ensemble_refuses_mismatched_inputs(tmp_path: Path) -> None:
    x, y = _confidences(10, 0)
    with pytest.raises(ConfigError, match=r"\(N, 2, 4\)"):
        train_ensemble(x, y, x, y, {}, tmp_path, learners=["a", "b"])
    rows = [{"path": f"i{i}", "label": "covid", "split": "val", "fold": "0", "model": m, "probs": [1, 0, 0, 0]}
            for i in range(3) for m in ("a", "b") if not (m == "b" and i == 2)]
    with pytest.raises(ConfigError, match="b: 1 image"):
        confidence_matrix(rows, ["a", "b"])
    with pytest.raises(ConfigError, match="no val predictions of model\\(s\\) c; the predictions hold a, b"):
        confidence_matrix(rows, ["a", "c"])
    with pytest.raises(ConfigError, match="got 10 and 0 images; is val_fold '7' one of"):
        train_ensemble(x, y, x[:0], y[:0], {"val_fold": 7}, tmp_path, learners=["a", "b", "c"][: x.shape[1]])
    scored = [{**r, "split": "test"} for r in rows]  # `score --predictions` rows: no out-of-fold rows to train on
    with pytest.raises(ConfigError, match=r"no val rows for a \(the predictions hold split\(s\) test\); .*`patchflannel cv`"):
        confidence_matrix(scored, ["a", "b"])
    base, cx, cy = confidence_matrix(rows[:4], ["a", "b"])
    assert cx.shape == (2, 2, 4) and cy.tolist() == [0, 0] and [b["path"] for b in base] == ["i0", "i1"]
