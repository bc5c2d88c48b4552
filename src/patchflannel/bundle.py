"""The model bundle: a folder with ``bundle.json`` and the model files, the single source of truth.

Everything an inference needs (classes, preprocessing, learner order, model files with hashes) lives in
bundle.json. :func:`load_bundle` verifies the schema version, that every file is present, its sha256 and
its format before anything is used, and refuses a mismatch with a message saying what is wrong.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from patchflannel.classes import CLASSES
from patchflannel.errors import BundleError, ConfigError
from patchflannel.ops.preprocess import GAMMA, IMAGE_SIZE, SEG_SIZE
from patchflannel.ops.sampler import DEFAULT_K, MIN_LUNG_FRACTION, PATCH_SIZE
from patchflannel.settings import read_json

SCHEMA_VERSION = 1
BUNDLE_FILE = "bundle.json"
FORMATS = ("torch", "onnx", "tensorrt", "torch_export")
PRECISIONS = ("fp32", "fp16", "bf16")
LEARNER_MODES = ("global", "patch")
"""How a base learner sees an image: the whole film (FLANNEL) or K lung patches (Patched FLANNEL)."""
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def default_preprocessing() -> dict[str, Any]:
    """The SPEC.md preprocessing, as recorded in bundle.json."""
    return {
        "segmentation": {"size": SEG_SIZE, "equalize": True, "gamma": GAMMA, "threshold": 0.5},
        "image_size": IMAGE_SIZE,
        "patch_size": PATCH_SIZE,
        "k": DEFAULT_K,
        "min_lung_fraction": MIN_LUNG_FRACTION,
        "normalization": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
        "global": {"resize": 336, "crop": 224},
    }


@dataclass
class ModelFile:
    """One serialised form of a model: ``format`` in FORMATS, ``path`` relative to the bundle."""

    format: str
    path: str
    sha256: str
    precision: str = "fp32"
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class ModelEntry:
    """A network of the bundle: its registered architecture, options, files and tensor signature."""

    name: str
    arch: str
    arch_config: dict[str, Any]
    files: list[ModelFile]
    inputs: list[dict[str, Any]] = field(default_factory=list)
    outputs: list[dict[str, Any]] = field(default_factory=list)
    mode: str | None = None

    def file(self, fmt: str, precision: str | None = None) -> ModelFile:
        """The file of format ``fmt`` (and ``precision``, when given); BundleError if the bundle lacks it."""
        for f in self.files:
            if f.format == fmt and (precision is None or f.precision == precision):
                return f
        have = ", ".join(f"{f.format}/{f.precision}" for f in self.files) or "none"
        raise BundleError(f"model {self.name!r} has no {fmt} file{'' if precision is None else ' in ' + precision} (has: {have})")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelEntry:
        """The entry of a bundle.json ``models`` item."""
        files = [ModelFile(**f) for f in d.get("files", [])]
        return cls(**{**d, "files": files})


@dataclass
class Bundle:
    """A loaded, verified bundle."""

    root: Path
    classes: list[str]
    preprocessing: dict[str, Any]
    segmentation: ModelEntry
    learners: list[ModelEntry]
    ensemble: ModelEntry | None
    name: str = "bundle"
    training: dict[str, Any] | None = None
    versions: dict[str, Any] = field(default_factory=dict)
    bundle_id: str = ""

    def path_of(self, f: ModelFile) -> Path:
        """Absolute path of one of the bundle's files."""
        return self.root / f.path

    def models(self) -> list[ModelEntry]:
        """Every network, segmentation first, then the learners in ensemble order, then the ensemble."""
        return [self.segmentation, *self.learners, *([self.ensemble] if self.ensemble else [])]

    def to_json(self) -> dict[str, Any]:
        """The bundle.json content."""
        return {
            "schema_version": SCHEMA_VERSION,
            "name": self.name,
            "classes": list(self.classes),
            "preprocessing": self.preprocessing,
            "segmentation": asdict(self.segmentation),
            "learners": [asdict(m) for m in self.learners],
            "ensemble": asdict(self.ensemble) if self.ensemble else None,
            "training": self.training,
            "versions": self.versions,
        }


