"""Build a torch-format bundle from training run folders (each with ``best.pt`` and ``run.json``)."""

from __future__ import annotations

import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from patchflannel.bundle import (
    BUNDLE_FILE,
    LEARNER_MODES,
    Bundle,
    ModelEntry,
    add_file,
    default_preprocessing,
    io_signature,
    load_bundle,
    load_torch_model,
    write_bundle,
)
from patchflannel.classes import CLASSES
from patchflannel.errors import BundleError, ConfigError, ManifestError
from patchflannel.io.files import made_folders_removed_on_failure, publish_folder
from patchflannel.models import list_models, model_family
from patchflannel.segment import load_segmenter
from patchflannel.training.loop import BEST_FILE, read_run
from patchflannel.training.segmentation import evaluate_segmentation, read_pairs_manifest, validation_names

RUN_KEYS = ("task", "arch", "learners", "val_fold", "best_epoch", "epochs_run", "stopped_early", "best", "n_train", "n_val",
            "split", "data", "config", "train_seconds")


def _learner_mode(run_dir: Path, info: dict[str, Any]) -> str:
    """'patch' or 'global': run.json's ``mode``, else its training config's (``mode`` may hold the monitor mode)."""
    for mode in (info.get("mode"), (info.get("config") or {}).get("mode")):
        if mode in LEARNER_MODES:
            return mode
    raise ConfigError(f"{run_dir}/run.json: learner mode ('patch' or 'global') not recorded")


def _merge(base: dict[str, Any], extra: dict[str, Any], source: str, seen: dict[str, str], prefix: str = "") -> None:
    """Merge ``extra`` into ``base``; a value that differs from another run's is a ConfigError."""
    for key, value in extra.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value, source, seen, path + ".")
            continue
        if path in seen and base.get(key) != value:
            raise ConfigError(f"preprocessing '{path}' differs: {base.get(key)!r} in {seen[path]} but {value!r} in {source}")
        base[key], seen[path] = value, source


def _summary(run_dir: Path, info: dict[str, Any]) -> dict[str, Any]:
    return {"run": str(run_dir), **{k: info[k] for k in RUN_KEYS if k in info}}


def _read_source(key: str, path: Path) -> tuple[dict[str, Any], Path]:
    """A run's run.json and best.pt; for the segmentation, a bundle folder's segmentation model instead (its
    record, architecture and preprocessing), as patch learners trained on the default bundle's masks need."""
    if key == "segmentation" and (path / BUNDLE_FILE).is_file():
        source = load_bundle(path)
        seg = source.segmentation
        info = {**(source.training or {}).get("segmentation", {}), "task": "segmentation", "arch": seg.arch,
                "arch_config": seg.arch_config, "preprocessing": {"segmentation": source.preprocessing["segmentation"]}}
        return info, source.path_of(seg.file("torch"))
    return read_run(path), path / BEST_FILE


