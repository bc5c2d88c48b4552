"""The engine's inputs: paths, bytes, arrays and tensors taken from the caller and read into :class:`Item` s.

An input is copied as it is handed over (:func:`snapshot`), then read when its group is prepared
(:func:`prepare`): file bytes with their sha256, or an array as float32 in [0, 1] with its content hash. Any
failure is the item's own error, never the batch's.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from patchflannel.engine.results import Prediction
from patchflannel.errors import ImageReadError, first_line
from patchflannel.io.files import printable
from patchflannel.io.readers import check_size, image_hash, raw_hash, read_dicom_bytes, read_file_bytes
from patchflannel.ops.preprocess import to_unit


@dataclass
class Item:
    """One input on its way through the engine: its id, hash, bytes or decoded image, and error or result."""

    item_id: str
    content_hash: str | None = None
    data: bytes | None = None
    image: torch.Tensor | None = None
    shape: tuple[int, ...] = ()
    meta: dict[str, Any] | None = None
    error: str | None = None
    result: Prediction | None = None


_HOST_INPUTS = (str, os.PathLike, bytes, bytearray, memoryview, np.ndarray)


def on_device(x: Any) -> bool:
    """Whether an input may hold device memory that the caller's CUDA stream is still writing."""
    if isinstance(x, torch.Tensor):
        return x.is_cuda
    return not isinstance(x, _HOST_INPUTS)  # DLPack producers (CuPy) and anything unknown


def array_hash(image: torch.Tensor) -> str:
    """Content hash of an array input: sha256 of its float32 bytes and its shape."""
    arr = image.detach().to("cpu", torch.float32).contiguous().numpy()
    h = hashlib.sha256(arr.tobytes())
    h.update(repr(tuple(arr.shape)).encode())
    return h.hexdigest()


def _as_tensor(x: Any, label: str) -> torch.Tensor:
    """A numpy array, torch tensor or DLPack producer (CuPy) as a torch tensor, sharing its memory."""
    try:
        if isinstance(x, np.ndarray):
            if not x.dtype.isnative:  # big-endian data: torch only takes the machine's byte order
                x = x.astype(x.dtype.newbyteorder("="))
            return torch.from_numpy(x if x.flags.c_contiguous else x.copy(order="C"))  # keeps a 0-d array 0-d
        return x if isinstance(x, torch.Tensor) else torch.from_dlpack(x)
    except (TypeError, ValueError, RuntimeError, BufferError) as exc:  # object/str arrays, unsupported dtypes
        raise ImageReadError(label, f"cannot read the array: {exc}") from None


def _array_image(x: Any, label: str) -> torch.Tensor:
    """A 2-D grey array (numpy, torch, or anything with ``__dlpack__`` such as CuPy) as float32 in [0, 1]."""
    t = _as_tensor(x, label)
    if t.ndim == 3 and 1 in (t.shape[0], t.shape[-1]):  # (1, H, W) or (H, W, 1): one grey image
        t = t.squeeze(0 if t.shape[0] == 1 else -1)
    if t.ndim != 2:
        colour = t.ndim == 3 and bool({3, 4} & {t.shape[0], t.shape[-1]})  # RGB or RGBA
        rgb = " (colour: convert to grey first, e.g. PIL's .convert('L'))" if colour else ""
        raise ImageReadError(label, f"expected a 2-D grey image array, got shape {tuple(t.shape)}{rgb}")
    check_size(label, *t.shape)
    if t.dtype in (torch.uint8, torch.uint16):
        # The same float32 values (so the same content hash and seed) on any device.
        return to_unit(t, 255 if t.dtype == torch.uint8 else 65535)
    if not t.is_floating_point():
        dtype = x.dtype if isinstance(x, np.ndarray) else t.dtype  # named as the caller's library names it
        raise ImageReadError(label, f"unsupported array dtype {dtype} (expected uint8, uint16 or float in [0, 1])")
    t = t.to(torch.float32)
    if not bool(torch.isfinite(t).all()):
        raise ImageReadError(label, "float image must be finite and within [0, 1]; it holds NaN or infinite values")
    low, high = (float(v) for v in torch.aminmax(t))
    if low < 0.0 or high > 1.0:
        levels = low >= 0 and high <= 255 and bool((t == t.round()).all())  # whole numbers up to 255
        hint = " (8-bit levels as floats? divide by 255, or pass the uint8 array)" if levels else ""
        raise ImageReadError(label, f"float image must be finite and within [0, 1]; its values run from {low:g} to "
                                    f"{high:g}{hint}")
    return t


