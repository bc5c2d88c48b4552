"""bench: the CLI smoke run end to end, its report files, and its inputs."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from patchflannel.bench.harness import BenchConfig, image_files, load_inputs, phantom_jpegs, run_bench
from patchflannel.bench.report import speedups
from patchflannel.cli.bench import register
from patchflannel.errors import BundleError, ConfigError


@pytest.fixture
def app() -> typer.Typer:
    app = typer.Typer()
    register(app)

    @app.callback()
    def main() -> None:
        """Test app."""

    return app


def test_bench_smoke_cli_writes_json_markdown_and_plot(app, tmp_path):
    out = tmp_path / "bench"
    result = CliRunner().invoke(app, ["bench", "--smoke", "--synthetic", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "bench.json").read_text())
    runs = {r["mode"]: r for r in report["runs"]}
    assert set(runs) == {"loop", "batched", "packed", "global"}
    assert (runs["loop"]["patch_batch"], runs["batched"]["patch_batch"], runs["packed"]["patch_batch"]) == (1, 4, 8)
    assert runs["loop"]["n_images"] == 1 and runs["packed"]["n_images"] == 2
    for r in report["runs"]:
        assert r["seconds_per_image_median"] > 0 and sum(r["statuses"].values()) == r["n_images"]
        assert r["statuses"].get("error", 0) == 0
        stages = {"decode", "gather", "infer", "ensemble"} | (set() if r["mode"] == "global" else {"segment", "mask", "sample"})
        assert stages == set(r["stage_seconds_per_image"])
        per_learner = r["learner_seconds_per_image"]
        assert set(per_learner) == {"shufflenet_v2_x0_5", "mobilenet_v3_small"}
        assert 0 < sum(per_learner.values()) <= r["stage_seconds_per_image"]["infer"] * 1.001
    assert [e["bundle"] for e in report["engines"]] == ["preset:tiny"] and "synthetic phantom" in report["inputs"]
    assert not {"k", "images_per_call", "patch_batch"} & set(report["engines"][0])  # each run's own, in "runs"
    assert report["environment"]["torch"]
    md = (out / "bench.md").read_text()
    assert "| torch | fp32 | 1 | loop | 4 | 1 | 1 | 1 |" in md and "| torch | fp32 | 1 | packed | 4 | 2 | 8 | 2 |" in md
    assert "| backend | precision | streams | mode | K | shufflenet_v2_x0_5 | mobilenet_v3_small |" in md
    assert "| torch | fp32 | 1 | global | - | 2 | 2 | 2 |" in md
    assert runs["global"]["k"] is None and ("torch fp32", "global", None) not in speedups(report["runs"])
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "bench.md and bench.png" in result.output
    assert speedups(report["runs"])[("torch fp32", "loop", 4)] == 1.0
    assert "torch fp32, packed K=4:" in result.output and "warm-up" in result.output  # a progress line a run
    assert all(len(r["seconds_per_image_runs"]) == r["repeats"] for r in report["runs"])  # each timed run kept
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    if "model name" in cpuinfo:  # the CPU's model where the system names it, not just "x86_64"
        assert report["environment"]["cpu"] in cpuinfo and report["environment"]["cpu"] != platform.machine()


def test_bench_compares_precisions_each_against_its_own_loop(tmp_path):
    """Two precisions in one report: every mode runs for each, a speed-up is over the same precision's loop,
    and a precision that resolves to one already timed ('auto' is fp32 on a CPU) is not timed twice."""
    lines: list[str] = []
    report = run_bench(BenchConfig(out=tmp_path, preset="tiny", synthetic=True, n=2, loop_n=1, ks=(3,), pack=2,
                                   modes=("loop", "batched"), precisions=("fp32", "bf16", "auto"), device="cpu",
                                   repeats=1, warmup=0), progress=lines.append)
    assert [(e["backend"], e["precision"]) for e in report["engines"]] == [("torch", "fp32"), ("torch", "bf16")]
    assert [(r["precision"], r["mode"]) for r in report["runs"]] == [
        ("fp32", "loop"), ("fp32", "batched"), ("bf16", "loop"), ("bf16", "batched")]
    ups = speedups(report["runs"])
    for precision in ("fp32", "bf16"):
        runs = {r["mode"]: r for r in report["runs"] if r["precision"] == precision}
        assert ups[(f"torch {precision}", "batched", 3)] == pytest.approx(
            runs["loop"]["seconds_per_image_median"] / runs["batched"]["seconds_per_image_median"])
    assert "backend auto, precision auto: torch fp32, already timed" in lines
    md = (tmp_path / "bench.md").read_text()
    assert md.count("- engine: bundle preset:tiny") == 2 and "| torch | bf16 | 1 | batched | 3 | 1 | 3 | 2 |" in md


def test_each_backend_and_precision_frees_its_networks_before_the_next_is_built(tmp_path, monkeypatch):
    """Two precisions: the first engine's networks are gone when the second is built (peak memory is one set)."""
    import gc
    import weakref

    from patchflannel.bench import harness

    built, alive_at_build = [], []
    real = harness.build_engine

    def tracking(config, backend="auto", precision="auto"):  # noqa: ANN001, ANN202
        gc.collect()
        alive_at_build.append([ref() is not None for ref in built])
        engine = real(config, backend, precision)
        built.append(weakref.ref(engine.learners[0].backend))
        return engine

    monkeypatch.setattr(harness, "build_engine", tracking)
    run_bench(BenchConfig(out=tmp_path, preset="tiny", synthetic=True, n=2, loop_n=1, ks=(2,), pack=2,
                          modes=("batched",), precisions=("fp32", "bf16"), device="cpu", repeats=1, warmup=0))
    assert alive_at_build == [[], [False]]


