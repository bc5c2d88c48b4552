"""Scoring output: one fixed-schema table, written in atomic chunks and finalised into Parquet, CSV or JSONL.

While a run goes on, results land in ``<out>.parts/part-NNNNNN.parquet``, each written whole to a temporary
name and then renamed (``os.replace``), so a killed run leaves only complete parts. ``<out>.parts/run.json``
records what the rows depend on (bundle, seed, K, columns) so that ``--resume`` never mixes runs. At the end
the previous output (if any) and the parts are streamed, one batch at a time, into ``<out>`` (again through a
temporary file and a rename), the sidecar ``<out>.meta.json`` is written, and the parts are removed.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from patchflannel.classes import CLASSES
from patchflannel.engine.results import DICOM_COLUMNS
from patchflannel.errors import ConfigError
from patchflannel.io.files import check_can_write

FORMATS: dict[str, str] = {".parquet": "parquet", ".csv": "csv", ".jsonl": "jsonl"}
"""Output file extension to format."""

META_KEY = b"patchflannel"
"""Parquet key-value metadata key holding the run metadata (the same JSON as the sidecar)."""

DEFAULT_CHUNK_SIZE = 256
"""Rows a part file holds: the most work a killed run can lose."""


Key = tuple[str, str]


def output_format(out: str | os.PathLike[str]) -> str:
    """The format chosen by ``out``'s extension; ConfigError for any other extension."""
    ext = Path(out).suffix.lower()
    if Path(out).is_dir():  # whatever its name: a folder is not an output file
        raise ConfigError(f"{out}: a folder is in the way where the output file goes (name a .parquet, .csv or "
                          ".jsonl file)")
    if ext not in FORMATS:
        raise ConfigError(f"{out}: unknown output extension {ext or '(none)'!r} (use {', '.join(FORMATS)})")
    return FORMATS[ext]


def output_schema(learners: Iterable[str], extra: Iterable[str] = ()) -> pa.Schema:
    """The output columns: path, the manifest columns carried, result, per-learner vote fractions, run info."""
    fields = [pa.field("path", pa.string())]
    fields += [pa.field(c, pa.string()) for c in extra]
    fields += [pa.field(c, pa.string()) for c in ("content_hash", "status", "error", "flags", "pred")]
    fields += [pa.field(f"p_{c}", pa.float64()) for c in CLASSES]
    fields += [pa.field(f"{learner}_{c}", pa.float64()) for learner in learners for c in CLASSES]
    fields += [pa.field("k", pa.int64()), pa.field("seed", pa.int64())]
    fields += [pa.field(c, pa.string()) for c in ("bundle_id", "backend", *DICOM_COLUMNS)]
    return pa.schema(fields)


