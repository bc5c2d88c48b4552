"""Training and prediction of one base learner (SPEC.md stage 2 and the global baseline).

A learner run trains ``arch`` in ``mode`` on the training folds except ``val_fold`` of a splits file,
early-stops on the validation macro-F1 (``val_fold``), and keeps best.pt (see training/loop.py). Adam with
weight decay, an L1 term ``l1 * sum |w|`` (SPEC: 1e-5 in patch mode), ReduceLROnPlateau on the validation
macro-F1, mixed precision on CUDA (bf16, or fp16 with a GradScaler), the same code on CPU.

Configs are YAML files (see recipes/); :func:`load_config` fills the defaults of :data:`DEFAULTS`.
"""

from __future__ import annotations

import copy
import hashlib
import os
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from rich.console import Console
from sklearn.metrics import f1_score
from torch import nn
from torch.utils.data import DataLoader

from patchflannel.bundle import LEARNER_MODES, default_preprocessing, load_bundle
from patchflannel.devices import resolve_device
from patchflannel.errors import ConfigError, ImageReadError
from patchflannel.models import get_model, list_models
from patchflannel.models.classifiers import pretrained_config
from patchflannel.ops.votes import majority_label, mean_softmax, vote_fractions
from patchflannel.settings import SEED_RANGE, number, read_json, read_yaml
from patchflannel.training.datasets import Item, LearnerDataset, prepare_items, read_splits
from patchflannel.training.loop import BEST_FILE, LAST_FILE, RUN_FILE, Trainer, progress_bar, seed_everything
from patchflannel.training.mask_cache import MaskCache, model_key

DEFAULTS: dict[str, Any] = {
    "mode": "patch",
    "seed": 0,
    "device": "auto",
    "cache_dir": "runs/cache",
    "segmentation_bundle": None,
    "k": 100,
    "k_val": 10,
    "learner": {"epochs": 200, "patience": 10, "batch_size": 16, "lr": 1e-5, "weight_decay": 1e-4, "l1": None,
                "lr_factor": 0.1, "lr_patience": 4, "amp": "auto", "num_workers": 0, "eval_batch": 8,
                "imagenet_weights": {}, "bn_momentum": None, "channels_last": True},
    "ensemble": {"epochs": 200, "patience": 20, "lr": 1e-5, "weight_decay": 1e-4, "batch_size": 20, "gamma": 2.0},
}
L1_PATCH = 1e-5
MAX_K = 1000
"""The most patches an image a config may ask for (SPEC's K is 100; each patch is 600 KB in float32)."""
_console = Console(stderr=True)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "imagenet_weights" \
            else v
    return out


COMMAND_KEYS: dict[str, tuple[str, ...]] = {
    "train learner": ("name", "splits", "arch", "val_fold"),
    "train ensemble": ("name", "predictions", "learners", "val_fold"),
    "cv": ("name", "splits", "learners"),
}
"""The top-level keys each command's config takes besides those of :data:`DEFAULTS`."""


