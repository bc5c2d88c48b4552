"""Files and folders: finding files below a folder or by a glob pattern (linked folders followed, a cluster's
``train -> /scratch/...``, each way round a loop cut, hidden folders skipped), checking that an output can be
made before any work, and writing outputs whole (a file atomically; a folder into a user's empty folder without
changing it)."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from patchflannel.errors import ConfigError

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".jpe", ".tif", ".tiff", ".dcm", ".dicom", ".dic"}
)
"""Extensions (lower case) of the image and DICOM files taken from folders and glob patterns."""


def printable(path: str) -> str:
    """``path`` as valid UTF-8 text: the bytes of a name that is not UTF-8 shown as ``\\x..`` escapes."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes of the name, held as surrogates
        return os.fsencode(path).decode("utf-8", "backslashreplace")
    return path


OnError = Callable[[OSError], None]


def walk_files(folder: str | os.PathLike[str], onerror: OnError | None = None) -> Iterator[str]:
    """Paths of the entries that are not folders below ``folder`` (links to nowhere included), folders in name
    order, depth first.

    Folders whose names start with "." are skipped; linked folders are followed, each folder walked once (a link
    back up the tree, or a second link to a folder already walked, is not entered). ``onerror`` gets the
    ``OSError`` of a folder that cannot be listed.
    """
    seen: set[tuple[int, int]] = set()
    for path, entries in _folders(os.fspath(folder), seen, onerror):
        yield from (os.path.join(path, entry.name) for entry in entries if not _is_folder(entry))


def glob_paths(pattern: str, onerror: OnError | None = None) -> list[str]:
    """``glob.glob(pattern, recursive=True)`` (``**`` matches any number of folders), in no set order, except that
    ``**`` does not enter a linked folder that is one of its own ancestors (glob follows a link back up the tree
    until the path is too long, and with two such links it never ends), and gives ``onerror`` the ``OSError`` of
    a folder it cannot list (glob passes over it)."""
    parts = pattern.split(os.sep)
    if "**" not in parts:
        return glob.glob(pattern)
    first = parts.index("**")
    top = os.sep.join(parts[:first]) or (os.sep if pattern.startswith(os.sep) else "")  # "": the current folder
    bases = glob.glob(top) if glob.has_magic(top) else [top]
    return [path for base in bases if os.path.isdir(base or os.curdir)
            for path in _below(base, parts[first:], onerror)]


def _below(folder: str, parts: list[str], onerror: OnError | None) -> Iterator[str]:
    """The paths below ``folder`` that match the pattern ``parts``."""
    part, rest = parts[0], parts[1:]
    if part == "**":
        if not rest and folder:
            yield os.path.join(folder, "")  # as glob: a last "**" names the folder it starts from, and all below
        for sub, _ in _folders(folder, None, onerror):
            yield from _below(sub, rest or ["*"], onerror)
        return
    for path in glob.glob(os.path.join(glob.escape(folder), part)):
        if not rest:
            yield path
        elif os.path.isdir(path):
            yield from _below(path, rest, onerror)


def _folders(top: str, seen: set[tuple[int, int]] | None,
             onerror: OnError | None) -> Iterator[tuple[str, list[os.DirEntry[str]]]]:
    """``top`` and the folders below it that are not hidden, in name order, depth first, each with its entries;
    a link back to an ancestor (by device and inode) is not entered, nor, given ``seen``, a folder already
    walked. ``onerror`` gets the ``OSError`` of a folder that cannot be listed or entered."""
    stack = [(top, ())]
    while stack:
        path, above = stack.pop()
        try:
            ancestors = _identity(path or os.curdir, above)
        except FileNotFoundError as exc:  # gone since its parent was listed (the top: never there)
            if not above and onerror is not None:
                onerror(exc)
            continue
        except OSError as exc:  # listed, but not to be entered (a parent readable but not searchable)
            if onerror is not None:
                onerror(exc)
            continue
        if ancestors[-1] in above or (seen is not None and ancestors[-1] in seen):
            continue
        if seen is not None:
            seen.add(ancestors[-1])
        entries = _entries(path, onerror)
        yield path, entries
        subs = sorted(entry.name for entry in entries if not entry.name.startswith(".") and _is_folder(entry))
        stack.extend((os.path.join(path, name), ancestors) for name in reversed(subs))


