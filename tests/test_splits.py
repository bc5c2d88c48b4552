"""Patient-grouped, label-stratified splits of the real cxr4 manifest."""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path

import pytest

from patchflannel.classes import CLASSES
from patchflannel.data.manifest import REQUIRED_COLUMNS, Row, read_manifest, write_manifest
from patchflannel.data.splits import SPLIT_COLUMNS, make_splits
from patchflannel.errors import ConfigError, ManifestError

FOLDS = 5


@pytest.fixture(scope="module")
def rows(cxr4_dir: Path) -> list[Row]:
    return read_manifest(cxr4_dir / "manifest.csv").rows


@pytest.fixture(scope="module")
def split_rows(rows: list[Row]) -> list[Row]:
    return make_splits(rows, seed=0, test_frac=0.2, folds=FOLDS)


def _partition(row: Row) -> str:
    return "test" if row["split"] == "test" else f"fold {row['fold']}"


def test_rows_are_kept_and_annotated(rows: list[Row], split_rows: list[Row]) -> None:
    assert [{k: v for k, v in row.items() if k not in SPLIT_COLUMNS} for row in split_rows] == rows
    assert all("split" not in row for row in rows)  # input not modified
    for row in split_rows:
        if row["split"] == "test":
            assert row["fold"] == ""
        else:
            assert row["split"] == "train" and row["fold"] in {str(k) for k in range(FOLDS)}
    assert {_partition(row) for row in split_rows} == {"test", *(f"fold {k}" for k in range(FOLDS))}


def test_no_patient_in_two_partitions(split_rows: list[Row]) -> None:
    partitions: dict[str, set[str]] = defaultdict(set)
    labels: dict[str, set[str]] = defaultdict(set)
    for row in split_rows:
        partitions[row["patient_id"]].add(_partition(row))
        labels[row["patient_id"]].add(row["label"])
    assert any(len(found) > 1 for found in labels.values()), "cxr4 should hold patients with two labels"
    crossing = {patient: found for patient, found in partitions.items() if len(found) > 1}
    assert crossing == {}


def test_class_mix_of_each_partition_within_5_points(split_rows: list[Row]) -> None:
    whole = Counter(row["label"] for row in split_rows)
    by_partition: dict[str, Counter[str]] = defaultdict(Counter)
    for row in split_rows:
        by_partition[_partition(row)][row["label"]] += 1
    for name, counts in by_partition.items():
        size = sum(counts.values())
        for label in CLASSES:
            gap = abs(counts[label] / size - whole[label] / len(split_rows))
            assert gap < 0.05, f"{name}: {label} share off by {100 * gap:.1f} points"


def test_test_fraction_is_about_a_fifth(split_rows: list[Row]) -> None:
    test_share = sum(row["split"] == "test" for row in split_rows) / len(split_rows)
    assert 0.17 <= test_share <= 0.23
    fold_sizes = Counter(row["fold"] for row in split_rows if row["split"] == "train")
    assert max(fold_sizes.values()) - min(fold_sizes.values()) <= 0.1 * max(fold_sizes.values())


def test_deterministic_for_a_seed_and_different_across_seeds(rows: list[Row], split_rows: list[Row]) -> None:
    assert make_splits(rows, seed=0) == split_rows
    other = make_splits(rows, seed=1)
    assert [_partition(row) for row in other] != [_partition(row) for row in split_rows]
    test_0 = {row["path"] for row in split_rows if row["split"] == "test"}
    test_1 = {row["path"] for row in other if row["split"] == "test"}
    assert test_0 != test_1


def test_other_fractions_and_fold_counts(rows: list[Row]) -> None:
    split = make_splits(rows, seed=3, test_frac=0.25, folds=3)
    assert {row["fold"] for row in split if row["split"] == "train"} == {"0", "1", "2"}
    assert 0.21 <= sum(row["split"] == "test" for row in split) / len(split) <= 0.29


def test_splits_file_round_trips_and_validates(tmp_path: Path, split_rows: list[Row]) -> None:
    columns = [*REQUIRED_COLUMNS, "license", "original_name", *SPLIT_COLUMNS]
    back = read_manifest(write_manifest(split_rows, tmp_path / "splits.csv", columns))
    assert back.rows == split_rows


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"test_frac": 0.0}, r"test_frac \(--test-frac\) must be in"),
        ({"test_frac": 0.7}, r"test_frac \(--test-frac\) must be in"),
        ({"test_frac": 0.3}, r"test_frac \(--test-frac\) must be 1/n .* 0.3 would give 1/3 = 0.333"),
        ({"folds": 1}, "folds must be at least 2"),
    ],
)
def test_bad_options_are_refused(rows: list[Row], kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make_splits(rows, **kwargs)


def test_too_few_patients_is_a_clear_error(rows: list[Row]) -> None:
    three = list(dict.fromkeys(row["patient_id"] for row in rows))[:3]
    few = [row for row in rows if row["patient_id"] in three]
    with pytest.raises(ConfigError, match="needs at least 9 patients; the manifest has 3"):
        make_splits(few)


def _synthetic(per_class: dict[str, int], images: int = 1) -> list[Row]:
    return [{"path": f"{label}{p}_{i}.png", "label": label, "patient_id": f"{label}{p}"}
            for label, n in per_class.items() for p in range(n) for i in range(images)]


def test_a_class_too_small_for_every_partition_is_named() -> None:
    """One viral patient cannot be in the test set and in five folds: refused by name, not left out silently."""
    rows = _synthetic({"covid": 20, "bacterial": 20, "normal": 20}) + _synthetic({"viral": 1}, images=3)
    with pytest.raises(ConfigError, match=r"class viral \(1 patients\) is missing from the test set, fold"):
        make_splits(rows)
    tiny = _synthetic({"covid": 3, "viral": 3, "bacterial": 3, "normal": 3})  # 12 patients, 3 a class
    with pytest.raises(ConfigError, match=r"too few images of class bacterial \(3\), covid \(3\), normal \(3\), viral "
                                          r"\(3\) for a test set of 1/5 and 5 folds: each class needs at least 5"):
        make_splits(tiny)
    with pytest.raises(ConfigError, match=r"seed \(--seed\) must be from 0 to 2\*\*32 - 1, got -1"):
        make_splits(tiny, seed=-1)
    assert {r["split"] for r in make_splits(_synthetic(dict.fromkeys(("covid", "viral", "bacterial", "normal"), 12)))} \
        == {"train", "test"}


def test_a_splits_file_with_a_patient_in_two_partitions_is_refused(tmp_path: Path) -> None:
    """A hand-edited or merged splits file that leaks a patient across partitions is named, line by line."""
    rows = [{"path": f"{i}.png", "label": "covid", "patient_id": p, "view": "PA", "source": "s", "split": s, "fold": f}
            for i, (p, s, f) in enumerate([("p0", "train", "0"), ("p0", "test", ""), ("p1", "train", "1"),
                                          ("p1", "train", "1"), ("p2", "train", "0"), ("p2", "train", "2")])]
    path = write_manifest(rows, tmp_path / "leaky.csv", [*REQUIRED_COLUMNS, *SPLIT_COLUMNS])
    with pytest.raises(ManifestError) as caught:
        read_manifest(path, check_files=False)
    problems = caught.value.problems
    assert "patient p0 is in 2 partitions (fold 0 from line 2, test from line 3): a split must keep each patient in one" in problems
    assert any(p.startswith("patient p2 is in 2 partitions (fold 0 from line 6, fold 2 from line 7)") for p in problems)
    assert not any("p1" in p for p in problems)
