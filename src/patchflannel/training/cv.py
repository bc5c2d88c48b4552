"""``patchflannel cv CONFIG``: the cross-validation protocol from a splits file to predictions.csv.

Protocol (docs/training.md):

1. Learner runs: for each fold k and each learner, train on the other training folds (fold k is the
   validation set for early stopping), then predict fold k (out-of-fold, ``split=val``) and the test set
   (``split=test``, ``fold=k``).
2. Ensemble runs: every training image now has one out-of-fold confidence vector per learner, from the
   run that did not train on it. Ensemble fold k is trained on those vectors of folds other than k,
   early-stopped and evaluated on fold k (``split=val``); on the test set it is applied to the test
   confidences of learner run k (``split=test``, ``fold=k``). No test prediction enters any training.

Every learner/ensemble run has its own directory with a ``done.json`` marker holding its predictions, so a
rerun skips finished runs and resumes an interrupted one from its last.pt. With ``jobs > 1`` the learner runs
go to that many worker processes (spawned; each gets ``cpu_count // jobs`` torch threads and, on a GPU
machine, shares the one GPU); every run seeds itself, so the runs are the same as in sequence.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from rich.console import Console

from patchflannel.classes import CLASSES
from patchflannel.devices import resolve_device
from patchflannel.errors import ConfigError
from patchflannel.io.files import save_atomic
from patchflannel.settings import read_json
from patchflannel.training.datasets import read_splits
from patchflannel.training.ensemble import load_ensemble, predict_ensemble, train_ensemble
from patchflannel.training.learners import (
    LEARNER_SETTINGS,
    check_named_files,
    check_resumable,
    load_config,
    load_learner,
    predict_items,
    prepare,
    train_learner,
)
from patchflannel.training.loop import LAST_FILE, RUN_FILE
from patchflannel.training.report import evaluate_predictions, write_predictions

DONE_FILE = "done.json"
CV_SETTINGS = LEARNER_SETTINGS
"""The settings a cv folder's learner runs were made under: a resume under others is refused. Not among
them: K (a run whose predictions were made at another K is predicted again, not retrained), the list of
learners (a new one is trained) and the ensemble's settings (the ensembles are trained again, as when their
inputs change)."""
_console = Console(stderr=True)


def _write_done(run_dir: Path, payload: dict[str, Any]) -> None:
    save_atomic(run_dir / DONE_FILE, lambda tmp: tmp.write_text(json.dumps(payload) + "\n"))


def _read_done(run_dir: Path) -> dict[str, Any] | None:
    f = run_dir / DONE_FILE
    return read_json(f) if f.is_file() else None


def _serves(done: dict[str, Any] | None, cfg: dict[str, Any]) -> bool:
    """Whether a learner run's done.json holds the predictions ``cfg`` asks for (global mode: at any K)."""
    return done is not None and (done.get("k") == cfg["k"] or cfg["mode"] == "global")


def _rows_out(rows: list[dict[str, str]], probs: np.ndarray, model: str, fold: str, split: str) -> list[dict[str, Any]]:
    out = []
    for r, p in zip(rows, probs):
        out.append({"path": r["path"], "patient_id": r["patient_id"], "source": r["source"], "label": r["label"],
                    "model": model, "fold": fold, "split": split, "pred": CLASSES[int(np.argmax(p))],
                    **{f"p_{c}": float(p[i]) for i, c in enumerate(CLASSES)}})
    return out


