"""``patchflannel bench``: time loop vs batched vs packed vs the global baseline (see bench.harness)."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from typing import Annotated

import typer

from patchflannel.cli._common import QuietOpt, interrupted_exit, stops_cleanly


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(dict.fromkeys(int(v) for v in text.split(",") if v.strip()))
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated integers, got {text!r}") from None


def _words(text: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys(v.strip() for v in text.split(",") if v.strip()))


def bench(
    out: Annotated[Path, typer.Option("--out", help="Folder for bench.json, bench.md, bench.png.")] = Path("bench-out"),
    preset: Annotated[str | None, typer.Option(help="Random-weight networks: flannel5 (paper), cpu5, tiny.")] = None,
    bundle: Annotated[Path | None, typer.Option(
        help="Bundle folder (default: the package's bundle) when no preset.")] = None,
    images: Annotated[Path | None, typer.Option(
        help="Image folder, manifest or pattern, as score takes them "
             "(default: shared cxr4 if present, else phantoms).")] = None,
    synthetic: Annotated[bool, typer.Option(
        "--synthetic", metavar="", help="Use deterministic synthetic phantom JPEGs.")] = False,
    n: Annotated[int, typer.Option("--n", "-n", help="Images a run.")] = 8,
    loop_n: Annotated[int, typer.Option(
        help="Images a run in loop mode: the first of the --n images, at most --n (it is slow).")] = 2,
    k: Annotated[str, typer.Option("--k", "-k", help="Comma-separated K values.")] = "16,50,100",
    modes: Annotated[str, typer.Option(help="Comma-separated modes.")] = "loop,batched,packed,auto,global",
    pack: Annotated[int | None, typer.Option(
        help="Images a call in packed and global modes (default 4, or N when N is smaller).")] = None,
    precision: Annotated[str, typer.Option(help="auto, fp32, fp16 or bf16; comma-separated to compare.")] = "auto",
    backend: Annotated[str, typer.Option(
        help="auto, torch, onnxruntime or tensorrt; comma-separated to compare.")] = "auto",
    learner_streams: Annotated[str, typer.Option(
        help="CUDA streams the learners' calls are dealt over (GPU only); "
             "comma-separated to compare, e.g. 1,5.")] = "1",
    loader: Annotated[str, typer.Option(help="auto, cpu, dali or nvjpeg.")] = "auto",
    device: Annotated[str, typer.Option(help="auto (cuda when available), cpu, cuda or cuda:N.")] = "auto",
    compile: Annotated[bool, typer.Option(
        "--compile", metavar="", help="torch.compile with frozen weights (falls back to eager).")] = False,
    repeats: Annotated[int, typer.Option(help="Timed repeats a run (loop mode: one; it is slow).")] = 3,
    warmup: Annotated[int, typer.Option(help="Warm-up runs before timing.")] = 1,
    label: Annotated[str, typer.Option(help="A title for the report.")] = "",
    smoke: Annotated[bool, typer.Option(
        "--smoke", metavar="",
        help="A seconds-long run of --preset or --bundle (neither: preset tiny); it replaces N, K, pack, repeats, "
             "warm-up and modes with N=2 (loop 1), K=4, pack 2, one repeat, no warm-up, "
             "modes loop,batched,packed,global.")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Time the engine's ways of classifying N images with K patches each and write a report."""
    from patchflannel.bench.harness import BenchConfig, run_bench
    from patchflannel.bench.report import markdown
    from patchflannel.errors import PatchflannelError

    config = BenchConfig(out=out, preset=preset, bundle=bundle, images=images, synthetic=synthetic, n=n, loop_n=loop_n, ks=_ints(k),
                         modes=_words(modes), pack=pack if pack is not None else min(4, n), precisions=_words(precision),
                         backends=_words(backend), learner_streams=_ints(learner_streams), loader=loader, device=device, compile=compile, repeats=repeats,
                         warmup=warmup, label=label)
    if smoke:
        config.preset = config.preset or (None if bundle is not None else "tiny")
        config.n, config.loop_n, config.ks, config.repeats, config.warmup, config.pack = 2, 1, (4,), 1, 0, 2
        config.modes = ("loop", "batched", "packed", "global")
    started = time.time()
    try:
        with stops_cleanly():
            report = run_bench(config, progress=None if quiet else lambda line: typer.echo(line, err=True))
    except KeyboardInterrupt as exc:
        written = out / "bench.json"
        kept = (f"{written} (and bench.md) hold the runs finished so far"
                if written.is_file() and written.stat().st_mtime >= started else "no run had finished: no report was written")
        raise interrupted_exit(exc, f"{kept}.") from None
    except (PatchflannelError, OSError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    if quiet:
        return
    typer.echo(markdown(report))
    plot = " and bench.png" if importlib.util.find_spec("matplotlib") is not None else " (no plot: matplotlib is not installed)"
    typer.echo(f"wrote {out}/bench.json, bench.md{plot}")


def register(app: typer.Typer) -> None:
    """Add ``bench`` to the app."""
    app.command("bench")(bench)
