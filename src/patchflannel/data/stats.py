"""Image counts of a manifest by source x class and view x class (the layout of FLANNEL's Table 2)."""

from __future__ import annotations

from collections.abc import Callable

from rich.table import Table

from patchflannel.classes import CLASSES
from patchflannel.data.manifest import Row

TOTAL = "total"
Counts = dict[str, dict[str, int]]


def crosstab(rows: list[Row], key: str | Callable[[Row], str]) -> Counts:
    """Counts ``{group: {class...: n, "total": n}}`` by ``key`` (a column name or a function of a row),
    groups in first-seen order, plus a ``"total"`` group.
    """
    group_of = (lambda row: row[key]) if isinstance(key, str) else key
    counts: Counts = {}
    for row in rows:
        for group in (group_of(row), TOTAL):
            cell = counts.setdefault(group, dict.fromkeys((*CLASSES, TOTAL), 0))
            cell[row["label"]] += 1
            cell[TOTAL] += 1
    total = counts.pop(TOTAL, dict.fromkeys((*CLASSES, TOTAL), 0))
    return {**counts, TOTAL: total}


def dataset_stats(rows: list[Row]) -> dict[str, Counts]:
    """Both tables of FLANNEL's Table 2 layout: ``{"source": ..., "view": ...}``."""
    return {"source": crosstab(rows, "source"), "view": crosstab(rows, "view")}


def counts_table(counts: Counts, *, title: str, group_name: str, percent: bool = False) -> Table:
    """A rich table of :func:`crosstab` counts; with ``percent``, each cell also shows its row share."""
    table = Table(title=title)
    table.add_column(group_name)
    for name in (*CLASSES, TOTAL):
        table.add_column(name, justify="right")
    for group, cell in counts.items():
        if group == TOTAL:
            table.add_section()
        values = [
            f"{cell[name]} ({100 * cell[name] / cell[TOTAL]:.1f}%)" if percent and cell[TOTAL] else str(cell[name])
            for name in CLASSES
        ]
        table.add_row(group, *values, str(cell[TOTAL]))
    return table