def take(x: Any, index: int) -> tuple[str, Any]:
    """The ``index``-th input as the engine holds it until its group is prepared: its id, and a copy of it
    (:func:`snapshot`). An id that cannot be read as text, or an input that cannot be copied (a released
    memoryview), is held as its error, which :func:`prepare` turns into its error result."""
    label = f"<input #{index}>"
    try:
        item_id, x = split_pair(x)
        label = item_id if item_id is not None else default_id(x, index)
        return label, snapshot(x)
    except Exception as exc:  # noqa: BLE001 - one input's failure is its own error, never the stream's
        return label, ImageReadError(label, f"cannot take the input: {type(exc).__name__}: {first_line(exc)[:300]}")


def default_id(x: Any, index: int) -> str:
    """The id of an input given without one: a path names itself; in-memory data is named by its kind and its
    position in the input (``<bytes #3>``, ``<ndarray #0>``)."""
    if isinstance(x, (str, os.PathLike)):
        try:
            return os.fspath(x)
        except Exception:  # noqa: BLE001 - a PathLike whose __fspath__ fails: named by position, refused when read
            return f"<{type(x).__name__} #{index}>"
    kind = "bytes" if isinstance(x, (bytes, bytearray, memoryview)) else type(x).__name__
    return f"<{kind} #{index}>"


def prepare(x: Any, label: str) -> Item:
    """Turn one input into bytes or a tensor, with its content hash; a bad input becomes an error item, whatever
    the failure (a path with a NUL byte, a sparse or meta tensor, a DLPack producer that raises)."""
    try:
        return _read_input(x, label)
    except ImageReadError as exc:
        return Item(label, error=printable(str(exc)))
    except Exception as exc:  # noqa: BLE001 - one input's failure is its own error, never the batch's
        return Item(label, error=str(ImageReadError(label, f"cannot read the input: {type(exc).__name__}: "
                                                           f"{first_line(exc)[:300]}")))


def _read_input(x: Any, label: str) -> Item:
    if isinstance(x, ImageReadError):  # what take() could not hold
        raise x
    if isinstance(x, (str, os.PathLike, bytes, bytearray, memoryview)):
        data = bytes(x) if isinstance(x, (bytes, bytearray, memoryview)) else read_file_bytes(x)
        try:  # DICOM is decoded here, once: its content hash is its decoded image
            dicom = read_dicom_bytes(data, label)
        except ImageReadError as exc:  # a DICOM that cannot be decoded: its error keeps the UIDs it holds
            return Item(label, raw_hash(data), error=printable(str(exc)), meta=exc.meta)  # as bytes_hash has it
        if dicom is not None:
            return Item(label, image_hash(dicom[0]), image=torch.from_numpy(dicom[0]), meta=dicom[1])
        return Item(label, raw_hash(data), data=data)  # not DICOM: its bytes (bytes_hash without sniffing again)
    if isinstance(x, (np.ndarray, torch.Tensor)) or hasattr(x, "__dlpack__"):
        image = _array_image(x, label)
        return Item(label, array_hash(image), image=image, meta={"format": "array", "shape": tuple(image.shape)})
    pair = {tuple: " or an (item_id, x) pair with a string, integer or path id",
            list: "; an (item_id, x) pair is a tuple"}.get(type(x), "")
    raise ImageReadError(label, f"unsupported input type {type(x).__name__} (expected a path, bytes, or a 2-D "
                                f"array/tensor{pair})")


def split_pair(x: Any) -> tuple[str | None, Any]:
    """``(item_id, input)`` from a pair (its id a string, an integer or a path) or a bare input. A 2-tuple whose
    first element is not such an id (image bytes first, say) is not a pair: it is refused as an input."""
    if isinstance(x, tuple) and len(x) == 2 and _is_id(x[0]):
        item_id, x = x
        if item_id is not None:
            item_id = os.fspath(item_id) if isinstance(item_id, os.PathLike) else str(item_id)
        return item_id, x
    return None, x


def _is_id(value: Any) -> bool:
    return value is None or isinstance(value, (str, os.PathLike, np.integer)) or (
        isinstance(value, int) and not isinstance(value, bool))


def snapshot(x: Any) -> Any:
    """An in-memory input copied as it is handed over: it is read only when its group is prepared, later, so
    a producer refilling one buffer for every item would otherwise change the items already queued."""
    if isinstance(x, np.ndarray):
        return x.copy()
    if isinstance(x, torch.Tensor):
        return x.detach().clone()  # on the caller's current stream, before the group's "inputs ready" event
    if isinstance(x, (bytearray, memoryview)):
        return bytes(x)
    if hasattr(x, "__dlpack__"):
        try:
            return torch.from_dlpack(x).clone()
        except Exception:  # noqa: BLE001 - its preparation names the input and the reason
            return x
    return x
