"""Lung masks for input files: 0/255 PNG masks at each input's own size, overlays, and a report CSV.

Per image: SPEC preprocessing (equalise, gamma 0.5, 256x256), the network, ``sigmoid > threshold``, then
post-processing at 256 (keep the two largest connected components, fill holes: see
:func:`patchflannel.ops.mask.postprocess_mask`), then a nearest-neighbour resize back to the input's size.
Masks covering less than ``min_fraction`` of the image are written but flagged in ``segment_report.csv``;
inputs that cannot be read get an ``error`` row and are skipped, the rest are segmented.
"""

from __future__ import annotations

import contextlib
import csv
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy import ndimage
from torch import nn

from patchflannel.bundle import BUNDLE_FILE, load_bundle, load_torch_model
from patchflannel.devices import resolve_device
from patchflannel.errors import ConfigError, ImageReadError
from patchflannel.io import read_image
from patchflannel.io.files import IMAGE_EXTENSIONS, printable
from patchflannel.ops.mask import mask_fraction, predict_lung_masks
from patchflannel.ops.preprocess import resize_mask
from patchflannel.training.loop import RUN_FILE
from patchflannel.training.segmentation import load_run_model

REPORT_FILE = "segment_report.csv"
REPORT_COLUMNS = ("file", "status", "lung_fraction", "mask", "message")
MIN_FRACTION = 0.05
"""Masks covering less than this fraction of the image are flagged."""


@dataclass
class Segmenter:
    """A segmentation network with the preprocessing it was trained with."""

    model: nn.Module
    size: int = 256
    gamma: float = 0.5
    threshold: float = 0.5
    device: str = "cpu"
    batch_size: int = 8
    source: str = ""
    record: dict | None = None
    """What the model's bundle or run recorded about its training (split, recipe), when known."""

    def predict(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Post-processed boolean lung masks, each at its image's own (H, W)."""
        out: list[np.ndarray] = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start:start + self.batch_size]
            masks = predict_lung_masks(self.model, chunk, self.size, self.gamma, self.threshold, self.device)
            for image, mask in zip(chunk, masks):
                out.append(resize_mask(torch.from_numpy(mask), tuple(image.shape)).numpy())
        return out


def load_segmenter(model: str | Path | None = None, device: str = "auto", batch_size: int = 8) -> Segmenter:
    """A Segmenter from a bundle folder, a segmentation run folder (run.json + best.pt), or the default bundle."""
    device = str(resolve_device(device))
    if batch_size < 1:
        raise ConfigError(f"batch_size (--batch-size) must be >= 1, got {batch_size}")
    if model is None or (Path(model) / BUNDLE_FILE).is_file() or Path(model).name == BUNDLE_FILE:
        bundle = load_bundle(model)
        seg = bundle.preprocessing["segmentation"]
        net = load_torch_model(bundle, bundle.segmentation)
        return Segmenter(net.to(device), seg["size"], seg["gamma"], seg["threshold"], device, batch_size,
                         str(bundle.root), (bundle.training or {}).get("segmentation"))
    run_dir = Path(model)
    if (run_dir / RUN_FILE).is_file():
        net, info = load_run_model(run_dir)
        pre = (info.get("preprocessing") or {}).get("segmentation")
        if not pre:
            raise ConfigError(f"{run_dir}/run.json: no preprocessing recorded (not a finished segmentation run)")
        return Segmenter(net.to(device), pre["size"], pre["gamma"], pre["threshold"], device, batch_size,
                         str(run_dir), info)
    if not run_dir.exists():
        raise ConfigError(f"{model}: no such bundle or run folder")
    raise ConfigError(f"{model}: neither a bundle (no {BUNDLE_FILE}) nor a segmentation run (no run.json)")


def outline(mask: np.ndarray, width: int) -> np.ndarray:
    """The boundary pixels of a boolean mask, ``width`` pixels thick."""
    return mask & ~ndimage.binary_erosion(mask, iterations=max(1, width), border_value=0)