def _learner_run(cfg: dict[str, Any], arch: str, fold: str, run_dir: Path, val_rows: list, test_rows: list,
                 resume: bool) -> dict[str, Any]:
    """Train (or resume) one learner on the folds other than ``fold`` and predict fold ``fold`` and the test set."""
    done = _read_done(run_dir) if resume else None
    if _serves(done, cfg):
        return done
    if done is None:  # trained (again): a marker left from before would pass an interrupted retrain for finished
        (run_dir / DONE_FILE).unlink(missing_ok=True)
        learner_cfg = {key: value for key, value in cfg.items() if key != "learners"}  # the cv's, not the run's
        train_learner({**learner_cfg, "arch": arch, "val_fold": fold}, run_dir, resume=resume)
    # else: trained, its predictions made at another K: only predicted again
    device = resolve_device(cfg["device"])
    model, _ = load_learner(run_dir, device)
    preds = {}
    for split, rows in (("val", val_rows), ("test", test_rows)):
        p = predict_items(model, prepare(cfg, rows, device), cfg, cfg["k"], device, f"{arch} fold {fold} {split}")
        preds[split] = {"paths": [r["path"] for r in rows], "confidence": p["confidence"].tolist(),
                        "mean_softmax": p["mean_softmax"].tolist()}
    payload = {"arch": arch, "fold": fold, "mode": cfg["mode"], "k": cfg["k"], "predictions": preds}
    _write_done(run_dir, payload)
    return payload


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def _parallel_learner_runs(tasks: list[tuple], jobs: int) -> None:
    """Run ``_learner_run(*task)`` for each task in ``jobs`` spawned processes; the first failure is raised."""
    threads = max(1, (os.cpu_count() or 1) // jobs)
    _console.print(f"{len(tasks)} learner runs in {jobs} processes ({threads} threads each)", markup=False,
                   highlight=False)
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_init_worker, initargs=(threads,)) as pool:
        futures = {pool.submit(_learner_run, *task): task for task in tasks}
        try:
            for n, future in enumerate(as_completed(futures), 1):
                if future.exception() is not None:  # said now: the queued runs are dropped, the running ones end
                    pool.shutdown(wait=False, cancel_futures=True)
                    future.result()
                task = futures[future]
                _console.print(f"[{n}/{len(tasks)}] learner {task[1]} fold {task[2]} done", markup=False,
                               highlight=False)
        except KeyboardInterrupt:  # Ctrl-C reaches the workers too; SIGTERM to this process alone does not
            for process in list((getattr(pool, "_processes", None) or {}).values()):  # no public way before 3.14
                process.terminate()  # their runs keep their last checkpoints: the same command resumes them
            pool.shutdown(wait=False, cancel_futures=True)
            raise


def _ensemble_runs(cfg: dict[str, Any], out: Path, folds: list[str], archs: list[str], names: list[str],
                   train_rows: list[dict[str, str]], test_rows: list[dict[str, str]],
                   conf: dict[tuple[str, str, str], np.ndarray], resume: bool) -> list[dict[str, Any]]:
    """Train (or keep) the ensemble of each fold on the learners' out-of-fold confidences ``conf`` ((arch, fold,
    split) -> (N, 4)); its prediction rows for its fold and the test set."""
    # Out-of-fold confidence of every training image, from the run that held its fold out.
    order = [r for f in folds for r in train_rows if r["fold"] == f]
    oof = np.concatenate([np.stack([conf[(a, f, "val")] for a in archs], 1) for f in folds])
    labels = np.array([CLASSES.index(r["label"]) for r in order])
    fold_of = np.array([r["fold"] for r in order])
    ens_name = f"flannel_{cfg['mode']}"
    # What the ensembles are trained on and how: redone learner runs give other out-of-fold confidences, and
    # other ensemble settings another training, hence new ensembles.
    how = json.dumps({"ensemble": cfg["ensemble"], "seed": cfg["seed"]}, sort_keys=True).encode()
    inputs = hashlib.sha256(oof.tobytes() + labels.tobytes() + fold_of.astype(str).tobytes() + how).hexdigest()
    predictions: list[dict[str, Any]] = []
    for fold in folds:
        run_dir = out / "ensemble" / f"fold{fold}"
        hold = fold_of == fold
        done, started = _read_done(run_dir), run_dir / "inputs.sha256"
        if not resume or done is None or done.get("inputs") != inputs:
            _console.print(f"ensemble fold {fold}", markup=False, highlight=False)
            # An unfinished run continues only on the inputs it started with.
            again = resume and done is None and started.is_file() and started.read_text() == inputs
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / DONE_FILE).unlink(missing_ok=True)  # see _learner_run
            started.write_text(inputs)
            train_ensemble(oof[~hold], labels[~hold], oof[hold], labels[hold], cfg, run_dir, learners=names,
                           resume=again)
            _write_done(run_dir, {"fold": fold, "inputs": inputs})
        model = load_ensemble(run_dir)
        predictions += _rows_out([r for r, h in zip(order, hold) if h], predict_ensemble(model, oof[hold]),
                                 ens_name, fold, "val")
        test_x = np.stack([conf[(a, fold, "test")] for a in archs], 1)
        predictions += _rows_out(test_rows, predict_ensemble(model, test_x), ens_name, fold, "test")
    return predictions


