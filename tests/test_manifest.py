"""Manifest reading, validation and writing, on the real cxr4 manifest and on doctored copies."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest
from PIL import Image

from patchflannel.classes import CLASSES
from patchflannel.data.manifest import (
    REQUIRED_COLUMNS,
    Manifest,
    read_manifest,
    validate_manifest,
    write_manifest,
)
from patchflannel.errors import ManifestError


def _write_csv(path: Path, header: list[str], records: list[list[str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(records)
    return path


def _real_records(cxr4_dir: Path, count: int) -> tuple[list[str], list[list[str]]]:
    """The real manifest's header and first ``count`` records, with image paths made absolute."""
    with (cxr4_dir / "manifest.csv").open(newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        header = next(reader)
        records = [next(reader) for _ in range(count)]
    at = header.index("path")
    for record in records:
        record[at] = str(cxr4_dir / record[at])
    return header, records


def test_real_manifest_reads_and_validates(cxr4_dir: Path) -> None:
    manifest = read_manifest(cxr4_dir / "manifest.csv")
    with (cxr4_dir / "manifest.csv").open(newline="", encoding="utf-8") as handle:
        raw = list(csv.DictReader(handle))
    assert manifest.columns == list(raw[0].keys())  # extra columns kept, in file order
    assert len(manifest.rows) == len(raw)
    for row, record in zip(manifest.rows, raw):
        assert Path(row["path"]).is_absolute()
        assert Path(row["path"]) == (cxr4_dir / record["path"]).resolve()
        assert row["label"] in CLASSES
        assert row["original_name"] == record["original_name"]
    validate_manifest(manifest)


def test_doctored_copy_reports_every_bad_row_at_once(cxr4_dir: Path, tmp_path: Path) -> None:
    header, records = _real_records(cxr4_dir, 8)
    col = {name: i for i, name in enumerate(header)}
    records[1][col["label"]] = "tuberculosis"  # line 3
    records[3][col["path"]] = str(tmp_path / "gone.jpg")  # line 5
    records[4][col["patient_id"]] = ""  # line 6
    records[6][col["path"]] = records[0][col["path"]]  # line 8 duplicates line 2
    records[7] = records[7][:-2]  # line 9: short record
    doctored = _write_csv(tmp_path / "doctored.csv", header, records)

    with pytest.raises(ManifestError) as caught:
        read_manifest(doctored)
    problems = caught.value.problems
    assert caught.value.path == str(doctored)
    assert str(doctored) in str(caught.value)
    assert len(problems) == 5, problems
    assert any(p.startswith("line 3:") and "unknown label 'tuberculosis'" in p for p in problems)
    assert any(p.startswith("line 5:") and "not found" in p and "gone.jpg" in p for p in problems)
    assert any(p.startswith("line 6:") and "empty 'patient_id'" in p for p in problems)
    assert any("duplicate path" in p and "lines 2, 8" in p for p in problems)
    assert any(p.startswith("line 9:") and "expected 7 fields, found 5" in p for p in problems)


def test_missing_required_column_is_reported_with_row_problems(cxr4_dir: Path, tmp_path: Path) -> None:
    header, records = _real_records(cxr4_dir, 3)
    drop = header.index("patient_id")
    header = [name for i, name in enumerate(header) if i != drop]
    records = [[field for i, field in enumerate(record) if i != drop] for record in records]
    records[2][header.index("label")] = "Covid"
    path = _write_csv(tmp_path / "no_patient.csv", header, records)
    with pytest.raises(ManifestError) as caught:
        read_manifest(path)
    assert caught.value.problems[0] == "missing required column 'patient_id'"
    assert any(p.startswith("line 4:") and "unknown label 'Covid'" in p for p in caught.value.problems)
    assert len(caught.value.problems) == 2


def test_check_files_false_skips_only_the_file_check(tmp_path: Path) -> None:
    path = _write_csv(
        tmp_path / "m.csv",
        list(REQUIRED_COLUMNS),
        [["nowhere/a.png", "covid", "p1", "AP", "s"], ["nowhere/b.png", "flu", "p2", "AP", "s"]],
    )
    with pytest.raises(ManifestError) as caught:
        read_manifest(path, check_files=False)
    assert caught.value.problems == ["line 3: unknown label 'flu' (expected one of covid, viral, bacterial, normal)"]
    with pytest.raises(ManifestError) as caught:
        read_manifest(path)
    assert len(caught.value.problems) == 3  # two missing files and the label


def test_a_byte_order_mark_is_not_part_of_the_first_column(tmp_path: Path) -> None:
    """Excel's "CSV UTF-8" starts with a byte-order mark."""
    path = _write_csv(tmp_path / "m.csv", list(REQUIRED_COLUMNS), [["a.png", "covid", "p1", "AP", "s"]])
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    manifest = read_manifest(path, check_files=False)
    assert manifest.columns == list(REQUIRED_COLUMNS) and manifest.rows[0]["label"] == "covid"


@pytest.mark.parametrize(
    ("content", "reason"),
    [(None, "file not found"), (b"", "no header row"), (b"path,label\n\xff\xfe\x00bad\n", "UTF-8")],
)
def test_unreadable_manifest_names_file_and_reason(tmp_path: Path, content: bytes | None, reason: str) -> None:
    path = tmp_path / "m.csv"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ManifestError) as caught:
        read_manifest(path)
    assert caught.value.path == str(path)
    assert reason in caught.value.problems[0]


