"""``patchflannel score`` (bulk scoring to Parquet/CSV/JSONL, resumable, optionally on Ray) and ``phantoms``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from patchflannel.classes import CLASSES
from patchflannel.cli._common import (
    EXIT_INPUT_ERRORS,
    EXIT_STOPPED,
    EXIT_USAGE,
    QuietOpt,
    fail_cleanly,
    interrupted_exit,
    stops_cleanly,
)
from patchflannel.errors import PatchflannelError
from patchflannel.scoring.writers import DEFAULT_CHUNK_SIZE


def score(
    inputs: Annotated[list[str], typer.Argument(metavar="SOURCES", help="Image files, folders (recursive), glob patterns or manifest CSVs (column 'path').", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output file: .parquet, .csv or .jsonl.")],
    bundle: Annotated[Path | None, typer.Option(help="Model bundle folder (default: the package's bundle).")] = None,
    resume: Annotated[bool, typer.Option("--resume", metavar="", help="Continue a killed run: skip inputs already in OUT (same path and content hash).")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", metavar="", help="Replace an existing OUT (and unfinished parts).")] = False,
    seed: Annotated[int, typer.Option(help="Run seed; per-image patch seeds derive from it and the content hash.")] = 0,
    k: Annotated[int | None, typer.Option("--k", "-k", help="Patches per image (default: the bundle's).")] = None,
    chunk_size: Annotated[int, typer.Option(help="Rows per atomically written part (the most a kill can lose).")] = DEFAULT_CHUNK_SIZE,
    device: Annotated[str, typer.Option(help="auto (cuda when available), cpu, cuda or cuda:N.")] = "auto",
    backend: Annotated[str, typer.Option(help="auto, torch, onnxruntime or tensorrt.")] = "auto",
    loader: Annotated[str, typer.Option(help="auto, cpu, dali or nvjpeg.")] = "auto",
    sampler: Annotated[str, typer.Option(help="auto, torch or cupy.")] = "auto",
    precision: Annotated[str, typer.Option(help="auto, fp32, fp16 or bf16.")] = "auto",
    ray: Annotated[bool, typer.Option("--ray", metavar="", help="Score on a Ray cluster (one engine per actor).")] = False,
    ray_address: Annotated[str | None, typer.Option(
        help="Ray cluster for --ray: 'auto', 'HOST:6379', 'ray://HOST:10001' or 'local' (a new local instance); "
             "default: RAY_ADDRESS, else a running local cluster, else a new local instance. Implies --ray.")] = None,
    actors: Annotated[int | None, typer.Option(help="Ray: engines (actors); default one per GPU, else one per CPU.")] = None,
    predictions: Annotated[Path | None, typer.Option(
        help="Also write the rows with a result and a manifest label as a predictions CSV for `patchflannel eval`.")] = None,
    quiet: QuietOpt = False,
) -> None:
    """Score images into one table: one row per input (path, hash, status, error, flags, pred, p_covid..p_normal,
    per-learner confidences, K, seed, bundle id, backend, DICOM UIDs).

    Exit status:
    0 every input scored (ok or flagged);
    1 some inputs are error rows (the run still completed);
    2 bad options, sources, manifest or bundle (nothing scored);
    3 an unexpected failure stopped the run (the chunks written are kept: --resume continues);
    130 interrupted (Ctrl-C; the rows scored so far are kept: --resume continues); 143 the same on SIGTERM.
    """
    from patchflannel.scoring.run import EngineOptions, summary_text
    from patchflannel.scoring.run import score as run_score

    errors = Console(stderr=True)
    options = EngineOptions(bundle=str(bundle) if bundle else None, device=device, backend=backend, loader=loader,
                            sampler=sampler, precision=precision, seed=seed, k=k)
    try:
        with stops_cleanly():  # a batch scheduler's stop keeps the rows, as Ctrl-C does
            summary = run_score(inputs, out, options=options, resume=resume, overwrite=overwrite, chunk_size=chunk_size,
                                ray=(ray_address or True) if ray or ray_address else False, actors=actors, quiet=quiet,
                                console=errors, predictions=predictions)
    except KeyboardInterrupt as exc:
        raise interrupted_exit(exc, f"{_kept(out)}.") from None
    except PatchflannelError as exc:
        errors.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_USAGE) from None
    except Exception as exc:  # noqa: BLE001 - a bug or a system failure, not a bad input: say so, keep the rows
        errors.print_exception(max_frames=8)
        errors.print(f"error: scoring stopped by an unexpected {type(exc).__name__}: {exc}; {_kept(out)}.",
                     markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_STOPPED) from None
    if not quiet:
        errors.print(summary_text(summary), markup=False, highlight=False, soft_wrap=True)
    if summary.predictions is not None and not quiet:
        written, left_out, unsplit = summary.predictions
        left = "; left out: " + ", ".join(f"{n} with {reason}" for reason, n in left_out.items()) if left_out else ""
        errors.print(f"{predictions}: {written} predictions for `patchflannel eval`{left}", markup=False,
                     highlight=False, soft_wrap=True)
        if any(reason.startswith("label ") for reason in left_out):
            errors.print(f"note: a manifest's labels are {', '.join(CLASSES)}", markup=False, highlight=False,
                         soft_wrap=True)
        elif not written and set(left_out) == {"no label"}:  # not one row had a label
            errors.print("note: no row has a label: the predictions need a manifest with a 'label' column",
                         markup=False, highlight=False, soft_wrap=True)
        if unsplit:
            errors.print(f"note: {unsplit} of them carry no split (no 'split' value in their manifest): written as "
                         "split 'test', which `eval` reports as held out; they are held out only if the bundle's "
                         "networks never trained on them (a splits file's test rows: docs/scoring.md)",
                         markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(EXIT_INPUT_ERRORS if summary.errors else 0)


def _kept(out: Path) -> str:
    """What a stopped run leaves for ``--resume``, said to the user."""
    parts = out.with_name(out.name + ".parts")
    if parts.is_dir():
        return f"the rows scored so far are kept in {parts}; rerun with --resume to continue"
    if out.exists():  # whole (a run stopped after it, writing --predictions, or before its first new part)
        return f"{out} is kept as it is; rerun with --resume to continue"
    return "nothing was written"


def phantoms(
    out_dir: Annotated[Path, typer.Argument(help="Folder to write synthetic_phantom_NN.png and README.txt into.")],
    n: Annotated[int, typer.Option("-n", help="How many phantoms.", min=1)] = 4,
    size: Annotated[int, typer.Option(help="Side in pixels.", min=64)] = 512,
    seed: Annotated[int, typer.Option(help="Seed of the first phantom.", min=0)] = 0,
) -> None:
    """Write SYNTHETIC chest-X-ray-like phantoms (not medical images) to try `score` on a fresh clone."""
    from patchflannel.phantoms import write_phantoms

    with fail_cleanly(EXIT_USAGE):
        paths = write_phantoms(out_dir, n, size=size, seed=seed)
    Console(stderr=True).print(f"wrote {len(paths)} synthetic phantom(s) (not medical images) to {out_dir}",
                               markup=False, highlight=False)


def register(app: typer.Typer) -> None:
    """Add the ``score`` and ``phantoms`` commands."""
    app.command("score")(score)
    app.command("phantoms")(phantoms)
