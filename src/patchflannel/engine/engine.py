"""The engine: encoded images (or arrays) in, Patched FLANNEL predictions out, batched on the device.

Data flow of one call (SPEC.md "The engine"): decode (loader) -> grey float on the device -> segmentation
input (equalised, gamma, 256) -> segmenter in one batched call -> lung mask at 256 -> image at 1024 and
mask upsampled (nearest) -> K centres from per-image seeds (content hash + run seed) -> one gather of the
K patches -> normalised, 3 channels -> each learner over a group of images (``images_per_call`` images) in
calls of ``patch_batch`` patches (on a GPU by default the group's patches in one call) -> vote fractions ->
ensemble -> probabilities. No Python loop runs over patches; the device -> host copies are the masks (post-processed on the host), the final results, a few
scalar checks (an array input's range, an empty mask), and an array input on the device, once, for its
content hash. In-memory inputs are copied as they are handed over (a producer may reuse its buffer).

Overlap (``stream``): the engine's preparation thread prepares groups of ``images_per_call`` images,
``prefetch`` groups ahead: decode, segmentation, mask post-processing on the host, centre sampling and the
patch gather, on a GPU on the engine's own high-priority CUDA stream. The engine's learner thread launches
the learners and the ensemble on the caller's stream, and the caller's thread reads back the previous group's
results while they run. So on a GPU the preprocessing (small kernels and host work) runs beside the learners
instead of between them; on a CPU the same order runs in two threads sharing the cores. With
``learner_streams`` > 1 (GPU only) the learner thread deals the learners over that many CUDA streams,
so that a learner that leaves SMs idle (densenet161's memory-bound layers) may share the GPU with another;
the caller's stream waits for all of them.

The preparation thread and the learner thread are long-lived, one of each per engine (shared by its
``configured`` copies; they end with them): PyTorch keeps cuDNN's autotuned convolution plans per thread, and
a preparation thread made for each call had the segmenter autotuned again on every call (about 4 s on an
H200, docs/benchmarks.md). So the networks run in the same threads for :meth:`Engine.warm_up` and for every
call, whichever threads the callers use.

Thread safety: an engine may be shared by threads. Preparation (loader, segmenter) runs one group at a time in
its thread and the learners one group at a time in theirs, so a thread's preparation overlaps another's
inference; for parallel device work use one engine per thread (or per device).
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ContextManager, Protocol

import numpy as np
import torch
from torch import nn

from patchflannel.bundle import LEARNER_MODES, Bundle, default_preprocessing, load_bundle, load_torch_model
from patchflannel.classes import CLASSES
from patchflannel.devices import resolve_device
from patchflannel.engine.backends import Backend, make_backend, resolve_backend, resolve_precision
from patchflannel.engine.backends.torch_backend import TorchBackend
from patchflannel.engine.inputs import Item, on_device, prepare, take
from patchflannel.engine.loaders import Loader, make_loader
from patchflannel.engine.results import Prediction
from patchflannel.engine.samplers import Sampler, make_sampler
from patchflannel.engine.streams import HostCopy, on_stream, record_event, to_host
from patchflannel.errors import BundleError, ConfigError, ImageReadError
from patchflannel.ops.mask import lung_masks, postprocess_masks
from patchflannel.ops.preprocess import global_view, is_blank, learner_image, resize_mask, segmentation_inputs
from patchflannel.ops.sampler import effective_masks, gather_patches, patch_uniforms, window_origins
from patchflannel.ops.seeding import image_seed
from patchflannel.ops.votes import mean_softmax, vote_fractions

STAGES = ("decode", "segment", "mask", "sample", "gather", "infer", "ensemble")
LEARNER_STAGE = "infer:"
"""Prefix of the per-learner stages timed inside ``infer`` (``infer:<learner name>``)."""
CPU_PATCH_BATCH = 8
"""Patches a call on a CPU: SPEC.md measured micro-batches of 4 to 8 patches fastest on 2 cores."""
GPU_IMAGES_PER_CALL = 4
"""Images whose patches are packed into one learner call on a GPU (SPEC.md: 4 x 100 patches)."""


class StageTimer(Protocol):
    """Times named stages (:data:`STAGES`, and per learner inside ``infer``); bench passes one, the engine's
    default does nothing."""

    def stage(self, name: str) -> ContextManager[Any]: ...


class _NoTimer:
    def stage(self, name: str) -> ContextManager[Any]:
        return contextlib.nullcontext()


@dataclass
class Learner:
    """A base learner: its name (a column of the results), ``mode`` 'patch' or 'global', and its backend."""

    name: str
    mode: str
    backend: Backend


@dataclass
class _Group:
    """Inputs decoded together and carried through the device together (``images_per_call`` of them)."""

    items: list[Item]
    masks: HostCopy | None = None
    global_view: torch.Tensor | None = None
    fallback: torch.Tensor | None = None
    blank: torch.Tensor | None = None
    centres: torch.Tensor | None = None
    patches: torch.Tensor | None = None
    results: HostCopy | None = None
    good: list[Item] = field(init=False)

    def __post_init__(self) -> None:
        self.good = [it for it in self.items if it.error is None]

    def adopt(self) -> None:
        """Mark the group's device tensors (made on the preparation stream) as used by the current stream too,
        so that their memory is not reused before its kernels are done with them."""
        for t in (self.global_view, self.fallback, self.blank, self.centres, self.patches):
            if t is not None and t.is_cuda:
                t.record_stream(torch.cuda.current_stream(t.device))


def _count(name: str, value: Any, auto: bool = True) -> int:
    """A setting that must be a positive integer (or, where ``auto``, 'auto', handled by the caller)."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < 1:
        allowed = "'auto' or an integer >= 1" if auto else "an integer >= 1"
        raise ConfigError(f"{name} must be {allowed}, got {value!r}")
    return int(value)


