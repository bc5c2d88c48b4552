"""The engine against a reference composition of the ops, on real cxr4 images and hand-made edge cases."""

from __future__ import annotations

import concurrent.futures
import contextlib
import gc
import hashlib
import io
import multiprocessing
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from patchflannel.bundle import io_signature, load_bundle, load_torch_model, random_bundle, write_bundle
from patchflannel.classes import CLASSES
from patchflannel.engine.engine import Engine
from patchflannel.errors import BackendUnavailableError, BundleError, ConfigError
from patchflannel.io import read_image
from patchflannel.ops.mask import lung_masks, postprocess_mask
from patchflannel.ops.preprocess import global_view, learner_image, resize_mask, segmentation_input
from patchflannel.ops.sampler import draw_patches
from patchflannel.ops.seeding import image_seed
from patchflannel.ops.votes import mean_softmax, vote_fractions

K = 8
TEXTURE = np.random.default_rng(7).uniform(0.2, 0.8, (256, 256)).astype(np.float32)
"""An image that is not blank (a blank one is flagged as such)."""
SEG_SIZE = 64  # a smaller segmentation input (recorded in the bundle) keeps these tests fast on 2 cores


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bundle")
    b = random_bundle(root, segmentation="fcdensenet56", learners=("shufflenet_v2_x0_5", "mobilenet_v3_small"))
    b.preprocessing["segmentation"]["size"] = SEG_SIZE
    signature = io_signature("segmentation", b.preprocessing)  # the segmenter's shapes follow the size
    b.segmentation.inputs, b.segmentation.outputs = signature["inputs"], signature["outputs"]
    write_bundle(b)
    return root


@pytest.fixture(scope="module")
def engine(bundle_dir: Path) -> Engine:
    return Engine.from_bundle(bundle_dir, device="cpu", k=K, return_centres=True, seed=3)


@pytest.fixture(scope="module")
def jpegs(cxr4_dir: Path) -> list[Path]:
    return sorted((cxr4_dir / "images").rglob("*.jpg"))[:3]


@pytest.fixture(scope="module")
def baseline(engine: Engine, jpegs: list[Path]) -> list:
    """The engine's own default packing (1 image a call, 8 patches a call on CPU)."""
    return engine.predict_many(jpegs)


@pytest.fixture(scope="module")
def ref(bundle_dir: Path, jpegs: list[Path]) -> list[dict[str, np.ndarray]]:
    return reference(bundle_dir, jpegs, seed=3)