def make_bundle(out: str | Path, *, segmentation_run: str | Path, learner_runs: Sequence[str | Path] = (),
                ensemble_run: str | Path | None = None, name: str = "patchflannel") -> Bundle:
    """Assemble a bundle at ``out`` from run folders: segmentation (a run, or a bundle whose segmentation model is
    taken), learners in ensemble order, ensemble.

    Each run's ``best.pt`` is copied in and loaded into its architecture before anything is published; the
    bundle appears at ``out`` only when complete (built beside it, then renamed). The runs' preprocessing
    must agree, and a patch learner that records the segmentation model its training masks came from must be
    given that model; their training summaries go into bundle.json's ``training``.
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise BundleError(f"{out}: exists and is not empty")
    runs = {"segmentation": Path(segmentation_run), **{f"learner {i}": Path(r) for i, r in enumerate(learner_runs)}}
    if ensemble_run is not None:
        runs["ensemble"] = Path(ensemble_run)
    sources = {key: _read_source(key, r) for key, r in runs.items()}
    infos = {key: info for key, (info, _) in sources.items()}
    families = {"segmentation": "segmentation", "ensemble": "ensemble"}
    for key, info in infos.items():
        want = families.get(key, "classifier")
        try:
            family = model_family(info["arch"])
        except ConfigError as exc:
            raise ConfigError(f"{runs[key]}: unknown architecture {info['arch']!r}") from exc
        if family != want:
            raise ConfigError(f"{runs[key]}: {info['arch']!r} is a {family} model, given as {key}")

    pre = default_preprocessing()
    seen: dict[str, str] = {}
    for key, info in infos.items():
        if isinstance(info.get("preprocessing"), dict):
            _merge(pre, info["preprocessing"], str(runs[key]), seen)
    given = [(infos[f"learner {i}"]["arch"], _learner_mode(runs[f"learner {i}"], infos[f"learner {i}"]))
             for i in range(len(learner_runs))]
    if "ensemble" in infos:
        n = int((infos["ensemble"].get("arch_config") or {}).get("n_learners", -1))
        if n != len(learner_runs):
            raise ConfigError(f"{runs['ensemble']}: ensemble over {n} learners, but {len(learner_runs)} learner runs given")
        # The ensemble records its learners as cv and `train ensemble` name them (<arch>_<mode>, numbered
        # <i>_<arch>_<mode> in a bundle with two runs of one architecture) or, older, by architecture: each is
        # checked against the runs given, in order (the weight module's inputs are in it).
        recorded = list(infos["ensemble"].get("learners") or [])
        archs = list_models("classifier")
        checkable = set(archs) | {f"{a}_{m}" for a in archs for m in LEARNER_MODES}
        names = [r if r in checkable else re.sub(r"^\d+_", "", r) for r in recorded]
        if names and set(names) <= checkable and (
                len(names) != len(given) or any(r not in (a, f"{a}_{m}") for r, (a, m) in zip(names, given))):
            raise ConfigError(f"{runs['ensemble']}: trained on learners {recorded}, given "
                              f"{[f'{a}_{m}' for a, m in given]} (their order and mode matter)")

    tmp = out.with_name(f".{out.name}.building")
    shutil.rmtree(tmp, ignore_errors=True)
    with made_folders_removed_on_failure(out.parent):  # building beside out may make the folders above it
        tmp.mkdir(parents=True)
        try:
            entries: dict[str, ModelEntry] = {}
            for i, (key, info) in enumerate(infos.items()):
                role = key if key in families else given[int(key.split()[1])][1]
                arch = info["arch"]
                rel = {"segmentation": "segmentation.pt", "ensemble": "ensemble.pt"}.get(role, f"learners/{i - 1}_{arch}.pt")
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(sources[key][1], tmp / rel)
                entries[key] = ModelEntry(
                    name=key if key in families else f"{arch}_{role}", arch=arch, arch_config=dict(info.get("arch_config") or {}),
                    files=[add_file(tmp, rel, "torch")], mode=role if role in LEARNER_MODES else None,
                    **io_signature(role, pre, len(learner_runs)))
            learners = [entries[f"learner {i}"] for i in range(len(learner_runs))]
            if len({m.name for m in learners}) != len(learners):
                for i, m in enumerate(learners):
                    m.name = f"{i}_{m.name}"
            training = {key: _summary(runs[key], info) for key, info in infos.items() if key in families}
            training["learners"] = [_summary(runs[f"learner {i}"], infos[f"learner {i}"]) for i in range(len(learner_runs))]
            bundle = Bundle(root=tmp, name=name, classes=list(CLASSES), preprocessing=pre, segmentation=entries["segmentation"],
                            learners=learners, ensemble=entries.get("ensemble"), training=training)
            write_bundle(bundle)
            for entry in bundle.models():
                load_torch_model(bundle, entry)  # refuses weights that do not fit the architecture
            _check_masks_made_by(bundle, {runs[f"learner {i}"]: infos[f"learner {i}"]
                                          for i in range(len(learner_runs))})
            out.parent.mkdir(parents=True, exist_ok=True)
            publish_folder(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return load_bundle(out)


def _check_masks_made_by(bundle: Bundle, learners: dict[Path, dict[str, Any]]) -> None:
    """ConfigError for a learner run whose training masks another segmentation model than the bundle's made (runs
    record its :func:`~patchflannel.training.mask_cache.model_key`; older ones do not, and are not checked)."""
    from patchflannel.training.mask_cache import model_key

    key = model_key(bundle)
    for run, info in learners.items():
        made_by = info.get("segmentation_model")
        if made_by is not None and made_by != key:
            recorded = (info.get("config") or {}).get("segmentation_bundle")
            raise ConfigError(f"{run}: trained on lung masks of another segmentation model than --segmentation's (its "
                              f"config's segmentation_bundle: {recorded!r}, null = the package's default bundle); give "
                              "that bundle or run as --segmentation")


def export_segmentation_bundle(run_dir: str | Path, out: str | Path, manifest: str | Path | None = None,
                               name: str = "default") -> Path:
    """A segmentation-only bundle (no learners, no ensemble) from a run, via :func:`make_bundle`.

    The bundle's training record also gets the run's split, recipe and training time and, when
    ``manifest`` is given, the validation Jaccard measured on the bundle itself.
    """
    info = read_run(run_dir)
    if info.get("task") != "segmentation":
        raise ConfigError(f"{run_dir}: run.json task is {info.get('task')!r}, not 'segmentation'")
    if manifest is not None:  # checked before anything is written: a bad manifest leaves no bundle behind
        have = {image.name for image, _ in read_pairs_manifest(manifest)}
        missing = [n for n in validation_names(info, str(run_dir)) if n not in have]
        if missing:
            raise ManifestError(manifest, [f"the run's validation image {n} is not in the manifest" for n in missing])
    bundle = make_bundle(out, segmentation_run=run_dir, name=name)
    record = bundle.training.setdefault("segmentation", {})
    record.update({k: info[k] for k in ("split", "config", "train_seconds") if k in info})
    write_bundle(bundle)
    if manifest is not None:
        result = evaluate_segmentation(load_segmenter(out), manifest)
        record["validation"] = {k: result[k] for k in ("n", "mean_jaccard", "min_jaccard")}
        write_bundle(bundle)
    return Path(out) / "bundle.json"
