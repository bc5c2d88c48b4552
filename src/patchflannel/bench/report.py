"""bench's outputs: ``bench.json`` (everything), ``bench.md`` (a table) and ``bench.png`` (ms/image vs K)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from patchflannel.engine.engine import STAGES


def speedups(runs: list[dict[str, Any]]) -> dict[tuple[str, int], float]:
    """Each run's speed-up over the ``loop`` run at the same K (when there is one)."""
    loop = {r["k"]: r["seconds_per_image_median"] for r in runs if r["mode"] == "loop"}
    return {(r["mode"], r["k"]): loop[r["k"]] / r["seconds_per_image_median"]
            for r in runs if r["k"] is not None and r["k"] in loop}


def markdown(report: dict[str, Any]) -> str:
    """The report as a markdown table with a header naming the device, engine and inputs."""
    env, eng = report["environment"], report["engine"]
    ups = speedups(report["runs"])
    lines = [
        f"# bench {report.get('label') or ''}".rstrip(),
        "",
        f"- device: {env['device']} (torch {env['torch']}, CUDA {env['cuda']}, {env['cpu_count']} CPUs, "
        f"{env['torch_threads']} torch threads)",
        f"- engine: bundle {eng['bundle']}, backend {eng['backend']}, precision {eng['precision']}, "
        f"compiled {eng['compiled']}, loader {eng['loader']}, sampler {eng['sampler']}, "
        f"learners {', '.join(lr['name'] for lr in eng['learners'])}",
        f"- inputs: {report['inputs']}",
        "",
        "| mode | K | images/call | patches/call | N | ms/image (median) | p95 | images/s | x loop | preprocess % | "
        + " | ".join(f"{s} ms" for s in STAGES) + " |",
        "|" + "---|" * (10 + len(STAGES)),
    ]
    for r in report["runs"]:
        st = r["stage_seconds_per_image"]
        up = ups.get((r["mode"], r["k"]))
        lines.append(
            f"| {r['mode']} | {'-' if r['k'] is None else r['k']} | {r['images_per_call']} | {r['patch_batch']} | {r['n_images']} | "
            f"{1000 * r['seconds_per_image_median']:.1f} | {1000 * r['seconds_per_image_p95']:.1f} | "
            f"{r['images_per_second']:.2f} | {'' if up is None else f'{up:.1f}'} | {100 * r['preprocess_fraction']:.1f} | "
            + " | ".join(f"{1000 * st[s]:.1f}" if s in st else "" for s in STAGES) + " |")
    learners = list(dict.fromkeys(name for r in report["runs"] for name in r.get("learner_seconds_per_image", {})))
    if learners:
        lines += ["", "Inference ms an image, per learner:", "",
                  "| mode | K | " + " | ".join(learners) + " |", "|" + "---|" * (2 + len(learners))]
        for r in report["runs"]:
            per = r.get("learner_seconds_per_image", {})
            lines.append(f"| {r['mode']} | {'-' if r['k'] is None else r['k']} | "
                         + " | ".join(f"{1000 * per[n]:.1f}" if n in per else "" for n in learners) + " |")
    if report.get("compile_seconds"):
        lines += ["", "torch.compile time (all shapes): "
                  + ", ".join(f"{k} {v:.0f} s" for k, v in report["compile_seconds"].items())]
    if report.get("compile_errors"):
        lines += ["", "torch.compile fell back to eager for: "
                  + "; ".join(f"{k}: {v}" for k, v in report["compile_errors"].items())]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    """ms/image (median) against K, one line per mode, log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for mode in dict.fromkeys(r["mode"] for r in report["runs"]):
        runs = [r for r in report["runs"] if r["mode"] == mode]
        if runs[0]["k"] is None:  # the global baseline: no K, a horizontal line
            ax.axhline(1000 * runs[0]["seconds_per_image_median"], linestyle="--", color="grey", label=mode)
            continue
        pts = sorted((r["k"], 1000 * r["seconds_per_image_median"]) for r in runs)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=mode)
    ax.set_xlabel("K (patches per image)")
    ax.set_ylabel("ms per image (median, end to end)")
    ax.set_yscale("log")
    ax.set_title(f"{report['environment']['device']}, {report['engine']['precision']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
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
