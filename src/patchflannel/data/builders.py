"""Build manifests from the public source layouts (SPEC.md, "Data").

* :func:`build_covid_collection`: the COVID-19 image data collection (``metadata.csv`` + images folder).
* :func:`build_kermany`: the Kermany pediatric set (``NORMAL/`` and ``PNEUMONIA/`` folders).

Each returns a :class:`Build`: manifest rows with absolute image paths, the columns to write, and a
:class:`BuildReport` counting what was kept by label and what was left out by reason.
"""

from __future__ import annotations

import csv
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from rich.table import Table

from patchflannel.classes import CLASSES
from patchflannel.data.manifest import Row, unreadable_csv
from patchflannel.errors import ManifestError
from patchflannel.io.files import printable, walk_files

MAX_EXAMPLES = 5
IMAGE_SUFFIXES = frozenset({".jpeg", ".jpg", ".png"})

# COVID-19 image data collection: views kept and the view recorded for each (case-insensitive, '-'/'_'
# read as spaces).
COLLECTION_VIEWS: dict[str, str] = {
    "pa": "PA",
    "ap": "AP",
    "ap supine": "AP Supine",
    "ap semi erect": "AP",
}
# Words of flat (early-version) finding names, lower case, by what they name: "Herpes pneumonia" and
# "Swine-Origin Influenza A (H1N1) Viral Pneumonia" are viral, "Invasive Aspergillosis" fungal.
FLAT_VIRAL = frozenset({"sars", "mers", "influenza", "h1n1", "varicella", "herpes", "viral"})
FLAT_BACTERIAL = frozenset(
    {
        "streptococcus", "klebsiella", "legionella", "chlamydophila", "e.coli", "mycoplasma", "staphylococcus",
        "mrsa", "nocardia", "bacterial",
    }
)  # fmt: skip
FLAT_FUNGAL = frozenset({"pneumocystis", "fungal"})  # and any word from "aspergill" (aspergillosis, ...)


@dataclass
class BuildReport:
    """What a builder kept (images by label) and left out (images by reason, with a few examples)."""

    source: str
    kept: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CLASSES, 0))
    left_out: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def keep(self, label: str) -> None:
        """Count one kept image of ``label``."""
        self.kept[label] += 1

    def leave_out(self, reason: str, example: str) -> None:
        """Count one left-out image under ``reason``; keep the first few as examples."""
        self.left_out[reason] += 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < MAX_EXAMPLES:
            shown.append(example)

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready summary."""
        return {
            "source": self.source,
            "kept": dict(self.kept),
            "kept_total": sum(self.kept.values()),
            "left_out": dict(self.left_out.most_common()),
            "left_out_total": sum(self.left_out.values()),
            "examples": self.examples,
        }

    def write_json(self, path: str | Path) -> Path:
        """Save :meth:`to_dict` as JSON; returns the path written."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return path

    def table(self) -> Table:
        """A rich table: kept images by label, then left-out images by reason."""
        table = Table(title=f"{self.source}: build report")
        table.add_column("")
        table.add_column("images", justify="right")
        table.add_column("examples")
        for label, count in self.kept.items():
            table.add_row(f"kept {label}", str(count), "")
        for reason, count in self.left_out.most_common():
            table.add_row(f"left out: {reason}", str(count), "; ".join(self.examples[reason][:2]))
        total = sum(self.kept.values()) + sum(self.left_out.values())
        table.add_section()
        table.add_row("total", str(total), "")
        return table


@dataclass
class Build:
    """A builder's result: manifest rows (absolute paths), their columns, and the report."""

    rows: list[Row]
    columns: list[str]
    report: BuildReport