class ResultStore:
    """The chunked, atomic, resumable storage of one scoring output file."""

    def __init__(self, out: str | os.PathLike[str], schema: pa.Schema) -> None:
        self.out = Path(out)
        self.format = output_format(self.out)
        self.schema = schema
        self.parts_dir = self.out.with_name(self.out.name + ".parts")
        self.meta_path = self.out.with_name(self.out.name + ".meta.json")
        self._run_file = self.parts_dir / "run.json"
        self.lock_path = self.out.with_name(self.out.name + ".lock")
        self._lock: IO[str] | None = None
        self._made: list[Path] = []
        self.run_key: dict[str, Any] = {}
        self._next_part: int | None = None

    def lock(self) -> None:
        """Hold an exclusive lock on the output until :meth:`unlock` (or this process ends): a second run into
        the same output is refused rather than mixing its parts with this one's. (Not on Windows.)"""
        try:
            import fcntl
        except ImportError:  # Windows
            return
        check_can_write(self.out.parent, self.out)  # a file in the way of a folder is named as such
        folder = self.out.parent
        while not folder.exists() and folder != folder.parent:  # the folders this run makes (deepest first)
            self._made.append(folder)
            folder = folder.parent
        while self._lock is None:
            try:
                self.out.parent.mkdir(parents=True, exist_ok=True)
                handle = open(self.lock_path, "a+")  # noqa: SIM115 - held open for the run
            except OSError as exc:
                raise ConfigError(f"{self.out}: cannot write the output there ({exc.strerror or exc})") from None
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                raise ConfigError(f"{self.out}: another scoring run is writing it ({self.lock_path} is locked); "
                                  "wait for it to finish, or score to another output") from None
            try:  # the file locked must still be the one at the path (a finishing run removes it)
                current = os.stat(self.lock_path).st_ino == os.fstat(handle.fileno()).st_ino
            except FileNotFoundError:
                current = False
            if current:
                self._lock = handle
            else:
                handle.close()

    def unlock(self) -> None:
        """Release the lock of :meth:`lock` and remove its file (nothing when not held); folders :meth:`lock` made
        for the output go again when nothing was written into them (a refused or failed start)."""
        if self._lock is not None:
            self.lock_path.unlink(missing_ok=True)  # while still held: a newcomer then locks a new file
            self._lock.close()
            self._lock = None
        for folder in self._made:
            try:
                folder.rmdir()  # only an empty one
            except OSError:
                break
        self._made = []

    def exists(self) -> bool:
        """True when an output or the parts of an unfinished run are already there."""
        return self.out.exists() or self.parts_dir.exists()

    def clear(self) -> None:
        """Remove the output, its sidecar and any parts (``--overwrite``)."""
        self._refuse_folder()
        shutil.rmtree(self.parts_dir, ignore_errors=True)
        for p in (self.out, self.meta_path):
            p.unlink(missing_ok=True)

    def discard_empty(self) -> None:
        """Remove the parts folder of a run that wrote no part (a start that failed): a rerun is not refused
        for an output that holds nothing."""
        try:
            if self.parts_dir.is_dir() and not self._parts():
                shutil.rmtree(self.parts_dir, ignore_errors=True)
        except OSError:  # never hides the error that stopped the run
            pass

    def check(self, *, resume: bool) -> None:
        """The refusals of :meth:`begin` that need no run key, without writing anything: a folder in the way,
        or an existing output (or parts) without ``resume``."""
        self._refuse_folder()
        if not resume and self.exists():
            raise ConfigError(f"{self.out}: output (or the parts of an unfinished run) already exists; "
                              "pass --resume to continue it or --overwrite to replace it")

    def begin(self, run_key: dict[str, Any], *, resume: bool) -> None:
        """Prepare for writing. With ``resume``, refuse earlier results made under another ``run_key``.

        The run key (what the rows depend on: bundle, seed, K, ...) is stored with the output columns added.
        """
        run_key = {**run_key, "columns": self.schema.names}
        self.check(resume=resume)
        if resume:
            for source, previous in self._previous_run_keys():
                # A key an older output did not record (precision, backend) is not held against it.
                changed = sorted(k for k in previous.keys() | run_key.keys()
                                 if run_key.get(k) != previous.get(k) and (k in previous or k not in LATER_KEYS))
                if changed:
                    values = [f"{k} {_shown(previous.get(k))} there, {_shown(run_key.get(k))} now"
                              for k in changed if k != "columns"]
                    if "columns" in changed:
                        old, new = previous.get("columns") or [], run_key["columns"]
                        sides = [f"{_listed(names)} only {when}" for names, when in
                                 (([c for c in new if c not in old], "now"), ([c for c in old if c not in new], "there"))
                                 if names]
                        values.append("columns: " + "; ".join(sides) +
                                      " (learner columns come from the bundle, the others from the manifests given)")
                    pin = (" (a local run records the precision and backend it resolved, a Ray run what was asked: "
                           "--precision and --backend pin them)" if set(changed) & set(LATER_KEYS) else "")
                    raise ConfigError(f"cannot resume into {self.out}: {source} was made with a different "
                                      f"{', '.join(changed)} ({'; '.join(values)}){pin}; score to a new output or "
                                      "pass --overwrite")
        self.run_key = run_key
        try:
            self.parts_dir.mkdir(parents=True, exist_ok=True)
            # Rewritten on a resume too: an older run's record gains the keys it lacked, so a later resume at
            # another precision is refused.
            _atomic_write_text(self._run_file, json.dumps(run_key, indent=2, sort_keys=True))
        except OSError as exc:
            raise ConfigError(f"{self.out}: cannot write the output there ({exc.strerror or exc})") from None

    def scored_keys(self) -> set[Key]:
        """(path, content_hash) of every row already stored (previous output and parts)."""
        keys: set[Key] = set()
        for batch in self._stored_batches(columns=["path", "content_hash"]):
            keys.update(zip(batch.column("path").to_pylist(), batch.column("content_hash").to_pylist()))
        return keys

    def write_chunk(self, rows: list[dict[str, Any]]) -> Path:
        """Write ``rows`` as the next complete part file (temporary name, then rename); returns its path."""
        table = pa.Table.from_pylist(rows, schema=self.schema)
        if self._next_part is None:
            self._next_part = max((int(p.stem.split("-")[1]) for p in self._parts()), default=-1) + 1
        part = self.parts_dir / f"part-{self._next_part:06d}.parquet"
        tmp = part.with_name(part.name + ".tmp")
        try:
            pq.write_table(table, tmp)
            _fsync(tmp)
            os.replace(tmp, part)
        except BaseException:  # an interrupt mid-write: no half file left, and the number is used again
            tmp.unlink(missing_ok=True)
            raise
        self._next_part += 1
        _fsync(self.parts_dir)  # the rename itself on disk: a power cut then keeps the part
        return part

    def finalize(self, metadata: dict[str, Any], keep: Callable[[Key], bool] | None = None,
                 extras: dict[str, dict[str, str]] | None = None) -> dict[str, int]:
        """Stream the previous output and every part into the output file; returns the row count per status.

        Rows keep their stored order; a (path, content_hash) seen twice is kept once, and with ``keep``
        only rows whose key it accepts (a resumed run drops rows of files changed since). ``extras`` (path ->
        manifest columns) replaces the stored rows' manifest columns (a resumed run's manifest may have been
        corrected). ``metadata`` (plus the run key and the columns) goes to the sidecar and the Parquet metadata.
        """
        metadata = {**metadata, "run_key": self.run_key, "columns": schema_columns(self.schema)}
        schema = self.schema.with_metadata({META_KEY: json.dumps(metadata, sort_keys=True).encode()})
        tmp = self.out.with_name(f".{self.out.name}.tmp")
        seen: set[Key] = set()
        counts: Counter[str] = Counter()
        with _open_writer(tmp, self.format, schema) as write:
            for batch in self._stored_batches():
                mask = []
                for key in zip(batch.column("path").to_pylist(), batch.column("content_hash").to_pylist()):
                    mask.append(key not in seen and (keep is None or keep(key)))
                    seen.add(key)
                kept = batch.filter(pa.array(mask, pa.bool_()))
                if kept.num_rows and extras:
                    kept = _with_extras(kept, extras)
                if kept.num_rows:
                    write(kept)
                    counts.update(kept.column("status").to_pylist())
        _fsync(tmp)
        # The sidecar first: a run stopped between the two still has, beside the output, the metadata that a
        # resume needs (and the parts, merged again then).
        _atomic_write_text(self.meta_path, json.dumps({**metadata, "counts": dict(counts)}, indent=2, sort_keys=True))
        os.replace(tmp, self.out)
        for part in self._parts():  # the parts before run.json: a kill in between leaves a resumable state
            part.unlink()
        shutil.rmtree(self.parts_dir, ignore_errors=True)
        self.unlock()
        return dict(counts)

    def _refuse_folder(self) -> None:
        if self.out.is_dir():
            raise ConfigError(f"{self.out}: a folder is in the way where the output file goes")

    def _parts(self) -> list[Path]:
        return sorted(self.parts_dir.glob("part-*.parquet")) if self.parts_dir.is_dir() else []

    def _stored_batches(self, columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
        sources = ([(self.out, self.format)] if self.out.exists() else []) + [(p, "parquet") for p in self._parts()]
        for source, fmt in sources:
            yield from read_batches(source, fmt, self.schema, columns)

    def _previous_run_keys(self) -> Iterator[tuple[Path, dict[str, Any]]]:
        if self._run_file.exists():
            yield self._run_file, json.loads(self._run_file.read_text())
        elif self.parts_dir.exists() and self._parts():
            raise ConfigError(f"cannot resume: {self.parts_dir} has parts but no run.json")
        if self.out.exists():
            if self.meta_path.exists():
                yield self.meta_path, json.loads(self.meta_path.read_text())["run_key"]
            elif not self._run_file.exists():  # with run.json (above) the unfinished run's key is known
                raise ConfigError(f"cannot resume into {self.out}: its metadata {self.meta_path} is missing")


def _with_extras(batch: pa.RecordBatch, extras: dict[str, dict[str, str]]) -> pa.RecordBatch:
    """``batch`` with its manifest columns taken from ``extras`` (path -> columns) where a path is there."""
    paths = batch.column("path").to_pylist()
    for name in next(iter(extras.values()), {}):
        i = batch.schema.get_field_index(name)
        old = batch.column(i).to_pylist()
        new = [extras[p][name] if p in extras else v for p, v in zip(paths, old)]
        batch = batch.set_column(i, batch.schema.field(i), pa.array(new, batch.schema.field(i).type))
    return batch


LATER_KEYS = ("precision", "backend")
"""Run-key entries recorded since 2026-11-27: an output made before has none, and resumes on what it has."""


def _listed(names: list[str], most: int = 4) -> str:
    """Column names in a message: the first ``most``, then how many more."""
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def _shown(value: Any) -> str:
    """A run-key value in a message: short ids stay whole, long ones (bundle ids) are cut to 12 characters."""
    text = "none" if value is None else str(value)
    return text if len(text) <= 16 else text[:12] + "..."


def read_batches(path: str | os.PathLike[str], fmt: str, schema: pa.Schema,
                 columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
    """Stream a scoring output file of format ``fmt`` back as record batches of ``schema`` (or ``columns``)."""
    path = str(path)
    if fmt == "parquet":
        yield from pq.ParquetFile(path).iter_batches(columns=columns)
        return
    if fmt == "csv":
        reader = pa_csv.open_csv(path, parse_options=pa_csv.ParseOptions(newlines_in_values=True),
                                 convert_options=pa_csv.ConvertOptions(
            column_types=schema, strings_can_be_null=True, quoted_strings_can_be_null=False,
            include_columns=columns))
    else:
        reader = pa_json.open_json(path, parse_options=pa_json.ParseOptions(explicit_schema=schema))
    for batch in reader:
        if fmt == "jsonl":
            batch = batch.select(columns or schema.names)
        yield batch


def read_output(path: str | os.PathLike[str]) -> tuple[pa.Table, dict[str, Any]]:
    """A whole scoring output and its run metadata (from the sidecar ``<out>.meta.json``)."""
    path = Path(path)
    fmt = output_format(path)
    metadata = json.loads(path.with_name(path.name + ".meta.json").read_text())
    schema = pa.schema([pa.field(n, pa.type_for_alias(t)) for n, t in metadata["columns"]])
    return pa.Table.from_batches(list(read_batches(path, fmt, schema)), schema=schema), metadata


UNTRUSTED_FLAGS = ("blank_image", "non_finite_outputs")
"""Flags whose rows hold no result to evaluate: a blank image (nothing to classify) and a NaN/inf network output.
A ``mask_fallback`` or ``small_image`` row is a result on a real image, and is kept."""


def export_predictions(out: str | os.PathLike[str], predictions: str | os.PathLike[str], *,
                       split: str = "test") -> tuple[int, dict[str, int], int]:
    """Write the rows of scoring output ``out`` that have a result and a known ``label`` (carried from a
    manifest) as a predictions CSV for ``patchflannel eval``; returns the rows written, the rows left out
    by reason (``no result``, ``flag ...`` for :data:`UNTRUSTED_FLAGS`, ``no label``, ``label 'X' (not a
    class)``), and how many rows written carried no split (given ``split``).

    ``model`` is the bundle's name, ``fold`` the carried fold (else ``all``), ``split`` the carried split
    (a splits file's ``train``/``test``) else ``split``, and a missing ``patient_id`` is the path (each image
    its own patient).
    """
    from patchflannel.training.report import write_predictions

    table, metadata = read_output(out)
    rows, left_out, unknown = [], Counter(), Counter()
    for r in table.to_pylist():
        label = r.get("label") or ""
        distrusted = [f for f in (r.get("flags") or "").split(";") if f in UNTRUSTED_FLAGS]
        if r["status"] == "error":
            left_out["no result"] += 1
        elif distrusted:
            left_out[f"flag {distrusted[0]} (no result to trust)"] += 1
        elif not label:
            left_out["no label"] += 1
        elif label not in CLASSES:
            unknown[label] += 1
        else:
            rows.append(r)
    for i, (label, n) in enumerate(unknown.most_common()):  # the five commonest by name, the rest together
        left_out[f"label {label!r} (not a class)" if i < 5 else "another label that is not a class"] += n
    model = metadata["bundle"]["name"]
    write_predictions([{"patient_id": r["path"], "source": "", **{k: v for k, v in r.items() if v not in (None, "")},
                        "model": model, "fold": r.get("fold") or "all", "split": r.get("split") or split} for r in rows],
                      Path(predictions))
    return len(rows), dict(left_out), sum(not r.get("split") for r in rows)


def schema_columns(schema: pa.Schema) -> list[list[str]]:
    """``[[name, type], ...]`` of a schema, as stored in the run metadata."""
    return [[f.name, str(f.type)] for f in schema]


class _JsonlWriter:
    def __init__(self, path: Path) -> None:
        self._fh = open(path, "w", encoding="utf-8")

    def __call__(self, batch: pa.RecordBatch) -> None:
        self._fh.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in batch.to_pylist())

    def __enter__(self) -> _JsonlWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self._fh.close()


class _ArrowWriter:
    def __init__(self, writer: Any) -> None:
        self._writer = writer

    def __call__(self, batch: pa.RecordBatch) -> None:
        self._writer.write_batch(batch)

    def __enter__(self) -> _ArrowWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self._writer.close()


def _open_writer(path: Path, fmt: str, schema: pa.Schema) -> _ArrowWriter | _JsonlWriter:
    if fmt == "parquet":
        return _ArrowWriter(pq.ParquetWriter(str(path), schema))
    if fmt == "csv":
        return _ArrowWriter(pa_csv.CSVWriter(str(path), schema.remove_metadata()))
    return _JsonlWriter(path)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text + "\n")
    _fsync(tmp)
    os.replace(tmp, path)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
