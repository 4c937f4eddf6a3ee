"""Stored objects as the dashboard shows them: verified (every block re-hashed against its CID,
with its size) or unverifiable (missing, corrupt, not a CID), checked off the request path.

A page asks for the status of the CIDs it shows; an unknown CID is queued and shown as being
checked, and a worker thread walks its DAG through the store (which verifies every block it
reads). Results are cached: a verified object is re-checked after ``recheck_s`` (a store can
lose a block later), an unverifiable one after ``retry_s`` (it may be restored).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("prismesh.dashboard")


@dataclass(frozen=True)
class ObjectStatus:
    state: str  # "verified", "unverifiable", "checking" or "none" (no object named)
    size: int | None = None  # bytes of the whole DAG, when verified
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.state == "verified"


@dataclass(frozen=True)
class SpecInfo:
    """What the pages show of a task spec (the hyper-parameter file named by the task)."""

    strategy: str
    base_model_id: str
    lora: str
    report_metrics: bool


NONE = ObjectStatus("none")
CHECKING = ObjectStatus("checking")


class ObjectChecker:
    """Verifies CIDs in a background thread; ``status`` never touches the store itself."""

    def __init__(self, store: Any, *, recheck_s: float = 600.0, retry_s: float = 15.0, max_entries: int = 100_000) -> None:
        self.store = store
        self.recheck_s = recheck_s
        self.retry_s = retry_s
        self.max_entries = max_entries
        self._results: OrderedDict[str, tuple[ObjectStatus, float]] = OrderedDict()
        self._specs: dict[str, SpecInfo | None] = {}
        self._queue: deque[tuple[str, str]] = deque()
        self._queued: set[tuple[str, str]] = set()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.version = 0

    # ------------------------------------------------------------------ queries

    def status(self, cid: str | None) -> ObjectStatus:
        """The cached status of ``cid``; queues a check when there is none or it is stale."""
        if not cid:
            return NONE
        with self._lock:
            cached = self._results.get(cid)
            now = time.monotonic()
            if cached is not None:
                result, at = cached
                age = now - at
                if age < (self.recheck_s if result.ok else self.retry_s):
                    return result
                self._enqueue(("object", cid))
                return result
            self._enqueue(("object", cid))
            return CHECKING

    def spec(self, cid: str | None) -> tuple[SpecInfo | None, ObjectStatus]:
        """The task spec at ``cid`` (None until read, or when unreadable) and its status."""
        if not cid:
            return None, NONE
        with self._lock:
            key = f"spec:{cid}"
            cached = self._results.get(key)
            if cached is None or (not cached[0].ok and time.monotonic() - cached[1] >= self.retry_s):
                self._enqueue(("spec", cid))
            if cached is None:
                return None, CHECKING
            return self._specs.get(cid), cached[0]

    def _enqueue(self, item: tuple[str, str]) -> None:
        if item in self._queued or len(self._queue) >= 10_000:
            return
        self._queued.add(item)
        self._queue.append(item)
        self._wake.set()

    # ------------------------------------------------------------------ worker

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="prismesh-dashboard-objects", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(1.0)
            self._wake.clear()
            self.drain()

    def drain(self, limit: int | None = None) -> int:
        """Check queued objects (all, or ``limit``); returns how many were checked."""
        done = 0
        while not self._stop.is_set() and (limit is None or done < limit):
            with self._lock:
                if not self._queue:
                    break
                item = self._queue.popleft()
            kind, cid = item
            if kind == "spec":
                result, spec = self._read_spec(cid)
            else:
                result, spec = self._verify(cid), None
            with self._lock:
                self._queued.discard(item)
                key = f"spec:{cid}" if kind == "spec" else cid
                previous = self._results.get(key)
                self._results[key] = (result, time.monotonic())
                self._results.move_to_end(key)
                if kind == "spec":
                    self._specs[cid] = spec
                while len(self._results) > self.max_entries:
                    old, _ = self._results.popitem(last=False)
                    self._specs.pop(old.removeprefix("spec:"), None)
                changed = previous is None or previous[0] != result
                if changed:
                    self.version += 1
            done += 1
        return done

    def _verify(self, cid: str) -> ObjectStatus:
        try:
            size = sum(n for _, n in self.store.walk(cid))
        except Exception as exc:  # noqa: BLE001 - every failure makes the object unverifiable
            return ObjectStatus("unverifiable", None, _reason(exc))
        return ObjectStatus("verified", size)

    def _read_spec(self, cid: str) -> tuple[ObjectStatus, SpecInfo | None]:
        from prismesh.chain.taskspec import TaskSpec

        try:
            raw = self.store.cat(cid)
            spec = TaskSpec.from_bytes(raw, where=f"task spec {cid}")
        except Exception as exc:  # noqa: BLE001 - shown as an unverifiable spec
            return ObjectStatus("unverifiable", None, _reason(exc)), None
        lora = spec.lora
        info = SpecInfo(
            strategy=str(spec.strategy),
            base_model_id=str(spec.base_model_id),
            lora=f"r={lora.r}, alpha={lora.lora_alpha}, {', '.join(lora.target_modules)}",
            report_metrics=bool(spec.report_metrics),
        )
        return ObjectStatus("verified", len(raw)), info


def _reason(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."