def reference(bundle_dir: Path, paths: list[Path], seed: int) -> list[dict[str, np.ndarray]]:
    """SPEC.md composed from the ops one image at a time, no engine code involved."""
    import hashlib

    b = load_bundle(bundle_dir)
    pre = b.preprocessing
    seg = load_torch_model(b, b.segmentation)
    learners = [load_torch_model(b, e) for e in b.learners]
    ens = load_torch_model(b, b.ensemble)
    mean = torch.tensor(pre["normalization"]["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(pre["normalization"]["std"]).view(1, 3, 1, 1)
    out = []
    with torch.inference_mode():
        for p in paths:
            image = torch.from_numpy(read_image(p))
            logits = seg(segmentation_input(image, pre["segmentation"]["size"], pre["segmentation"]["gamma"])[None])
            mask = torch.from_numpy(postprocess_mask(lung_masks(logits, pre["segmentation"]["threshold"])[0].numpy()))
            big = learner_image(image, 1024)[None]
            seed_i = image_seed(hashlib.sha256(p.read_bytes()).hexdigest(), seed)
            drawn = draw_patches(big, resize_mask(mask, 1024)[None], [seed_i], K)
            x = (drawn["patches"].reshape(K, 1, 224, 224).expand(-1, 3, -1, -1) - mean) / std
            patch_logits = [m(x)[None] for m in learners]
            conf = torch.stack([vote_fractions(lg) for lg in patch_logits], 1)
            out.append({"centres": drawn["centres"][0].numpy(), "probs": ens(conf).softmax(-1)[0].numpy(),
                        "conf": conf[0].numpy(), "soft": torch.stack([mean_softmax(lg) for lg in patch_logits], 1)[0].numpy()})
    return out


@pytest.mark.parametrize("images_per_call,patch_batch", [(1, 8), (3, 24), (2, 5)])
def test_engine_matches_reference_composition_whatever_the_packing(engine, jpegs, baseline, ref, images_per_call, patch_batch):
    if (images_per_call, patch_batch) == (engine.images_per_call, engine.patch_batch):
        preds = baseline
    else:
        preds = engine.configured(images_per_call=images_per_call, patch_batch=patch_batch).predict_many(jpegs)
    for p, r in zip(preds, ref):
        assert p.ok, p.error
        np.testing.assert_array_equal(p.centres, r["centres"])
        np.testing.assert_allclose(p.probability_array, r["probs"], atol=1e-5)
        got_conf = np.array([[p.learner_confidences[n][c] for c in CLASSES] for n in p.learner_confidences])
        got_soft = np.array([[p.learner_mean_softmax[n][c] for c in CLASSES] for n in p.learner_mean_softmax])
        np.testing.assert_allclose(got_conf, r["conf"], atol=1e-6)
        np.testing.assert_allclose(got_soft, r["soft"], atol=1e-5)
        assert p.label == CLASSES[int(np.argmax(r["probs"]))]


def test_results_do_not_depend_on_order_or_grouping(engine, jpegs, baseline):
    forward = baseline
    backward = engine.configured(images_per_call=2).predict_many(list(reversed(jpegs)))[::-1]
    alone = engine.predict(jpegs[1])
    for a, b in zip(forward, backward):
        assert a.item_id == b.item_id
        np.testing.assert_array_equal(a.centres, b.centres)
        np.testing.assert_allclose(a.probability_array, b.probability_array, atol=1e-6)
    np.testing.assert_array_equal(alone.centres, forward[1].centres)
    assert forward[0].seed == 3 and forward[0].k == K


def test_different_run_seeds_draw_different_centres(bundle_dir, jpegs):
    a = Engine.from_bundle(bundle_dir, device="cpu", k=K, return_centres=True, seed=0).predict(jpegs[0])
    b = Engine.from_bundle(bundle_dir, device="cpu", k=K, return_centres=True, seed=1).predict(jpegs[0])
    assert not np.array_equal(a.centres, b.centres)


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


def _tiff(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "TIFF")
    return buf.getvalue()


def test_bad_and_degenerate_inputs_never_crash(engine, tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    inputs = [
        ("black", _png(np.zeros((512, 512), np.uint8))),
        ("tiny", np.random.default_rng(0).random((40, 40), dtype=np.float32)),
        ("grey", np.full((300, 300), 0.5, np.float32)),
        ("junk", b"definitely not an image"),
        ("missing", tmp_path / "nope.jpg"),
        ("empty", tmp_path / "empty.png"),
        ("too_small", np.zeros((10, 10), np.float32)),
        ("rgb_array", np.zeros((64, 64, 3), np.float32)),
        ("rgba_array", np.zeros((64, 64, 4), np.uint8)),
        ("out_of_range", np.full((64, 64), 2.0, np.float32)),
        ("levels_as_floats", np.arange(64 * 64, dtype=np.float32).reshape(64, 64) % 256),
        ("nan", np.full((64, 64), np.nan, np.float32)),
        ("a_dict", {"not": "an image"}),
        ("objects", np.full((64, 64), None, object)),
        ("strings", np.full((64, 64), "x")),
        ("booleans", np.ones((64, 64), bool)),
        ("huge", np.zeros((10_001, 10_000), np.uint8)),
        ("big_endian", np.full((300, 300), 0.5, ">f4")),
        ("nul_path", "scan\0.png"),
        ("meta_tensor", torch.zeros(64, 64, device="meta")),
        ("sparse", torch.zeros(64, 64).to_sparse()),
        ("zero_d", np.array(0.5, np.float32)),
        ("garbage_tiff", b"II*\x00" + b"\x00" * 40),
    ]
    preds = {p.item_id: p for p in engine.predict_many(inputs)}
    assert list(preds) == [name for name, _ in inputs]
    for name in ("black", "tiny", "grey", "big_endian"):
        p = preds[name]
        assert p.status in ("ok", "flagged") and abs(sum(p.probabilities.values()) - 1) < 1e-5
        assert ("blank_image" in p.flags) == (name != "tiny")
    assert "small_image" in preds["tiny"].flags and preds["tiny"].status == "flagged"
    assert "nope.jpg: file not found" in preds["missing"].error
    assert "not a recognised image format" in preds["junk"].error
    assert "empty file" in preds["empty"].error
    assert "too small" in preds["too_small"].error
    assert "2-D" in preds["rgb_array"].error and "colour: convert to grey" in preds["rgba_array"].error
    assert "[0, 1]; its values run from 2 to 2" in preds["out_of_range"].error
    assert "values run from 0 to 255 (8-bit levels as floats? divide by 255" in preds["levels_as_floats"].error
    assert "holds NaN or infinite values" in preds["nan"].error
    assert "unsupported input type dict" in preds["a_dict"].error
    assert "objects: cannot read the array" in preds["objects"].error
    assert "strings: cannot read the array" in preds["strings"].error
    assert "unsupported array dtype bool (expected uint8" in preds["booleans"].error
    assert "huge: image too large: 10000x10001 pixels" in preds["huge"].error
    assert preds["big_endian"].probabilities == preds["grey"].probabilities  # byte order does not matter
    assert "nul_path: cannot read the input: ValueError: embedded null byte" == preds["nul_path"].error  # no exception out of the batch
    assert "meta_tensor: cannot read the input" in preds["meta_tensor"].error
    assert "sparse: cannot read the input" in preds["sparse"].error
    assert "got shape ()" in preds["zero_d"].error
    assert "garbage_tiff: cannot decode TIFF: not a readable TIFF file" == preds["garbage_tiff"].error
    for name in ("junk", "missing", "empty", "too_small", "rgb_array", "rgba_array", "out_of_range", "levels_as_floats", "nan", "a_dict", "objects", "strings",
                 "booleans", "huge", "nul_path", "meta_tensor", "sparse", "zero_d", "garbage_tiff"):
        assert preds[name].status == "error" and preds[name].probabilities is None and preds[name].label is None


def test_empty_mask_falls_back_and_is_flagged(bundle_dir):
    """A segmenter that finds no lung: patches come from the whole image and the result says so."""
    engine = Engine.from_bundle(bundle_dir, device="cpu", k=K, return_centres=True)
    seg = engine.segmenter.module
    with torch.no_grad():
        final = [m for m in seg.modules() if isinstance(m, torch.nn.Conv2d)][-1]
        final.weight.zero_()
        final.bias.fill_(-10.0)  # sigmoid ~ 0 everywhere: an empty lung mask
    p = engine.predict(TEXTURE)
    assert p.status == "flagged" and p.flags == ["mask_fallback"]
    assert p.centres.min() >= 0 and p.centres.max() < 1024


def test_non_finite_learner_outputs_are_flagged(bundle_dir):
    """A learner whose logits overflow (NaN/inf) still votes through argmax: the result must say so."""
    engine = Engine.from_bundle(bundle_dir, device="cpu", k=K)
    p = engine.predict(TEXTURE)
    assert p.status == "ok" and not p.flags
    with torch.no_grad():
        head = [m for m in engine.learners[1].backend.module.modules() if isinstance(m, torch.nn.Linear)][-1]
        head.bias.fill_(float("nan"))
    p = engine.predict(TEXTURE)
    assert p.status == "flagged" and p.flags == ["non_finite_outputs"]


def test_array_inputs_hash_their_float_content(engine, jpegs):
    arr = (read_image(jpegs[0]) * 255).round().astype(np.uint8)
    a = engine.predict(arr, item_id="u8")
    b = engine.predict(torch.from_numpy(arr.astype(np.float32) / 255), item_id="f32")
    assert a.content_hash == b.content_hash and a.item_id == "u8"
    np.testing.assert_allclose(a.probability_array, b.probability_array, atol=1e-6)


def test_inputs_are_taken_as_they_are_handed_over(engine, jpegs):
    """A producer that refills one buffer for every item (a frame grabber): each result is its own frame's,
    whatever the grouping and prefetch; pairs may carry any id."""
    frames = [(read_image(p) * 255).round().astype(np.uint8)[:300, :300] for p in jpegs[:2]]
    expected = [engine.predict(f).content_hash for f in frames]

    tiffs = [_tiff(f) for f in frames]  # uncompressed: the same length, so one bytearray can hold each in turn
    assert len(tiffs[0]) == len(tiffs[1])

    def refilled(kind):
        buf = np.empty_like(frames[0])
        raw = bytearray(len(tiffs[0]))
        for i, (f, t) in enumerate(zip(frames, tiffs)):
            buf[:], raw[:] = f, t
            yield i, (buf if kind == "numpy" else torch.from_numpy(buf) if kind == "torch" else raw)

    for kind in ("numpy", "torch"):
        for prefetch in (0, 2):
            got = list(engine.configured(images_per_call=2).stream(refilled(kind), prefetch=prefetch))
            assert [p.item_id for p in got] == ["0", "1"] and [p.content_hash for p in got] == expected
    got = list(engine.configured(images_per_call=2).stream(refilled("bytes"), prefetch=2))
    assert [p.content_hash for p in got] == [hashlib.sha256(t).hexdigest() for t in tiffs]
    assert engine.predict_many([(Path("a/b.png"), frames[0])])[0].item_id == "a/b.png"


def test_real_image_end_to_end_and_row(engine, jpegs, baseline):
    p = baseline[0]
    assert p.status == "ok" and p.label in CLASSES and p.centres.shape == (K, 2)
    row = p.to_row()
    assert row["path"] == str(jpegs[0]) and row["k"] == K and row["backend"] == "torch"
    assert row["pred"] == p.label and "label" not in row and row["study_instance_uid"] is None
    assert abs(sum(row[f"p_{c}"] for c in CLASSES) - 1) < 1e-5
    assert {f"shufflenet_v2_x0_5_patch_{c}" for c in CLASSES} <= set(row)
    assert p.meta["format"] == "jpeg"
    error = engine.predict(b"not an image").to_row()
    assert list(error) == list(row) and error["shufflenet_v2_x0_5_patch_covid"] is None  # the same columns


@contextlib.contextmanager
def segmenter_calls(engine: Engine, seconds: float = 0.0):
    """A list that gains an entry at each call of the engine's segmenter, while the block runs; each call takes
    ``seconds`` longer (so that a stream has groups waiting to be prepared)."""
    calls: list[int] = []

    def hook(*_: Any) -> None:
        time.sleep(seconds)
        calls.append(1)

    handle = engine.segmenter.module.register_forward_hook(hook)
    try:
        yield calls
    finally:
        handle.remove()


def assert_preparation_done(engine: Engine, calls: list[int]) -> None:
    """Nothing of an ended stream is left to prepare: a job queued now in the engine's preparation thread, after
    anything still waiting there, finds no more segmenter calls than there are now."""
    before = len(calls)
    engine._prep_worker.submit(lambda: None).result()
    assert len(calls) == before


def test_an_input_iterable_that_raises_still_gets_what_it_gave(engine, jpegs, baseline):
    """The caller's generator fails after three inputs: their results come first (any prefetch, any grouping),
    then its own exception; a single string is refused as an iterable of inputs."""
    def source():
        yield from jpegs
        raise RuntimeError("producer failed") from OSError("disk gone")

    for images_per_call, prefetch in ((1, 0), (2, 0), (2, 2), (4, 1)):
        got = []
        with pytest.raises(RuntimeError, match="producer failed") as caught:
            for p in engine.configured(images_per_call=images_per_call).stream(source(), prefetch=prefetch):
                got.append(p)
        assert isinstance(caught.value.__cause__, OSError)  # the caller's exception as the caller raised it
        assert [p.item_id for p in got] == [str(j) for j in jpegs]
        for a, b in zip(got, baseline):
            np.testing.assert_allclose(a.probability_array, b.probability_array, atol=1e-6)
    with pytest.raises(TypeError, match=r"use predict\(\) for one input"):
        engine.predict_many(str(jpegs[0]))
    with pytest.raises(TypeError, match=r"got one bytes"):
        engine.stream(b"\xff\xd8")  # at the call, not at the first result
    for colour in (np.zeros((64, 64, 3), np.uint8), torch.zeros(64, 64, 4)):  # not a stack of 64 grey images
        with pytest.raises(TypeError, match=r"colour image.*convert it to grey"):
            engine.predict_many(colour)


class _FailsOnCall(torch.nn.Module):
    """A user's learner that fails on its n-th call (a network that raises mid-run)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n, self.calls = n, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.n:
            raise RuntimeError("learner failed")
        return x.new_zeros(x.shape[0], len(CLASSES))


def test_an_engine_failure_still_gives_what_was_classified(jpegs):
    """A learner raises on the third image: the two images classified before come out first, then its error;
    the engine runs again afterwards."""
    from patchflannel.models import get_model

    assert len(jpegs) >= 3
    for prefetch in (0, 2):
        learner = _FailsOnCall(3)
        engine = Engine.from_modules(get_model("fcdensenet56"), {"flaky": learner}, None, device="cpu", k=4)
        got = []
        with pytest.raises(RuntimeError, match="learner failed"), segmenter_calls(engine) as calls:
            for p in engine.stream(jpegs * 3, prefetch=prefetch):
                got.append(p)
        assert [p.item_id for p in got] == [str(j) for j in jpegs[:2]] and all(p.ok for p in got)
        assert_preparation_done(engine, calls)
        assert engine.predict(jpegs[0]).ok  # the fourth call


def test_inputs_that_fail_as_they_are_taken_are_their_own_errors(engine, jpegs, baseline):
    """A PathLike whose __fspath__ raises and a DLPack producer that raises are error results; the images
    around them are still scored."""
    class BadPath:
        def __fspath__(self) -> str:
            raise ValueError("no such mount")

    class BadDLPack:
        def __dlpack__(self, stream=None):  # noqa: ANN001, ANN204
            raise KeyError("device lost")

        def __dlpack_device__(self):  # noqa: ANN204
            return (1, 0)

    for prefetch in (0, 2):
        got = list(engine.configured(images_per_call=2).stream([jpegs[0], BadPath(), BadDLPack(), jpegs[1]],
                                                              prefetch=prefetch))
        assert [p.status for p in got] == [baseline[0].status, "error", "error", baseline[1].status]
        assert got[1].item_id == "<BadPath #1>" and "ValueError: no such mount" in got[1].error
        assert got[2].item_id == "<BadDLPack #2>" and "KeyError" in got[2].error
        np.testing.assert_allclose(got[3].probability_array, baseline[1].probability_array, atol=1e-6)
    # Nor an id that cannot be read as text, nor an input that cannot be copied as it is taken.
    released = memoryview(bytearray(jpegs[0].read_bytes()))
    released.release()
    got = list(engine.stream([jpegs[0], released, (10**5000, jpegs[1]), (BadPath(), jpegs[1]), jpegs[1]]))
    assert [p.status for p in got] == [baseline[0].status, "error", "error", "error", baseline[1].status]
    assert got[1].item_id == "<bytes #1>" and "cannot take the input: ValueError" in got[1].error
    assert got[2].item_id == "<input #2>" and "cannot take the input: ValueError: Exceeds the limit" in got[2].error
    assert got[3].item_id == "<input #3>" and "no such mount" in got[3].error



def test_inputs_without_an_id_are_named_by_kind_and_position(engine, jpegs):
    preds = engine.predict_many([b"junk", np.zeros((3, 3, 3)), ("mine", b"x"), jpegs[0]])
    assert [p.item_id for p in preds] == ["<bytes #0>", "<ndarray #1>", "mine", str(jpegs[0])]
    assert preds[1].error.startswith("<ndarray #1>: expected a 2-D grey image array")
    swapped = engine.predict_many([(b"\xff\xd8 image bytes", "name"), (7, b"junk")])  # data first is no pair
    assert swapped[0].item_id == "<tuple #0>" and "an (item_id, x) pair with a string, integer or path id" in swapped[0].error
    assert swapped[1].item_id == "7" and "not a recognised image format" in swapped[1].error


def test_stream_pairs_and_prefetch(engine, jpegs, baseline):
    pairs = [(f"id{i}", p) for i, p in enumerate(jpegs)] + [("bad", b"xx")]
    streamed = list(engine.configured(images_per_call=1).stream(pairs, prefetch=2))
    assert [p.item_id for p in streamed] == ["id0", "id1", "id2", "bad"]
    for s, d in zip(streamed, baseline):
        np.testing.assert_allclose(s.probability_array, d.probability_array, atol=1e-6)


def test_stream_pipeline_keeps_order_with_error_only_groups(engine, jpegs, baseline):
    """Groups of two, two of them with no decodable image (one in the middle, one last), any prefetch."""
    xs = [("a", jpegs[0]), ("bad1", b"xx"), ("bad2", b"yy"), ("bad3", b"zz"), ("b", jpegs[1]), ("c", jpegs[2]),
          ("bad4", b"ww")]
    for prefetch in (0, 1, 3):
        got = {p.item_id: p for p in engine.configured(images_per_call=2).stream(xs, prefetch=prefetch)}
        assert list(got) == [x[0] for x in xs]
        assert all(got[f"bad{i}"].status == "error" for i in range(1, 5))
        for name, ref in zip("abc", baseline):
            assert got[name].status == ref.status
            np.testing.assert_allclose(got[name].probability_array, ref.probability_array, atol=1e-6)
    with segmenter_calls(engine, seconds=0.3) as calls:
        stream = engine.stream(jpegs * 3, prefetch=2)
        assert next(stream).item_id == str(jpegs[0])  # meanwhile groups 2 and 3 wait or are being prepared
        stream.close()  # a consumer that stops early leaves nothing running
        assert_preparation_done(engine, calls)
        assert len(calls) < 4


def _predict_into(engine: Engine, x: Path, queue: Any) -> None:
    queue.put(engine.predict(x).probability_array)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork (POSIX)")
def test_a_forked_child_runs_an_engine_its_parent_used(engine, jpegs, baseline):
    """A child forked after the engine ran (a server forking its workers) inherits none of its threads: the
    engine starts its own there instead of waiting for ever on the parent's."""
    engine.predict(jpegs[0])  # the parent's threads are running
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_predict_into, args=(engine, jpegs[0], queue))
    child.start()
    child.join(120)
    if child.is_alive():
        child.kill()
        pytest.fail("the forked child hung")
    assert child.exitcode == 0
    np.testing.assert_allclose(queue.get(timeout=10), baseline[0].probability_array, atol=1e-6)


def test_a_stream_closed_in_the_preparation_thread_does_not_wait_for_itself(engine, jpegs):
    """A stream dropped in a reference cycle is closed by whichever thread runs the garbage collector: when that
    is the preparation thread, amid one of the stream's own groups, closing must not wait for that group."""
    handed_over, closed = threading.Event(), threading.Event()
    calls: list[int] = []
    holder: dict[str, Any] = {}

    def close_there(*_: Any) -> None:
        calls.append(1)
        if len(calls) == 3:  # the third group, prepared once the first result is out and the stream handed over
            assert handed_over.wait(60)
            holder.pop("stream").close()  # what the collector does to a dropped generator, in this thread
            closed.set()

    handle = engine.segmenter.module.register_forward_hook(close_there)
    try:
        stream = engine.stream(jpegs * 3, prefetch=2)
        next(stream)
        holder["stream"] = stream
        del stream
        handed_over.set()
        assert closed.wait(60), "closing the stream in the preparation thread did not return"
        assert engine.predict(jpegs[0]).ok  # the thread is free again
    finally:
        handle.remove()


def test_a_stream_closed_in_the_learner_thread_does_not_wait_for_its_preparation(engine, jpegs):
    """A collector run in the learner thread (amid a compile, holding the process-wide compile lock) may close a
    dropped stream whose group being prepared waits for that lock: closing must not wait for the group."""
    release, calls = threading.Event(), []

    def held_up(*_: Any) -> None:
        calls.append(1)
        if len(calls) == 3:  # the third group, prepared ahead once the first result is out
            release.wait(60)  # stands for the lock the learner thread holds

    handle = engine.segmenter.module.register_forward_hook(held_up)
    try:
        stream = engine.stream(jpegs * 3, prefetch=2)
        next(stream)
        closing = engine._learner_worker.submit(stream.close)  # what the collector does, in that thread
        try:
            closing.result(timeout=30)
        except concurrent.futures.TimeoutError:
            pytest.fail("closing the stream in the learner thread waited for its group's preparation")
        finally:
            release.set()
        assert engine.predict(jpegs[0]).ok
    finally:
        handle.remove()


def test_networks_run_in_two_long_lived_threads_per_engine(bundle_dir, jpegs):
    """PyTorch keeps cuDNN's autotuned plans per thread: the segmenter runs in one thread and the learners in
    one other for warm_up, predict and every stream of an engine and its configured copies, whichever thread
    calls (a preparation thread made per call had the segmenter autotuned again on every call on a GPU); the
    threads end with the engine."""
    eng = Engine.from_bundle(bundle_dir, device="cpu", k=K, seed=3)
    seen: dict[str, list[threading.Thread]] = {"seg": [], "learners": []}

    def record(key: str):
        return lambda *_: seen[key].append(threading.current_thread())

    eng.segmenter.module.register_forward_hook(record("seg"))
    for lr in eng.learners:
        lr.backend.module.register_forward_hook(record("learners"))
    eng.warm_up()
    eng.predict(jpegs[0])
    list(eng.stream(jpegs, prefetch=2))
    caller = threading.Thread(target=lambda e=eng: list(e.configured(images_per_call=2).stream(jpegs, prefetch=0)))
    caller.start()
    caller.join()
    assert len(seen["seg"]) == 1 + 1 + len(jpegs) + 2
    (seg_thread,) = set(seen["seg"])
    (learner_thread,) = set(seen["learners"])
    assert seg_thread.name.startswith("patchflannel-prepare")
    assert learner_thread.name.startswith("patchflannel-learners")
    del eng
    gc.collect()
    for thread in (seg_thread, learner_thread):
        thread.join(timeout=30)
        assert not thread.is_alive()


@pytest.mark.slow
@pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
                    reason="torch.compile on a CPU needs a C++ compiler")
def test_compiled_engine_pads_a_short_group_instead_of_recompiling(bundle_dir, jpegs, baseline):
    """Three images in groups of two: the last calls (one image) are padded to the compiled shapes, for the
    segmenter (compiled too, called from the preparation thread when streaming) and the learners."""
    compiled = Engine.from_bundle(bundle_dir, device="cpu", k=K, seed=3, compile=True, images_per_call=2,
                                  patch_batch=2 * K)
    lines: list[str] = []
    seconds = compiled.warm_up(lines.append)
    assert list(seconds) == ["segmentation", *(lr.name for lr in compiled.learners)] and len(lines) == len(seconds)
    backends = [compiled.segmenter, *(lr.backend for lr in compiled.learners)]
    compile_seconds = [b.compile_seconds for b in backends]
    seg_size = compiled.pre["segmentation"]["size"]
    for got in (compiled.predict_many(jpegs), list(compiled.stream(jpegs, prefetch=2))):
        for b, warm, shape in zip(backends, compile_seconds, [(2, 1, seg_size, seg_size)] + [(2 * K, 3, 224, 224)] * 5):
            assert b.compiled, b.compile_error
            assert b.compiled_shapes == {shape} and b.compile_seconds == warm > 0
        for a, b in zip(got, baseline):
            np.testing.assert_allclose(a.probability_array, b.probability_array, atol=1e-4)


def test_global_learners_alone_skip_segmentation_and_patches(engine, jpegs):
    """FLANNEL's global baseline needs no mask: same results as through the full flow, without its stages."""
    from patchflannel.bench.harness import PerfTimer

    fast = engine.configured(learner_mode="global")
    timer = PerfTimer()
    got = list(fast.stream(jpegs, timer=timer))
    assert {"segment", "mask", "sample"}.isdisjoint(timer.totals()) and "infer" in timer.totals()
    full = engine.configured(learner_mode="global")
    full._patch_mode = True  # the full flow, as before the skip
    for a, b in zip(got, full.predict_many(jpegs)):
        assert a.status == "ok" and not a.flags
        np.testing.assert_allclose(a.probability_array, b.probability_array, atol=1e-6)
    assert fast.warm_up().keys() == {lr.name for lr in fast.learners}


class _OpenStages:
    """A stage timer that keeps, per thread, the stages open at this moment."""

    def __init__(self) -> None:
        self.local = threading.local()

    def open(self) -> list[str]:
        return list(getattr(self.local, "stack", []))

    @contextlib.contextmanager
    def stage(self, name: str):
        self.local.stack = [*self.open(), name]
        try:
            yield
        finally:
            self.local.stack = self.local.stack[:-1]


class _WatchedPath(os.PathLike):
    """A path that notes the timer's open stages each time it is read."""

    def __init__(self, path: Path, timer: _OpenStages) -> None:
        self.path, self.timer, self.reads = path, timer, []

    def __fspath__(self) -> str:
        self.reads.append(self.timer.open())
        return os.fspath(self.path)


def test_reading_an_input_is_timed_as_decoding(engine, jpegs):
    """Reading a file (and decoding a DICOM, hashing bytes) happens inside the ``decode`` stage, so bench's
    preprocessing share counts it."""
    timer = _OpenStages()
    for prefetch in (0, 2):
        watched = _WatchedPath(jpegs[0], timer)
        assert [p.status for p in engine.stream([watched], prefetch=prefetch, timer=timer)] == ["ok"]
        assert ["decode"] in watched.reads, watched.reads


class _Seen(torch.nn.Module):
    """A user's learner that keeps the inputs it is given (and votes for nothing in particular)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.clone())
        return x.new_zeros(x.shape[0], len(CLASSES))


def test_global_learners_see_the_image_as_in_training(jpegs):
    """Global mode's input is the decoded image resized straight to 336 and centre-cropped, as the training
    datasets and the ONNX parity inputs make it (not the 1024 working image resized again)."""
    from patchflannel.models import get_model

    engine = Engine.from_modules(get_model("fcdensenet56"), {"seen": _Seen()}, None, mode="global", device="cpu")
    engine.predict_many(jpegs)
    pre = engine.pre
    mean = torch.tensor(pre["normalization"]["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(pre["normalization"]["std"]).view(1, 3, 1, 1)
    views = [global_view(torch.from_numpy(read_image(p)), pre["global"]["resize"], pre["global"]["crop"]) for p in jpegs]
    expected = (torch.stack(views)[:, None].expand(-1, 3, -1, -1) - mean) / std
    seen = torch.cat(engine.learners[0].backend.module.seen)
    torch.testing.assert_close(seen, expected, atol=1e-5, rtol=0)


def test_warm_up_runs_every_network_once(engine):
    lines: list[str] = []
    seconds = engine.warm_up(lines.append)
    assert list(seconds) == ["segmentation", "shufflenet_v2_x0_5_patch", "mobilenet_v3_small_patch"]
    assert all(s > 0 for s in seconds.values()) and lines[0].startswith("warm-up segmentation: ")


def test_one_engine_shared_by_threads(engine, jpegs, baseline):
    serial = [p.probability_array for p in baseline]
    results: dict[int, list] = {}

    def work(i: int) -> None:
        inputs = (jpegs[i % 3:] + jpegs[: i % 3])[:2 + i % 2]
        if i % 2:  # one thread pipelines a stream (decode worker, groups of one) while the other predicts
            results[i] = [p.probability_array for p in engine.stream(inputs, prefetch=2)]
        else:
            results[i] = [p.probability_array for p in engine.predict_many(inputs)]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(1, 3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, got in results.items():
        rotated = serial[i % 3:] + serial[: i % 3]
        for a, b in zip(got, rotated):
            np.testing.assert_allclose(a, b, atol=1e-6)
    assert len(results) == 2
    other = engine.configured(k=4)  # shares the networks, so the threads that run them too
    assert other._prep_worker is engine._prep_worker and other._learner_worker is engine._learner_worker


def test_describe_and_choices(engine, bundle_dir):
    d = engine.describe()
    assert (d["device"], d["loader"], d["backend"], d["sampler"], d["precision"]) == ("cpu", "cpu", "torch", "torch", "fp32")
    assert d["patch_batch"] == 8 and d["images_per_call"] == 1 and d["learner_streams"] == 1 and len(d["learners"]) == 2
    assert d["folded_batchnorms"] == 56 + 34  # all conv -> BatchNorm pairs of shufflenet_v2_x0_5, mobilenet_v3_small
    with pytest.raises(BackendUnavailableError, match="tensorrt"):
        Engine.from_bundle(bundle_dir, device="cpu", backend="tensorrt")
    with pytest.raises(ConfigError, match="learner mode must be 'patch' or 'global', got 'Patch'"):
        engine.configured(learner_mode="Patch")
    with pytest.raises(BackendUnavailableError, match="cupy"):
        Engine.from_bundle(bundle_dir, device="cpu", sampler="cupy")
    for bad, match in ((dict(device="gpu"), "unknown device 'gpu'"), (dict(device="meta"), "not supported"),
                       (dict(patch_batch="many"), "patch_batch must be"), (dict(images_per_call=0), "images_per_call"),
                       (dict(patch_batch=2.5), "patch_batch must be"), (dict(images_per_call=True), "images_per_call"),
                       (dict(k=0), "k must be"), (dict(k=8.9), "k must be an integer >= 1, got 8.9"),
                       (dict(learner_streams=0), "learner_streams must be"),
                       (dict(learner_streams=2), "learner_streams=2 needs a CUDA device"),
                       (dict(seed="abc"), "seed must be a whole number within 64 bits .*, got 'abc'"),
                       (dict(seed=None), "seed must be"), (dict(seed=2**63), "within 64 bits"),
                       (dict(compile="no"), "compile must be True or False, got 'no'"),
                       (dict(return_centres="yes"), "return_centres must be True or False")):
        with pytest.raises(ConfigError, match=match):
            Engine.from_bundle(bundle_dir, **{"device": "cpu", **bad})
    assert Engine.from_bundle(load_bundle(bundle_dir), device="cpu").describe()["bundle"] == d["bundle"]


def test_inputs_given_the_way_users_hold_them(engine, jpegs, baseline):
    """A single 2-D array or a mapping is not an iterable of inputs; one-channel arrays are grey images; predictions
    with centres compare; a failure's message stays one line."""
    grey = read_image(jpegs[0])
    for one in (grey, torch.from_numpy(grey), grey[..., None]):  # (H, W, 1) too: iterated, it gave H error rows
        with pytest.raises(TypeError, match="use predict\\(\\) for one input"):
            engine.predict_many(one)
    with pytest.raises(TypeError, match="a mapping: pass its items"):
        engine.predict_many({"a": jpegs[0]})
    for bad in (-1, "2", True):
        with pytest.raises(ConfigError, match="prefetch must be a whole number >= 0"):
            list(engine.stream([jpegs[0]], prefetch=bad))
    assert list(engine.stream([jpegs[0]], prefetch=np.int64(1)))[0] == engine.predict(jpegs[0])  # numpy's, as k
    flat = engine.predict(grey)
    for shaped in (grey[None], grey[..., None], torch.from_numpy(grey)[None]):
        p = engine.predict(shaped)
        assert p.content_hash == flat.content_hash and p.probabilities == flat.probabilities
    rgb = engine.predict(np.stack([grey] * 3, -1))
    assert rgb.status == "error" and "convert to grey first" in rgb.error
    listed = engine.predict_many([["id", jpegs[0]]])[0]
    assert listed.status == "error" and "an (item_id, x) pair is a tuple" in listed.error
    assert baseline[0] == engine.predict(jpegs[0]) and engine.predict(jpegs[0]).centres is not None
    with pytest.raises(AttributeError, match="no setter"):  # settings are read; configured() makes a copy
        engine.k = 0
    sparse = engine.predict(torch.zeros(64, 64).to_sparse())
    assert sparse.status == "error" and "\n" not in sparse.error and len(sparse.error) < 400


def test_bundle_without_learners_is_refused(tmp_path):
    b = random_bundle(tmp_path, segmentation="fcdensenet56", learners=())
    b.ensemble = None
    write_bundle(b)
    with pytest.raises(BundleError, match="no base learners"):
        Engine.from_bundle(tmp_path, device="cpu")


def test_calls_stay_within_a_backends_largest_batch(engine, jpegs, baseline):
    """A backend with a largest batch (a TensorRT profile's maximum) gets calls of at most that many inputs."""
    learner = engine.learners[0]
    calls = []
    original = learner.backend.run

    def counting(x):
        calls.append(x.shape[0])
        return original(x)

    learner.backend.run, learner.backend.max_batch = counting, 3
    try:
        got = engine.predict_many(jpegs[:1])
    finally:
        del learner.backend.run, learner.backend.max_batch
    assert calls == [3, 3, 2]  # K=8 patches, patch_batch 8
    np.testing.assert_allclose(got[0].probability_array, baseline[0].probability_array, atol=1e-6)


def test_global_mode_is_one_call_per_image(engine, jpegs):
    calls = []
    learner = engine.learners[0]
    g = engine.configured(learner_mode="global", images_per_call=3, patch_batch=3)
    original = learner.backend.run

    def counting(x):
        calls.append(tuple(x.shape))
        return original(x)

    learner.backend.run = counting
    try:
        preds = g.predict_many(jpegs)
    finally:
        del learner.backend.run
    assert calls == [(3, 3, 224, 224)]
    for p in preds:
        conf = np.array([p.learner_confidences[learner.name][c] for c in CLASSES])
        assert abs(conf.sum() - 1) < 1e-5 and (conf > 0).all()  # a softmax, not vote fractions
