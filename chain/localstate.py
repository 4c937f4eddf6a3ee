"""Daemon plumbing shared by the node, the aggregator and the committee: config files checked
field by field, crash-safe state files that survive their own damage, a lock that keeps two
daemons off one state directory, and retry with back-off that logs one line per attempt."""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import threading
import time
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

DEBUG_ENV = "PRISMESH_DEBUG"


class ConfigError(ValueError):
    """A daemon configuration file that cannot be used; the message names the file and field."""


class StateDirLocked(RuntimeError):
    """Another daemon holds this state directory (two daemons would act twice for one key)."""


class Stopped(Exception):
    """The daemon was asked to stop while it was waiting."""


def debug_enabled() -> bool:
    """Whether tracebacks are wanted (``--debug`` sets ``PRISMESH_DEBUG=1`` for the daemons)."""
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


# ----------------------------------------------------------------------------- config files


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


_KIND_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
               Path: "a path (string)", dict: "a table"}


def check_types(data: dict[str, Any], cls: type, where: str, *, positive: tuple[str, ...] = ()) -> None:
    """Check every value of ``data`` against the annotation of the dataclass field it sets.

    ``poll_interval = "fast"`` is refused here, naming the file, the field and what it takes,
    rather than failing later inside the daemon's loop. Fields in ``positive`` must be > 0."""
    hints = typing.get_type_hints(cls)
    for key, value in data.items():
        hint = hints.get(key)
        if hint is None:
            continue
        union = typing.get_origin(hint) in (typing.Union, types.UnionType)
        args = typing.get_args(hint) if union else (hint,)
        optional = type(None) in args
        kinds = [a for a in args if a is not type(None)] or [hint]
        kind = typing.get_origin(kinds[0]) or kinds[0]
        if value is None and optional:
            continue
        ok = {
            bool: isinstance(value, bool),
            int: isinstance(value, int) and not isinstance(value, bool),
            float: isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value),
            str: isinstance(value, str),
            Path: isinstance(value, str) and bool(value),
            dict: isinstance(value, dict),
        }.get(kind, True)
        if not ok:
            raise ConfigError(
                f"{where}: field {key!r} must be {_KIND_WORDS.get(kind, kind.__name__)}, got {value!r}"
            )
        if key in positive and value <= 0:
            raise ConfigError(f"{where}: field {key!r} must be greater than 0, got {value!r}")


def resolve_path(value: Any, base: Path) -> Path:
    p = Path(os.path.expanduser(str(value)))
    return p if p.is_absolute() else (base / p).resolve()


def resolve_account_spec(spec: str, base: Path, where: str = "config") -> str:
    """Keystore paths are relative to the config file; ``dev:N`` and raw keys pass through.

    A keystore that does not exist is named here, at start-up, not as an unknown account spec."""
    if spec.startswith(("dev:", "0x")):
        return spec
    path = Path(spec) if Path(spec).is_absolute() else (base / spec).resolve()
    if not path.is_file():
        raise ConfigError(f"{where}: keystore file {path} does not exist (field 'keystore')")
    return str(path)


# ----------------------------------------------------------------------------- state files


class StateFile:
    """A JSON document replaced atomically on every save (temp file, fsync, rename), so a crash
    leaves either the previous or the new state, never half of one.

    A file damaged anyway (a disk fault, a hand edit, a copy cut short) is moved aside to
    ``<name>.damaged-<time>`` and the state starts empty; ``damaged`` then says where it went
    and why, so the daemon can log it and rebuild from the chain and the store."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.damaged: tuple[Path, str] | None = None
        self.data: dict[str, Any] = {}
        self._on_disk: bytes | None = None
        if path.exists():
            try:
                raw = path.read_bytes()
                data = json.loads(raw)
                if not isinstance(data, dict):
                    raise ValueError(f"expected a JSON object, found {type(data).__name__}")
                self.data, self._on_disk = data, raw
            except (ValueError, UnicodeDecodeError) as exc:
                self.damaged = (set_aside(path), str(exc).splitlines()[0][:200])

    def save(self) -> None:
        """Write the state durably; a state equal to the one on disk is not written again (a
        save is a commit point, so callers save after every change, often of nothing new)."""
        data = _json_bytes(self.data, indent=1)
        if data == self._on_disk and self.path.exists():
            return
        atomic_write_bytes(self.path, data)
        self._on_disk = data

    def section(self, name: str) -> dict[str, Any]:
        return self.data.setdefault(name, {})


def set_aside(path: Path) -> Path:
    """Rename a damaged file out of the way (never deleting it) and return its new name."""
    stamp = time.strftime("%Y%m%dT%H%M%S")
    aside = path.with_name(f"{path.name}.damaged-{stamp}")
    n = 1
    while aside.exists():
        n += 1
        aside = path.with_name(f"{path.name}.damaged-{stamp}-{n}")
    os.replace(path, aside)
    return aside


def _json_bytes(data: Any, **dump_kwargs: Any) -> bytes:
    return json.dumps(data, sort_keys=True, **dump_kwargs).encode()


def atomic_write_json(path: Path, data: Any, **dump_kwargs: Any) -> None:
    """Write JSON through a synced temp file renamed over ``path``."""
    atomic_write_bytes(path, _json_bytes(data, **dump_kwargs))


def atomic_write_bytes(path: Path, data: bytes, mode: int | None = None) -> None:
    """Write ``data`` to a synced temp file, rename it over ``path`` and sync the directory, so
    after a crash ``path`` holds either its old or its new bytes, and the rename is on disk.
    ``mode`` (e.g. ``0o600`` for a key file) is set before the file takes its name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:
        dfd = os.open(path.parent, os.O_RDONLY)
    except OSError:  # pragma: no cover - a platform without directory handles
        return
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


