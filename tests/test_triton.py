"""Triton repository: every config parses with Triton's schema, tensor names chain, python stages use our ops."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="tritonclient[grpc] not installed")

from patchflannel.bundle import add_file, load_bundle, random_bundle, write_bundle
from patchflannel.data.shared import DATA_ENV
from patchflannel.errors import BundleError, ConfigError
from patchflannel.export.onnx import export_onnx
from patchflannel.export.triton import (
    ENSEMBLE,
    MODEL_PY,
    export_triton,
    preprocess_stage,
    sampler_stage,
    validate_repository,
    votes_stage,
)
from patchflannel.io import read_image
from patchflannel.ops.preprocess import normalize
from patchflannel.ops.sampler import draw_patches


@pytest.fixture(scope="module")
def onnx_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tb")
    random_bundle(root, segmentation="fcdensenet56", learners=("squeezenet1_1", "squeezenet1_1"), seed=2)
    with pytest.MonkeyPatch.context() as mp:  # synthetic parity inputs (quick): no data folder to be found
        mp.setenv(DATA_ENV, str(root / "no-data"))
        export_onnx(root)
    return root


@pytest.fixture
def repo(onnx_bundle: Path, tmp_path: Path) -> Path:
    return export_triton(onnx_bundle, tmp_path / "repo")


def test_repository_parses_and_chains(repo: Path, onnx_bundle: Path) -> None:
    b = load_bundle(onnx_bundle)
    configs = validate_repository(repo)
    k = b.preprocessing["k"]
    assert set(configs) == {ENSEMBLE, "preprocess", "segmentation", "sampler", "votes", "flannel",
                            "learner_0_squeezenet1_1", "learner_1_squeezenet1_1"}
    steps = [s.model_name for s in configs[ENSEMBLE].ensemble_scheduling.step]
    assert steps[:3] == ["preprocess", "segmentation", "sampler"] and steps[-2:] == ["votes", "flannel"]
    assert [o.name for o in configs[ENSEMBLE].output] == ["FALLBACK", "BLANK", "CONFIDENCES", "LOGITS"]
    for i in range(2):
        learner = configs[f"learner_{i}_squeezenet1_1"]
        assert learner.platform == "onnxruntime_onnx" and learner.max_batch_size >= k
        assert list(learner.input[0].dims) == [3, 224, 224]
        assert (repo / learner.name / "1" / "model.onnx").read_bytes() == b.path_of(b.learners[i].file("onnx")).read_bytes()
    assert (repo / "sampler" / "1" / "model.py").read_text() == MODEL_PY
    compile(MODEL_PY, "model.py", "exec")
    with pytest.raises(BundleError, match="exists and is not empty"):
        export_triton(onnx_bundle, repo)
    with pytest.raises(ConfigError, match=r"format \(--format\) must be one of"):
        export_triton(onnx_bundle, repo.parent / "x", model_format="tflite")
    with pytest.raises(BundleError, match=r"no tensorrt file for segmentation, .*; make them with `patchflannel export tensorrt BUNDLE` \(builds in place"):
        export_triton(onnx_bundle, repo.parent / "y", model_format="tensorrt")
    assert not (repo.parent / "y").exists()
    given, link = repo.parent / "given", repo.parent / "link"  # a user's private empty folder, and a link to one
    given.mkdir(mode=0o700)
    (repo.parent / "target").mkdir()
    link.symlink_to(repo.parent / "target")
    for out in (given, link):
        assert set(validate_repository(export_triton(onnx_bundle, out))) == set(validate_repository(repo))
    assert given.stat().st_mode & 0o777 == 0o700 and link.is_symlink()
    assert not list(repo.parent.glob(".*.building"))


def _record_engines(root: Path, learner_max: list[int]) -> None:
    """Record a TensorRT engine for every network of the bundle at ``root`` as `export tensorrt` records one
    (its profile). The .plan files are stand-ins (copies of the ONNX files; TensorRT is absent here): the
    Triton export copies them and configures from the records, it never runs them."""
    b = load_bundle(root)
    for i, entry in enumerate(b.models()):
        src = entry.file("onnx", "fp32")
        rel = src.path.removesuffix(".onnx") + ".fp16.plan"
        shutil.copyfile(b.path_of(src), root / rel)
        largest = learner_max[i - 1] if entry in b.learners else 16
        entry.files.append(add_file(root, rel, "tensorrt", precision="fp16",
                                    profile={entry.inputs[0]["name"]: {"min": 1, "opt": 1, "max": largest}}))
    write_bundle(b)


def test_tensorrt_learners_take_at_most_their_engines_batch(onnx_bundle: Path, tmp_path: Path) -> None:
    """Triton refuses a TensorRT model whose max_batch_size is above its engine's profile."""
    root = tmp_path / "bundle"
    shutil.copytree(onnx_bundle, root)
    k = load_bundle(root).preprocessing["k"]
    _record_engines(root, [4 * k, 2 * k])
    configs = validate_repository(export_triton(root, tmp_path / "repo", model_format="tensorrt", k_max=8 * k))
    assert configs["learner_0_squeezenet1_1"].platform == "tensorrt_plan"
    assert [configs[f"learner_{i}_squeezenet1_1"].max_batch_size for i in range(2)] == [4 * k, 2 * k]
    assert configs["segmentation"].max_batch_size == 16 and configs["flannel"].max_batch_size == 16
    shutil.rmtree(root)
    shutil.copytree(onnx_bundle, root)
    _record_engines(root, [k - 1, 4 * k])
    with pytest.raises(BundleError, match=f"takes at most {k - 1} patches, fewer than an image's K={k}.*--k-max"):
        export_triton(root, tmp_path / "repo2", model_format="tensorrt")
    with pytest.raises(ConfigError, match=f"--k-max {k - 1} is below the bundle's K={k}"):  # not raised silently
        export_triton(root, tmp_path / "repo3", k_max=k - 1)


