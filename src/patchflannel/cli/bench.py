"""``patchflannel bench``: time loop vs batched vs packed vs the global baseline (see bench.harness)."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from typing import Optional

import typer

from patchflannel.cli._common import QuietOpt, interrupted_exit, sigterm_as_interrupt


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(dict.fromkeys(int(v) for v in text.split(",") if v.strip()))
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated integers, got {text!r}") from None


def _words(text: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys(v.strip() for v in text.split(",") if v.strip()))


def bench(
    out: Path = typer.Option(Path("bench-out"), "--out", help="Folder for bench.json, bench.md, bench.png."),
    preset: Optional[str] = typer.Option(None, help="Random-weight networks: flannel5 (paper), cpu5, tiny."),
    bundle: Optional[Path] = typer.Option(None, help="Bundle folder (default: the package's bundle) when no preset."),
    images: Optional[Path] = typer.Option(None, help="Image folder, manifest or pattern, as score takes them (default: shared cxr4 if present, else phantoms)."),
    synthetic: bool = typer.Option(False, "--synthetic", metavar="", help="Use deterministic synthetic phantom JPEGs."),
    n: int = typer.Option(8, "--n", "-n", help="Images a run."),
    loop_n: int = typer.Option(2, help="Images a run in loop mode: the first of the --n images, at most --n (it is slow)."),
    k: str = typer.Option("16,50,100", "--k", "-k", help="Comma-separated K values."),
    modes: str = typer.Option("loop,batched,packed,auto,global", help="Comma-separated modes."),
    pack: Optional[int] = typer.Option(None, help="Images a call in packed and global modes (default 4, or N when "
                                       "N is smaller)."),
    precision: str = typer.Option("auto", help="auto, fp32, fp16 or bf16; comma-separated to compare."),
    backend: str = typer.Option("auto", help="auto, torch, onnxruntime or tensorrt; comma-separated to compare."),
    learner_streams: str = typer.Option("1", help="CUDA streams the learners' calls are dealt over (GPU only); "
                                        "comma-separated to compare, e.g. 1,5."),
    loader: str = typer.Option("auto", help="auto, cpu, dali or nvjpeg."),
    device: str = typer.Option("auto", help="auto (cuda when available), cpu, cuda or cuda:N."),
    compile: bool = typer.Option(False, "--compile", metavar="", help="torch.compile with frozen weights (falls back to eager)."),
    repeats: int = typer.Option(3, help="Timed repeats a run (loop mode: one; it is slow)."),
    warmup: int = typer.Option(1, help="Warm-up runs before timing."),
    label: str = typer.Option("", help="A title for the report."),
    smoke: bool = typer.Option(False, "--smoke", metavar="", help="A seconds-long run of --preset or --bundle (neither: preset tiny); it "
                               "replaces N, K, pack, repeats, warm-up and modes with N=2 (loop 1), K=4, pack 2, one "
                               "repeat, no warm-up, modes loop,batched,packed,global."),
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
        with sigterm_as_interrupt():
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