def overlay_image(image: np.ndarray, mask: np.ndarray) -> Image.Image:
    """An RGB picture of the grey image with the mask outline drawn in red."""
    grey = (np.clip(image, 0, 1) * 255).astype(np.uint8)
    rgb = np.stack([grey] * 3, axis=-1)
    rgb[outline(mask, max(1, max(mask.shape) // 256))] = (255, 0, 0)
    return Image.fromarray(rgb, "RGB")


def mask_name(path: Path) -> str:
    """The file name of an input's mask: ``<stem>.png``, where the stem keeps the whole name unless it ends in an
    image extension (a DICOM named by its UID, ``1.2.840.113619.2.55.1``, keeps its last part)."""
    return f"{path.stem if path.suffix.lower() in IMAGE_EXTENSIONS else path.name}.png"


def _flag_message(fraction: float, min_fraction: float) -> tuple[str, str]:
    if fraction < min_fraction:
        return "flagged", f"mask covers {fraction:.1%} of the image (< {min_fraction:.1%}): check the input"
    return "ok", ""


def segment_images(paths: Iterable[str | Path], segmenter: Segmenter, out_dir: str | Path, *, overlays: bool = False,
                   min_fraction: float = MIN_FRACTION, progress: Callable[[int], None] | None = None) -> list[dict[str, str]]:
    """Segment every input into ``out_dir/<stem>.png`` (0/255, :func:`mask_name`), optionally
    ``out_dir/overlays/<stem>.png``.

    Writes ``out_dir/segment_report.csv`` (file, status ok|flagged|error, lung_fraction, mask, message)
    and returns its rows, one per input in input order. Never raises for one bad input; never writes over an
    input or a file already in ``out_dir`` (that input is an error row); ConfigError, before any work, for an
    ``out_dir`` holding an earlier run's report (:func:`remove_run` clears it). ``progress`` gets the number of
    inputs done as they are. Interrupted (KeyboardInterrupt), it writes the report of the inputs reached so far
    before the interrupt goes on.
    """
    paths = [Path(p) for p in paths]
    inputs = {os.path.realpath(p) for p in paths}
    out_dir = Path(out_dir)
    if (out_dir / REPORT_FILE).exists():
        raise ConfigError(f"{out_dir} holds an earlier run ({REPORT_FILE}): remove_run({str(out_dir)!r}) removes it "
                          "and the masks it lists, or write to another folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    if overlays:
        (out_dir / "overlays").mkdir(exist_ok=True)
    rows: list[dict[str, str]] = []
    names: set[str] = set()
    pending: list[tuple[int, Path, np.ndarray]] = []

    def flush() -> None:
        for (i, path, image), mask in zip(pending, segmenter.predict([p[2] for p in pending])):
            if progress is not None:
                progress(1)
            fraction = float(mask_fraction(mask))
            mask_path = out_dir / mask_name(path)
            Image.fromarray(mask.astype(np.uint8) * 255, "L").save(mask_path)
            if overlays:
                overlay_image(image, mask).save(out_dir / "overlays" / mask_name(path))
            status, message = _flag_message(fraction, min_fraction)
            rows[i].update(status=status, lung_fraction=f"{fraction:.4f}", mask=printable(mask_path.name), message=message)
        pending.clear()

    try:
        for path in paths:
            row = {"file": printable(str(path)), "status": "error", "lung_fraction": "", "mask": "", "message": ""}
            rows.append(row)
            name = mask_name(path)
            written = [out_dir / name, *([out_dir / "overlays" / name] if overlays else [])]
            replaced = next((w for w in written if os.path.realpath(w) in inputs), None)
            try:
                if name.casefold() in names:  # one file on a case-insensitive file system
                    raise ImageReadError(path, f"another input already writes {printable(name)}; rename one of them")
                if len(os.fsencode(name)) > 255:
                    raise ImageReadError(path, "its mask's name would be longer than a file name may be; rename it")
                if replaced is not None:
                    raise ImageReadError(path, f"its mask would replace the input {printable(str(replaced))}; "
                                               "write the masks to another --out")
                there = next((w for w in written if os.path.lexists(w)), None)  # not this run's: its names are new
                if there is not None:
                    raise ImageReadError(path, f"its mask would replace {printable(str(there))}, already there and "
                                               "not written by this run; move that file, or write to another --out")
                image = read_image(path)
            except ImageReadError as exc:
                row["message"] = exc.reason
                if progress is not None:
                    progress(1)
                continue
            names.add(name.casefold())
            pending.append((len(rows) - 1, path, image))
            if len(pending) >= segmenter.batch_size:
                flush()
        if pending:
            flush()
    except KeyboardInterrupt:  # a report of what was done: the masks written so far are listed
        for i, _, _ in pending:
            if rows[i]["status"] == "error" and not rows[i]["message"]:
                rows[i]["message"] = "interrupted before its mask was written"
        _write_report(out_dir, rows)
        raise
    _write_report(out_dir, rows)
    return rows


def _write_report(out_dir: Path, rows: list[dict[str, str]]) -> None:
    with open(out_dir / REPORT_FILE, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=REPORT_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def remove_run(out_dir: str | Path) -> int:
    """Remove an earlier run from ``out_dir``: the masks and overlays its report lists, then the report; returns
    the number of files removed. Nothing else in the folder is touched."""
    out_dir = Path(out_dir)
    report = out_dir / REPORT_FILE
    try:
        with open(report, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            if reader.fieldnames != list(REPORT_COLUMNS):
                raise ConfigError(f"{report}: not a segment report (columns {', '.join(reader.fieldnames or [])}): "
                                  "nothing removed; write the masks to another folder")
            listed = {row["mask"] for row in reader if row["mask"]}
    except (UnicodeDecodeError, csv.Error) as exc:
        raise ConfigError(f"{report}: cannot be read as a segment report ({exc}): nothing removed; write the masks "
                          "to another folder") from None
    removed = 0
    for folder in (out_dir, out_dir / "overlays"):
        # The report holds names as printable text (\x.. escapes): match the folder's real names through it.
        real = {printable(name): name for name in (os.listdir(folder) if folder.is_dir() else [])
                if name.endswith(".png")}
        for shown in listed & set(real):
            path = folder / real[shown]
            if path.is_file():
                path.unlink()
                removed += 1
    with contextlib.suppress(OSError):  # the overlays folder the run made, now empty (a folder with more stays)
        (out_dir / "overlays").rmdir()
    report.unlink()
    return removed + 1


def report_summary(rows: list[dict[str, str]]) -> dict[str, int]:
    """Counts of rows by status."""
    counts = {"ok": 0, "flagged": 0, "error": 0}
    for r in rows:
        counts[r["status"]] += 1
    return counts

