"""bench's outputs: ``bench.json`` (everything), ``bench.md`` (a table) and ``bench.png`` (ms/image vs K)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from patchflannel.engine.engine import STAGES


def pair(run_or_engine: dict[str, Any]) -> str:
    """A run's (or an engine description's) backend and precision, e.g. 'torch fp16'."""
    return f"{run_or_engine['backend']} {run_or_engine['precision']}"


def variant(run_or_engine: dict[str, Any]) -> str:
    """:func:`pair`, and the learner streams where there are several, e.g. 'torch fp16, 5 learner streams'."""
    streams = run_or_engine["learner_streams"]
    return pair(run_or_engine) + (f", {streams} learner streams" if streams > 1 else "")


def speedups(runs: list[dict[str, Any]]) -> dict[tuple[str, str, int], float]:
    """Each run's speed-up over the ``loop`` run of the same backend and precision at the same K (the loop is
    the reference's one stream, whatever the run's learner streams), keyed by (variant, mode, K) (where there
    is such a loop run)."""
    loop = {(pair(r), r["k"]): r["seconds_per_image_median"] for r in runs if r["mode"] == "loop"}
    return {(variant(r), r["mode"], r["k"]): loop[pair(r), r["k"]] / r["seconds_per_image_median"]
            for r in runs if r["k"] is not None and (pair(r), r["k"]) in loop}


def markdown(report: dict[str, Any]) -> str:
    """The report as markdown tables with a header naming the device, the engines and the inputs."""
    env = report["environment"]
    ups = speedups(report["runs"])
    lines = [
        f"# bench {report.get('label') or ''}".rstrip(),
        "",
        f"- device: {env['device']} (torch {env['torch']}{' built for CUDA ' + str(env['cuda']) if env['cuda'] else ''}, {env['cpu_count']} CPUs: "
        f"{env.get('cpu', '?')}, {env['torch_threads']} torch threads)",
        *(f"- engine: bundle {eng['bundle']}, backend {eng['backend']}, precision {eng['precision']}, "
          f"compiled {eng['compiled']}, loader {eng['loader']}, sampler {eng['sampler']}, "
          f"learner streams {eng['learner_streams']}, "
          f"learners {', '.join(lr['name'] for lr in eng['learners'])}" for eng in report["engines"]),
        f"- inputs: {report['inputs']}",
        "",
        "| backend | precision | streams | mode | K | images/call | patches/call | N | ms/image (median) | p95 | images/s | "
        "x loop | preprocess % | " + " | ".join(f"{s} ms" for s in STAGES) + " |",
        "|" + "---|" * (13 + len(STAGES)),
    ]
    for r in report["runs"]:
        st = r["stage_seconds_per_image"]
        up = ups.get((variant(r), r["mode"], r["k"]))
        lines.append(
            f"| {r['backend']} | {r['precision']} | {r['learner_streams']} | {r['mode']} | "
            f"{'-' if r['k'] is None else r['k']} | {r['images_per_call']} | {r['patch_batch']} | {r['n_images']} | "
            f"{1000 * r['seconds_per_image_median']:.1f} | {1000 * r['seconds_per_image_p95']:.1f} | "
            f"{r['images_per_second']:.2f} | {'' if up is None else f'{up:.1f}'} | {100 * r['preprocess_fraction']:.1f} | "
            + " | ".join(f"{1000 * st[s]:.1f}" if s in st else "" for s in STAGES) + " |")
    learners = list(dict.fromkeys(name for r in report["runs"] for name in r.get("learner_seconds_per_image", {})))
    if learners:
        lines += ["", "Inference ms an image, per learner:", "",
                  "| backend | precision | streams | mode | K | " + " | ".join(learners) + " |",
                  "|" + "---|" * (5 + len(learners))]
        for r in report["runs"]:
            per = r.get("learner_seconds_per_image", {})
            lines.append(f"| {r['backend']} | {r['precision']} | {r['learner_streams']} | {r['mode']} | "
                         f"{'-' if r['k'] is None else r['k']} | "
                         + " | ".join(f"{1000 * per[n]:.1f}" if n in per else "" for n in learners) + " |")
    if report.get("compile_seconds"):
        lines += ["", "torch.compile time (all shapes): "
                  + ", ".join(f"{k} {v:.0f} s" for k, v in report["compile_seconds"].items())]
    if report.get("compile_errors"):
        lines += ["", "torch.compile fell back to eager for: "
                  + "; ".join(f"{k}: {v}" for k, v in report["compile_errors"].items())]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    """ms/image (median) against K, one line per mode (and backend and precision when there are several), log
    scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    several = len({variant(r) for r in report["runs"]}) > 1
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, key in enumerate(dict.fromkeys((variant(r), r["mode"]) for r in report["runs"])):
        runs = [r for r in report["runs"] if (variant(r), r["mode"]) == key]
        label, color = (f"{key[1]} ({key[0]})" if several else key[1]), colors[i % len(colors)]
        if runs[0]["k"] is None:  # the global baseline: no K, a horizontal line
            ax.axhline(1000 * runs[0]["seconds_per_image_median"], linestyle="--", color=color, label=label)
            continue
        pts = sorted((r["k"], 1000 * r["seconds_per_image_median"]) for r in runs)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=color, label=label)
    ks = sorted({r["k"] for r in report["runs"] if r["k"] is not None})
    if ks:
        ax.set_xticks(ks, [str(k) for k in ks])  # whole K values, not fractional ticks
    ax.set_xlabel("K (patches per image)")
    ax.set_ylabel("ms per image (median, end to end)")
    ax.set_yscale("log")
    ax.set_title(f"{report['environment']['device']}, {', '.join(sorted({e['precision'] for e in report['engines']}))}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1), fontsize="small")  # beside the plot, off the lines
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def write_report(report: dict[str, Any], out: Path) -> dict[str, Path]:
    """Write bench.json, bench.md and bench.png under ``out``; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "bench.json", "markdown": out / "bench.md", "plot": out / "bench.png"}
    paths["json"].write_text(json.dumps(report, indent=2, default=str) + "\n")
    paths["markdown"].write_text(markdown(report))
    try:
        plot(report, paths["plot"])
    except ImportError:  # matplotlib is optional on lean GPU images; the JSON and table carry the numbers
        del paths["plot"]
    return paths
