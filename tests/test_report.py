"""`patchflannel eval`: report numbers against scikit-learn on predictions over the real manifest rows."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import typer
from PIL import Image
from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support, roc_auc_score
from typer.testing import CliRunner

from patchflannel.classes import CLASSES
from patchflannel.cli.learn import register
from patchflannel.errors import ManifestError
from patchflannel.training.report import PREDICTION_COLUMNS, PROB_COLUMNS, write_predictions

IDX = {c: i for i, c in enumerate(CLASSES)}


def _predictions(cxr4_dir: Path, path: Path) -> list[dict]:
    """Two models' val (3 folds) and test predictions for 240 real manifest rows, noisy but informative."""
    with open(cxr4_dir / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))[::4][:240]
    rng = np.random.default_rng(0)
    out = []
    for model, skill in (("resnet18_patch", 2.0), ("flannel_patch", 3.0)):
        for i, r in enumerate(rows):
            y = IDX[r["label"]]
            for split, folds in (("val", [str(i % 3)]), ("test", ["0", "1", "2"])) if i % 5 == 0 else (("val", [str(i % 3)]),):
                for fold in folds:
                    logit = rng.normal(size=4) + skill * np.eye(4)[y]
                    p = np.exp(logit) / np.exp(logit).sum()
                    out.append({"path": r["path"], "patient_id": r["patient_id"], "source": r["source"],
                                "label": r["label"], "model": model, "fold": fold, "split": split,
                                "pred": CLASSES[int(p.argmax())], **{f"p_{c}": p[j] for j, c in enumerate(CLASSES)}})
    write_predictions(out, path)
    return out


def _app() -> typer.Typer:
    app = typer.Typer()
    register(app)
    return app


