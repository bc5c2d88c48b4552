"""Whether the five learners gain from running side by side: one group's patches (``--images`` x ``--k``)
through every learner one after another on one CUDA stream (the engine's way), against the same calls spread
over 2 and 5 streams, and against one CUDA graph replaying all five (no launch cost at all).

Evidence for the engine's next step toward 25 images/s (docs/benchmarks.md): the learners run at very
different rates (compiled on an H100: densenet161 near 130 TFLOP/s, vgg19_bn near 470), so one learner's
kernels might fill the SMs another leaves idle. Outputs are checked against the one-stream run.
Prints one JSON object at the end (milliseconds a group and an image, median of ``--repeats``), and a line of
JSON for each step as it goes.

Usage (a GPU): python scripts/gpu_learner_overlap.py [--compile] [--images 4 --k 100 --repeats 10]
On a CPU it times the one-stream run of small learners only (a dry run of the script).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch

from patchflannel.engine.backends.torch_backend import TorchBackend
from patchflannel.models import get_model
from patchflannel.models.classifiers import FLANNEL_LEARNERS


def median_ms(fn: Callable[[], object], repeats: int, cuda: bool) -> float:
    """Median wall milliseconds of ``fn`` (device work included: synchronised around each call)."""
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=4, help="images a group (the engine's GPU images_per_call)")
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--compile", action="store_true", help="torch.compile with frozen weights, as Engine(compile=True)")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    torch.backends.cudnn.benchmark = cuda  # as bench and score run: the per-learner times compare with theirs
    names = FLANNEL_LEARNERS if cuda else ("shufflenet_v2_x0_5", "mobilenet_v3_small")
    n = args.images * args.k if cuda else 8
    torch.manual_seed(0)
    backends = {name: TorchBackend(get_model(name), device, "fp16" if cuda else "fp32", compile=args.compile)
                for name in names}
    x = torch.randn(n, 3, 224, 224, device=device)
    report: dict[str, object] = {"device": torch.cuda.get_device_name(0) if cuda else "cpu",
                                 "torch": torch.__version__, "patches": n, "images": args.images,
                                 "compile": args.compile, "learners": list(names)}

    def one_stream() -> list[torch.Tensor]:
        return [b.run(x) for b in backends.values()]

    started = time.perf_counter()
    reference = one_stream()  # compiles here with --compile
    report["first_call_s"] = round(time.perf_counter() - started, 1)
    report["compile_errors"] = {name: b.compile_error for name, b in backends.items() if b.compile_error}
    print(json.dumps(report), flush=True)  # partial reports as it goes: a run stopped at its limit keeps them
    report["per_learner_ms"] = {name: round(median_ms(lambda b=b: b.run(x), args.repeats, cuda), 2)
                                for name, b in backends.items()}
    print(json.dumps(report["per_learner_ms"]), flush=True)
    # Built when its turn comes, the CUDA graph last: a failed capture makes a compiled backend fall back to
    # eager for good, which must not change the stream variants' timings.
    makers: dict[str, Callable[[], Callable[[], list[torch.Tensor]]]] = {"1 stream": lambda: one_stream}
    if cuda:
        for count in (2, len(backends)):
            makers[f"{count} streams"] = lambda count=count: spread(list(backends.values()), x, count)
        makers["cuda graph"] = lambda: graphed(list(backends.values()), x)
    results = {}
    for label, make in makers.items():
        try:
            fn = make()
        except Exception as exc:  # noqa: BLE001 - a capture failure is a finding, not a crash
            report[f"{label} error"] = f"{type(exc).__name__}: {exc}"[:300]
            continue
        outs = fn()
        diff = max(float((o - r).abs().max()) for o, r in zip(outs, reference))
        group_ms = median_ms(fn, args.repeats, cuda)
        results[label] = {"ms_group": round(group_ms, 2), "ms_image": round(group_ms / args.images, 2),
                          "max_abs_diff": diff}
        print(json.dumps({label: results[label]}), flush=True)
    report["variants"] = results
    report["compile_errors"] = {name: b.compile_error for name, b in backends.items() if b.compile_error}
    print(json.dumps(report, indent=1))


def spread(backends: list[TorchBackend], x: torch.Tensor, count: int) -> Callable[[], list[torch.Tensor]]:
    """The learners' calls dealt round-robin over ``count`` side streams that start when ``x`` is ready; the
    current stream waits for all of them."""
    streams = [torch.cuda.Stream() for _ in range(count)]

    def run() -> list[torch.Tensor]:
        main = torch.cuda.current_stream()
        ready = main.record_event()
        outs = []
        for i, b in enumerate(backends):
            s = streams[i % count]
            with torch.cuda.stream(s):
                s.wait_event(ready)
                outs.append(b.run(x))
        for s in streams:
            main.wait_stream(s)
        for o in outs:
            o.record_stream(main)
        return outs

    return run


def graphed(backends: list[TorchBackend], x: torch.Tensor) -> Callable[[], list[torch.Tensor]]:
    """All the learners' calls captured once into one CUDA graph, replayed on each call (static input)."""
    static = x.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as torch.cuda.graphs' docs ask
        for _ in range(2):
            [b.run(static) for b in backends]
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [b.run(static) for b in backends]

    def run() -> list[torch.Tensor]:
        graph.replay()
        return outs

    return run


if __name__ == "__main__":
    main()
