"""The ``patchflannel`` command: a thin typer app; each subcommand calls one library function."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="patchflannel",
    help="Patched FLANNEL chest X-ray classification: data, training, export, scoring and benchmarks.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _register() -> None:
    """Attach every subcommand group. Each module exposes ``register(app)``."""
    from patchflannel.cli import data as _data

    for module in (_data,):
        module.register(app)


def main() -> None:
    """Console entry point."""
    _register()
    app()
