"""Data sets: manifests, builders from the public source layouts, patient-grouped splits, counts."""

from patchflannel.data.builders import Build, BuildReport, build_covid_collection, build_kermany
from patchflannel.data.manifest import REQUIRED_COLUMNS, Manifest, read_manifest, validate_manifest, write_manifest
from patchflannel.data.splits import SPLIT_COLUMNS, make_splits
from patchflannel.data.stats import counts_table, crosstab, dataset_stats

__all__ = [
    "REQUIRED_COLUMNS",
    "SPLIT_COLUMNS",
    "Build",
    "BuildReport",
    "Manifest",
    "build_covid_collection",
    "build_kermany",
    "counts_table",
    "crosstab",
    "dataset_stats",
    "make_splits",
    "read_manifest",
    "validate_manifest",
    "write_manifest",
]