def load_config(source: str | Path | dict[str, Any], command: str | None = None) -> dict[str, Any]:
    """A YAML config file (or dict) merged over :data:`DEFAULTS`; ConfigError names what is wrong. With
    ``command`` (a key of :data:`COMMAND_KEYS`), a key only other commands take is refused too (it would be
    ignored); without, as for a recorded config.yaml, any command's keys are taken."""
    if isinstance(source, dict):
        raw = source
    else:
        raw = read_yaml(source)
    takes = set(COMMAND_KEYS[command]) if command else {key for keys in COMMAND_KEYS.values() for key in keys}
    unknown = sorted(set(raw) - set(DEFAULTS) - takes)
    if unknown:
        if command is not None and all(any(key in keys for keys in COMMAND_KEYS.values()) for key in unknown):
            raise ConfigError(f"{', '.join(unknown)}: not a key of a `{command}` config (another command's, which "
                              f"{command} would ignore); its own keys: {', '.join(COMMAND_KEYS[command])} and the "
                              "shared settings")
        raise ConfigError(f"unknown config key(s): {', '.join(unknown)}")
    for section in ("learner", "ensemble"):
        if section in raw and not isinstance(raw[section], dict):
            raise ConfigError(f"'{section}' must be a mapping of settings (indented keys below it), got "
                              f"{raw[section]!r}")
        bad = sorted(set(raw.get(section) or {}) - set(DEFAULTS[section]))
        if bad:
            raise ConfigError(f"unknown key(s) in '{section}': {', '.join(bad)}")
    cfg = _merge(DEFAULTS, raw)
    _check_types(cfg)
    if isinstance(cfg.get("learners"), tuple):  # as config.yaml records them
        cfg["learners"] = list(cfg["learners"])
    if cfg.get("val_fold") is not None:  # a fold number, named by a string in splits files
        cfg["val_fold"] = str(number("val_fold", cfg["val_fold"], integer=True, low=0))
    if cfg["mode"] not in LEARNER_MODES:
        raise ConfigError(f"mode must be one of {LEARNER_MODES}, got {cfg['mode']!r}")
    if cfg["learner"]["l1"] is None:
        cfg["learner"]["l1"] = L1_PATCH if cfg["mode"] == "patch" else 0.0
    _check_numbers(cfg)
    known = list_models("classifier")
    archs = list(cfg.get("learners") or []) if cfg.get("predictions") is None else []  # an ensemble's: model names
    for arch in ([cfg["arch"]] if cfg.get("arch") is not None else []) + archs:
        if arch not in known:
            raise ConfigError(f"unknown learner architecture {arch!r}; choose one of {', '.join(known)}")
    return cfg


_RANGES: dict[str, dict[str, dict[str, Any]]] = {
    # section -> key -> number() options; "" is the top level
    "": {"seed": SEED_RANGE, "k": dict(integer=True, low=1, high=MAX_K), "k_val": dict(integer=True, low=1, high=MAX_K)},
    "learner": {"epochs": dict(integer=True, low=1), "patience": dict(integer=True, low=1),
                "batch_size": dict(integer=True, low=1), "lr": dict(low=0, low_open=True), "weight_decay": dict(low=0),
                "l1": dict(low=0), "lr_factor": dict(low=0, low_open=True, high=1), "lr_patience": dict(integer=True, low=0),
                "num_workers": dict(integer=True, low=0), "eval_batch": dict(integer=True, low=1),
                "bn_momentum": dict(low=0, high=1, optional=True)},
    "ensemble": {"epochs": dict(integer=True, low=1), "patience": dict(integer=True, low=1),
                 "lr": dict(low=0, low_open=True), "weight_decay": dict(low=0), "batch_size": dict(integer=True, low=1),
                 "gamma": dict(low=0)},
}


LEARNER_SETTINGS = ("mode", "seed", "k_val", "segmentation_bundle", "arch", "val_fold", "learner")
"""What a learner run's weights depend on (``learner.imagenet_weights``: the entries of its learners only)."""
ENSEMBLE_SETTINGS = ("seed", "val_fold", "learners", "ensemble")
"""What an ensemble run's weights depend on, besides its inputs."""
SPEED_ONLY = ("learner.num_workers", "learner.eval_batch", "learner.channels_last")
"""Settings under those scopes that change how fast a run goes, not its result."""
HOW_LONG = ("learner.epochs", "learner.patience", "ensemble.epochs", "ensemble.patience")
"""Settings an unfinished run may be resumed under anew (to train it longer)."""
_PER_LEARNER = "learner.imagenet_weights"


