"""The ``patchflannel`` command: a thin typer app; each subcommand calls one library function."""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    name="patchflannel",
    help="Patched FLANNEL chest X-ray classification: data, training, export, scoring and benchmarks.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
train_app = typer.Typer(help="Train a stage: lung segmentation, a base learner, or the FLANNEL ensemble.",
                        no_args_is_help=True)

def _version(value: bool) -> None:
    if value:
        from patchflannel import __version__

        typer.echo(f"patchflannel {__version__}")
        raise typer.Exit()


@app.callback()
def _app_options(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, metavar="", help="Print the version and exit."),
) -> None:
    """Patched FLANNEL chest X-ray classification: data, training, export, scoring and benchmarks."""


# Command modules in data-flow order. Each exposes ``register(app)``; those adding ``train`` subcommands
# also expose ``register_train(train_app)``.
COMMAND_MODULES = ("data", "seg", "learn", "export", "score", "bench")
_registered = False


def _register() -> None:
    """Attach every command group once."""
    global _registered
    if _registered:
        return
    for name in COMMAND_MODULES:
        module = importlib.import_module(f"patchflannel.cli.{name}")
        module.register(app)
        if hasattr(module, "register_train"):
            module.register_train(train_app)
    app.add_typer(train_app, name="train")
    _registered = True


def main() -> None:
    """Console entry point. A Ctrl-C or SIGTERM once the command has ended, while the process closes, ends it at
    once with the command's own exit status (it said 130 of an export that was done and kept)."""
    from patchflannel.cli._common import end_on_signal

    _register()
    try:
        app()
    except SystemExit as exc:
        end_on_signal(exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1)
        raise
