"""``patchflannel train learner|ensemble CONFIG``, ``patchflannel cv CONFIG`` and ``patchflannel eval``."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from patchflannel.cli._common import errors, fail_cleanly, fresh_run, metrics_text

console = Console()

ConfigArg = Annotated[Path, typer.Argument(help="YAML config file (see recipes/ and docs/training.md).")]
RunOpt = Annotated[Path, typer.Option("--out", help="Run folder (checkpoints, logs, a copy of the config).")]
ResumeOpt = Annotated[bool, typer.Option("--resume/--no-resume", metavar="", help="Continue an interrupted run in --out (a folder with none starts one).")]



def train_learner_cmd(config: ConfigArg, out: RunOpt, resume: ResumeOpt = False) -> None:
    """Train one base learner (config: arch, mode, splits, val_fold, learner options)."""
    from patchflannel.training.learners import train_learner

    with fail_cleanly(interrupted=f"the run so far is in {out}; the same command with --resume continues it"):
        fresh_run(out, resume, "learner")
        summary = train_learner(config, out, resume=resume)
    console.print(f"best epoch {summary['best_epoch']}: {metrics_text(summary['best'])}", markup=False, highlight=False)


def train_ensemble_cmd(config: ConfigArg, out: RunOpt, resume: ResumeOpt = False) -> None:
    """Train the FLANNEL ensemble on out-of-fold learner rows of a predictions.csv (config: predictions,
    learners, val_fold, ensemble options)."""
    from patchflannel.training.ensemble import train_ensemble_from_predictions

    with fail_cleanly(interrupted=f"the run so far is in {out}; the same command with --resume continues it"):
        fresh_run(out, resume, "ensemble")
        summary = train_ensemble_from_predictions(config, out, resume=resume)
    console.print(f"best epoch {summary['best_epoch']}: {metrics_text(summary['best'])}", markup=False, highlight=False)


def cv_cmd(config: ConfigArg,
           out: Annotated[Path, typer.Option("--out", help="Output folder of the whole protocol.")] = Path("runs/cv"),
           resume: Annotated[bool, typer.Option("--resume/--restart", metavar="", help="Skip finished runs, resume the interrupted one (under the learner settings OUT/config.yaml records); --restart retrains all.")] = True,
           report: Annotated[bool, typer.Option("--report/--no-report", metavar="", help="Write the evaluation report at the end (--no-report removes an earlier run's report from OUT).")] = True,
           jobs: Annotated[int, typer.Option("--jobs", "-j", min=1,
                                             help="Learner runs at a time, in separate processes (GPU or many cores).")] = 1,
           ) -> None:
    """The cross-validation protocol: learners per fold, out-of-fold ensemble, test predictions, report."""
    from patchflannel.training.cv import run_cv

    with fail_cleanly(interrupted=f"finished runs are kept in {out}; the same command continues (cv resumes by default)"):
        result = run_cv(config, out, resume=resume, report=report, jobs=jobs)
    console.print(f"predictions: {result['predictions']}", markup=False, highlight=False)
    if "report" in result:
        console.print(f"report: {result['report']}/report.md", markup=False, highlight=False)


def eval_cmd(predictions: Annotated[Path, typer.Argument(help="Predictions CSV written by `patchflannel cv` or `patchflannel score --predictions`.")],
             out: Annotated[Path, typer.Option("--out", help="Report folder (report.json, report.md, PNGs).")],
             bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples (by patient) for the 95% intervals.", min=0)] = 1000,
             seed: Annotated[int, typer.Option(help="Seed of the bootstrap.", min=0, max=2**32 - 1)] = 0) -> None:
    """Evaluation report of a predictions file: per-class metrics, fold mean (std), confusion, AUC, bootstrap, per source."""
    from patchflannel.training.report import evaluate_predictions

    with fail_cleanly():
        report = evaluate_predictions(predictions, out, n_boot=bootstrap, seed=seed)
    for g in report["groups"]:
        if g["source"] == "all":
            std = g["fold_std"]["macro_f1"]  # None for a single fold
            console.print(f"{g['split']:5s} {g['model']:32s} macro-F1 {g['pooled']['macro_f1']:.3f} "
                          f"(folds {g['fold_mean']['macro_f1']:.3f} +- {'n/a' if std is None else f'{std:.3f}'})",
                          markup=False, highlight=False)
    if report["pred_not_most_probable"]:
        errors.print(f"note: in {report['pred_not_most_probable']} rows pred is not the class of the highest "
                     "probability (F1 counts pred, ROC-AUC the probabilities)", markup=False, highlight=False)
    console.print(f"report: {out / 'report.md'}", markup=False, highlight=False)


def register_train(train_app: typer.Typer) -> None:
    """Add ``learner`` and ``ensemble`` to the ``train`` sub-app."""
    train_app.command("learner")(train_learner_cmd)
    train_app.command("ensemble")(train_ensemble_cmd)


class Split(str, Enum):
    """The splits a report holds."""

    test = "test"
    val = "val"
    train = "train"


def eval_table_cmd(reports: Annotated[list[Path], typer.Argument(help="Report folders (or report.json files) of `eval`/`cv`.")],
                   split: Annotated[Split, typer.Option(help="Split to tabulate.")] = Split.test) -> None:
    """Print one markdown table over report folders (modes side by side, per-class F1, macro-F1, per source);
    a report named twice (its folder and its report.json, say) is tabulated once; a model in several reports
    is followed by the report's name as given."""
    from patchflannel.training.report import read_report, results_table

    files: dict[Path, Path] = {}
    for p in reports:
        files.setdefault((p / "report.json" if p.is_dir() else p).resolve(), p)
    with fail_cleanly():
        print(results_table([read_report(p) for p in files.values()], split.value,
                            [str(p) for p in files.values()]), end="")


def register(app: typer.Typer) -> None:
    """Add the top-level ``cv``, ``eval`` and ``eval-table`` commands."""
    app.command("cv")(cv_cmd)
    app.command("eval")(eval_cmd)
    app.command("eval-table")(eval_table_cmd)