def _tiny_images(folder: Path, names: list[str]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, name in enumerate(names):
        Image.new("L", (8, 8), color=40 * i).save(folder / name)
        paths.append(folder / name)
    return paths


def test_write_then_read_round_trip_with_relative_and_absolute_paths(tmp_path: Path) -> None:
    inside = _tiny_images(tmp_path / "set" / "images", ["a.png", "b.jpg"])
    outside = _tiny_images(tmp_path / "elsewhere", ["c.png"])
    columns = ["path", "label", "view", "source", "patient_id", "note"]
    rows = [
        {"path": str(p), "label": label, "view": "AP", "source": "s", "patient_id": f"s:{i}", "note": f"n,{i}"}
        for i, (p, label) in enumerate(zip([*inside, *outside], ["covid", "normal", "viral"]))
    ]
    target = write_manifest(rows, tmp_path / "set" / "manifest.csv", columns)

    with target.open(newline="", encoding="utf-8") as handle:
        written = [record["path"] for record in csv.DictReader(handle)]
    assert written == ["images/a.png", "images/b.jpg", str(outside[0].resolve())]
    back = read_manifest(target)
    assert back.columns == columns
    assert back.rows == [{**row, "path": str(Path(row["path"]).resolve())} for row in rows]


def test_write_refuses_columns_without_the_required_ones(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="missing required column 'source'"):
        write_manifest([], tmp_path / "m.csv", ["path", "label", "patient_id", "view"])
    assert not (tmp_path / "m.csv").exists()


def test_split_columns_are_checked_when_present(tmp_path: Path) -> None:
    images = _tiny_images(tmp_path / "images", ["a.png", "b.png", "c.png", "d.png"])
    columns = [*REQUIRED_COLUMNS, "split", "fold"]
    base = {"label": "covid", "view": "PA", "source": "s"}
    rows = [
        {**base, "path": str(images[0]), "patient_id": "p0", "split": "train", "fold": "3"},
        {**base, "path": str(images[1]), "patient_id": "p1", "split": "valid", "fold": "1"},
        {**base, "path": str(images[2]), "patient_id": "p2", "split": "test", "fold": "0"},
        {**base, "path": str(images[3]), "patient_id": "p3", "split": "train", "fold": ""},
    ]
    with pytest.raises(ManifestError) as caught:
        validate_manifest(Manifest(path=tmp_path / "splits.csv", columns=columns, rows=rows))
    problems = caught.value.problems
    assert [p.split(":")[0] for p in problems] == ["line 3", "line 4", "line 5"]
    assert "split 'valid'" in problems[0] and "has fold '0'" in problems[1] and "fold ''" in problems[2]
    validate_manifest(Manifest(path=tmp_path / "splits.csv", columns=columns, rows=rows[:1]))


def test_a_manifest_not_in_utf8_names_the_line_and_byte(tmp_path: Path) -> None:
    """A Latin-1 manifest (an é written as one byte) far into the file: the error names its line, not the
    decoder's offset into some buffer; data and score manifests say the same."""
    from patchflannel.scoring.inputs import read_score_manifest

    lines = ["path,label,patient_id,view,source"] + [f"img{i}.png,covid,p{i},PA,s" for i in range(1000)]
    lines[700] = "caf\u00e9.png,covid,p700,PA,s"
    path = tmp_path / "m.csv"
    path.write_bytes(("\n".join(lines) + "\n").encode("latin-1"))
    assert path.stat().st_size > 3 * 8192
    for read in (lambda p: read_manifest(p, check_files=False), read_score_manifest):
        with pytest.raises(ManifestError) as caught:
            read(path)
        assert "line 701: byte 0xe9 is not UTF-8" in str(caught.value) and "Latin-1" in str(caught.value)
    path.write_bytes(("\r".join(lines) + "\r").encode("latin-1"))  # an old Mac's line ends
    with pytest.raises(ManifestError, match="line 701: byte 0xe9"):
        read_manifest(path, check_files=False)
    path.write_bytes("\n".join(lines).encode("utf-16"))  # Excel's "Unicode text"
    with pytest.raises(ManifestError, match="the file is UTF-16"):
        read_manifest(path, check_files=False)


def test_a_nul_byte_in_a_manifest_is_named_by_line(tmp_path: Path) -> None:
    """No path can hold a NUL byte: it raised a ValueError traceback out of score, segment and data validate."""
    from patchflannel.scoring.inputs import read_score_manifest

    path = tmp_path / "m.csv"
    path.write_bytes(b"path,label,patient_id,view,source\na.png,covid,p1,PA,s\n\nb\0.png,covid,p2,PA,s\n")
    for read in (lambda p: read_manifest(p, check_files=False), read_score_manifest):
        with pytest.raises(ManifestError, match=r"m.csv: line 4: holds a NUL byte"):
            read(path)


def test_a_path_that_is_no_file_is_named_for_what_it_is(tmp_path: Path) -> None:
    """A folder or a pipe is not "not found" (it is there); a missing file is; a link to nowhere is named as the
    manifest names it, with its target."""
    (tmp_path / "folder.png").mkdir()
    os.mkfifo(tmp_path / "pipe.png")
    (tmp_path / "link.png").symlink_to(tmp_path / "elsewhere" / "x.png")
    path = tmp_path / "m.csv"
    path.write_text("path,label,patient_id,view,source\nfolder.png,covid,p1,PA,s\npipe.png,covid,p2,PA,s\n"
                    "gone.png,covid,p3,PA,s\nlink.png,covid,p4,PA,s\n")
    with pytest.raises(ManifestError) as caught:
        read_manifest(path)
    problems = caught.value.problems
    assert [p.split(":")[0] for p in problems] == ["line 2", "line 3", "line 4", "line 5"], problems
    assert "not a regular file" in problems[0] and "not a regular file" in problems[1] and "not found" in problems[2]
    assert problems[3] == (f"line 5: image file not found: {tmp_path / 'link.png'} "
                           f"(a link to {tmp_path / 'elsewhere' / 'x.png'}, which is missing)")
