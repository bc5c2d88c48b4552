"""``bench``: time the engine's ways of classifying N images with K patches each (SPEC.md "N versus kN").

Modes (one engine, different call structure):
  ``loop``     one patch a call (K*N calls a learner: the reference code's way);
  ``batched``  one call of K patches per image per learner;
  ``packed``   the patches of ``pack`` images in one call per learner;
  ``auto``     the engine's own choice for the device (on a CPU: micro-batches of a few patches);
  ``global``   the FLANNEL baseline: one whole-image call per image batch per learner (no segmentation, no
               patches: one run, whatever the K sweep; its K is None).
Every mode runs for each backend x precision asked for (``--backend torch,onnxruntime --precision
fp32,fp16``) and, on a GPU, for each number of learner streams (``--learner-streams 1,5``: the learners'
calls dealt over that many CUDA streams; the loop runs on one); a speed-up is over the loop of the same
backend and precision. Every run is end to end from
encoded bytes; per-stage times (decode, segment, mask, sample, gather, infer,
ensemble) come from CUDA events on a GPU and ``perf_counter`` on a CPU. Medians and p95 over repeats, after
a warm-up run (loop mode runs once: its K*N calls are slow).
"""

from __future__ import annotations

import contextlib
import io
import os
import platform
import statistics
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from patchflannel.bench.report import pair, variant, write_report
from patchflannel.bundle import default_preprocessing, library_versions, load_bundle
from patchflannel.data.shared import shared_data_dir
from patchflannel.devices import resolve_device
from patchflannel.engine.backends import resolve_backend, resolve_precision
from patchflannel.engine.engine import LEARNER_STAGE, STAGES, Engine
from patchflannel.errors import ConfigError
from patchflannel.io.files import check_can_write
from patchflannel.models.classifiers import CPU_LEARNERS, FLANNEL_LEARNERS
from patchflannel.scoring.inputs import discover_inputs

MODES = ("loop", "batched", "packed", "auto", "global")
PRESETS: dict[str, tuple[str, tuple[str, ...], int]] = {
    # name: (segmentation network, learners, segmentation input size)
    "flannel5": ("fcdensenet103", FLANNEL_LEARNERS, 256),
    "cpu5": ("fcdensenet56", CPU_LEARNERS, 256),
    "tiny": ("fcdensenet56", ("shufflenet_v2_x0_5", "mobilenet_v3_small"), 128),  # smoke runs: seconds on 2 cores
}
PER_RUN = ("k", "images_per_call", "patch_batch")
"""Engine settings a bench run sets for itself: recorded per run, left out of the report's engines."""


@dataclass
class BenchConfig:
    """What to time. ``bundle`` is used when ``preset`` is None (None there: the default bundle). Every mode
    and K runs for each backend x precision x learner streams (but ``loop`` on one stream only)."""

    out: Path
    preset: str | None = None
    bundle: Path | None = None
    images: Path | None = None
    synthetic: bool = False
    n: int = 8
    loop_n: int = 2
    ks: tuple[int, ...] = (16, 50, 100)
    modes: tuple[str, ...] = MODES
    pack: int = 4
    precisions: tuple[str, ...] = ("auto",)
    backends: tuple[str, ...] = ("auto",)
    learner_streams: tuple[int, ...] = (1,)
    loader: str = "auto"
    device: str = "auto"
    compile: bool = False
    repeats: int = 3
    warmup: int = 1
    seed: int = 0
    label: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


