"""CuPy implementation of :func:`patchflannel.ops.sampler.centres_from_uniforms` for GPU pipelines.

Same integer mapping as the torch version, so both give identical centres for the same uniforms.
"""

from __future__ import annotations

from typing import Any

from patchflannel.errors import BackendUnavailableError


def _cupy() -> Any:
    try:
        import cupy
    except ImportError as exc:  # pragma: no cover - depends on the machine
        raise BackendUnavailableError("the cupy sampler needs CuPy (pip install 'patchflannel[gpu]')") from exc
    return cupy


def centres_from_uniforms_cupy(masks: Any, uniforms: Any) -> Any:
    """(B, H, W) bool CuPy masks and (B, K) float64 uniforms -> (B, K, 2) int64 (row, col) centres."""
    cp = _cupy()
    masks = cp.asarray(masks)
    b, h, w = masks.shape
    if b == 0:  # as the torch version: no images, no centres
        return cp.empty((0, uniforms.shape[1], 2), dtype=cp.int64)
    counts = cp.cumsum(masks.reshape(b, h * w).astype(cp.int64), axis=1)
    n = counts[:, -1:]
    if bool((n == 0).any()):
        raise ValueError("a mask has no lung pixel; pass masks through effective_masks first")
    u = cp.asarray(uniforms, dtype=cp.float64)
    idx = cp.minimum(cp.floor(u * n.astype(cp.float64)).astype(cp.int64), n - 1)
    # Row-wise searchsorted(right=True) as one flat search: offset each row into a disjoint range.
    total = int(h * w)
    offsets = (cp.arange(b, dtype=cp.int64) * (int(n.max()) + 1))[:, None]
    flat_counts = (counts + offsets).ravel()
    pos = cp.searchsorted(flat_counts, (idx + offsets).ravel(), side="right").reshape(b, -1)
    flat = pos - cp.arange(b, dtype=cp.int64)[:, None] * total
    return cp.stack((flat // w, flat % w), axis=-1)
