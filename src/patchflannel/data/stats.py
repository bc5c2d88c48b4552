"""Image counts of a manifest by source x class and view x class (the layout of FLANNEL's Table 2)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from rich.table import Table

from patchflannel.classes import CLASSES
from patchflannel.data.manifest import Row

TOTAL = "total"
Counts = dict[str, dict[str, int]]


@dataclass
class Crosstab:
    """Counts by group (first-seen order) and over all rows; each cell is ``{class...: n, "total": n}``. The
    totals are kept apart, so a group may be named anything, "total" included."""

    groups: Counts
    total: dict[str, int]


def _cell() -> dict[str, int]:
    return dict.fromkeys((*CLASSES, TOTAL), 0)


def crosstab(rows: list[Row], key: str | Callable[[Row], str]) -> Crosstab:
    """Counts by ``key`` (a column name or a function of a row) and class, with the totals."""
    group_of = (lambda row: row[key]) if isinstance(key, str) else key
    out = Crosstab({}, _cell())
    for row in rows:
        for cell in (out.groups.setdefault(group_of(row), _cell()), out.total):
            cell[row["label"]] += 1
            cell[TOTAL] += 1
    return out


def dataset_stats(rows: list[Row]) -> dict[str, Crosstab]:
    """Both tables of FLANNEL's Table 2 layout: ``{"source": ..., "view": ...}``."""
    return {"source": crosstab(rows, "source"), "view": crosstab(rows, "view")}


def counts_table(counts: Crosstab, *, title: str, group_name: str, percent: bool = False) -> Table:
    """A rich table of :func:`crosstab` counts, the totals last; with ``percent``, each cell also shows its row
    share."""
    table = Table(title=title)
    table.add_column(group_name)
    for name in (*CLASSES, TOTAL):
        table.add_column(name, justify="right")
    for i, (group, cell) in enumerate([*counts.groups.items(), (TOTAL, counts.total)]):
        if i == len(counts.groups):
            table.add_section()
        values = [
            f"{cell[name]} ({100 * cell[name] / cell[TOTAL]:.1f}%)" if percent and cell[TOTAL] else str(cell[name])
            for name in CLASSES
        ]
        table.add_row(group, *values, str(cell[TOTAL]))
    return table