# -------------------------------------------------------------------------------------------- timers
class PerfTimer:
    """Wall-clock stage timer (thread-safe: the preparation stages run in the engine's preparation thread)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            with self._lock:
                self.seconds[name] += time.perf_counter() - start

    def totals(self) -> dict[str, float]:
        """Seconds per stage."""
        return dict(self.seconds)


class CudaTimer:
    """Stage timer from CUDA events recorded on the current stream; read after the run.

    Events go on the recording thread's current stream, so with the engine's ``stream`` a stage's time is its
    span on its own stream: the preparation stages on the engine's preparation stream, beside the learners
    (their spans include the time they share the GPU with them; ``mask`` is the host's mask post-processing,
    while that stream waits), ``infer`` and ``ensemble`` on the caller's stream.
    """

    def __init__(self) -> None:
        self._events: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        try:
            yield
        finally:
            end.record()
            with self._lock:
                self._events.append((name, start, end))

    def totals(self) -> dict[str, float]:
        """Seconds per stage."""
        out: dict[str, float] = defaultdict(float)
        for name, start, end in self._events:
            end.synchronize()  # on whichever device the engine runs
            out[name] += start.elapsed_time(end) / 1000.0
        return dict(out)


# -------------------------------------------------------------------------------------------- inputs
def phantom_jpegs(n: int, size: int = 1024, seed: int = 0, quality: int = 90) -> list[tuple[str, bytes]]:
    """``n`` deterministic synthetic phantoms (:mod:`patchflannel.phantoms`) as grey JPEG bytes.

    For machines without data: the same ``seed`` gives the same bytes. Not radiographs.
    """
    from PIL import Image

    from patchflannel.phantoms import make_phantom

    out = []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(make_phantom(seed + i, size)).save(buf, "JPEG", quality=quality)
        out.append((f"synthetic_phantom_{seed + i:04d}.jpg", buf.getvalue()))
    return out


def default_images() -> Path | None:
    """The shared cxr4 set when present (:func:`~patchflannel.data.shared.shared_data_dir`)."""
    root = shared_data_dir()
    return root / "cxr4" if root is not None and (root / "cxr4" / "manifest.csv").is_file() else None


def image_files(source: Path) -> list[str]:
    """The image files of ``source`` as ``score`` finds them (a file, a folder, a pattern, a manifest CSV; see
    :mod:`patchflannel.scoring.inputs`); a folder holding a ``manifest.csv`` (a data set's) is read through it."""
    source = Path(source)
    if source.is_dir() and (source / "manifest.csv").is_file():
        source = source / "manifest.csv"
    return [item.source for item in discover_inputs(source)]


def load_inputs(images: Path | None, n: int, seed: int = 0, synthetic: bool = False) -> tuple[list[tuple[str, bytes]], str]:
    """``n`` encoded images and a description of where they came from (real files or phantoms)."""
    source = None if synthetic else (images if images is not None else default_images())
    if source is None:
        return phantom_jpegs(n, seed=seed), f"{n} synthetic phantom JPEGs (1024x1024, seed {seed})"
    files = image_files(source)[:n]
    if len(files) < n:
        raise ConfigError(f"{source}: {len(files)} image file(s) found, {n} requested (--n)")
    return [(path, _read(path)) for path in files], f"{n} images from {source}"


def _read(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read this image ({exc.strerror or exc})") from None


# -------------------------------------------------------------------------------------------- engines
def build_engine(config: BenchConfig, backend: str = "auto", precision: str = "auto") -> Engine:
    """The engine under test: a preset's random-weight networks, or a bundle."""
    kw = dict(device=config.device, loader=config.loader, precision=precision, seed=config.seed,
              compile=config.compile)
    if config.preset is None:
        return Engine.from_bundle(config.bundle, backend=backend, **kw)
    _check_preset(config.preset, (backend,))
    from patchflannel.models import get_model

    seg_name, learner_names, seg_size = PRESETS[config.preset]
    torch.manual_seed(config.seed)
    learners = {name: get_model(name) for name in learner_names}
    ensemble = get_model("flannel", n_learners=len(learners))
    pre = default_preprocessing()
    pre["segmentation"]["size"] = seg_size
    return Engine.from_modules(get_model(seg_name), learners, ensemble, preprocessing=pre,
                               name=f"preset:{config.preset}", **kw)


def mode_engine(engine: Engine, mode: str, k: int, pack: int) -> Engine:
    """``engine`` with the call structure of ``mode`` at K = ``k``. The patch modes keep each learner's own
    mode (a bundle's global learners run as in scoring); ``global`` runs every learner on the whole image."""
    if mode == "loop":
        return engine.configured(k=k, images_per_call=1, patch_batch=1)
    if mode == "batched":
        return engine.configured(k=k, images_per_call=1, patch_batch=k)
    if mode == "packed":
        return engine.configured(k=k, images_per_call=pack, patch_batch=pack * k)
    if mode == "auto":
        return engine.configured(k=k)
    if mode == "global":
        return engine.configured(k=k, images_per_call=pack, patch_batch=pack, learner_mode="global")
    raise ConfigError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")


# -------------------------------------------------------------------------------------------- timing
def _p95(values: list[float]) -> float:
    return float(np.percentile(values, 95))


def time_run(engine: Engine, inputs: list[tuple[str, bytes]], repeats: int, warmup: int,
             warmup_engine: Engine | None = None, prefetch: int = 2) -> dict[str, Any]:
    """Median/p95 seconds an image (end to end) and per-stage seconds an image over ``repeats`` runs
    (``engine.stream`` with ``prefetch``: 0 runs one step at a time, as the reference's loop did).

    ``preprocess_fraction`` is the share of the time per image outside the learners and the ensemble: the
    preparation (decode to gathered patches) that they did not hide. ``preprocess_busy_fraction`` is the
    preparation stages' share of all stage time, overlapped or not.
    """
    cuda = engine.device.type == "cuda"
    started = time.perf_counter()
    for _ in range(warmup):
        list((warmup_engine or engine).stream(inputs[: max(1, engine.images_per_call)]))
    if cuda:
        torch.cuda.synchronize(engine.device)
    warmup_seconds = time.perf_counter() - started
    walls, stages = [], defaultdict(list)
    statuses: dict[str, int] = defaultdict(int)
    for _ in range(repeats):
        timer = CudaTimer() if cuda else PerfTimer()
        start = time.perf_counter()
        preds = list(engine.stream(inputs, timer=timer, prefetch=prefetch))
        if cuda:
            torch.cuda.synchronize(engine.device)
        walls.append((time.perf_counter() - start) / len(inputs))
        for name, sec in timer.totals().items():
            stages[name].append(sec / len(inputs))
        for p in preds:
            statuses[p.status] += 1
        failed = [p for p in preds if not p.ok]
        if failed:  # a failed input costs almost nothing and would inflate images/s
            raise ConfigError(f"{len(failed)} of {len(preds)} bench inputs gave no result (first: {failed[0].error}); "
                              "bench times images that score")
    stage_median = {s: statistics.median(stages[s]) for s in STAGES if s in stages}
    learner_median = {s[len(LEARNER_STAGE):]: statistics.median(v) for s, v in stages.items() if s.startswith(LEARNER_STAGE)}
    total_stage = sum(stage_median.values()) or float("nan")
    pre = sum(stage_median.get(s, 0.0) for s in ("decode", "segment", "mask", "sample", "gather"))
    wall = statistics.median(walls)
    compute = stage_median.get("infer", 0.0) + stage_median.get("ensemble", 0.0)
    return {
        "n_images": len(inputs), "repeats": repeats, "warmup_seconds": warmup_seconds,
        "seconds_per_image_median": wall, "seconds_per_image_p95": _p95(walls), "seconds_per_image_runs": walls,
        "images_per_second": 1.0 / wall,
        "stage_seconds_per_image": stage_median,
        "learner_seconds_per_image": learner_median,
        # Preparation overlaps the learners: its stages' spans are busy times, not shares of the wall time.
        "preprocess_fraction": max(0.0, wall - compute) / wall,
        "preprocess_busy_fraction": pre / total_stage,
        "statuses": dict(statuses),
    }


def device_info(engine: Engine) -> dict[str, Any]:
    """Device name and library versions for the report."""
    info: dict[str, Any] = {
        "device": engine.describe()["device_name"], "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), **library_versions(),
        "cuda": torch.version.cuda,
    }
    for mod in ("cupy", "nvidia.dali"):
        try:
            info[mod] = __import__(mod, fromlist=["__version__"]).__version__
        except ImportError:
            pass
    return info


def _cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what the platform module knows."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_bench(config: BenchConfig, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Time every mode at every K for each backend x precision; write ``bench.json``, ``bench.md`` and
    ``bench.png`` into ``config.out`` (after every run: a run cut short still leaves its figures).

    ``progress`` gets a line as each run finishes (with its warm-up time) and, with ``compile``, one as each
    network compiles (in :meth:`Engine.warm_up`, before the run and outside its times).
    """
    if not config.ks or not config.modes or min(config.ks) < 1:
        raise ConfigError("bench needs at least one K (each >= 1) and one mode")
    for name in ("n", "loop_n", "repeats", "pack"):
        if getattr(config, name) < 1:
            raise ConfigError(f"bench needs {name} (--{name.replace('_', '-')}) >= 1, got {getattr(config, name)}")
    if config.warmup < 0:
        raise ConfigError(f"bench needs warmup (--warmup) >= 0, got {config.warmup}")
    if config.n < config.pack and {"packed", "global"} & set(config.modes):
        raise ConfigError(f"packed and global modes pack {config.pack} images a call (--pack): n (--n {config.n}) "
                          "must be >= pack")
    if config.preset is not None and config.bundle is not None:
        raise ConfigError("pass either --preset or --bundle, not both")
    if config.synthetic and config.images is not None:
        raise ConfigError("pass either --images or --synthetic, not both")
    for mode in config.modes:
        if mode not in MODES:
            raise ConfigError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
    if not config.backends or not config.precisions or not config.learner_streams:
        raise ConfigError("bench needs at least one backend, one precision and one learner-streams count")
    if "loop" in config.modes and 1 not in config.learner_streams:
        raise ConfigError("loop mode runs on one learner stream (the reference's way): include 1 in the learner "
                          "streams (e.g. 1,5) or leave loop out of the modes")
    _check_pairs(config)
    check_can_write(config.out, f"--out {config.out}")  # a bad --out fails now, not after the timing
    inputs, source = load_inputs(config.images, config.n, config.seed, config.synthetic)
    # Paths as absolute ones (the report outlives the folder it was run from); the loop times the first of the
    # N images (at most N: "x loop" compares the same images).
    paths = {name: str(Path(getattr(config, name)).resolve()) for name in ("out", "bundle", "images")
             if getattr(config, name) is not None}
    report: dict[str, Any] = {"label": config.label,
                              "config": {**asdict(config), **paths, "loop_n": min(config.loop_n, config.n)},
                              "engines": [], "inputs": source, "environment": {}, "compile_errors": {},
                              "compile_seconds": {}, "runs": []}
    for backend in config.backends:
        for precision in config.precisions:
            _time_pair(config, backend, precision, inputs, report, progress)
            if torch.cuda.is_available():  # the pair's networks are gone with _time_pair's frame
                torch.cuda.empty_cache()
    return report


def _check_pairs(config: BenchConfig) -> None:
    """Every backend and precision asked for can be timed (names, a preset's torch-only modules, a bundle's
    exported files): checked before the first pair is timed, which may take minutes."""
    device = resolve_device(config.device)
    for precision in config.precisions:
        resolve_precision(precision, device)
    if config.preset is not None:
        _check_preset(config.preset, config.backends)
        return
    bundle = load_bundle(config.bundle)
    for backend in config.backends:
        resolve_backend(backend, bundle, device)


def _check_preset(preset: str, backends: tuple[str, ...]) -> None:
    """ConfigError for an unknown preset, or a backend other than torch for one (its networks are in memory)."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; expected one of {', '.join(PRESETS)}")
    if set(backends) - {"auto", "torch"}:
        raise ConfigError("presets hold in-memory torch modules: use --backend torch or a --bundle with exported files")


def _time_pair(config: BenchConfig, backend: str, precision: str, inputs: list[tuple[str, bytes]],
               report: dict[str, Any], progress: Callable[[str], None] | None) -> None:
    """Every learner-stream count of one backend x precision (one set of networks, shared by the counts)."""
    engine = build_engine(config, backend, precision)
    if not any(lr.mode == "patch" for lr in engine.learners) and set(config.modes) - {"global"}:
        raise ConfigError(f"{engine.bundle_name}: every learner is a global one (no patches): time it with "
                          "--modes global")
    # Every stream count set up before any timing: a count the device cannot take fails now.
    for eng in [engine.configured(learner_streams=s) for s in config.learner_streams]:
        # K and the call sizes are each run's own (in its entry of "runs"), not the engine's defaults.
        described = {key: v for key, v in eng.describe().items() if key not in PER_RUN}
        if any(variant(e) == variant(described) for e in report["engines"]):
            if progress is not None:
                progress(f"backend {backend}, precision {precision}: {variant(described)}, already timed")
            continue
        report["engines"].append(described)
        report["environment"] = report["environment"] or device_info(eng)
        _time_engine(eng, described, config, inputs, report, progress)


def _time_engine(engine: Engine, described: dict[str, Any], config: BenchConfig, inputs: list[tuple[str, bytes]],
                 report: dict[str, Any], progress: Callable[[str], None] | None) -> None:
    """Every mode at every K on one engine (``described``: its :meth:`Engine.describe`); each run is added to
    ``report`` and the report rewritten."""
    if engine.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    name = variant(described)
    for k in config.ks:
        for mode in config.modes:
            if mode == "global" and k != config.ks[0]:
                continue  # no patches: one run serves every K
            if mode == "loop" and engine.learner_streams > 1:
                continue  # the reference's loop: one stream (speed-ups are over it)
            eng = mode_engine(engine, mode, k, config.pack)
            subset = inputs[: config.loop_n] if mode == "loop" else inputs[: config.n]
            # The loop's call shapes do not depend on K: warm it up cheaply.
            warm = eng.configured(k=min(k, 2), images_per_call=1, patch_batch=1) if mode == "loop" else None
            started = time.perf_counter()
            if config.compile:  # compile each network now, one progress line each, before the timed runs
                eng.warm_up(progress)
            # The loop as the reference ran it: one step at a time (preparing ahead, beside its per-patch calls,
            # would take cores from them on a CPU, and make the loop, hence every "x loop", look slower).
            timing = time.perf_counter()
            result = time_run(eng, subset, config.repeats if mode != "loop" else 1, config.warmup, warm,
                              **({"prefetch": 0} if mode == "loop" else {}))
            timed = time.perf_counter() - timing - result["warmup_seconds"]
            report["runs"].append({
                "mode": mode, "k": None if mode == "global" else k, "backend": described["backend"],
                "precision": described["precision"], "learner_streams": eng.learner_streams,
                "images_per_call": eng.images_per_call,
                "patch_batch": eng.call_size("global" if mode == "global" else "patch"),  # what a call carries
                "wall_seconds": time.perf_counter() - started, **result})
            if progress is not None:
                progress(f"{name}, {mode}{'' if mode == 'global' else f' K={k}'}: {result['images_per_second']:.2f} "
                         f"images/s (warm-up {result['warmup_seconds']:.1f} s, timed runs {timed:.1f} s)")
            backends = {"segmentation": engine.segmenter, **{lr.name: lr.backend for lr in engine.learners}}
            # Networks are shared by every stream count: keyed by backend and precision, recorded once.
            report["compile_errors"].update({f"{pair(described)} {n}": b.compile_error for n, b in backends.items()
                                             if getattr(b, "compile_error", None)})
            report["compile_seconds"].update({f"{pair(described)} {n}": b.compile_seconds for n, b in backends.items()
                                              if getattr(b, "compiled", False)})
            write_report(report, Path(config.out))
