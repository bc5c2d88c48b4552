"""What every command module shares: clean error exits."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import typer
from rich.console import Console

from patchflannel.errors import PatchflannelError

errors = Console(stderr=True)


@contextmanager
def fail_cleanly(code: int = 1) -> Iterator[None]:
    """A PatchflannelError becomes its message on stderr and exit status ``code`` (no traceback)."""
    try:
        yield
    except PatchflannelError as exc:
        errors.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(code) from None
