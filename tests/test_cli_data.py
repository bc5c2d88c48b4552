"""``patchflannel data`` commands, and the counts behind ``data stats``, on real and fake data."""

from __future__ import annotations

import csv
import json
import os
import time
from collections import Counter
from pathlib import Path

import pytest
import typer
from click.testing import Result
from PIL import Image
from typer.testing import CliRunner

from patchflannel.classes import CLASSES
from patchflannel.cli.data import register
from patchflannel.data.manifest import read_manifest
from patchflannel.data.stats import TOTAL, counts_table, crosstab, dataset_stats
from patchflannel.errors import ManifestError

runner = CliRunner()


@pytest.fixture(scope="module")
def app() -> typer.Typer:
    app = typer.Typer()
    register(app)
    return app


def _raw(manifest: Path) -> list[dict[str, str]]:
    with manifest.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _write_raw(manifest: Path, records: list[dict[str, str]]) -> Path:
    with manifest.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    return manifest


def _assert_clean_failure(result: Result, *needles: str, code: int = 2) -> None:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in result.output


def test_dataset_stats_match_an_independent_count(cxr4_dir: Path) -> None:
    raw = _raw(cxr4_dir / "manifest.csv")
    stats = dataset_stats(read_manifest(cxr4_dir / "manifest.csv", check_files=False).rows)
    for key in ("source", "view"):
        counts = Counter((record[key], record["label"]) for record in raw)
        table = stats[key]
        assert set(table.groups) == {record[key] for record in raw}
        for group, cell in table.groups.items():
            assert cell == {**{c: counts[group, c] for c in CLASSES}, TOTAL: sum(counts[group, c] for c in CLASSES)}
        assert table.total == {**Counter(record["label"] for record in raw), TOTAL: len(raw)}


def test_crosstab_by_function_and_percent_table() -> None:
    rows = [{"label": label, "x": x} for label, x in [("covid", "a"), ("normal", "b"), ("normal", "b"), ("viral", "a")]]
    counts = crosstab(rows, lambda row: row["x"].upper())
    assert counts.groups == {
        "A": {"covid": 1, "viral": 1, "bacterial": 0, "normal": 0, TOTAL: 2},
        "B": {"covid": 0, "viral": 0, "bacterial": 0, "normal": 2, TOTAL: 2},
    }
    assert counts.total == {"covid": 1, "viral": 1, "bacterial": 0, "normal": 2, TOTAL: 4}
    table = counts_table(counts, title="t", group_name="x", percent=True)
    assert table.row_count == 3
    assert list(table.columns[4].cells) == ["0 (0.0%)", "2 (100.0%)", "2 (50.0%)"]
    empty = crosstab([], "x")
    assert empty.groups == {} and empty.total == dict.fromkeys((*CLASSES, TOTAL), 0)


def test_a_group_named_total_keeps_its_own_row() -> None:
    """A source literally named 'total' is a group like any other, apart from the totals row."""
    rows = [{"label": "covid", "source": "total"}, {"label": "normal", "source": "kermany"}]
    counts = crosstab(rows, "source")
    assert counts.groups["total"] == {"covid": 1, "viral": 0, "bacterial": 0, "normal": 0, TOTAL: 1}
    assert counts.total[TOTAL] == 2 and counts.total["covid"] == 1
    table = counts_table(counts, title="t", group_name="source")
    assert list(table.columns[0].cells) == ["total", "kermany", "total"] and list(table.columns[5].cells) == ["1", "1", "2"]


def test_stats_command(app: typer.Typer, cxr4_dir: Path) -> None:
    result = runner.invoke(app, ["data", "stats", str(cxr4_dir / "manifest.csv")])
    assert result.exit_code == 0, result.output
    assert "source x class" in result.output and "view x class" in result.output
    sources = {record["source"] for record in _raw(cxr4_dir / "manifest.csv")}
    assert all(source in result.output for source in sources)
    assert str(len(_raw(cxr4_dir / "manifest.csv"))) in result.output