def test_phantoms_are_deterministic_jpegs():
    a, b = phantom_jpegs(2, size=128, seed=5), phantom_jpegs(2, size=128, seed=5)
    assert a == b and a[0][1][:2] == b"\xff\xd8" and a[0][1] != a[1][1]


def test_inputs_from_manifest_and_folder(cxr4_dir):
    from_manifest = image_files(cxr4_dir)
    assert len(from_manifest) == 1178 and all(Path(p).is_file() for p in from_manifest[:5])
    items, desc = load_inputs(cxr4_dir / "images", 3)
    assert len(items) == 3 and str(cxr4_dir) in desc and items[0][1][:2] == b"\xff\xd8"


def test_inputs_are_found_as_score_finds_them(tmp_path):
    """A folder gives the files score would take (a DICOM named by its UID included, hidden files and other
    files left out), sorted; a manifest's missing image is named before anything is timed."""
    (tmp_path / "sub").mkdir()
    for name in ("b.JPE", "sub/a.png", ".hidden.jpg", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "1.2.840.1").write_bytes(bytes(128) + b"DICM")  # the DICOM marker, no extension
    expected = [tmp_path / "1.2.840.1", tmp_path / "b.JPE", tmp_path / "sub" / "a.png"]
    assert image_files(tmp_path) == [str(p) for p in expected]
    (tmp_path / "m.csv").write_text("path\nsub/a.png\nmissing.jpg\n")
    with pytest.raises(ConfigError, match=r"missing.jpg: cannot read this image \(No such file or directory\)"):
        load_inputs(tmp_path / "m.csv", 2)


def test_loop_times_the_first_n_images_and_paths_are_absolute(tmp_path, monkeypatch):
    """--loop-n above --n times the same N images (not more, so "x loop" compares like with like); the report's
    paths are absolute; too few images are counted in the refusal."""
    monkeypatch.chdir(tmp_path)
    report = run_bench(BenchConfig(out=Path("rel"), preset="tiny", synthetic=True, n=1, loop_n=3, ks=(2,),
                                   modes=("loop", "batched"), repeats=1, warmup=0, device="cpu"))
    assert [r["n_images"] for r in report["runs"]] == [1, 1] and report["config"]["loop_n"] == 1
    assert report["config"]["out"] == str(tmp_path / "rel") and (tmp_path / "rel" / "bench.json").is_file()
    (tmp_path / "few").mkdir()
    (tmp_path / "few" / "a.jpg").write_bytes(phantom_jpegs(1)[0][1])
    with pytest.raises(ConfigError, match=r"1 image file\(s\) found, 2 requested \(--n\)"):
        load_inputs(tmp_path / "few", 2)


def test_bad_bench_settings_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="unknown mode"):
        run_bench(BenchConfig(out=tmp_path, preset="tiny", modes=("warp",), synthetic=True))
    with pytest.raises(ConfigError, match="unknown preset"):
        run_bench(BenchConfig(out=tmp_path, preset="huge", synthetic=True))
    with pytest.raises(ConfigError, match="unknown preset"):
        run_bench(BenchConfig(out=tmp_path / "new", preset="huge", synthetic=True))
    assert not (tmp_path / "new").exists()  # a refused run makes no output folder
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="a file is in the way where a folder is wanted"):
        run_bench(BenchConfig(out=tmp_path / "file" / "b", preset="tiny", synthetic=True))
    with pytest.raises(ConfigError, match="nothing: no such file or folder"):
        image_files(tmp_path / "nothing")
    # Every backend x precision pair is checked before the first is timed (which may take minutes).
    with pytest.raises(ConfigError, match="unknown precision 'fp8'"):
        run_bench(BenchConfig(out=tmp_path, preset="tiny", synthetic=True, precisions=("fp32", "fp8")))
    with pytest.raises(BundleError, match="bundle .*default has no onnx file for segmentation, mobilenet"):
        run_bench(BenchConfig(out=tmp_path, synthetic=True, backends=("torch", "onnxruntime")))
    with pytest.raises(ConfigError, match="loop mode runs on one learner stream"):
        run_bench(BenchConfig(out=tmp_path, preset="tiny", synthetic=True, learner_streams=(5,)))
    with pytest.raises(ConfigError, match="learner_streams=2 needs a CUDA device"):
        run_bench(BenchConfig(out=tmp_path, preset="tiny", synthetic=True, device="cpu", learner_streams=(1, 2)))
    assert not (tmp_path / "bench.json").exists()  # refused before the one-stream runs were timed
    with pytest.raises(ConfigError, match="presets hold in-memory torch modules"):
        run_bench(BenchConfig(out=tmp_path, preset="tiny", synthetic=True, backends=("torch", "onnxruntime")))
    assert not (tmp_path / "bench.json").exists()
    for bad, match in ((dict(n=0), r"n \(--n\) >= 1"), (dict(repeats=0), r"repeats \(--repeats\) >= 1"),
                       (dict(warmup=-1), r"warmup \(--warmup\) >= 0"), (dict(loop_n=0), r"loop_n \(--loop-n\) >= 1"),
                       (dict(images=tmp_path), "either --images or --synthetic"), (dict(n=2, pack=4), "must be >= pack")):
        with pytest.raises(ConfigError, match=match):
            run_bench(BenchConfig(out=tmp_path, preset="tiny", synthetic=True, **bad))