def io_signature(role: str, preprocessing: dict[str, Any], n_learners: int = 0) -> dict[str, list[dict[str, Any]]]:
    """``{"inputs": [...], "outputs": [...]}`` of a network: tensor name, shape (``batch`` the dynamic axis), dtype.

    ``role`` is ``segmentation``, ``patch`` or ``global`` (a base learner) or ``ensemble``.
    """
    n_classes = len(CLASSES)
    if role == "segmentation":
        size = preprocessing["segmentation"]["size"]
        inp, out = ("image", [1, size, size]), ("logits", [1, size, size])
    elif role in LEARNER_MODES:
        size = preprocessing["patch_size"] if role == "patch" else preprocessing["global"]["crop"]
        inp, out = ("patches", [3, size, size]), ("logits", [n_classes])
    elif role == "ensemble":
        inp, out = ("confidences", [n_learners, n_classes]), ("logits", [n_classes])
    else:
        raise ValueError(f"unknown network role {role!r}")
    return {"inputs": [{"name": inp[0], "shape": ["batch", *inp[1]], "dtype": "float32"}],
            "outputs": [{"name": out[0], "shape": ["batch", *out[1]], "dtype": "float32"}]}


def role_of(bundle: Bundle, entry: ModelEntry) -> str:
    """The role (see :func:`io_signature`) ``entry`` plays in ``bundle``."""
    if entry is bundle.segmentation:
        return "segmentation"
    if entry is bundle.ensemble:
        return "ensemble"
    return entry.mode or "patch"


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape a bundle's files."""
    import numpy
    import torchvision

    from patchflannel import __version__

    out = {"patchflannel": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
           "numpy": numpy.__version__, "python": platform.python_version()}
    for mod in ("onnx", "onnxruntime", "tensorrt"):
        try:
            out[mod] = __import__(mod).__version__
        except ImportError:
            pass
    return out


def _check_format(path: Path, fmt: str, label: str) -> None:
    head = path.read_bytes()[:8] if path.stat().st_size else b""
    if not head:
        raise BundleError(f"{label}: file is empty")
    if fmt in ("torch", "torch_export") and not head.startswith(b"PK\x03\x04"):
        raise BundleError(f"{label}: declared {fmt} but is not a torch zip archive")
    if fmt == "onnx":
        try:
            import onnx
        except ImportError:
            if head[0] != 0x08:
                raise BundleError(f"{label}: declared onnx but is not an ONNX protobuf") from None
            return
        try:
            model = onnx.load(str(path), load_external_data=False)
        except Exception as exc:
            raise BundleError(f"{label}: declared onnx but cannot be parsed as ONNX ({exc})") from exc
        if not model.graph.node:
            raise BundleError(f"{label}: declared onnx but holds no graph")


def _entry(data: Any, key: str) -> ModelEntry:
    if not isinstance(data, dict) or not all(isinstance(f, dict) for f in data.get("files", [])):
        raise BundleError(f"bundle.json: malformed model entry {key!r}: expected an object with a list of file objects")
    try:
        return ModelEntry.from_dict(data)
    except TypeError as exc:
        raise BundleError(f"bundle.json: malformed model entry {key!r}: {exc}") from exc


def default_bundle_path() -> Path:
    """The bundle shipped inside the package."""
    return Path(str(resources.files("patchflannel") / "assets" / "default"))


def is_default_bundle(root: Path) -> bool:
    """Whether ``root`` is the package's own bundle (part of the installed package: never written into)."""
    return root.resolve() == default_bundle_path().resolve()


def export_hint(fmt: str) -> str:
    """How to add files of ``fmt`` to a bundle (tensorrt builds in place; onnx and compiled write a copy)."""
    if fmt == "tensorrt":
        return "`patchflannel export tensorrt BUNDLE` (builds in place, on a GPU with TensorRT)"
    return f"`patchflannel export {fmt} BUNDLE --out DIR` (a copy of the bundle with them added)"


