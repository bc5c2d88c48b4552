"""Stage 1 training: FC-DenseNet lung segmentation on image/mask pairs (SPEC.md), and its evaluation.

The pairs are read once, preprocessed to the SPEC input (equalise, gamma 0.5, 256x256) and kept in memory.
A seeded 80/20 split is recorded in the run's ``run.json`` so that :func:`evaluate_segmentation` scores exactly the
validation pairs. Augmentation, with torchvision's v2 transforms on image and mask together (bilinear for the
image, nearest for the mask): a random crop of varying aspect ratio resized back (films of other shapes,
e.g. landscape pediatric films, are squeezed to a square at inference), a random affine (rotation, zoom
in and out, shift) so that lungs appear at the smaller scale of pediatric films, and brightness/contrast
jitter on the image only. No horizontal flip: the left and right lungs differ in shape (the heart sits on
the left), and every radiograph is read in the same orientation.
"""

from __future__ import annotations

import json
import pickle
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode, v2

from patchflannel.data.manifest import header_problems, read_csv
from patchflannel.devices import resolve_device
from patchflannel.errors import ConfigError, ManifestError, first_line
from patchflannel.io import read_image
from patchflannel.models import get_model, list_models
from patchflannel.ops.mask import lung_masks
from patchflannel.ops.preprocess import GAMMA, SEG_SIZE, resize_mask, segmentation_input
from patchflannel.settings import SEED_RANGE, number, read_json, read_yaml
from patchflannel.training.loop import BEST_FILE, LAST_FILE, RUN_FILE, Trainer, progress_bar, read_run, seed_everything


