"""Lung segmentation: masks and post-processing, Jaccard, training on real pairs, resume, inference, CLI."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
import yaml
from PIL import Image
from scipy import ndimage
from sklearn.metrics import jaccard_score
from typer.testing import CliRunner

from patchflannel.bundle import default_bundle_path
from patchflannel.errors import ConfigError
from patchflannel.io import read_image
from patchflannel.models import get_model
from patchflannel.ops.mask import fill_holes, lung_masks, mask_fraction, postprocess_mask
from patchflannel.segment import REPORT_FILE, load_segmenter, remove_run, segment_images
from patchflannel.training.segmentation import (
    SegConfig,
    augment_batch,
    augmenter,
    evaluate_segmentation,
    jaccard,
    load_pairs,
    read_mask,
    read_pairs_manifest,
    segmentation_loss,
    split_indices,
    train_segmentation,
)

HAS_DEFAULT = (default_bundle_path() / "bundle.json").is_file()
needs_default = pytest.mark.skipif(not HAS_DEFAULT, reason="no default bundle in src/patchflannel/assets/default")


def _pairs_manifest(lungseg_dir: Path, out: Path, n: int, skip: int = 0) -> Path:
    """A manifest of ``n`` real pairs (after the first ``skip``) with absolute paths."""
    with open(lungseg_dir / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))[skip:skip + n]
    out.mkdir(parents=True, exist_ok=True)
    path = out / "pairs.csv"
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "mask"])
        for r in rows:
            w.writerow([lungseg_dir / r["image"], lungseg_dir / r["mask"]])
    return path


# --- masks -------------------------------------------------------------------------------------------

def test_lung_masks_thresholds_sigmoid() -> None:
    logits = torch.tensor([-3.0, -0.1, 0.1, 3.0]).reshape(1, 1, 2, 2)
    assert lung_masks(logits).tolist() == [[[False, False], [True, True]]]
    assert lung_masks(logits, threshold=0.9).tolist() == [[[False, False], [False, True]]]
    with pytest.raises(ValueError, match="logits"):
        lung_masks(torch.zeros(1, 2, 2))


def test_postprocess_keeps_two_largest_components_and_fills_holes() -> None:
    m = np.zeros((40, 40), dtype=bool)
    m[5:35, 3:15] = True        # left lung
    m[5:35, 22:36] = True       # right lung
    m[15:18, 8:10] = False      # a hole (nodule)
    m[0:2, 18:20] = True        # a small island
    out = postprocess_mask(m)
    assert out[16, 9] and not out[0, 18]
    expected = np.zeros_like(m)
    expected[5:35, 3:15] = expected[5:35, 22:36] = True
    assert np.array_equal(out, expected)
    assert not postprocess_mask(np.zeros((8, 8), dtype=bool)).any()


@pytest.mark.parametrize("seed", range(4))
def test_fill_holes_matches_scipy(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(50):
        shape = tuple(int(v) for v in rng.integers(1, 48, size=2))
        m = rng.random(shape) < rng.uniform(0.05, 0.95)
        assert np.array_equal(fill_holes(m), ndimage.binary_fill_holes(m)), (shape, m)
    ring = np.zeros((9, 9), dtype=bool)
    ring[2:7, 2:7] = True
    ring[4, 4] = False
    assert fill_holes(ring)[4, 4] and fill_holes(np.ones((3, 3), dtype=bool)).all()
    assert np.array_equal(fill_holes(ring.astype(np.uint8)), ndimage.binary_fill_holes(ring))  # any 0/1 dtype
    assert fill_holes(np.zeros((0, 5), dtype=bool)).shape == (0, 5)


def test_mask_fraction_numpy_and_torch() -> None:
    m = np.zeros((2, 10, 10), dtype=bool)
    m[0, :5] = True
    assert mask_fraction(m).tolist() == [0.5, 0.0]
    assert mask_fraction(torch.from_numpy(m)).tolist() == [0.5, 0.0]


# --- Jaccard -----------------------------------------------------------------------------------------

def test_jaccard_matches_sklearn_per_image() -> None:
    g = torch.Generator().manual_seed(0)
    pred = torch.rand(6, 32, 32, generator=g) > torch.linspace(0.1, 0.9, 6)[:, None, None]
    target = torch.rand(6, 32, 32, generator=g) > 0.5
    ours = jaccard(pred, target)
    theirs = [jaccard_score(t.flatten().numpy(), p.flatten().numpy()) for p, t in zip(pred, target)]
    assert ours.shape == (6,)
    assert np.allclose(ours.numpy(), theirs)


def test_jaccard_edge_cases() -> None:
    empty = torch.zeros(1, 4, 4, dtype=torch.bool)
    full = torch.ones(1, 4, 4, dtype=torch.bool)
    assert jaccard(empty, empty).item() == 1.0
    assert jaccard(full, empty).item() == 0.0
    assert jaccard(full, full).item() == 1.0


# --- data, split, augmentation -----------------------------------------------------------------------

def test_split_is_seeded_disjoint_and_80_20() -> None:
    train, val = split_indices(200, 0.2, seed=3)
    assert len(val) == 40 and len(train) == 160 and not set(train) & set(val)
    assert split_indices(200, 0.2, seed=3) == (train, val)
    assert split_indices(200, 0.2, seed=4)[1] != val


def test_pairs_manifest_is_read_as_every_manifest_is(tmp_path: Path) -> None:
    """Excel's byte-order mark, blank lines and a file not in UTF-8, as the other manifests handle them (the
    mark hid the 'image' column, and a Latin-1 byte raised a traceback)."""
    from patchflannel.errors import ManifestError

    for name in ("a.png", "a_mask.png"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "m.csv").write_bytes(b"\xef\xbb\xbfimage,mask\r\n\r\na.png,a_mask.png\r\nb.png,a_mask.png\r\n")
    with pytest.raises(ManifestError, match=r"line 4: \S*b.png not found"):
        read_pairs_manifest(tmp_path / "m.csv")
    (tmp_path / "m.csv").write_bytes(b"\xef\xbb\xbfimage,mask\r\n\r\na.png,a_mask.png\r\n")
    assert read_pairs_manifest(tmp_path / "m.csv") == [(tmp_path / "a.png", tmp_path / "a_mask.png")]
    (tmp_path / "m.csv").write_bytes("image,mask\nä.png,a_mask.png\n".encode("latin-1"))
    with pytest.raises(ManifestError, match="line 2: byte 0xe4 is not UTF-8"):
        read_pairs_manifest(tmp_path / "m.csv")


def test_load_pairs_gives_spec_input_and_binary_masks(lungseg_dir: Path) -> None:
    pairs = read_pairs_manifest(lungseg_dir / "manifest.csv")
    assert len(pairs) == 200
    data = load_pairs(pairs[:3], size=64)
    assert data.images.shape == (3, 1, 64, 64) and data.masks.shape == (3, 1, 64, 64)
    assert 0 <= data.images.min() and data.images.max() <= 1
    assert set(data.masks.unique().tolist()) == {0.0, 1.0}
    assert 0.15 < data.masks.mean() < 0.5  # lungs cover a good part of a JSRT film


def test_masks_read_at_half_their_largest_value(lungseg_dir: Path, tmp_path: Path) -> None:
    """A mask saved soft (resized, JPEG) keeps its lung area; a 0/1 mask reads like a 0/255 one."""
    path = read_pairs_manifest(lungseg_dir / "manifest.csv")[0][1]
    exact = read_mask(path)
    grey = np.asarray(Image.open(path).convert("L"))
    Image.fromarray(grey).resize((300, 300), Image.BILINEAR).resize(grey.shape[::-1], Image.BILINEAR).save(tmp_path / "soft.png")
    Image.fromarray(grey).save(tmp_path / "lossy.jpg", quality=75)
    Image.fromarray((grey > 0).astype(np.uint8)).save(tmp_path / "ones.png")
    for name in ("soft.png", "lossy.jpg"):
        assert abs(read_mask(tmp_path / name).mean() - exact.mean()) < 0.002, name  # > 0 gave +0.005 and more
    assert np.array_equal(read_mask(tmp_path / "ones.png"), exact)
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(tmp_path / "empty.png")
    assert not read_mask(tmp_path / "empty.png").any()


def test_augmentation_moves_image_and_mask_together(lungseg_dir: Path) -> None:
    data = load_pairs(read_pairs_manifest(lungseg_dir / "manifest.csv")[:4], size=64)
    cfg = SegConfig(manifest="x", arch="fcdensenet56", rotate=15, shift=0.1)
    torch.manual_seed(0)
    # The image is the mask itself: after augmentation the two must still coincide.
    x, y = augment_batch(augmenter(cfg), data.masks.clone(), data.masks.clone())
    assert set(y.unique().tolist()) <= {0.0, 1.0}  # nearest for the mask
    moved = jaccard(y[:, 0] > 0.5, data.masks[:, 0] > 0.5)
    assert (moved < 0.99).any()
    assert (jaccard(x[:, 0] > 0.5, y[:, 0] > 0.5) > 0.95).all()


def _centroids(masks: torch.Tensor) -> torch.Tensor:
    rows = torch.arange(masks.shape[-2], dtype=torch.float32)[:, None]
    cols = torch.arange(masks.shape[-1], dtype=torch.float32)[None]
    m = masks.float()
    return torch.stack([(m * rows).sum((-2, -1)), (m * cols).sum((-2, -1))], -1) / m.sum((-2, -1))[:, None]


def test_augmentation_is_bilinear_for_images_and_aligned_for_masks(lungseg_dir: Path) -> None:
    """Real films: the image is resampled bilinearly (nearest would only copy its values), and the cropped mask
    sits where the image's own copy of it does (torchvision's nearest mask crop sat half a pixel off)."""
    data = load_pairs(read_pairs_manifest(lungseg_dir / "manifest.csv")[:8], size=128)
    crop = SegConfig(manifest="x", arch="fcdensenet56", rotate=0, shift=0, scale=(1, 1), crop_scale=0.85, aspect=(0.8, 1.25))
    torch.manual_seed(0)
    x, y = augment_batch(augmenter(crop), torch.cat([data.images, data.masks], 1), data.masks.clone())
    offset = (_centroids(y[:, 0] > 0.5) - _centroids(x[:, 1] > 0.5)).mean(0)
    assert offset.abs().max() < 0.15, offset  # was (0.52, 0.46) pixels
    affine = SegConfig(manifest="x", arch="fcdensenet56", rotate=8, shift=0.06, scale=(0.75, 1.1))
    x, _ = augment_batch(augmenter(affine), data.images.clone(), data.masks.clone())
    for before, after in zip(data.images, x):
        assert (~torch.isin(after, before)).float().mean() > 0.3  # new, interpolated values


def test_config_refuses_unknown_keys_bad_arch_and_bad_weights(lungseg_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown key"):
        SegConfig.from_dict({"manifest": "m.csv", "epochs": 3})
    with pytest.raises(ConfigError, match="not a segmentation model"):
        SegConfig(manifest="m.csv", arch="resnet18")
    bad_init = tmp_path / "weights.pt"
    torch.save(get_model("fcdensenet67").state_dict(), bad_init)
    cfg = SegConfig(manifest=str(_pairs_manifest(lungseg_dir, tmp_path, 2)), arch="fcdensenet56", size=32,
                    init_from=str(bad_init))
    with pytest.raises(ConfigError, match="init_from"):
        train_segmentation(cfg, tmp_path / "run")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("arch: fcdensenet56\n")
    with pytest.raises(ConfigError, match="manifest"):
        SegConfig.from_file(recipe)
    assert SegConfig(manifest="m.csv", lr="1e-4").lr == 1e-4  # YAML reads 1e-4 as a string
    for bad, match in ((dict(batch_size=0), "batch_size must be >= 1"), (dict(max_epochs="ten"), "max_epochs must be a number"),
                       (dict(scale=1.1), r"scale must be a pair \[low, high\]"), (dict(val_fraction=0.99), "val_fraction must be <= 0.9"),
                       (dict(lr=-1), "lr must be > 0"), (dict(shift=2), "shift must be <= 1"),
                       (dict(scale=[1.1, 0.75]), "low <= high"), (dict(aspect=[1.25, 0.8]), "low <= high"),
                       (dict(bf16="no"), "bf16 must be true or false"),  # was a TypeError deep in autocast
                       (dict(channels_last="false"), "channels_last must be true or false"),  # was taken as true
                       (dict(arch_config=5), "arch_config must be a mapping"), (dict(device=3), "device must be"),
                       (dict(init_from=1), "init_from must be a path or null")):
        with pytest.raises(ConfigError, match=match):
            SegConfig(manifest="m.csv", **bad)
    with pytest.raises(ConfigError, match="does not take these options"):
        train_segmentation(SegConfig(manifest="nowhere.csv", arch="fcdensenet56", arch_config={"growth": 3}), tmp_path / "r2")


@pytest.mark.parametrize("recipe", ["segmentation.yaml", "segmentation_gpu.yaml"])
def test_shipped_recipes_parse(recipe: str) -> None:
    path = Path(__file__).resolve().parents[1] / "recipes" / recipe
    cfg = SegConfig.from_file(path)
    assert cfg.arch in ("fcdensenet56", "fcdensenet103")


# --- training ----------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_few_steps_lower_the_loss_on_real_pairs(lungseg_dir: Path) -> None:
    data = load_pairs(read_pairs_manifest(lungseg_dir / "manifest.csv")[:2], size=64)
    torch.manual_seed(0)
    model = get_model("fcdensenet56", dropout=0.0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def loss() -> float:
        model.eval()
        with torch.no_grad():
            return segmentation_loss(model(data.images), data.masks, 1.0).item()

    before = loss()
    for _ in range(5):
        model.train()
        step = segmentation_loss(model(data.images), data.masks, 1.0)
        opt.zero_grad()
        step.backward()
        opt.step()
    assert loss() < 0.9 * before


def _tiny_config(manifest: Path, **kw: object) -> SegConfig:
    return SegConfig.from_dict({"manifest": str(manifest), "arch": "fcdensenet56", "size": 32, "batch_size": 2,
                                "lr": 1e-3, "max_epochs": 2, "patience": 5, "val_fraction": 0.25, **kw})


@pytest.mark.slow
def test_training_run_and_resume_match_an_uninterrupted_run(lungseg_dir: Path, tmp_path: Path) -> None:
    manifest = _pairs_manifest(lungseg_dir, tmp_path, 5)
    full = train_segmentation(_tiny_config(manifest), tmp_path / "full")
    # An interruption after epoch 0: the same run stopped there, then resumed to the end.
    train_segmentation(_tiny_config(manifest, max_epochs=1), tmp_path / "cut")
    resumed = train_segmentation(_tiny_config(manifest), tmp_path / "cut", resume=True)
    assert resumed == full
    # --resume into a folder with nothing to resume starts the run, as for learners (a job script passes it always)
    assert train_segmentation(_tiny_config(manifest), tmp_path / "fresh", resume=True) == full
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])

    info = json.loads((tmp_path / "full" / "run.json").read_text())
    assert info["task"] == "segmentation" and info["arch"] == "fcdensenet56"
    assert len(info["split"]["val"]) == 1 and len(info["split"]["train"]) == 4 and not set(info["split"]["val"]) & set(info["split"]["train"])
    with open(tmp_path / "full" / "log.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["epoch"] for r in rows] == ["0", "1"]
    assert {"train_loss", "val_loss", "val_jaccard", "lr"} <= set(rows[0])

    # The run is a model: evaluation scores exactly its recorded validation pairs at full resolution.
    result = evaluate_segmentation(load_segmenter(tmp_path / "full"), manifest)
    assert result["n"] == 1 and set(result["per_image"]) == set(info["split"]["val"])
    assert 0.0 <= result["min_jaccard"] <= result["mean_jaccard"] <= 1.0


# --- inference ---------------------------------------------------------------------------------------

@needs_default
def test_default_model_meets_the_jaccard_target_on_its_validation_pairs(lungseg_dir: Path) -> None:
    segmenter = load_segmenter()
    record = segmenter.record
    assert record["validation"]["mean_jaccard"] >= 0.93
    names = record["split"]["val"][:4]
    result = evaluate_segmentation(segmenter, lungseg_dir / "manifest.csv", names)
    assert result["mean_jaccard"] > 0.9


@needs_default
def test_segment_writes_masks_for_good_inputs_and_errors_for_bad(cxr4_dir: Path, tmp_path: Path) -> None:
    with open(cxr4_dir / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    adult = next(cxr4_dir / r["path"] for r in rows if r["source"] == "ieee8023")
    child = next(cxr4_dir / r["path"] for r in rows if r["source"] == "kermany")
    inputs = tmp_path / "in"
    inputs.mkdir()
    truncated = inputs / "truncated.jpg"
    truncated.write_bytes(adult.read_bytes()[:1500])
    text = inputs / "notes.png"
    text.write_text("not an image\n")
    dup = inputs / adult.name
    dup.write_bytes(adult.read_bytes())
    uids = [inputs / "1.2.840.113619.2.55.1", inputs / "1.2.840.113619.2.55.2"]  # named as a PACS export names them
    for uid, src in zip(uids, (adult, child)):
        uid.write_bytes(src.read_bytes())
    out = tmp_path / "out"
    report = segment_images([adult, truncated, child, text, dup, inputs / "missing.png", *uids], load_segmenter(), out,
                            overlays=True)

    assert [r["status"] for r in report] == ["ok", "error", "ok", "error", "error", "error", "ok", "ok"]
    assert [r["mask"] for r in report[-2:]] == ["1.2.840.113619.2.55.1.png", "1.2.840.113619.2.55.2.png"]
    assert np.array_equal(np.asarray(Image.open(out / "1.2.840.113619.2.55.2.png")),
                          np.asarray(Image.open(out / f"{child.stem}.png")))
    assert "already writes" in report[4]["message"]
    assert all(r["message"] for r in report if r["status"] == "error")
    with open(out / REPORT_FILE, newline="") as fh:
        assert list(csv.DictReader(fh)) == report
    for src in (adult, child):
        mask = np.asarray(Image.open(out / f"{src.stem}.png"))
        assert mask.shape == read_image(src).shape
        assert set(np.unique(mask)) == {0, 255}
        assert 0.1 < (mask > 0).mean() < 0.6  # plausible lungs on an adult and a child
        over = Image.open(out / "overlays" / f"{src.stem}.png")
        assert over.mode == "RGB" and over.size == (mask.shape[1], mask.shape[0])
    assert not (out / "truncated.png").exists() and not (out / "notes.png").exists()
    shouting = inputs / f"{adult.stem.upper()}.JPEG"  # one mask file with adult's on a case-insensitive disk
    shouting.write_bytes(adult.read_bytes())
    long_name = inputs / ("x" * 252)  # no image extension: the mask would be 256 bytes long
    long_name.write_bytes(adult.read_bytes())
    report = segment_images([adult, shouting, long_name], load_segmenter(), tmp_path / "again")
    assert [r["status"] for r in report] == ["ok", "error", "error"]
    assert "already writes" in report[1]["message"] and "longer than a file name may be" in report[2]["message"]


def test_remove_run_removes_what_its_report_lists_and_nothing_else(tmp_path: Path) -> None:
    """Names as the report holds them (escaped) find the real files; a listed name never leaves the folder; a
    report that cannot be read removes nothing."""
    out = tmp_path / "masks"
    (out / "overlays").mkdir(parents=True)
    odd = os.fsdecode(b"scan-\xff.png")
    for name in (odd, "a.png", "mine.png"):
        (out / name).write_bytes(b"png")
    (out / "overlays" / "a.png").write_bytes(b"png")
    (tmp_path / "victim.png").write_bytes(b"keep")
    report = out / REPORT_FILE
    report.write_text("file,status,lung_fraction,mask,message\nin/scan-\\xff.jpg,ok,0.3,scan-\\xff.png,\n"
                      "in/a.jpg,ok,0.3,a.png,\nx,ok,0.3,../victim.png,\nbad.jpg,error,,,unreadable\n")
    assert remove_run(out) == 4  # the odd mask, a.png and its overlay, the report
    assert sorted(os.listdir(out)) == ["mine.png"]  # the overlays folder it left empty too
    assert (tmp_path / "victim.png").read_bytes() == b"keep"
    (out / "overlays").mkdir()
    (out / "overlays" / "b.png").write_bytes(b"png")  # an overlay it does not list: kept, and its folder
    report.write_text("file,status,lung_fraction,mask,message\nin/a.jpg,ok,0.3,a.png,\n")
    (out / "a.png").write_bytes(b"png")
    assert remove_run(out) == 2 and sorted(os.listdir(out / "overlays")) == ["b.png"]
    for text, needle in (("something,else\na,b\n", "not a segment report"),
                         (b"file,status,lung_fraction,mask,message\ncaf\xe9.jpg,ok,0.3,caf\xe9.png,\n", "cannot be read")):
        report.write_bytes(text.encode() if isinstance(text, str) else text)
        with pytest.raises(ConfigError, match=needle):
            remove_run(out)
        assert report.is_file() and (out / "mine.png").is_file()


@needs_default
def test_small_masks_are_flagged(lungseg_dir: Path, tmp_path: Path) -> None:
    image = read_pairs_manifest(lungseg_dir / "manifest.csv")[0][0]
    rows = segment_images([image], load_segmenter(), tmp_path, min_fraction=0.925)
    assert rows[0]["status"] == "flagged" and "< 92.5%" in rows[0]["message"]
    assert (tmp_path / f"{image.stem}.png").is_file()


@needs_default
def test_an_interrupted_run_leaves_the_report_of_what_it_reached(lungseg_dir: Path, tmp_path: Path) -> None:
    """Ctrl-C in the middle (here from the caller's progress callback, where it may land): the masks written
    are listed, the images taken but not segmented say so, the rest are not in the report."""
    images = [p for p, _ in read_pairs_manifest(lungseg_dir / "manifest.csv")[:5]]
    seen = []

    def progress(n: int) -> None:
        seen.append(n)
        if len(seen) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        segment_images(images, load_segmenter(batch_size=2), tmp_path, progress=progress)
    with open(tmp_path / REPORT_FILE, newline="") as fh:
        report = list(csv.DictReader(fh))
    assert [r["status"] for r in report] == ["ok", "ok", "error", "error"]  # the third and fourth were taken
    assert report[2]["message"] == report[3]["message"] == "interrupted before its mask was written"
    assert (tmp_path / f"{images[0].stem}.png").is_file() and not (tmp_path / f"{images[4].stem}.png").exists()


def test_load_segmenter_refuses_an_unknown_folder(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="neither a bundle"):
        load_segmenter(tmp_path)


@needs_default
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_masks_agree_with_cpu(lungseg_dir: Path) -> None:
    image = read_image(read_pairs_manifest(lungseg_dir / "manifest.csv")[0][0])
    cpu = load_segmenter().predict([image])[0]
    gpu = load_segmenter(device="cuda").predict([image])[0]
    assert jaccard(torch.from_numpy(gpu)[None], torch.from_numpy(cpu)[None]).item() > 0.99


# --- CLI ---------------------------------------------------------------------------------------------

def test_cli_train_evaluate_and_segment(lungseg_dir: Path, tmp_path: Path) -> None:
    from patchflannel.cli.seg import register, register_train

    app, train_app = typer.Typer(), typer.Typer()
    register(app)
    register_train(train_app)
    app.add_typer(train_app, name="train")
    runner = CliRunner()
    manifest = _pairs_manifest(lungseg_dir, tmp_path, 6)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"manifest": "ignored.csv", "arch": "fcdensenet56", "size": 32,
                                      "batch_size": 4, "max_epochs": 1, "val_fraction": 0.34}))
    run = tmp_path / "run"
    res = runner.invoke(app, ["train", "seg", "--config", str(recipe), "--manifest", str(manifest), "--out", str(run)])
    assert res.exit_code == 0, res.output
    assert "best epoch 0" in res.output and (run / "best.pt").is_file()
    assert res.stdout.splitlines() == [next(x for x in res.output.splitlines() if "best epoch 0" in x)]  # bars: stderr

    res = runner.invoke(app, ["train", "seg-eval", "--model", str(run), "--manifest", str(manifest)])
    assert res.exit_code == 0, res.output
    assert "validation pairs: 2" in res.output and "mean Jaccard" in res.output
    other = _pairs_manifest(lungseg_dir, tmp_path / "other", 3, skip=6)  # pairs the run never saw
    res = runner.invoke(app, ["train", "seg-eval", "--model", str(run), "--manifest", str(other)])
    assert res.exit_code == 2 and "not in the manifest (the model's validation pairs" in res.output, res.output
    res = runner.invoke(app, ["train", "seg-eval", "--model", str(run), "--manifest", str(other), "--all"])
    assert res.exit_code == 0 and "pairs: 3  mean Jaccard" in res.output, res.output
    # A bundle from the run: a manifest that cannot score it is refused before anything is written.
    res = runner.invoke(app, ["train", "seg-bundle", "--run", str(run), "--out", str(tmp_path / "sb"), "--manifest", str(other)])
    assert res.exit_code == 2 and "validation image" in res.output and not (tmp_path / "sb").exists(), res.output
    res = runner.invoke(app, ["train", "seg-bundle", "--run", str(run), "--out", str(tmp_path / "sb"), "--manifest", str(manifest)])
    assert res.exit_code == 0, res.output
    record = load_segmenter(tmp_path / "sb").record
    assert record["validation"]["n"] == 2 and record["split"]["val"] == json.loads((run / "run.json").read_text())["split"]["val"]

    image = read_pairs_manifest(manifest)[0][0]
    (tmp_path / "notes.png").write_text("not an image")
    res = runner.invoke(app, ["segment", str(image), str(tmp_path / "notes.png"), "--model", str(run),
                              "--out", str(tmp_path / "masks")])
    assert res.exit_code == 1, res.output  # done, with an input that gave no mask
    assert "error(s)" in res.output and "notes.png" in res.output
    res = runner.invoke(app, ["segment", str(image), str(tmp_path / "notes.png"), "--model", str(run),
                              "--out", str(tmp_path / "masks_q"), "-q"])
    assert res.exit_code == 1 and res.output == "", res.output  # the same run and status, nothing said
    assert (tmp_path / "masks_q" / f"{image.stem}.png").is_file() and "notes.png" in (
        tmp_path / "masks_q" / "segment_report.csv").read_text()
    assert (tmp_path / "masks" / f"{image.stem}.png").is_file()
    folder = tmp_path / "films"  # folders (and globs, manifests) as for score
    folder.mkdir()
    shutil.copy(image, folder / image.name)
    res = runner.invoke(app, ["segment", str(folder), "--model", str(run), "--out", str(tmp_path / "from_folder")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "from_folder" / f"{image.stem}.png").is_file()
    # Masks never replace inputs: an earlier run's masks under --out are not inputs, nor is a folder into itself.
    kept = (folder / image.name).read_bytes()
    res = runner.invoke(app, ["segment", str(folder), "--model", str(run), "--out", str(folder)])
    assert res.exit_code == 2 and "is a folder being segmented" in res.output
    res = runner.invoke(app, ["segment", str(folder), "--model", str(run), "--out", str(folder / image.name)])
    assert res.exit_code == 2 and "a file is in the way where a folder is wanted" in res.output
    res = runner.invoke(app, ["segment", str(folder), "--model", str(run), "--out", str(tmp_path)])  # above them: fine
    assert res.exit_code == 0 and "1 ok" in res.output, res.output
    res = runner.invoke(app, ["segment", str(folder), "--model", str(run), "--out", str(folder / "0masks"), "--overlay"])
    assert res.exit_code == 0 and "1 ok" in res.output and (folder / "0masks" / "overlays").is_dir(), res.output
    (folder / "0masks" / "stale.png").write_bytes((folder / "0masks" / f"{image.stem}.png").read_bytes())
    with open(folder / "0masks" / "segment_report.csv", "a") as fh:  # as if an earlier run had masked stale.png
        fh.write("gone/stale.png,ok,0.3,stale.png,\n")
    (folder / "0masks" / "notes.txt").write_text("mine")
    res = runner.invoke(app, ["segment", str(folder), "--model", str(run), "--out", str(folder / "0masks")])
    assert res.exit_code == 2 and "holds an earlier run (segment_report.csv): --overwrite replaces it" in res.output
    res = runner.invoke(app, ["segment", str(folder), "--model", str(run), "--out", str(folder / "0masks"), "--overwrite"])
    assert res.exit_code == 0 and "1 ok" in res.output, res.output
    assert "3 file(s) in" in res.output  # the first run's masks and overlay are not inputs
    assert sorted(p.name for p in (folder / "0masks").iterdir()) == [f"{image.stem}.png", "notes.txt", "segment_report.csv"]
    assert (folder / image.name).read_bytes() == kept
    png = tmp_path / "png"
    png.mkdir()
    Image.fromarray((read_image(image) * 255).astype(np.uint8)).save(png / "film.png")
    rows = segment_images([png / "film.png"], load_segmenter(run), png)  # the API guards it too
    assert rows[0]["status"] == "error" and "its mask would replace the input" in rows[0]["message"]
    assert np.unique(np.asarray(Image.open(png / "film.png"))).size > 2  # still the film, not a mask
    with pytest.raises(ConfigError, match="holds an earlier run .* remove_run"):  # png now holds that call's report
        segment_images([image], load_segmenter(run), png)
    # A file of the user's where a mask or an overlay would go is kept; that input alone is an error row.
    mine = tmp_path / "mine"
    (mine / "overlays").mkdir(parents=True)
    (mine / "overlays" / f"{image.stem}.png").write_bytes(b"the user's own")
    res = runner.invoke(app, ["segment", str(image), str(png / "film.png"), "--model", str(run), "--out", str(mine),
                              "--overlay"])
    assert res.exit_code == 1 and "1 ok, 0 flagged, 1 error" in res.output, res.output
    assert f"{image.stem}.png, already there and not written by this run" in res.output
    assert (mine / "overlays" / f"{image.stem}.png").read_bytes() == b"the user's own"
    assert not (mine / f"{image.stem}.png").exists() and (mine / "film.png").is_file()
    (run / "best.pt").rename(run / "best.keep")
    torch.save(get_model("fcdensenet67").state_dict(), run / "best.pt")  # another network's weights
    res = runner.invoke(app, ["segment", str(image), "--model", str(run), "--out", str(tmp_path / "z")])
    assert res.exit_code == 2 and "weights do not fit architecture 'fcdensenet56'" in res.output, res.output
    (run / "best.keep").replace(run / "best.pt")
    res = runner.invoke(app, ["segment", str(tmp_path / "nothing.png"), "--model", str(run), "--out", str(tmp_path / "y")])
    assert res.exit_code == 2 and "nothing.png: no such file or folder" in res.output  # nothing done
    assert not (tmp_path / "y").exists()  # not even the output folder

    res = runner.invoke(app, ["segment", str(image), "--model", str(tmp_path), "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "neither a bundle" in res.output
    res = runner.invoke(app, ["segment", str(image), "--model", str(tmp_path / "nonexist"), "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "nonexist: no such bundle or run folder" in res.output

    # A finished run is not trained over by mistake, and a resume keeps the split it started with.
    again = ["train", "seg", "--config", str(recipe), "--manifest", str(manifest), "--out", str(run)]
    res = runner.invoke(app, again)
    assert res.exit_code == 2 and "already holds a training run" in res.output
    res = runner.invoke(app, again + ["--resume", "--epochs", "2"])
    assert res.exit_code == 0, res.output
    recipe.write_text(yaml.safe_dump({**yaml.safe_load(recipe.read_text()), "seed": 7}))
    res = runner.invoke(app, again + ["--resume", "--epochs", "3"])
    assert res.exit_code == 2 and "cannot resume with another seed" in res.output
    recipe.write_text(yaml.safe_dump({**yaml.safe_load(recipe.read_text()), "seed": 0}))
    moved = tmp_path / "moved" / "pairs.csv"  # the same pairs under another path: resumable
    moved.parent.mkdir()
    shutil.copy(manifest, moved)
    res = runner.invoke(app, [*again[:5], str(moved), *again[6:], "--resume", "--epochs", "3"])
    assert res.exit_code == 0, res.output
    lines = manifest.read_text().splitlines()
    manifest.write_text("\n".join(lines[:1] + lines[2:]) + "\n")  # a pair removed: the split would change
    res = runner.invoke(app, again + ["--resume", "--epochs", "4"])
    assert res.exit_code == 2 and "changed since the run started" in res.output, res.output
    res = runner.invoke(app, ["segment", str(image), "--model", str(run), "--out", str(tmp_path / "w"), "--device", "cuda:7"])
    assert res.exit_code == 2 and "cuda:7" in res.output and "Traceback" not in res.output
