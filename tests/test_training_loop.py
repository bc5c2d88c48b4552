"""The shared Trainer: early stopping, best.pt selection, exact resume, scheduler stepping, run files."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from patchflannel.errors import ConfigError
from patchflannel.training.loop import Trainer, seed_everything


def _rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "log.csv", newline="") as fh:
        return list(csv.DictReader(fh))


class Scripted:
    """A tiny regression trained by SGD on random data; validation metric read from a script."""

    def __init__(self, val_scores: list[float]) -> None:
        seed_everything(0)
        self.model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.3), nn.Linear(8, 1))
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.05, momentum=0.9)
        self.val_scores = val_scores
        self.snapshots: dict[int, dict[str, torch.Tensor]] = {}

    def train(self, epoch: int) -> dict[str, float]:
        x = torch.randn(16, 4)
        loss = ((self.model(x).squeeze(1) - x.sum(1)) ** 2).mean()
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        self.snapshots[epoch] = {k: v.clone() for k, v in self.model.state_dict().items()}
        return {"loss": loss.item()}

    def evaluate(self, epoch: int) -> dict[str, float]:
        return {"score": self.val_scores[epoch]}


def test_early_stopping_keeps_the_best_epoch(tmp_path: Path) -> None:
    s = Scripted([0.1, 0.5, 0.3, 0.4, 0.2, 0.9, 0.95])
    trainer = Trainer(tmp_path, s.model, s.opt, monitor="val_score", patience=3, max_epochs=7,
                      run_info={"task": "demo"})
    summary = trainer.fit(s.train, s.evaluate)
    assert summary["best_epoch"] == 1
    assert summary["epochs_run"] == 5  # epochs 2, 3, 4 bring no improvement: stop after epoch 4
    assert summary["stopped_early"] is True
    assert summary["best"]["val_score"] == 0.5
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    for k, v in s.snapshots[1].items():
        assert torch.equal(best[k], v)
    assert not torch.equal(best["0.weight"], s.snapshots[4]["0.weight"])
    rows = _rows(tmp_path)
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2, 3, 4]
    assert list(rows[0]) == ["epoch", "lr", "train_loss", "val_score", "seconds"]
    info = json.loads((tmp_path / "run.json").read_text())
    assert info["task"] == "demo" and info["best_epoch"] == 1 and info["status"] == "stopped_early"


def test_a_stopped_run_resumed_with_more_patience_trains_on(tmp_path: Path) -> None:
    """docs/training.md: a resume may train longer. The stop is the recorded patience's, not a fixed state."""
    scores = [0.1, 0.5, 0.3, 0.4, 0.2, 0.9, 0.95]
    s = Scripted(scores)
    first = Trainer(tmp_path, s.model, s.opt, monitor="val_score", patience=2, max_epochs=7).fit(s.train, s.evaluate)
    assert first["stopped_early"] and first["epochs_run"] == 4
    s2 = Scripted(scores)
    (tmp_path / "best.123-456.tmp.pt").write_bytes(b"half")  # what a SIGKILL leaves of a checkpoint: removed
    again = Trainer(tmp_path, s2.model, s2.opt, monitor="val_score", patience=4, max_epochs=7).fit(
        s2.train, s2.evaluate, resume=True)
    assert again["epochs_run"] == 7 and again["best_epoch"] == 6 and not again["stopped_early"]
    assert [int(r["epoch"]) for r in _rows(tmp_path)] == list(range(7))
    assert not list(tmp_path.glob("*.tmp*"))


def test_min_mode_and_max_epochs(tmp_path: Path) -> None:
    s = Scripted([3.0, 2.0, 2.5, 1.0])
    summary = Trainer(tmp_path, s.model, s.opt, monitor="val_score", mode="min", patience=5,
                      max_epochs=4).fit(s.train, s.evaluate)
    assert summary == {"best_epoch": 3, "best": summary["best"], "epochs_run": 4, "stopped_early": False}
    assert json.loads((tmp_path / "run.json").read_text())["status"] == "finished"


