"""Base learner datasets, mask cache and training on real images (tiny and fast)."""

from __future__ import annotations

import csv
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from patchflannel.bundle import default_bundle_path, default_preprocessing, random_bundle
from patchflannel.data import make_splits, read_manifest, write_manifest
from patchflannel.errors import ConfigError, ManifestError
from patchflannel.io import read_image
from patchflannel.ops.preprocess import resize
from patchflannel.training.datasets import Item, LearnerDataset, prepare_items, read_splits
from patchflannel.training.learners import load_config, load_learner, predict_items, train_learner

PRE = default_preprocessing()


def small_splits(cxr4_dir: Path, out: Path, per_class: int, folds: int = 2) -> Path:
    """A splits file over ``per_class`` real images of each class (patient-grouped, seeded)."""
    manifest = read_manifest(cxr4_dir / "manifest.csv")
    by: dict[str, list] = {}
    for r in manifest.rows:
        by.setdefault(r["label"], []).append(r)
    rows = [r for rs in by.values() for r in rs[:: max(1, len(rs) // per_class)][:per_class]]
    return write_manifest(make_splits(rows, seed=0, test_frac=0.2, folds=folds), out, manifest.columns + ["split", "fold"])


def test_global_dataset_is_seeded_and_normalised(cxr4_dir: Path, tmp_path: Path) -> None:
    rows = read_manifest(cxr4_dir / "manifest.csv").rows[:3]
    items = prepare_items(rows, "global", tmp_path, PRE)
    assert np.load(items[0].array_file).shape == (336, 336) and np.load(items[0].array_file).dtype == np.uint8
    again = prepare_items(rows, "global", tmp_path, PRE)  # cache hit: same files, not rewritten
    assert [i.array_file for i in again] == [i.array_file for i in items]
    train = LearnerDataset(items, "global", PRE, train=True, seed=0)
    train.set_epoch(0)
    a, label = train[0]
    assert a.shape == (3, 224, 224) and label == items[0].label
    grey = a[0] * PRE["normalization"]["std"][0] + PRE["normalization"]["mean"][0]
    assert torch.allclose(a[2] * PRE["normalization"]["std"][2] + PRE["normalization"]["mean"][2], grey, atol=1e-5)
    assert float(grey.min()) >= -1e-5 and float(grey.max()) <= 1 + 1e-5
    assert torch.equal(train[0][0], a)  # same epoch, same draw
    draws = set()
    for epoch in range(1, 6):
        train.set_epoch(epoch)
        draws.add(hashlib.sha256(train[0][0].numpy().tobytes()).hexdigest())
    assert len(draws) > 1  # other epochs crop/flip differently
    test = LearnerDataset(items, "global", PRE, train=False)
    x, _ = test[0]
    full = torch.from_numpy(np.load(items[0].array_file)).float() / 255
    assert x.shape == (1, 3, 224, 224)
    assert torch.allclose(x[0, 0] * PRE["normalization"]["std"][0] + PRE["normalization"]["mean"][0],
                          full[56:280, 56:280], atol=1e-5)


def test_patch_dataset_draws_lung_centred_patches(cxr4_dir: Path, tmp_path: Path) -> None:
    row = read_manifest(cxr4_dir / "manifest.csv").rows[0]
    image = np.full((1024, 1024), 200, np.uint8)
    mask = np.zeros((256, 256), bool)
    mask[100:140, 20:60] = True  # lung pixels 1024-rows 400..560, cols 80..240
    np.save(tmp_path / "a.npy", image * np.kron(mask, np.ones((4, 4), bool)).astype(np.uint8))
    item = Item(row=row, label=0, sha256="ab" * 32, array_file=tmp_path / "a.npy", mask=mask)
    mean, std = PRE["normalization"]["mean"][0], PRE["normalization"]["std"][0]
    test = LearnerDataset([item], "patch", PRE, train=False, seed=0, k=12)
    x, _ = test[0]
    assert x.shape == (12, 3, 224, 224)
    lung = (x[:, 0] * std + mean) > 0.5
    assert bool(lung.flatten(1).any(1).all())  # every patch holds lung pixels
    assert torch.equal(test[0][0], x)  # fixed seed per image
    train = LearnerDataset([item], "patch", PRE, train=True, seed=0)
    train.set_epoch(0)
    t, _ = train[0]
    assert t.shape == (3, 224, 224) and bool(((t[0] * std + mean) > 0.3).any())
    train.set_epoch(1)
    assert not torch.equal(train[0][0], t)


def test_an_image_whose_mask_falls_back_is_cached_unmasked(cxr4_dir: Path, tmp_path: Path) -> None:
    """Too little lung to sample from: training draws from the whole image, unmasked, as the engine does."""
    from patchflannel.training.mask_cache import MaskCache

    rows = read_manifest(cxr4_dir / "manifest.csv").rows[:2]
    cache = MaskCache(tmp_path / "masks", random_bundle(tmp_path / "b", seed=0))
    tiny = np.zeros((256, 256), bool)
    tiny[100:102, 100:102] = True  # 4 of 65536 pixels: under min_lung_fraction
    sha = hashlib.sha256(Path(rows[0]["path"]).read_bytes()).hexdigest()
    cache.file(sha).parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(cache.file(sha), mask=tiny)  # a planted cache entry: this image's lung mask
    items = prepare_items(rows, "patch", tmp_path / "arrays", PRE, cache)
    whole = (resize(torch.from_numpy(read_image(rows[0]["path"])), 1024).clamp(0, 1) * 255).round().to(torch.uint8)
    assert np.array_equal(np.load(items[0].array_file), whole.numpy())
    other = np.load(items[1].array_file)  # a real mask: masked as before
    assert (other == 0).mean() > (whole.numpy() == 0).mean()


@pytest.mark.skipif(not (default_bundle_path() / "bundle.json").is_file(), reason="no default bundle in the package")
def test_training_inputs_are_the_engines_inputs(cxr4_dir: Path, tmp_path: Path) -> None:
    """SPEC: preprocessing used identically in training and inference. The K evaluation patches training cuts
    from its 8-bit cache give each trained learner the outputs the engine gets from the file (the engine's
    float image, not rounded to 8 bits, moved mean softmaxes by up to 0.009); the global crop is the engine's."""
    from patchflannel.bundle import load_bundle, load_torch_model
    from patchflannel.engine.engine import Engine
    from patchflannel.ops.preprocess import global_view, normalize
    from patchflannel.ops.votes import mean_softmax
    from patchflannel.training.mask_cache import MaskCache

    rows = read_manifest(cxr4_dir / "manifest.csv").rows[:2]
    b = load_bundle(default_bundle_path())
    got = Engine.from_bundle(None, device="cpu", k=8, seed=5).predict_many([r["path"] for r in rows])
    ds = LearnerDataset(prepare_items(rows, "patch", tmp_path / "arrays", b.preprocessing, MaskCache(tmp_path / "m", b)),
                        "patch", b.preprocessing, train=False, seed=5, k=8)
    for entry in b.learners:
        net = load_torch_model(b, entry)
        for i, pred in enumerate(got):
            with torch.inference_mode():
                soft = mean_softmax(net(ds[i][0])[None])[0]
            want = torch.tensor(list(pred.learner_mean_softmax[entry.name].values()))
            torch.testing.assert_close(soft, want, rtol=0, atol=2e-6, msg=f"{entry.name} {rows[i]['path']}")
    g = PRE["global"]
    crops = LearnerDataset(prepare_items(rows, "global", tmp_path / "arrays", PRE), "global", PRE, train=False)
    for i, row in enumerate(rows):
        view = global_view(torch.from_numpy(read_image(row["path"])), g["resize"], g["crop"])
        torch.testing.assert_close(crops[i][0], normalize(view[None], PRE), rtol=0, atol=1e-6)


def test_cache_writers_sharing_an_entry_do_not_collide(tmp_path: Path) -> None:
    """Two trainings sharing a cache_dir may write one entry at once (a shared temporary name lost a file)."""
    import threading

    from patchflannel.training.datasets import _save_atomic

    errors: list[str] = []

    def write() -> None:
        try:
            for _ in range(200):
                _save_atomic(np.zeros((64, 64), np.uint8), tmp_path / "entry.npy")
        except OSError as exc:
            errors.append(repr(exc))

    threads = [threading.Thread(target=write) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and [p.name for p in tmp_path.iterdir()] == ["entry.npy"]


def test_a_last_batch_of_one_image_is_dropped(tmp_path: Path) -> None:
    """BatchNorm cannot train on one image over a 1x1 map (inception_v3's auxiliary head)."""
    from patchflannel.training.learners import _batches

    row = {"path": "x", "label": "covid"}
    for i in range(5):
        np.save(tmp_path / f"{i}.npy", np.full((336, 336), 40 * i, np.uint8))
    ds = LearnerDataset([Item(row=row, label=0, sha256=f"{i:064x}", array_file=tmp_path / f"{i}.npy") for i in range(5)],
                        "global", PRE, train=True)
    sizes = {b: [len(y) for _, y in _batches(ds, {"seed": 0, "learner": {"batch_size": b, "num_workers": 0}}, 0)]
             for b in (1, 2, 3, 4, 8)}
    assert sizes == {1: [1] * 5, 2: [2, 2], 3: [3, 2], 4: [4], 8: [5]}


def test_mask_cache_is_keyed_by_model_and_image(cxr4_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("patchflannel.ops.mask", reason="ops/mask.py (segmentation helper) not in the tree yet")
    from patchflannel.training.mask_cache import MaskCache

    src = read_manifest(cxr4_dir / "manifest.csv").rows[0]["path"]
    img = tmp_path / "img.jpg"
    shutil.copy(src, img)
    cache = MaskCache(tmp_path / "masks", random_bundle(tmp_path / "b0", seed=0))
    m1 = cache.masks([img])[0]
    assert m1.shape == (256, 256) and m1.dtype == bool
    sha = hashlib.sha256(img.read_bytes()).hexdigest()
    f = cache.file(sha)
    assert f.is_file()
    np.savez_compressed(f, mask=~m1)  # a planted entry is what a cache hit returns: proves no recompute
    assert np.array_equal(cache.masks([img])[0], ~m1)
    other = MaskCache(tmp_path / "masks", random_bundle(tmp_path / "b1", seed=1))
    assert other.file(sha) != f
    assert other.masks([img])[0].shape == (256, 256) and other.file(sha).is_file()
    img.write_bytes(img.read_bytes() + b"\0")  # changed bytes -> a different key
    assert cache.file(hashlib.sha256(img.read_bytes()).hexdigest()) != f


def test_config_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "none.yaml")
    with pytest.raises(ConfigError, match="not a file"):
        load_config(tmp_path)
    (tmp_path / "film.jpg").write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x80\x81\xfe")
    with pytest.raises(ConfigError, match="film.jpg: not a text file"):  # an image given as the config
        load_config(tmp_path / "film.jpg")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="a config is a mapping of keys to values, got list"):
        load_config(tmp_path / "list.yaml")
    from patchflannel.training.segmentation import SegConfig

    with pytest.raises(ConfigError, match="film.jpg: not a text file \\(a recipe is YAML\\)"):
        SegConfig.from_file(tmp_path / "film.jpg")
    with pytest.raises(ConfigError, match="unknown config key"):
        load_config({"epochz": 3})
    with pytest.raises(ConfigError, match="mode must be"):
        load_config({"mode": "tile"})
    with pytest.raises(ConfigError, match="unknown key.*'learner'"):
        load_config({"learner": {"lr_rate": 1}})
    assert load_config({"mode": "patch"})["learner"]["l1"] == 1e-5
    assert load_config({"mode": "global"})["learner"]["l1"] == 0.0
    # Checked as the config is read, before any image is segmented or cached:
    with pytest.raises(ConfigError, match="unknown learner architecture 'foo'"):
        load_config({"arch": "foo"})
    with pytest.raises(ConfigError, match="unknown learner architecture 'fcdensenet56'"):
        load_config({"learners": ["resnet18", "fcdensenet56"]})
    with pytest.raises(ConfigError, match="k must be >= 1"):
        load_config({"k": 0})
    with pytest.raises(ConfigError, match="learner.patience must be >= 1, got 0"):  # the Trainer's own rule
        load_config({"learner": {"patience": 0}})
    with pytest.raises(ConfigError, match="ensemble.patience must be >= 1"):
        load_config({"ensemble": {"patience": 0}})
    with pytest.raises(ConfigError, match="seed must be <= 4294967295"):  # per-epoch seeds stay within 64 bits
        load_config({"seed": 2**62})
    with pytest.raises(ConfigError, match="learner.batch_size must be a whole number"):
        load_config({"learner": {"batch_size": 2.5}})
    assert load_config({"learner": {"lr": "1e-3"}})["learner"]["lr"] == 1e-3  # YAML reads 1e-3 as a string
    assert load_config({"predictions": "p.csv", "learners": ["m1_patch", "m2_patch"]})["learners"] == ["m1_patch", "m2_patch"]
    # Settings of the wrong kind are named as the config is read, not met as a traceback later.
    for raw, needle in (({"learner": None}, "'learner' must be a mapping of settings"),
                        ({"ensemble": 5}, "'ensemble' must be a mapping of settings"),
                        ({"learner": {"amp": "bfloat16"}}, "learner.amp must be one of auto, off, bf16, fp16"),
                        ({"learner": {"amp": True}}, "learner.amp must be one of"),
                        ({"learner": {"channels_last": "no"}}, "learner.channels_last must be true or false"),
                        ({"learner": {"imagenet_weights": "/w.pth"}}, "learner.imagenet_weights must be a mapping"),
                        ({"cache_dir": 5}, "cache_dir must be text"),
                        ({"learners": "shufflenet_v2_x0_5"}, "learners must be a list of names"),
                        ({"learners": ["resnet18", "resnet18"]}, "learners must be a list without repeats, got \\['resnet18'\\]"),
                        ({"k_val": 100000}, "k_val must be <= 1000"),
                        ({"val_fold": "zero"}, "val_fold must be a number"),  # not "fold zero leaves 0 images"
                        ({"val_fold": 1.5}, "val_fold must be a whole number")):
        with pytest.raises(ConfigError, match=needle):
            load_config(raw)
    assert load_config({"val_fold": 2})["val_fold"] == "2"  # as splits files name folds
    # A key of another command's config would be ignored: each command refuses it.
    for command, raw in (("cv", {"arch": "resnet18"}), ("cv", {"val_fold": 0}), ("train learner", {"learners": []}),
                         ("train ensemble", {"splits": "s.csv"})):
        with pytest.raises(ConfigError, match=f"not a key of a `{command}` config"):
            load_config(raw, command)
    assert load_config({"arch": "resnet18", "val_fold": 0, "splits": "s.csv"}, "train learner")["arch"] == "resnet18"
    bad = tmp_path / "manifest.csv"
    bad.write_text("path,label,patient_id,view,source\n")
    with pytest.raises(ManifestError, match="missing column 'split'"):
        read_splits(bad)


def test_a_resume_compares_the_settings_that_make_the_run() -> None:
    """Recorded (config.yaml) and current configs compare after the YAML round trip; a learner's ImageNet
    weights count for its own runs only; speed settings not at all."""
    from patchflannel.training.learners import LEARNER_SETTINGS, SPEED_ONLY, changed_settings

    now = load_config({"learners": ("resnet18", "squeezenet1_1"), "val_fold": 0,
                       "learner": {"lr": "1e-4", "imagenet_weights": {"resnet18": "r.pth"}}})
    recorded = load_config(yaml.safe_load(yaml.safe_dump(now)))
    assert changed_settings(recorded, now, LEARNER_SETTINGS + ("learners",)) == []
    more = load_config({**now, "learners": [*now["learners"], "densenet161"], "learner": {
        **now["learner"], "eval_batch": 2, "channels_last": False,
        "imagenet_weights": {"resnet18": "r.pth", "densenet161": "d.pth"}}})
    assert changed_settings(recorded, more, LEARNER_SETTINGS) == []  # an added learner, its weights, speed
    moved = load_config({**now, "learner": {**now["learner"], "imagenet_weights": {"resnet18": "elsewhere.pth"}}})
    assert changed_settings(recorded, moved, LEARNER_SETTINGS) == [
        "learner.imagenet_weights.resnet18: 'r.pth' -> 'elsewhere.pth'"]
    run = load_config({**now, "arch": "squeezenet1_1"})
    assert changed_settings(load_config({**run, "learner": {**run["learner"], "imagenet_weights": {}}}), run,
                            LEARNER_SETTINGS) == []  # another architecture's weights: not this run's
    assert "learner.eval_batch" in SPEED_ONLY


def test_a_refused_learner_config_leaves_no_run_folder(tmp_path: Path) -> None:
    splits = tmp_path / "splits.csv"
    splits.write_text("path,label,patient_id,view,source,split,fold\n"
                      "a.png,covid,p1,PA,s,train,0\nb.png,normal,p2,PA,s,train,1\n")
    for name in ("a.png", "b.png"):
        (tmp_path / name).write_bytes(b"")  # only their existence is checked before the folds
    cfg = {"splits": str(splits), "arch": "squeezenet1_1", "val_fold": 7}
    with pytest.raises(ConfigError, match="fold 7 leaves 2 training and 0 validation images"):
        train_learner(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_train_learner_global_resumes_to_the_same_state(cxr4_dir: Path, tmp_path: Path) -> None:
    splits = small_splits(cxr4_dir, tmp_path / "splits.csv", per_class=6)
    cfg = {"splits": str(splits), "arch": "squeezenet1_1", "mode": "global", "val_fold": 0,
           "cache_dir": str(tmp_path / "cache"), "learner": {"epochs": 2, "patience": 5, "batch_size": 4, "lr": 1e-3}}
    summary = train_learner(cfg, tmp_path / "full")
    assert summary["epochs_run"] == 2 and 0.0 <= summary["best"]["val_macro_f1"] <= 1.0
    saved = yaml.safe_load((tmp_path / "full" / "config.yaml").read_text())
    assert saved["arch"] == "squeezenet1_1" and saved["learner"]["lr"] == 1e-3
    with open(tmp_path / "full" / "log.csv") as fh:
        log = list(csv.DictReader(fh))
    assert [r["epoch"] for r in log] == ["0", "1"] and "train_loss" in log[0] and "val_macro_f1" in log[0]
    train_learner({**cfg, "learner": {**cfg["learner"], "epochs": 1}}, tmp_path / "part")
    train_learner(cfg, tmp_path / "part", resume=True)  # a resume may train longer
    with pytest.raises(ConfigError, match=r"made under other settings than these \(learner.lr: 0.001 -> 0.01\)"):
        train_learner({**cfg, "learner": {**cfg["learner"], "lr": 1e-2}}, tmp_path / "part", resume=True)
    rows = read_manifest(splits).rows  # another split of the same images: a fold-0 image moved to fold 1
    moved = next(r for r in rows if r["split"] == "train" and r["fold"] == "0")
    moved["fold"] = "1"
    write_manifest(rows, tmp_path / "resplit.csv", read_manifest(splits).columns)
    with pytest.raises(ConfigError, match="its train and val images are not those the run started with"):
        train_learner({**cfg, "splits": str(tmp_path / "resplit.csv")}, tmp_path / "part", resume=True)
    full = torch.load(tmp_path / "full" / "last.pt", weights_only=True)["model"]
    part = torch.load(tmp_path / "part" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(full[k], part[k]) for k in full)
    model, mcfg = load_learner(tmp_path / "full")
    val = [r for r in read_splits(splits) if r["split"] == "train" and r["fold"] == "0"]
    from patchflannel.training.learners import prepare

    out = predict_items(model, prepare(mcfg, val, torch.device("cpu")), mcfg, 1, torch.device("cpu"))
    assert out["confidence"].shape == (len(val), 4) and np.allclose(out["confidence"].sum(1), 1, atol=1e-5)
    assert np.array_equal(out["pred"], out["confidence"].argmax(1))


def test_an_unreadable_training_image_points_to_the_check_that_lists_them_all(cxr4_dir: Path, tmp_path: Path) -> None:
    splits = small_splits(cxr4_dir, tmp_path / "splits.csv", per_class=6)
    rows = [r for r in read_manifest(splits).rows if r["split"] == "train"]
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(Path(rows[0]["path"]).read_bytes()[:1500])
    rows[0]["path"] = str(cut)
    write_manifest(rows + [r for r in read_manifest(splits).rows if r["split"] == "test"], splits,
                   read_manifest(splits).columns)
    cfg = {"splits": str(splits), "arch": "squeezenet1_1", "mode": "global", "val_fold": rows[0]["fold"] or 0,
           "cache_dir": str(tmp_path / "cache"), "learner": {"epochs": 1, "batch_size": 4}}
    with pytest.raises(ConfigError, match=r"cut\.jpg: cannot decode JPEG(.|\n)*data validate --decode .*splits\.csv"):
        train_learner(cfg, tmp_path / "run")


@pytest.mark.slow
def test_train_learner_patch_starts_the_same_with_a_cold_or_a_warm_mask_cache(cxr4_dir: Path, tmp_path: Path) -> None:
    """Building the segmenter for a cold mask cache draws from the global RNG: the learner is seeded after it."""
    splits = small_splits(cxr4_dir, tmp_path / "splits.csv", per_class=5)
    bundle = random_bundle(tmp_path / "bundle", seed=0)
    cfg = {"splits": str(splits), "arch": "squeezenet1_1", "mode": "patch", "val_fold": 0, "k_val": 1,
           "cache_dir": str(tmp_path / "cache"), "segmentation_bundle": str(bundle.root),
           "learner": {"epochs": 1, "patience": 1, "batch_size": 4, "lr": 1e-3}}
    train_learner(cfg, tmp_path / "cold")
    train_learner(cfg, tmp_path / "warm")
    cold = torch.load(tmp_path / "cold" / "last.pt", weights_only=True)["model"]
    warm = torch.load(tmp_path / "warm" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(cold[k], warm[k]) for k in cold)


@pytest.mark.parametrize("arch", ["mnasnet0_5", "mobilenet_v3_small"])
def test_bn_momentum_option_replaces_the_architectures_own(arch: str) -> None:
    from torch import nn

    from patchflannel.training.learners import build_learner

    def momenta(cfg: dict) -> set[float]:
        return {m.momentum for m in build_learner(cfg, arch).modules() if isinstance(m, nn.BatchNorm2d)}

    own = momenta(load_config({}))
    assert own and 0.1 not in own  # torchvision's slow running-statistics momentum (0.01 / 0.0003)
    assert momenta(load_config({"learner": {"bn_momentum": 0.1}})) == {0.1}


def test_inception_from_imagenet_weights_transforms_its_input_and_records_it(tmp_path: Path) -> None:
    """torchvision's inception_v3 weights expect transform_input: on when a weights file is named, and kept in
    run.json's arch_config so that the trained model is rebuilt the same way."""
    import torchvision

    from patchflannel.training.learners import arch_config, build_learner

    weights = tmp_path / "inception_v3_imagenet.pth"
    torch.save(torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False).state_dict(), weights)
    cfg = load_config({"learner": {"imagenet_weights": {"inception_v3": str(weights)}}})
    assert arch_config(cfg, "inception_v3") == {"transform_input": True} and arch_config(cfg, "resnet18") == {}
    assert build_learner(cfg, "inception_v3").net.transform_input
    assert not build_learner(load_config({}), "inception_v3").net.transform_input


def test_a_finished_run_is_rebuilt_with_the_options_its_run_json_records(tmp_path: Path) -> None:
    """A run trained before its options were recorded (arch_config {}) keeps them: the run, not the config."""
    import json

    from patchflannel.models import get_model

    cfg = load_config({"arch": "inception_v3", "learner": {"imagenet_weights": {"inception_v3": "/nowhere.pth"}}})
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    torch.save(get_model("inception_v3").state_dict(), tmp_path / "best.pt")
    assert load_learner(tmp_path)[0].net.transform_input  # no run.json: the config says
    for recorded in ({}, {"transform_input": True}):
        (tmp_path / "run.json").write_text(json.dumps({"arch_config": recorded}))
        assert load_learner(tmp_path)[0].net.transform_input == bool(recorded)
    for broken, reason in (('{"arch_config": ', "not valid JSON"), ("[1, 2]", "expected a JSON object, got list")):
        (tmp_path / "run.json").write_text(broken)  # a run.json cut short (or edited by hand) is named
        with pytest.raises(ConfigError, match=f"run.json: {reason}"):
            load_learner(tmp_path)


@pytest.mark.slow
def test_ctrl_c_says_how_to_go_on(cxr4_dir: Path, tmp_path: Path) -> None:
    """An interrupted `train learner` exits 130 and names the command that continues it."""
    splits = small_splits(cxr4_dir, tmp_path / "splits.csv", per_class=6)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"splits": str(splits), "arch": "squeezenet1_1", "mode": "global", "val_fold": 0,
                                      "cache_dir": str(tmp_path / "cache"), "learner": {"epochs": 50, "lr": 1e-3}}))
    proc = subprocess.Popen([sys.executable, "-m", "patchflannel.cli", "train", "learner", str(config),
                             "--out", str(tmp_path / "run")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    while not (tmp_path / "run" / "config.yaml").is_file():  # past the checks: the run is going
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read().decode() if proc.stdout else ""
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    output = proc.communicate(timeout=60)[0].decode()
    assert proc.returncode == 130, output
    assert f"interrupted: the run so far is in {tmp_path / 'run'}; the same command with --resume continues it" in (
        output.replace("\n", ""))