def collection_label(finding: str) -> tuple[str | None, str]:
    """Map a COVID-19 image data collection finding to ``(label, "")`` or ``(None, reason left out)``.

    Accepts the hierarchical style (``Pneumonia/Viral/COVID-19``) and the flat one (``COVID-19``,
    ``SARS``, ``Streptococcus``). A comma-separated combination is kept when the parts that name a class
    agree and the others are ARDS (a complication, not a cause), e.g. ``COVID-19, ARDS``.
    """
    parts = [part.strip() for part in finding.split(",") if part.strip()]
    if len(parts) > 1:
        mapped = [collection_label(part) for part in parts]
        labels = {label for label, _ in mapped if label}
        others = {reason for label, reason in mapped if not label}
        # ARDS rides along with a cause of pneumonia, never with "No Finding".
        if len(labels) == 1 and others <= {"ARDS"} and labels != {"normal"}:
            return labels.pop(), ""
        return None, "combined findings"
    if not parts:
        return None, "no finding recorded"
    levels = [level.strip().lower() for level in parts[0].split("/") if level.strip()]  # "a/b/" is "a/b"
    if not levels:  # "/" alone
        return None, "no finding recorded"
    if levels[0] == "pneumonia" and len(levels) > 1:
        kind = levels[1]
        if kind == "viral" and len(levels) > 2:
            return ("covid" if any(_names_covid(level) for level in levels[2:]) else "viral"), ""
        if kind == "bacterial" and len(levels) > 2:
            return "bacterial", ""
        if kind == "fungal":
            return None, "fungal"
        if kind == "lipoid":
            return None, "lipoid"
        return None, "other finding"
    return _flat_label(levels[0])


_COVID = re.compile(r"(?<![a-z])(?<!non-)(?<!non )(covid(-?19)?|sars-cov-?2)(?![a-z])")


def _names_covid(name: str) -> bool:
    """Whether a finding name (lower case) names COVID-19 (or SARS-CoV-2), not "non-COVID"."""
    return _COVID.search(name) is not None


def _flat_label(name: str) -> tuple[str | None, str]:
    """A flat finding name (lower case) by the words in it."""
    words = set(re.findall(r"[a-z0-9.]+", name))
    if _names_covid(name):
        return "covid", ""
    if words & FLAT_FUNGAL or any(w.startswith("aspergill") for w in words):
        return None, "fungal"
    viral, bacterial = bool(words & FLAT_VIRAL), bool(words & FLAT_BACTERIAL)
    if viral and bacterial:
        return None, "combined findings"
    if viral:
        return "viral", ""
    if bacterial:
        return "bacterial", ""
    if name == "no finding":
        return "normal", ""
    if name == "ards":
        return None, "ARDS"
    if "lipoid" in words:
        return None, "lipoid"
    if name == "pneumonia":
        return None, "unspecified pneumonia"
    return None, "other finding"


def build_covid_collection(metadata_csv: str | Path, images_dir: str | Path) -> Build:
    """Build manifest rows from the COVID-19 image data collection's ``metadata.csv`` and images folder.

    Columns are found by name (case-insensitive): ``patientid``, ``finding``, ``view`` and ``filename``
    are required; ``modality`` (absent in early versions, whose CT images carry view ``CT``) and
    ``license`` are used when present. Images are looked up as ``images_dir/filename``.
    """
    metadata_csv, images_dir = Path(metadata_csv), Path(images_dir)
    header, records = _read_metadata(metadata_csv)
    column = {name.strip().lower(): name for name in header}
    missing = [name for name in ("patientid", "finding", "view", "filename") if name not in column]
    if missing:
        found = ", ".join(name.strip() for name in header)
        raise ManifestError(metadata_csv, [f"missing column '{name}' (columns: {found})" for name in missing])
    if not images_dir.is_dir():
        raise ManifestError(images_dir, ["images folder not found"])

    def get(record: dict[str, str], name: str) -> str:
        return (record.get(column[name]) or "").strip() if name in column else ""

    report = BuildReport(source="ieee8023")
    rows: list[Row] = []
    seen: set[str] = set()
    for record in records:
        filename, finding = get(record, "filename"), get(record, "finding")
        example = f"{filename} ({finding})"
        modality = get(record, "modality")
        view = COLLECTION_VIEWS.get(re.sub(r"[-_\s]+", " ", get(record, "view").lower()))
        label, reason = collection_label(finding)
        if modality and modality.lower() != "x-ray":
            report.leave_out(f"modality {modality}", example)
        elif view is None:
            report.leave_out(f"view {get(record, 'view') or '(none)'}", example)
        elif label is None:
            report.leave_out(f"finding: {reason}", example)
        elif not get(record, "patientid"):
            report.leave_out("no patient id", example)
        elif filename in seen:
            report.leave_out("duplicate file name", example)
        elif not (images_dir / filename).is_file():
            report.leave_out("image file not found", example)
        else:
            seen.add(filename)
            report.keep(label)
            rows.append(
                {
                    "path": str((images_dir / filename).resolve()),
                    "label": label,
                    "view": view,
                    "source": "ieee8023",
                    "patient_id": f"ieee8023:{get(record, 'patientid')}",
                    "license": get(record, "license"),
                    "original_name": filename,
                }
            )
    columns = ["path", "label", "view", "source", "patient_id", "license", "original_name"]
    return Build(rows=rows, columns=columns, report=report)


