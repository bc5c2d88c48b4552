"""The ``onnxruntime`` backend: an ONNX file in an ONNX Runtime session (CUDA provider when available)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from patchflannel.errors import BackendUnavailableError

MISSING = "onnxruntime is not installed (pip install 'patchflannel[onnx]')"


class OnnxRuntimeBackend:
    """Runs one ONNX model; inputs are cast to the model's declared input type. ``precision`` is the graph's
    (as the bundle records it: an fp16 export keeps float32 inputs and outputs)."""

    name = "onnxruntime"

    def __init__(self, path: Path, device: torch.device, precision: str = "fp32") -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise BackendUnavailableError(MISSING) from exc
        self.device = torch.device(device)
        providers = ["CPUExecutionProvider"]
        if self.device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": self.device.index or 0}))
        self.session = ort.InferenceSession(str(path), providers=providers)
        self.providers = self.session.get_providers()
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.input_dtype = np.float16 if inp.type == "tensor(float16)" else np.float32
        self.precision = precision

    def run(self, batch: torch.Tensor) -> torch.Tensor:
        """Float32 outputs on the engine's device for a float (N, ...) batch."""
        x = batch.detach().to("cpu").numpy().astype(self.input_dtype, copy=False)
        (out,) = self.session.run(None, {self.input_name: x})[:1]
        return torch.from_numpy(np.asarray(out, dtype=np.float32)).to(self.device)