def test_validate_command_ok_and_bad(app: typer.Typer, cxr4_dir: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["data", "validate", str(cxr4_dir / "manifest.csv")])
    assert result.exit_code == 0, result.output
    assert f"OK, {len(_raw(cxr4_dir / 'manifest.csv'))} rows" in result.output

    records = _raw(cxr4_dir / "manifest.csv")[:4]
    for record in records:
        record["path"] = str(cxr4_dir / record["path"])
    records[1]["label"] = "pneumonia"
    records[2]["path"] = str(tmp_path / "missing.jpg")
    bad = _write_raw(tmp_path / "bad.csv", records)
    result = runner.invoke(app, ["data", "validate", str(bad)])
    _assert_clean_failure(result, str(bad), "2 problem(s)", "line 3: unknown label 'pneumonia'", "line 4:", code=1)
    result = runner.invoke(app, ["data", "validate", "--no-check-files", str(bad)])
    _assert_clean_failure(result, "bad.csv: line 3: unknown label", code=1)  # one problem: one line
    result = runner.invoke(app, ["data", "validate", str(tmp_path / "nowhere.csv")])
    _assert_clean_failure(result, "nowhere.csv: no such manifest file", code=2)
    result = runner.invoke(app, ["data", "validate", str(tmp_path)])
    _assert_clean_failure(result, f"{tmp_path}: not a file", code=2)


def test_validate_decode_reads_every_image(app: typer.Typer, cxr4_dir: Path, tmp_path: Path) -> None:
    """Files that exist but cannot be read (cut short, too small) are all reported at once with --decode."""
    records = _raw(cxr4_dir / "manifest.csv")[:4]
    for record in records:
        record["path"] = str(cxr4_dir / record["path"])
    cut, tiny = tmp_path / "cut.jpg", tmp_path / "tiny.png"
    cut.write_bytes(Path(records[1]["path"]).read_bytes()[:2000])
    Image.new("L", (16, 16)).save(tiny)
    records[1]["path"], records[3]["path"] = str(cut), str(tiny)
    manifest = _write_raw(tmp_path / "m.csv", records)
    result = runner.invoke(app, ["data", "validate", str(manifest)])
    assert result.exit_code == 0 and "OK, 4 rows (image files exist)" in result.output, result.output
    result = runner.invoke(app, ["data", "validate", "--decode", str(manifest)])
    _assert_clean_failure(result, "2 problem(s)", "line 3: ", "cut.jpg", "truncated", "line 5: ", "too small", code=1)
    text = manifest.read_text().replace(",bacterial,", ",pneumonia,", 1)  # a bad row besides: all listed at once
    manifest.write_text(text)
    result = runner.invoke(app, ["data", "validate", "--decode", str(manifest)])
    _assert_clean_failure(result, "3 problem(s)", "unknown label 'pneumonia'", "truncated", "too small", code=1)
    manifest.write_text(text.replace(",pneumonia,", ",bacterial,"))
    records.pop(3), records.pop(1)
    _write_raw(manifest, records)
    result = runner.invoke(app, ["data", "validate", "--decode", str(manifest)])
    assert result.exit_code == 0 and "OK, 2 rows (every image read)" in result.output, result.output


def test_header_with_a_repeated_column_or_another_separator_is_refused(tmp_path: Path) -> None:
    twice = tmp_path / "twice.csv"
    twice.write_text("path,label,patient_id,view,source,label\na.jpg,covid,p1,PA,s,normal\n")
    with pytest.raises(ManifestError, match="column 'label' appears 2 times in the header"):
        read_manifest(twice, check_files=False)
    semi = tmp_path / "semi.csv"
    semi.write_text("path;label;patient_id;view;source\na.jpg;covid;p1;PA;s\n")
    with pytest.raises(ManifestError, match="separated by commas"):
        read_manifest(semi, check_files=False)