def load_bundle(path: str | Path | None = None, *, verify: bool = True) -> Bundle:
    """Load and verify a bundle folder (or its bundle.json); ``None`` loads the package's default bundle."""
    root = Path(path) if path is not None else default_bundle_path()
    if root.name == BUNDLE_FILE:
        root = root.parent
    spec_file = root / BUNDLE_FILE
    if not spec_file.is_file():
        why = ("no such bundle folder" if not root.exists() else "not a folder" if not root.is_dir()
               else f"no {BUNDLE_FILE} found (not a patchflannel bundle)")
        raise BundleError(f"{root}: {why}")
    data = read_json(spec_file, BundleError)
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise BundleError(f"{spec_file}: schema version {version!r} is not supported (this patchflannel reads {SCHEMA_VERSION})")
    missing = [k for k in ("classes", "preprocessing", "segmentation", "learners") if k not in data]
    if missing:
        raise BundleError(f"{spec_file}: missing key(s) {', '.join(missing)}")
    if not isinstance(data["learners"], list) or not isinstance(data["preprocessing"], dict):
        raise BundleError(f"{spec_file}: 'learners' must be a list and 'preprocessing' an object")
    if list(data["classes"]) != list(CLASSES):
        raise BundleError(f"{spec_file}: classes {data['classes']} differ from this package's {list(CLASSES)}")
    bundle = Bundle(
        root=root,
        name=data.get("name", root.name),
        classes=list(data["classes"]),
        preprocessing=data["preprocessing"],
        segmentation=_entry(data["segmentation"], "segmentation"),
        learners=[_entry(m, f"learners[{i}]") for i, m in enumerate(data["learners"])],
        ensemble=_entry(data["ensemble"], "ensemble") if data.get("ensemble") else None,
        training=data.get("training"),
        versions=data.get("versions", {}),
        bundle_id=hashlib.sha256(spec_file.read_bytes()).hexdigest()[:16],
    )
    check_spec(bundle, spec_file)
    if verify:
        verify_bundle(bundle)
    return bundle


def check_spec(bundle: Bundle, where: Path) -> None:
    """BundleError naming every problem of the bundle's preprocessing or, that being sound, of its model entries
    (``where`` names the bundle.json in the message)."""
    problems = _preprocessing_problems(bundle.preprocessing) or _entry_problems(bundle)
    if problems:
        raise BundleError(f"{where} refused:\n  " + "\n  ".join(problems))