class StateDirLock:
    """An exclusive lock on a daemon's state directory, held for the process's life.

    Two daemons on one state directory (one key) would train, commit or aggregate twice; the
    second is refused with the first one's pid. The kernel drops the lock when the holder
    dies, even by SIGKILL, so a crash never leaves a stale lock behind."""

    def __init__(self, state_dir: Path, role: str) -> None:
        self.path = Path(state_dir) / f"{role}.lock"
        self.role = role
        self._fd: int | None = None

    def acquire(self) -> StateDirLock:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise StateDirLocked(
                f"another {self.role} daemon (pid {holder}) already runs on {self.path.parent}; "
                "two daemons with one key would act twice, so this one stops (stop the other first)"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


# ----------------------------------------------------------------------------- retries


class RetryDelay:
    """Exponential back-off for a daemon's failed steps: a flaky RPC endpoint or store is
    retried quickly at first, a long outage at most once a minute."""

    def __init__(self, first: float, ceiling: float = 60.0) -> None:
        self.first = max(first, 0.5)
        self.ceiling = ceiling
        self.current = 0.0
        self.attempts = 0

    def next(self) -> float:
        self.current = self.first if self.current == 0.0 else min(self.current * 2, self.ceiling)
        self.attempts += 1
        return self.current

    def reset(self) -> None:
        self.current = 0.0
        self.attempts = 0


def network_message(exc: BaseException) -> str | None:
    """One line for an unreachable RPC endpoint or store (requests' and web3's exceptions)."""
    import requests

    if isinstance(exc, requests.exceptions.ConnectionError):
        url = getattr(getattr(exc, "request", None), "url", None) or "the endpoint"
        return f"cannot reach {url}: connection refused or host down; is the devnet (or Kubo) running?"
    if isinstance(exc, requests.exceptions.Timeout):
        url = getattr(getattr(exc, "request", None), "url", None) or "the endpoint"
        return f"{url} did not answer in time; check the URL and the network"
    try:
        from web3.exceptions import ProviderConnectionError
    except ImportError:  # pragma: no cover
        return None
    if isinstance(exc, ProviderConnectionError):
        return f"cannot reach the chain: {exc}"
    if isinstance(exc, ConnectionError):
        return f"connection failed: {exc}"
    return None


def describe_error(exc: BaseException) -> str:
    """A failure in one line: what a retry log line says (the traceback only with --debug)."""
    message = network_message(exc)
    if message is not None:
        return message
    text = " ".join(str(exc).split()) or "(no message)"
    if len(text) > 300:
        text = text[:297] + "..."
    return f"{type(exc).__name__}: {text}"


def retry_until(
    what: str,
    attempt: Callable[[], T],
    *,
    log: logging.Logger,
    stop: threading.Event,
    first: float = 1.0,
    ceiling: float = 30.0,
    fatal: tuple[type[BaseException], ...] = (),
) -> T:
    """Call ``attempt`` until it succeeds, waiting with back-off between failures.

    Each failure logs one line (``what``, the reason, the next delay); the traceback only with
    ``PRISMESH_DEBUG``. Exceptions in ``fatal`` (a wrong config, a wrong chain) are raised at
    once: waiting would not fix them. Raises :class:`Stopped` when ``stop`` is set meanwhile."""
    delay = RetryDelay(first, ceiling)
    while True:
        try:
            return attempt()
        except fatal:
            raise
        except Exception as exc:  # noqa: BLE001 - whatever failed is retried after a pause
            wait = delay.next()
            log.warning("%s failed (attempt %d): %s; retrying in %.1f s",
                        what, delay.attempts, describe_error(exc), wait, exc_info=debug_enabled())
        if stop.wait(wait):
            raise Stopped(what)


class ChainMismatch(ConfigError):
    """The RPC endpoint serves another chain than the deployment manifest's."""
