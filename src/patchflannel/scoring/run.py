"""Bulk scoring: inputs -> engine (local, or Ray actors) -> chunked, resumable output file.

Rows stream from the engine to the output in chunks of ``chunk_size``: memory holds one chunk of rows, never
the run's results (see docs/scoring.md for the measurement).
"""

from __future__ import annotations

import datetime as dt
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from patchflannel.bundle import library_versions, load_bundle, verify_bundle
from patchflannel.engine.results import Prediction
from patchflannel.errors import ConfigError, ImageReadError
from patchflannel.io import content_hash
from patchflannel.io.files import check_can_write
from patchflannel.scoring.inputs import ScoreInput, discover_inputs, extra_columns
from patchflannel.scoring.writers import (
    DEFAULT_CHUNK_SIZE,
    Key,
    ResultStore,
    export_predictions,
    output_format,
    output_schema,
)


@dataclass
class EngineOptions:
    """How each engine is built (the keyword arguments of ``Engine.from_bundle``)."""

    bundle: str | None = None
    device: str = "auto"
    backend: str = "auto"
    loader: str = "auto"
    sampler: str = "auto"
    precision: str = "auto"
    seed: int = 0
    k: int | None = None

    def engine(self) -> Any:
        """Build the engine these options describe. On a GPU this sets ``cudnn.benchmark`` for the process (a
        scoring run's calls all have one shape, as in bench, whose figures are measured with it)."""
        import torch

        from patchflannel.engine.engine import Engine

        engine = Engine.from_bundle(self.bundle, device=self.device, backend=self.backend, loader=self.loader,
                                    sampler=self.sampler, precision=self.precision, seed=self.seed, k=self.k)
        if engine.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        return engine


@dataclass
class ScoreSummary:
    """The outcome of a scoring run. Counts are over the whole output (resumed rows included)."""

    out: Path
    rows: int
    ok: int
    flagged: int
    errors: int
    skipped: int
    scored_now: int
    seconds: float
    predictions: tuple[int, dict[str, int], int] | None = None
    """With a predictions CSV: the rows written to it, those left out by reason (no result, a flag that leaves
    nothing to grade, no label, a label that is not a class), and how many written carried no split."""

    @property
    def images_per_second(self) -> float:
        """Inputs scored by this run per second of its wall time."""
        return self.scored_now / self.seconds if self.seconds > 0 else 0.0


def describe_engine(engine: Any) -> dict[str, Any]:
    """The engine's description plus the torch CPU thread count (CPU results may round differently with
    another thread count; see docs/scoring.md)."""
    import torch

    return {**engine.describe(), "torch_threads": torch.get_num_threads()}


def prediction_row(pred: Prediction, extra: dict[str, str]) -> dict[str, Any]:
    """One output row: the engine's row (:meth:`Prediction.to_row`) and the input's manifest columns."""
    return {**pred.to_row(), **extra}