def test_cli_format_picks_every_networks_files(onnx_bundle: Path, tmp_path: Path) -> None:
    import typer
    from typer.testing import CliRunner

    from patchflannel.cli.export import register

    app = typer.Typer()
    register(app)
    runner = CliRunner()
    result = runner.invoke(app, ["export", "triton", str(onnx_bundle), str(tmp_path / "t"), "--format", "tensorrt"])
    assert result.exit_code == 2 and "no tensorrt file for segmentation, " in result.output, result.output
    result = runner.invoke(app, ["export", "triton", str(onnx_bundle), str(tmp_path / "o"), "--format", "onnx"])
    assert result.exit_code == 0 and (tmp_path / "o" / "segmentation" / "1" / "model.onnx").is_file(), result.output


def test_broken_chains_and_bad_configs_are_reported(repo: Path) -> None:
    cfg = repo / ENSEMBLE / "config.pbtxt"
    cfg.write_text(cfg.read_text().replace('value: "patches"', 'value: "patchez"', 1))  # the sampler's output
    (repo / "votes" / "config.pbtxt").write_text('name: "votes"\nbackend: "python"\nmax_batch_sise: 0\n')
    (repo / "flannel" / "1" / "model.onnx").unlink()
    with pytest.raises(BundleError) as info:
        validate_repository(repo)
    msg = str(info.value)
    assert "step 3 (learner_0_squeezenet1_1): input 'patches' is produced by no earlier step" in msg
    assert "step 5 (votes): no model 'votes'" in msg
    assert "votes/config.pbtxt: not a valid Triton model config" in msg
    assert "flannel: version 1 has no model.onnx" in msg


def test_python_stages_compute_what_the_ops_compute(cxr4_dir: Path) -> None:
    b_pre = {"segmentation": {"size": 256, "equalize": True, "gamma": 0.5, "threshold": 0.5}, "image_size": 1024,
             "patch_size": 224, "k": 5, "min_lung_fraction": 0.01,
             "normalization": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
             "global": {"resize": 336, "crop": 224}}
    image = torch.from_numpy(read_image(next((cxr4_dir / "images" / "covid").iterdir())))
    pre = preprocess_stage(image, b_pre)
    assert pre["SEG_INPUT"].shape == (1, 1, 256, 256) and pre["IMAGE_FULL"].shape == (1024, 1024)
    assert pre["GLOBAL"].shape == (1, 3, 224, 224) and pre["BLANK"].tolist() == [False]
    assert preprocess_stage(torch.zeros(300, 300), b_pre)["BLANK"].tolist() == [True]  # the engine's blank_image
    logits = torch.full((1, 1, 256, 256), -5.0)
    logits[..., 64:192, 32:128] = 5.0  # two lung-like boxes, one with a hole, and a speck outside them
    logits[..., 64:192, 150:230] = 5.0
    logits[..., 100:110, 60:70] = -5.0
    logits[..., 10:13, 10:13] = 5.0
    out = sampler_stage(pre["IMAGE_FULL"], logits, seed=7, preprocessing=b_pre)
    mask = torch.zeros(1, 1024, 1024, dtype=torch.bool)  # post-processed as the engine does: hole filled, speck gone
    mask[:, 256:768, 128:512] = True
    mask[:, 256:768, 600:920] = True
    direct = draw_patches(pre["IMAGE_FULL"][None], mask, [7], k=5)
    assert torch.equal(out["PATCHES"], normalize(direct["patches"][0], b_pre)) and not bool(out["FALLBACK"][0])
    votes = votes_stage([torch.tensor([[3.0, 0, 0, 0], [0, 2.0, 0, 0], [4.0, 0, 0, 0]]), torch.zeros(1, 4)],
                        ["patch", "global"])["CONFIDENCES"]
    assert torch.allclose(votes, torch.tensor([[[2 / 3, 1 / 3, 0, 0], [0.25, 0.25, 0.25, 0.25]]]))
