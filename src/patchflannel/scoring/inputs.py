"""Which files a scoring run reads: files, folders, glob patterns and manifest CSVs, in a fixed order.

Rules (also in docs/scoring.md):

- A named file is always scored, whatever its name; its content decides the format when it is read.
  A named file ending in ``.csv`` is a manifest instead: a CSV with a ``path`` column (relative paths are
  resolved against the manifest's folder); its ``label``, ``patient_id``, ``source``, ``view``, ``split`` and ``fold``
  columns, when present, are carried into the output (no join with the manifest is needed).
- A folder is walked recursively and a glob pattern expanded (``**`` recurses); linked folders are followed,
  except into one of their own ancestors (a loop); from those, files with an image or DICOM extension
  (:data:`patchflannel.io.files.IMAGE_EXTENSIONS`, any case) are taken, plus any other file whose bytes carry
  the DICOM ``DICM`` marker (PACS exports often have no extension, or are named by UID: ``1.2.840...``).
  Hidden files and folders (name starting with ``.``) are skipped.
- Order: the arguments in the order given, each folder's or pattern's files sorted by path. A file reached
  twice (same real path) is kept once, at its first place.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from patchflannel.data.manifest import header_problems, read_csv
from patchflannel.errors import ConfigError, ManifestError
from patchflannel.io.files import IMAGE_EXTENSIONS, glob_paths, printable, walk_files

MANIFEST_COLUMNS: tuple[str, ...] = ("label", "patient_id", "source", "view", "split", "fold")
"""Manifest columns carried into the scoring output (when the manifest has them)."""

_GLOB_CHARS = frozenset("*?[")


@dataclass(frozen=True)
class ScoreInput:
    """One input of a scoring run: its absolute path (its name in the output) and the manifest columns carried
    with it; ``file``, where it differs from ``path``, the name to read."""

    path: str
    extra: dict[str, str] = field(default_factory=dict, hash=False, compare=False)
    file: str = field(default="", hash=False, compare=False)
    """Set for a file name that is not valid UTF-8: ``path`` shows its bytes as ``\\x..`` escapes (the outputs
    hold UTF-8 text only), ``file`` is the name the operating system knows."""

    @property
    def source(self) -> str:
        """The name to open."""
        return self.file or self.path


def _named(path: str, extra: dict[str, str]) -> ScoreInput:
    """An input whose output name is valid UTF-8 (see :attr:`ScoreInput.file`)."""
    shown = printable(path)
    return ScoreInput(shown, extra, file=path if shown != path else "")


def discover_inputs(sources: str | os.PathLike[str] | Iterable[str | os.PathLike[str]]) -> list[ScoreInput]:
    """Expand ``sources`` (files, folders, glob patterns, manifest CSVs; one, or several) into the run's inputs.

    Raises ConfigError for a source that names nothing (missing path, pattern without a match, empty
    folder) and ManifestError for a manifest without a ``path`` column or with an empty path, or one that
    lists a file twice with different columns (a label, a patient); an exact repeat is scored once.
    """
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    seen: dict[str, int] = {}
    found: list[ScoreInput] = []
    origin: list[str] = []  # the source that gave each found input
    carried: set[str] = set()
    for source in map(os.fspath, sources):
        for item in _expand(source):
            key = os.path.realpath(item.path)
            carried.update(item.extra)
            if key not in seen:
                seen[key] = len(found)
                found.append(item)
                origin.append(source)
                continue
            first = found[seen[key]]
            if not first.extra:  # found in a folder first, listed in a manifest too: keep its columns
                found[seen[key]] = ScoreInput(first.path, item.extra)
                origin[seen[key]] = source
            elif item.extra and item.extra != first.extra:
                differ = sorted(c for c in set(item.extra) | set(first.extra) if item.extra.get(c) != first.extra.get(c))
                where = "" if origin[seen[key]] == source else f" (first in {origin[seen[key]]})"
                raise ManifestError(source, [f"{item.path} is listed twice with different {', '.join(differ)} ("
                                    + ", ".join(f"{first.extra.get(c)!r} vs {item.extra.get(c)!r}" for c in differ)
                                    + f"){where}"])
    if not found:
        raise ConfigError("no inputs: the sources named no image files")
    # Every input carries the same manifest columns (empty where its source had none).
    columns = [c for c in MANIFEST_COLUMNS if c in carried]
    inputs = [_named(i.path, {c: i.extra.get(c, "") for c in columns}) for i in found]
    shown: dict[str, ScoreInput] = {}
    for item in inputs:  # a name that is not UTF-8, escaped, can read as another file's literal name
        if shown.setdefault(item.path, item) is not item:
            raise ConfigError(f"{item.path}: two files would be written under this name (one's name is not UTF-8, "
                              "shown with \\x.. escapes, the other's holds them as text): rename one")
    return inputs


def extra_columns(inputs: list[ScoreInput]) -> list[str]:
    """The manifest columns the inputs carry, in :data:`MANIFEST_COLUMNS` order."""
    return list(inputs[0].extra) if inputs else []


def is_image_name(path: str | os.PathLike[str]) -> bool:
    """True when a file found in a folder or by a pattern is taken (see the module rules); never a pipe,
    socket or device, which could block the reading of its first bytes."""
    name = os.path.basename(path)
    if name.startswith(".") or name.upper() == "DICOMDIR" or not os.path.isfile(path):
        return False  # a DICOMDIR is a media export's index of the images beside it, not an image
    # DICOM files are often named by UID (1.2.840....) or with no extension: any other name is taken when it
    # holds the DICOM marker.
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS or _has_dicom_marker(path)


def _expand(source: str) -> Iterator[ScoreInput]:
    if not source:
        raise ConfigError("'': an empty path names no file or folder")
    if os.path.isdir(source):
        files = sorted(_walk(source))
        if not files:
            raise ConfigError(f"{source}: folder holds no image files")
        yield from (ScoreInput(os.path.abspath(f)) for f in files)
    elif os.path.exists(source) and not os.path.isfile(source):
        raise ConfigError(f"{source}: not a regular file or folder (a pipe, socket or device is not read)")
    elif os.path.isfile(source):
        if source.lower().endswith(".csv"):
            yield from read_score_manifest(source)
        else:
            yield ScoreInput(os.path.abspath(source))
    elif _GLOB_CHARS & set(source):
        matches = sorted(m for m in glob_paths(source, onerror=_refuse) if is_image_name(m) or _dangling_image(m))
        if not matches:
            raise ConfigError(f"{source}: pattern matches no image files")
        yield from (ScoreInput(os.path.abspath(m)) for m in matches)
    elif os.path.islink(source):
        raise ConfigError(f"{source}: a symbolic link to nothing (its target {os.readlink(source)} does not exist)")
    else:
        raise ConfigError(f"{source}: no such file or folder")


def _walk(folder: str) -> Iterator[str]:
    """The image files below ``folder``, linked folders followed (once each); a folder that cannot be listed
    is an error naming it (its images would be missing silently). A link to nowhere with an image extension is
    kept: it becomes an error row."""
    return (path for path in walk_files(folder, onerror=_refuse) if is_image_name(path) or _dangling_image(path))


def _refuse(exc: OSError) -> None:
    """A folder that cannot be listed, named: its images would be missing without a word."""
    raise ConfigError(f"{exc.filename}: cannot list this folder ({exc.strerror or exc}); make it readable, "
                      "or name the inputs another way (a manifest, another pattern)")


def _dangling_image(path: str) -> bool:
    """A link to nowhere with an image name (not hidden): kept, so that its row says why it was not read."""
    name = os.path.basename(path)
    return (not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS
            and os.path.islink(path) and not os.path.exists(path))


def read_score_manifest(path: str | os.PathLike[str]) -> list[ScoreInput]:
    """The inputs a manifest CSV lists (column ``path``, relative to the manifest's folder), in file order.

    Files the manifest names but that are missing are kept: they become error rows when scored.
    """
    path = Path(path)
    columns, records = read_csv(path)
    problems = header_problems(columns)
    if problems:
        raise ManifestError(path, problems)
    if "path" not in columns:
        raise ManifestError(path, [f"no 'path' column (columns: {', '.join(columns)})"])
    rows = []
    for line, record in records:
        row = {c: v.strip() for c, v in zip(columns, record)}
        if len(record) != len(columns):
            problems.append(f"line {line}: expected {len(columns)} fields, found {len(record)}")
        elif not row["path"]:
            problems.append(f"line {line}: empty path")
        rows.append(row)
    if problems:
        raise ManifestError(path, problems)
    base = path.parent
    return [
        ScoreInput(os.path.abspath(base / row["path"]), {c: row[c] for c in MANIFEST_COLUMNS if c in row})
        for row in rows
    ]


def _has_dicom_marker(path: str) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(132)[128:132] == b"DICM"
    except OSError:
        return False
