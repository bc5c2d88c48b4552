"""The ``tensorrt`` backend: deserialise a TensorRT engine file and run it on the current CUDA stream.

Runtime only (engines are built by the export step for the target card): ``trt.Runtime`` ->
``deserialize_cuda_engine`` -> execution context; each call sets the input shape, binds torch tensors by
address and runs ``execute_async_v3`` on torch's current stream.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from patchflannel.errors import BackendUnavailableError, BundleError, ConfigError


def import_tensorrt() -> Any:
    """The ``tensorrt`` module; BackendUnavailableError saying how to install it where it is missing."""
    try:
        import tensorrt
    except ImportError as exc:
        raise BackendUnavailableError(
            "TensorRT is not installed (pip install --extra-index-url https://pypi.nvidia.com 'patchflannel[tensorrt]'; "
            "it needs an NVIDIA GPU and driver)") from exc
    return tensorrt


class TensorRTBackend:
    """One TensorRT engine with a single input and a single output tensor (dynamic batch dimension)."""

    name = "tensorrt"

    def __init__(self, path: Path, device: torch.device, precision: str = "fp16") -> None:
        trt = import_tensorrt()
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise BackendUnavailableError("the tensorrt backend needs a CUDA device")
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        with torch.cuda.device(self.device):
            self.engine = self._runtime.deserialize_cuda_engine(Path(path).read_bytes())
            if self.engine is None:
                raise BundleError(f"{path}: TensorRT could not deserialise this engine (see its log above: an engine "
                                  "built for another card or TensorRT version is refused)")
            self.context = self.engine.create_execution_context()
            if self.context is None:
                raise BundleError(f"{path}: TensorRT could not make an execution context (out of device memory?)")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or len(outputs) != 1:
            raise BundleError(f"{path}: expected one input and one output tensor, found {inputs} and {outputs}")
        self.input_name, self.output_name = inputs[0], outputs[0]
        self.path = Path(path)
        static = self.engine.get_tensor_shape(self.input_name)[0]
        self.max_batch = int(static if static > 0 else self.engine.get_tensor_profile_shape(self.input_name, 0)[2][0])
        """The largest batch the engine's optimisation profile accepts (the engine splits calls at it)."""
        to_torch = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16}
        self.input_dtype = to_torch[self.engine.get_tensor_dtype(self.input_name)]
        self.output_dtype = to_torch[self.engine.get_tensor_dtype(self.output_name)]
        self.precision = precision

    def run(self, batch: torch.Tensor) -> torch.Tensor:
        """Float32 outputs for a float (N, ...) batch on the CUDA device."""
        # The engine's GPU must be the thread's current device (the preparation thread's is cuda:0).
        with torch.cuda.device(self.device):
            return self._run(batch)

    def _run(self, batch: torch.Tensor) -> torch.Tensor:
        x = batch.to(device=self.device, dtype=self.input_dtype).contiguous()
        if not self.context.set_input_shape(self.input_name, tuple(x.shape)):
            raise ConfigError(f"{self.path}: TensorRT refused input shape {tuple(x.shape)} (its optimisation profile "
                              f"takes batches up to {self.max_batch}; rebuild with `patchflannel export tensorrt`)")
        out = torch.empty(tuple(self.context.get_tensor_shape(self.output_name)), dtype=self.output_dtype, device=self.device)
        self.context.set_tensor_address(self.input_name, x.data_ptr())
        self.context.set_tensor_address(self.output_name, out.data_ptr())
        if not self.context.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        return out.float()
