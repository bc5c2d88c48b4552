"""Builders on small fake source layouts made of tiny real images."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
from PIL import Image

from patchflannel.data.builders import build_covid_collection, build_kermany, collection_label
from patchflannel.data.manifest import read_manifest, write_manifest
from patchflannel.errors import ManifestError


def _image(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (16, 12), color=128).save(path)


# (patientid, finding, view, modality, filename, expected label or left-out reason)
COLLECTION = [
    ("1", "Pneumonia/Viral/COVID-19", "PA", "X-ray", "c1.jpg", "covid"),
    ("1", "COVID-19", "AP", "X-ray", "c2.png", "covid"),
    ("2", "COVID-19, ARDS", "AP Supine", "X-ray", "c3.jpeg", "covid"),
    ("3", "Pneumonia/Viral/SARS", "PA", "X-ray", "v1.jpg", "viral"),
    ("4", "Influenza", "AP semi erect", "X-ray", "v2.jpg", "viral"),
    ("5", "Pneumonia/Bacterial/Staphylococcus/MRSA", "PA", "X-ray", "b1.jpg", "bacterial"),
    ("6", "Klebsiella", "AP", "X-ray", "b2.jpg", "bacterial"),
    ("7", "No Finding", "PA", "X-ray", "n1.jpg", "normal"),
    ("7", "No Finding", "L", "X-ray", "n2.jpg", "view L"),
    ("8", "COVID-19", "Axial", "CT", "ct1.jpg", "modality CT"),
    ("9", "Pneumonia/Fungal/Pneumocystis", "PA", "X-ray", "f1.jpg", "finding: fungal"),
    ("10", "ARDS", "AP", "X-ray", "a1.jpg", "finding: ARDS"),
    ("11", "Pneumonia/Lipoid", "PA", "X-ray", "l1.jpg", "finding: lipoid"),
    ("12", "Pneumonia", "PA", "X-ray", "p1.jpg", "finding: unspecified pneumonia"),
    ("13", "todo", "PA", "X-ray", "t1.jpg", "finding: other finding"),
    ("14", "COVID-19, Streptococcus", "PA", "X-ray", "m1.jpg", "finding: combined findings"),
    ("15", "COVID-19", "PA", "X-ray", "missing.jpg", "image file not found"),
    ("16", "COVID-19", "PA", "X-ray", "c1.jpg", "duplicate file name"),
    ("", "COVID-19", "PA", "X-ray", "c4.jpg", "no patient id"),
]
LABELS = {"covid", "viral", "bacterial", "normal"}


@pytest.fixture
def collection(tmp_path: Path) -> tuple[Path, Path]:
    """A metadata.csv in a shuffled column order (with extra columns) and its images folder."""
    images = tmp_path / "covid-chestxray-dataset" / "images"
    header = ["filename", "license", "view", "sex", "finding", "folder", "modality", "patientid", "url"]
    metadata = images.parent / "metadata.csv"
    images.mkdir(parents=True)
    with metadata.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=header)
        writer.writeheader()
        for patient, finding, view, modality, filename, _ in COLLECTION:
            writer.writerow(
                {"filename": filename, "license": "CC BY 4.0", "view": view, "sex": "F", "finding": finding,
                 "folder": "images", "modality": modality, "patientid": patient, "url": "http://x"}
            )  # fmt: skip
            if filename != "missing.jpg":
                _image(images / filename)
    return metadata, images


def test_covid_collection_mapping_and_report(collection: tuple[Path, Path], tmp_path: Path) -> None:
    metadata, images = collection
    build = build_covid_collection(metadata, images)

    expected = {}
    for patient, _, view, _, filename, outcome in COLLECTION:
        if outcome in LABELS and filename not in expected:
            recorded = "AP Supine" if view == "AP Supine" else view.split()[0]
            expected[filename] = (outcome, recorded, f"ieee8023:{patient}")
    got = {row["original_name"]: (row["label"], row["view"], row["patient_id"]) for row in build.rows}
    assert got == expected
    for row in build.rows:
        assert row["source"] == "ieee8023" and row["license"] == "CC BY 4.0"
        assert Path(row["path"]) == (images / row["original_name"]).resolve()

    report = build.report.to_dict()
    assert report["kept"] == {"covid": 3, "viral": 2, "bacterial": 2, "normal": 1}
    left_out = [outcome for *_, outcome in COLLECTION if outcome not in LABELS]
    assert report["left_out"] == {reason: left_out.count(reason) for reason in left_out}
    assert report["kept_total"] + report["left_out_total"] == len(COLLECTION)
    assert report["examples"]["view L"] == ["n2.jpg (No Finding)"]

    saved = json.loads(build.report.write_json(tmp_path / "report.json").read_text())
    assert saved == report


def test_covid_collection_early_flat_layout(tmp_path: Path) -> None:
    """Early versions: 'Patientid', no modality column (CT is a view), a ' url' column, flat findings."""
    images = tmp_path / "images"
    rows = [("1", "SARS", "PA", "s.jpg"), ("2", "Streptococcus", "PA", "b.jpg"), ("3", "COVID-19", "CT", "ct.jpg")]
    lines = ["Patientid,offset,finding,view,filename, url"]
    for patient, finding, view, filename in rows:
        lines.append(f"{patient},0,{finding},{view},{filename},http://x")
        _image(images / filename)
    metadata = tmp_path / "metadata.csv"
    metadata.write_text("\n".join(lines) + "\n", encoding="utf-8")

    build = build_covid_collection(metadata, images)
    assert [(row["label"], row["patient_id"], row["license"]) for row in build.rows] == [
        ("viral", "ieee8023:1", ""),
        ("bacterial", "ieee8023:2", ""),
    ]
    assert dict(build.report.left_out) == {"view CT": 1}


def test_covid_collection_missing_column_is_named(tmp_path: Path) -> None:
    metadata = tmp_path / "metadata.csv"
    metadata.write_text("patientid,view,filename\n1,PA,a.jpg\n", encoding="utf-8")
    (tmp_path / "images").mkdir()
    with pytest.raises(ManifestError, match="missing column 'finding'") as caught:
        build_covid_collection(metadata, tmp_path / "images")
    assert caught.value.path == str(metadata)
    with pytest.raises(ManifestError, match="images folder not found"):
        metadata.write_text("patientid,finding,view,filename\n1,COVID-19,PA,a.jpg\n", encoding="utf-8")
        build_covid_collection(metadata, tmp_path / "nope")


@pytest.mark.parametrize(
    ("finding", "label"),
    [
        ("Pneumonia/Viral/COVID-19", "covid"),
        ("covid-19", "covid"),
        ("Pneumonia/Viral/Influenza/H1N1", "viral"),
        ("Pneumonia/Viral/Herpes ", "viral"),
        ("MERS-CoV", "viral"),
        ("Varicella", "viral"),
        ("Pneumonia/Bacterial/Klebsiella", "bacterial"),
        ("E.Coli", "bacterial"),
        ("Mycoplasma Bacterial Pneumonia", "bacterial"),
        ("No Finding", "normal"),
        ("Pneumonia/Fungal/Aspergillosis", None),
        ("Pneumocystis", None),
        ("Pneumonia/Aspiration", None),
        ("Tuberculosis", None),
        ("", None),
        # flat names of early versions, read by their words (the collection's SCHEMA.md lists these)
        ("Herpes pneumonia", "viral"),
        ("Herpes pneumonia, ARDS", "viral"),
        ("Swine-Origin Influenza A (H1N1) Viral Pneumonia", "viral"),
        ("Invasive Aspergillosis", None),
        ("Allergic bronchopulmonary aspergillosis", None),
        ("Pneumonia/Viral/COVID-19/", "covid"),  # a trailing slash: no empty leaf
        ("No Finding, ARDS", None),  # ARDS contradicts "No Finding"
        ("COVID-19, ARDS", "covid"),
        ("/", None),
        # one COVID rule for both styles, at any level, and "non-COVID" is not COVID
        ("Pneumonia/Viral/SARS-CoV-2", "covid"),
        ("SARS-CoV-2", "covid"),
        ("Pneumonia/Viral/COVID-19/ARDS", "covid"),
        ("Non-COVID viral", "viral"),
        ("COVID19", "covid"),
    ],
)
def test_collection_label(finding: str, label: str | None) -> None:
    got, reason = collection_label(finding)
    assert got == label
    assert (reason == "") == (label is not None)


def test_flat_fungal_findings_are_counted_as_fungal() -> None:
    assert collection_label("Invasive Aspergillosis") == (None, "fungal")
    assert collection_label("No Finding, ARDS") == (None, "combined findings")


@pytest.fixture
def kermany(tmp_path: Path) -> Path:
    """train/ and test/ splits of NORMAL/ and PNEUMONIA/, with junk a real download carries."""
    root = tmp_path / "chest_xray"
    for name in [
        "train/NORMAL/IM-0115-0001.jpeg",
        "train/NORMAL/IM-0115-0002.jpeg",
        "train/NORMAL/NORMAL2-IM-1427-0001.jpeg",
        "train/PNEUMONIA/person1_bacteria_1.jpeg",
        "train/PNEUMONIA/Person1_virus_6.jpeg",  # the same patient as person1_: one patient id
        "test/PNEUMONIA/person22_virus_55.jpeg",
        "test/PNEUMONIA/person3_bacteria_10.png",
        "test/NORMAL/IM-0001-0001.jpeg",
        "test/PNEUMONIA/scan_0001.jpeg",
        "test/NORMAL/unnamed.jpeg",
        "__MACOSX/train/NORMAL/IM-0115-0001.jpeg",
        "chest_xray/train/NORMAL/IM-0115-0001.jpeg",  # the Kaggle archive's second copy of the set
    ]:
        _image(root / name)
    (root / "train" / "NORMAL" / ".DS_Store").write_bytes(b"\0")
    return root


def test_kermany_labels_patients_and_report(kermany: Path) -> None:
    build = build_kermany(kermany)
    got = {row["original_name"]: (row["label"], row["patient_id"]) for row in build.rows}
    assert got == {
        "train/NORMAL/IM-0115-0001.jpeg": ("normal", "kermany:IM-0115"),
        "train/NORMAL/IM-0115-0002.jpeg": ("normal", "kermany:IM-0115"),
        "train/NORMAL/NORMAL2-IM-1427-0001.jpeg": ("normal", "kermany:NORMAL2-IM-1427"),
        "train/PNEUMONIA/person1_bacteria_1.jpeg": ("bacterial", "kermany:person1"),
        "train/PNEUMONIA/Person1_virus_6.jpeg": ("viral", "kermany:person1"),
        "test/PNEUMONIA/person22_virus_55.jpeg": ("viral", "kermany:person22"),
        "test/PNEUMONIA/person3_bacteria_10.png": ("bacterial", "kermany:person3"),
        "test/NORMAL/IM-0001-0001.jpeg": ("normal", "kermany:IM-0001"),
    }
    assert {(row["view"], row["source"]) for row in build.rows} == {("AP", "kermany")}
    report = build.report.to_dict()
    assert report["kept"] == {"covid": 0, "viral": 2, "bacterial": 2, "normal": 4}
    assert report["left_out_total"] == 3
    assert report["examples"] == {
        "PNEUMONIA/ file name not personN_bacteria_M or personN_virus_M": ["test/PNEUMONIA/scan_0001.jpeg"],
        "NORMAL/ file name without an IM-number": ["test/NORMAL/unnamed.jpeg"],
        "another copy of an image already kept (same split, class and file name)":
            ["chest_xray/train/NORMAL/IM-0115-0001.jpeg"],
    }


def test_kermany_build_writes_a_valid_manifest(kermany: Path) -> None:
    build = build_kermany(kermany)
    manifest = read_manifest(write_manifest(build.rows, kermany / "manifest.csv", build.columns))
    assert manifest.columns == build.columns
    assert manifest.rows == build.rows
    assert "train/PNEUMONIA/Person1_virus_6.jpeg" in (kermany / "manifest.csv").read_text()


def test_kermany_follows_linked_folders_once(kermany: Path, tmp_path: Path) -> None:
    """A split folder linked from elsewhere (``train -> /scratch/...``) is read; a link back up is not a loop."""
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "train").symlink_to(kermany / "train", target_is_directory=True)
    (kermany / "train" / "NORMAL" / "up").symlink_to(kermany / "train", target_is_directory=True)
    got = sorted(row["original_name"] for row in build_kermany(linked).rows)
    assert got == sorted(r["original_name"] for r in build_kermany(kermany).rows if r["original_name"].startswith("train/"))
    assert "train/NORMAL/IM-0115-0001.jpeg" in got


def test_kermany_without_images_is_an_error(tmp_path: Path) -> None:
    _image(tmp_path / "other" / "x.jpeg")
    with pytest.raises(ManifestError, match="no images found"):
        build_kermany(tmp_path)
    with pytest.raises(ManifestError, match="not found"):
        build_kermany(tmp_path / "absent")


def test_kermany_names_a_manifest_cannot_hold_are_left_out_and_odd_ones_kept_whole(kermany: Path) -> None:
    """A name that is not UTF-8 is left out with its reason (writing it raised a traceback); one holding a
    carriage return is written quoted and read back whole (it was split into two rows)."""
    _image(kermany / "train" / "PNEUMONIA" / "person4_virus_a\rb.jpeg")
    _image(Path(os.fsdecode(os.fsencode(kermany / "train" / "PNEUMONIA") + b"/person5_virus_\xff.jpeg")))
    build = build_kermany(kermany)
    assert build.report.to_dict()["examples"]["file name not valid UTF-8: rename it"] == [
        "train/PNEUMONIA/person5_virus_\\xff.jpeg"]
    manifest = read_manifest(write_manifest(build.rows, kermany / "manifest.csv", build.columns))
    assert manifest.rows == build.rows
    assert "train/PNEUMONIA/person4_virus_a\rb.jpeg" in {row["original_name"] for row in manifest.rows}
    written = (kermany / "manifest.csv").read_bytes()  # "\n" line ends (a splits file's sha256 is its record)
    assert b"\r\n" not in written and b',"train/PNEUMONIA/person4_virus_a\rb.jpeg"\n' in written


def test_kermany_folder_that_cannot_be_listed_is_named(kermany: Path, deny_access) -> None:  # noqa: ANN001
    """Its images were left out without a word (the build exited 0)."""
    locked = kermany / "test" / "NORMAL"
    deny_access("scandir", locked)
    with pytest.raises(ManifestError, match=f"{locked}: cannot list this folder \\(Permission denied\\)"):
        build_kermany(kermany)
