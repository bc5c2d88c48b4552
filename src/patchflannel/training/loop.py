"""The shared training loop: epochs, validation, early stopping, checkpoints, resume and a CSV log.

A run directory holds:

- ``run.json``: the caller's ``run_info`` plus ``status``, ``best_epoch``, ``best`` (metrics of the best
  epoch), ``epochs_run`` and ``stopped_early``; rewritten after every epoch.
- ``best.pt``: the model's state_dict at the best epoch (``torch.load(..., weights_only=True)``).
- ``last.pt``: everything needed to continue exactly (model, optimizer, scheduler, epoch, best value, bad
  epochs, torch/numpy/python RNG states), weights_only-loadable, written atomically.
- ``log.csv``: one row per epoch: epoch, lr, ``train_*`` metrics, ``val_*`` metrics, seconds.

Metric names: the dict returned by ``train_one_epoch`` is prefixed ``train_`` and the one returned by
``evaluate`` ``val_``; ``monitor`` and ``scheduler_metric`` name prefixed keys (e.g. ``val_jaccard``).
"""

from __future__ import annotations

import csv
import json
import math
import random
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

from patchflannel.errors import ConfigError
from patchflannel.io.files import save_atomic
from patchflannel.settings import read_json

RUN_FILE = "run.json"
BEST_FILE = "best.pt"
LAST_FILE = "last.pt"
LOG_FILE = "log.csv"

_console = Console(stderr=True)


def progress_bar() -> Progress:
    """A transient progress bar on stderr (stdout is for results): description, bar, n of total, time, and the
    task's ``status`` field."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("{task.fields[status]}"), console=_console, transient=True)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    """The global generators' states as tensors and plain Python values (weights_only-safe)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _cpu_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    out = OrderedDict((k, v.detach().to("cpu", copy=True)) for k, v in state.items())
    out._metadata = getattr(state, "_metadata", None)  # type: ignore[attr-defined]  # layer versions (mnasnet)
    return out


def _atomic_save(obj: Any, path: Path) -> None:
    save_atomic(path, lambda tmp: torch.save(obj, tmp))


