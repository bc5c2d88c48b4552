"""The segmenter on its own: FC-DenseNet103 (the flannel5 preset's segmenter, random weights) on one group
(``--images`` x 1 x 256 x 256, fp16), eager against ``torch.compile`` (compiled in the main thread, as
``Engine.warm_up`` does), each called three ways: from the main thread; from a worker thread on a side stream
(as the engine's preparation thread calls it); and from that worker while the main thread keeps the GPU busy
on its own stream (as the learners do). Each way's first call is reported apart from the median of the others.

For each variant and way: the first call's done time, then the others' launch time (until the call returns)
and done time (until the device finishes), median milliseconds a group, and dynamo's graph and recompile counts; one JSON line a step as it
goes. On an H200 (2026-11-27, docs/bench/h200_thread_autotune) it showed the segmenter fast every way once a
thread had run it (compiled 6.8 ms a group, eager 20.4), and 4.9 s for eager's first call: cuDNN's autotuning,
which PyTorch keeps per thread.

Usage (a GPU): python scripts/gpu_segmenter.py [--images 4 --repeats 10]
On a CPU it times the tiny preset's FC-DenseNet56 at 128 (a dry run of the script).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext

import torch

from patchflannel.engine.backends.torch_backend import TorchBackend
from patchflannel.models import get_model


def dynamo_counts() -> dict[str, int]:
    """Dynamo's counters of compiled graphs and recompiles so far (process-wide)."""
    from torch._dynamo.utils import counters

    return {f"{group}.{key}": int(value) for group in ("stats", "recompiles") for key, value in counters[group].items()}


def timed_call(backend: TorchBackend, x: torch.Tensor, stream: torch.cuda.Stream | None) -> tuple[float, float]:
    """(launch ms, done ms) of one call of ``backend`` on ``stream`` (None: the current one)."""
    with torch.cuda.stream(stream) if stream is not None else nullcontext():
        if x.is_cuda:
            torch.cuda.current_stream().synchronize()
        start = time.perf_counter()
        backend.run(x)
        launched = time.perf_counter()
        if x.is_cuda:
            torch.cuda.current_stream().synchronize()
        done = time.perf_counter()
    return 1000 * (launched - start), 1000 * (done - start)


def busy(seconds: float, device: torch.device) -> None:
    """Queue about ``seconds`` of matrix products on the current stream (the learners' stand-in)."""
    a = torch.randn(4096, 4096, device=device, dtype=torch.float16)
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        a = (a @ a).clamp_(-1, 1)


def median(pairs: list[tuple[float, float]]) -> dict[str, float]:
    return {"launch_ms": round(statistics.median(p[0] for p in pairs), 2),
            "done_ms": round(statistics.median(p[1] for p in pairs), 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=4, help="images a group (the engine's GPU images_per_call)")
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    torch.backends.cudnn.benchmark = cuda  # as bench and score run
    name, size, precision = ("fcdensenet103", 256, "fp16") if cuda else ("fcdensenet56", 128, "fp32")
    torch.manual_seed(0)
    module = get_model(name)
    x = torch.rand(args.images, 1, size, size, device=device)
    side = torch.cuda.Stream() if cuda else None
    worker = ThreadPoolExecutor(1)
    print(json.dumps({"device": torch.cuda.get_device_name(0) if cuda else "cpu", "torch": torch.__version__,
                      "network": name, "size": size, "images": args.images}), flush=True)
    for compiled in (False, True):
        label = "compiled" if compiled else "eager"
        backend = TorchBackend(module, device, precision, compile=compiled)
        started = time.perf_counter()
        backend.run(x)  # compiles here, in the main thread
        if cuda:
            torch.cuda.synchronize()
        print(json.dumps({label: {"first_call_s": round(time.perf_counter() - started, 1),
                                  "compile_error": backend.compile_error, **dynamo_counts()}}), flush=True)
        ways = {"main thread": lambda: timed_call(backend, x, None),
                "worker thread, side stream": lambda: worker.submit(timed_call, backend, x, side).result()}
        if cuda:
            def beside_busy() -> tuple[float, float]:
                future = worker.submit(timed_call, backend, x, side)
                busy(0.2, device)
                return future.result()
            ways["worker thread, GPU busy on main stream"] = beside_busy
        for way, call in ways.items():
            first, *pairs = [call() for _ in range(args.repeats + 1)]
            print(json.dumps({label: {way: {"first_done_ms": round(first[1], 2), **median(pairs)},
                                      **dynamo_counts()}}), flush=True)
    worker.shutdown()


if __name__ == "__main__":
    main()
