"""``patchflannel data``: build, validate, count and split manifests."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from patchflannel.cli._common import errors, fail_cleanly
from patchflannel.data.builders import Build, build_covid_collection, build_kermany
from patchflannel.data.manifest import Row, read_manifest, write_manifest
from patchflannel.data.splits import SPLIT_COLUMNS, make_splits
from patchflannel.data.stats import counts_table, crosstab, dataset_stats
from patchflannel.errors import ConfigError
from patchflannel.io.files import check_can_write

console = Console()

ManifestArg = Annotated[Path, typer.Argument(help="Manifest CSV (path,label,patient_id,view,source,...).")]
OutOpt = Annotated[Path, typer.Option("--out", help="Manifest CSV to write.")]
ReportOpt = Annotated[Path | None, typer.Option("--report", help="Also save the build report as JSON.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", metavar="", help="Replace an existing --out.")]



def _check_out(out: Path, inputs: list[Path], overwrite: bool, why: str = "", option: str = "--out") -> None:
    """Refuse, before any work, an output file (``option``) that is a folder, one of the command's ``inputs``,
    (without ``--overwrite``) an existing file, or one that cannot be made there; ``why`` says what an existing one
    may be."""
    if out.is_dir():
        raise ConfigError(f"{option} {out}: a folder; {option} names the file to write")
    if out.exists() and any(out.resolve() == i.resolve() for i in inputs):
        raise ConfigError(f"{option} {out} is an input of this command: write the new file beside it")
    if out.exists() and not overwrite:
        raise ConfigError(f"{option} {out} already exists{why}; --overwrite replaces it")
    check_can_write(out.parent, f"{option} {out}")


def _partition(row: Row) -> str:
    """``test`` or ``fold k``: the partition a split row belongs to."""
    return "test" if row["split"] == "test" else f"fold {row['fold']}"


def stats(manifest: ManifestArg) -> None:
    """Image counts by source x class and view x class, with totals."""
    with fail_cleanly():
        rows = read_manifest(manifest, check_files=False).rows
    tables = dataset_stats(rows)
    console.print(counts_table(tables["source"], title=f"{manifest}: source x class", group_name="source"))
    console.print(counts_table(tables["view"], title=f"{manifest}: view x class", group_name="view"))


def validate(
    manifest: ManifestArg,
    check_files: Annotated[bool, typer.Option(metavar="", help="Check that every image file exists (--no-check-files: "
                                                               "only the CSV itself).")] = True,
    decode: Annotated[bool, typer.Option(
        "--decode", help="Also read every image as training and scoring do (reports every unreadable one).")] = False,
) -> None:
    """Check a manifest and list every bad row (exit status 1 when there is any; 2 when there is no manifest)."""
    with fail_cleanly():
        if not manifest.is_file():
            raise ConfigError(f"{manifest}: {'not a file' if manifest.exists() else 'no such manifest file'}")
    with fail_cleanly(1), Progress(TextColumn("reading images"), BarColumn(), MofNCompleteColumn(),
                                   TimeElapsedColumn(), console=errors, transient=True,
                                   disable=not decode or not errors.is_terminal) as bar:
        task = bar.add_task("", total=None)
        loaded = read_manifest(manifest, check_files=check_files, decode=decode, progress=lambda: bar.advance(task))
    checked = "every image read" if decode else "image files exist" if check_files else "files not checked"
    console.print(f"{manifest}: OK, {len(loaded.rows)} rows ({checked})", markup=False, highlight=False, soft_wrap=True)


def split(
    manifest: ManifestArg,
    out: Annotated[Path, typer.Option("--out", help="Splits CSV to write (manifest + split, fold).")],
    seed: Annotated[int, typer.Option(help="Random seed.", min=0, max=2**32 - 1)] = 0,
    test_frac: Annotated[float, typer.Option(help="Fraction of patients held out as the test set: 1/n (0.5, 0.25, 0.2, ...).")] = 0.2,
    folds: Annotated[int, typer.Option(help="Cross-validation folds of the rest.")] = 5,
    overwrite: OverwriteOpt = False,
) -> None:
    """Patient-grouped, label-stratified test set and cross-validation folds."""
    with fail_cleanly():
        _check_out(out, [manifest], overwrite, ": a splits file is the record of the runs made on it (splitting again "
                                               "after a change moves patients between partitions)")
        loaded = read_manifest(manifest)
        rows = make_splits(loaded.rows, seed=seed, test_frac=test_frac, folds=folds)
        columns = [name for name in loaded.columns if name not in SPLIT_COLUMNS] + list(SPLIT_COLUMNS)
        write_manifest(rows, out, columns)
    mix = crosstab(sorted(rows, key=_partition), _partition)
    console.print(counts_table(mix, title=f"{out}: class mix by partition", group_name="partition", percent=True))


def build_collection(
    metadata_csv: Annotated[Path, typer.Argument(help="The collection's metadata.csv.")],
    images_dir: Annotated[Path, typer.Argument(help="The collection's images folder.")],
    out: OutOpt,
    report: ReportOpt = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Manifest from the COVID-19 image data collection (metadata.csv + images folder)."""
    with fail_cleanly():
        _check_outs(out, report, [metadata_csv], overwrite)
        _write_build(build_covid_collection(metadata_csv, images_dir), out, report)


def build_kermany_set(
    root: Annotated[Path, typer.Argument(help="Folder with NORMAL/ and PNEUMONIA/ (possibly under train/, test/).")],
    out: OutOpt,
    report: ReportOpt = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Manifest from the Kermany pediatric set."""
    with fail_cleanly():
        _check_outs(out, report, [], overwrite)
        _write_build(build_kermany(root), out, report)


def _check_outs(out: Path, report: Path | None, inputs: list[Path], overwrite: bool) -> None:
    """A build's --out and --report: new files (or, with --overwrite, existing ones), not its inputs."""
    _check_out(out, inputs, overwrite)
    if report is not None:
        if report.resolve() == out.resolve():
            raise ConfigError(f"--report {report} is the --out manifest: name another file")
        _check_out(report, inputs, overwrite, option="--report")  # before the manifest is written, not after


def _write_build(build: Build, out: Path, report: Path | None) -> None:
    """Write a build's manifest (and report), then show the report."""
    write_manifest(build.rows, out, build.columns)
    if report is not None:
        build.report.write_json(report)
    console.print(build.report.table())
    console.print(f"wrote {len(build.rows)} rows to {out}", markup=False, highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    """Add the ``data`` command group (and its ``build`` subgroup) to ``app``."""
    data = typer.Typer(help="Build, validate, count and split manifests.", no_args_is_help=True)
    data.command()(stats)
    data.command()(validate)
    data.command()(split)
    build = typer.Typer(help="Build a manifest from a public source layout.", no_args_is_help=True)
    build.command("covid-collection")(build_collection)
    build.command("kermany")(build_kermany_set)
    data.add_typer(build, name="build")
    app.add_typer(data, name="data")
