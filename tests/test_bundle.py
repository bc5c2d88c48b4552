"""The bundle: round trip through load_torch_model, and every kind of damage refused with a clear message."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import onnx
import pytest
import torch
from onnx import TensorProto, helper

from patchflannel.bundle import (
    SCHEMA_VERSION,
    Bundle,
    add_file,
    default_preprocessing,
    entry_from_module,
    load_bundle,
    load_torch_model,
    random_bundle,
    write_bundle,
)
from patchflannel.classes import CLASSES
from patchflannel.errors import BundleError, ConfigError
from patchflannel.models import get_model


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small random bundle, written once; tests damage copies of it."""
    root = tmp_path_factory.mktemp("bundle")
    random_bundle(root, segmentation="fcdensenet56", learners=("shufflenet_v2_x0_5", "squeezenet1_1"), seed=3)
    return root


@pytest.fixture
def bundle_dir(pristine: Path, tmp_path: Path) -> Path:
    out = tmp_path / "b"
    shutil.copytree(pristine, out)
    return out


def _spec(root: Path) -> dict:
    return json.loads((root / "bundle.json").read_text())


def _write_spec(root: Path, data: dict) -> None:
    (root / "bundle.json").write_text(json.dumps(data))


def _tiny_onnx(path: Path) -> None:
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def _refused(root: Path) -> str:
    with pytest.raises(BundleError) as info:
        load_bundle(root)
    return str(info.value)


def test_round_trip_outputs_equal_the_saved_modules(tmp_path: Path) -> None:
    torch.manual_seed(11)
    seg, learner, ens = get_model("fcdensenet56").eval(), get_model("resnet18").eval(), get_model("flannel", n_learners=1).eval()
    bundle = Bundle(
        root=tmp_path, classes=list(CLASSES), preprocessing=default_preprocessing(),
        segmentation=entry_from_module("segmentation", "fcdensenet56", seg, tmp_path, "seg.pt"),
        learners=[entry_from_module("resnet18_patch", "resnet18", learner, tmp_path, "l/resnet18.pt", mode="patch")],
        ensemble=entry_from_module("ensemble", "flannel", ens, tmp_path, "ens.pt", arch_config={"n_learners": 1}),
    )
    write_bundle(bundle)
    loaded = load_bundle(tmp_path)
    assert [m.name for m in loaded.models()] == ["segmentation", "resnet18_patch", "ensemble"]
    assert loaded.learners[0].mode == "patch"
    assert loaded.preprocessing == default_preprocessing()
    x_seg, x_cls = torch.rand(2, 1, 64, 64), torch.randn(3, 3, 224, 224)
    x_ens = torch.softmax(torch.randn(4, 1, 4), -1)
    with torch.no_grad():
        for original, entry, x in ((seg, loaded.segmentation, x_seg), (learner, loaded.learners[0], x_cls),
                                   (ens, loaded.ensemble, x_ens)):
            restored = load_torch_model(loaded, entry)
            assert not restored.training
            assert torch.equal(restored(x), original(x)), entry.name


def test_random_bundle_is_loadable_and_segmentation_only_bundles_are_allowed(pristine: Path, tmp_path: Path) -> None:
    b = load_bundle(pristine)
    assert [m.arch for m in b.learners] == ["shufflenet_v2_x0_5", "squeezenet1_1"]
    assert b.ensemble is not None and b.ensemble.arch_config == {"n_learners": 2}
    assert b.versions["torch"] == torch.__version__
    seg_only = Bundle(root=tmp_path, classes=list(CLASSES), preprocessing=default_preprocessing(),
                      segmentation=entry_from_module("segmentation", "fcdensenet56", get_model("fcdensenet56"),
                                                     tmp_path, "seg.pt"),
                      learners=[], ensemble=None)
    write_bundle(seg_only)
    assert load_bundle(tmp_path / "bundle.json").learners == []
    for kwargs, said in ((dict(learners=("flannel",)), "'flannel' is a network of the ensemble family; a classifier"),
                         (dict(learners=("fcdensenet56",)), "of the segmentation family; a classifier network"),
                         (dict(segmentation="resnet18"), "'resnet18' is a network of the classifier family; a "
                                                         "segmentation network")):  # was a traceback of the network
        with pytest.raises(ConfigError, match=said):
            random_bundle(tmp_path / "wrong", **kwargs)
    assert not (tmp_path / "wrong").exists()