def run_cv(config: str | Path | dict[str, Any], out_dir: str | Path, resume: bool = True,
           report: bool = True, jobs: int = 1) -> dict[str, Any]:
    """Run the protocol of this module's docstring; writes ``out_dir/predictions.csv`` (and ``report/``).

    Config keys: ``splits``, ``learners`` (architectures in ensemble order), ``mode`` and the rest of
    training.learners.DEFAULTS. ``jobs``: learner runs at a time (worker processes). Returns
    ``{predictions, report, learners, folds}``.
    """
    if jobs < 1:
        raise ConfigError(f"jobs must be at least 1, got {jobs}")
    cfg = load_config(config, "cv")
    for key in ("splits", "learners"):
        if not cfg.get(key):
            raise ConfigError(f"a cv config needs '{key}'")
    out = Path(out_dir)
    single = next((out / name for name in (RUN_FILE, LAST_FILE) if (out / name).is_file()), None)
    if single is not None:  # --restart or not: the cv's files would mix with that run's
        raise ConfigError(f"{out} holds a single training run ({single.name}), not a cv run: use another --out")
    if resume:  # before any work, and before config.yaml records the new settings
        check_resumable(out, cfg, CV_SETTINGS, "pass --restart to retrain every run, or use another --out")
    rows = read_splits(cfg["splits"])
    train_rows = [r for r in rows if r["split"] == "train"]
    test_rows = [r for r in rows if r["split"] == "test"]
    folds = sorted({r["fold"] for r in train_rows}, key=int)
    if len(folds) < 2 or not test_rows:
        raise ConfigError(f"{cfg['splits']}: needs at least 2 folds and a test set (found folds {folds}, "
                          f"{len(test_rows)} test images)")
    archs = list(cfg["learners"])
    names = [f"{a}_{cfg['mode']}" for a in archs]
    _console.print(f"cv: {len(archs)} learners x {len(folds)} folds, mode {cfg['mode']}, "
                   f"{len(train_rows)} training and {len(test_rows)} test images", markup=False, highlight=False)
    run_dirs = {(a, f): out / "learners" / a / f"fold{f}" for a in archs for f in folds}
    finished = {key: _read_done(d) for key, d in run_dirs.items()} if resume else {}  # done.json as the run starts
    check_named_files(cfg, sorted({a for (a, f) in run_dirs if finished.get((a, f)) is None}))
    out.mkdir(parents=True, exist_ok=True)  # recorded once the splits file and the weights files have passed
    (out / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    prepare(cfg, rows, resolve_device(cfg["device"]))  # masks and cached arrays once for all runs
    val_by_fold = {fold: [r for r in train_rows if r["fold"] == fold] for fold in folds}
    pooled: set[Path] = set()  # runs the worker processes just made: read below, never trained again
    if jobs > 1:
        tasks = [(cfg, arch, fold, run_dirs[(arch, fold)], val_by_fold[fold], test_rows, resume)
                 for fold in folds for arch in archs if not _serves(finished.get((arch, fold)), cfg)]
        if tasks:
            _parallel_learner_runs(tasks, min(jobs, len(tasks)))
        pooled = {task[3] for task in tasks}

    predictions: list[dict[str, Any]] = []
    conf: dict[tuple[str, str, str], np.ndarray] = {}  # (arch, fold, split) -> (N, 4)
    for fold in folds:
        val_rows = val_by_fold[fold]
        for arch, name in zip(archs, names):
            run_dir = run_dirs[(arch, fold)]
            earlier = finished.get((arch, fold))
            state = ("trained in a worker process" if run_dir in pooled else "finished earlier, kept"
                     if _serves(earlier, cfg) else f"trained, predicting again at K={cfg['k']}" if earlier else "")
            _console.print(f"learner {arch} fold {fold}{': ' + state if state else ''}", markup=False, highlight=False)
            done = _learner_run(cfg, arch, fold, run_dir, val_rows, test_rows, resume or run_dir in pooled)
            for split, split_rows in (("val", val_rows), ("test", test_rows)):
                if done["predictions"][split]["paths"] != [r["path"] for r in split_rows]:
                    raise ConfigError(f"{out}/learners/{arch}/fold{fold}: its predictions are for other images "
                                      "than the splits file holds now; use a fresh output folder")
                c = np.array(done["predictions"][split]["confidence"], dtype=np.float32).reshape(-1, len(CLASSES))
                conf[(arch, fold, split)] = c
                predictions += _rows_out(split_rows, c, name, fold, split)

    predictions += _ensemble_runs(cfg, out, folds, archs, names, train_rows, test_rows, conf, resume)

    pred_file = write_predictions(predictions, out / "predictions.csv")
    result: dict[str, Any] = {"predictions": str(pred_file), "learners": names, "folds": folds}
    if report:
        evaluate_predictions(pred_file, out / "report")
        result["report"] = str(out / "report")
    elif (out / "report").is_dir():  # an earlier run's report would sit beside predictions it was not made from
        shutil.rmtree(out / "report")
        _console.print(f"removed {out / 'report'}: it was an earlier run's (`patchflannel eval {pred_file} --out "
                       f"{out / 'report'}` writes this run's)", markup=False, highlight=False, soft_wrap=True)
    _console.print(f"cv done: {pred_file}", markup=False, highlight=False)
    return result
