"""One small exception hierarchy. In bulk work these become values on a result, never a crash."""

from __future__ import annotations

from typing import Any


def first_line(exc: BaseException) -> str:
    """An exception's message cut to its first line (its type's name when it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class PatchflannelError(Exception):
    """Base class of every error this package raises on purpose."""


class ImageReadError(PatchflannelError):
    """An input could not be read as an image; the message names the input and the reason. ``meta`` holds what
    the file said of itself before it failed (a DICOM file's UIDs), so an error row still identifies it."""

    def __init__(self, source: object, reason: str, *, meta: dict[str, Any] | None = None) -> None:
        self.source = str(source)
        self.reason = reason
        self.meta = dict(meta or {})
        super().__init__(f"{self.source}: {reason}")

    def __reduce__(self) -> tuple[Any, ...]:  # pickled whole: cv's worker processes and Ray send errors back
        return ImageReadError, (self.source, self.reason), {"meta": self.meta}


class ManifestError(PatchflannelError):
    """A manifest or splits file is malformed; ``problems`` lists every bad row found."""

    def __init__(self, path: object, problems: list[str]) -> None:
        self.path = str(path)
        self.problems = list(problems)
        if len(self.problems) == 1:  # one line, as every other error
            super().__init__(f"{self.path}: {self.problems[0]}")
            return
        shown = "\n  ".join(self.problems[:50])
        more = f"\n  ... and {len(self.problems) - 50} more" if len(self.problems) > 50 else ""
        super().__init__(f"{self.path}: {len(self.problems)} problem(s):\n  {shown}{more}")

    def __reduce__(self) -> tuple[Any, ...]:
        return ManifestError, (self.path, self.problems)


class BundleError(PatchflannelError):
    """A model bundle is missing, incomplete, tampered with or of an unknown schema."""


class ConfigError(PatchflannelError):
    """A configuration file or option is invalid."""


class BackendUnavailableError(PatchflannelError):
    """An optional backend (TensorRT, CuPy, DALI, ONNX Runtime, ...) is not installed or has no device."""