def test_split_command_writes_splits_and_prints_the_mix(app: typer.Typer, cxr4_dir: Path, tmp_path: Path) -> None:
    args = ["data", "split", str(cxr4_dir / "manifest.csv"), "--seed", "4", "--folds", "4"]
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "a" / "splits.csv")])
    assert result.exit_code == 0, result.output
    assert all(name in result.output for name in ("test", "fold 0", "fold 3", "%"))
    assert "fold 4" not in result.output
    splits = read_manifest(tmp_path / "a" / "splits.csv")
    assert splits.columns == [*read_manifest(cxr4_dir / "manifest.csv").columns, "split", "fold"]
    assert {row["fold"] for row in splits.rows} == {"", "0", "1", "2", "3"}

    again = runner.invoke(app, [*args, "--out", str(tmp_path / "b" / "splits.csv")])
    assert again.exit_code == 0, again.output
    assert read_manifest(tmp_path / "b" / "splits.csv").rows == splits.rows

    # A splits file is itself a manifest: splitting it again replaces its split columns.
    resplit = runner.invoke(
        app, ["data", "split", str(tmp_path / "a" / "splits.csv"), "--out", str(tmp_path / "c.csv")]
    )
    assert resplit.exit_code == 0, resplit.output
    assert read_manifest(tmp_path / "c.csv").columns == splits.columns
    kept = (tmp_path / "c.csv").read_bytes()
    refused = runner.invoke(app, [*args, "--seed", "5", "--out", str(tmp_path / "c.csv")])
    _assert_clean_failure(refused, "c.csv already exists", "--overwrite replaces it")
    assert (tmp_path / "c.csv").read_bytes() == kept
    replaced = runner.invoke(app, [*args, "--seed", "5", "--out", str(tmp_path / "c.csv"), "--overwrite"])
    assert replaced.exit_code == 0 and (tmp_path / "c.csv").read_bytes() != kept, replaced.output
    into_itself = runner.invoke(app, ["data", "split", str(tmp_path / "c.csv"), "--out", str(tmp_path / "c.csv"),
                                      "--overwrite"])
    _assert_clean_failure(into_itself, "--out", "c.csv is an input of this command")
    _assert_clean_failure(runner.invoke(app, [*args, "--out", str(tmp_path / "a")]), "--out", "a: a folder")
    _assert_clean_failure(runner.invoke(app, [*args, "--out", str(tmp_path / "c.csv" / "s.csv")]),  # not "not a folder"
                          "--out", "c.csv/s.csv: a file is in the way where a folder is wanted")
    if os.path.isdir("/proc"):  # named as given, not by the temporary file a write would have failed on
        _assert_clean_failure(runner.invoke(app, [*args, "--out", "/proc/s.csv"]),
                              "--out /proc/s.csv: cannot be written")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c.csv"]  # no temporary file left


