"""The engine on a CUDA device: GPU loaders, CuPy sampler, fp16; agreement with the CPU engine."""

from __future__ import annotations

import importlib.util
import threading

import numpy as np
import pytest
import torch

from patchflannel.bench.harness import phantom_jpegs
from patchflannel.bundle import random_bundle
from patchflannel.engine.engine import Engine

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_gpu_engine_agrees_with_cpu_engine(tmp_path):
    random_bundle(tmp_path, segmentation="fcdensenet56", learners=("shufflenet_v2_x0_5", "resnet18"))
    items = phantom_jpegs(6, size=768)
    cpu = Engine.from_bundle(tmp_path, device="cpu", k=32, return_centres=True).predict_many(items)
    gpu32 = Engine.from_bundle(tmp_path, device="cuda", precision="fp32", k=32, return_centres=True)
    d = gpu32.describe()
    assert d["device"].startswith("cuda") and d["loader"] in ("dali", "nvjpeg") and d["images_per_call"] == 4
    got = gpu32.predict_many(items)
    assert all(p.meta["decoder"].startswith(d["loader"]) for p in got)  # decoded on the GPU, no silent fallback
    same_centres = 0
    for a, b in zip(cpu, got):
        assert b.ok and a.content_hash == b.content_hash
        np.testing.assert_allclose(a.probability_array, b.probability_array, atol=2e-2)
        same_centres += int(np.array_equal(a.centres, b.centres))
    assert same_centres >= 4  # GPU decoding may move a mask boundary pixel; most draws are identical
    half = Engine.from_bundle(tmp_path, device="cuda", k=32).predict_many(items)
    assert all(p.ok for p in half)
    assert Engine.from_bundle(tmp_path, device="cuda", k=32).describe()["precision"] == "fp16"


def test_gpu_stream_pipeline_and_device_arrays(tmp_path):
    """Three groups of four in flight (prepared in the worker thread on the engine's own stream, the CuPy
    sampler there too where installed; learners on the caller's stream) give the one-image results; arrays
    already on the GPU (made on the caller's stream) give what the same pixels from the host give."""
    import io

    from PIL import Image

    random_bundle(tmp_path, segmentation="fcdensenet56", learners=("shufflenet_v2_x0_5", "resnet18"))
    engine = Engine.from_bundle(tmp_path, device="cuda", precision="fp32", k=32)
    items = phantom_jpegs(10, size=768)
    streamed = list(engine.stream(items, prefetch=2))
    one = engine.configured(images_per_call=1)
    for (name, data), got in zip(items, streamed):
        ref = one.predict(data, item_id=name)
        assert got.item_id == name and got.content_hash == ref.content_hash
        # other batch shapes may pick other (TF32) conv kernels: a near-tie patch vote can move, as in the test above
        np.testing.assert_allclose(got.probability_array, ref.probability_array, atol=2e-2)
    grey = [np.array(Image.open(io.BytesIO(data))) for _, data in items[:5]]
    from_host = engine.predict_many(grey)
    from_gpu = engine.predict_many([torch.from_numpy(g).cuda() * 1 for g in grey])
    for a, b in zip(from_host, from_gpu):
        assert a.ok and a.content_hash == b.content_hash  # same shapes, same kernels: a race would show at once
        np.testing.assert_allclose(a.probability_array, b.probability_array, atol=1e-4)
    if importlib.util.find_spec("cupy") is not None:  # one CuPy image where an iterable is expected: refused
        import cupy

        with pytest.raises(TypeError, match=r"use predict\(\) for one input"):
            engine.predict_many(cupy.asarray(grey[0]))


def test_gpu_preparation_does_not_wait_for_the_learners_stream(tmp_path):
    """Decode, segmentation, mask post-processing, sampling and gather run on the engine's own stream: with
    the caller's stream (where the learners queue) busy for a second or more, they finish long before it is
    free; the results are the same as with an idle stream."""
    from patchflannel.bench.harness import PerfTimer

    random_bundle(tmp_path, segmentation="fcdensenet56", learners=("shufflenet_v2_x0_5",))
    engine = Engine.from_bundle(tmp_path, device="cuda", precision="fp32", k=16, images_per_call=2)
    items = phantom_jpegs(2, size=512)
    idle = engine.predict_many(items)  # also the warm-up: first calls load kernels
    for prefetch in (0, 2):  # one group at a time, and prepared ahead
        list(engine.stream(items, prefetch=prefetch))  # warm-up of this path
        torch.cuda.synchronize()
        timer = PerfTimer()
        torch.cuda._sleep(3_000_000_000)  # the caller's (default) stream busy for a second or more
        busy = list(engine.stream(items, prefetch=prefetch, timer=timer))
        prep = sum(timer.totals()[s] for s in ("decode", "segment", "mask", "sample", "gather"))
        assert prep < 0.5, f"prefetch {prefetch}: preparation took {prep:.2f} s, waiting for the busy stream"
        for a, b in zip(idle, busy):
            np.testing.assert_allclose(a.probability_array, b.probability_array, atol=1e-5)


