"""Settings read from files: JSON records, YAML configs, and the numbers of YAML recipes checked, with errors
that name the file or the setting.

YAML 1.1 reads ``1e-4`` (no dot) as a string; such strings are taken as the number they spell.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import yaml

from patchflannel.errors import ConfigError, PatchflannelError, first_line


def read_json(path: str | Path, error: type[PatchflannelError] = ConfigError) -> dict[str, Any]:
    """The JSON object in the file at ``path``; ``error`` naming the file when it holds anything else."""
    try:
        data = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def read_yaml(path: str | Path, what: str = "config") -> dict[str, Any]:
    """The mapping in the YAML file at ``path`` (empty for an empty file); ConfigError naming the file and the
    reason otherwise (missing, a folder, not text, not YAML, not a mapping)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: {'not a file' if path.exists() else f'{what} file not found'}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (a {what} is YAML)") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({first_line(exc)})") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the {what} ({exc.strerror or exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a {what} is a mapping of keys to values, got {type(data).__name__}")
    return data


SEED_RANGE: dict[str, Any] = dict(integer=True, low=0, high=2**32 - 1)
"""The :func:`number` options of a seed (per-epoch seeds are ``seed * 1_000_003 + epoch``, within 64 bits)."""


def number(name: str, value: Any, *, integer: bool = False, low: float | None = None, high: float | None = None,
           low_open: bool = False, optional: bool = False) -> int | float | None:
    """``value`` as an int (``integer``) or float within [``low``, ``high``] (``low_open``: above ``low``);
    None only when ``optional``. ConfigError naming ``name`` otherwise."""
    if value is None and optional:
        return None
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise ConfigError(f"{name} must be a number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    if integer:
        if value != int(value):
            raise ConfigError(f"{name} must be a whole number, got {value!r}")
        value = int(value)
    else:
        value = float(value)
    if low is not None and (value <= low if low_open else value < low):
        raise ConfigError(f"{name} must be {'>' if low_open else '>='} {_bound(low)}, got {value!r}")
    if high is not None and value > high:
        raise ConfigError(f"{name} must be <= {_bound(high)}, got {value!r}")
    return value


def _bound(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"