def test_tampered_file_is_refused(bundle_dir: Path) -> None:
    target = bundle_dir / "ensemble.pt"
    data = bytearray(target.read_bytes())
    data[-10] ^= 0xFF
    target.write_bytes(bytes(data))
    msg = _refused(bundle_dir)
    assert "ensemble.pt: sha256 mismatch" in msg


def test_missing_file_is_refused(bundle_dir: Path) -> None:
    (bundle_dir / "learners" / "1_squeezenet1_1.pt").unlink()
    assert "learners/1_squeezenet1_1.pt: file missing" in _refused(bundle_dir)


def test_a_file_outside_the_bundle_folder_is_refused(bundle_dir: Path) -> None:
    """A bundle names its files relative to its folder: one elsewhere (a copy or a Triton export would depend
    on it silently) is refused, even with the right hash."""
    import json
    import shutil

    outside = bundle_dir.parent / f"{bundle_dir.name}-ensemble.pt"
    shutil.copyfile(bundle_dir / "ensemble.pt", outside)
    spec = json.loads((bundle_dir / "bundle.json").read_text())
    for path in (f"../{outside.name}", str(outside)):
        spec["ensemble"]["files"][0]["path"] = path
        (bundle_dir / "bundle.json").write_text(json.dumps(spec))
        assert f"{path}: outside the bundle folder" in _refused(bundle_dir)


def test_every_problem_is_reported_at_once(bundle_dir: Path) -> None:
    (bundle_dir / "segmentation.pt").unlink()
    (bundle_dir / "ensemble.pt").write_bytes(b"PK\x03\x04 changed")
    msg = _refused(bundle_dir)
    assert "segmentation.pt: file missing" in msg and "ensemble.pt: sha256 mismatch" in msg


@pytest.mark.parametrize("version", [0, 2, "1", None])
def test_wrong_schema_version_is_refused(bundle_dir: Path, version: object) -> None:
    data = _spec(bundle_dir)
    data["schema_version"] = version
    _write_spec(bundle_dir, data)
    msg = _refused(bundle_dir)
    assert f"schema version {version!r} is not supported" in msg and f"reads {SCHEMA_VERSION}" in msg


def test_segmentation_without_equalisation_is_refused(bundle_dir: Path) -> None:
    data = _spec(bundle_dir)
    data["preprocessing"]["segmentation"]["equalize"] = False
    _write_spec(bundle_dir, data)
    assert "preprocessing.segmentation.equalize must be true" in _refused(bundle_dir)


def test_onnx_file_declared_torch_is_refused(bundle_dir: Path) -> None:
    (bundle_dir / "nets").mkdir()
    _tiny_onnx(bundle_dir / "nets" / "ensemble.pt")
    data = _spec(bundle_dir)
    data["ensemble"]["files"] = [vars(add_file(bundle_dir, "nets/ensemble.pt", "torch"))]
    _write_spec(bundle_dir, data)
    assert "nets/ensemble.pt: declared torch but is not a torch zip archive" in _refused(bundle_dir)  # named in the bundle


@pytest.mark.parametrize("content", [b"garbage, not a model\n", b"\x08\x07", None])
def test_non_onnx_file_declared_onnx_is_refused(bundle_dir: Path, content: bytes | None) -> None:
    path = bundle_dir / "ensemble.onnx"
    if content is None:
        shutil.copy(bundle_dir / "ensemble.pt", path)  # a torch archive under an ONNX name
    else:
        path.write_bytes(content)
    data = _spec(bundle_dir)
    data["ensemble"]["files"].append(vars(add_file(bundle_dir, "ensemble.onnx", "onnx")))
    _write_spec(bundle_dir, data)
    msg = _refused(bundle_dir)
    assert "ensemble.onnx: declared onnx but" in msg


