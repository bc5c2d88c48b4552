"""Shared fixtures: the real data in ../shared/data, skipped with a clear message when absent."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from patchflannel.data.shared import DATA_ENV, shared_data_dir

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = shared_data_dir() or Path(os.environ.get(DATA_ENV) or REPO.parent / "shared" / "data")  # where it was sought

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    # A suite started in the background by a script ignores Ctrl-C, and so would the commands the Ctrl-C tests
    # start (the CLI keeps a SIGINT its process was started to ignore): they get Python's own handling again.
    signal.signal(signal.SIGINT, signal.default_int_handler)


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real data not found at {path} (set PATCHFLANNEL_SHARED_DATA to ../shared/data)")
    return path


@pytest.fixture(scope="session")
def cxr4_dir() -> Path:
    """The 4-class CXR set (manifest.csv + images/)."""
    return _need(SHARED_DATA / "cxr4")


@pytest.fixture(scope="session")
def lungseg_dir() -> Path:
    """The JSRT/SCR lung segmentation pairs (manifest.csv + images/ + masks/)."""
    return _need(SHARED_DATA / "lungseg")


@pytest.fixture
def deny_access(monkeypatch: pytest.MonkeyPatch) -> Callable[[str, Path], None]:
    """``deny_access("scandir" or "stat", folder)``: that os function raises what it raises for another user's
    folder (as root, chmod cannot stop it), the real one answering for every other path."""
    def deny(name: str, folder: Path) -> None:
        real = getattr(os, name)

        def refusing(path, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003 - os's own signature
            if os.fspath(path) == str(folder):
                raise PermissionError(13, "Permission denied", os.fspath(path))
            return real(path, *args, **kwargs)

        monkeypatch.setattr(os, name, refusing)

    return deny
