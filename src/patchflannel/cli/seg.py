"""Lung segmentation commands: ``train seg``, ``train seg-eval``, ``train seg-bundle`` and ``segment``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from patchflannel.cli._common import (
    EXIT_STOPPED,
    QuietOpt,
    errors,
    fail_cleanly,
    fresh_run,
    interrupted_exit,
    metrics_text,
    stops_cleanly,
)
from patchflannel.errors import ConfigError
from patchflannel.io.files import check_can_write

console = Console()

ModelOpt = Annotated[Optional[Path], typer.Option(
    "--model", help="A bundle folder or a segmentation run folder; default: the package's default bundle.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto (cuda when available), cpu, cuda or cuda:N.")]



def _say(text: str) -> None:
    console.print(text, markup=False, highlight=False, soft_wrap=True)


def train_seg_cmd(
    out: Annotated[Path, typer.Option("--out", help="Run folder (run.json, best.pt, last.pt, log.csv).")],
    config: Annotated[Optional[Path], typer.Option("--config", help="YAML recipe (see recipes/segmentation*.yaml).")] = None,
    manifest: Annotated[Optional[str], typer.Option("--manifest", help="image,mask pairs CSV (overrides the recipe).")] = None,
    arch: Annotated[Optional[str], typer.Option("--arch", help="fcdensenet103 | fcdensenet67 | fcdensenet56.")] = None,
    epochs: Annotated[Optional[int], typer.Option("--epochs", help="Maximum epochs (overrides the recipe).")] = None,
    device: Annotated[Optional[str], typer.Option("--device", help="auto (cuda when available), cpu, cuda or cuda:N (overrides the recipe).")] = None,
    resume: Annotated[bool, typer.Option("--resume/--no-resume", metavar="", help="Continue an interrupted run in --out (a folder with none starts one).")] = False,
) -> None:
    """Train a lung segmentation network on image/mask pairs (seeded 80/20 split, early stopping on Jaccard)."""
    from patchflannel.training.segmentation import SegConfig, train_segmentation

    overrides = {"manifest": manifest, "arch": arch, "max_epochs": epochs, "device": device}
    with fail_cleanly(interrupted=f"the run so far is in {out}; the same command with --resume continues it"):
        fresh_run(out, resume, "segmentation")
        cfg = (SegConfig.from_file(config, **overrides) if config is not None
               else SegConfig.from_dict({k: v for k, v in overrides.items() if v is not None}, source="options"))
        summary = train_segmentation(cfg, out, resume=resume)
    _say(f"best epoch {summary['best_epoch']}: {metrics_text(summary['best'])} ({summary['epochs_run']} epochs run)")


def seg_eval_cmd(
    manifest: Annotated[Path, typer.Option("--manifest", help="An image,mask pairs CSV.")],
    model: ModelOpt = None,
    all_pairs: Annotated[bool, typer.Option(
        "--all", help="Score every pair of the manifest (an independent set) instead of the model's validation pairs.")] = False,
    device: DeviceOpt = "auto",
) -> None:
    """Mean Jaccard of the model's masks (post-processed, full resolution) on its recorded validation pairs of
    the manifest it was trained on, or with --all on every pair of another manifest."""
    from patchflannel.segment import load_segmenter
    from patchflannel.training.segmentation import evaluate_segmentation, read_pairs_manifest

    with fail_cleanly():
        names = [image.name for image, _ in read_pairs_manifest(manifest)] if all_pairs else None
        result = evaluate_segmentation(load_segmenter(model, device=device), manifest, names)
    _say(f"{'pairs' if all_pairs else 'validation pairs'}: {result['n']}  mean Jaccard: {result['mean_jaccard']:.4f}  "
         f"min: {result['min_jaccard']:.4f}")


def seg_bundle_cmd(
    run: Annotated[Path, typer.Option("--run", help="A finished segmentation run folder.")],
    out: Annotated[Path, typer.Option("--out", help="Bundle folder to write (segmentation.pt + bundle.json).")],
    manifest: Annotated[Optional[Path], typer.Option(
        "--manifest", help="Pairs CSV to measure the validation Jaccard recorded in the bundle.")] = None,
) -> None:
    """Write a segmentation-only bundle (no learners, no ensemble) from a run's best weights."""
    from patchflannel.export.build import export_segmentation_bundle

    with fail_cleanly():
        path = export_segmentation_bundle(run, out, manifest)
    _say(f"wrote {path}")