def test_a_real_onnx_file_declared_onnx_is_accepted(bundle_dir: Path) -> None:
    _tiny_onnx(bundle_dir / "ensemble.onnx")
    data = _spec(bundle_dir)
    data["ensemble"]["files"].append(vars(add_file(bundle_dir, "ensemble.onnx", "onnx")))
    _write_spec(bundle_dir, data)
    assert load_bundle(bundle_dir).ensemble.file("onnx").path == "ensemble.onnx"


def test_unknown_format_is_refused(bundle_dir: Path) -> None:
    data = _spec(bundle_dir)
    data["segmentation"]["files"][0]["format"] = "keras"
    _write_spec(bundle_dir, data)
    assert "segmentation.pt: unknown format 'keras'" in _refused(bundle_dir)


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda d: "{not json", "not valid JSON"),
        (lambda d: "[1, 2]", "expected a JSON object, got list"),
        (lambda d: {k: v for k, v in d.items() if k != "learners"}, "missing key(s) learners"),
        (lambda d: {**d, "learners": {"a": 1}}, "'learners' must be a list"),
        (lambda d: {**d, "classes": list(reversed(CLASSES))}, "differ from this package's"),
        (lambda d: {**d, "segmentation": {k: v for k, v in d["segmentation"].items() if k != "arch"}},
         "malformed model entry 'segmentation'"),
        (lambda d: {**d, "learners": [d["learners"][0], "resnet18"]}, "malformed model entry 'learners[1]'"),
        (lambda d: {**d, "ensemble": {**d["ensemble"], "files": [{"format": "torch"}]}},
         "malformed model entry 'ensemble'"),
    ],
)
def test_malformed_bundle_json_is_refused(bundle_dir: Path, edit, expected: str) -> None:
    new = edit(_spec(bundle_dir))
    (bundle_dir / "bundle.json").write_text(new if isinstance(new, str) else json.dumps(new))
    assert expected in _refused(bundle_dir)


def test_not_a_bundle_and_missing_format_are_named(tmp_path: Path, pristine: Path) -> None:
    assert "no bundle.json found" in _refused(tmp_path)
    assert "nope: no such bundle folder" in _refused(tmp_path / "nope")
    (tmp_path / "a_file").write_text("x")
    assert "a_file: not a folder" in _refused(tmp_path / "a_file")
    with pytest.raises(BundleError, match="has no onnx file .*has: torch/fp32"):
        load_bundle(pristine).segmentation.file("onnx")


def _edit(key: str, value: object):  # noqa: ANN202 - an edit of bundle.json's data
    def apply(data: dict) -> None:
        *path, last = key.split(".")
        node = data
        for part in path:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if value is _DELETE:
            del node[last]
        else:
            node[int(last) if isinstance(node, list) else last] = value
    return apply


