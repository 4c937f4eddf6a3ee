"""The dashboard's moving parts wired together: the index refreshed by a thread, the object
checker, the audit runner, and the key that changes whenever any of them learned something
(pages are cached under it; the live stream announces it)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from prismesh.dashboard.audits import AuditRunner
from prismesh.dashboard.index import ChainIndex
from prismesh.dashboard.objects import ObjectChecker

log = logging.getLogger("prismesh.dashboard")


class Dashboard:
    """Everything a page is built from; ``start()`` runs the background threads."""

    def __init__(
        self,
        index: ChainIndex,
        checker: ObjectChecker,
        audits: AuditRunner,
        *,
        poll_interval: float = 0.5,
        descriptors: Iterable[Mapping[str, Any]] = (),
        title: str = "PrisMesh consortium",
    ) -> None:
        from prismesh.chain.identity import descriptor_hash

        self.index = index
        self.checker = checker
        self.audits = audits
        self.poll_interval = poll_interval
        self.title = title
        self.error: str | None = None
        self._by_hash = {}
        for d in descriptors:
            name = d.get("name") or d.get("institution")
            if name:
                self._by_hash["0x" + descriptor_hash(d).hex()] = str(name)
        self._labels: tuple[int, dict[str, str]] = (-1, {})
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def key(self) -> str:
        """Changes whenever anything a page shows may have changed."""
        return f"{self.index.version}.{self.checker.version}.{self.audits.version}"

    @property
    def labels(self) -> dict[str, str]:
        """Hospital names by address, for those whose descriptor hash matches a given descriptor."""
        version, labels = self._labels
        if version != self.index.version and self._by_hash:
            version = self.index.version
            labels = {
                h.address: self._by_hash[h.descriptor_hash]
                for h in self.index.hospital_list()
                if h.descriptor_hash in self._by_hash
            }
            self._labels = (version, labels)
        return labels

    def refresh(self) -> bool:
        """One refresh of the index; a failure is kept for the page header, not raised."""
        try:
            changed = self.index.refresh()
        except Exception as exc:  # noqa: BLE001 - the chain may be away for a while
            message = f"{type(exc).__name__}: {exc}"
            if message != self.error:
                log.warning("dashboard could not read the chain: %s", message)
            self.error = message
            return False
        if self.error is not None:
            self.error = None
            return True
        return changed

    def start(self) -> None:
        self.checker.start()
        self.audits.start()
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="prismesh-dashboard-index", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.refresh()
            if self.index.caught_up or self.error is not None:
                self._stop.wait(self.poll_interval)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        self.checker.stop()
        self.audits.stop()


def open_dashboard(
    w3: Any,
    manifest: Any,
    store: Any,
    *,
    w3_for_audit: Callable[[], Any] | None = None,
    chain_lock: Any = None,
    finality: bool | None = None,
    poll_interval: float = 0.5,
    descriptors: Iterable[Mapping[str, Any]] = (),
) -> Dashboard:
    """A dashboard over ``manifest``'s deployment reached through ``w3``, and ``store``.

    Audits run through ``w3_for_audit()`` (a connection of their own, so a long audit does not
    hold up the live view) or, without it, through ``w3`` under ``chain_lock``.
    """
    index = ChainIndex(w3, manifest, finality=finality, chain_lock=chain_lock)
    checker = ObjectChecker(store)
    audit_w3: dict[str, Any] = {}

    def run_audit(task_id: int) -> Any:
        from prismesh.aggregator.audit import audit_task

        if w3_for_audit is None:
            with index.chain_lock:
                return audit_task(w3, manifest, store, task_id, check_finality=index.finality)
        if "w3" not in audit_w3:
            audit_w3["w3"] = w3_for_audit()
        return audit_task(audit_w3["w3"], manifest, store, task_id, check_finality=index.finality)

    audits = AuditRunner(run_audit, index.task_last_block)
    return Dashboard(index, checker, audits, poll_interval=poll_interval, descriptors=descriptors)
