"""Typed coordinator events from the finality-aware stream: what the daemons consume.

``prismesh.chain.finality.events.FinalEventStream`` delivers raw decoded events once their block is final; this
wraps it so each event arrives as the typed dataclass of ``prismesh.chain.evm.contracts`` (``RoundOpened``,
``UpdateRevealed`` …), keeping acknowledgement (and so restart safety) with the raw stream.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from prismesh.chain.evm.contracts import EVENT_CLASSES, Coordinator, Event, _decode_event
from prismesh.chain.finality.events import FinalEvent, FinalEventStream


class CoordinatorStream:
    """Final ``Coordinator`` events as typed dataclasses, with the raw stream's cursor."""

    def __init__(self, raw: FinalEventStream, reopen: Callable[[], FinalEventStream] | None = None) -> None:
        self.raw = raw
        self._reopen = reopen
        self._pending: dict[tuple[int, int], FinalEvent] = {}

    def rewind(self) -> None:
        """Forget what was delivered but not acknowledged, so the next ``poll`` delivers it again.

        A daemon whose step failed half-way (an RPC error, a store that did not answer) calls
        this before retrying: the raw stream is reopened from its durable cursor, which only
        ever moves past events that were fully handled."""
        if self._reopen is None:
            raise RuntimeError("this stream was not opened with a way to reopen it")
        self.raw = self._reopen()
        self._pending.clear()

    def poll(self) -> list[Event]:
        out = []
        for ev in self.raw.poll():
            cls = EVENT_CLASSES[ev.name]
            log = {
                "args": ev.args,
                "event": ev.name,
                "address": ev.address,
                "blockNumber": ev.block_number,
                "transactionHash": ev.transaction_hash,
                "logIndex": ev.log_index,
            }
            typed = _decode_event(cls, log)
            self._pending[(ev.block_number, ev.log_index)] = ev
            out.append(typed)
        return out

    def ack(self, event: Event, durable: bool = True) -> None:
        """Mark ``event`` handled (see :meth:`FinalEventStream.ack`; ``durable=False`` defers
        the cursor's write to the next durable ack or :meth:`flush`)."""
        raw = self._pending.pop((event.block_number, event.log_index))
        self.raw.ack(raw, durable=durable)

    def flush(self) -> None:
        self.raw.flush()

    def final_height(self) -> int:
        return self.raw.final_height()

    @property
    def scanned_height(self) -> int:
        """Every event up to this height has been delivered: what a readiness check may rely on
        (a fresh ``final_height()`` can be newer than the events the daemon has seen)."""
        return self.raw.scanned_height

    @property
    def cursor(self) -> tuple[int, int]:
        return self.raw.cursor

    @property
    def behind(self) -> bool:
        """The chain's final height is below this cursor (a devnet restarted from its durable
        state, waiting for the committee to certify the same blocks again)."""
        return self.raw.behind

    def resync(self, height: int) -> None:
        """Continue from block ``height``, forgetting everything delivered after it."""
        self.raw.resync(height)
        self._pending.clear()


def open_final_stream(
    w3: Any,
    manifest: Any,
    names: Sequence[str],
    cursor_path: Path | None,
    *,
    finality: bool = True,
    recover_damaged: bool = False,
) -> CoordinatorStream:
    """The coordinator's ``names`` events, final per the manifest's gadget (unless ``finality``
    is off), resuming from ``cursor_path`` (an unreadable one set aside with
    ``recover_damaged``; ``stream.raw.damaged`` then says where it went)."""
    from prismesh.chain.finality.gadget import FinalityGadgetClient

    coordinator = Coordinator.read_only(manifest, w3)
    final_height = None
    if finality:
        if not manifest.finality_gadget:
            raise ValueError("the deployment has no finality gadget; run with finality off or redeploy with validators")
        final_height = FinalityGadgetClient(w3, manifest.finality_gadget).finalized_height

    def reopen() -> FinalEventStream:
        return FinalEventStream(
            w3,
            coordinator.contract,
            list(names),
            final_height,
            cursor_path,
            finality,
            from_block=manifest.deploy_block,
            recover_damaged=recover_damaged,
        )

    return CoordinatorStream(reopen(), reopen)