_DELETE = object()
HAND_EDITS = [  # what a hand edit of bundle.json can get wrong, and the line that names it
    (_edit("preprocessing.normalization", _DELETE), "preprocessing.normalization.mean missing"),
    (_edit("preprocessing.patch_size", "abc"), "preprocessing.patch_size is 'abc'; it takes a whole number"),
    (_edit("preprocessing.patch_size", 2048), "preprocessing.patch_size is 2048; it takes a whole number from 1 to image_size"),
    (_edit("preprocessing.k", 0), "preprocessing.k is 0"),
    (_edit("preprocessing.global", "336"), "preprocessing.global is '336'; it takes an object"),
    (_edit("preprocessing.normalization.std", [0.2, 0, 0.2]), "preprocessing.normalization.std is [0.2, 0, 0.2]"),
    (lambda d: d["learners"].pop(), "the ensemble weighs 2 learners (n_learners), but the bundle lists 1"),
    (_edit("learners", []), "the ensemble weighs 2 learners (n_learners), but the bundle lists 0"),
    (_edit("ensemble.arch_config.n_learners", "2"), "the ensemble weighs '2' learners"),
    (_edit("ensemble.arch_config", [2]), "ensemble: arch_config is [2]; it takes an object"),
    (_edit("preprocessing.segmentation", "256"), "preprocessing.segmentation is '256'; it takes an object"),
    (_edit("learners.0.inputs.0.shape", 224), "input shape 224 does not fit"),
    (_edit("learners.0.arch", ["x"]), "architecture ['x'] is not registered"),
    (_edit("learners.0.arch", "nosuch"), "architecture 'nosuch' is not registered"),
    (_edit("learners.0.mode", "Patch"), "mode 'Patch'; it takes 'patch' or 'global'"),
    (_edit("learners.0.files.0.precision", "fp64"), "precision 'fp64'; it takes fp32, fp16, bf16"),
    (_edit("learners.1.name", "shufflenet_v2_x0_5_patch"), "model name 'shufflenet_v2_x0_5_patch' is used twice"),
    (_edit("learners.0.inputs.0.shape", ["batch", 3, 256, 256]), "input shape ['batch', 3, 256, 256] does not fit"),
]


@pytest.mark.parametrize(("edit", "said"), HAND_EDITS)
def test_a_hand_edited_bundle_json_is_refused_naming_what_is_wrong(bundle_dir: Path, edit, said: str) -> None:
    """Each value the engine reads is checked as the bundle loads (`export verify` says so, exit 1; `score`
    exits 2 naming it), instead of a KeyError or a shape error from deep in a run."""
    data = _spec(bundle_dir)
    edit(data)
    _write_spec(bundle_dir, data)
    assert said in _refused(bundle_dir)


def test_a_bundle_load_bundle_would_refuse_is_not_written(tmp_path: Path) -> None:
    seg = entry_from_module("segmentation", "fcdensenet56", get_model("fcdensenet56"), tmp_path, "seg.pt")
    pre = {**default_preprocessing(), "k": 0}
    bundle = Bundle(root=tmp_path, classes=list(CLASSES), preprocessing=pre, segmentation=seg, learners=[], ensemble=None)
    with pytest.raises(BundleError, match="preprocessing.k is 0"):
        write_bundle(bundle)
    assert not (tmp_path / "bundle.json").exists()


def test_export_verify_lists_every_problem_of_a_hand_edited_bundle(bundle_dir: Path) -> None:
    import typer
    from typer.testing import CliRunner

    from patchflannel.cli.export import register

    data = _spec(bundle_dir)
    data["learners"].pop()
    data["learners"][0]["files"][0]["precision"] = "fp64"
    _write_spec(bundle_dir, data)
    app = typer.Typer()
    register(app)
    result = CliRunner().invoke(app, ["export", "verify", str(bundle_dir)])
    assert result.exit_code == 1 and "bundle verified" not in result.output
    assert "the ensemble weighs 2 learners (n_learners), but the bundle lists 1" in result.output and "precision 'fp64'" in result.output


def test_weights_of_another_architecture_are_refused(bundle_dir: Path) -> None:
    """By every command that loads them, export verify included (its hash and format checks pass), in a line."""
    import typer
    from typer.testing import CliRunner

    from patchflannel.cli.export import register

    data = _spec(bundle_dir)
    data["learners"][0]["arch"] = "resnet18"
    _write_spec(bundle_dir, data)
    b = load_bundle(bundle_dir)
    with pytest.raises(BundleError, match="weights do not fit architecture 'resnet18'") as caught:
        load_torch_model(b, b.learners[0])
    assert len(str(caught.value)) < 400 and "120 of its 122 tensors missing (e.g. " in str(caught.value)
    assert "1 of another shape (e.g. fc.weight (4, 1024) for (4, 512))" in str(caught.value)
    app = typer.Typer()
    register(app)
    result = CliRunner().invoke(app, ["export", "verify", str(bundle_dir)])
    assert result.exit_code == 1 and "weights do not fit architecture 'resnet18'" in result.output, result.output
    assert "bundle verified" not in result.output