def read_run(run_dir: str | Path) -> dict[str, Any]:
    """A finished training run's ``run.json``; ConfigError when the folder is not one."""
    run_dir = Path(run_dir)
    info_file, best = run_dir / RUN_FILE, run_dir / BEST_FILE
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir}: {'not a folder' if run_dir.exists() else 'no such folder'} (a training run's)")
    for p in (info_file, best):
        if not p.is_file():
            raise ConfigError(f"{run_dir}: not a finished training run ({p.name} missing)")
    info = read_json(info_file)
    if "arch" not in info:
        raise ConfigError(f"{info_file}: no 'arch' recorded")
    return info


class Trainer:
    """Runs ``train_one_epoch`` / ``evaluate`` epochs with early stopping on ``monitor`` and checkpoints."""

    def __init__(self, run_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer, *, monitor: str,
                 mode: str = "max", patience: int, max_epochs: int, scheduler: Any = None,
                 scheduler_metric: str | None = None, run_info: dict | None = None) -> None:
        if mode not in ("max", "min"):
            raise ConfigError(f"Trainer mode must be 'max' or 'min', got {mode!r}")
        if patience < 1 or max_epochs < 1:
            raise ConfigError(f"patience and max_epochs must be >= 1 (got {patience}, {max_epochs})")
        self.run_dir = Path(run_dir)
        self.model = model
        self.optimizer = optimizer
        self.monitor = monitor
        self.mode = mode
        self.patience = patience
        self.max_epochs = max_epochs
        self.scheduler = scheduler
        self.scheduler_metric = scheduler_metric
        self.run_info = dict(run_info or {})

    def _better(self, value: float, best: float) -> bool:
        if math.isnan(value):
            return False
        return value > best if self.mode == "max" else value < best

    def _load_last(self) -> dict[str, Any]:
        path = self.run_dir / LAST_FILE
        if not path.is_file():
            raise ConfigError(f"{self.run_dir}: cannot resume, no {LAST_FILE} in the run directory")
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.scheduler is not None and ckpt.get("scheduler") is not None:
            self.scheduler.load_state_dict(ckpt["scheduler"])
        _set_rng_state(ckpt["rng"])
        return ckpt

    def _log_rows(self, keep_below: int) -> list[dict[str, str]]:
        path = self.run_dir / LOG_FILE
        if not path.is_file():
            return []
        with open(path, newline="") as fh:
            return [r for r in csv.DictReader(fh) if int(r["epoch"]) < keep_below]

    def _write_log(self, rows: list[dict[str, Any]]) -> None:
        fields = list(dict.fromkeys(k for r in rows for k in r))

        def write(tmp: Path) -> None:
            with open(tmp, "w", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=fields)
                writer.writeheader()
                writer.writerows(rows)

        save_atomic(self.run_dir / LOG_FILE, write)

    def _summary(self, best_epoch: int, best_metrics: dict[str, float], epochs_run: int, stopped: bool) -> dict:
        return {"best_epoch": best_epoch, "best": best_metrics, "epochs_run": epochs_run, "stopped_early": stopped}

    def _write_run(self, summary: dict, status: str) -> None:
        info = {**self.run_info, **summary, "status": status, "monitor": self.monitor, "monitor_mode": self.mode}
        text = json.dumps(info, indent=2, default=str) + "\n"
        save_atomic(self.run_dir / RUN_FILE, lambda tmp: tmp.write_text(text))

    def fit(self, train_one_epoch: Callable[[int], dict[str, float]], evaluate: Callable[[int], dict[str, float]],
            resume: bool = False) -> dict:
        """Train until ``max_epochs`` or ``patience`` epochs without improvement of ``monitor``.

        ``resume=True`` continues from ``last.pt`` to the same final state as an uninterrupted run.
        Returns ``{best_epoch, best, epochs_run, stopped_early}`` (epochs are 0-based).
        """
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for stale in self.run_dir.glob("*.tmp*"):  # a hard kill's half-written file (save_atomic's temporary name)
            stale.unlink(missing_ok=True)
        start, best_epoch, bad, stopped = 0, -1, 0, False
        best_value = -math.inf if self.mode == "max" else math.inf
        best_metrics: dict[str, float] = {}
        if resume:
            ckpt = self._load_last()
            start, best_epoch, bad = ckpt["epoch"] + 1, ckpt["best_epoch"], ckpt["bad_epochs"]
            best_value, best_metrics = ckpt["best_value"], dict(ckpt["best_metrics"])
            stopped = bad >= self.patience  # as recorded under the same patience; a longer one trains on
            if best_epoch == ckpt["epoch"]:  # stopped between last.pt and best.pt: its weights are the best
                _atomic_save(ckpt["model"], self.run_dir / BEST_FILE)
            run_file = self.run_dir / RUN_FILE
            if run_file.is_file():
                self.run_info = {**read_json(run_file), **self.run_info}
        rows: list[dict[str, Any]] = self._log_rows(start) if resume else []
        epochs_run = start
        for epoch in range(start, self.max_epochs if not stopped else start):
            t0 = time.perf_counter()
            lr = self.optimizer.param_groups[0]["lr"]
            self.model.train()
            train = {f"train_{k}": float(v) for k, v in train_one_epoch(epoch).items()}
            self.model.eval()
            with torch.no_grad():
                val = {f"val_{k}": float(v) for k, v in evaluate(epoch).items()}
            metrics = {**train, **val}
            if self.monitor not in metrics:
                raise ConfigError(f"monitor {self.monitor!r} is not among the epoch metrics {sorted(metrics)}")
            if self._better(metrics[self.monitor], best_value):
                best_value, best_epoch, best_metrics, bad = metrics[self.monitor], epoch, metrics, 0
            else:
                bad += 1
            stopped = bad >= self.patience
            if self.scheduler is not None:
                if self.scheduler_metric is None:
                    self.scheduler.step()
                elif self.scheduler_metric not in metrics:
                    raise ConfigError(f"scheduler_metric {self.scheduler_metric!r} is not among {sorted(metrics)}")
                else:
                    self.scheduler.step(metrics[self.scheduler_metric])
            seconds = time.perf_counter() - t0
            rows.append({"epoch": epoch, "lr": lr, **metrics, "seconds": round(seconds, 3)})
            self._write_log(rows)
            summary = self._summary(best_epoch, best_metrics, epoch + 1, stopped)
            self._write_run(summary, "stopped_early" if stopped else "running")
            _atomic_save({
                "model": _cpu_state_dict(self.model), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                "epoch": epoch, "best_epoch": best_epoch, "best_value": best_value, "best_metrics": best_metrics,
                "bad_epochs": bad, "stopped": stopped, "rng": _rng_state(),
            }, self.run_dir / LAST_FILE)
            if best_epoch == epoch:  # after last.pt, which then holds the same weights (resume restores best.pt)
                _atomic_save(_cpu_state_dict(self.model), self.run_dir / BEST_FILE)
            shown = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())
            mark = " *" if best_epoch == epoch else ""
            _console.print(f"epoch {epoch:3d}  lr {lr:.2e}  {shown}  {seconds:.1f}s{mark}", markup=False, highlight=False)
            epochs_run = epoch + 1
            if stopped:
                break
        summary = self._summary(best_epoch, best_metrics, epochs_run, stopped)
        self._write_run(summary, "stopped_early" if stopped else "finished")
        return summary