def _flag(name: str, value: Any) -> bool:
    """A setting that must be True or False (a string such as 'no' would read as true)."""
    if not isinstance(value, (bool, np.bool_)):
        raise ConfigError(f"{name} must be True or False, got {value!r}")
    return bool(value)


class _Worker:
    """One long-lived thread that runs an engine's jobs one at a time: started at the first job, it ends when
    this object is collected; made anew in a forked child (which inherits no threads; on a CPU only: a child
    forked after its parent used CUDA cannot use CUDA)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._lock = threading.Lock()
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._pid = 0

    def submit(self, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future[Any]:
        """``fn(*args)`` in the thread, after the jobs already given."""
        with self._lock:
            if self._pid != os.getpid():
                self._pool = concurrent.futures.ThreadPoolExecutor(
                    max_workers=1, thread_name_prefix=self.name, initializer=_mark_worker)
                self._pid = os.getpid()
            return self._pool.submit(fn, *args)


_WORKER = threading.local()
"""``_WORKER.engine`` is True in the engines' own threads."""


def _mark_worker() -> None:
    _WORKER.engine = True


def _in_worker() -> bool:
    """Whether the calling thread is one of an engine's (any engine's) own threads."""
    return getattr(_WORKER, "engine", False)


def _on_stream(stream: torch.cuda.Stream | None, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` with ``stream`` current (None: as it is, on a CPU)."""
    with on_stream(stream):
        return fn(*args)


def _run_batched(backend: Backend, batch: torch.Tensor, size: int) -> torch.Tensor:
    """``backend``'s outputs for ``batch`` in calls of at most ``size`` inputs (and of at most the backend's
    ``max_batch``, where it has one).

    A compiled backend gets every call at exactly that size (a short last call is zero-padded), so that a
    group with fewer images reuses the compiled graph instead of compiling another.
    """
    size = min(size, getattr(backend, "max_batch", None) or size)
    outs = []
    for i in range(0, batch.shape[0], size):
        chunk = batch[i:i + size]
        n = chunk.shape[0]
        if n < size and getattr(backend, "compiled", False):
            chunk = torch.cat([chunk, chunk.new_zeros((size - n, *chunk.shape[1:]))])
        outs.append(backend.run(chunk)[:n])
    return torch.cat(outs)


class _SourceFailure(Exception):
    """The caller's input iterable raised ``error``: carried past the engine's own groups to the caller."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


def _setting(name: str, doc: str) -> property:
    """A read-only engine setting: checked once as the engine is made; :meth:`Engine.configured` makes a copy with
    other settings (set by hand, one could break a run in another thread)."""
    return property(lambda self: getattr(self, f"_{name}"), doc=doc)


class Engine:
    """Patched FLANNEL inference over a bundle's networks.

    Made by :meth:`from_bundle` (or :meth:`from_modules` for in-memory networks), not called directly; used through
    :meth:`predict`, :meth:`predict_many` and :meth:`stream`, which return :class:`Prediction` s. Data flow,
    overlap and thread safety: ``patchflannel.engine.engine``'s module docstring and docs/engine.md.
    """

    k = _setting("k", "Patches drawn an image.")
    seed = _setting("seed", "The run seed, mixed into every image's seed.")
    return_centres = _setting("return_centres", "Whether results carry their patch centres.")
    images_per_call = _setting("images_per_call", "Images prepared and classified together.")
    patch_batch = _setting("patch_batch", "Inputs a learner call carries at most.")
    learner_streams = _setting("learner_streams",
                               "CUDA streams the learners are dealt over (learner i on stream i mod n).")

    def __init__(self, *, segmenter: Backend, learners: list[Learner], ensemble: nn.Module | None,
                 preprocessing: Mapping[str, Any], device: torch.device, loader: Loader, sampler: Sampler,
                 precision: str, seed: int = 0, k: int | None = None, return_centres: bool = False,
                 images_per_call: int | str = "auto", patch_batch: int | str = "auto", learner_streams: int = 1,
                 bundle_id: str = "", bundle_name: str = "", backend: str = "torch") -> None:
        if not learners:
            raise BundleError("the bundle has no base learners: it can segment but not classify")
        self.segmenter = segmenter
        self.learners = learners
        self._learner_names = tuple(lr.name for lr in learners)  # every result carries them
        self.ensemble = ensemble.eval().to(device) if ensemble is not None else None
        self.pre = dict(preprocessing)
        self.device = device
        self.loader = loader
        self.sampler = sampler
        self.precision = precision
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not -2**63 <= int(seed) < 2**63:
            raise ConfigError(f"seed must be a whole number within 64 bits (-2**63 to 2**63 - 1, as the result tables "
                              f"store it), got {seed!r}")
        self._seed = int(seed)
        self._k = _count("k", k if k is not None else self.pre["k"], auto=False)
        bad = sorted({lr.mode for lr in learners} - set(LEARNER_MODES))
        if bad:
            raise ConfigError(f"learner mode must be 'patch' or 'global', got {', '.join(map(repr, bad))}")
        self._return_centres = _flag("return_centres", return_centres)
        cuda = device.type == "cuda"
        self._images_per_call = GPU_IMAGES_PER_CALL if images_per_call == "auto" and cuda else (
            1 if images_per_call == "auto" else _count("images_per_call", images_per_call))
        self._patch_batch = (self.images_per_call * self.k if cuda else CPU_PATCH_BATCH) if patch_batch == "auto" else (
            _count("patch_batch", patch_batch))
        self._learner_streams = _count("learner_streams", learner_streams, auto=False)
        if self.learner_streams > 1 and not cuda:
            raise ConfigError(f"learner_streams={self.learner_streams} needs a CUDA device (this engine runs on {device})")
        self.bundle_id = bundle_id
        self.bundle_name = bundle_name
        self.backend = backend
        norm = self.pre["normalization"]
        self._mean = torch.tensor(norm["mean"], dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self._std = torch.tensor(norm["std"], dtype=torch.float32, device=device).view(1, 3, 1, 1)
        # High priority: the preparation's small kernels take free SMs first, between the learners' blocks.
        self._prep_stream = torch.cuda.Stream(device, priority=-1) if cuda else None
        # The learners' side streams, one set per count, made at first use and shared by configured() copies:
        # torch hands out streams from a small pool round-robin, so sets made and dropped would wrap it around
        # onto the streams of others (the GPU decoder's).
        self._stream_sets: dict[int, list[torch.cuda.Stream]] = {}
        # The preparation and learner threads (see the module docstring), started at first use and shared by
        # configured() copies: each runs one job at a time, which is what guards the networks and streams.
        self._prep_worker = _Worker("patchflannel-prepare")
        self._learner_worker = _Worker("patchflannel-learners")
        self._patch_mode = any(lr.mode == "patch" for lr in learners)  # else no segmentation, no patches
        self._global_mode = any(lr.mode == "global" for lr in learners)

    # ----------------------------------------------------------------------------------------- building
    @classmethod
    def from_bundle(cls, path: str | Path | Bundle | None = None, *, device: str | torch.device = "auto", backend: str = "auto",
                    loader: str = "auto", sampler: str = "auto", precision: str = "auto", seed: int = 0,
                    k: int | None = None, return_centres: bool = False, images_per_call: int | str = "auto",
                    patch_batch: int | str = "auto", learner_streams: int = 1, compile: bool = False) -> Engine:
        """An engine over the bundle at ``path`` (None: the package's default bundle), or over a loaded ``Bundle``.

        ``device`` 'auto' (CUDA when available), 'cpu', 'cuda' or 'cuda:N'; ``backend`` 'auto', 'torch',
        'onnxruntime' or 'tensorrt' (the exported ones need the bundle's exported files); ``loader`` 'auto', 'cpu',
        'dali' or 'nvjpeg'; ``sampler`` 'auto', 'torch' or 'cupy'; ``precision`` 'auto' (fp16 on a GPU, fp32 on a
        CPU), 'fp32', 'fp16' or 'bf16'; 'auto' picks the best available (:meth:`describe` says what it picked).
        ``seed`` is the run seed and ``k`` the patches an image (default: the bundle's); ``return_centres`` adds
        each result's patch centres. ``images_per_call`` and ``patch_batch`` set the batching ('auto': the
        device's choice; results do not depend on them). ``compile`` applies ``torch.compile`` (frozen weights)
        to every network (torch backend); the first call at each shape compiles (:meth:`warm_up` does it up
        front). ``learner_streams`` > 1 (a GPU only) deals the learners over that many CUDA streams so
        that they may run side by side.
        """
        compile = _flag("compile", compile)
        bundle = path if isinstance(path, Bundle) else load_bundle(path)
        dev = resolve_device(device)
        prec = resolve_precision(precision, dev)
        name = resolve_backend(backend, bundle, dev)
        seg = make_backend(name, bundle, bundle.segmentation, dev, prec, compile=compile)
        learners = [Learner(e.name, e.mode or "patch", make_backend(name, bundle, e, dev, prec, compile=compile))
                    for e in bundle.learners]
        ens = load_torch_model(bundle, bundle.ensemble) if bundle.ensemble is not None else None
        return cls(segmenter=seg, learners=learners, ensemble=ens, preprocessing=bundle.preprocessing, device=dev,
                   loader=make_loader(loader, dev), sampler=make_sampler(sampler, dev), precision=prec, seed=seed,
                   k=k, return_centres=return_centres, images_per_call=images_per_call, patch_batch=patch_batch,
                   learner_streams=learner_streams, bundle_id=bundle.bundle_id, bundle_name=bundle.name, backend=name)

    @classmethod
    def from_modules(cls, segmentation: nn.Module, learners: Mapping[str, nn.Module], ensemble: nn.Module | None, *,
                     mode: str = "patch", preprocessing: Mapping[str, Any] | None = None,
                     device: str | torch.device = "auto", loader: str = "auto", sampler: str = "auto",
                     precision: str = "auto", seed: int = 0, k: int | None = None, return_centres: bool = False,
                     images_per_call: int | str = "auto", patch_batch: int | str = "auto", learner_streams: int = 1,
                     compile: bool = False, name: str = "modules") -> Engine:
        """An engine over in-memory modules (torch backend), e.g. random weights for timing."""
        compile = _flag("compile", compile)
        dev = resolve_device(device)
        prec = resolve_precision(precision, dev)
        seg = TorchBackend(segmentation, dev, prec, compile=compile)
        ls = [Learner(n, mode, TorchBackend(m, dev, prec, compile=compile)) for n, m in learners.items()]
        return cls(segmenter=seg, learners=ls, ensemble=ensemble, preprocessing=preprocessing or default_preprocessing(),
                   device=dev, loader=make_loader(loader, dev), sampler=make_sampler(sampler, dev), precision=prec,
                   seed=seed, k=k, return_centres=return_centres, images_per_call=images_per_call,
                   patch_batch=patch_batch, learner_streams=learner_streams, bundle_name=name, backend="torch")

    def configured(self, *, k: int | None = None, images_per_call: int | str | None = None,
                   patch_batch: int | str | None = None, learner_mode: str | None = None,
                   return_centres: bool | None = None, learner_streams: int | None = None) -> Engine:
        """A new engine sharing this one's networks, loader and sampler (and the threads and streams that run
        them, so both engines may be used from different threads), with other settings.

        ``k``, ``return_centres`` and ``learner_streams`` default to this engine's; ``images_per_call`` and
        ``patch_batch`` to 'auto' (the device's choice). ``learner_mode`` ('patch' or 'global') overrides every learner's mode
        (bench's global baseline).
        """
        learners = [Learner(lr.name, learner_mode or lr.mode, lr.backend) for lr in self.learners]
        engine = type(self)(segmenter=self.segmenter, learners=learners, ensemble=self.ensemble, preprocessing=self.pre,
                          device=self.device, loader=self.loader, sampler=self.sampler, precision=self.precision,
                          seed=self.seed, k=k if k is not None else self.k,
                          return_centres=self.return_centres if return_centres is None else return_centres,
                          images_per_call=images_per_call if images_per_call is not None else "auto",
                          patch_batch=patch_batch if patch_batch is not None else "auto",
                          learner_streams=self.learner_streams if learner_streams is None else learner_streams,
                          bundle_id=self.bundle_id, bundle_name=self.bundle_name, backend=self.backend)
        engine._prep_stream, engine._stream_sets = self._prep_stream, self._stream_sets
        engine._prep_worker, engine._learner_worker = self._prep_worker, self._learner_worker
        return engine

    def describe(self) -> dict[str, Any]:
        """What this engine runs: device, loader, backend, sampler, precision, batching, bundle, learners, and
        how many conv -> BatchNorm pairs the torch backend folded.

        ``precision`` is the one the networks run at: an exported backend without a file in the requested
        precision runs the fp32 file; where networks differ, their precisions joined by '+'.
        """
        dev_name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        backends = [self.segmenter, *(lr.backend for lr in self.learners)]
        return {
            "device": str(self.device), "device_name": dev_name, "loader": self.loader.name,
            "backend": self.backend, "sampler": self.sampler.name,
            "precision": "+".join(sorted({b.precision for b in backends})),
            "compiled": any(getattr(b, "compiled", False) for b in backends),
            "folded_batchnorms": sum(getattr(b, "folded_batchnorms", 0) for b in backends),
            "k": self.k, "seed": self.seed, "images_per_call": self.images_per_call,
            "patch_batch": self.patch_batch, "learner_streams": self.learner_streams, "bundle": self.bundle_name, "bundle_id": self.bundle_id,
            "learners": [{"name": lr.name, "mode": lr.mode} for lr in self.learners],
            "ensemble": self.ensemble is not None,
        }

    # ------------------------------------------------------------------------------------------ public
    def warm_up(self, progress: Callable[[str], None] | None = None) -> dict[str, float]:
        """Run the segmenter (when a learner is in patch mode) and every learner once at the input shapes of a
        full group, so that compiling and autotuning happen now rather than at the first request (the tiny
        ensemble is not run); returns wall seconds per network. Each network runs in
        the thread that runs it in :meth:`stream` (cuDNN's autotuned plans are kept per thread).

        ``progress`` gets a line as each network is done (compiling five large learners takes minutes).
        """
        pre, n = self.pre, self.images_per_call
        seg, patch, crop = pre["segmentation"]["size"], pre["patch_size"], pre["global"]["crop"]

        def timed(job: Callable[[], Any]) -> float:
            start = time.perf_counter()
            job()
            if self.device.type == "cuda":  # this job's stream only: another thread's work on the device is not timed
                torch.cuda.current_stream(self.device).synchronize()
            return time.perf_counter() - start

        compute = self._compute_stream()
        jobs: dict[str, tuple[_Worker, torch.cuda.Stream | None, Callable[[], Any]]] = {}
        if self._patch_mode:
            jobs["segmentation"] = self._prep_worker, self._prep_stream, lambda: _run_batched(
                self.segmenter, torch.zeros(n, 1, seg, seg, device=self.device), n)
        for lr in self.learners:
            shape = (n * self.k, 3, patch, patch) if lr.mode == "patch" else (n, 3, crop, crop)
            jobs[lr.name] = self._learner_worker, compute, lambda lr=lr, shape=shape: self._run_learner(
                lr, torch.zeros(shape, device=self.device))
        seconds = {}
        for name, (worker, on, job) in jobs.items():  # in the thread and on the stream that run it in stream()
            seconds[name] = worker.submit(_on_stream, on, timed, job).result()
            if progress is not None:
                progress(f"warm-up {name}: {seconds[name]:.1f} s")
        return seconds

    def predict(self, x: Any, item_id: str | None = None) -> Prediction:
        """One input: a path, bytes (PNG, JPEG, TIFF, DICOM), or a 2-D grey numpy array, torch tensor or CuPy array
        (uint8, uint16, or float in [0, 1]); ``item_id`` names it in the result (default: the path, or
        ``<kind #0>``). A bad input is not raised: its result has ``status`` 'error' and ``error`` says why.
        Check ``status`` (or ``flags``), not only ``ok``: a 'flagged' result needs a look."""
        return self.predict_many([(item_id, x) if item_id is not None else x])[0]

    def predict_many(self, xs: Iterable[Any]) -> list[Prediction]:
        """Every input in order (an iterable of inputs as for :meth:`predict`, or of ``(item_id, x)`` pairs); bad
        inputs become error results. A list in one call; :meth:`stream` for results as they complete."""
        return list(self.stream(xs, prefetch=0))

    def stream(self, xs: Iterable[Any], *, prefetch: int = 2, timer: StageTimer | None = None) -> Iterator[Prediction]:
        """Yield results group by group, in input order, while the next groups are prepared (module docstring).

        ``prefetch`` is how many groups may be prepared (decoded, segmented, patches gathered) ahead (0: each
        group once the one before is classified). While the learners classify one group, the one before is read
        back. When ``xs`` itself raises, the results of every input it gave before are yielded first,
        then its exception is raised; when the engine fails (a network raises), the results already classified
        are yielded first, where they can still be read back (not after a device error). A 2-D (or (H, W, 1))
        array is one input (use :meth:`predict`); an (N, H, W) array or tensor is N images.
        """
        shape = tuple(getattr(xs, "shape", ())) if hasattr(xs, "__dlpack__") or isinstance(xs, np.ndarray) else ()
        # numpy, torch or CuPy: a stack (N, H, W) is N images; no image is one pixel wide
        one = isinstance(xs, (str, bytes, bytearray, memoryview, os.PathLike)) or len(shape) == 2 or (
            len(shape) == 3 and shape[-1] == 1)
        if one:
            raise TypeError(f"expected an iterable of inputs, got one {type(xs).__name__}: use predict() for one input")
        if len(shape) == 3 and shape[-1] in (3, 4):
            raise TypeError(f"expected an iterable of inputs, got an array of shape {shape}: a colour image, "
                            "not a stack of (N, H, W) grey images; convert it to grey first (e.g. PIL's .convert('L'))")
        if isinstance(xs, Mapping):
            raise TypeError("expected an iterable of inputs, got a mapping: pass its items() as (item_id, input) pairs")
        if isinstance(prefetch, bool) or not isinstance(prefetch, (int, np.integer)) or prefetch < 0:
            raise ConfigError(f"prefetch must be a whole number >= 0, got {prefetch!r}")
        return self._stream(xs, int(prefetch), timer or _NoTimer(), self._compute_stream())

    def _compute_stream(self) -> torch.cuda.Stream | None:
        """The calling thread's current CUDA stream on the engine's device (None on a CPU): the learners' stream."""
        return torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None

    def _stream(self, xs: Iterable[Any], prefetch: int, timer: StageTimer,
                compute: torch.cuda.Stream | None) -> Iterator[Prediction]:
        # Device work stays on the stream current when stream() was called, whatever the consumer does later.
        prev: _Group | None = None  # classified, waiting to be read back
        try:
            for group in self._prepared(xs, prefetch, timer):
                self._learner_worker.submit(_on_stream, compute, self._classify, group, timer).result()
                done, prev = prev, group
                if done is not None:
                    yield from self._results(done)
        except _SourceFailure as failure:
            error = failure.error  # raised below, outside this block: its cause and context stay the caller's
        except Exception as exc:  # noqa: BLE001 - the engine failed (a network, the device): raised below
            error = exc
        else:
            error = None
        if prev is not None:  # classified before any failure: its results are the caller's
            try:
                yield from self._results(prev)
            except Exception:
                if error is None:
                    raise  # else the first failure (a device error, say, met again reading back) is the one raised
        if error is not None:
            raise error

    # ---------------------------------------------------------------------------------------- internals
    def _groups(self, xs: Iterable[Any]) -> Iterator[list[tuple[str, Any]]]:
        """Groups of ``images_per_call`` inputs; when ``xs`` raises, the inputs taken so far, then _SourceFailure."""
        group: list[tuple[str, Any]] = []
        items = iter(xs)
        index = 0
        while True:
            try:
                x = next(items)
            except StopIteration:
                break
            except Exception as exc:  # noqa: BLE001 - the caller's iterable failed: carried out to the caller
                if group:
                    yield group
                raise _SourceFailure(exc) from exc
            group.append(take(x, index))
            index += 1
            if len(group) == self.images_per_call:
                yield group
                group = []
        if group:
            yield group

    def _prepared(self, xs: Iterable[Any], prefetch: int, timer: StageTimer) -> Iterator[_Group]:
        """Prepared groups in input order, ``prefetch`` groups ahead, in the engine's preparation thread.

        A group with inputs in device memory records an event on the caller's stream of each device they are on
        as it is handed over: its preparation waits for the caller's kernels up to then (the copies of the inputs
        among them), not for the engine's later ones.
        """
        def ready(group: list[tuple[str, Any]]) -> list[tuple[torch.device, torch.cuda.Event]]:
            devices = {x.device if isinstance(x, torch.Tensor) else self.device for _, x in group if on_device(x)}
            return [(d, record_event(d)) for d in devices if d.type == "cuda"]

        pending: collections.deque[concurrent.futures.Future[_Group]] = collections.deque()
        failure: _SourceFailure | None = None
        try:
            groups = self._groups(xs)
            while True:
                try:
                    group = next(groups)
                except StopIteration:
                    break
                except _SourceFailure as exc:  # the groups already taken are still delivered first
                    failure = exc
                    break
                pending.append(self._prep_worker.submit(self._prepare_group, group, timer, ready(group)))
                if len(pending) > prefetch:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:  # an error or a consumer that stops early: groups not yet started are dropped, a running one ends
            for future in pending:
                future.cancel()
            if not _in_worker():  # not when closed by a garbage collection run in an engine's thread: the job
                concurrent.futures.wait(pending)  # waited for may wait for that thread (a compile's lock)
        if failure is not None:
            raise failure

    def _prepare_group(self, inputs: list[tuple[str, Any]], timer: StageTimer,
                       inputs_ready: list[tuple[torch.device, torch.cuda.Event]]) -> _Group:
        """Decode one group, segment it and gather its patches: on a GPU on the engine's preparation stream,
        so that it overlaps the learners, and finished there before the group is handed over."""
        with on_stream(self._prep_stream):
            for device, event in inputs_ready:  # this thread's stream on each device reads the inputs there
                torch.cuda.current_stream(device).wait_event(event)
            with timer.stage("decode"):  # reading the inputs: file bytes, content hashes, DICOM decoding
                items = [prepare(x, item_id) for item_id, x in inputs]
            group = self._decode(items, timer)
            self._segment(group, timer)
            self._patches(group, timer)
            if self._prep_stream is not None:
                self._prep_stream.synchronize()
        for it in group.good:  # the decoded images are done with: free their memory now
            it.shape, it.image = tuple(it.image.shape), None
        return group

    def _decode(self, items: list[Item], timer: StageTimer) -> _Group:
        """Decode the items' bytes onto the device (failures become error items), as a group; each image's
        ``blank`` (a single grey level: nothing in it to classify) is flagged.

        The GPU decoders allocate on the current stream but write through streams of their own, without
        waiting for it (torchvision's nvJPEG decoder, pytorch/vision#9606): so nothing may be pending on the
        preparation stream when they run (its freed blocks could be handed to them while a queued kernel
        still reads them), nor when their memory is next reused.
        """
        if self._prep_stream is not None:
            self._prep_stream.synchronize()
        with timer.stage("decode"):
            todo = [it for it in items if it.data is not None]
            for it, res in zip(todo, self.loader.decode([(it.item_id, it.data) for it in todo])):
                if isinstance(res, ImageReadError):
                    it.error, it.meta = str(res), res.meta or it.meta
                else:
                    it.image, it.meta = res
                it.data = None
            for it in items:
                if it.image is not None:
                    it.image = it.image.to(self.device, non_blocking=True)
            group = _Group(items)
            if group.good:
                group.blank = torch.stack([is_blank(it.image) for it in group.good])
        if self._prep_stream is not None:
            self._prep_stream.synchronize()
        return group

    def _normalise(self, grey: torch.Tensor) -> torch.Tensor:
        """(N, 1, H, W) grey in [0, 1] -> (N, 3, H, W) normalised with the bundle's mean and std."""
        return (grey.expand(-1, 3, -1, -1) - self._mean) / self._std

    def _segment(self, group: _Group, timer: StageTimer) -> None:
        """Launch the segmenter on the group's images; the thresholded masks start their copy to the host."""
        if not group.good or not self._patch_mode:
            return
        seg = self.pre["segmentation"]
        with timer.stage("segment"):
            inputs = segmentation_inputs([it.image for it in group.good], seg["size"], seg["gamma"])
            logits = _run_batched(self.segmenter, inputs, self.images_per_call)
            group.masks = to_host(lung_masks(logits, seg["threshold"]))

    def _patches(self, group: _Group, timer: StageTimer) -> None:
        """Post-process the group's masks on the host, then sample centres and gather the K patches."""
        if not group.good:
            return
        pre = self.pre
        size, patch = pre["image_size"], pre["patch_size"]
        if self._global_mode:
            with timer.stage("gather"):  # FLANNEL's whole-image input, from the image as decoded (as in training)
                g = pre["global"]
                group.global_view = torch.stack([global_view(it.image, g["resize"], g["crop"])
                                                 for it in group.good]).unsqueeze(1)
        if not self._patch_mode:  # global learners only: no mask, no patches
            group.fallback = torch.zeros(len(group.good), dtype=torch.bool, device=self.device)
            return
        with timer.stage("mask"):
            (masks,) = group.masks.wait()
            group.masks = None
            masks = torch.from_numpy(postprocess_masks(masks)).to(self.device, non_blocking=True)
        with timer.stage("sample"):
            big = torch.stack([learner_image(it.image, size) for it in group.good])
            masks_big, group.fallback = effective_masks(resize_mask(masks, size), pre["min_lung_fraction"])
            seeds = [image_seed(it.content_hash, self.seed) for it in group.good]
            uniforms = patch_uniforms(seeds, self.k).to(self.device, non_blocking=True)
            group.centres = self.sampler.centres(masks_big, uniforms)
            origins = window_origins(group.centres, size, size, patch)
        with timer.stage("gather"):
            patches = gather_patches(big * masks_big.to(big.dtype), origins, patch)
            group.patches = patches.reshape(-1, 1, patch, patch)

    def _run_learner(self, learner: Learner, batch: torch.Tensor) -> torch.Tensor:
        """Logits of (N, 3, P, P) normalised inputs (patches, or whole-image views for a global learner) in
        calls of at most ``patch_batch``, and of at most a full group's inputs."""
        return _run_batched(learner.backend, batch, self.call_size(learner.mode))

    def call_size(self, mode: str) -> int:
        """Inputs a learner call of ``mode`` ('patch' or 'global') carries at most: ``patch_batch``, and at most
        a full group's (its patches, or its images)."""
        return min(self.patch_batch, self.images_per_call * (self.k if mode == "patch" else 1))

    def _classify(self, group: _Group, timer: StageTimer) -> None:
        """Launch the learners and the ensemble on the group's patches; the results start their copy to the host."""
        if not group.good:
            return
        group.adopt()
        n = len(group.good)
        modes = {lr.mode for lr in self.learners}
        confidences, softmaxes = [], []
        with timer.stage("infer"):
            # Normalised once a group, for every learner of the mode.
            inputs = {"patch": self._normalise(group.patches)} if "patch" in modes else {}
            if "global" in modes:
                inputs["global"] = self._normalise(group.global_view)
            sides = self._side_streams()
            ready = record_event(self.device) if sides else None
            try:
                for i, learner in enumerate(self.learners):
                    side = sides[i % len(sides)] if sides else None
                    with on_stream(side):
                        if side is not None:
                            side.wait_event(ready)
                        with timer.stage(LEARNER_STAGE + learner.name):
                            if learner.mode == "global":
                                probs = self._run_learner(learner, inputs["global"]).softmax(-1)
                                confidences.append(probs)
                                softmaxes.append(probs)
                            else:
                                logits = self._run_learner(learner, inputs["patch"]).reshape(n, self.k, -1)
                                confidences.append(vote_fractions(logits))
                                softmaxes.append(mean_softmax(logits))
            finally:  # also after a failed call: the inputs must outlive the side streams' reads
                self._join_side_streams(sides, confidences + softmaxes)
        with timer.stage("ensemble"):
            conf = torch.stack(confidences, 1)
            if self.ensemble is not None:
                with torch.inference_mode():
                    probs = self.ensemble(conf).softmax(-1)
            else:
                probs = conf.mean(1)
            extra = (group.centres,) if self.return_centres and group.centres is not None else ()
            group.results = to_host(probs, conf, torch.stack(softmaxes, 1), group.fallback, group.blank, *extra)
        group.global_view = group.patches = None

    def _side_streams(self) -> list[torch.cuda.Stream]:
        """The ``learner_streams`` side streams (none for one stream); called in the learner thread."""
        if self.learner_streams == 1:
            return []
        if self.learner_streams not in self._stream_sets:
            self._stream_sets[self.learner_streams] = [torch.cuda.Stream(self.device) for _ in range(self.learner_streams)]
        return self._stream_sets[self.learner_streams]

    def _join_side_streams(self, sides: list[torch.cuda.Stream], outputs: list[torch.Tensor]) -> None:
        """The current stream waits for the learners' side streams; their outputs are marked as used by it, so
        that their memory is not reused before it is done with them."""
        if not sides:
            return
        current = torch.cuda.current_stream(self.device)
        for side in sides:
            current.wait_stream(side)
        for t in outputs:
            t.record_stream(current)

    def _results(self, group: _Group) -> list[Prediction]:
        """The group's predictions in input order (error results for inputs that failed to decode)."""
        if group.good:
            probs, conf, soft, fallback, blank, *centres = (t.numpy() for t in group.results.wait())
            host = {"probs": probs, "conf": conf, "soft": soft, "fallback": fallback, "blank": blank}
            if centres:
                host["centres"] = centres[0]
            for i, it in enumerate(group.good):
                it.result = self._prediction(it, i, host)
        return [it.result if it.result is not None else self._error(it) for it in group.items]

    def _error(self, it: Item) -> Prediction:
        return Prediction(item_id=it.item_id, status="error", error=it.error, content_hash=it.content_hash,
                          k=self.k, seed=self.seed, meta=it.meta or {}, bundle_id=self.bundle_id, backend=self.backend,
                          learners=self._learner_names)

    def _prediction(self, it: Item, i: int, host: dict[str, np.ndarray]) -> Prediction:
        flags = []
        if bool(host["blank"][i]):
            flags.append("blank_image")
        if bool(host["fallback"][i]):
            flags.append("mask_fallback")
        if min(it.shape) < self.pre["patch_size"]:
            flags.append("small_image")
        if not np.isfinite(host["soft"][i]).all():  # a NaN/inf logit (an fp16 overflow) votes without a sign
            flags.append("non_finite_outputs")
        p = host["probs"][i]
        return Prediction(
            item_id=it.item_id, status="flagged" if flags else "ok", label=CLASSES[int(np.argmax(p))],
            probabilities={c: float(v) for c, v in zip(CLASSES, p)},
            learner_confidences={name: {c: float(v) for c, v in zip(CLASSES, host["conf"][i, j])}
                                 for j, name in enumerate(self._learner_names)},
            learner_mean_softmax={name: {c: float(v) for c, v in zip(CLASSES, host["soft"][i, j])}
                                  for j, name in enumerate(self._learner_names)},
            k=self.k, seed=self.seed, content_hash=it.content_hash, flags=flags,
            centres=host["centres"][i].copy() if "centres" in host else None, meta=it.meta or {},
            bundle_id=self.bundle_id, backend=self.backend, learners=self._learner_names)
