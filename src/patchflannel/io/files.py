"""Finding files below a folder: linked folders followed (a cluster's ``train -> /scratch/...``), each way
round a loop cut, hidden folders skipped."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator


def walk_files(folder: str | os.PathLike[str], onerror: Callable[[OSError], None] | None = None) -> Iterator[str]:
    """Paths of the entries that are not folders below ``folder`` (links to nowhere included), in no set order.

    Folders whose names start with "." are skipped; a folder that is one of its own ancestors (a link back up
    the tree) is not entered again. ``onerror`` gets the ``OSError`` of a folder that cannot be listed.
    """
    top = os.fspath(folder)
    for root, dirs, files in os.walk(top, onerror=onerror, followlinks=True):
        if _loops(top, root):
            dirs[:] = []
            continue
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        yield from (os.path.join(root, name) for name in files)


def _loops(top: str, folder: str) -> bool:
    """Whether ``folder`` (below ``top``) is the same folder as one of its ancestors up to ``top``."""
    real, parent = os.path.realpath(folder), folder
    while os.path.normpath(parent) != os.path.normpath(top) and parent != os.path.dirname(parent):
        parent = os.path.dirname(parent)
        if os.path.realpath(parent) == real:
            return True
    return False
