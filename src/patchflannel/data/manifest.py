"""Manifest CSV files: one row per image with its path, label, patient, view and source.

Required columns are ``path,label,patient_id,view,source``; any other column (licence, original name, a
split's ``split``/``fold``) is kept in order. Relative paths are resolved against the manifest's folder;
in memory every ``path`` is absolute, and :func:`write_manifest` writes it relative to the new file's
folder when the image lies under it.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import os
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from patchflannel.classes import CLASSES
from patchflannel.errors import ImageReadError, ManifestError
from patchflannel.io import read_image
from patchflannel.io.files import save_atomic

REQUIRED_COLUMNS: tuple[str, ...] = ("path", "label", "patient_id", "view", "source")
SPLIT_VALUES: tuple[str, ...] = ("train", "test")

Row = dict[str, str]


@dataclass
class Manifest:
    """A parsed manifest: the file it came from, its columns in order and its rows (absolute paths)."""

    path: Path
    columns: list[str]
    rows: list[Row]


def unreadable_csv(path: Path, exc: Exception) -> str:
    """Why a CSV file could not be read, for an error: where a file that is not UTF-8 first breaks (its line and
    the byte there: the decoder's own offset counts from a buffer, not the file), else the exception."""
    if isinstance(exc, UnicodeDecodeError):
        with contextlib.suppress(OSError):
            data = path.read_bytes()
            data = data[len(codecs.BOM_UTF8):] if data.startswith(codecs.BOM_UTF8) else data
            if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
                return "the file is UTF-16 (Excel's 'Unicode text'): save it as UTF-8 (Excel: 'CSV UTF-8')"
            try:
                data.decode("utf-8")
            except UnicodeDecodeError as bad:
                before = data[:bad.start]  # lines end in \n, \r\n or a lone \r (older Mac files)
                line = len(before.splitlines()) + (not before or before.endswith((b"\n", b"\r")))
                return (f"line {line}: byte 0x{data[bad.start]:02x} is not UTF-8 ({bad.reason}); save the file as "
                        "UTF-8 (Excel: 'CSV UTF-8'): it may be in Latin-1, Windows-1252 or Mac Roman")
    return f"cannot read as a UTF-8 CSV file: {exc}"


def read_csv(path: str | Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """The column names (stripped) and the non-empty records, each with its line number, of a UTF-8 CSV file
    (Excel's byte-order mark allowed); ManifestError naming the file when it is missing, unreadable or empty, or
    the lines that hold a NUL byte."""
    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:  # -sig: Excel's "CSV UTF-8" byte-order mark
            reader = csv.reader(handle)
            header = next(reader, None)
            records = [(reader.line_num, record) for record in reader if record]
    except FileNotFoundError:
        raise ManifestError(path, ["file not found"]) from None
    except csv.Error as exc:
        if "NUL" not in str(exc):  # Python 3.10's reader refuses a NUL byte itself, without its line
            raise ManifestError(path, [unreadable_csv(path, exc)]) from None
        lines = path.read_bytes().split(b"\n")
        header, records = [], [(n, ["\0"]) for n, line in enumerate(lines, start=1) if b"\0" in line]
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(path, [unreadable_csv(path, exc)]) from None
    if header is None:
        raise ManifestError(path, ["empty file: no header row"])
    nul = [f"line {line}: holds a NUL byte (no file name or value can)" for line, record in records
           if any("\0" in value for value in record)]
    if nul:
        raise ManifestError(path, nul)
    return [name.strip() for name in header], records


def header_problems(columns: list[str]) -> list[str]:
    """What is wrong with a manifest's header row (any manifest: data, splits or score): a column named twice,
    or one column whose name holds another separator. Unnamed columns (a spreadsheet's trailing commas) are not
    repeats."""
    if not any(columns):
        return ["empty file: no header row"]
    problems = [f"column '{name}' appears {columns.count(name)} times in the header"
                for name in dict.fromkeys(columns) if name and columns.count(name) > 1]
    if len(columns) == 1 and any(sep in columns[0] for sep in ";\t|"):
        problems.append(f"one column named {columns[0]!r}: a manifest's columns are separated by commas")
    return problems


def read_manifest(path: str | Path, *, check_files: bool = True, decode: bool = False,
                  progress: Callable[[], None] | None = None) -> Manifest:
    """Read and validate a manifest CSV; raises ManifestError listing every problem found. ``decode`` also reads
    every image that exists (``progress`` is called after each), so unreadable images are listed with the rest."""
    path = Path(path)
    columns, records = read_csv(path)
    problems = header_problems(columns)
    rows: list[Row] = []
    for line, record in records:
        if len(record) != len(columns):
            problems.append(f"line {line}: expected {len(columns)} fields, found {len(record)}")
        row = {name: (record[i].strip() if i < len(record) else "") for i, name in enumerate(columns)}
        if row.get("path"):  # links resolved (one file, one path); a missing file named as written
            entry = path.parent / row["path"]
            row["path"] = str(entry.resolve() if entry.exists() else Path(os.path.abspath(entry)))
        rows.append(row)

    lines = [line for line, _ in records]
    problems.extend(_problems(rows, columns, lines, check_files=check_files or decode))
    if decode:
        problems.extend(_unreadable(rows, lines, progress))
    if problems:
        raise ManifestError(path, problems)
    return Manifest(path=path, columns=columns, rows=rows)


def _unreadable(rows: list[Row], lines: list[int], progress: Callable[[], None] | None) -> list[str]:
    """``line N: reason`` for every row whose image exists but cannot be read as the engine and training read it
    (``io.read_image``); a missing file is reported by the file check."""
    problems = []
    for line, row in zip(lines, rows):
        if row.get("path") and Path(row["path"]).is_file():
            try:
                read_image(row["path"])
            except (ImageReadError, OSError) as exc:
                problems.append(f"line {line}: {exc}")
        if progress is not None:
            progress()
    return problems


def validate_manifest(manifest: Manifest, *, check_files: bool = True) -> None:
    """Raise ManifestError naming the manifest and every bad row in it (row i reported as line i + 2)."""
    lines = [index + 2 for index in range(len(manifest.rows))]
    problems = _problems(manifest.rows, manifest.columns, lines, check_files=check_files)
    if problems:
        raise ManifestError(manifest.path, problems)


def _problems(rows: list[Row], columns: list[str], lines: list[int], *, check_files: bool) -> list[str]:
    """Every problem in ``rows``: missing columns, empty fields, unknown labels, missing or duplicate files.

    ``lines[i]`` is the CSV line number reported for ``rows[i]``. A ``split`` column,
    when present, must hold ``train`` or ``test``, and a ``fold`` column a non-negative integer for
    training rows and nothing for test rows; no patient may be in two partitions (test, or fold k).
    """
    problems = [f"missing required column '{name}'" for name in REQUIRED_COLUMNS if name not in columns]
    present = [name for name in REQUIRED_COLUMNS if name in columns]
    first_line: dict[str, int] = {}
    duplicates: dict[str, list[int]] = defaultdict(list)
    for line, row in zip(lines, rows):
        bad = [f"empty '{name}'" for name in present if not row.get(name)]
        label = row.get("label", "")
        if label and label not in CLASSES:
            bad.append(f"unknown label '{label}' (expected one of {', '.join(CLASSES)})")
        file = row.get("path", "")
        if file:
            if file in first_line:
                duplicates[file].append(line)
            else:
                first_line[file] = line
            if check_files and not Path(file).is_file():
                what = "not a regular file (a folder, pipe, socket or device)" if Path(file).exists() else "not found"
                link = f" (a link to {os.readlink(file)}, which is missing)" if os.path.islink(file) else ""
                bad.append(f"image file {what}: {file}{link}")
        bad.extend(_split_problems(row, columns))
        problems.extend(f"line {line}: {reason}" for reason in bad)
    for file, lines in duplicates.items():
        problems.append(
            f"duplicate path {file} on lines {', '.join(str(n) for n in [first_line[file], *lines])}"
        )
    if "split" in columns and "patient_id" in columns:
        problems.extend(_leaks(rows, lines))
    return problems


def _leaks(rows: list[Row], lines: list[int]) -> list[str]:
    """Patients whose images are in more than one partition (the test set, or a training fold)."""
    where: dict[str, dict[str, int]] = defaultdict(dict)
    for line, row in zip(lines, rows):
        if row.get("patient_id") and row.get("split") in SPLIT_VALUES:
            part = "test" if row["split"] == "test" else f"fold {row.get('fold', '')}"
            where[row["patient_id"]].setdefault(part, line)
    return [f"patient {patient} is in {len(parts)} partitions (" + ", ".join(f"{p} from line {n}" for p, n in parts.items())
            + "): a split must keep each patient in one" for patient, parts in where.items() if len(parts) > 1]


def _split_problems(row: Row, columns: list[str]) -> list[str]:
    """Problems with the optional ``split``/``fold`` columns of one row."""
    if "split" not in columns:
        return []
    split = row.get("split", "")
    fold = row.get("fold", "")
    if split not in SPLIT_VALUES:
        return [f"split '{split}' is not one of {', '.join(SPLIT_VALUES)}"]
    if split == "test" and fold:
        return [f"test row has fold '{fold}' (test rows have none)"]
    if split == "train" and not fold.isdigit():
        return [f"train row has fold '{fold}' (expected a non-negative integer)"]
    return []


def write_csv_rows(handle: TextIO, columns: list[str], rows: Iterable[dict[str, Any]]) -> None:
    """A header and ``rows`` (their ``columns``; other keys ignored) as CSV with "\\n" line ends. A row holding a
    carriage return (a file name can) has every field quoted: csv quotes only the line end's own characters,
    and a bare "\\r" would split the row when read back."""
    plain = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    quoted = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore", lineterminator="\n",
                            quoting=csv.QUOTE_ALL)
    plain.writeheader()
    for row in rows:
        (quoted if any("\r" in str(row.get(c, "")) for c in columns) else plain).writerow(row)


def write_manifest(rows: list[Row], path: str | Path, columns: list[str]) -> Path:
    """Write ``rows`` as a manifest CSV with ``columns`` in order; returns the path written.

    Image paths under the manifest's folder are written relative to it, others absolute. The file appears
    whole or not at all (written beside it, then renamed), so a failed write never leaves half a manifest.
    """
    path = Path(path)
    missing = [name for name in REQUIRED_COLUMNS if name not in columns]
    if missing:
        raise ManifestError(path, [f"missing required column '{name}'" for name in missing])
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = path.parent.resolve()

    def write(tmp: Path) -> None:
        with tmp.open("w", newline="", encoding="utf-8") as handle:
            relative = ({**row, "path": _relative_if_under(Path(row["path"]), folder)} for row in rows)
            write_csv_rows(handle, columns, relative)

    save_atomic(path, write)
    return path


def _relative_if_under(file: Path, folder: Path) -> str:
    """``file`` relative to ``folder`` (POSIX separators) when it lies under it, else absolute."""
    file = file.resolve()
    if file.is_relative_to(folder):
        return file.relative_to(folder).as_posix()
    return os.fspath(file)