@dataclass
class SegConfig:
    """A segmentation training recipe (the keys of recipes/segmentation*.yaml)."""

    manifest: str
    arch: str = "fcdensenet103"
    arch_config: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    val_fraction: float = 0.2
    size: int = SEG_SIZE
    gamma: float = GAMMA
    threshold: float = 0.5
    batch_size: int = 4
    lr: float = 1e-4
    weight_decay: float = 0.0
    max_epochs: int = 100
    patience: int = 15
    plateau_patience: int = 5
    dice_weight: float = 1.0
    rotate: float = 10.0
    scale: tuple[float, float] = (0.9, 1.1)
    shift: float = 0.05
    crop_scale: float = 1.0
    aspect: tuple[float, float] = (1.0, 1.0)
    brightness: float = 0.0
    contrast: float = 0.0
    threads: int | None = None
    channels_last: bool = True
    bf16: bool = False
    device: str = "cpu"
    init_from: str | None = None
    """A state_dict file (e.g. another run's best.pt) to start from instead of random weights."""

    def __post_init__(self) -> None:
        for name, options in _RANGES.items():
            setattr(self, name, number(name, getattr(self, name), **options))
        for name in ("scale", "aspect"):  # YAML gives lists
            pair = getattr(self, name)
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise ConfigError(f"{name} must be a pair [low, high], got {pair!r}")
            low, high = (number(f"{name}[{i}]", v, low=0, low_open=True) for i, v in enumerate(pair))
            if low > high:
                raise ConfigError(f"{name} must be a pair [low, high] with low <= high, got {list(pair)}")
            setattr(self, name, (low, high))
        for name in ("channels_last", "bf16"):  # a string such as "no" would read as true
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        for name, what in (("manifest", "a path"), ("device", "a device ('auto', 'cpu', 'cuda')"),
                           ("init_from", "a path or null")):
            if not isinstance(getattr(self, name), str) and not (name == "init_from" and self.init_from is None):
                raise ConfigError(f"{name} must be {what}, got {getattr(self, name)!r}")
        if not isinstance(self.arch_config, dict):
            raise ConfigError(f"arch_config must be a mapping of the model's options, got {self.arch_config!r}")
        if self.arch not in _segmentation_archs():
            raise ConfigError(f"arch {self.arch!r} is not a segmentation model; choose one of {_segmentation_archs()}")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.size % 32:
            raise ConfigError(f"size must be a multiple of 32 (FC-DenseNet), got {self.size}")

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> SegConfig:
        """Read a YAML recipe; ``overrides`` (non-None values) replace its keys. Relative paths are kept as given."""
        data = read_yaml(path, "recipe")
        return cls.from_dict({**data, **{k: v for k, v in overrides.items() if v is not None}}, source=str(path))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> SegConfig:
        """Build from a mapping; unknown keys are refused by name."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        if "manifest" not in data:
            raise ConfigError(f"{source}: 'manifest' (the image,mask pairs CSV) is required")
        return cls(**data)


_RANGES: dict[str, dict[str, Any]] = {
    "seed": SEED_RANGE, "val_fraction": dict(low=0, low_open=True, high=0.9), "size": dict(integer=True, low=32),
    "gamma": dict(low=0, low_open=True), "threshold": dict(low=0, high=1), "batch_size": dict(integer=True, low=1),
    "lr": dict(low=0, low_open=True), "weight_decay": dict(low=0), "max_epochs": dict(integer=True, low=1),
    "patience": dict(integer=True, low=1), "plateau_patience": dict(integer=True, low=0), "dice_weight": dict(low=0),
    "rotate": dict(low=0), "shift": dict(low=0, high=1), "crop_scale": dict(low=0, low_open=True, high=1),
    "brightness": dict(low=0), "contrast": dict(low=0), "threads": dict(integer=True, low=1, optional=True),
}
"""The numbers of a recipe and their ranges (``settings.number`` options)."""


def _segmentation_archs() -> list[str]:
    return list_models("segmentation")


@dataclass
class Pairs:
    """Preprocessed pairs in memory: ``images`` (N, 1, S, S) float32, ``masks`` (N, 1, S, S) float32 0/1."""

    names: list[str]
    images: torch.Tensor
    masks: torch.Tensor


def read_pairs_manifest(manifest: str | Path) -> list[tuple[Path, Path]]:
    """The (image, mask) paths of a pairs manifest with columns ``image,mask`` (relative to its folder)."""
    manifest = Path(manifest)
    columns, records = read_csv(manifest)
    problems = header_problems(columns)
    missing = {"image", "mask"} - set(columns)
    if missing:
        raise ManifestError(manifest, [*problems, f"missing column(s) {', '.join(sorted(missing))}"])
    pairs = []
    for line, record in records:
        if len(record) != len(columns):
            problems.append(f"line {line}: expected {len(columns)} fields, found {len(record)}")
            continue
        row = {name: value.strip() for name, value in zip(columns, record)}
        image, mask = manifest.parent / row["image"], manifest.parent / row["mask"]
        for p in (image, mask):
            if not p.is_file():
                problems.append(f"line {line}: {p} not found")
        pairs.append((image, mask))
    if not pairs:
        problems.append("no pairs")
    if problems:
        raise ManifestError(manifest, problems)
    return pairs


def read_mask(path: str | Path) -> np.ndarray:
    """A 0/255 (or 0/1) mask image as a boolean array: lung above half the mask's largest value, so that the
    soft edges of a resized or JPEG-saved mask do not count as lung (an empty mask stays empty)."""
    image = read_image(path)
    return image > image.max() / 2


def load_pairs(pairs: list[tuple[Path, Path]], size: int = SEG_SIZE, gamma: float = GAMMA) -> Pairs:
    """Read and preprocess every pair once (SPEC input for the image, nearest resize for the mask)."""
    images, masks = [], []
    for image_path, mask_path in pairs:
        image = torch.from_numpy(read_image(image_path))
        mask = torch.from_numpy(read_mask(mask_path))
        if mask.shape != image.shape:
            raise ManifestError(mask_path, [f"mask shape {tuple(mask.shape)} differs from image {tuple(image.shape)}"])
        images.append(segmentation_input(image, size, gamma))
        masks.append(resize_mask(mask, size).unsqueeze(0).to(torch.float32))
    return Pairs([p.name for p, _ in pairs], torch.stack(images), torch.stack(masks))


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """A seeded random split of ``range(n)`` into (train, val), val holding ``round(n * val_fraction)``."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, round(n * val_fraction))
    return sorted(perm[n_val:]), sorted(perm[:n_val])