def _arrays(rows: list[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    y = np.array([IDX[r["label"]] for r in rows])
    yhat = np.array([IDX[r["pred"]] for r in rows])
    p = np.array([[float(f"{r[f'p_{c}']:.6f}") for c in CLASSES] for r in rows])
    return y, yhat, p


def test_eval_report_matches_sklearn(cxr4_dir: Path, tmp_path: Path) -> None:
    rows = _predictions(cxr4_dir, tmp_path / "predictions.csv")
    result = CliRunner().invoke(_app(), ["eval", str(tmp_path / "predictions.csv"), "--out", str(tmp_path / "rep"),
                                         "--bootstrap", "200"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert report["confusion"].startswith("rows: true label, columns: predicted label")
    groups = {(g["split"], g["model"], g["source"]): g for g in report["groups"]}
    sources = sorted({r["source"] for r in rows})
    assert report["sources"] == sources
    for split in ("val", "test"):
        for model in ("resnet18_patch", "flannel_patch"):
            for source in ["all", *sources]:
                sel = [r for r in rows if r["split"] == split and r["model"] == model
                       and source in ("all", r["source"])]
                if not sel:
                    continue
                g = groups[(split, model, source)]
                y, yhat, p = _arrays(sel)
                pr, rc, f, s = precision_recall_fscore_support(y, yhat, labels=[0, 1, 2, 3], zero_division=0)
                assert g["n_rows"] == len(sel)
                assert g["pooled"]["macro_f1"] == pytest.approx(f.mean())
                # a source holding some classes: its macro-F1 over them, as scikit-learn's labels= gives it
                assert g["pooled"]["macro_f1_present"] == pytest.approx(
                    f1_score(y, yhat, labels=np.unique(y), average="macro", zero_division=0))
                for c, name in enumerate(CLASSES):
                    m = g["pooled"]["per_class"][name]
                    assert (m["precision"], m["recall"], m["f1"], m["support"]) == pytest.approx((pr[c], rc[c], f[c], s[c]))
                    if 0 < (y == c).sum() < len(y):
                        assert m["roc_auc"] == pytest.approx(roc_auc_score(y == c, p[:, c]))
                    else:
                        assert m["roc_auc"] is None
                assert np.array_equal(np.array(g["pooled"]["confusion"]).sum(1), s)
                assert np.array_equal(np.array(g["pooled"]["confusion"]), confusion_matrix(y, yhat, labels=[0, 1, 2, 3]))
                fold_f1 = []
                for fold in sorted({r["fold"] for r in sel}):
                    fy, fyhat, _ = _arrays([r for r in sel if r["fold"] == fold])
                    fold_f1.append(f1_score(fy, fyhat, labels=[0, 1, 2, 3], average="macro", zero_division=0))
                    assert g["folds"][fold]["macro_f1"] == pytest.approx(fold_f1[-1])
                assert g["fold_mean"]["macro_f1"] == pytest.approx(np.mean(fold_f1))
                if len(fold_f1) > 1:
                    assert g["fold_std"]["macro_f1"] == pytest.approx(np.std(fold_f1, ddof=1))
                else:
                    assert g["fold_std"]["macro_f1"] is None
                if source == "all":
                    lo, hi = g["bootstrap_ci95"]["macro_f1"]
                    assert lo <= g["pooled"]["macro_f1"] <= hi
                elif len(np.unique(y)) < len(CLASSES) and len(sel) > 20:
                    lo, hi = g["bootstrap_ci95"]["macro_f1_present"]
                    assert lo <= g["pooled"]["macro_f1_present"] <= hi and g["pooled"]["macro_f1_present"] > g["pooled"]["macro_f1"]
    # the better-constructed model scores higher, and the markdown carries the numbers
    assert groups[("val", "flannel_patch", "all")]["pooled"]["macro_f1"] > groups[("val", "resnet18_patch", "all")]["pooled"]["macro_f1"]
    md = (tmp_path / "rep" / "report.md").read_text()
    g = groups[("val", "flannel_patch", "all")]
    assert "| flannel_patch | 3 | " in md and f"{g['fold_mean']['macro_f1']:.3f} ({g['fold_std']['macro_f1']:.3f})" in md
    for split in ("val", "test"):
        png = tmp_path / "rep" / f"confusion_{split}_resnet18_patch.png"
        assert f"]({png.name})" in md
        with Image.open(png) as im:
            assert im.format == "PNG" and im.size[0] > 300
    # a second report into the same folder replaces the first: none of its PNGs is left beside the new ones
    with open(tmp_path / "predictions.csv", newline="") as fh:
        renamed = [r | {"model": "other"} for r in csv.DictReader(fh) if r["model"] == "flannel_patch"]
    write_predictions(renamed, tmp_path / "other.csv")
    result = CliRunner().invoke(_app(), ["eval", str(tmp_path / "other.csv"), "--out", str(tmp_path / "rep"),
                                         "--bootstrap", "0"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "rep").glob("*.png")) == ["confusion_test_other.png", "confusion_val_other.png"]
    second = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert second["models"] == ["other"] and second["pred_not_most_probable"] == 0
    assert "is not the class of the highest" not in result.output
    renamed[0] |= {"pred": next(c for c in CLASSES if c != renamed[0]["pred"])}  # pred against its probabilities
    write_predictions(renamed, tmp_path / "other.csv")
    result = CliRunner().invoke(_app(), ["eval", str(tmp_path / "other.csv"), "--out", str(tmp_path / "rep"),
                                         "--bootstrap", "0"])
    assert result.exit_code == 0 and "in 1 rows pred is not the class of the highest probability" in result.output
    assert "**Note:** in 1 rows `pred` is not" in (tmp_path / "rep" / "report.md").read_text()


def test_eval_refuses_bad_predictions_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    row = {c: "" for c in PREDICTION_COLUMNS} | {"label": "covid", "pred": "flu", "split": "val", "p_covid": "x"}
    nan = {c: "0.25" for c in PREDICTION_COLUMNS} | {"label": "covid", "pred": "covid", "split": "val", "p_covid": "nan",
                                                   "patient_id": "p1"}
    with open(bad, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=PREDICTION_COLUMNS)
        w.writeheader()
        w.writerows([row, nan, nan | {"p_covid": "0.25"}, nan | {"path": "z", **dict.fromkeys(PROB_COLUMNS, "0")},
                     nan | {"path": "a", "p_covid": "0.25", "source": "all"}])
    result = CliRunner().invoke(_app(), ["eval", str(bad), "--out", str(tmp_path / "rep")])
    assert result.exit_code == 2
    assert "bad.csv" in result.output and "unknown pred 'flu'" in result.output and "not a number" in result.output
    assert "line 2: empty patient_id" in result.output and "line 3: a probability is not within [0, 1]" in result.output
    assert "line 4: repeats line 3 (same path, model, fold and split)" in result.output
    assert "line 5: the probabilities sum to 0, not 1" in result.output and "line 6: source 'all' is the name" in result.output
    few = CliRunner().invoke(_app(), ["eval", str(bad), "--out", str(tmp_path / "rep"), "--bootstrap", "5"])
    assert few.exit_code == 2 and "bad.csv" in few.output  # the file's problems come first
    missing = CliRunner().invoke(_app(), ["eval", str(tmp_path / "none.csv"), "--out", str(tmp_path / "rep")])
    assert missing.exit_code == 2 and "file not found" in missing.output
    (tmp_path / "empty.csv").write_bytes(b"")
    empty = CliRunner().invoke(_app(), ["eval", str(tmp_path / "empty.csv"), "--out", str(tmp_path / "rep")])
    assert empty.exit_code == 2 and "empty file: no header row" in empty.output and "missing column" not in empty.output
    assert not (tmp_path / "rep" / "report.json").exists()


def test_predictions_with_odd_names_and_short_rows(tmp_path: Path) -> None:
    """A carriage return in a path is written quoted and read back (it split the row: eval crashed on the short
    one); a row short of fields is named by its line."""
    from patchflannel.training.report import read_predictions

    row = {"path": "/x/a\rb.png", "patient_id": "p1", "source": "s", "label": "covid", "model": "m", "fold": "0",
           "split": "val", "pred": "covid", **dict.fromkeys(PROB_COLUMNS, 0.25)}
    path = write_predictions([row, {**row, "path": "/x/c.png"}], tmp_path / "p.csv")
    assert [r["path"] for r in read_predictions(path)] == ["/x/a\rb.png", "/x/c.png"]
    with open(path, "a", newline="") as fh:
        fh.write("/x/d.png,p2,s\r\n")  # line 5: the first row's quoted name spans lines 2 and 3
    with pytest.raises(ManifestError, match=f"line 5: expected {len(PREDICTION_COLUMNS)} fields, found 3"):
        read_predictions(path)


def test_eval_names_a_scoring_output_and_how_to_get_predictions(tmp_path: Path) -> None:
    """score's own output (Parquet, JSONL or CSV) is not a predictions file: eval says so, no traceback."""
    (tmp_path / "s.parquet").write_bytes(b"PAR1\x15\x04\xf2\x00 binary")
    (tmp_path / "s.csv").write_text("path,content_hash,status,pred,p_covid\na.png,ab12,ok,covid,0.9\n")
    (tmp_path / "binary.csv").write_bytes(b"PAR1\x15\x04\xf2\x00 binary")
    for name, needle in (("s.parquet", "a scoring output, not a predictions CSV"), ("s.csv", "this is a scoring output"),
                         ("binary.csv", "is not UTF-8")):
        result = CliRunner().invoke(_app(), ["eval", str(tmp_path / name), "--out", str(tmp_path / "rep")])
        assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
        assert needle in result.output
        if name != "binary.csv":
            assert "score MANIFEST --out OUT --predictions FILE.csv" in result.output


def test_eval_table_lays_reports_out_like_table_3(cxr4_dir: Path, tmp_path: Path) -> None:
    rows = _predictions(cxr4_dir, tmp_path / "predictions.csv")
    few = CliRunner().invoke(_app(), ["eval", str(tmp_path / "predictions.csv"), "--out", str(tmp_path / "rep"),
                                      "--bootstrap", "5"])
    assert few.exit_code == 2 and "--bootstrap takes 0 (no intervals) or at least 100 resamples, got 5" in few.output
    assert CliRunner().invoke(_app(), ["eval", str(tmp_path / "predictions.csv"), "--out", str(tmp_path / "rep"),
                                       "--bootstrap", "100"]).exit_code == 0
    result = CliRunner().invoke(_app(), ["eval-table", str(tmp_path / "rep")])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    sources = sorted({r["source"] for r in rows})
    assert lines[0] == "| mode | model | " + " | ".join(f"{c} F1" for c in CLASSES) + " | macro-F1 | " + " | ".join(sources) + " |"
    by_model = {line.split(" | ")[1]: line.strip("| ").split(" | ") for line in lines[2:]}
    assert set(by_model) == {"resnet18_patch", "flannel_patch"}
    for model, cells in by_model.items():
        test = [r for r in rows if r["split"] == "test" and r["model"] == model]
        fold_f1 = []
        for fold in sorted({r["fold"] for r in test}):
            y, yhat, _ = _arrays([r for r in test if r["fold"] == fold])
            fold_f1.append(f1_score(y, yhat, labels=[0, 1, 2, 3], average="macro", zero_division=0))
        assert cells[0] == "patch" and cells[6] == f"{np.mean(fold_f1):.3f} ({np.std(fold_f1, ddof=1):.3f})"
        for s, cell in zip(sources, cells[7:]):
            sel = [r for r in test if r["source"] == s]
            if sel:
                y, yhat, _ = _arrays(sel)
                assert cell == f"{f1_score(y, yhat, labels=np.unique(y), average='macro', zero_division=0):.3f}"
            else:
                assert cell == "-"
    twice = CliRunner().invoke(_app(), ["eval-table", str(tmp_path / "rep"), str(tmp_path / "rep" / "report.json")])
    assert twice.exit_code == 0 and twice.output == result.output  # one report, named twice: its rows once
    shutil.copytree(tmp_path / "rep", tmp_path / "rep_b")  # another run of the same models (bf16, say)
    both = CliRunner().invoke(_app(), ["eval-table", str(tmp_path / "rep"), str(tmp_path / "rep_b")])
    names = [line.split(" | ")[1] for line in both.output.strip().splitlines()[2:]]
    assert both.exit_code == 0 and len(names) == 2 * len(by_model) and len(set(names)) == len(names)
    assert f"flannel_patch ({tmp_path / 'rep_b'})" in names
    missing = CliRunner().invoke(_app(), ["eval-table", str(tmp_path / "none")])
    assert missing.exit_code == 2 and "no report.json" in missing.output
    no_train = CliRunner().invoke(_app(), ["eval-table", str(tmp_path / "rep"), "--split", "train"])
    assert no_train.exit_code == 2 and "no report has train rows (they have: test, val)" in no_train.output
