"""ONNX export: checker-valid graphs with a dynamic batch axis that ONNX Runtime runs like torch on real images."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import typer
from rich.console import Console
from typer.testing import CliRunner

from patchflannel import Engine
from patchflannel.bench.harness import BenchConfig, phantom_jpegs, run_bench
from patchflannel.bench.report import variant
from patchflannel.bundle import default_bundle_path, load_bundle, random_bundle
from patchflannel.cli.export import register
from patchflannel.data.shared import DATA_ENV
from patchflannel.engine.backends.onnxruntime_backend import OnnxRuntimeBackend
from patchflannel.errors import BundleError, ConfigError
from patchflannel.export.onnx import OPSET, export_onnx, parity_report
from patchflannel.models.classifiers import FLANNEL_LEARNERS
from patchflannel.scoring.run import EngineOptions, score


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("torch_bundle")
    random_bundle(root, segmentation="fcdensenet56", learners=("shufflenet_v2_x0_5",), seed=1)
    return root


@pytest.fixture(scope="module")
def exported(source: Path, cxr4_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("onnx_bundle") / "b"
    export_onnx(source, out, data_dir=cxr4_dir.parent)
    return out


def test_every_network_is_exported_and_checked_on_real_images(exported: Path, source: Path) -> None:
    b = load_bundle(exported)
    for entry in b.models():
        f = entry.file("onnx")
        parity = f.extra["parity"]
        assert parity["passed"] and parity["max_abs_diff"] <= parity["tolerance"], entry.name
        assert parity["label_agreement"] == 1.0, entry.name
        assert f.extra["opset"] == OPSET
        expected = "vote fractions" if entry.name == "ensemble" else "real: "
        assert parity["inputs"].startswith(expected), parity["inputs"]
        assert entry.inputs[0]["shape"][0] == "batch"
    assert b.segmentation.file("onnx").extra["parity"]["inputs"].count("jsrt_") == 3
    assert b.learners[0].file("onnx").extra["parity"]["batch"] == 6  # 3 images x 2 patches in one call
    assert "onnx" in b.versions and "onnxruntime" in b.versions
    assert all(f.format == "torch" for m in load_bundle(source).models() for f in m.files)  # source untouched


def test_graphs_have_a_dynamic_batch_and_reproduce_the_saved_references(exported: Path) -> None:
    b = load_bundle(exported)
    for entry in b.models():
        f = entry.file("onnx")
        model = onnx.load(str(b.path_of(f)))
        onnx.checker.check_model(model)
        assert model.opset_import[0].version == OPSET
        for t in (*model.graph.input, *model.graph.output):
            assert t.type.tensor_type.shape.dim[0].dim_param == "batch"
        assert [t.name for t in model.graph.input] == [entry.inputs[0]["name"]]
        ref = np.load(b.root / f.extra["reference"])
        x, y = ref[entry.inputs[0]["name"]], ref[entry.outputs[0]["name"]]
        backend = OnnxRuntimeBackend(b.path_of(f), torch.device("cpu"))
        for batch in (1, len(x)):
            got = backend.run(torch.from_numpy(x[:batch])).numpy()
            assert got.shape == y[:batch].shape
            assert parity_report(y[:batch], got, "segmentation" if entry is b.segmentation else "classes")["passed"]


def test_disagreement_beyond_tolerance_is_refused_and_leaves_the_bundle_unchanged(exported: Path) -> None:
    before = (exported / "bundle.json").read_text()
    with pytest.raises(BundleError, match=r"ensemble.onnx: max abs diff .* > tolerance 0"):
        export_onnx(exported, models=["ensemble"], rtol=0.0, atol=0.0, opset=OPSET - 1)  # other bytes than before
    assert (exported / "bundle.json").read_text() == before
    load_bundle(exported)  # the files bundle.json names are untouched: their hashes still match
    assert not list(exported.rglob("*.partial*"))
    with pytest.raises(BundleError, match="no model.*nonexistent"):
        export_onnx(exported, models=["nonexistent"])


def test_fp16_export_keeps_fp32_io_and_tracks_torch(exported: Path, cxr4_dir: Path) -> None:
    name = load_bundle(exported).learners[0].name
    b = export_onnx(exported, models=[name], precision="fp16", data_dir=cxr4_dir.parent)
    f = b.learners[0].file("onnx", "fp16")
    assert f.path.endswith(".fp16.onnx") and f.extra["parity"]["passed"]
    assert b.learners[0].file("onnx", "fp32").path != f.path  # both precisions kept
    model = onnx.load(str(b.path_of(f)))
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any(init.data_type == onnx.TensorProto.FLOAT16 for init in model.graph.initializer)
    # the engine runs the learner's fp16 file and the other networks' fp32 files, and says so
    engine = Engine.from_bundle(exported, device="cpu", backend="onnxruntime", precision="fp16")
    assert engine.learners[0].backend.precision == "fp16" and engine.describe()["precision"] == "fp16+fp32"
    with pytest.raises(ConfigError, match="precision must be one of"):
        export_onnx(exported, precision="int8")


def test_a_precision_without_files_runs_fp32_and_bench_times_it_once(exported: Path, tmp_path: Path) -> None:
    """bf16 asked of a bundle without bf16 ONNX files: the fp32 files run, the engine and bench say fp32."""
    assert Engine.from_bundle(exported, device="cpu", backend="onnxruntime", precision="bf16").describe()["precision"] == "fp32"
    lines: list[str] = []
    report = run_bench(BenchConfig(out=tmp_path, bundle=exported, synthetic=True, n=1, loop_n=1, ks=(2,),
                                   modes=("batched",), backends=("onnxruntime",), precisions=("bf16", "fp32"),
                                   device="cpu", repeats=1, warmup=0), progress=lines.append)
    assert [variant(e) for e in report["engines"]] == [variant(r) for r in report["runs"]] == ["onnxruntime fp32"]
    assert "backend onnxruntime, precision fp32: onnxruntime fp32, already timed" in lines
    log = Console(file=io.StringIO(), width=300)
    image = tmp_path / "x.jpg"
    image.write_bytes(phantom_jpegs(1, size=256)[0][1])
    score([image], tmp_path / "s.csv", options=EngineOptions(bundle=str(exported), device="cpu", backend="onnxruntime",
                                                             precision="bf16", k=2), console=log)
    assert "note: precision bf16 was asked for; the networks run at fp32" in log.file.getvalue()


def test_without_real_data_inputs_are_synthetic_and_say_so(source: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "no-data"))  # named, and not there: no real data
    b = export_onnx(source, tmp_path / "b", models=["shufflenet_v2_x0_5_patch"])
    assert b.learners[0].file("onnx").extra["parity"]["inputs"].startswith("synthetic")
    assert b.segmentation.files[0].format == "torch" and len(b.segmentation.files) == 1
    app = typer.Typer()
    register(app)
    result = CliRunner().invoke(app, ["export", "onnx", str(source), "--out", str(tmp_path / "c"),
                                      "--model", "shufflenet_v2_x0_5_patch", "--model", "ensemble"])
    assert result.exit_code == 0, result.output  # the ensemble's inputs are vote fractions: never "synthetic"
    assert "note: the parity checks of shufflenet_v2_x0_5_patch ran on synthetic inputs" in result.output.replace("\n", " ")


def test_a_failed_export_leaves_no_copy_behind(source: Path, tmp_path: Path, cxr4_dir: Path) -> None:
    """Bad --model, --data or --random: a one-line error naming the cause; --out is not left half-made, so the
    corrected command runs at once."""
    app = typer.Typer()
    register(app)
    runner = CliRunner()
    out = tmp_path / "o"
    for args, needle in (
            (["--model", "nothere"], f"bundle {source} has no model(s) nothere"),
            (["--data", str(tmp_path / "nope")], "nope: not a data folder with lungseg/ and cxr4/"),
            (["--opset", "3"], "--opset must be from 13 to 20"),
    ):
        result = runner.invoke(app, ["export", "onnx", str(source), "--out", str(out), *args])
        assert result.exit_code == 2 and needle in result.output, result.output
        assert not out.exists()
    with pytest.raises(BundleError, match="max abs diff"):  # a parity failure after the copy was made
        export_onnx(source, out, models=["ensemble"], rtol=0.0, atol=0.0, data_dir=cxr4_dir.parent)
    assert not out.exists()
    given, link = tmp_path / "given", tmp_path / "link"  # an empty folder of the user's, and a link to it
    given.mkdir()
    link.symlink_to(given)
    for target in (given, link):
        with pytest.raises(BundleError, match="max abs diff"):  # the real error, not a cleanup error
            export_onnx(source, target, models=["ensemble"], rtol=0.0, atol=0.0, data_dir=cxr4_dir.parent)
        assert given.is_dir() and not any(given.iterdir()) and link.is_symlink()  # emptied, kept
    out.mkdir()
    out.chmod(0o750)  # not the source bundle folder's mode
    result = runner.invoke(app, ["export", "onnx", "--random", "resnet9000", "--out", str(out)])
    assert result.exit_code == 2 and "resnet9000" in result.output
    assert out.is_dir() and not any(out.iterdir())  # the user's empty folder: emptied again, not removed
    result = runner.invoke(app, ["export", "onnx", str(source), "--out", str(out), "--model", "ensemble",
                                 "--data", str(cxr4_dir.parent)])
    assert result.exit_code == 0, result.output
    assert load_bundle(out).ensemble.file("onnx").extra["parity"]["passed"]
    assert out.stat().st_mode & 0o777 == 0o750  # the user's folder keeps its permissions


def test_cli_exports_random_architectures_and_verifies(tmp_path: Path, cxr4_dir: Path) -> None:
    app = typer.Typer()
    register(app)
    runner = CliRunner()
    out = tmp_path / "r"
    result = runner.invoke(app, ["export", "onnx", "--random", "squeezenet1_1", "--out", str(out), "--model", "ensemble",
                                 "--model", "squeezenet1_1_patch", "--data", str(cxr4_dir.parent)])
    assert result.exit_code == 0, result.output
    b = load_bundle(out)
    assert [m.arch for m in b.learners] == ["squeezenet1_1"] and b.learners[0].file("onnx").extra["parity"]["passed"]
    verified = runner.invoke(app, ["export", "verify", str(out)])
    assert verified.exit_code == 0 and "bundle verified" in verified.output
    inside = runner.invoke(app, ["export", "onnx", str(out), "--out", str(out / "copy"), "--model", "ensemble"])
    assert inside.exit_code == 2 and "inside the bundle it would copy" in inside.output and not (out / "copy").exists()
    (out / "ensemble.onnx").write_bytes(b"tampered")
    refused = runner.invoke(app, ["export", "verify", str(out)])
    assert refused.exit_code == 1 and "ensemble.onnx: sha256 mismatch" in refused.output
    missing = runner.invoke(app, ["export", "verify", str(tmp_path / "nowhere")])
    assert missing.exit_code == 2 and "nowhere: no such bundle folder" in missing.output  # nothing to check
    not_one = runner.invoke(app, ["export", "verify", str(tmp_path)])
    assert not_one.exit_code == 2 and "no bundle.json in it (not a bundle folder)" in not_one.output
    by_file = runner.invoke(app, ["export", "verify", str(out / "bundle.json")])  # as load_bundle takes it
    assert by_file.exit_code == 1 and "ensemble.onnx: sha256 mismatch" in by_file.output
    # A failed export leaves no folder it made, --out's parents included.
    unknown = runner.invoke(app, ["export", "onnx", "--random", "nosuch", "--out", str(tmp_path / "new" / "x")])
    assert unknown.exit_code == 2 and "unknown model 'nosuch'" in unknown.output and not (tmp_path / "new").exists()
    shipped = runner.invoke(app, ["export", "verify"])  # no folder: the package's own bundle
    assert shipped.exit_code == 0 and "bundle verified" in shipped.output and "ensemble.pt" in shipped.output


@pytest.mark.slow
def test_sigterm_mid_export_undoes_it(tmp_path: Path, cxr4_dir: Path) -> None:
    """A batch scheduler's stop during an export into a new folder: exit 143, and neither the copy, the folders
    made above it, nor the random bundle made beside it are left (a rerun of the command works at once)."""
    out = tmp_path / "deep" / "b"
    cli = "from patchflannel.cli import app; from patchflannel.cli.export import register; register(app); app()"
    proc = subprocess.Popen([sys.executable, "-c", cli, "export", "onnx", "--random", "squeezenet1_1", "--out", str(out),
                             "--data", str(cxr4_dir.parent)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while not (out / "bundle.json").exists():  # the copy is made: the export is under way
        assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
        assert time.monotonic() < deadline, "the export did not start in time"
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode == 143 and "terminated (SIGTERM): the export was undone" in output, output
    assert not (tmp_path / "deep").exists()


@pytest.mark.slow
def test_inception_is_exported_without_its_auxiliary_head(tmp_path: Path, cxr4_dir: Path) -> None:
    random_bundle(tmp_path, segmentation="fcdensenet56", learners=("inception_v3",))
    b = export_onnx(tmp_path, models=["inception_v3_patch"], data_dir=cxr4_dir.parent)
    f = b.learners[0].file("onnx")
    assert f.extra["parity"]["passed"]
    model = onnx.load(str(b.path_of(f)), load_external_data=False)
    names = [i.name for i in model.graph.initializer]
    nodes = [n.name for n in model.graph.node]
    assert len(model.graph.output) == 1
    assert not any("AuxLogits" in n for n in names + nodes)
    assert [o.type.tensor_type.shape.dim[1].dim_value for o in model.graph.output] == [4]


@pytest.mark.slow
def test_the_five_flannel_architectures_export_with_parity(tmp_path: Path, cxr4_dir: Path) -> None:
    random_bundle(tmp_path, segmentation="fcdensenet103", learners=FLANNEL_LEARNERS)
    b = export_onnx(tmp_path, data_dir=cxr4_dir.parent)
    assert [m.arch for m in b.learners] == list(FLANNEL_LEARNERS)
    for entry in b.models():
        parity = entry.file("onnx").extra["parity"]
        assert parity["passed"], (entry.name, parity)
        assert parity["inputs"].startswith("real: ") or entry is b.ensemble
    print(json.dumps({m.name: m.file("onnx").extra["parity"] for m in b.models()}, indent=1))


@pytest.mark.slow
def test_default_bundle_exports(tmp_path: Path, cxr4_dir: Path) -> None:
    if not (default_bundle_path() / "bundle.json").is_file():
        pytest.skip(f"no default bundle at {default_bundle_path()} yet")
    b = export_onnx(None, tmp_path / "b", data_dir=cxr4_dir.parent)
    assert all(m.file("onnx").extra["parity"]["passed"] for m in b.models())
    b = export_onnx(b, precision="fp16", data_dir=cxr4_dir.parent)  # TensorRT 11's inputs: within fp16 tolerance
    assert all(m.file("onnx", "fp16").extra["parity"]["passed"] for m in b.models())


def test_default_bundle_is_never_written_in_place() -> None:
    """The default bundle lives in the installed package: exporting needs a copy, and asking the engine for
    its ONNX files says how to make them."""
    from patchflannel.engine.engine import Engine

    before = sorted(p.name for p in default_bundle_path().rglob("*"))
    with pytest.raises(BundleError, match="part of the installed package"):
        export_onnx()
    with pytest.raises(BundleError, match="patchflannel export onnx"):
        Engine.from_bundle(backend="onnxruntime", device="cpu")
    assert sorted(p.name for p in default_bundle_path().rglob("*")) == before