def jaccard(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image Jaccard index |P ∩ T| / |P ∪ T| of boolean (B, H, W) masks -> (B,); 1 when both are empty."""
    pred, target = pred.bool().flatten(1), target.bool().flatten(1)
    inter = (pred & target).sum(1).to(torch.float64)
    union = (pred | target).sum(1).to(torch.float64)
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 - soft Dice of sigmoid(logits) and a 0/1 target, averaged over the batch."""
    p = torch.sigmoid(logits).flatten(1)
    t = target.flatten(1)
    return (1 - (2 * (p * t).sum(1) + eps) / (p.sum(1) + t.sum(1) + eps)).mean()


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, dice_weight: float) -> torch.Tensor:
    """BCE-with-logits plus ``dice_weight`` times the soft Dice loss."""
    loss = F.binary_cross_entropy_with_logits(logits, target)
    return loss + dice_weight * soft_dice_loss(logits, target) if dice_weight else loss


class _ResizedCrop(v2.RandomResizedCrop):
    """``v2.RandomResizedCrop`` that resizes masks with nearest-exact, as ``ops.preprocess.resize_mask`` does:
    torchvision's nearest rounds down, which puts the mask about half a pixel below and right of the image."""

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not isinstance(inpt, tv_tensors.Mask):
            return super().transform(inpt, params)
        # v2.functional.resized_crop ignores the interpolation for masks; resize honours nearest-exact.
        return v2.functional.resize(v2.functional.crop(inpt, **params), self.size, InterpolationMode.NEAREST_EXACT)


def augmenter(cfg: SegConfig) -> v2.Transform:
    """Random crop/aspect, affine and intensity jitter, applied jointly to a tv_tensors Image and Mask
    (bilinear for the image, nearest for the mask)."""
    steps: list[v2.Transform] = []
    if cfg.crop_scale < 1 or cfg.aspect != (1.0, 1.0):
        steps.append(_ResizedCrop(cfg.size, scale=(cfg.crop_scale, 1.0), ratio=cfg.aspect, antialias=True))
    steps.append(v2.RandomAffine(degrees=cfg.rotate, translate=(cfg.shift, cfg.shift), scale=cfg.scale,
                                 interpolation=InterpolationMode.BILINEAR))
    if cfg.brightness or cfg.contrast:
        steps.append(v2.ColorJitter(brightness=cfg.brightness, contrast=cfg.contrast))  # leaves masks alone
    return v2.Compose(steps)