def _read_metadata(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """The header and records of a metadata CSV; ManifestError when it cannot be read."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            records = list(reader)
            header = list(reader.fieldnames or [])
    except FileNotFoundError:
        raise ManifestError(path, ["file not found"]) from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ManifestError(path, [unreadable_csv(path, exc)]) from None
    if not header:
        raise ManifestError(path, ["empty file: no header row"])
    return header, records


KERMANY_PNEUMONIA = re.compile(r"^(person\d+)_(bacteria|virus)_", re.IGNORECASE)
KERMANY_NORMAL = re.compile(r"^((?:NORMAL2-)?IM-\d+)-", re.IGNORECASE)


def _unlistable(exc: OSError) -> None:
    raise ManifestError(exc.filename, [f"cannot list this folder ({exc.strerror or exc}): its images would be left "
                                       "out; make it readable"])


def build_kermany(root: str | Path) -> Build:
    """Build manifest rows from a Kermany layout: ``NORMAL/`` and ``PNEUMONIA/`` folders anywhere under
    ``root`` (e.g. ``train/NORMAL``, ``test/PNEUMONIA``).

    ``NORMAL/`` images are normal, with patient ``IM-xxxx`` (``NORMAL2-IM-xxxx`` for the second series);
    ``PNEUMONIA/`` images are bacterial or viral by the ``bacteria``/``virus`` token of
    ``personN_<token>_M``, with patient ``personN``. The recorded view is AP.
    """
    root = Path(root)
    if not root.is_dir():
        raise ManifestError(root, ["Kermany root folder not found"])
    files = sorted(
        path
        for path in map(Path, walk_files(root, onerror=_unlistable))
        if path.parent.name.upper() in ("NORMAL", "PNEUMONIA")
        and path.suffix.lower() in IMAGE_SUFFIXES
        and not any(part.startswith((".", "__MACOSX")) for part in path.relative_to(root).parts)
        and path.is_file()
    )
    files.sort(key=lambda p: len(p.parts))  # stable: shallowest copy of each image first, else sorted by path
    if not files:
        raise ManifestError(root, ["no images found in NORMAL/ or PNEUMONIA/ folders under it"])

    report = BuildReport(source="kermany")
    rows: list[Row] = []
    seen: set[tuple[str, ...]] = set()
    for path in files:
        name = path.relative_to(root).as_posix()
        if printable(name) != name:  # a manifest is UTF-8 text: it cannot name this file
            report.leave_out("file name not valid UTF-8: rename it", printable(name))
            continue
        # The Kaggle archive holds a second full copy under chest_xray/chest_xray/: one image a split/class/name.
        key = tuple(part.lower() for part in path.parts[-3:])
        if key in seen:
            report.leave_out("another copy of an image already kept (same split, class and file name)", name)
            continue
        seen.add(key)
        if path.parent.name.upper() == "NORMAL":
            match, label = KERMANY_NORMAL.match(path.name), "normal"
            reason = "NORMAL/ file name without an IM-number"
        else:
            match = KERMANY_PNEUMONIA.match(path.name)
            label = {"bacteria": "bacterial", "virus": "viral"}[match.group(2).lower()] if match else ""
            reason = "PNEUMONIA/ file name not personN_bacteria_M or personN_virus_M"
        if match is None:
            report.leave_out(reason, name)
            continue
        report.keep(label)
        rows.append(
            {
                "path": str(path.resolve()),
                "label": label,
                "view": "AP",
                "source": "kermany",
                # The names match whatever their case: one patient id for Person1_ and person1_ (IM-/im-).
                "patient_id": f"kermany:{match.group(1).upper() if label == 'normal' else match.group(1).lower()}",
                "original_name": name,
            }
        )
    columns = ["path", "label", "view", "source", "patient_id", "original_name"]
    return Build(rows=rows, columns=columns, report=report)
