"""Per-image seeds from content and run seed, so results never depend on order or grouping."""

from __future__ import annotations

import hashlib


def image_seed(content_hash: str, run_seed: int = 0) -> int:
    """A 63-bit seed from an image's content hash (hex) and the run seed."""
    digest = hashlib.sha256(f"{content_hash}:{int(run_seed)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