def test_plateau_scheduler_is_stepped_with_its_metric(tmp_path: Path) -> None:
    s = Scripted([0.5] * 6)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(s.opt, mode="max", factor=0.1, patience=1)
    Trainer(tmp_path, s.model, s.opt, monitor="val_score", patience=10, max_epochs=6, scheduler=sched,
            scheduler_metric="val_score").fit(s.train, s.evaluate)
    lrs = [float(r["lr"]) for r in _rows(tmp_path)]
    assert lrs[:3] == [0.05, 0.05, 0.05]
    assert lrs[3] == pytest.approx(0.005)
    assert lrs[-1] < lrs[3]


class Interrupt(Exception):
    pass


def _run(run_dir: Path, interrupt_at: int | None, resume: bool) -> Scripted:
    s = Scripted([0.1, 0.2, 0.15, 0.3, 0.25, 0.26])
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(s.opt, mode="max", factor=0.5, patience=0)

    def train(epoch: int) -> dict[str, float]:
        if epoch == interrupt_at:
            raise Interrupt
        return s.train(epoch)

    trainer = Trainer(run_dir, s.model, s.opt, monitor="val_score", patience=4, max_epochs=6, scheduler=sched,
                      scheduler_metric="val_score")
    try:
        trainer.fit(train, s.evaluate, resume=resume)
    except Interrupt:
        pass
    return s


def test_resume_after_interruption_matches_uninterrupted_run(tmp_path: Path) -> None:
    full = _run(tmp_path / "full", None, False)
    _run(tmp_path / "cut", 3, False)
    assert [int(r["epoch"]) for r in _rows(tmp_path / "cut")] == [0, 1, 2]
    seed_everything(12345)  # the resumed process's generators start elsewhere; last.pt restores them
    resumed = _run(tmp_path / "cut", None, True)
    for k, v in full.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[k], v), k
    assert resumed.opt.param_groups[0]["lr"] == full.opt.param_groups[0]["lr"]
    drop = ("seconds",)
    strip = [{k: v for k, v in r.items() if k not in drop} for r in _rows(tmp_path / "full")]
    assert strip == [{k: v for k, v in r.items() if k not in drop} for r in _rows(tmp_path / "cut")]
    for name in ("best.pt",):
        a = torch.load(tmp_path / "full" / name, weights_only=True)
        b = torch.load(tmp_path / "cut" / name, weights_only=True)
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_stopped_between_last_and_best_resumes_with_the_right_best(tmp_path: Path) -> None:
    """Epoch 3 improves; the process dies after last.pt but before best.pt: resuming restores best.pt."""
    full = _run(tmp_path / "full", None, False)
    cut = _run(tmp_path / "cut", 4, False)
    torch.save(cut.snapshots[1], tmp_path / "cut" / "best.pt")  # best.pt as epoch 3 had left it: epoch 1's
    _run(tmp_path / "cut", None, True)
    a = torch.load(tmp_path / "full" / "best.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "best.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(a[k], full.snapshots[3][k]) for k in a)


def test_last_checkpoint_loads_weights_only(tmp_path: Path) -> None:
    s = Scripted([0.1, 0.2])
    Trainer(tmp_path, s.model, s.opt, monitor="val_score", patience=2, max_epochs=2).fit(s.train, s.evaluate)
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    assert last["epoch"] == 1 and last["best_epoch"] == 1
    assert set(last) >= {"model", "optimizer", "rng", "bad_epochs", "best_value"}


def test_unknown_monitor_is_refused_by_name(tmp_path: Path) -> None:
    s = Scripted([0.1])
    with pytest.raises(ConfigError, match="val_jaccard"):
        Trainer(tmp_path, s.model, s.opt, monitor="val_jaccard", patience=1, max_epochs=1).fit(s.train, s.evaluate)


def test_resume_without_checkpoint_is_refused(tmp_path: Path) -> None:
    s = Scripted([0.1])
    with pytest.raises(ConfigError, match="last.pt"):
        Trainer(tmp_path, s.model, s.opt, monitor="val_score", patience=1, max_epochs=1).fit(
            s.train, s.evaluate, resume=True)