def _preprocessing_problems(pre: dict[str, Any]) -> list[str]:
    """What is missing or out of range in bundle.json's ``preprocessing`` (each value the engine reads)."""
    def number(value: Any) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    def whole(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    def bound(value: Any) -> int:  # a limit another value sets: 0 where that value is itself wrong
        return value if whole(value) else 0

    resize = bound(pre["global"].get("resize")) if isinstance(pre.get("global"), dict) else 0
    checks = {
        "segmentation.size": (whole, lambda v: v >= 32, "a whole number >= 32"),
        "segmentation.gamma": (number, lambda v: v > 0, "a number > 0"),
        "segmentation.threshold": (number, lambda v: 0 <= v <= 1, "a number from 0 to 1"),
        "image_size": (whole, lambda v: v >= 1, "a whole number >= 1"),
        "patch_size": (whole, lambda v: 1 <= v <= bound(pre.get("image_size")), "a whole number from 1 to image_size"),
        "k": (whole, lambda v: v >= 1, "a whole number >= 1"),
        "min_lung_fraction": (number, lambda v: 0 <= v <= 1, "a number from 0 to 1"),
        "normalization.mean": (lambda v: isinstance(v, list) and len(v) == 3 and all(map(number, v)), bool,
                               "a list of 3 numbers"),
        "normalization.std": (lambda v: isinstance(v, list) and len(v) == 3 and all(map(number, v)),
                              lambda v: min(v) > 0, "a list of 3 numbers > 0"),
        "global.resize": (whole, lambda v: v >= 1, "a whole number >= 1"),
        "global.crop": (whole, lambda v: 1 <= v <= resize, "a whole number from 1 to global.resize"),
    }
    problems = [f"preprocessing.{key} is {pre[key]!r}; it takes an object" for key in ("segmentation", "normalization", "global")
                if key in pre and not isinstance(pre[key], dict)]
    for key, (kind, within, what) in checks.items():
        value: Any = pre
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if value is None and not any(p.startswith(f"preprocessing.{key.split('.')[0]} is") for p in problems):
            problems.append(f"preprocessing.{key} missing (it takes {what})")
        elif value is not None and (not kind(value) or not within(value)):
            problems.append(f"preprocessing.{key} is {value!r}; it takes {what}")
    if isinstance(pre.get("segmentation"), dict) and pre["segmentation"].get("equalize", True) is not True:
        problems.append("preprocessing.segmentation.equalize must be true: the segmentation input is always "
                        "histogram-equalised (SPEC.md stage 1), as in training")
    return problems


def _entry_problems(bundle: Bundle) -> list[str]:
    """What in the model entries does not fit together: names, learner modes, precisions, the ensemble's learner
    count, input shapes against the preprocessing, architectures a torch file needs."""
    from patchflannel.models.registry import list_models

    known = set(list_models())
    names = [str(m.name) for m in bundle.models()]  # (no learner at all is a segmentation-only bundle: allowed)
    problems = [f"model name {n!r} is used twice" for n in sorted({n for n in names if names.count(n) > 1})]
    for m in bundle.learners:
        if m.mode not in (None, *LEARNER_MODES):
            problems.append(f"learner {m.name!r}: mode {m.mode!r}; it takes 'patch' or 'global'")
    config = bundle.ensemble.arch_config if bundle.ensemble else None
    n_learners = config.get("n_learners") if isinstance(config, dict) else None
    if bundle.ensemble and not isinstance(config, dict):
        problems.append(f"ensemble: arch_config is {config!r}; it takes an object")
    elif n_learners is not None and n_learners != len(bundle.learners):
        problems.append(f"the ensemble weighs {n_learners!r} learners (n_learners), but the bundle lists "
                        f"{len(bundle.learners)}")
    for m in bundle.models():
        problems += [f"{f.path}: precision {f.precision!r}; it takes {', '.join(PRECISIONS)}"
                     for f in m.files if f.precision not in PRECISIONS]
        if any(f.format == "torch" for f in m.files) and not (isinstance(m.arch, str) and m.arch in known):
            problems.append(f"model {m.name!r}: architecture {m.arch!r} is not registered (its torch file needs it)")
        role = role_of(bundle, m)
        if role not in ("segmentation", *LEARNER_MODES) and not (role == "ensemble" and n_learners is not None):
            continue  # a wrong mode is said above; an ensemble of another kind has no shape to expect
        want = io_signature(role, bundle.preprocessing, len(bundle.learners))["inputs"][0]["shape"]
        got = m.inputs[0].get("shape") if isinstance(m.inputs, list) and m.inputs and isinstance(m.inputs[0], dict) else None
        if got is not None and got != want:
            problems.append(f"model {m.name!r}: input shape {got} does not fit the preprocessing ({want})")
    return problems


def verify_bundle(bundle: Bundle) -> None:
    """Check every file: known format, present, sha256 as recorded, content of the declared format."""
    problems: list[str] = []
    root = bundle.root.resolve()
    for model in bundle.models():
        if not model.files:
            problems.append(f"model {model.name!r} lists no file")
        for f in model.files:
            p = bundle.path_of(f)
            if Path(f.path).is_absolute() or not p.resolve().is_relative_to(root):
                problems.append(f"{f.path}: outside the bundle folder (a bundle's files are named relative to it)")
            elif f.format not in FORMATS:
                problems.append(f"{f.path}: unknown format {f.format!r} (known: {', '.join(FORMATS)})")
            elif not p.is_file():
                problems.append(f"{f.path}: file missing")
            elif sha256_file(p) != f.sha256:
                problems.append(f"{f.path}: sha256 mismatch (file changed or corrupted)")
            else:
                try:
                    _check_format(p, f.format, f.path)
                except BundleError as exc:
                    problems.append(str(exc))
    if problems:
        raise BundleError(f"bundle {bundle.root} refused:\n  " + "\n  ".join(problems))


def write_bundle(bundle: Bundle) -> Path:
    """Write bundle.json for ``bundle`` (its files must already be in ``bundle.root``), then verify it."""
    spec_file = bundle.root / BUNDLE_FILE
    check_spec(bundle, spec_file)  # before anything is written: a bundle load_bundle would refuse is not made
    bundle.root.mkdir(parents=True, exist_ok=True)
    if not bundle.versions:
        bundle.versions = library_versions()
    spec_file.write_text(json.dumps(bundle.to_json(), indent=2) + "\n")
    verify_bundle(bundle)
    return spec_file


class StagedFiles:
    """An export's new files, written beside their final paths (``name.partial.ext``) and moved into place by
    :meth:`commit` once every one has passed its parity check: an export that fails leaves the bundle's files
    as they were (bundle.json still matches them). Used as a context manager, it removes what it did not commit.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._staged: list[tuple[Path, Path]] = []

    def path(self, rel: str | Path) -> Path:
        """Where to write the file that will be ``root/rel``."""
        final = self.root / rel
        final.parent.mkdir(parents=True, exist_ok=True)
        staged = final.with_name(f"{final.stem}.partial{final.suffix}")
        self._staged.append((staged, final))
        return staged

    def commit(self) -> None:
        """Move every staged file to its final path."""
        for staged, final in self._staged:
            os.replace(staged, final)
        self._staged = []

    def __enter__(self) -> StagedFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        for staged, _ in self._staged:
            staged.unlink(missing_ok=True)


def add_file(root: Path, model_path: Path | str, fmt: str, precision: str = "fp32", **extra: Any) -> ModelFile:
    """Describe a file already written under ``root`` (hash computed now)."""
    p = Path(root) / model_path
    return ModelFile(format=fmt, path=str(Path(model_path).as_posix()), sha256=sha256_file(p), precision=precision, extra=extra)


def save_torch(module: nn.Module, root: Path, rel_path: str) -> ModelFile:
    """Save a module's state_dict under ``root`` and describe it."""
    p = Path(root) / rel_path
    p.parent.mkdir(parents=True, exist_ok=True)
    state = module.state_dict()
    cpu_state = OrderedDict((k, v.detach().cpu()) for k, v in state.items())
    cpu_state._metadata = getattr(state, "_metadata", None)  # type: ignore[attr-defined]  # layer versions (mnasnet)
    torch.save(cpu_state, p)
    return add_file(root, rel_path, "torch")


def load_torch_model(bundle: Bundle, entry: ModelEntry) -> nn.Module:
    """Build ``entry``'s architecture and load its torch weights (``weights_only=True``), in eval mode."""
    from patchflannel.models import get_model

    f = entry.file("torch")
    model = get_model(entry.arch, **entry.arch_config)
    state = torch.load(bundle.path_of(f), map_location="cpu", weights_only=True)
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as exc:  # (not a mapping of tensors: Type- or AttributeError)
        raise BundleError(f"{f.path}: weights do not fit architecture {entry.arch!r}: {_misfit(model, state)}") from exc
    return model.eval()


def _misfit(model: nn.Module, state: Any) -> str:
    """How a state_dict misses ``model``'s tensors, in a line (torch's message lists every key)."""
    if not isinstance(state, dict):
        return f"the file holds a {type(state).__name__}, not a state_dict"
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shaped = [f"{k} {tuple(state[k].shape)} for {tuple(own[k].shape)}" for k in own
              if k in state and getattr(state[k], "shape", None) != own[k].shape]
    parts = [f"{len(keys)} {what} (e.g. {', '.join(keys[:2])})" for keys, what in
             ((missing, f"of its {len(own)} tensors missing"), (unexpected, "unexpected"),
              (shaped, "of another shape")) if keys]
    return "; ".join(parts) or "torch refused it"


def entry_from_module(name: str, arch: str, module: nn.Module, root: Path, rel_path: str, *,
                      arch_config: dict[str, Any] | None = None, mode: str | None = None,
                      inputs: list[dict[str, Any]] | None = None,
                      outputs: list[dict[str, Any]] | None = None) -> ModelEntry:
    """Save ``module``'s weights under ``root`` and describe it as a bundle model entry."""
    return ModelEntry(name=name, arch=arch, arch_config=dict(arch_config or {}),
                      files=[save_torch(module, root, rel_path)], inputs=inputs or [], outputs=outputs or [], mode=mode)


def random_bundle(root: str | Path, *, segmentation: str = "fcdensenet56", learners: tuple[str, ...] = ("shufflenet_v2_x0_5",),
                  mode: str = "patch", seed: int = 0, name: str = "random") -> Bundle:
    """A bundle of randomly initialised networks (timing and tests need no trained weights); ConfigError for a
    name of another family than its role's (a segmentation network given as a learner)."""
    from patchflannel.models import get_model, model_family

    for arch, family in ((segmentation, "segmentation"), *((a, "classifier") for a in learners)):
        if model_family(arch) != family:
            raise ConfigError(f"{arch!r} is a network of the {model_family(arch)} family; a {family} network is "
                              "wanted there")
    root = Path(root)
    pre = default_preprocessing()
    torch.manual_seed(seed)
    seg = entry_from_module("segmentation", segmentation, get_model(segmentation), root, "segmentation.pt",
                            **io_signature("segmentation", pre))
    names = [f"{arch}_{mode}" if learners.count(arch) == 1 else f"{arch}_{mode}_{i}" for i, arch in enumerate(learners)]
    ls = [entry_from_module(names[i], arch, get_model(arch), root, f"learners/{i}_{arch}.pt", mode=mode,
                            **io_signature(mode, pre))
          for i, arch in enumerate(learners)]
    ens = entry_from_module("ensemble", "flannel", get_model("flannel", n_learners=len(ls)), root, "ensemble.pt",
                            arch_config={"n_learners": len(ls)}, **io_signature("ensemble", pre, len(ls)))
    bundle = Bundle(root=root, name=name, classes=list(CLASSES), preprocessing=pre,
                    segmentation=seg, learners=ls, ensemble=ens, training={"note": "random weights, untrained"})
    write_bundle(bundle)
    return load_bundle(root)
