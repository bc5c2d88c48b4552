"""``patchflannel eval``: the evaluation report of a predictions.csv (report.json, report.md, confusion PNGs).

A predictions file has one row per (image, model, fold, split) with the columns of
:data:`PREDICTION_COLUMNS`. The report groups rows by split (``val`` = out-of-fold, ``test``), model and
data source (``all`` and each source, SPEC.md's domain caveat) and gives for each group: the metrics of
every fold, their mean and standard deviation, the metrics of all the group's rows pooled, and 95%
bootstrap intervals of the pooled metrics resampled by patient.
"""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from patchflannel.classes import CLASS_INDEX, CLASSES
from patchflannel.data.manifest import header_problems, read_csv, write_csv_rows
from patchflannel.errors import ConfigError, ManifestError, PatchflannelError
from patchflannel.io.files import save_atomic
from patchflannel.settings import read_json
from patchflannel.training.metrics import bootstrap_ci, classification_metrics, flat_scores, macro_f1_present, mean_std

PROB_COLUMNS = tuple(f"p_{c}" for c in CLASSES)
PREDICTION_COLUMNS = ("path", "patient_id", "source", "label", "model", "fold", "split", *PROB_COLUMNS, "pred")
SPLITS = ("val", "test", "train")
MIN_BOOTSTRAP = 100
"""The fewest bootstrap resamples a report takes (0: none)."""
SCORE_HINT = "`patchflannel score MANIFEST --out OUT --predictions FILE.csv` writes one from a labelled manifest"


def write_predictions(rows: list[dict[str, Any]], path: Path) -> Path:
    """Write prediction rows (dicts with :data:`PREDICTION_COLUMNS`; probabilities as floats) to a CSV, whole."""
    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as fh:
            rounded = ({**r, **{c: f"{float(r[c]):.6f}" for c in PROB_COLUMNS}} for r in rows)
            write_csv_rows(fh, list(PREDICTION_COLUMNS), rounded)

    save_atomic(path, write)
    return path