def changed_settings(recorded: dict[str, Any], now: dict[str, Any], scopes: tuple[str, ...],
                     skip: tuple[str, ...] = SPEED_ONLY) -> list[str]:
    """``'name: recorded -> now'`` for each setting under ``scopes`` (top-level keys; a section key by key, but
    those in ``skip``) whose value differs between two resolved configs. ImageNet weights files are compared
    for the learners of both (the run's ``arch``, or the ``learners`` they share)."""
    changed = []
    for scope in scopes:
        old, new = recorded.get(scope), now.get(scope)
        if isinstance(old, dict) and isinstance(new, dict) and isinstance(DEFAULTS.get(scope), dict):
            pairs = [(f"{scope}.{k}", old.get(k), new.get(k)) for k in sorted(set(old) | set(new))]
        else:
            pairs = [(scope, old, new)]
        changed += [f"{name}: {a!r} -> {b!r}" for name, a, b in pairs if a != b and name not in skip + (_PER_LEARNER,)]
    if "learner" in scopes:
        archs = [now["arch"]] if now.get("arch") else [a for a in now.get("learners") or []
                                                       if a in (recorded.get("learners") or [])]
        old_w, new_w = (recorded["learner"]["imagenet_weights"] or {}), (now["learner"]["imagenet_weights"] or {})
        changed += [f"{_PER_LEARNER}.{a}: {old_w.get(a)!r} -> {new_w.get(a)!r}" for a in archs
                    if old_w.get(a) != new_w.get(a)]
    return changed


def check_resumable(run_dir: Path, cfg: dict[str, Any], scopes: tuple[str, ...], hint: str,
                    skip: tuple[str, ...] = SPEED_ONLY) -> None:
    """Refuse to continue the run in ``run_dir`` under other settings (of ``scopes``, but ``skip``) than its
    config.yaml records: its checkpoints and predictions were made under those."""
    recorded_file = run_dir / "config.yaml"
    if not recorded_file.is_file():
        return
    changed = changed_settings(load_config(recorded_file), cfg, scopes, skip)
    if changed:
        raise ConfigError(f"{run_dir}: made under other settings than these ({'; '.join(changed)}); {hint}")


AMP = ("auto", "off", "bf16", "fp16")
"""``learner.amp`` settings: autocast dtype on CUDA (``auto``: bf16 where supported, else fp16); CPUs run fp32."""


def _check_types(cfg: dict[str, Any]) -> None:
    """The settings that are not numbers have the type they need (ConfigError naming the setting)."""
    def want(name: str, ok: bool, what: str, value: Any) -> None:
        if not ok:
            raise ConfigError(f"{name} must be {what}, got {value!r}")

    for key in ("cache_dir", "device", "splits", "predictions", "segmentation_bundle", "arch", "name"):
        value = cfg.get(key)
        want(key, value is None or isinstance(value, str), "text (a path or a name)", value)
    learners = cfg.get("learners")
    if learners is not None:
        want("learners", isinstance(learners, (list, tuple)) and all(isinstance(a, str) for a in learners),
             "a list of names (one per line, '- name')", learners)
        repeated = sorted({a for a in learners if list(learners).count(a) > 1})
        want("learners", not repeated, "a list without repeats", repeated)
    lc = cfg["learner"]
    want("learner.amp", lc["amp"] in AMP, f"one of {', '.join(AMP)}", lc["amp"])
    want("learner.channels_last", isinstance(lc["channels_last"], bool), "true or false", lc["channels_last"])
    weights = lc["imagenet_weights"]
    want("learner.imagenet_weights", weights is None or (isinstance(weights, dict) and all(
        isinstance(v, str) for v in weights.values())), "a mapping of architecture to weights file", weights)


def _check_numbers(cfg: dict[str, Any]) -> None:
    """Every numeric setting a number within its range (in place: numeric strings become numbers)."""
    for section, keys in _RANGES.items():
        values = cfg[section] if section else cfg
        for key, options in keys.items():
            values[key] = number(f"{section + '.' if section else ''}{key}", values[key], **options)


def amp_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype: ``auto`` is bf16 (fp16 where bf16 is unsupported) on CUDA and none on CPU."""
    if setting == "off" or device.type != "cuda":
        return None
    if setting == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[setting]  # AMP: checked when the config is read


def _autocast(device: torch.device, dtype: torch.dtype | None) -> Any:
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def prepare(cfg: dict[str, Any], rows: list[dict[str, str]], device: torch.device) -> list[Item]:
    """The cached arrays (and masks, in patch mode) of ``rows`` under the config's cache and segmentation model."""
    masks = None
    if cfg["mode"] == "patch":
        masks = MaskCache(Path(cfg["cache_dir"]) / "masks", cfg["segmentation_bundle"], device=device)
    try:
        return prepare_items(rows, cfg["mode"], cfg["cache_dir"], default_preprocessing(), masks)
    except ImageReadError as exc:  # the first one met; the check below lists them all at once
        raise ConfigError(f"{exc}\n`patchflannel data validate --decode {cfg.get('splits') or 'MANIFEST'}` lists every "
                          "image that cannot be read") from None