def score(
    inputs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    options: EngineOptions | None = None,
    resume: bool = False,
    overwrite: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    ray: bool | str = False,
    actors: int | None = None,
    ray_batch_size: int = 16,
    quiet: bool = False,
    console: Console | None = None,
    predictions: str | os.PathLike[str] | None = None,
) -> ScoreSummary:
    """Score every input into ``out`` (.parquet, .csv or .jsonl) and return the summary.

    ``ray``: False scores in this process; True runs on Ray wherever ``ray.init()`` connects (RAY_ADDRESS, a
    running local cluster, else a new local instance), a string on the cluster at that address ('local',
    'auto', 'HOST:6379', 'ray://HOST:10001'); with ``actors`` engines (see ray_runner).
    ``predictions``: also write a predictions CSV for ``patchflannel eval`` there (see
    :func:`~patchflannel.scoring.writers.export_predictions`).
    Raises ConfigError/BundleError/ManifestError for bad options, bundles or manifests; bad images become
    error rows. Interrupted (KeyboardInterrupt), it writes the rows it holds before the interrupt goes on.
    """
    options = options or EngineOptions()
    _check_options(chunk_size, resume, overwrite, ray, actors, ray_batch_size)
    started = time.perf_counter()
    started_at = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    sources = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    items = discover_inputs(sources)
    output_format(out)
    _check_files(out, predictions, sources, items, resume or overwrite)
    if ray is not False:
        from patchflannel.scoring.ray_runner import check_address

        check_address(ray)
    # Everything that can refuse the run does so before anything is written: the output is locked first (a
    # second run into it is refused at once), then a local engine verifies the bundle as it loads it; for Ray
    # the driver verifies it (the actors load it again).
    bundle = load_bundle(options.bundle, verify=False)
    k = options.k if options.k is not None else int(bundle.preprocessing["k"])
    store = ResultStore(out, output_schema([e.name for e in bundle.learners], extra_columns(items)))
    store.lock()  # released by finalize, or below when the run stops early
    try:
        store.check(resume=resume or overwrite)  # before the engine loads, which can take minutes
        engine = options.engine() if ray is False else None
        if engine is None:
            verify_bundle(bundle)
        if overwrite:
            store.clear()
        # What the rows depend on: with Ray the actors resolve 'auto' for themselves, so the run records it as asked.
        description = describe_engine(engine) if engine is not None else {}
        store.begin({"bundle_id": bundle.bundle_id, "seed": options.seed, "k": k,
                     "precision": description.get("precision", options.precision),
                     "backend": description.get("backend", options.backend)}, resume=resume)

        say = _Say(console or Console(stderr=True), quiet)
        todo, keep = _resume(items, store, say) if resume else (items, None)
        if engine is not None:
            _precision_notes(options, description, engine, say)
            rows = _local_rows(engine, todo)
        else:
            from patchflannel.scoring.ray_runner import ray_rows

            rows, description = ray_rows(todo, store.schema, options, address=ray, actors=actors,
                                         batch_size=ray_batch_size)
        _write_rows(store, rows, len(todo), chunk_size, say)

        metadata = {
            "bundle": {"id": bundle.bundle_id, "name": bundle.name, "path": str(bundle.root.resolve())},
            "engine": description,
            "versions": library_versions(),
            "config": {"inputs": [os.fspath(i) for i in sources], "seed": options.seed, "k": k,
                       "chunk_size": chunk_size, "ray": ray, "actors": actors, "device": options.device,
                       "backend": options.backend, "loader": options.loader, "sampler": options.sampler,
                       "precision": options.precision},
            "started": started_at,
            "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        }
        # A resumed run's stored rows take the manifest columns of the inputs as they are now.
        extras = {i.path: i.extra for i in items} if resume and extra_columns(items) else None
        counts = store.finalize(metadata, keep=keep, extras=extras)
    except BaseException:
        store.discard_empty()  # a run stopped before its first part leaves nothing that blocks the next
        raise
    finally:
        store.unlock()
    try:
        exported = export_predictions(store.out, predictions) if predictions is not None else None
    except OSError as exc:
        raise ConfigError(f"{predictions}: cannot be written ({exc.strerror or exc}); the scoring output {store.out} "
                          "is complete: the same score command with --resume and another --predictions file writes "
                          "the CSV without scoring again (or scoring.writers.export_predictions)") from None
    return ScoreSummary(out=store.out, rows=sum(counts.values()), ok=counts.get("ok", 0),
                        flagged=counts.get("flagged", 0), errors=counts.get("error", 0),
                        skipped=len(items) - len(todo), scored_now=len(todo),
                        seconds=time.perf_counter() - started, predictions=exported)


def _check_options(chunk_size: int, resume: bool, overwrite: bool, ray: bool | str, actors: int | None,
                   ray_batch_size: int) -> None:
    """Refuse settings of :func:`score` that cannot go together or are out of range."""
    if chunk_size < 1:
        raise ConfigError(f"chunk_size must be >= 1, got {chunk_size}")
    if resume and overwrite:
        raise ConfigError("resume and overwrite exclude each other: continue the output, or replace it")
    if actors is not None and ray is False:
        raise ConfigError("actors is a Ray setting: score with Ray (--ray or --ray-address) or leave it out")
    if actors is not None and actors < 1:
        raise ConfigError(f"actors must be at least 1, got {actors}")
    if ray_batch_size < 1:
        raise ConfigError(f"ray_batch_size must be at least 1, got {ray_batch_size}")


@dataclass
class _Say:
    """Where a run's notes go (stderr), unless ``quiet``."""

    console: Console
    quiet: bool

    def __call__(self, text: str) -> None:
        if not self.quiet:
            self.console.print(text, markup=False, highlight=False, soft_wrap=True)


def _precision_notes(options: EngineOptions, description: dict[str, Any], engine: Any, say: _Say) -> None:
    """Say when the networks run at another precision than asked, and when fp16 runs on a CPU."""
    if options.precision != "auto" and description["precision"] != options.precision:
        say(f"note: precision {options.precision} was asked for; the networks run at {description['precision']} (an "
            f"exported backend runs the bundle's fp32 files where it has none in {options.precision})")
    if description["precision"] == "fp16" and engine.device.type == "cpu":
        say("note: fp16 on a CPU is slow (few CPU kernels run it natively); fp32, or bf16 on a CPU with bf16 "
            "instructions, are the CPU precisions")


def _write_rows(store: ResultStore, rows: Iterator[dict[str, Any]], total: int, chunk_size: int, say: _Say) -> None:
    """Write ``rows`` in chunks, with a progress bar (a line a chunk when stderr is no terminal)."""
    log_lines = not say.quiet and not say.console.is_terminal
    done, errors, loop_start = 0, 0, time.perf_counter()
    with _progress(say.console, say.quiet) as progress:
        task = progress.add_task("scoring", total=total)

        def counted(rows: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
            nonlocal done, errors
            for row in rows:
                done += 1
                errors += row["status"] == "error"
                progress.advance(task)
                yield row

        for chunk in chunks(counted(rows), chunk_size, store):
            write_whole(store, chunk)
            if log_lines:
                rate = done / max(time.perf_counter() - loop_start, 1e-9)
                say.console.print(f"scored {done}/{total} ({rate:.2f} img/s, {errors} errors so far)",
                                  markup=False, highlight=False)


def write_whole(store: ResultStore, chunk: list[dict[str, Any]]) -> None:
    """Write ``chunk`` as the store's next part; interrupted during the write (Ctrl-C, SIGTERM), write it whole
    first, then let the interrupt go on."""
    try:
        store.write_chunk(chunk)
    except KeyboardInterrupt:
        store.write_chunk(chunk)
        raise


def chunks(rows: Iterator[dict[str, Any]], size: int, store: ResultStore) -> Iterator[list[dict[str, Any]]]:
    """``rows`` in lists of ``size`` (the last may be shorter). Interrupted (KeyboardInterrupt) while taking
    them, the rows taken since the last list are written to ``store`` first: ``--resume`` continues after them."""
    chunk: list[dict[str, Any]] = []
    try:
        for row in rows:
            chunk.append(row)
            if len(chunk) >= size:
                yield chunk
                chunk = []
    except KeyboardInterrupt:
        if chunk:
            store.write_chunk(chunk)
        raise
    if chunk:
        yield chunk


def _check_files(out: str | os.PathLike[str], predictions: str | os.PathLike[str] | None,
                 sources: list[str | os.PathLike[str]], items: list[ScoreInput], replace: bool) -> None:
    """Refuse outputs that would overwrite an input (a manifest, an image) or each other, and a predictions file
    that exists (unless ``replace``: a resumed or overwritten run) or cannot be written."""
    inputs = {os.path.realpath(s) for s in sources if os.path.isfile(s)} | {os.path.realpath(i.source) for i in items}
    if os.path.realpath(out) in inputs:
        raise ConfigError(f"{out}: is one of the inputs; write the output elsewhere")
    if predictions is None:
        return
    target = os.path.realpath(predictions)
    if target in inputs or target == os.path.realpath(out):
        raise ConfigError(f"{predictions}: is {'the output' if target == os.path.realpath(out) else 'one of the inputs'}; "
                          "write the predictions CSV elsewhere")
    if os.path.isdir(target):
        raise ConfigError(f"{predictions}: a folder is in the way where the predictions CSV goes")
    if os.path.exists(target) and not replace:
        raise ConfigError(f"{predictions}: already exists; choose another file, or pass --resume or --overwrite")
    check_can_write(os.path.dirname(target), predictions)  # made when it is written


def _local_rows(engine: Any, items: list[ScoreInput]) -> Iterator[dict[str, Any]]:
    """Rows from one in-process engine, in input order."""
    preds = engine.stream((i.path, i.source) for i in items)
    for item, pred in zip(items, preds):
        yield prediction_row(pred, item.extra)


def _resume(items: list[ScoreInput], store: ResultStore, say: _Say) -> tuple[list[ScoreInput], Callable[[Key], bool]]:
    """:func:`_resume_plan` of the store's rows, saying what it finds."""
    stored = store.scored_keys()
    if stored:  # hashing a large archive again takes a while: say what is going on
        say(f"resume: {len(stored)} rows stored; hashing their files again to find what changed")
    todo, keep = _resume_plan(items, stored)
    paths = {i.path for i in items}
    gone = sum(1 for path, _ in stored if path not in paths)
    changed = sum(1 for key in stored if not keep(key)) - gone
    said = [f"{gone} stored rows of files not among these inputs are left out of {store.out}"] if gone else []
    said += [f"{changed} stored rows of files changed since are scored again"] if changed else []
    if said:
        say(f"resume: {'; '.join(said)}")
    return todo, keep


def _resume_plan(items: list[ScoreInput], done: set[Key]) -> tuple[list[ScoreInput], Callable[[Key], bool]]:
    """Inputs still to score and the filter of stored rows to keep.

    An input is done when a stored row has its path and its current content hash. Stored rows of paths no
    longer among the inputs, or of files changed since (another hash), are dropped at the end.
    """
    done_paths = {path for path, _ in done}
    current: dict[str, str | None] = {i.path: _hash_or_none(i.source) for i in items if i.path in done_paths}
    todo = [i for i in items if i.path not in current or (i.path, current[i.path]) not in done]
    paths = {i.path for i in items}
    stale = {key for key in done if key[0] not in paths or current.get(key[0]) != key[1]}
    return todo, lambda key: key[0] in paths and key not in stale


def _hash_or_none(path: str) -> str | None:
    try:
        return content_hash(path)
    except ImageReadError:
        return None


class _RateColumn(ProgressColumn):
    """Images per second of the task."""

    def render(self, task: Task) -> Text:
        return Text(f"{task.speed:.1f} img/s" if task.speed else "- img/s")


def _progress(console: Console, quiet: bool) -> Progress:
    """The progress bar; disabled with ``quiet`` or when the console is not a terminal."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), _RateColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=console,
                    disable=quiet or not console.is_terminal)


def summary_text(summary: ScoreSummary) -> str:
    """The end-of-run summary line."""
    resumed = f", {summary.skipped} already scored" if summary.skipped else ""
    return (f"{summary.out}: {summary.rows} rows: {summary.ok} ok, {summary.flagged} flagged, {summary.errors} "
            f"errors{resumed}; scored {summary.scored_now} in {summary.seconds:.1f} s "
            f"({summary.images_per_second:.2f} img/s, loading the engine and writing the output included)")