def read_predictions(path: str | Path) -> list[dict[str, Any]]:
    """Read and check a predictions CSV; ManifestError lists every bad row."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(path, ["file not found"])
    if path.suffix.lower() in (".parquet", ".jsonl"):
        raise ManifestError(path, [f"a scoring output, not a predictions CSV: {SCORE_HINT}"])
    columns, records = read_csv(path)
    header = header_problems(columns)  # empty, repeated columns, another separator
    if header:
        raise ManifestError(path, header)
    missing = [c for c in PREDICTION_COLUMNS if c not in columns]
    if missing:
        hint = [f"this is a scoring output: {SCORE_HINT}"] if "content_hash" in columns else []
        raise ManifestError(path, [f"missing column '{c}'" for c in missing] + hint)
    problems: list[str] = []
    rows: list[dict[str, Any]] = []
    first: dict[tuple[str, ...], int] = {}
    for i, record in records:
        if len(record) != len(columns):
            problems.append(f"line {i}: expected {len(columns)} fields, found {len(record)}")
            continue
        r = dict(zip(columns, record))
        bad = [f"unknown {k} '{r[k]}'" for k in ("label", "pred") if r[k] not in CLASS_INDEX]
        key = (r["path"], r["model"], r["fold"], r["split"])
        if first.setdefault(key, i) != i:  # a file given twice would count twice in the pooled figures
            bad.append(f"repeats line {first[key]} (same path, model, fold and split)")
        if r["split"] not in SPLITS:
            bad.append(f"split '{r['split']}' is not one of {', '.join(SPLITS)}")
        try:
            probs = [float(r[c]) for c in PROB_COLUMNS]
        except ValueError:
            bad.append("a probability is not a number")
            probs = []
        if probs and not all(0.0 <= p <= 1.0 for p in probs):  # NaN fails this too
            bad.append("a probability is not within [0, 1]")
        elif probs and abs(sum(probs) - 1.0) > 0.01:  # a class's column left out or zeroed: AUCs would be meaningless
            bad.append(f"the probabilities sum to {sum(probs):.3g}, not 1")
        if r["source"] == "all":
            bad.append("source 'all' is the name of every report's overall group: rename that source")
        if not (r.get("patient_id") or "").strip():
            bad.append("empty patient_id (the bootstrap resamples patients)")
        problems.extend(f"line {i}: {b}" for b in bad)
        if not bad:
            rows.append({**r, "source": r["source"].strip() or "(none)", "probs": probs})
    if not records:
        problems.append("no prediction rows")
    if problems:
        raise ManifestError(path, problems)
    return rows


def _arrays(rows: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    labels = np.array([CLASS_INDEX[r["label"]] for r in rows], dtype=np.int64)
    preds = np.array([CLASS_INDEX[r["pred"]] for r in rows], dtype=np.int64)
    probs = np.array([r["probs"] for r in rows], dtype=np.float64).reshape(-1, len(CLASSES))
    patients = np.array([r["patient_id"] for r in rows])
    return labels, preds, probs, patients


def _group_report(rows: list[dict[str, Any]], n_boot: int, seed: int) -> dict[str, Any]:
    labels, preds, probs, patients = _arrays(rows)
    folds = sorted({r["fold"] for r in rows}, key=lambda f: (len(f), f))
    per_fold = {}
    for f in folds:
        sel = [r for r in rows if r["fold"] == f]
        y, yhat, p, _ = _arrays(sel)
        per_fold[f] = classification_metrics(y, yhat, p)
    mean, std = mean_std([flat_scores(m) for m in per_fold.values()])
    return {
        "n_rows": len(rows),
        "n_patients": int(len(set(patients.tolist()))),
        "folds": per_fold,
        "fold_mean": mean,
        "fold_std": std,
        "pooled": classification_metrics(labels, preds, probs),
        "bootstrap_ci95": bootstrap_ci(labels, preds, probs, patients, n_boot=n_boot, seed=seed),
    }


def build_report(rows: list[dict[str, Any]], *, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """The report of prediction rows (as :func:`read_predictions` returns them): groups by split, model, source."""
    if 0 < n_boot < MIN_BOOTSTRAP:
        raise ConfigError(f"--bootstrap takes 0 (no intervals) or at least {MIN_BOOTSTRAP} resamples, got {n_boot}: "
                          "fewer give intervals that can miss the figure they bound")
    groups = []
    models = list(dict.fromkeys(r["model"] for r in rows))
    sources = ["all", *sorted({r["source"] for r in rows})]
    for split in SPLITS:
        for model in models:
            sel = [r for r in rows if r["split"] == split and r["model"] == model]
            for source in sources:
                part = sel if source == "all" else [r for r in sel if r["source"] == source]
                if part:
                    groups.append({"split": split, "model": model, "source": source,
                                   **_group_report(part, n_boot, seed)})
    # F1 and the confusion count ``pred``, AUC the probabilities: rows where they disagree are counted, not refused
    # (another tool may threshold its classes), so that a report never contradicts itself unnoticed.
    disagree = sum(CLASS_INDEX[r["pred"]] != int(np.argmax(r["probs"])) for r in rows)
    return {"classes": list(CLASSES), "models": models, "sources": sources[1:], "n_rows": len(rows),
            "pred_not_most_probable": int(disagree),
            "bootstrap": {"resamples": n_boot, "seed": seed, "unit": "patient_id", "level": 0.95},
            "std": "sample standard deviation over folds (ddof=1)",
            "confusion": "rows: true label, columns: predicted label, both in the order of 'classes'", "groups": groups}


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


def _fmt(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _ms(g: dict[str, Any], key: str) -> str:
    m, s = g["fold_mean"].get(key), g["fold_std"].get(key)
    return "n/a" if m is None else f"{m:.3f} ({_fmt(s)})"


def _ci(g: dict[str, Any], key: str) -> str:
    ci = g["bootstrap_ci95"].get(key)
    return "n/a" if ci is None else f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def _source_f1(g: dict[str, Any]) -> float | None:
    """A group's pooled macro-F1 over the classes it has images of, from its per-class rows (so reports written
    before ``macro_f1_present`` existed show it too)."""
    return macro_f1_present(g["pooled"]["per_class"])


def confusion_png(group: dict[str, Any], path: Path) -> Path:
    """Save the pooled confusion matrix of a report group (counts and row-normalised) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    counts = np.array(group["pooled"]["confusion"])
    norm = np.array(group["pooled"]["confusion_normalized"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.3))
    for ax, mat, title, fmt in ((axes[0], counts, "counts", "{:.0f}"), (axes[1], norm, "row-normalised", "{:.2f}")):
        im = ax.imshow(mat, cmap="Blues", vmin=0, vmax=max(float(mat.max()), 1e-9))
        ax.set_xticks(range(len(CLASSES)), CLASSES, rotation=30)
        ax.set_yticks(range(len(CLASSES)), CLASSES)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(title)
        for (i, j), v in np.ndenumerate(mat):
            ax.text(j, i, fmt.format(v), ha="center", va="center",
                    color="white" if v > 0.6 * mat.max() else "black", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046, ticks=MaxNLocator(integer=True) if title == "counts" else None)
    fig.suptitle(f"{group['model']} | {group['split']} | source {group['source']} | n={group['n_rows']}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def render_markdown(report: dict[str, Any], pngs: dict[tuple[str, str], str]) -> str:
    """report.md: per split a Table-3-like table (per-class F1, macro-F1, mean (std) over folds), pooled
    metrics with bootstrap intervals, per-source macro-F1, and per-model class tables with confusion plots."""
    lines = ["# Evaluation report", "",
             f"{report['n_rows']} prediction rows; classes {', '.join(report['classes'])}. Mean (std) over folds; "
             f"intervals: 95% percentile bootstrap over patients ({report['bootstrap']['resamples']} resamples) "
             "of the pooled rows. `val` = out-of-fold predictions, `test` = held-out test set, `train` = images "
             "the model trained on (a fit figure, not generalisation). `n` counts rows: each fold's models score "
             "the whole test set, so a test image counts once per fold.", ""]
    if report.get("pred_not_most_probable"):
        lines += [f"**Note:** in {report['pred_not_most_probable']} rows `pred` is not the class of the highest "
                  "probability: F1, accuracy and the confusion matrices count `pred`, ROC-AUC the probabilities.", ""]
    for split in SPLITS:
        gs = [g for g in report["groups"] if g["split"] == split]
        if not gs:
            continue
        alls = [g for g in gs if g["source"] == "all"]
        lines += [f"## Split `{split}`", "", "### F1 per class and macro-F1, mean (std) over folds", "",
                  "| model | folds | " + " | ".join(f"{c} F1" for c in CLASSES) + " | macro-F1 |",
                  "|---|---|" + "---|" * (len(CLASSES) + 1)]
        for g in alls:
            lines.append(f"| {g['model']} | {len(g['folds'])} | "
                         + " | ".join(_ms(g, f"f1_{c}") for c in CLASSES) + f" | {_ms(g, 'macro_f1')} |")
        lines += ["", "### Pooled rows: macro-F1, accuracy and ROC-AUC per class with 95% bootstrap intervals", "",
                  "| model | n | macro-F1 | 95% CI | accuracy | " + " | ".join(f"AUC {c}" for c in CLASSES) + " |",
                  "|---|---|---|---|---|" + "---|" * len(CLASSES)]
        for g in alls:
            p = g["pooled"]
            aucs = []
            for c in CLASSES:
                ci = g["bootstrap_ci95"].get(f"roc_auc_{c}")
                aucs.append(_fmt(p["per_class"][c]["roc_auc"]) + ("" if ci is None else f" [{ci[0]:.2f}, {ci[1]:.2f}]"))
            lines.append(f"| {g['model']} | {g['n_rows']} | {p['macro_f1']:.3f} | {_ci(g, 'macro_f1')} | "
                         f"{p['accuracy']:.3f} | " + " | ".join(aucs) + " |")
        sources = report["sources"]
        lines += ["", "### Per data source: pooled macro-F1 over the source's classes [95% CI] (rows, classes)", "",
                  "| model | " + " | ".join(sources) + " |", "|---|" + "---|" * len(sources)]
        for model in report["models"]:
            cells = []
            for s in sources:
                g = next((x for x in gs if x["model"] == model and x["source"] == s), None)
                cells.append("-" if g is None else f"{_fmt(_source_f1(g))} {_ci(g, 'macro_f1_present')} "
                             f"({g['n_rows']}, {sum(m['support'] > 0 for m in g['pooled']['per_class'].values())})")
            lines.append(f"| {model} | " + " | ".join(cells) + " |")
        lines += ["", "A source's macro-F1 averages F1 over the classes it has images of (an image predicted as a "
                  "class the source lacks counts as missed); report.json has the per-class rows.", ""]
        for g in alls:
            lines += [f"### {g['model']} ({split}, pooled)", "",
                      "| class | precision | recall | F1 | ROC-AUC | support |", "|---|---|---|---|---|---|"]
            for c in CLASSES:
                m = g["pooled"]["per_class"][c]
                lines.append(f"| {c} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} | "
                             f"{_fmt(m['roc_auc'])} | {m['support']} |")
            png = pngs.get((split, g["model"]))
            if png:
                lines += ["", f"![confusion {g['model']} {split}]({png})"]
            lines.append("")
    return "\n".join(lines) + "\n"


def results_table(reports: list[dict[str, Any]], split: str = "test", labels: list[str] | None = None) -> str:
    """One markdown table over several reports (e.g. global and patch runs), laid out like the seed paper's
    Table 3: a row per model with its mode (the ``_global``/``_patch`` suffix of its name), per-class F1 and
    macro-F1 as mean (std) over folds, then the pooled macro-F1 of each data source over its classes. A model
    named in more than one report is followed by its report's label (``labels``, one a report; default its
    number). ConfigError when no report has rows of ``split``."""
    if not any(g["split"] == split for r in reports for g in r["groups"]):
        have = sorted({g["split"] for r in reports for g in r["groups"]})
        raise ConfigError(f"no report has {split} rows (they have: {', '.join(have) or 'none'}); pick another --split")
    sources = sorted({s for r in reports for s in r["sources"]})
    lines = ["| mode | model | " + " | ".join(f"{c} F1" for c in CLASSES) + " | macro-F1 | " + " | ".join(sources) + " |",
             "|---|---|" + "---|" * (len(CLASSES) + 1 + len(sources))]
    labels = labels or [f"report {i + 1}" for i in range(len(reports))]
    shared = {m for m in {m for r in reports for m in r["models"]} if sum(m in r["models"] for r in reports) > 1}
    for r, label in zip(reports, labels):
        by_key = {(g["model"], g["source"]): g for g in r["groups"] if g["split"] == split}
        for model in r["models"]:
            g = by_key.get((model, "all"))
            if g is None:
                continue
            per_source = [_fmt(_source_f1(by_key[(model, s)])) if (model, s) in by_key else "-" for s in sources]
            suffix = model.rsplit("_", 1)[-1]
            name = f"{model} ({label})" if model in shared else model
            lines.append(f"| {suffix if suffix in ('global', 'patch') else '-'} | {name} | "
                         + " | ".join(_ms(g, f"f1_{c}") for c in CLASSES)
                         + f" | {_ms(g, 'macro_f1')} | " + " | ".join(per_source) + " |")
    return "\n".join(lines) + "\n"


def _png_names(report: dict[str, Any]) -> dict[tuple[str, str], str]:
    """The confusion PNG of each (split, model) of a report."""
    return {(g["split"], g["model"]): f"confusion_{g['split']}_{_slug(g['model'])}.png"
            for g in report["groups"] if g["source"] == "all"}


def write_report(report: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write report.json, report.md and one confusion PNG per (split, model) under ``out_dir``, replacing a report
    already there (the PNGs it had and this one has not are removed: a folder holds one report)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pngs = _png_names(report)
    earlier: set[str] = set()
    with contextlib.suppress(PatchflannelError, OSError, KeyError, TypeError):  # an earlier report, if readable
        earlier = set(_png_names(read_report(out)).values())
    for g in report["groups"]:
        if g["source"] == "all":
            confusion_png(g, out / pngs[(g["split"], g["model"])])
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "report.md").write_text(render_markdown(report, pngs))
    for name in earlier - set(pngs.values()):  # once the new report is whole: the old one's other PNGs
        (out / Path(name).name).unlink(missing_ok=True)
    return {"json": out / "report.json", "md": out / "report.md", **{f"png:{k[0]}:{k[1]}": out / v for k, v in pngs.items()}}


def evaluate_predictions(predictions: str | Path, out_dir: str | Path, *, n_boot: int = 1000,
                         seed: int = 0) -> dict[str, Any]:
    """Read a predictions CSV, build its report and write it under ``out_dir``; returns the report."""
    report = build_report(read_predictions(predictions), n_boot=n_boot, seed=seed)
    report["predictions"] = str(predictions)
    write_report(report, out_dir)
    return report


def read_report(path: str | Path) -> dict[str, Any]:
    """The report that :func:`write_report` wrote: ``path`` is its folder or its report.json."""
    p = Path(path)
    f = p / "report.json" if p.is_dir() else p
    if not f.is_file():
        raise ConfigError(f"{path}: no report.json there (write one with `patchflannel eval`)")
    report = read_json(f)
    missing = [k for k in ("groups", "sources", "models", "classes") if k not in report]
    if missing:
        raise ConfigError(f"{f}: not an `eval` report (no {', '.join(missing)})")
    return report
