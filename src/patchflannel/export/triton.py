"""A Triton Inference Server model repository for a bundle, validated against Triton's own config schema.

The repository holds one ensemble, ``patchflannel``, chaining: ``preprocess`` (python backend: grey image
-> segmentation input, full-size image, global crop) -> ``segmentation`` (ONNX or TensorRT) -> ``sampler``
(python backend: lung mask, K lung-centred patches, this package's ops) -> one model per learner (ONNX or
TensorRT, ``max_batch_size`` >= K; the K patches of an image are one batch) -> ``votes`` (python backend:
vote fractions) -> ``flannel`` (the ensemble network; softmax of its logits is the prediction). The client
sends ``IMAGE`` (H, W) float32 in [0, 1] and ``SEED`` (the image's seed, ``ops.seeding.image_seed``). The
python models import patchflannel, which must be installed in Triton's Python environment. No server runs
in the development environment: :func:`validate_repository` parses every config.pbtxt with
``tritonclient``'s ``model_config_pb2`` and checks that tensor names chain from step to step.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from patchflannel.bundle import Bundle, ModelEntry, ModelFile, export_hint, load_bundle, role_of
from patchflannel.errors import BackendUnavailableError, BundleError, ConfigError
from patchflannel.export.tensorrt import learner_k_max
from patchflannel.io.files import made_folders_removed_on_failure, publish_folder

ENSEMBLE = "patchflannel"
PLATFORMS = {"onnx": ("onnxruntime_onnx", "model.onnx"), "tensorrt": ("tensorrt_plan", "model.plan")}


def _pb() -> tuple[Any, Any]:
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError as exc:
        raise BackendUnavailableError("tritonclient is not installed (pip install 'patchflannel[triton]')") from exc
    return model_config_pb2, text_format


# ---- stage functions the python-backend models call (plain torch, testable without a server) ----

def preprocess_stage(image: torch.Tensor, preprocessing: dict[str, Any]) -> dict[str, torch.Tensor]:
    """(H, W) grey image -> ``SEG_INPUT`` (1, 1, s, s), ``IMAGE_FULL`` (S, S), ``GLOBAL`` (1, 3, c, c), ``BLANK`` (1,):
    whether the image is one grey level (the engine's ``blank_image`` flag)."""
    from patchflannel.export.onnx import _global_inputs, _seg_inputs
    from patchflannel.ops.preprocess import is_blank, learner_image

    return {"SEG_INPUT": _seg_inputs([image], preprocessing),
            "IMAGE_FULL": learner_image(image, preprocessing["image_size"]),
            "GLOBAL": _global_inputs([image], preprocessing),
            "BLANK": is_blank(image).reshape(1)}


def sampler_stage(image_full: torch.Tensor, seg_logits: torch.Tensor, seed: int,
                  preprocessing: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Full-size image and (1, 1, s, s) segmentation logits -> ``PATCHES`` (K, 3, p, p) normalised, ``FALLBACK`` (1,)."""
    from patchflannel.ops.mask import lung_masks, postprocess_mask
    from patchflannel.ops.preprocess import normalize, resize_mask
    from patchflannel.ops.sampler import draw_patches

    size = preprocessing["image_size"]
    raw = lung_masks(seg_logits, preprocessing["segmentation"]["threshold"])[0].cpu().numpy()
    mask = torch.from_numpy(postprocess_mask(raw))[None].to(image_full.device)  # as the engine and training do
    masks = resize_mask(mask, size)
    drawn = draw_patches(image_full[None], masks, [int(seed)], k=preprocessing["k"], patch=preprocessing["patch_size"],
                         min_fraction=preprocessing["min_lung_fraction"])
    return {"PATCHES": normalize(drawn["patches"][0], preprocessing), "FALLBACK": drawn["fallback"]}


def votes_stage(learner_logits: list[torch.Tensor], modes: list[str]) -> dict[str, torch.Tensor]:
    """Each learner's logits -> ``CONFIDENCES`` (1, n, C): vote fractions over K patches, softmax of a global crop."""
    from patchflannel.ops.votes import vote_fractions

    conf = [vote_fractions(lg[None])[0] if mode == "patch" else torch.softmax(lg[0], -1)
            for lg, mode in zip(learner_logits, modes)]
    return {"CONFIDENCES": torch.stack(conf)[None]}


# ---- config writing ----

_DTYPES = {"float32": "TYPE_FP32", "int64": "TYPE_INT64", "bool": "TYPE_BOOL"}


def _tensor(name: str, dtype: str, dims: list[int]) -> dict[str, Any]:
    return {"name": name, "data_type": _DTYPES[dtype], "dims": dims}


def _dims(spec: dict[str, Any]) -> list[int]:
    return [int(d) for d in spec["shape"][1:]]


def _config(pb: Any, **fields: Any) -> Any:
    from google.protobuf import json_format

    return json_format.ParseDict(fields, pb.ModelConfig())


def _python_model(pb: Any, name: str, inputs: list, outputs: list, preprocessing: dict[str, Any], modes: list[str]) -> Any:
    params = {"stage": name, "preprocessing": json.dumps(preprocessing), "modes": json.dumps(modes)}
    return _config(pb, name=name, backend="python", max_batch_size=0, input=inputs, output=outputs,
                   parameters={k: {"string_value": v} for k, v in params.items()})


def _network(pb: Any, name: str, entry: ModelEntry, fmt: str, max_batch: int) -> Any:
    inp, out = entry.inputs[0], entry.outputs[0]
    return _config(pb, name=name, platform=PLATFORMS[fmt][0], max_batch_size=max_batch,
                   input=[_tensor(inp["name"], inp["dtype"], _dims(inp))],
                   output=[_tensor(out["name"], out["dtype"], _dims(out))],
                   dynamic_batching={}, instance_group=[{"kind": "KIND_GPU" if fmt == "tensorrt" else "KIND_AUTO"}])


MODEL_PY = '''"""Triton python-backend model: one stage of Patched FLANNEL, computed by patchflannel's own ops."""

import json

import torch
import triton_python_backend_utils as pb_utils

from patchflannel.export import triton as stages


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.stage = params["stage"]
        self.pre = json.loads(params["preprocessing"])
        self.modes = json.loads(params["modes"])
        self.inputs = [i["name"] for i in config["input"]]

    def _run(self, tensors):
        if self.stage == "preprocess":
            return stages.preprocess_stage(tensors["IMAGE"], self.pre)
        if self.stage == "sampler":
            return stages.sampler_stage(tensors["IMAGE_FULL"], tensors["SEG_LOGITS"], int(tensors["SEED"][0]), self.pre)
        return stages.votes_stage([tensors[name] for name in self.inputs], self.modes)

    def execute(self, requests):
        responses = []
        for request in requests:
            tensors = {n: torch.from_numpy(pb_utils.get_input_tensor_by_name(request, n).as_numpy()) for n in self.inputs}
            out = self._run(tensors)
            responses.append(pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor(n, v.numpy()) for n, v in out.items()]))
        return responses
'''


def _ensemble(pb: Any, bundle: Bundle, names: list[str]) -> Any:
    seg = bundle.segmentation
    steps = [
        {"model_name": "preprocess", "model_version": -1, "input_map": {"IMAGE": "IMAGE"},
         "output_map": {"SEG_INPUT": "seg_input", "IMAGE_FULL": "image_full", "GLOBAL": "global_crop",
                        "BLANK": "BLANK"}},
        {"model_name": "segmentation", "model_version": -1, "input_map": {seg.inputs[0]["name"]: "seg_input"},
         "output_map": {seg.outputs[0]["name"]: "seg_logits"}},
        {"model_name": "sampler", "model_version": -1,
         "input_map": {"IMAGE_FULL": "image_full", "SEG_LOGITS": "seg_logits", "SEED": "SEED"},
         "output_map": {"PATCHES": "patches", "FALLBACK": "FALLBACK"}},
    ]
    for i, entry in enumerate(bundle.learners):
        source = "patches" if (entry.mode or "patch") == "patch" else "global_crop"
        steps.append({"model_name": names[i], "model_version": -1,
                      "input_map": {entry.inputs[0]["name"]: source},
                      "output_map": {entry.outputs[0]["name"]: f"logits_{i}"}})
    votes_in = {f"LOGITS_{i}": f"logits_{i}" for i in range(len(bundle.learners))}
    steps.append({"model_name": "votes", "model_version": -1, "input_map": votes_in,
                  "output_map": {"CONFIDENCES": "CONFIDENCES"}})
    outputs = [_tensor("FALLBACK", "bool", [1]), _tensor("BLANK", "bool", [1]), _tensor("CONFIDENCES", "float32", [1, len(bundle.learners), len(bundle.classes)])]
    if bundle.ensemble is not None:
        ens = bundle.ensemble
        steps.append({"model_name": "flannel", "model_version": -1, "input_map": {ens.inputs[0]["name"]: "CONFIDENCES"},
                      "output_map": {ens.outputs[0]["name"]: "LOGITS"}})
        outputs.append(_tensor("LOGITS", "float32", [1, len(bundle.classes)]))
    return _config(pb, name=ENSEMBLE, platform="ensemble", max_batch_size=0,
                   input=[_tensor("IMAGE", "float32", [-1, -1]), _tensor("SEED", "int64", [1])],
                   output=outputs, ensemble_scheduling={"step": steps})


def _network_file(entry: ModelEntry, fmt: str) -> ModelFile | None:
    """The file a network is served from: ONNX, the fp32 file; TensorRT, the fp16 engine where there is one."""
    files = sorted((f for f in entry.files if f.format == fmt and (fmt != "onnx" or f.precision == "fp32")),
                   key=lambda f: f.precision != "fp16")
    return files[0] if files else None


def _max_batch(bundle: Bundle, entry: ModelEntry, chosen: ModelFile, k_max: int, max_images: int) -> int:
    """A network's ``max_batch_size``: patch learners ``k_max`` patches, the others ``max_images`` images; a
    TensorRT engine's the largest batch its profile takes (Triton refuses a model configured above it), which
    for a patch learner must hold an image's K patches."""
    patch = role_of(bundle, entry) == "patch"
    wanted = k_max if patch else max_images
    if chosen.format != "tensorrt":
        return wanted
    largest = (chosen.extra.get("profile") or {}).get(entry.inputs[0]["name"], {}).get("max")
    if largest is None:
        return wanted
    k = int(bundle.preprocessing["k"])
    if patch and largest < k:
        raise BundleError(f"{chosen.path}: its engine takes at most {largest} patches, fewer than an image's K={k}; "
                          "rebuild it with `patchflannel export tensorrt BUNDLE --k-max N` (N >= K)")
    return min(wanted, int(largest))


def export_triton(bundle: Bundle | str | Path | None, out: str | Path, *, model_format: str = "onnx",
                  k_max: int | None = None, max_images: int = 16) -> Path:
    """Write a Triton model repository for ``bundle`` at ``out`` and validate it; returns ``out``.

    ``model_format`` picks every network's files (segmentation, learners, ensemble: ``onnx`` or ``tensorrt``;
    the bundle must hold them). Patch
    learners take batches up to ``k_max`` (default 4 K; at least K) patches, the other networks ``max_images``
    images; TensorRT engines at most what their profile takes.
    """
    pb, text_format = _pb()
    if model_format not in PLATFORMS:
        raise ConfigError(f"the format (--format) must be one of {', '.join(PLATFORMS)}, got {model_format!r}")
    if k_max is not None and k_max < 1:
        raise ConfigError(f"--k-max must be at least 1, got {k_max}")
    b = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
    if not b.learners:
        raise BundleError(f"bundle {b.root} has no learners; a Triton ensemble needs at least one")
    k = int(b.preprocessing["k"])
    k_max = learner_k_max(k_max, k)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise BundleError(f"{out}: exists and is not empty")
    pre = b.preprocessing
    n, c = len(b.learners), len(b.classes)
    s, size, p, crop = pre["segmentation"]["size"], pre["image_size"], pre["patch_size"], pre["global"]["crop"]
    names = [f"learner_{i}_{e.arch}" for i, e in enumerate(b.learners)]
    modes = [e.mode or "patch" for e in b.learners]
    configs: dict[str, Any] = {
        "preprocess": _python_model(pb, "preprocess", [_tensor("IMAGE", "float32", [-1, -1])],
                                    [_tensor("SEG_INPUT", "float32", [1, 1, s, s]), _tensor("IMAGE_FULL", "float32", [size, size]),
                                     _tensor("GLOBAL", "float32", [1, 3, crop, crop]), _tensor("BLANK", "bool", [1])],
                                    pre, modes),
        "sampler": _python_model(pb, "sampler", [_tensor("IMAGE_FULL", "float32", [size, size]),
                                                 _tensor("SEG_LOGITS", "float32", [1, 1, s, s]), _tensor("SEED", "int64", [1])],
                                 [_tensor("PATCHES", "float32", [-1, 3, p, p]), _tensor("FALLBACK", "bool", [1])], pre, modes),
        "votes": _python_model(pb, "votes", [_tensor(f"LOGITS_{i}", "float32", [-1, c]) for i in range(n)],
                               [_tensor("CONFIDENCES", "float32", [1, n, c])], pre, modes),
    }
    networks = {"segmentation": b.segmentation, **dict(zip(names, b.learners)),
                **({"flannel": b.ensemble} if b.ensemble is not None else {})}
    files = {name: _network_file(e, model_format) for name, e in networks.items()}
    missing = [networks[name].name for name, f in files.items() if f is None]
    if missing:
        kind = "fp32 onnx" if model_format == "onnx" else model_format
        raise BundleError(f"{b.root}: no {kind} file for {', '.join(missing)}; make them with "
                          f"{export_hint(model_format)}")
    for name, e in networks.items():
        configs[name] = _network(pb, name, e, model_format, _max_batch(b, e, files[name], k_max, max_images))
    configs[ENSEMBLE] = _ensemble(pb, b, names)
    tmp = out.with_name(f".{out.name}.building")
    shutil.rmtree(tmp, ignore_errors=True)
    with made_folders_removed_on_failure(out.parent):  # building beside out may make the folders above it
        try:
            for name, config in configs.items():
                (tmp / name / "1").mkdir(parents=True)
                (tmp / name / "config.pbtxt").write_text(text_format.MessageToString(config))
                if name in files:
                    shutil.copyfile(b.path_of(files[name]), tmp / name / "1" / PLATFORMS[model_format][1])
                elif config.backend == "python":
                    (tmp / name / "1" / "model.py").write_text(MODEL_PY)
            validate_repository(tmp)
            publish_folder(tmp, out)  # a user's empty folder (or a link to one) keeps its permissions and link
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _names(tensors: Any) -> set[str]:
    return {t.name for t in tensors}


def validate_repository(root: str | Path) -> dict[str, Any]:
    """Parse every ``*/config.pbtxt`` with Triton's schema and check the ensembles' tensor chains.

    Returns the parsed configs by model name; raises BundleError listing every problem found.
    """
    pb, text_format = _pb()
    root = Path(root)
    configs: dict[str, Any] = {}
    problems: list[str] = []
    for path in sorted(root.glob("*/config.pbtxt")):
        try:
            config = text_format.Parse(path.read_text(), pb.ModelConfig())
        except text_format.ParseError as exc:
            problems.append(f"{path}: not a valid Triton model config ({exc})")
            continue
        if config.name != path.parent.name:
            problems.append(f"{path}: name {config.name!r} differs from its folder {path.parent.name!r}")
        model_file = {"onnxruntime_onnx": "model.onnx", "tensorrt_plan": "model.plan"}.get(config.platform)
        if config.backend == "python":
            model_file = "model.py"
        if model_file and not (path.parent / "1" / model_file).is_file():
            problems.append(f"{path.parent.name}: version 1 has no {model_file}")
        configs[config.name] = config
    if not configs:
        problems.append(f"{root}: no */config.pbtxt found")
    for name, config in configs.items():
        if config.platform != "ensemble":
            continue
        available = _names(config.input)
        for i, step in enumerate(config.ensemble_scheduling.step):
            where = f"{name} step {i} ({step.model_name})"
            model = configs.get(step.model_name)
            if model is None:
                problems.append(f"{where}: no model {step.model_name!r} in the repository")
                continue
            for key, value in step.input_map.items():
                if key not in _names(model.input):
                    problems.append(f"{where}: {step.model_name} has no input {key!r} (has {sorted(_names(model.input))})")
                if value not in available:
                    problems.append(f"{where}: input {value!r} is produced by no earlier step nor the ensemble's inputs")
            missing = _names(model.input) - set(step.input_map)
            if missing:
                problems.append(f"{where}: inputs {sorted(missing)} are not fed")
            for key, value in step.output_map.items():
                if key not in _names(model.output):
                    problems.append(f"{where}: {step.model_name} has no output {key!r} (has {sorted(_names(model.output))})")
                available.add(value)
        for out in _names(config.output) - available:
            problems.append(f"{name}: output {out!r} is produced by no step")
    if problems:
        raise BundleError(f"Triton repository {root} is invalid:\n  " + "\n  ".join(problems))
    return configs