def build_learner(cfg: dict[str, Any], arch: str, options: dict[str, Any] | None = None) -> nn.Module:
    """``arch`` with a 4-class head, from the config's ImageNet weights file for it when one is named, built
    with ``options`` (default: :func:`arch_config`).

    ``learner.bn_momentum`` (when set) replaces every BatchNorm's momentum: torchvision's mobilenet_v3
    (0.01) and mnasnet (0.0003) keep running statistics that barely move in a few hundred steps from
    scratch, so their eval-mode output stays constant (docs/results/README.md).
    """
    weights = (cfg["learner"]["imagenet_weights"] or {}).get(arch)
    options = arch_config(cfg, arch) if options is None else options
    model = get_model(arch, **({"imagenet_weights": weights} if weights else {}), **options)
    momentum = cfg["learner"]["bn_momentum"]
    if momentum is not None:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.momentum = float(momentum)
    return model


def check_named_files(cfg: dict[str, Any], archs: list[str]) -> None:
    """Every ImageNet weights file the config names for ``archs`` exists and fits its architecture, and in patch
    mode its segmentation bundle loads (checked before any image is read, and before a run folder records the
    config: a wrong file is said in seconds, and the fixed rerun is not taken for a change of settings)."""
    if cfg["mode"] == "patch":
        load_bundle(cfg["segmentation_bundle"])
    files = cfg["learner"]["imagenet_weights"] or {}
    missing = [f"{a}: {files[a]}" for a in archs if files.get(a) and not Path(files[a]).is_file()]
    if missing:
        raise ConfigError(f"ImageNet weights file(s) not found: {'; '.join(missing)}")
    for arch in archs:
        if files.get(arch):
            build_learner(cfg, arch)


def arch_config(cfg: dict[str, Any], arch: str) -> dict[str, Any]:
    """The options ``arch`` is built with under ``cfg`` (recorded in run.json, hence in bundles): those its
    ImageNet weights need when the config names a weights file for it."""
    return pretrained_config(arch) if (cfg["learner"]["imagenet_weights"] or {}).get(arch) else {}


def recorded_arch_config(run_dir: Path) -> dict[str, Any] | None:
    """The options a run's model was built with, as its run.json recorded them (None before its first epoch)."""
    run_file = run_dir / RUN_FILE
    return read_json(run_file).get("arch_config", {}) if run_file.is_file() else None


def _memory_format(cfg: dict[str, Any]) -> torch.memory_format:
    return torch.channels_last if cfg["learner"]["channels_last"] else torch.contiguous_format


def _logits(out: Any) -> torch.Tensor:
    """Main logits of a model output (Inception's training output is a (logits, aux_logits) tuple)."""
    return out[0] if isinstance(out, tuple) else out


def _loss(out: Any, y: torch.Tensor) -> torch.Tensor:
    if isinstance(out, tuple):  # Inception v3 in training mode: main + 0.4 * auxiliary, as torchvision trains it
        return F.cross_entropy(out[0].float(), y) + 0.4 * F.cross_entropy(out[1].float(), y)
    return F.cross_entropy(out.float(), y)


