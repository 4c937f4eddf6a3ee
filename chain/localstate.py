"""Small local-state helpers shared by the daemons: config files and crash-safe state files."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A daemon configuration file that cannot be used; the message names the file and field."""


def read_config(path: Path) -> dict[str, Any]:
    """A TOML (or ``.json``) configuration file as a dict, with errors naming the file."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    raw = path.read_bytes()
    try:
        if path.suffix == ".json":
            data = json.loads(raw)
        else:
            import tomllib

            data = tomllib.loads(raw.decode())
    except Exception as exc:  # noqa: BLE001 - any parse failure is a config error
        raise ConfigError(f"{path}: cannot parse ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a table/object at the top level")
    return data


def check_fields(data: dict[str, Any], known: set[str], required: tuple[str, ...], where: str) -> None:
    """Reject unknown and missing fields up front, naming them."""
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown}; known: {sorted(known)}")
    for key in required:
        if data.get(key) in (None, ""):
            raise ConfigError(f"{where}: field {key!r} is required")


def resolve_path(value: Any, base: Path) -> Path:
    p = Path(os.path.expanduser(str(value)))
    return p if p.is_absolute() else (base / p).resolve()


def resolve_account_spec(spec: str, base: Path) -> str:
    """Keystore paths are relative to the config file; ``dev:N`` and raw keys pass through."""
    if spec.startswith(("dev:", "0x")) or Path(spec).is_absolute():
        return spec
    return str((base / spec).resolve())


class StateFile:
    """A JSON document replaced atomically on every save (temp file, fsync, rename), so a crash
    leaves either the previous or the new state, never half of one."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.data: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}

    def save(self) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".state-")
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(self.data, fh, indent=1, sort_keys=True)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def section(self, name: str) -> dict[str, Any]:
        return self.data.setdefault(name, {})


class RetryDelay:
    """Exponential back-off for a daemon's failed steps: a flaky RPC endpoint or store is
    retried quickly at first, a long outage at most once a minute."""

    def __init__(self, first: float, ceiling: float = 60.0) -> None:
        self.first = max(first, 0.5)
        self.ceiling = ceiling
        self.current = 0.0

    def next(self) -> float:
        self.current = self.first if self.current == 0.0 else min(self.current * 2, self.ceiling)
        return self.current

    def reset(self) -> None:
        self.current = 0.0