def _run(root: Path, arch: str, module: torch.nn.Module, **info: object) -> Path:
    root.mkdir(parents=True)
    torch.save(module.state_dict(), root / "best.pt")
    (root / "run.json").write_text(json.dumps({"arch": arch, "arch_config": {}, "best": {"val_macro_f1": 0.5},
                                               "best_epoch": 3, **info}))
    return root


def test_make_bundle_from_runs_and_its_refusals(tmp_path: Path) -> None:
    from patchflannel.export.build import make_bundle

    torch.manual_seed(5)
    seg = _run(tmp_path / "seg", "fcdensenet56", get_model("fcdensenet56"), task="segmentation")
    learner = get_model("squeezenet1_1").eval()
    digests = {"train": "a" * 64, "val": "b" * 64}  # the learner's train and val images (file names and labels)
    lrn = _run(tmp_path / "lrn", "squeezenet1_1", learner, mode="max", config={"mode": "global"}, data=digests)
    ens = _run(tmp_path / "ens", "flannel", get_model("flannel", n_learners=1), arch_config={"n_learners": 1},
               learners=["squeezenet1_1"])
    b = make_bundle(tmp_path / "out", segmentation_run=seg, learner_runs=[lrn], ensemble_run=ens, name="t")
    assert b.learners[0].mode == "global" and b.learners[0].inputs[0]["shape"] == ["batch", 3, 224, 224]
    assert b.training["learners"][0]["best"] == {"val_macro_f1": 0.5} and b.training["ensemble"]["best_epoch"] == 3
    assert load_bundle(tmp_path / "out").training["learners"][0]["data"] == digests
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(load_torch_model(b, b.learners[0])(x), learner(x))
    with pytest.raises(BundleError, match="exists and is not empty"):
        make_bundle(tmp_path / "out", segmentation_run=seg)
    # The ensemble's learners, as cv names them, in another order or mode than the runs given: refused.
    patch = _run(tmp_path / "patch", "squeezenet1_1", learner, mode="max", config={"mode": "patch"})
    ens2 = _run(tmp_path / "ens2", "flannel", get_model("flannel", n_learners=2), arch_config={"n_learners": 2},
                learners=["squeezenet1_1_patch", "squeezenet1_1_global"])
    with pytest.raises(ConfigError, match=r"trained on learners \['squeezenet1_1_patch', 'squeezenet1_1_global'\], "
                                          r"given \['squeezenet1_1_global', 'squeezenet1_1_patch'\]"):
        make_bundle(tmp_path / "o6", segmentation_run=seg, learner_runs=[lrn, patch], ensemble_run=ens2)
    with pytest.raises(ConfigError, match="trained on learners"):
        make_bundle(tmp_path / "o6", segmentation_run=seg, learner_runs=[patch, patch], ensemble_run=ens2)
    assert [m.mode for m in make_bundle(tmp_path / "o6", segmentation_run=seg, learner_runs=[patch, lrn],
                                        ensemble_run=ens2).learners] == ["patch", "global"]
    # Numbered as a bundle names two runs of one architecture (train ensemble on its scores records them so).
    ens3 = _run(tmp_path / "ens3", "flannel", get_model("flannel", n_learners=2), arch_config={"n_learners": 2},
                learners=["0_squeezenet1_1_global", "1_squeezenet1_1_patch"])
    with pytest.raises(ConfigError, match="trained on learners"):
        make_bundle(tmp_path / "o7", segmentation_run=seg, learner_runs=[patch, lrn], ensemble_run=ens3)
    make_bundle(tmp_path / "o7", segmentation_run=seg, learner_runs=[lrn, patch], ensemble_run=ens3)
    with pytest.raises(ConfigError, match="ensemble over 1 learners, but 2 learner runs"):
        make_bundle(tmp_path / "o2", segmentation_run=seg, learner_runs=[lrn, lrn], ensemble_run=ens)
    with pytest.raises(ConfigError, match="is a classifier model, given as segmentation"):
        make_bundle(tmp_path / "o3", segmentation_run=lrn)
    wrong = _run(tmp_path / "wrong", "resnet18", get_model("squeezenet1_1"), mode="patch")
    with pytest.raises(BundleError, match="weights do not fit architecture 'resnet18'"):
        make_bundle(tmp_path / "o4", segmentation_run=seg, learner_runs=[wrong])
    assert not (tmp_path / "o4").exists() and not list(tmp_path.glob(".o4*"))  # never half-written
    with pytest.raises(BundleError, match="weights do not fit architecture 'resnet18'"):
        make_bundle(tmp_path / "deep" / "er" / "o4", segmentation_run=seg, learner_runs=[wrong])
    assert not (tmp_path / "deep").exists()  # nor the folders made above it
    with pytest.raises(ConfigError, match="not a finished training run"):
        make_bundle(tmp_path / "o5", segmentation_run=tmp_path)
    (tmp_path / "empty").mkdir()  # an empty folder given through a link (a cluster's scratch): filled in place
    (tmp_path / "link").symlink_to(tmp_path / "empty", target_is_directory=True)
    make_bundle(tmp_path / "link", segmentation_run=seg)
    assert (tmp_path / "link").is_symlink() and (tmp_path / "empty" / "bundle.json").is_file()