@torch.no_grad()
def predict_items(model: nn.Module, items: list[Item], cfg: dict[str, Any], k: int, device: torch.device,
                  description: str = "predict") -> dict[str, np.ndarray]:
    """Per-image ``confidence`` (patch: vote fractions over ``k`` patches; global: softmax), ``mean_softmax``
    and ``pred`` (majority label, ties to the lowest index) of ``items``."""
    model.eval()
    ds = LearnerDataset(items, cfg["mode"], default_preprocessing(), train=False, seed=cfg["seed"], k=k)
    dtype = amp_dtype(cfg["learner"]["amp"], device)
    fmt = _memory_format(cfg)
    conf, soft = [], []
    with progress_bar() as bar:
        task = bar.add_task(description, total=len(ds), status="")
        for i in range(len(ds)):
            x, _ = ds[i]
            with _autocast(device, dtype):
                logits = torch.cat([_logits(model(c.to(device, memory_format=fmt))).float()
                                    for c in x.split(cfg["learner"]["eval_batch"])])[None]
            soft.append(mean_softmax(logits).cpu())
            conf.append(vote_fractions(logits).cpu() if cfg["mode"] == "patch" else soft[-1])
            bar.advance(task)
    confidence = torch.cat(conf) if conf else torch.zeros(0, 4)
    return {"confidence": confidence.numpy(), "mean_softmax": (torch.cat(soft) if soft else torch.zeros(0, 4)).numpy(),
            "pred": majority_label(confidence).numpy()}


