"""Render the README's results table (the layout of the seed paper's Table 3) from an `eval` report.json.

    python scripts/results_table.py REPORT_DIR/report.json > table.md

Rows: each learner and the FLANNEL ensemble, global and patched; columns: per-class F1 and macro-F1 as
mean (std) over the 5 folds on the test split; then macro-F1 per data source.
"""

from __future__ import annotations

import json
import sys

from patchflannel.classes import CLASSES


def _ms(group: dict, key: str) -> str:
    m, s = group["fold_mean"].get(key), group["fold_std"].get(key)
    return "n/a" if m is None else f"{m:.3f} ({s:.3f})"


def render(report: dict, split: str = "test") -> str:
    """Markdown tables: overall per-class F1 + macro-F1, and macro-F1 per source."""
    groups = {(g["model"], g["source"]): g for g in report["groups"] if g["split"] == split}
    models = report["models"]
    head = "| model | " + " | ".join(f"F1 {c}" for c in CLASSES) + " | macro-F1 |"
    lines = [head, "|" + "---|" * (len(CLASSES) + 2)]
    for model in models:
        g = groups.get((model, "all"))
        if g:
            cells = [_ms(g, f"f1_{c}") for c in CLASSES] + [_ms(g, "macro_f1")]
            lines.append(f"| {model} | " + " | ".join(cells) + " |")
    sources = report["sources"]
    lines += ["", "| model | " + " | ".join(f"macro-F1 {s}" for s in sources) + " |",
              "|" + "---|" * (len(sources) + 1)]
    for model in models:
        lines.append(f"| {model} | " + " | ".join(_ms(groups[(model, s)], "macro_f1") if (model, s) in groups
                                                    else "n/a" for s in sources) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render(json.load(open(sys.argv[1]))), end="")
