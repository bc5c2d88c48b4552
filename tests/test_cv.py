"""`patchflannel cv` end to end on a small real subset: learners per fold, out-of-fold ensemble, resume."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import typer
import yaml
from sklearn.metrics import f1_score
from test_learners import small_splits
from typer.testing import CliRunner

from patchflannel.bundle import random_bundle
from patchflannel.classes import CLASSES
from patchflannel.cli.learn import register, register_train
from patchflannel.errors import BundleError, ConfigError
from patchflannel.training.cv import run_cv
from patchflannel.training.datasets import read_splits

LEARNERS = ["squeezenet1_1", "shufflenet_v2_x0_5"]


def _read(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _check_protocol(out: Path, splits: Path, mode: str) -> list[dict]:
    rows = read_splits(splits)
    fold_of = {r["path"]: r["fold"] for r in rows if r["split"] == "train"}
    test = {r["path"] for r in rows if r["split"] == "test"}
    folds = sorted(set(fold_of.values()))
    preds = _read(out / "predictions.csv")
    for model in [f"{a}_{mode}" for a in LEARNERS] + [f"flannel_{mode}"]:
        val = [p for p in preds if p["model"] == model and p["split"] == "val"]
        # every training image predicted exactly once, by the run that held its fold out
        assert sorted(p["path"] for p in val) == sorted(fold_of)
        assert all(p["fold"] == fold_of[p["path"]] for p in val)
        tst = [p for p in preds if p["model"] == model and p["split"] == "test"]
        assert len(tst) == len(test) * len(folds) and {p["path"] for p in tst} == test
        for p in val + tst:
            probs = np.array([float(p[f"p_{c}"]) for c in CLASSES])
            assert abs(probs.sum() - 1) < 1e-4 and p["pred"] == CLASSES[int(probs.argmax())]
    for arch in LEARNERS:
        for f in folds:
            run = out / "learners" / arch / f"fold{f}"
            info = json.loads((run / "run.json").read_text())
            assert info["val_fold"] == f and info["config"]["mode"] == mode and (run / "best.pt").is_file()
    ens = json.loads((out / "ensemble" / "fold0" / "run.json").read_text())
    assert ens["learners"] == [f"{a}_{mode}" for a in LEARNERS]
    assert ens["n_train"] + ens["n_val"] == len(fold_of)  # out-of-fold training rows only, no test row
    report = json.loads((out / "report" / "report.json").read_text())
    g = next(g for g in report["groups"] if (g["split"], g["model"], g["source"]) == ("val", f"flannel_{mode}", "all"))
    val = [p for p in preds if p["model"] == f"flannel_{mode}" and p["split"] == "val"]
    assert g["pooled"]["macro_f1"] == pytest.approx(f1_score([p["label"] for p in val], [p["pred"] for p in val],
                                                             labels=list(CLASSES), average="macro", zero_division=0))
    return preds


def _config(tmp_path: Path, splits: Path, mode: str, **extra: object) -> Path:
    cfg = {"splits": str(splits), "mode": mode, "learners": LEARNERS, "cache_dir": str(tmp_path / "cache"),
           "k": 3, "k_val": 2, "learner": {"epochs": 1, "patience": 1, "batch_size": 8, "lr": 1e-3},
           "ensemble": {"epochs": 2, "patience": 2, "lr": 1e-3}, **extra}
    path = tmp_path / f"cv_{mode}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.slow
def test_cv_global_end_to_end_and_resume(cxr4_dir: Path, tmp_path: Path) -> None:
    splits = small_splits(cxr4_dir, tmp_path / "splits.csv", per_class=6)
    config = _config(tmp_path, splits, "global")
    run_cv(config, tmp_path / "out")
    preds = _check_protocol(tmp_path / "out", splits, "global")
    log = tmp_path / "out" / "learners" / LEARNERS[0] / "fold0" / "log.csv"
    stamp = log.stat().st_mtime_ns
    app = typer.Typer()
    register(app)
    result = CliRunner().invoke(app, ["cv", str(config), "--out", str(tmp_path / "out"), "--no-report"])
    assert result.exit_code == 0, result.output
    assert log.stat().st_mtime_ns == stamp  # finished runs are skipped, not retrained
    assert f"learner {LEARNERS[0]} fold 0: finished earlier, kept" in result.output
    assert _read(tmp_path / "out" / "predictions.csv") == preds
    # --no-report leaves no earlier report beside the predictions (a changed ensemble would not match it)
    assert not (tmp_path / "out" / "report").exists() and "it was an earlier run's" in result.output

    # Other settings are refused before any work, and config.yaml keeps the ones the runs were made under.
    recorded = (tmp_path / "out" / "config.yaml").read_text()
    changed = _config(tmp_path, splits, "global", learner={"epochs": 1, "patience": 1, "batch_size": 8, "lr": 1e-2})
    result = CliRunner().invoke(app, ["cv", str(changed), "--out", str(tmp_path / "out"), "--no-report"])
    assert result.exit_code == 2 and "learner.lr: 0.001 -> 0.01" in result.output and "--restart" in result.output
    assert (tmp_path / "out" / "config.yaml").read_text() == recorded and log.stat().st_mtime_ns == stamp

    # Other ensemble settings train the ensembles again, not the learners; global mode keeps its predictions
    # at another K (they do not depend on it).
    ens_log = tmp_path / "out" / "ensemble" / "fold0" / "log.csv"
    ens_stamp = ens_log.stat().st_mtime_ns
    run_cv(_config(tmp_path, splits, "global", k=5, ensemble={"epochs": 2, "patience": 2, "lr": 1e-2}),
           tmp_path / "out", report=False)
    assert log.stat().st_mtime_ns == stamp and ens_log.stat().st_mtime_ns != ens_stamp
    assert json.loads((log.parent / "done.json").read_text())["k"] == 3
    again = _read(tmp_path / "out" / "predictions.csv")
    assert [r for r in again if not r["model"].startswith("flannel")] == [
        r for r in preds if not r["model"].startswith("flannel")]

    # Weights files are checked before any work: the finished runs stay as they were.
    weights = {LEARNERS[0]: str(tmp_path / "absent.pt")}
    broken = _config(tmp_path, splits, "global", learner={"epochs": 1, "patience": 1, "batch_size": 8,
                                                          "lr": 1e-3, "imagenet_weights": weights})
    with pytest.raises(ConfigError, match="not found: squeezenet1_1: .*absent.pt"):  # before any work
        run_cv(broken, tmp_path / "out", resume=False)
    assert (log.parent / "done.json").is_file()
    (tmp_path / "absent.pt").write_text("not a state dict")
    with pytest.raises(ConfigError, match="absent.pt: cannot be read as torch weights"):
        run_cv(broken, tmp_path / "out", resume=False)
    assert (log.parent / "done.json").is_file()


@pytest.mark.slow
def test_cv_parallel_learner_runs_equal_sequential(cxr4_dir: Path, tmp_path: Path, capsys) -> None:
    splits = small_splits(cxr4_dir, tmp_path / "splits.csv", per_class=6)
    config = _config(tmp_path, splits, "global")
    run_cv(config, tmp_path / "seq", report=False)
    capsys.readouterr()
    run_cv(config, tmp_path / "par", report=False, jobs=2, resume=False)  # --restart: each run trained once
    assert "train_accuracy" not in capsys.readouterr().err  # no learner epoch here: the workers trained them
    seq, par = _read(tmp_path / "seq" / "predictions.csv"), _read(tmp_path / "par" / "predictions.csv")
    assert len(par) == len(seq)
    for a, b in zip(seq, par):  # workers run 1 torch thread, the sequential run 2: float sums differ in order
        assert {k: v for k, v in a.items() if not k.startswith("p_")} == {k: v for k, v in b.items() if not k.startswith("p_")}
        assert all(abs(float(a[k]) - float(b[k])) < 1e-3 for k in a if k.startswith("p_"))


@pytest.mark.slow
def test_cv_patch_end_to_end(cxr4_dir: Path, tmp_path: Path) -> None:
    splits = small_splits(cxr4_dir, tmp_path / "splits.csv", per_class=5)
    bundle = random_bundle(tmp_path / "bundle", seed=0)
    run_cv(_config(tmp_path, splits, "patch", segmentation_bundle=str(bundle.root)), tmp_path / "out")
    _check_protocol(tmp_path / "out", splits, "patch")
    # Another K predicts the trained learners again at that K: no training.
    log = tmp_path / "out" / "learners" / LEARNERS[0] / "fold0" / "log.csv"
    stamp = log.stat().st_mtime_ns
    run_cv(_config(tmp_path, splits, "patch", segmentation_bundle=str(bundle.root), k=5), tmp_path / "out",
           report=False)
    assert log.stat().st_mtime_ns == stamp and json.loads((log.parent / "done.json").read_text())["k"] == 5
    from patchflannel.training.mask_cache import model_key  # what made its masks, for export bundle to check

    assert json.loads((log.parent / "run.json").read_text())["segmentation_model"] == model_key(bundle)
    assert any((tmp_path / "cache" / "masks").rglob("*.npz")) and any((tmp_path / "cache" / "patch").rglob("*.npy"))


def test_cv_refuses_a_splits_file_without_folds(cxr4_dir: Path, tmp_path: Path) -> None:
    app = typer.Typer()
    register(app)
    result = CliRunner().invoke(app, ["cv", str(_config(tmp_path, cxr4_dir / "manifest.csv", "global")),
                                      "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "missing column 'split'" in result.output and "manifest.csv" in result.output
    assert not (tmp_path / "out" / "config.yaml").exists()  # nothing recorded: a fixed rerun is not "changed"
    (tmp_path / "cvrun" / "learners").mkdir(parents=True)  # what cv leaves in its --out
    (tmp_path / "cvrun" / "config.yaml").write_text("mode: global\n")
    train_app = typer.Typer()
    register_train(train_app)
    app.add_typer(train_app, name="train")
    result = CliRunner().invoke(app, ["train", "learner", str(tmp_path / "cv_global.yaml"), "--out", str(tmp_path / "cvrun")])
    assert result.exit_code == 2 and "holds a `cv` run (learners/, config.yaml)" in result.output, result.output
    assert (tmp_path / "cvrun" / "config.yaml").read_text() == "mode: global\n"
    (tmp_path / "segrun").mkdir()  # a segmentation run (its weights would not load into a learner)
    (tmp_path / "segrun" / "run.json").write_text('{"task": "segmentation", "arch": "fcdensenet56"}')
    result = CliRunner().invoke(app, ["train", "learner", str(tmp_path / "cv_global.yaml"), "--out",
                                      str(tmp_path / "segrun"), "--resume"])
    assert result.exit_code == 2 and "holds a segmentation run, not a learner run" in result.output, result.output
    for restart in ([], ["--restart"]):  # a single run's folder is no cv's: --restart mixed the two
        result = CliRunner().invoke(app, ["cv", str(tmp_path / "cv_global.yaml"), "--out", str(tmp_path / "segrun"),
                                          *restart])
        assert result.exit_code == 2 and "holds a single training run (run.json), not a cv run" in result.output
    assert sorted(p.name for p in (tmp_path / "segrun").iterdir()) == ["run.json"]  # nothing written there


def test_a_refused_cv_records_nothing(cxr4_dir: Path, tmp_path: Path) -> None:
    """A weights file or a segmentation bundle that is missing is refused before config.yaml is written: the fixed
    rerun is not taken for a resume under changed settings."""
    splits = small_splits(cxr4_dir, tmp_path / "splits.csv", per_class=6)
    weights = {LEARNERS[0]: str(tmp_path / "absent.pt")}
    broken = _config(tmp_path, splits, "global", learner={"epochs": 1, "imagenet_weights": weights})
    with pytest.raises(ConfigError, match="absent.pt"):
        run_cv(broken, tmp_path / "out")
    assert not (tmp_path / "out" / "config.yaml").exists()
    typo = _config(tmp_path, splits, "patch", segmentation_bundle=str(tmp_path / "nonexist"))  # nor a missing bundle
    with pytest.raises(BundleError, match="nonexist: no such bundle folder"):
        run_cv(typo, tmp_path / "out")
    assert not (tmp_path / "out" / "config.yaml").exists()


def test_recipes_are_valid_configs() -> None:
    from patchflannel.models.classifiers import CPU_LEARNERS, FLANNEL_LEARNERS
    from patchflannel.training.learners import load_config

    recipes = Path(__file__).resolve().parents[1] / "recipes"
    cfgs = {p.stem: load_config(p) for p in recipes.glob("cv_*.yaml")}
    assert {"cv_cpu_patch", "cv_cpu_global", "cv_gpu_flannel5", "cv_gpu_small_patch"} <= set(cfgs)
    assert tuple(cfgs["cv_gpu_flannel5"]["learners"]) == FLANNEL_LEARNERS
    for name in ("cv_cpu_patch", "cv_cpu_global", "cv_gpu_small_patch"):
        assert set(cfgs[name]["learners"]) <= set(CPU_LEARNERS)
    assert cfgs["cv_cpu_patch"]["learners"] == cfgs["cv_cpu_global"]["learners"]
    assert cfgs["cv_cpu_patch"]["mode"] == "patch" and cfgs["cv_cpu_global"]["mode"] == "global"
    assert cfgs["cv_cpu_patch"]["learner"]["l1"] == 1e-5 and cfgs["cv_cpu_global"]["learner"]["l1"] == 0.0


def _workers(pid: int) -> set[int]:
    """The process ids of ``pid``'s worker processes: its children that multiprocessing spawned to run jobs (not
    its resource tracker) (Linux /proc)."""
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            for child in (task / "children").read_text().split():
                with contextlib.suppress(OSError):
                    if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                        found.add(int(child))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has ended


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads child processes from Linux /proc")
def test_cv_jobs_stopped_by_sigterm_ends_its_workers(cxr4_dir: Path, tmp_path: Path) -> None:
    """A scheduler's SIGTERM reaches the cv process alone: it ends its worker processes (whose runs keep their
    checkpoints) and exits 143, leaving no worker training on."""
    splits = small_splits(cxr4_dir, tmp_path / "splits.csv", per_class=6)
    config = _config(tmp_path, splits, "global", learner={"epochs": 10000, "patience": 10000, "batch_size": 8, "lr": 1e-3})
    proc = subprocess.Popen([sys.executable, "-c", "from patchflannel.cli import main; main()", "cv", str(config), "--out", str(tmp_path / "out"),
                             "--jobs", "2", "--no-report"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    workers: set[int] = set()
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not list((tmp_path / "out" / "learners").rglob("log.csv")):
            workers |= _workers(proc.pid)
            time.sleep(0.2)
        assert list((tmp_path / "out" / "learners").rglob("log.csv")), "no learner run started training"
        workers = {w for w in workers | _workers(proc.pid) if _alive(w)}
        assert len(workers) == 2
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)  # without ending its workers it would wait for their 10000 epochs
        assert proc.returncode == 143, err.decode()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(_alive(w) for w in workers):
            time.sleep(0.2)
        assert not any(_alive(w) for w in workers)
    finally:  # whatever happened, nothing trains on after the test
        proc.kill()
        for pid in [w for w in workers if _alive(w)]:  # workers still running: the test failed
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