def test_split_command_bad_option_fails_cleanly(app: typer.Typer, cxr4_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "s.csv"
    manifest = str(cxr4_dir / "manifest.csv")
    result = runner.invoke(app, ["data", "split", manifest, "--out", str(out), "--test-frac", "0.9"])
    _assert_clean_failure(result, "test_frac (--test-frac) must be in (0, 0.5]")
    assert not out.exists()
    result = runner.invoke(app, ["data", "split", str(tmp_path / "none.csv"), "--out", str(out)])
    _assert_clean_failure(result, "none.csv", "file not found")


def _image(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (10, 10), color=90).save(path)


def test_build_covid_collection_command(app: typer.Typer, tmp_path: Path) -> None:
    images = tmp_path / "collection" / "images"
    for name in ("a.jpg", "b.png", "c.jpg"):
        _image(images / name)
    metadata = tmp_path / "collection" / "metadata.csv"
    metadata.write_text(
        "view,finding,patientid,filename,modality\n"
        "PA,Pneumonia/Viral/COVID-19,7,a.jpg,X-ray\n"
        "AP,No Finding,8,b.png,X-ray\n"
        "PA,Pneumonia/Fungal/Pneumocystis,9,c.jpg,X-ray\n",
        encoding="utf-8",
    )
    out, report = tmp_path / "collection" / "manifest.csv", tmp_path / "report.json"
    command = ["data", "build", "covid-collection", str(metadata), str(images)]
    result = runner.invoke(app, [*command, "--out", str(out), "--report", str(report)])
    assert result.exit_code == 0, result.output
    assert "wrote 2 rows" in result.output and "fungal" in result.output
    rows = read_manifest(out).rows
    assert [(row["label"], row["patient_id"]) for row in rows] == [("covid", "ieee8023:7"), ("normal", "ieee8023:8")]
    assert [record["path"] for record in _raw(out)] == ["images/a.jpg", "images/b.png"]
    assert json.loads(report.read_text())["left_out"] == {"finding: fungal": 1}
    built, source = out.read_bytes(), metadata.read_bytes()
    _assert_clean_failure(runner.invoke(app, [*command, "--out", str(out)]), "manifest.csv already exists",
                          "--overwrite replaces it")
    _assert_clean_failure(runner.invoke(app, [*command, "--out", str(metadata), "--overwrite"]),
                          "metadata.csv is an input of this command")
    _assert_clean_failure(runner.invoke(app, [*command, "--out", str(out), "--report", str(out), "--overwrite"]),
                          "--report", "is the --out manifest")
    assert out.read_bytes() == built and metadata.read_bytes() == source  # nothing written over
    result = runner.invoke(app, [*command, "--out", str(out), "--report", str(report), "--overwrite"])
    assert result.exit_code == 0 and out.read_bytes() == built, result.output


def test_build_kermany_command_and_errors(app: typer.Typer, tmp_path: Path) -> None:
    for name in ("train/NORMAL/IM-0007-0001.jpeg", "train/PNEUMONIA/person5_virus_11.jpeg"):
        _image(tmp_path / "kermany" / name)
    out = tmp_path / "out" / "kermany.csv"
    result = runner.invoke(app, ["data", "build", "kermany", str(tmp_path / "kermany"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = read_manifest(out).rows
    got = [(row["label"], row["patient_id"]) for row in rows]
    assert got == [("normal", "kermany:IM-0007"), ("viral", "kermany:person5")]

    result = runner.invoke(app, ["data", "build", "kermany", str(tmp_path / "out"), "--out", str(tmp_path / "x.csv")])
    _assert_clean_failure(result, "no images found")
    result = runner.invoke(
        app, ["data", "build", "covid-collection", str(tmp_path / "meta.csv"), str(tmp_path), "--out", str(tmp_path / "y.csv")]
    )
    _assert_clean_failure(result, "meta.csv", "file not found")


def test_console_script_version_and_commands() -> None:
    import subprocess
    import sys

    from patchflannel import __version__

    run = subprocess.run([sys.executable, "-c", "from patchflannel.cli import main; main()", "--version"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == f"patchflannel {__version__}"
    run = subprocess.run([sys.executable, "-c", "from patchflannel.cli import main; main()", "--help"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and all(c in run.stdout for c in ("score", "bench", "segment", "train", "export"))


def test_sigterm_stops_a_command_as_ctrl_c_does() -> None:
    """Within a command's fail_cleanly(interrupted=...), SIGTERM (a batch scheduler's stop) raises Terminated,
    says so and exits 143; a second signal (here a Ctrl-C) while stopping is ignored; outside, the handlers are as
    they were."""
    import signal

    from patchflannel.cli._common import EXIT_TERMINATED, fail_cleanly

    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    app = typer.Typer()

    @app.command()
    def job() -> None:
        with fail_cleanly(interrupted="the run so far is kept"):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # not reached: the signal interrupts it
            raise AssertionError("SIGTERM did not stop the command")

    try:
        result = runner.invoke(app, [])
        assert result.exit_code == EXIT_TERMINATED and "terminated (SIGTERM): the run so far is kept" in result.output
        os.kill(os.getpid(), signal.SIGINT)  # a second signal while stopping: not interrupted again
        time.sleep(0.1)  # (a KeyboardInterrupt raised here would fail the test)
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
    with fail_cleanly(interrupted="kept"):
        pass
    assert {s: signal.getsignal(s) for s in before} == before  # a command that ends normally puts them back


def test_a_signal_once_the_command_has_ended_keeps_its_exit_status() -> None:
    """While the process closes after its command (seconds, with torch's compile workers), Ctrl-C or SIGTERM ends
    it at once with the command's status: 130 was said of an export that was done and kept."""
    import signal
    import subprocess
    import sys

    for sig in (signal.SIGINT, signal.SIGTERM):
        code = ("import os, signal, time\nfrom patchflannel.cli._common import end_on_signal\nend_on_signal(7)\n"
                f"os.kill(os.getpid(), {int(sig)})\ntime.sleep(30)\n")
        done = subprocess.run([sys.executable, "-c", code], timeout=60, capture_output=True)
        assert done.returncode == 7, done.stderr.decode()
