"""Training of the FLANNEL ensemble (SPEC.md stage 3) on out-of-fold learner confidences only.

Inputs are (N, n_learners, 4) confidence arrays (learner order fixed) whose every row was predicted by a
learner run that did not train on that image; test-set predictions never enter training. Focal loss with
alpha = normalised inverse class frequency of the training labels, Adam (lr 1e-5, weight decay 1e-4 by
default), batch 20, early stopping on validation macro-F1.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from sklearn.metrics import f1_score

from patchflannel.classes import CLASS_INDEX
from patchflannel.errors import ConfigError
from patchflannel.models import get_model
from patchflannel.models.ensemble import NeuralWeightModule
from patchflannel.models.losses import class_alpha, focal_loss
from patchflannel.settings import read_json
from patchflannel.training.learners import ENSEMBLE_SETTINGS, HOW_LONG, SPEED_ONLY, check_resumable, load_config
from patchflannel.training.loop import BEST_FILE, LAST_FILE, RUN_FILE, Trainer, seed_everything
from patchflannel.training.report import read_predictions


def train_ensemble(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray,
                   config: dict[str, Any], run_dir: str | Path, *, learners: list[str], resume: bool = False) -> dict:
    """Train the neural weight module on (N, n, 4) out-of-fold confidences; early stopping on ``val_x``.

    ``config`` is a full config (see training.learners.DEFAULTS; its ``ensemble`` section and ``seed`` are
    used). Writes config.yaml, run.json, best.pt, last.pt and log.csv to ``run_dir``.
    """
    cfg = load_config(config)
    ec = cfg["ensemble"]
    if train_x.ndim != 3 or train_x.shape[1] != len(learners) or val_x.shape[1:] != train_x.shape[1:]:
        raise ConfigError(f"ensemble inputs must be (N, {len(learners)}, 4); got {train_x.shape} and {val_x.shape}")
    if len(train_x) == 0 or len(val_x) == 0:
        raise ConfigError(f"the ensemble needs non-empty training and validation sets (got {len(train_x)} and "
                          f"{len(val_x)} images; is val_fold {cfg.get('val_fold')!r} one of the predictions' folds?)")
    run_dir = Path(run_dir)
    if resume:
        check_resumable(run_dir, cfg, ENSEMBLE_SETTINGS, "train into a new --out instead", SPEED_ONLY + HOW_LONG)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    seed_everything(cfg["seed"])
    model = get_model("flannel", n_learners=len(learners))
    x, y = torch.as_tensor(train_x, dtype=torch.float32), torch.as_tensor(train_y, dtype=torch.long)
    vx, vy = torch.as_tensor(val_x, dtype=torch.float32), np.asarray(val_y)
    alpha = class_alpha(y)
    optimizer = torch.optim.Adam(model.parameters(), lr=ec["lr"], weight_decay=ec["weight_decay"])

    def train_one_epoch(epoch: int) -> dict[str, float]:
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(cfg["seed"] * 1_000_003 + epoch))
        total = 0.0
        for idx in order.split(ec["batch_size"]):
            loss = focal_loss(model(x[idx]), y[idx], alpha, ec["gamma"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(idx)
        return {"focal_loss": total / len(x)}

    def evaluate(epoch: int) -> dict[str, float]:
        logits = model(vx)
        pred = logits.argmax(1).numpy()
        return {"focal_loss": float(focal_loss(logits, torch.as_tensor(vy), alpha, ec["gamma"])),
                "macro_f1": float(f1_score(vy, pred, labels=[0, 1, 2, 3], average="macro", zero_division=0))}

    info = {"task": "ensemble", "arch": "flannel", "arch_config": {"n_learners": len(learners)}, "learners": learners,
            "config": cfg, "alpha": alpha.tolist(), "n_train": len(x), "n_val": len(vx)}
    trainer = Trainer(run_dir, model, optimizer, monitor="val_macro_f1", mode="max", patience=ec["patience"],
                      max_epochs=ec["epochs"], run_info=info)
    return trainer.fit(train_one_epoch, evaluate, resume=resume and (run_dir / LAST_FILE).is_file())


def load_ensemble(run_dir: str | Path) -> NeuralWeightModule:
    """The best ensemble of a run directory (best.pt, ``weights_only``), in eval mode."""
    run_dir = Path(run_dir)
    info = read_json(run_dir / RUN_FILE)
    model = get_model("flannel", **info["arch_config"])
    model.load_state_dict(torch.load(run_dir / BEST_FILE, map_location="cpu", weights_only=True))
    return model.eval()


@torch.no_grad()
def predict_ensemble(model: NeuralWeightModule, x: np.ndarray) -> np.ndarray:
    """(N, n, 4) learner confidences -> (N, 4) ensemble probabilities."""
    return model(torch.as_tensor(x, dtype=torch.float32)).softmax(-1).numpy()


def confidence_matrix(rows: list[dict[str, Any]],
                      learners: list[str]) -> tuple[list[dict[str, Any]], np.ndarray, np.ndarray]:
    """Stack the learners' confidences of the out-of-fold (``val``) prediction rows per image.

    Returns the first learner's rows (image identity, fold), the (N, n, 4) confidences in ``learners``
    order and the (N,) label indices. Every image must have a row for every learner.
    """
    by_model: dict[str, dict[str, dict[str, Any]]] = {m: {} for m in learners}
    absent = [m for m in learners if not any(r["model"] == m for r in rows)]
    if absent:
        have = sorted({r["model"] for r in rows})
        raise ConfigError(f"no val predictions of model(s) {', '.join(absent)}; the predictions hold "
                          f"{', '.join(have) or 'none'} (a model is named <arch>_<mode>, as cv writes it)")
    for r in rows:
        if r["split"] == "val" and r["model"] in by_model:
            by_model[r["model"]][r["path"]] = r
    base = list(by_model[learners[0]].values())
    if not base:
        splits = sorted({r["split"] for r in rows})
        raise ConfigError(f"no val rows for {learners[0]} (the "
                          f"predictions hold split(s) {', '.join(splits) or 'none'}); the ensemble trains on the "
                          "out-of-fold 'val' rows that `patchflannel cv` writes, not on `score --predictions` rows")
    missing = [f"{m}: {len([b for b in base if b['path'] not in by_model[m]])} image(s)" for m in learners
               if any(b["path"] not in by_model[m] for b in base) or len(by_model[m]) != len(base)]
    if missing:
        raise ConfigError(f"learners' val predictions do not cover the same images ({'; '.join(missing)})")
    x = np.array([[by_model[m][b["path"]]["probs"] for m in learners] for b in base], dtype=np.float32)
    y = np.array([CLASS_INDEX[b["label"]] for b in base])
    return base, x, y


def train_ensemble_from_predictions(config: str | Path | dict[str, Any], run_dir: str | Path,
                                    resume: bool = False) -> dict:
    """`train ensemble CONFIG`: train on the out-of-fold (``val``) rows of ``predictions`` of folds other than
    ``val_fold``, early-stop on ``val_fold``. Config keys: ``predictions``, ``learners`` (model names in order),
    ``val_fold``, plus the ``ensemble`` section."""
    cfg = load_config(config, "train ensemble")
    for key in ("predictions", "learners", "val_fold"):
        if cfg.get(key) is None:
            raise ConfigError(f"an ensemble config needs '{key}'")
    base, x, y = confidence_matrix(read_predictions(cfg["predictions"]), list(cfg["learners"]))
    fold = np.array([b["fold"] for b in base]) == str(cfg["val_fold"])
    return train_ensemble(x[~fold], y[~fold], x[fold], y[fold], cfg, run_dir, learners=list(cfg["learners"]),
                          resume=resume)