def augment_batch(transform: v2.Transform, images: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply ``transform`` with fresh parameters to each (image, mask) pair of the batch, keeping them aligned."""
    out_i, out_m = [], []
    for image, mask in zip(images, masks):
        a, b = transform(tv_tensors.Image(image), tv_tensors.Mask(mask))
        out_i.append(a.as_subclass(torch.Tensor))
        out_m.append(b.as_subclass(torch.Tensor))
    return torch.stack(out_i), torch.stack(out_m)


def _to_device(x: torch.Tensor, cfg: SegConfig) -> torch.Tensor:
    x = x.to(cfg.device)
    return x.contiguous(memory_format=torch.channels_last) if cfg.channels_last else x


def _forward(model: nn.Module, x: torch.Tensor, cfg: SegConfig) -> torch.Tensor:
    """Logits in float32, the forward pass under bf16 autocast when ``cfg.bf16``."""
    device_type = torch.device(cfg.device).type
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=cfg.bf16):
        return model(_to_device(x, cfg)).float()


_SPLIT_AND_MODEL = ("seed", "val_fraction", "arch", "arch_config", "size", "gamma")
"""What a resumed run must keep besides its pairs (the manifest may move: its pairs are compared by the
split they give): another value would change its split or its network."""


def _check_resumable(cfg: SegConfig, run_dir: Path, split: dict[str, Any] | None = None) -> None:
    """Refuse to resume a run under settings that would change its split or its network (a changed split
    would validate on images the first epochs trained on). With ``split`` (the split drawn now), also refuse
    a manifest whose pairs changed since the run started (added, removed or reordered)."""
    run_file = run_dir / RUN_FILE
    if not run_file.is_file():
        return  # nothing recorded yet: the Trainer says whether there is anything to resume
    info = read_json(run_file)
    recorded, now = info.get("config", {}), asdict(cfg)
    changed = [k for k in _SPLIT_AND_MODEL if k in recorded and _comparable(recorded[k]) != _comparable(now[k])]
    if changed:
        raise ConfigError(f"{run_dir}: cannot resume with another {', '.join(changed)} than the run started with "
                          f"({', '.join(f'{k}: {recorded[k]!r} -> {now[k]!r}' for k in changed)}); "
                          "train into a new --out instead")
    if split is not None and "split" in info and [info["split"].get(k) for k in ("train", "val")] != [
            split["train"], split["val"]]:
        raise ConfigError(f"{run_dir}: cannot resume: the pairs of {cfg.manifest} changed since the run started "
                          "(its train/validation split would differ); train into a new --out instead")


def _comparable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def train_segmentation(config: SegConfig, run_dir: str | Path, resume: bool = False) -> dict:
    """Train ``config.arch`` on the manifest's pairs into ``run_dir``; returns the Trainer's summary.

    Adam, lr/10 when the validation loss plateaus, early stopping on validation Jaccard (at the training
    size, threshold 0.5, no post-processing); a checkpoint every epoch; ``resume`` continues an interrupted run.
    """
    cfg = config
    run_dir = Path(run_dir)
    cfg.device = str(resolve_device(cfg.device))
    if resume:
        _check_resumable(cfg, run_dir)
    get_model(cfg.arch, **cfg.arch_config)  # refuse bad options before the pairs are loaded
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    pairs_paths = read_pairs_manifest(cfg.manifest)
    t0 = time.perf_counter()
    data = load_pairs(pairs_paths, cfg.size, cfg.gamma)
    load_seconds = time.perf_counter() - t0
    train_idx, val_idx = split_indices(len(pairs_paths), cfg.val_fraction, cfg.seed)
    if not train_idx:
        raise ConfigError(f"{cfg.manifest}: val_fraction {cfg.val_fraction} of {len(pairs_paths)} pairs leaves none "
                          "to train on")
    split = {"seed": cfg.seed, "train": [data.names[i] for i in train_idx], "val": [data.names[i] for i in val_idx]}
    if resume:
        _check_resumable(cfg, run_dir, split)
    seed_everything(cfg.seed)
    model = get_model(cfg.arch, **cfg.arch_config)
    if cfg.init_from:
        try:
            model.load_state_dict(torch.load(cfg.init_from, map_location="cpu", weights_only=True))
        except (OSError, RuntimeError) as exc:
            raise ConfigError(f"init_from {cfg.init_from}: cannot load into {cfg.arch} ({exc})") from exc
    model = model.to(cfg.device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=0.1,
                                                           patience=cfg.plateau_patience)
    transform = augmenter(cfg)
    run_info = {
        "task": "segmentation", "arch": cfg.arch, "arch_config": cfg.arch_config, "mode": None,
        "preprocessing": {"segmentation": {"size": cfg.size, "equalize": True, "gamma": cfg.gamma,
                                           "threshold": cfg.threshold}},
        "config": asdict(cfg), "manifest": str(Path(cfg.manifest).resolve()),
        "split": split,
        "load_seconds": round(load_seconds, 2), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    train_x, train_y = data.images[train_idx], data.masks[train_idx]
    val_x, val_y = data.images[val_idx], data.masks[val_idx]

    def train_one_epoch(epoch: int) -> dict[str, float]:
        order = torch.randperm(len(train_x))
        total, n = 0.0, 0
        with progress_bar() as bar:
            task = bar.add_task(f"train {epoch}", total=len(order), status="")
            for start in range(0, len(order), cfg.batch_size):
                idx = order[start:start + cfg.batch_size]
                x, y = augment_batch(transform, train_x[idx], train_y[idx])
                loss = segmentation_loss(_forward(model, x, cfg), _to_device(y, cfg), cfg.dice_weight)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.item() * len(idx)
                n += len(idx)
                bar.update(task, advance=len(idx), status=f"loss {total / n:.4f}")
        return {"loss": total / n}

    def evaluate(epoch: int) -> dict[str, float]:
        losses, scores = [], []
        for start in range(0, len(val_x), cfg.batch_size):
            x, y = val_x[start:start + cfg.batch_size], val_y[start:start + cfg.batch_size]
            logits = _forward(model, x, cfg)
            losses.append(segmentation_loss(logits, _to_device(y, cfg), cfg.dice_weight).item() * len(x))
            scores.append(jaccard(lung_masks(logits, cfg.threshold).cpu(), y[:, 0] > 0.5))
        return {"loss": sum(losses) / len(val_x), "jaccard": torch.cat(scores).mean().item()}

    trainer = Trainer(run_dir, model, optimizer, monitor="val_jaccard", mode="max", patience=cfg.patience,
                      max_epochs=cfg.max_epochs, scheduler=scheduler, scheduler_metric="val_loss", run_info=run_info)
    t1 = time.perf_counter()
    # As for learners: --resume into a folder with nothing to resume starts the run (a job script may always pass it).
    summary = trainer.fit(train_one_epoch, evaluate, resume=resume and (run_dir / LAST_FILE).is_file())
    info = read_json(run_dir / RUN_FILE)
    info["train_seconds"] = round(info.get("train_seconds", 0.0) + time.perf_counter() - t1, 1)
    (run_dir / RUN_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return summary


def load_run_model(run_dir: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """The best model of a segmentation run (eval mode) and its run.json."""
    run_dir = Path(run_dir)
    info, best = read_run(run_dir), run_dir / BEST_FILE
    if info.get("task") != "segmentation":
        raise ConfigError(f"{run_dir}: run.json task is {info.get('task')!r}, not 'segmentation'")
    model = get_model(info["arch"], **info.get("arch_config", {}))
    try:
        model.load_state_dict(torch.load(best, map_location="cpu", weights_only=True))
    except (RuntimeError, pickle.UnpicklingError, EOFError) as exc:  # another network's weights, or not weights
        raise ConfigError(f"{best}: weights do not fit architecture {info['arch']!r}: {first_line(exc)}") from None
    return model.eval(), info


def validation_names(record: dict[str, Any] | None, source: str) -> list[str]:
    """The validation image names a run (or the bundle made from it) recorded in its split."""
    try:
        return list(record["split"]["val"])  # type: ignore[index]
    except (TypeError, KeyError) as exc:
        raise ConfigError(f"{source}: the model records no validation split ('split' -> 'val')") from exc


def evaluate_segmentation(segmenter: Any, manifest: str | Path, names: list[str] | None = None) -> dict[str, Any]:
    """Mean Jaccard of the Segmenter's post-processed masks against the manifest's masks at full resolution.

    ``names`` (image file names) selects pairs; by default the validation images the model recorded.
    """
    recorded = names is None
    names = validation_names(segmenter.record, segmenter.source) if recorded else names
    by_name: dict[str, tuple[Path, Path]] = {}
    for image, mask in read_pairs_manifest(manifest):
        if by_name.setdefault(image.name, (image, mask)) != (image, mask):
            raise ManifestError(manifest, [f"two images are named {image.name}: pairs are known by their file name"])
    missing = [n for n in names if n not in by_name]
    if missing:
        hint = " (the model's validation pairs: give the manifest it was trained on)" if recorded else ""
        raise ManifestError(manifest, [f"image {n} is not in the manifest{hint}" for n in missing])
    scores: dict[str, float] = {}
    for start in range(0, len(names), segmenter.batch_size):
        chunk = names[start:start + segmenter.batch_size]
        images = [read_image(by_name[n][0]) for n in chunk]
        preds = segmenter.predict(images)
        for n, pred in zip(chunk, preds):
            target = torch.from_numpy(read_mask(by_name[n][1]))
            scores[n] = jaccard(torch.from_numpy(pred)[None], target[None]).item()
    values = np.array(list(scores.values()))
    return {"n": len(values), "mean_jaccard": float(values.mean()), "min_jaccard": float(values.min()),
            "per_image": scores}