def _batches(ds: LearnerDataset, cfg: dict[str, Any], epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    ds.set_epoch(epoch)
    g = torch.Generator().manual_seed(cfg["seed"] * 1_000_003 + epoch)
    size = cfg["learner"]["batch_size"]
    # A last batch of one image cannot train BatchNorm over a 1x1 map (inception_v3's auxiliary head): it is
    # dropped; the order changes every epoch, so that image is trained on in the others.
    loader = DataLoader(ds, batch_size=size, sampler=torch.randperm(len(ds), generator=g).tolist(),
                        num_workers=cfg["learner"]["num_workers"], drop_last=len(ds) > size and len(ds) % size == 1)
    yield from loader


def images_digest(rows: list[dict[str, str]]) -> str:
    """sha256 of a set of images by file name and label: what a resumed run must still train or validate on
    (a moved data folder keeps it)."""
    names = sorted(f"{os.path.basename(r['path'])}\t{r['label']}" for r in rows)
    return hashlib.sha256("\n".join(names).encode()).hexdigest()


def train_learner(config: str | Path | dict[str, Any], run_dir: str | Path, resume: bool = False) -> dict[str, Any]:
    """Train one base learner (config keys ``arch``, ``splits``, ``val_fold`` plus :data:`DEFAULTS`).

    The resolved config is written to ``run_dir/config.yaml``; ``resume=True`` continues from last.pt.
    Returns the Trainer's summary.
    """
    cfg = load_config(config, "train learner")
    for key in ("arch", "splits", "val_fold"):
        if cfg.get(key) is None:
            raise ConfigError(f"a learner config needs '{key}'")
    rows = [r for r in read_splits(cfg["splits"]) if r["split"] == "train"]
    val_fold = str(cfg["val_fold"])
    train_rows = [r for r in rows if r["fold"] != val_fold]
    val_rows = [r for r in rows if r["fold"] == val_fold]
    if not train_rows or not val_rows:
        raise ConfigError(f"{cfg['splits']}: fold {val_fold} leaves {len(train_rows)} training and "
                          f"{len(val_rows)} validation images; both must be non-empty")
    check_named_files(cfg, [cfg["arch"]])
    device = resolve_device(cfg["device"])
    run_dir = Path(run_dir)  # made once the config is known to be good: a refused one leaves nothing behind
    data = {"train": images_digest(train_rows), "val": images_digest(val_rows)}
    if resume:
        check_resumable(run_dir, cfg, LEARNER_SETTINGS, "train into a new --out instead", SPEED_ONLY + HOW_LONG)
        recorded = read_json(run_dir / RUN_FILE).get("data") if (run_dir / RUN_FILE).is_file() else None
        moved = [part for part in ("train", "val") if recorded and recorded.get(part) != data[part]]
        if moved:
            raise ConfigError(f"{run_dir}: its {' and '.join(moved)} images are not those the run started with (the "
                              f"splits file {cfg['splits']} changed); train into a new --out instead")
    lc = cfg["learner"]
    if not (lc["imagenet_weights"] or {}).get(cfg["arch"]) and lc["lr"] < 1e-4:  # said once the run will go ahead
        _console.print(f"note: {cfg['arch']} starts from random weights (no learner.imagenet_weights file for it) at "
                       f"lr {lc['lr']:g}, a rate for ImageNet-initialised learners: it will learn slowly "
                       "(docs/training.md)", markup=False, highlight=False)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    train_items, val_items = prepare(cfg, train_rows, device), prepare(cfg, val_rows, device)
    fmt = _memory_format(cfg)
    recorded = recorded_arch_config(run_dir) if resume else None
    options = recorded if recorded is not None else arch_config(cfg, cfg["arch"])  # a resume keeps the run's own
    # Seeded after the masks: building the segmenter for a cold mask cache draws from the global RNG.
    seed_everything(cfg["seed"])
    model = build_learner(cfg, cfg["arch"], options).to(device, memory_format=fmt)
    optimizer = torch.optim.Adam(model.parameters(), lr=lc["lr"], weight_decay=lc["weight_decay"])
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=lc["lr_factor"],
                                                           patience=lc["lr_patience"])
    dtype = amp_dtype(lc["amp"], device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    train_ds = LearnerDataset(train_items, cfg["mode"], default_preprocessing(), train=True, seed=cfg["seed"])
    val_labels = np.array([it.label for it in val_items])

    def train_one_epoch(epoch: int) -> dict[str, float]:
        total, correct, n = 0.0, 0, 0
        with progress_bar() as bar:
            task = bar.add_task(f"{cfg['arch']} epoch {epoch}", total=len(train_ds), status="")
            for x, y in _batches(train_ds, cfg, epoch):
                x, y = x.to(device, non_blocking=True, memory_format=fmt), y.to(device)
                with _autocast(device, dtype):
                    out = model(x)
                loss = _loss(out, y)
                if lc["l1"]:
                    loss = loss + lc["l1"] * sum(p.abs().sum() for p in model.parameters())
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                total += float(loss.detach()) * len(y)
                correct += int((_logits(out).argmax(1) == y).sum())
                n += len(y)
                bar.advance(task, len(y))
        return {"loss": total / n, "accuracy": correct / n}

    def evaluate(epoch: int) -> dict[str, float]:
        pred = predict_items(model, val_items, cfg, cfg["k_val"], device, f"validate epoch {epoch}")["pred"]
        return {"macro_f1": float(f1_score(val_labels, pred, labels=[0, 1, 2, 3], average="macro", zero_division=0)),
                "accuracy": float((pred == val_labels).mean())}

    info = {"task": "learner", "arch": cfg["arch"], "arch_config": options, "mode": cfg["mode"],
            "preprocessing": default_preprocessing(), "config": cfg, "val_fold": val_fold,
            "n_train": len(train_items), "n_val": len(val_items), "device": str(device),
            "amp": str(dtype) if dtype else "off", "data": data}
    if cfg["mode"] == "patch":  # what made its training masks: export bundle checks its --segmentation against it
        info["segmentation_model"] = model_key(load_bundle(cfg["segmentation_bundle"]))
    trainer = Trainer(run_dir, model, optimizer, monitor="val_macro_f1", mode="max", patience=lc["patience"],
                      max_epochs=lc["epochs"], scheduler=scheduler, scheduler_metric="val_macro_f1", run_info=info)
    return trainer.fit(train_one_epoch, evaluate, resume=resume and (run_dir / LAST_FILE).is_file())


def load_learner(run_dir: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """The best model of a finished learner run (best.pt, ``weights_only``) in eval mode, and its config."""
    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    if not (run_dir / BEST_FILE).is_file():
        raise ConfigError(f"{run_dir}: no {BEST_FILE}; the run has not finished an epoch")
    recorded = recorded_arch_config(run_dir)
    model = get_model(cfg["arch"], **(recorded if recorded is not None else arch_config(cfg, cfg["arch"])))
    model.load_state_dict(torch.load(run_dir / BEST_FILE, map_location="cpu", weights_only=True))
    return model.to(device, memory_format=_memory_format(cfg)).eval(), cfg