def test_patch_modes_keep_a_bundles_global_learners_as_scoring_runs_them(tmp_path):
    """A bundle with a global learner is timed as `score` runs it (its global learner on the whole image in
    every mode); a bundle of global learners only has no patch mode to time."""
    from test_score import mixed_bundle

    from patchflannel.bench.harness import build_engine, mode_engine

    config = BenchConfig(out=tmp_path / "b", bundle=mixed_bundle(tmp_path / "mixed"), synthetic=True)
    engine = build_engine(config)
    for mode in ("loop", "batched", "packed", "auto"):
        assert [lr.mode for lr in mode_engine(engine, mode, 4, 2).learners] == ["patch", "global"]
    assert {lr.mode for lr in mode_engine(engine, "global", 4, 2).learners} == {"global"}
    with pytest.raises(ConfigError, match="pass either --preset or --bundle"):
        run_bench(BenchConfig(out=tmp_path / "c", preset="tiny", bundle=config.bundle, synthetic=True))


def test_patches_a_call_is_what_a_call_carries(tmp_path):
    """At K=1 the engine's cap (8 patches a call on a CPU) is more than a call can carry: the report says 1."""
    report = run_bench(BenchConfig(out=tmp_path, preset="tiny", synthetic=True, ks=(1,), n=2, loop_n=1, pack=2,
                                   repeats=1, warmup=0, modes=("batched", "auto", "packed", "global")))
    assert [(r["mode"], r["patch_batch"]) for r in report["runs"]] == [
        ("batched", 1), ("auto", 1), ("packed", 2), ("global", 2)]


def test_bench_refuses_inputs_that_do_not_score(tmp_path):
    """A failed input costs next to nothing: timing it with the others would inflate images/s."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name, data in phantom_jpegs(1, size=256):
        (folder / name).write_bytes(data)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    with pytest.raises(ConfigError, match=r"1 of 2 bench inputs gave no result \(first: .*broken.jpg"):
        run_bench(BenchConfig(out=tmp_path / "out", preset="tiny", images=folder, n=2, ks=(2,), modes=("batched",),
                              repeats=1, warmup=0))


def test_smoke_runs_the_bundle_it_is_given(app, tmp_path):
    """--smoke --bundle B smoke-tests B (not the tiny preset); a missing bundle is an error."""
    from patchflannel.bundle import random_bundle

    random_bundle(tmp_path / "b", segmentation="fcdensenet56", learners=("shufflenet_v2_x0_5",), name="mine")
    result = CliRunner().invoke(app, ["bench", "--smoke", "--synthetic", "--bundle", str(tmp_path / "b"),
                                      "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert [e["bundle"] for e in report["engines"]] == ["mine"] and report["config"]["preset"] is None
    quiet = CliRunner().invoke(app, ["bench", "--smoke", "--synthetic", "--bundle", str(tmp_path / "b"), "--quiet",
                                     "--out", str(tmp_path / "o3")])
    assert quiet.exit_code == 0 and quiet.output == "" and (tmp_path / "o3" / "bench.json").is_file(), quiet.output
    small = CliRunner().invoke(app, ["bench", "--preset", "tiny", "--synthetic", "-n", "2", "-k", "4", "--modes", "packed",
                                     "--repeats", "1", "--warmup", "0", "--quiet", "--out", str(tmp_path / "o4")])
    assert small.exit_code == 0, small.output  # N below the default pack: packed by N, not refused
    assert [r["images_per_call"] for r in json.loads((tmp_path / "o4" / "bench.json").read_text())["runs"]] == [2]
    missing = CliRunner().invoke(app, ["bench", "--smoke", "--bundle", str(tmp_path / "nope"), "--out", str(tmp_path / "o2")])
    assert missing.exit_code == 2 and "nope" in missing.output
