"""End-to-end `score` on real images mixed with broken files: rows, errors, exit codes, formats, order."""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import typer
from PIL import Image
from rich.console import Console
from typer.testing import CliRunner

from patchflannel.bundle import Bundle, default_preprocessing, entry_from_module, write_bundle
from patchflannel.classes import CLASSES
from patchflannel.cli.score import EXIT_INPUT_ERRORS, EXIT_USAGE, register
from patchflannel.errors import ConfigError, ManifestError
from patchflannel.models import get_model
from patchflannel.phantoms import write_phantoms
from patchflannel.scoring.run import EngineOptions, score
from patchflannel.scoring.writers import export_predictions, read_output
from patchflannel.training.report import read_predictions

K = 4


def mixed_bundle(root: Path) -> Path:
    """A random-weight bundle with a patch learner and a global learner.

    Random patch learners vote the same class for every patch, so every image would get the same
    probabilities; the global learner's softmax makes them differ per image, so row mix-ups show.
    """
    torch.manual_seed(0)
    seg = entry_from_module("segmentation", "fcdensenet56", get_model("fcdensenet56"), root, "segmentation.pt")
    learners = [
        entry_from_module("shufflenet_patch", "shufflenet_v2_x0_5", get_model("shufflenet_v2_x0_5"), root,
                          "learners/0.pt", mode="patch"),
        entry_from_module("squeezenet_global", "squeezenet1_1", get_model("squeezenet1_1"), root,
                          "learners/1.pt", mode="global"),
    ]
    ens = entry_from_module("ensemble", "flannel", get_model("flannel", n_learners=2), root, "ensemble.pt",
                            arch_config={"n_learners": 2})
    write_bundle(Bundle(root=root, name="test-mixed", classes=list(CLASSES), preprocessing=default_preprocessing(),
                        segmentation=seg, learners=learners, ensemble=ens, training={"note": "random weights"}))
    return root