def test_make_bundle_takes_a_bundle_s_segmentation_and_checks_the_learners_masks(tmp_path: Path) -> None:
    """Patch learners trained on the default bundle's masks (segmentation_bundle: null) go with its model, by
    default; one given another segmentation model than made its masks is refused."""
    import typer
    from typer.testing import CliRunner

    from patchflannel.bundle import default_bundle_path
    from patchflannel.cli.export import register
    from patchflannel.export.build import make_bundle
    from patchflannel.training.mask_cache import model_key

    default = load_bundle(default_bundle_path())
    made_by = {"segmentation_model": model_key(default), "config": {"mode": "patch", "segmentation_bundle": None}}
    learner = _run(tmp_path / "lrn", "squeezenet1_1", get_model("squeezenet1_1"), mode="patch", **made_by)
    app = typer.Typer()
    register(app)
    result = CliRunner().invoke(app, ["export", "bundle", "--learner", str(learner), "--out", str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    b = load_bundle(tmp_path / "b")
    assert b.path_of(b.segmentation.file("torch")).read_bytes() == default.path_of(
        default.segmentation.file("torch")).read_bytes()
    assert model_key(b) == model_key(default) and b.training["segmentation"]["best_epoch"] == 20  # its record kept
    torch.manual_seed(1)
    other = _run(tmp_path / "seg", "fcdensenet56", get_model("fcdensenet56"), task="segmentation")
    with pytest.raises(ConfigError, match=r"lrn: trained on lung masks of another segmentation model .* "
                                          r"segmentation_bundle: None"):
        make_bundle(tmp_path / "o", segmentation_run=other, learner_runs=[learner])
    assert not (tmp_path / "o").exists()


def test_default_preprocessing_is_the_spec_s() -> None:
    """SPEC.md's sizes and normalisation: segmentation at 256 (equalised, gamma 0.5, threshold 0.5), images at
    1024, K=100 patches of 224, FLANNEL's global view 336 cropped to 224, ImageNet mean and std."""
    from patchflannel.bundle import default_preprocessing

    pre = default_preprocessing()
    assert pre["segmentation"] == {"size": 256, "equalize": True, "gamma": 0.5, "threshold": 0.5}
    assert (pre["image_size"], pre["patch_size"], pre["k"]) == (1024, 224, 100)
    assert pre["global"] == {"resize": 336, "crop": 224}
    assert pre["normalization"] == {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
