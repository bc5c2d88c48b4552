"""What every command module shares: clean error exits, and not overwriting a training run by mistake."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from patchflannel.errors import ConfigError, PatchflannelError

errors = Console(stderr=True)

QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", metavar="", help="No progress and no summary on the terminal "
                                        "(the outputs and the exit status are the same).")]
"""``--quiet`` of the commands that work through many inputs (score, segment, bench)."""

EXIT_INPUT_ERRORS = 1
"""Exit status when the run finished but some inputs gave no result (error rows)."""
EXIT_USAGE = 2
"""Exit status for bad options, inputs that name nothing, bad manifests or bundles (nothing done)."""
EXIT_STOPPED = 3
"""Exit status when an unexpected failure stopped the run (``score`` keeps the chunks written: ``--resume``)."""
EXIT_INTERRUPTED = 130
"""Exit status when the run was interrupted (Ctrl-C)."""
EXIT_TERMINATED = 143
"""Exit status when SIGTERM (a batch scheduler stopping the job) stopped the run, as cleanly as Ctrl-C would."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C's KeyboardInterrupt would be, so that a stopped job keeps what it did."""


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _catchable() -> tuple[int, ...]:
    """SIGINT and SIGTERM, less a signal the process was started to ignore (SIGINT, for a job a script put in the
    background): that one stays ignored."""
    return tuple(s for s in _STOP_SIGNALS if signal.getsignal(s) is not signal.SIG_IGN)


@contextmanager
def stops_cleanly() -> Iterator[None]:
    """Within it, in the main thread, Ctrl-C raises KeyboardInterrupt and SIGTERM :class:`Terminated`, once. While
    the run stops cleanly a second signal is ignored (Ctrl-C pressed again, ``timeout`` signalling the process and
    then its group: breaking the stop could leave threads to abort the process at its end); a third ends the
    process at once, as a kill would (what was written whole stays)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    received = 0

    def stop(signum: int, frame: Any) -> None:
        nonlocal received
        received += 1
        if received == 1:
            raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt
        if received >= 3:
            os.write(2, b"stopped at once (signalled three times), as a kill would stop it\n")
            os._exit(EXIT_TERMINATED if signum == signal.SIGTERM else EXIT_INTERRUPTED)

    previous = {s: signal.signal(s, stop) for s in _catchable()}
    try:
        yield
    finally:
        if not received:  # (None: a handler not set from Python, the default one)
            for s, handler in previous.items():
                signal.signal(s, handler if handler is not None else signal.SIG_DFL)


def end_on_signal(code: int) -> None:
    """From now on Ctrl-C or SIGTERM ends the process at once with exit status ``code`` (output flushed): for the
    seconds a process may take to close once its command has ended (torch's compile workers), whose work is done
    and whose status is ``code``."""
    def end(signum: int, frame: Any) -> None:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)

    if threading.current_thread() is threading.main_thread():
        for s in _catchable():
            signal.signal(s, end)


def interrupted_exit(exc: KeyboardInterrupt, message: str) -> typer.Exit:
    """Say how the run was stopped (Ctrl-C or SIGTERM) and ``message`` (what is kept); the exit to raise."""
    terminated = isinstance(exc, Terminated)
    errors.print(f"{'terminated (SIGTERM)' if terminated else 'interrupted'}: {message}", markup=False, highlight=False,
                 soft_wrap=True)
    return typer.Exit(EXIT_TERMINATED if terminated else EXIT_INTERRUPTED)


@contextmanager
def fail_cleanly(code: int = 2, interrupted: str | None = None) -> Iterator[None]:
    """A PatchflannelError, or an operating-system error on a path (a file where a folder is wanted, no
    permission, a full disk), becomes its message on stderr and exit status ``code`` (no traceback): 2, nothing
    done (bad options, inputs or files, as for click's usage errors), for every command but the checks
    (``data validate``, ``export verify``), whose finding is exit status 1. With ``interrupted``, Ctrl-C (or
    SIGTERM) prints that (how to go on) and exits 130 (143)."""
    with stops_cleanly() if interrupted is not None else contextlib.nullcontext():
        try:
            yield
        except (PatchflannelError, OSError) as exc:
            errors.print(f"error: {_reason(exc)}", markup=False, highlight=False, soft_wrap=True)
            raise typer.Exit(code) from None
        except KeyboardInterrupt as exc:
            if interrupted is None:
                raise
            raise interrupted_exit(exc, interrupted) from None


def _reason(exc: Exception) -> str:
    """``path: reason`` for an OS error on a path (a file where a folder is wanted is said in those words)."""
    if not isinstance(exc, OSError) or exc.filename is None:
        return str(exc)
    path = Path(exc.filename)
    if isinstance(exc, (FileExistsError, NotADirectoryError)) and not path.is_dir():
        return f"{path}: a file is in the way where a folder is wanted"
    return f"{path}: {exc.strerror or exc}"


def fresh_run(out: Path, resume: bool, task: str) -> None:
    """Refuse to train into a folder that holds a run already, unless resuming it (a run of the same ``task``:
    segmentation, learner or ensemble), or a `cv` run at all."""
    from patchflannel.settings import read_json
    from patchflannel.training.loop import LAST_FILE, RUN_FILE

    if (Path(out) / "learners").is_dir() and (Path(out) / "config.yaml").is_file():
        raise ConfigError(f"{out} holds a `cv` run (learners/, config.yaml): train into another --out")
    recorded = read_json(Path(out) / RUN_FILE).get("task") if (Path(out) / RUN_FILE).is_file() else None
    if recorded is not None and recorded != task:
        raise ConfigError(f"{out} holds a {recorded} run, not a {task} run: train into another --out")
    if not resume and (Path(out) / LAST_FILE).is_file():
        raise ConfigError(f"{out} already holds a training run ({LAST_FILE}): --resume continues it; to start again, "
                          "remove it or train into another --out")


def metrics_text(metrics: dict[str, Any]) -> str:
    """``name value`` pairs of a run's metrics, four decimals."""
    return "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