def _identity(path: str, ancestors: tuple[tuple[int, int], ...]) -> tuple[tuple[int, int], ...]:
    """``ancestors`` and the (device, inode) of the folder at ``path`` (through links)."""
    info = os.stat(path)
    return (*ancestors, (info.st_dev, info.st_ino))


def _entries(folder: str, onerror: OnError | None) -> list[os.DirEntry[str]]:
    """The entries of ``folder`` (the current folder for ""); none, and ``onerror`` told, when it cannot be
    listed."""
    try:
        with os.scandir(folder or os.curdir) as entries:
            return list(entries)
    except OSError as exc:
        if onerror is not None:
            onerror(exc)
        return []


def _is_folder(entry: os.DirEntry[str]) -> bool:
    """Whether an entry is a folder, or a link to one."""
    try:
        return entry.is_dir()
    except OSError:
        return False


def save_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Write a file through ``write(temporary path)``, then move it into place: it appears whole or not at all
    (a failed write leaves no temporary file). The temporary name is unique to this process and thread, so two
    writers of one file (trainings sharing a ``cache_dir``) never collide: the last complete file wins."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}-{threading.get_ident()}.tmp{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        if exc.filename is not None and os.fspath(exc.filename) == os.fspath(tmp):
            exc.filename = os.fspath(path)  # the error names the file asked for, not its temporary name
        raise
    finally:
        tmp.unlink(missing_ok=True)


def check_can_write(folder: str | os.PathLike[str], label: str | os.PathLike[str]) -> None:
    """Refuse, before any work and without making anything, an output (``label``) whose ``folder`` could not be
    made or written: a file in the way of it or of a folder above it, or a nearest existing folder that takes no
    new file (tried with a file made and removed: ``os.access`` says yes to root on a read-only mount)."""
    probe = os.path.abspath(folder)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise ConfigError(f"{label}: a file is in the way where a folder is wanted ({probe})")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError:
        raise ConfigError(f"{label}: cannot be written there ({probe} is not a writable folder)") from None


def copy_contents(source: Path, out: Path) -> None:
    """Copy what the folder ``source`` holds into ``out``, made if missing (links followed: the copy stands on its
    own). A folder the user gave (empty, or a link to one) keeps its own permissions and stays a link: only its
    contents are new."""
    out.mkdir(parents=True, exist_ok=True)
    for child in source.iterdir():
        if child.is_dir():
            shutil.copytree(child, out / child.name)
        else:
            shutil.copy2(child, out / child.name)


def publish_folder(built: Path, out: Path) -> None:
    """Put the folder ``built`` (made beside ``out``) in place as ``out``: renamed where ``out`` does not exist;
    else (an empty folder the user gave, or a link to one) its contents moved in, so that the folder keeps its
    permissions and its link. A failed move leaves ``out`` empty again."""
    if not out.exists():
        built.rename(out)
        return
    if any(out.iterdir()):  # checked again: something may have been written there while ``built`` was made
        raise ConfigError(f"{out}: no longer empty; nothing was moved into it")
    try:
        for child in built.iterdir():
            shutil.move(child, out / child.name)
    except BaseException:
        remove_written(out, existed=True)
        raise


def first_missing(path: Path) -> Path | None:
    """The topmost folder of ``path`` that does not exist yet (``path`` itself, or one above it); None when
    ``path`` exists: what to remove to undo making ``path``."""
    missing = None
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        missing, path = path, path.parent
    return missing


@contextlib.contextmanager
def made_folders_removed_on_failure(folder: Path) -> Iterator[None]:
    """Within it, ``folder`` and the folders above it that do not exist yet are removed again if the block fails
    (or is interrupted): a failed command leaves no folders it made."""
    made = first_missing(folder)
    try:
        yield
    except BaseException:
        if made is not None:
            remove_written(made, existed=False)
        raise


def remove_written(out: Path, existed: bool) -> None:
    """Undo what a failed command wrote into ``out``: the folder itself when the command made it, else (an empty
    folder, or a link to one, given by the user) only its contents. Never raises: the command's own error is the
    one to report."""
    with contextlib.suppress(OSError):
        if not existed:
            shutil.rmtree(out, ignore_errors=True)
            return
        for child in out.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)
