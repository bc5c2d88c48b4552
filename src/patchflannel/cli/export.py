"""``patchflannel export``: bundle, onnx, tensorrt, compiled, triton, verify."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from patchflannel.cli._common import fail_cleanly
from patchflannel.data.shared import DATA_ENV
from patchflannel.errors import ConfigError, PatchflannelError

export_app = typer.Typer(help="Build, convert and verify model bundles.", no_args_is_help=True)
console = Console()
UNDONE = "the export was undone: a new folder is removed, a bundle exported in place keeps its files as they were"
"""What Ctrl-C or SIGTERM leaves of an export (its cleanup runs as for any failure)."""


def _summary(bundle) -> None:  # noqa: ANN001 - a Bundle
    table = Table(title=f"bundle {bundle.name} at {bundle.root}")
    for col in ("model", "arch", "format", "precision", "file", "parity"):
        table.add_column(col, overflow="fold")  # wrap, never cut a name short (80 columns off a terminal)
    for m in bundle.models():
        for f in m.files:
            parity = f.extra.get("parity")
            shown = "" if not parity else (f"{'ok' if parity['passed'] else 'FAILED'} diff {parity['max_abs_diff']:.2g}"
                                           f" <= {parity['tolerance']:.2g}, labels {parity['label_agreement']:.3f}")
            table.add_row(m.name, m.arch, f.format, f.precision, f.path, shown)
    console.print(table)
    synthetic = sorted({m.name for m in bundle.models() for f in m.files
                        if str(f.extra.get("parity", {}).get("inputs", "")).startswith("synthetic")})
    if synthetic:
        console.print(f"note: the parity checks of {', '.join(synthetic)} ran on synthetic inputs (no real data found: "
                      f"--data DIR or ${DATA_ENV} names a folder with lungseg/ and cxr4/)", markup=False, highlight=False)


@export_app.command("bundle")
def bundle_cmd(
    *,  # keyword-only, so the required --out keeps its place (and its row in --help) after the optional ones
    segmentation: Annotated[Path | None, typer.Option(
        help="Segmentation training run folder, or a bundle folder whose segmentation model is taken (default: the "
             "package's bundle, whose masks learners trained with segmentation_bundle: null were cut with).")] = None,
    learner: Annotated[list[Path], typer.Option(help="Learner run folder, in ensemble order (repeat).")] = [],
    ensemble: Annotated[Path | None, typer.Option(help="Ensemble training run folder.")] = None,
    out: Annotated[Path, typer.Option(help="New bundle folder.")],
    name: Annotated[str, typer.Option(help="Bundle name.")] = "patchflannel",
) -> None:
    """Assemble a torch bundle from training runs (best.pt + run.json)."""
    from patchflannel.bundle import default_bundle_path
    from patchflannel.export.build import make_bundle

    with fail_cleanly(interrupted=UNDONE):
        _summary(make_bundle(out, segmentation_run=segmentation or default_bundle_path(), learner_runs=learner,
                             ensemble_run=ensemble, name=name))


@export_app.command("onnx")
def onnx_cmd(
    bundle: Annotated[Path | None, typer.Argument(
        help="Bundle folder (default: the package's bundle, exported into --out).")] = None,
    out: Annotated[Path | None, typer.Option(
        help="Write into a copy of the bundle here (default: in place; needed for the package's bundle).")] = None,
    model: Annotated[list[str], typer.Option(help="Export only these model names (repeat).")] = [],
    preset: Annotated[str | None, typer.Option(
        help="'flannel5': random-weight FC-DenseNet103 + the five FLANNEL learners.")] = None,
    random: Annotated[list[str], typer.Option(
        help="Random-weight learner architecture (repeat) instead of a bundle.")] = [],
    opset: Annotated[int, typer.Option(help="ONNX opset.")] = 17,
    precision: Annotated[str, typer.Option(help="fp32, or fp16 (fp32 inputs/outputs) for TensorRT 11.")] = "fp32",
    data: Annotated[Path | None, typer.Option(
        help="Real data folder for the parity check (default: $PATCHFLANNEL_SHARED_DATA, "
             "else shared/data beside the repository, else ../shared/data).")] = None,
) -> None:
    """Export every network to ONNX with a dynamic batch axis, checked against torch with ONNX Runtime."""
    from patchflannel.export.onnx import export_onnx, export_random_onnx
    from patchflannel.models.classifiers import FLANNEL_LEARNERS

    with fail_cleanly(interrupted=UNDONE):
        if preset is None and not random:
            _summary(export_onnx(bundle, out, models=model or None, opset=opset, data_dir=data, precision=precision))
            return
        if preset not in (None, "flannel5"):
            raise PatchflannelError(f"unknown preset {preset!r}: the one preset is flannel5")
        if bundle is not None or out is None:
            raise PatchflannelError("--preset flannel5 / --random ARCH need --out DIR and no BUNDLE")
        exported = export_random_onnx(out, FLANNEL_LEARNERS if preset else random,
                                      segmentation="fcdensenet103" if preset else "fcdensenet56",
                                      name=preset or "random", models=model or None, opset=opset, data_dir=data,
                                      precision=precision)
    _summary(exported)


@export_app.command("tensorrt")
def tensorrt_cmd(
    bundle: Annotated[Path | None, typer.Argument(
        help="Bundle folder with ONNX files (default: the package's bundle; "
             "it has none until exported into another folder).")] = None,
    k_max: Annotated[int | None, typer.Option(
        help="Largest learner batch (default 4 K; at least the bundle's K).")] = None,
    k_opt: Annotated[int | None, typer.Option(help="Learner batch the engine is tuned for (default K).")] = None,
    fp16: Annotated[bool, typer.Option(metavar="", help="FP16 engines.")] = True,
    model: Annotated[list[str], typer.Option(help="Build only these model names (repeat).")] = [],
) -> None:
    """Build TensorRT engines (needs TensorRT and an NVIDIA GPU) and record them in the bundle."""
    from patchflannel.export.tensorrt import build_engines

    with fail_cleanly(interrupted=UNDONE):
        _summary(build_engines(bundle, k_max=k_max, k_opt=k_opt, fp16=fp16, models=model or None))


@export_app.command("compiled")
def compiled_cmd(
    bundle: Annotated[Path | None, typer.Argument(
        help="Bundle folder (default: the package's bundle, exported into --out).")] = None,
    out: Annotated[Path | None, typer.Option(
        help="Write into a copy of the bundle here (default: in place; needed for the package's bundle).")] = None,
    device: Annotated[str, typer.Option(
        help="cpu, cuda or cuda:N (auto: cuda when available); "
             "compiled code is for the device it was made on.")] = "cpu",
    precision: Annotated[str, typer.Option(help="fp32 or fp16.")] = "fp32",
    model: Annotated[list[str], typer.Option(help="Compile only these model names (repeat).")] = [],
    data: Annotated[Path | None, typer.Option(help="Real data folder for the parity check.")] = None,
) -> None:
    """Compile AOTInductor packages (torch.export, dynamic batch), checked against eager torch."""
    from patchflannel.export.compiled import export_compiled

    with fail_cleanly(interrupted=UNDONE):
        _summary(export_compiled(bundle, out, models=model or None, device=device, precision=precision, data_dir=data))


@export_app.command("triton")
def triton_cmd(
    bundle: Annotated[Path, typer.Argument(help="Bundle folder with ONNX (or TensorRT) files.")],
    out: Annotated[Path, typer.Argument(help="New model repository folder.")],
    model_format: Annotated[str, typer.Option(
        "--format", help="Every network's files: onnx or tensorrt (the bundle must hold them).")] = "onnx",
    k_max: Annotated[int | None, typer.Option(help="Learners' max_batch_size (default 4 K).")] = None,
) -> None:
    """Write a Triton model repository (ensemble of preprocess, segmentation, sampler, learners, votes, flannel)."""
    from patchflannel.export.triton import export_triton, validate_repository

    with fail_cleanly(interrupted=UNDONE):
        repo = export_triton(bundle, out, model_format=model_format, k_max=k_max)
        console.print(f"wrote {repo}: {', '.join(sorted(validate_repository(repo)))} (configs parsed, tensor chain checked)")


@export_app.command("verify")
def verify_cmd(
    bundle: Annotated[Path | None, typer.Argument(help="Bundle folder (default: the package's bundle).")] = None,
) -> None:
    """Check a bundle (schema, files, hashes, formats, torch weights that fit their architectures) and list its
    files (exit status 1 when it fails; 2 when there is no folder to check)."""
    from patchflannel.bundle import default_bundle_path, load_bundle, load_torch_model
    from patchflannel.errors import BundleError

    bundle = bundle if bundle is not None else default_bundle_path()
    with fail_cleanly():
        if bundle.name == "bundle.json" and bundle.is_file():  # the bundle's own file names its folder
            bundle = bundle.parent
        if not bundle.is_dir():
            raise ConfigError(f"{bundle}: {'not a folder' if bundle.exists() else 'no such bundle folder'}")
        if not (bundle / "bundle.json").is_file():
            raise ConfigError(f"{bundle}: no bundle.json in it (not a bundle folder)")
    with fail_cleanly(1):
        loaded = load_bundle(bundle)
        _summary(loaded)
        misfits = []
        for entry in loaded.models():  # as every command loads them: a file of another network fails here too
            try:
                load_torch_model(loaded, entry)
            except BundleError as exc:
                misfits.append(str(exc))
        if misfits:
            raise BundleError(f"bundle {loaded.root} refused:\n  " + "\n  ".join(misfits))
    console.print("[green]bundle verified[/green]")


def register(app: typer.Typer) -> None:
    """Attach the ``export`` command group."""
    app.add_typer(export_app, name="export")