def segment_cmd(
    inputs: Annotated[list[str], typer.Argument(metavar="SOURCES", help="Image files (PNG, JPEG, TIFF, DICOM), folders (recursive), glob "
                                                "patterns or manifest CSVs (column 'path'), as for `score`.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for <stem>.png masks and segment_report.csv.")],
    model: ModelOpt = None,
    overlay: Annotated[bool, typer.Option("--overlay/--no-overlay", metavar="", help="Also write overlays/<stem>.png.")] = False,
    min_fraction: Annotated[float, typer.Option(help="Flag masks covering less than this fraction.", min=0.0, max=1.0)] = 0.05,
    device: DeviceOpt = "auto",
    batch_size: Annotated[int, typer.Option(help="Images a forward pass.")] = 8,
    overwrite: Annotated[bool, typer.Option("--overwrite", metavar="", help="Replace an earlier run in --out (the "
                                            "masks and overlays its report lists are removed first).")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Lung masks (0/255 PNG at each input's size); bad inputs and tiny masks are reported in the CSV.

    Exit status: 0 all masks written, 1 done but some inputs gave no mask, 2 nothing done (bad options or model),
    3 stopped by an unexpected failure, 130 interrupted (143 by SIGTERM).
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from patchflannel.scoring.inputs import discover_inputs
    from patchflannel.segment import REPORT_FILE, load_segmenter, remove_run, report_summary, segment_images

    with fail_cleanly():
        if any(os.path.isdir(s) and os.path.realpath(s) == os.path.realpath(out) for s in inputs):
            raise ConfigError(f"--out {out} is a folder being segmented: the masks (<stem>.png) would go among its "
                              "images; write them to another folder (a subfolder is fine)")
        check_can_write(out, out)  # a file in the way fails now, before the model loads; made once all is checked
        earlier = (out / REPORT_FILE).is_file()
        if earlier and not overwrite:
            raise ConfigError(f"{out} holds an earlier run ({REPORT_FILE}): --overwrite replaces it (the masks and "
                              "overlays its report lists are removed first), or write the masks to another folder")
        # Files where the masks go (an earlier run's masks, in a folder being segmented) are not inputs.
        written = {os.path.realpath(out), os.path.realpath(out / "overlays")}
        found = discover_inputs(inputs)
        items = [i for i in found if os.path.dirname(os.path.realpath(i.source)) not in written]
        if len(items) < len(found) and not quiet:
            errors.print(f"{len(found) - len(items)} file(s) in {out} (where the masks go) are not taken as inputs",
                         markup=False, highlight=False, soft_wrap=True)
        if not items:
            raise ConfigError(f"no inputs: the sources named only files in {out}, where the masks go")
        segmenter = load_segmenter(model, device=device, batch_size=batch_size)
        if earlier:
            remove_run(out)
    bar = Progress(TextColumn("segmenting"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=errors,
                   disable=quiet or not errors.is_terminal)
    try:
        with bar, stops_cleanly():
            task = bar.add_task("segment", total=len(items))
            rows = segment_images([i.source for i in items], segmenter, out, overlays=overlay, min_fraction=min_fraction,
                                  progress=lambda n: bar.advance(task, n))
    except KeyboardInterrupt as exc:
        raise interrupted_exit(exc, f"the masks written so far are in {out}, listed in {out / REPORT_FILE}") from None
    except Exception as exc:  # noqa: BLE001 - a bug or a system failure (a full disk), not a bad input: say so
        errors.print_exception(max_frames=8)
        errors.print(f"error: segmenting stopped by an unexpected {type(exc).__name__}: {exc}", markup=False,
                     highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_STOPPED) from None
    counts = report_summary(rows)
    if quiet:
        raise typer.Exit(1 if counts["error"] else 0)
    _say(f"{counts['ok']} ok, {counts['flagged']} flagged, {counts['error']} error(s); report: {out / REPORT_FILE}")
    for r in rows:
        if r["status"] != "ok":
            errors.print(f"{r['status']}: {r['file']}: {r['message']}", markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(1 if counts["error"] else 0)  # as `score`: 1 = done, with inputs that gave no mask


def register_train(train_app: typer.Typer) -> None:
    """Add ``seg``, ``seg-eval`` and ``seg-bundle`` to the ``train`` group."""
    train_app.command("seg")(train_seg_cmd)
    train_app.command("seg-eval")(seg_eval_cmd)
    train_app.command("seg-bundle")(seg_bundle_cmd)


def register(app: typer.Typer) -> None:
    """Add the top-level ``segment`` command."""
    app.command("segment")(segment_cmd)
