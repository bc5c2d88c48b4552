"""Where the shared real data (``lungseg/``, ``cxr4/``; research use only, never shipped) is found."""

from __future__ import annotations

import os
from pathlib import Path

DATA_ENV = "PATCHFLANNEL_SHARED_DATA"
"""The environment variable naming the shared data folder."""


def shared_data_dir() -> Path | None:
    """$PATCHFLANNEL_SHARED_DATA when set, else ``shared/data`` beside a source checkout of this repository, else
    ``../shared/data`` from the working directory; None when that is not a folder."""
    named = os.environ.get(DATA_ENV)
    candidates = [Path(named)] if named else [Path(__file__).resolve().parents[3].parent / "shared" / "data",
                                              Path.cwd().parent / "shared" / "data"]
    return next((c for c in candidates if c.is_dir()), None)