def test_gpu_learners_on_several_streams_give_the_one_stream_results(tmp_path):
    """learner_streams deals the learners' calls over side streams that wait for the normalised patches; the
    caller's stream waits for them all: the same results as one stream, in the stream and one at a time."""
    random_bundle(tmp_path, segmentation="fcdensenet56", learners=("shufflenet_v2_x0_5", "resnet18", "mobilenet_v3_small"))
    engine = Engine.from_bundle(tmp_path, device="cuda", precision="fp32", k=32)
    items = phantom_jpegs(10, size=768)
    one = list(engine.stream(items))
    for streams in (2, 3):
        side = engine.configured(learner_streams=streams)
        assert side.describe()["learner_streams"] == streams
        assert side.configured(k=32)._side_streams() is side._side_streams()  # copies share the streams
        # The first learner's calls start late on its side stream: a caller's stream that did not wait for it
        # would stack and read back unfinished confidences.
        first = side.learners[0].backend
        run = first.run
        first.run = lambda batch: (torch.cuda._sleep(500_000_000), run(batch))[1]
        got_stream = []
        for _ in range(2):
            torch.cuda._sleep(1_000_000_000)  # the caller's stream busy: normalising lands late on it
            got_stream.append(list(side.stream(items)))
        del first.run
        torch.cuda._sleep(1_000_000_000)
        for got in (*got_stream, side.predict_many(items)):
            for a, b in zip(one, got):
                assert b.ok and a.content_hash == b.content_hash
                np.testing.assert_allclose(a.probability_array, b.probability_array, atol=1e-5)
                for name, conf in a.learner_confidences.items():
                    assert conf == b.learner_confidences[name]


def test_gpu_bench_compares_learner_streams(tmp_path):
    """bench --learner-streams 1,2: every mode for each count, the loop on one stream only, speed-ups over it."""
    from patchflannel.bench.harness import BenchConfig, run_bench
    from patchflannel.bench.report import speedups

    report = run_bench(BenchConfig(out=tmp_path, preset="tiny", synthetic=True, n=2, loop_n=1, ks=(4,), pack=2,
                                   modes=("loop", "packed"), device="cuda", learner_streams=(1, 2), repeats=1, warmup=1))
    assert [(r["learner_streams"], r["mode"]) for r in report["runs"]] == [(1, "loop"), (1, "packed"), (2, "packed")]
    assert ("torch fp16, 2 learner streams", "packed", 4) in speedups(report["runs"])
    assert "| torch | fp16 | 2 | packed | 4 |" in (tmp_path / "bench.md").read_text()


def test_gpu_scoring_engines_use_cudnn_benchmark(tmp_path):
    """score's engines (local and on Ray actors) run one call shape, as bench: cuDNN picks its kernels by timing."""
    from patchflannel.scoring.run import EngineOptions

    random_bundle(tmp_path, segmentation="fcdensenet56", learners=("shufflenet_v2_x0_5",))
    torch.backends.cudnn.benchmark = False
    EngineOptions(bundle=str(tmp_path), device="cpu").engine()
    assert not torch.backends.cudnn.benchmark
    EngineOptions(bundle=str(tmp_path), device="cuda").engine()
    assert torch.backends.cudnn.benchmark


def test_gpu_networks_run_on_the_streams_of_their_threads(tmp_path):
    """warm_up, predict and stream run the segmenter on the engine's preparation stream and the learners on the
    stream current where the caller called (warm_up, stream: even when the results are read after leaving that
    stream), each network in one thread throughout."""
    random_bundle(tmp_path, segmentation="fcdensenet56", learners=("shufflenet_v2_x0_5", "resnet18"))
    engine = Engine.from_bundle(tmp_path, device="cuda", precision="fp32", k=16)
    seen: dict[str, set[tuple[str, int]]] = {"seg": set(), "learners": set()}

    def record(key: str):
        return lambda *_: seen[key].add((threading.current_thread().name, torch.cuda.current_stream().cuda_stream))

    engine.segmenter.module.register_forward_hook(record("seg"))
    for lr in engine.learners:
        lr.backend.module.register_forward_hook(record("learners"))
    mine = torch.cuda.Stream()
    items = phantom_jpegs(6, size=512)
    with torch.cuda.stream(mine):
        engine.warm_up()
        results = engine.stream(items)
    got = list(results)  # read on the default stream: the learners stay on mine
    assert all(p.ok for p in got)
    ((seg_thread, seg_stream),) = seen["seg"]
    ((learner_thread, learner_stream),) = seen["learners"]
    assert seg_stream == engine._prep_stream.cuda_stream and learner_stream == mine.cuda_stream
    assert seg_thread != learner_thread
    seen["learners"].clear()
    engine.predict(items[0][1])  # on the default stream now
    assert seen["learners"] == {(learner_thread, torch.cuda.current_stream().cuda_stream)}
