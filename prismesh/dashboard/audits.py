"""Audits on demand: ``prismesh audit`` for one task, run in a background thread and cached by
the task's last final block (the result holds until the task has new final events).

One audit runs at a time, so a page asking for many cannot overload the host; each request only
queues. A result records every check by name, so the page names each one that failed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("prismesh.dashboard")


@dataclass(frozen=True)
class Check:
    check: str
    subject: str
    ok: bool
    detail: str


@dataclass
class AuditResult:
    task_id: int
    state: str  # "queued", "running", "done" or "error"
    block: int | None = None  # the task's last final block when the audit started
    ok: bool | None = None
    checks: list[Check] = field(default_factory=list)
    error: str | None = None
    seconds: float | None = None
    finished_at: float | None = None  # wall-clock time.time()

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]


class AuditRunner:
    """``run(task_id)`` returns an ``AuditReport`` (``prismesh.aggregator.audit``); this caches
    and queues its results. ``current_block(task_id)`` is the task's last final block."""

    def __init__(self, run: Callable[[int], Any], current_block: Callable[[int], int | None], *, max_queue: int = 16) -> None:
        self._run_audit = run
        self._current_block = current_block
        self.max_queue = max_queue
        self._results: dict[int, AuditResult] = {}
        self._queue: deque[int] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.version = 0

    def result(self, task_id: int) -> AuditResult | None:
        with self._lock:
            return self._results.get(task_id)

    def is_current(self, result: AuditResult) -> bool:
        """Whether ``result`` still describes the task (no final event of it since)."""
        return result.state == "done" and result.block == self._current_block(result.task_id)

    def request(self, task_id: int) -> str:
        """Queue an audit unless a current result exists or one is pending; says which."""
        with self._lock:
            existing = self._results.get(task_id)
            if existing is not None and existing.state in ("queued", "running"):
                return existing.state
            if existing is not None and existing.state == "done" and existing.block == self._current_block(task_id):
                return "cached"
            if len(self._queue) >= self.max_queue:
                return "busy"
            self._results[task_id] = AuditResult(task_id, "queued", previous_block(existing))
            self._queue.append(task_id)
            self.version += 1
        self._wake.set()
        return "queued"

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="prismesh-dashboard-audit", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(1.0)
            self._wake.clear()
            while not self._stop.is_set() and self.run_next():
                pass

    def run_next(self) -> bool:
        """Run the oldest queued audit; False when none is queued."""
        with self._lock:
            if not self._queue:
                return False
            task_id = self._queue.popleft()
            block = self._current_block(task_id)
            self._results[task_id] = AuditResult(task_id, "running", block)
            self.version += 1
        started = time.perf_counter()
        try:
            report = self._run_audit(task_id)
            checks = [Check(f.check, f.subject, bool(f.ok), f.detail) for f in report.findings]
            result = AuditResult(task_id, "done", block, bool(report.ok), checks)
        except Exception as exc:  # noqa: BLE001 - shown on the page; the dashboard keeps serving
            log.warning("audit of task %d could not run: %s", task_id, exc)
            result = AuditResult(task_id, "error", block, None, error=f"{type(exc).__name__}: {exc}")
        result.seconds = time.perf_counter() - started
        result.finished_at = time.time()
        with self._lock:
            self._results[task_id] = result
            self.version += 1
        return True


def previous_block(result: AuditResult | None) -> int | None:
    return result.block if result is not None else None