def real_images(cxr4_dir: Path, n: int) -> list[Path]:
    """``n`` real images, one class after another, smallest files first (fast to read)."""
    classes = ("covid", "viral", "bacterial", "normal")
    per_class = [sorted((cxr4_dir / "images" / c).iterdir(), key=lambda p: p.stat().st_size) for c in classes]
    return [per_class[i % 4][i // 4] for i in range(n)]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return mixed_bundle(tmp_path_factory.mktemp("bundle"))


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory: pytest.TempPathFactory, cxr4_dir: Path) -> Path:
    """Real images plus the broken and unusual files of the issue."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder = tmp_path_factory.mktemp("mixed")
    real = real_images(cxr4_dir, 2)
    shutil.copy(real[0], folder / real[0].name)
    jpeg = real[1].read_bytes()
    (folder / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 3])
    (folder / "zero.png").write_bytes(b"")
    (folder / "text.png").write_text("this is not an image\n")
    grey = np.asarray(Image.open(real[0]).convert("L"))
    Image.fromarray(grey.astype(np.uint16) * 257).save(folder / "sixteen_bit.png")
    Image.fromarray(grey[:100, :100]).save(folder / "small_100.png")

    def dicom(name: str, pixels: np.ndarray | None) -> None:
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = "1.2.3.4.5", generate_uid(), "DX"
        if pixels is not None:
            ds.Rows, ds.Columns = pixels.shape
            ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
            ds.PixelData = (pixels.astype(np.uint16) * 16).tobytes()
        ds.save_as(folder / name, enforce_file_format=True)

    dicom("no_pixels.dcm", None)
    dicom("image.dcm", grey)
    return folder


BAD = {
    "truncated.jpg": "cannot decode JPEG",
    "zero.png": "empty file",
    "text.png": "not a recognised image format",
    "no_pixels.dcm": "no PixelData",
}


def _app() -> typer.Typer:
    app = typer.Typer()
    register(app)
    return app


def _by_name(path: Path) -> dict[str, dict]:
    table, _ = read_output(path)
    return {Path(r["path"]).name: r for r in table.to_pylist()}


def test_mixed_folder_scores_good_reports_bad(mixed_folder: Path, bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "scores.parquet"
    result = CliRunner().invoke(_app(), ["score", str(mixed_folder), "--out", str(out), "--bundle", str(bundle),
                                         "-k", str(K), "--chunk-size", "3"])
    assert result.exit_code == EXIT_INPUT_ERRORS, result.output
    assert "4 errors" in result.output and "1 flagged" in result.output
    assert "scored 3/8 (" in result.output and "scored 8/8 (" in result.output  # not a terminal: a line a chunk
    rows = _by_name(out)
    assert len(rows) == 1 + len(BAD) + 3  # every input exactly once
    for name, reason in BAD.items():
        row = rows[name]
        assert row["status"] == "error" and row["pred"] is None and row["p_covid"] is None
        assert str(mixed_folder / name) in row["error"] and reason in row["error"], row["error"]
    good = [r for r in rows.values() if r["status"] != "error"]
    for row in good:
        p = [row[f"p_{c}"] for c in CLASSES]
        assert sum(p) == pytest.approx(1.0, abs=1e-5) and row["pred"] == CLASSES[int(np.argmax(p))]
        assert sum(row[f"shufflenet_patch_{c}"] for c in CLASSES) == pytest.approx(1.0)
        assert row["k"] == K and row["seed"] == 0 and row["backend"] == "torch" and len(row["content_hash"]) == 64
    assert rows["small_100.png"]["status"] == "flagged" and "small_image" in rows["small_100.png"]["flags"]
    assert rows["sixteen_bit.png"]["status"] == "ok"
    assert rows["image.dcm"]["study_instance_uid"] == "1.2.3.4.5" and rows["image.dcm"]["sop_instance_uid"]
    assert rows["no_pixels.dcm"]["status"] == "error" and rows["no_pixels.dcm"]["study_instance_uid"] == "1.2.3.4.5"
    assert rows["no_pixels.dcm"]["sop_instance_uid"]  # an error row still names the instance
    assert len({r["p_covid"] for r in good}) > 1  # the rows differ per image


@pytest.mark.slow
def test_order_batching_and_format_do_not_change_rows(mixed_folder: Path, bundle: Path, tmp_path: Path) -> None:
    files = sorted(p for p in mixed_folder.iterdir() if p.name in BAD or p.name == "small_100.png" or p.suffix == ".dcm")
    terminal_a, terminal_b = (Console(file=io.StringIO(), force_terminal=True, width=120) for _ in range(2))
    a = score(files, tmp_path / "a.parquet", options=EngineOptions(bundle=str(bundle), k=K), chunk_size=2,
              console=terminal_a)
    b = score(files[::-1], tmp_path / "b.jsonl", options=EngineOptions(bundle=str(bundle), k=K), chunk_size=100,
              quiet=True, console=terminal_b)
    assert "img/s" in terminal_a.file.getvalue() and f"{len(files)}/{len(files)}" in terminal_a.file.getvalue()
    assert terminal_b.file.getvalue() == ""  # --quiet: no bar even on a terminal
    assert (a.rows, a.errors) == (b.rows, b.errors) == (len(files), 4)
    rows_a, rows_b = _by_name(tmp_path / "a.parquet"), _by_name(tmp_path / "b.jsonl")
    assert list(rows_a) == [p.name for p in files] and list(rows_b) == [p.name for p in files[::-1]]
    assert rows_a == rows_b  # identical values, bit for bit


def test_a_resume_says_which_stored_rows_it_drops(mixed_folder: Path, bundle: Path, tmp_path: Path) -> None:
    files = sorted(p for p in mixed_folder.iterdir() if p.suffix == ".dcm")[:2]
    options = EngineOptions(bundle=str(bundle), k=K)
    score(files, tmp_path / "s.csv", options=options, quiet=True)
    with pytest.raises(ConfigError, match="already exists"):  # refused: its lock must not outlive the call
        score(files, tmp_path / "s.csv", options=options, quiet=True)
    with pytest.raises(ConfigError, match="ray_batch_size must be at least 1, got 0"):  # before Ray starts
        score(files, tmp_path / "r.csv", options=options, ray=True, ray_batch_size=0, quiet=True)
    assert not (tmp_path / "r.csv").exists()
    with pytest.raises(ConfigError, match="unknown precision"):  # refused after the output was locked
        score(files, tmp_path / "new" / "deeper" / "s.csv", options=EngineOptions(bundle=str(bundle), precision="fp8"),
              quiet=True)
    assert not (tmp_path / "new").exists()  # the folders made for it are gone again
    with pytest.raises(ConfigError, match=r"different precision \(precision fp32 there, bf16 now\)"):
        score(files, tmp_path / "s.csv", options=EngineOptions(bundle=str(bundle), k=K, precision="bf16"), resume=True,
              quiet=True)  # rows at two precisions never mix in one output
    log = Console(file=io.StringIO(), width=200)
    again = score(files[:1], tmp_path / "s.csv", options=options, resume=True, console=log)
    assert again.rows == 1 and again.scored_now == 0
    assert "resume: 1 stored rows of files not among these inputs are left out of" in log.file.getvalue()
    assert "resume: 2 rows stored; hashing their files again" in log.file.getvalue()
    assert not (tmp_path / "s.csv.lock").exists()


def test_manifest_columns_carried_eval_export_and_rerun_refused(cxr4_dir: Path, bundle: Path, tmp_path: Path) -> None:
    image = real_images(cxr4_dir, 1)[0]
    (tmp_path / "zero.png").write_bytes(b"")
    manifest = tmp_path / "m.csv"
    Image.fromarray(np.zeros((300, 300), np.uint8)).save(tmp_path / "black.png")
    manifest.write_text(f"path,label,patient_id,source,license,split\n{image},covid,pt0,src0,CC,train\n"
                        "zero.png,normal,pt1,src1,CC,test\nblack.png,normal,pt2,src2,CC,test\n")
    out = tmp_path / "out.csv"
    runner = CliRunner()
    result = runner.invoke(_app(), ["score", str(manifest), "--out", str(out), "--bundle", str(bundle), "-k", str(K),
                                    "--predictions", str(tmp_path / "pred.csv")])
    assert result.exit_code == EXIT_INPUT_ERRORS and "1 predictions for `patchflannel eval`" in result.output
    assert "1 with flag blank_image (no result to trust)" in result.output  # a blank film's "diagnosis" is not graded
    assert "carry no split" not in result.output  # the manifest's split column is carried
    table, meta = read_output(out)
    assert table.column_names[:4] == ["path", "label", "patient_id", "source"]
    assert table.column("label").to_pylist() == ["covid", "normal", "normal"]
    assert table.column("patient_id").to_pylist() == ["pt0", "pt1", "pt2"]
    assert meta["bundle"]["name"] == "test-mixed" and meta["engine"]["device"] == "cpu" and meta["config"]["k"] == K
    (pred,) = read_predictions(tmp_path / "pred.csv")
    row = table.to_pylist()[0]
    assert (pred["path"], pred["label"], pred["patient_id"], pred["model"], pred["fold"], pred["split"]) == (
        str(image), "covid", "pt0", "test-mixed", "all", "train")  # a carried split is kept
    assert pred["pred"] == row["pred"] and pred["probs"] == pytest.approx([row[f"p_{c}"] for c in CLASSES], abs=1e-6)
    result = runner.invoke(_app(), ["score", str(manifest), "--out", str(out), "--bundle", str(bundle)])
    assert result.exit_code == EXIT_USAGE and "already exists" in result.output
    result = runner.invoke(_app(), ["score", str(image), "--out", str(tmp_path / "half.csv"), "--bundle", str(bundle),
                                    "-k", "1", "--precision", "fp16", "--device", "cpu"])
    assert result.exit_code == 0 and "note: fp16 on a CPU is slow" in result.output, result.output


def test_outputs_never_replace_an_input_or_each_other(cxr4_dir: Path, bundle: Path, tmp_path: Path) -> None:
    image = Path(shutil.copy(real_images(cxr4_dir, 1)[0], tmp_path / "film.jpg"))  # a copy: the test may fail
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"path,label\n{image},covid\n")
    kept = manifest.read_text()
    (tmp_path / "old.csv").write_text("a predictions file of another run\n")
    runner = CliRunner()
    base = ["score", str(manifest), "--bundle", str(bundle), "-k", str(K)]
    cases = [
        (["--out", str(tmp_path / "o.csv"), "--predictions", str(tmp_path / "o.csv")], "o.csv: is the output"),
        (["--out", str(tmp_path / "o.csv"), "--predictions", str(manifest)], "m.csv: is one of the inputs"),
        (["--out", str(manifest), "--overwrite"], "m.csv: is one of the inputs"),
        (["--out", str(tmp_path / "o.csv"), "--predictions", str(tmp_path / "old.csv")], "old.csv: already exists"),
        (["--out", str(tmp_path / "o.csv"), "--predictions", str(image), "--overwrite"],
         "film.jpg: is one of the inputs"),  # an image the manifest lists
        (["--out", str(tmp_path / "o.csv"), "--predictions", str(tmp_path / "old.csv" / "p.csv")],
         "p.csv: a file is in the way where a folder is wanted"),  # checked before scoring, not after
        (["--out", str(tmp_path / "folder.csv")], "folder.csv: a folder is in the way where the output file goes"),
        (["--out", str(tmp_path / "folder.csv"), "--overwrite"], "a folder is in the way"),
        (["--out", str(tmp_path)], "a folder is in the way where the output file goes"),  # not "unknown extension"
        (["--out", str(tmp_path / "old.csv" / "o.csv")], "o.csv: a file is in the way where a folder is wanted"),
    ]
    cases.append((["--out", str(tmp_path / "o.csv"), "--ray-address", "127.0.0.1:1"], "127.0.0.1:1: nothing answers"))
    cases.append((["--out", str(tmp_path / "o.csv"), "--ray-address", "headnode"], "expected host:port"))
    if os.path.isdir("/proc"):  # no file can be made there, even by root, to whom os.access says yes
        cases.append((["--out", str(tmp_path / "o.csv"), "--predictions", "/proc/p.csv"], "p.csv: cannot be written there"))
        cases.append((["--out", "/proc/o.csv"], "o.csv: cannot be written there"))
    (tmp_path / "folder.csv").mkdir()
    for args, message in cases:
        result = runner.invoke(_app(), base + args)
        assert result.exit_code == EXIT_USAGE and message in result.output, (args, result.output)
    assert manifest.read_text() == kept and not (tmp_path / "o.csv").exists()
    assert image.read_bytes() == real_images(cxr4_dir, 1)[0].read_bytes()


def test_a_resume_takes_the_corrected_manifest_and_odd_file_names(cxr4_dir: Path, bundle: Path, tmp_path: Path) -> None:
    """Stored rows take the manifest's columns as they are now; a file name that is not valid UTF-8 is scored
    (read by its own name, written escaped) and resumed like any other."""
    images = real_images(cxr4_dir, 2)
    odd = tmp_path / os.fsdecode(b"scan-\xff.jpg")
    shutil.copy(images[1], odd)
    manifest = tmp_path / "m.csv"
    manifest.write_bytes(b"path,label\n" + os.fsencode(images[0]) + b",covid\n" + os.fsencode(odd) + b",normal\n")
    with pytest.raises(ManifestError):  # the manifest is UTF-8 text: such a name cannot be listed there
        score([manifest], tmp_path / "x.parquet", options=EngineOptions(bundle=str(bundle), k=K), quiet=True)
    manifest.write_text(f"path,label\n{images[0]},covid\n")
    options = EngineOptions(bundle=str(bundle), k=K)
    first = score([manifest, tmp_path], tmp_path / "o.parquet", options=options, quiet=True,
                  predictions=tmp_path / "p.csv")
    assert (first.rows, first.ok + first.flagged, first.predictions) == (2, 2, (1, {"no label": 1}, 1))
    table, _ = read_output(tmp_path / "o.parquet")
    assert table.column("path").to_pylist() == [str(images[0]), str(tmp_path / "scan-\\xff.jpg")]
    manifest.write_text(f"path,label\n{images[0]},viral\n")  # corrected
    again = score([manifest, tmp_path], tmp_path / "o.parquet", options=options, resume=True, quiet=True,
                  predictions=tmp_path / "p.csv")
    assert (again.scored_now, again.rows) == (0, 2)
    assert read_output(tmp_path / "o.parquet")[0].column("label").to_pylist() == ["viral", ""]
    assert [r["label"] for r in read_predictions(tmp_path / "p.csv")] == ["viral"]
    manifest.write_text(f"path,label\n{images[0]},Viral\n")  # not a class: left out, and said so
    result = CliRunner().invoke(_app(), ["score", str(manifest), str(tmp_path), "--out", str(tmp_path / "o.parquet"),
                                         "--bundle", str(bundle), "-k", str(K), "--resume",
                                         "--predictions", str(tmp_path / "p2.csv")])
    assert result.exit_code == 0, result.output
    assert "0 predictions for `patchflannel eval`; left out: 1 with no label, 1 with label 'Viral' (not a class)" in (
        result.output) and "a manifest's labels are covid, viral, bacterial, normal" in result.output
    manifest.write_text(f"path,label\n{images[0]},viral\n")  # no split column: said to be no held-out test
    result = CliRunner().invoke(_app(), ["score", str(manifest), str(tmp_path), "--out", str(tmp_path / "o.parquet"),
                                         "--bundle", str(bundle), "-k", str(K), "--resume",
                                         "--predictions", str(tmp_path / "p3.csv")])
    assert result.exit_code == 0 and "note: 1 of them carry no split" in result.output, result.output
    # Many distinct wrong labels: the five commonest by name, the others counted together.
    table = read_output(tmp_path / "o.parquet")[0].slice(0, 1)
    labels = ["Covid"] * 3 + ["a", "b", "c", "d", "e", "f", "normal"]
    rows = [dict(table.to_pylist()[0], path=f"img{i}.jpg", label=label) for i, label in enumerate(labels)]
    many = tmp_path / "many.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), many)
    shutil.copy(tmp_path / "o.parquet.meta.json", tmp_path / "many.parquet.meta.json")
    written, left_out, unsplit = export_predictions(many, tmp_path / "many.csv")
    assert written == unsplit == 1 and left_out == {"label 'Covid' (not a class)": 3, **{f"label {x!r} (not a class)": 1 for x in "abcd"},
                                         "another label that is not a class": 2}


def test_a_link_to_nowhere_with_an_odd_name_is_an_error_row(cxr4_dir: Path, bundle: Path, tmp_path: Path) -> None:
    """Its error names it as the output does (escaped): the reader's own message held the raw name, which the
    output cannot store, and stopped the batch."""
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(real_images(cxr4_dir, 1)[0], folder / "film.jpg")
    os.symlink(tmp_path / "gone.png", folder / os.fsdecode(b"gone-\xff.png"))
    summary = score([folder], tmp_path / "o.parquet", options=EngineOptions(bundle=str(bundle), k=K), quiet=True)
    assert (summary.rows, summary.errors) == (2, 1)
    (row,) = [r for r in read_output(tmp_path / "o.parquet")[0].to_pylist() if r["status"] == "error"]
    assert row["path"] == str(folder / "gone-\\xff.png") and row["error"] == f"{row['path']}: file not found"


def test_usage_errors_exit_2(tmp_path: Path, bundle: Path, mixed_folder: Path) -> None:
    runner = CliRunner()
    tampered = shutil.copytree(bundle, tmp_path / "tampered")
    with open(tampered / "ensemble.pt", "ab") as fh:
        fh.write(b"x")
    cases = [
        (["score", str(tmp_path / "absent"), "--out", str(tmp_path / "o.parquet")], "no such file or folder"),
        (["score", str(mixed_folder), "--out", str(tmp_path / "o.csv"), "--bundle", str(tampered)], "sha256 mismatch"),
        (["score", str(mixed_folder), "--out", str(tmp_path / "o.txt"), "--bundle", str(bundle)], "unknown output extension"),
        (["score", str(mixed_folder), "--out", str(tmp_path / "o.csv"), "--bundle", str(tmp_path)], "no bundle.json"),
        (["score", str(mixed_folder), "--out", str(tmp_path / "o.csv"), "--device", "gpu"], "unknown device 'gpu'"),
        (["score", str(mixed_folder), "--out", str(tmp_path / "o.csv"), "--resume", "--overwrite"], "exclude each other"),
        (["score", str(mixed_folder), "--out", str(tmp_path / "o.csv"), "--actors", "2"], "Ray setting"),
        (["score", str(mixed_folder), "--out", str(tmp_path / "o.csv"), "--ray", "--actors", "0"], "actors must be at least 1"),
        (["score", str(mixed_folder), "--out", str(tmp_path / "f" / "o.csv"), "--bundle", str(bundle)],
         "o.csv: a file is in the way where a folder is wanted"),
    ]
    (tmp_path / "f").write_text("a file, not a folder")
    for args, message in cases:
        result = runner.invoke(_app(), args)
        assert result.exit_code == EXIT_USAGE and message in result.output, result.output
    assert not (tmp_path / "o.csv").exists() and not (tmp_path / "o.csv.parts").exists()


def test_phantoms_command_and_a_clean_run_exits_0(tmp_path: Path, bundle: Path) -> None:
    result = CliRunner().invoke(_app(), ["phantoms", str(tmp_path / "demo"), "-n", "3", "--size", "256"])
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in (tmp_path / "demo").iterdir())
    assert names == ["README.txt", "synthetic_phantom_00.png", "synthetic_phantom_01.png", "synthetic_phantom_02.png"]
    assert "SYNTHETIC" in (tmp_path / "demo" / "README.txt").read_text()
    a = np.asarray(Image.open(tmp_path / "demo" / "synthetic_phantom_00.png"))
    b = np.asarray(Image.open(tmp_path / "demo" / "synthetic_phantom_01.png"))
    assert a.shape == (256, 256) and a.dtype == np.uint8 and not np.array_equal(a, b)
    assert a[128, 40:80].mean() + 60 < a[128, 118:138].mean()  # dark lung field beside the bright spine
    clash = CliRunner().invoke(_app(), ["phantoms", str(tmp_path / "demo" / "README.txt")])
    assert clash.exit_code == 2 and "README.txt: a file is in the way where a folder is wanted" in clash.output
    rerun = CliRunner().invoke(_app(), ["phantoms", str(tmp_path / "demo"), "-n", "1", "--size", "256"])
    assert rerun.exit_code == 0 and "wrote 1 synthetic phantom(s)" in rerun.output  # one set, not two mixed
    assert sorted(p.name for p in (tmp_path / "demo").iterdir()) == ["README.txt", "synthetic_phantom_00.png"]
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "README.txt").write_text("my notes")
    refused = CliRunner().invoke(_app(), ["phantoms", str(tmp_path / "notes")])
    assert refused.exit_code == 2 and "holds files that are not phantoms (README.txt)" in refused.output
    assert (tmp_path / "notes" / "README.txt").read_text() == "my notes"
    again = write_phantoms(tmp_path / "again", 1, size=256)
    assert again[0].read_bytes() == (tmp_path / "demo" / "synthetic_phantom_00.png").read_bytes()  # deterministic
    result = CliRunner().invoke(_app(), ["score", str(tmp_path / "again"), "--out", str(tmp_path / "s.parquet"),
                                         "--bundle", str(bundle), "-k", str(K)])
    assert result.exit_code == 0 and "1 rows: " in result.output and " 0 errors" in result.output, result.output
    summary = score(tmp_path / "again", tmp_path / "one.csv", options=EngineOptions(bundle=str(bundle), k=K), quiet=True)
    _, meta = read_output(tmp_path / "one.csv")  # one source, not a list: taken whole, recorded whole
    assert summary.rows == 1 and meta["config"]["inputs"] == [str(tmp_path / "again")]

