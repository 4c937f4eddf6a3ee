"""Finality-aware contract event stream with a persisted cursor (what node and aggregator consume).

:class:`FinalEventStream` yields a contract's events only once their block is at or below the
final height (the FinalityGadget's, or any ``final_height()`` callable), in ``(block, log index)``
order, each once. The cursor is the position of the last *acknowledged* event; it is written
atomically (temp file, fsync, rename) so that after a crash or restart a new stream resumes right
after it: an event acknowledged is never delivered again, an event not yet acknowledged is
delivered again (acknowledge after acting on it). With ``auto_ack=True`` events count as handled
once returned. ``finality=False`` treats the latest block as final (fast unit tests of other
parts, where no committee runs).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eth_utils import event_abi_to_log_topic, to_checksum_address
from web3._utils.events import get_event_data

WHOLE_BLOCK = 2**31  # a cursor log index meaning "every log of this block is handled"
CURSOR_FORMAT = 1


@dataclass(frozen=True)
class FinalEvent:
    """One decoded event from a final block."""

    name: str
    args: Mapping[str, Any]
    block_number: int
    log_index: int
    transaction_hash: bytes
    block_hash: bytes
    address: str

    @property
    def position(self) -> tuple[int, int]:
        return (self.block_number, self.log_index)


class CursorError(ValueError):
    """The cursor file is unreadable or belongs to another contract or set of events."""


class FinalEventStream:
    """Events of ``contract`` named ``event_names``, delivered once their block is final.

    ``contract`` is a web3 contract object, or an ``(address, abi)`` pair. ``final_height`` is a
    callable, or an object with ``finalized_height()`` (the gadget client); it is ignored when
    ``finality`` is False. ``cursor_path`` (optional) persists the position across restarts.
    ``from_block`` is where a fresh cursor starts (e.g. the deployment block).
    """

    def __init__(
        self,
        w3: Any,
        contract: Any,
        event_names: Sequence[str],
        final_height: Callable[[], int] | Any | None = None,
        cursor_path: Path | str | None = None,
        finality: bool = True,
        *,
        from_block: int = 0,
        auto_ack: bool = False,
        batch_blocks: int = 2000,
    ) -> None:
        self.w3 = w3
        if isinstance(contract, tuple):
            address, abi = contract
        else:
            address, abi = contract.address, contract.abi
        self.address = to_checksum_address(address)
        if not event_names:
            raise ValueError("event_names is empty: name at least one event to follow")
        events = {item["name"]: item for item in abi if item.get("type") == "event"}
        unknown = [n for n in event_names if n not in events]
        if unknown:
            raise ValueError(
                f"events {unknown} are not in the ABI of {self.address} (it has {sorted(events)})"
            )
        self.event_names = tuple(event_names)
        self._by_topic = {event_abi_to_log_topic(events[n]): events[n] for n in self.event_names}
        if finality and final_height is None:
            raise ValueError("finality=True needs final_height (the gadget or a callable)")
        if final_height is not None and not callable(final_height):
            final_height = final_height.finalized_height
        self._final_height = final_height
        self.finality = finality
        self.auto_ack = auto_ack
        self.batch_blocks = batch_blocks
        self.cursor_path = Path(cursor_path) if cursor_path is not None else None
        self._acked: tuple[int, int] = (from_block - 1, WHOLE_BLOCK)
        if self.cursor_path is not None and self.cursor_path.exists():
            self._acked = self._load_cursor()
        self._saved = self._acked
        self._delivered: tuple[int, int] = self._acked
        self._scanned = self._acked[0] if self._acked[1] == WHOLE_BLOCK else self._acked[0] - 1
        self._outstanding: list[FinalEvent] = []

    # ----------------------------------------------------------------- cursor

    def _identity(self) -> dict[str, Any]:
        return {"address": self.address, "events": sorted(self.event_names)}

    def _load_cursor(self) -> tuple[int, int]:
        assert self.cursor_path is not None
        try:
            data = json.loads(self.cursor_path.read_text())
            position = (int(data["block"]), int(data["log_index"]))
            identity = {"address": data["address"], "events": data["events"]}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CursorError(f"unreadable event cursor {self.cursor_path}: {exc}") from exc
        if identity != self._identity():
            raise CursorError(
                f"event cursor {self.cursor_path} belongs to {identity}, not {self._identity()}"
            )
        return position

    def _save_cursor(self) -> None:
        if self.cursor_path is None:
            return
        data = {
            "format": CURSOR_FORMAT,
            **self._identity(),
            "block": self._acked[0],
            "log_index": self._acked[1],
        }
        self.cursor_path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.cursor_path.parent, prefix=f".{self.cursor_path.name}.")
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(data, fh, sort_keys=True)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.cursor_path)
            self._saved = self._acked
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @property
    def cursor(self) -> tuple[int, int]:
        """``(block, log index)`` of the last acknowledged position."""
        return self._acked

    # ----------------------------------------------------------------- reading

    def final_height(self) -> int:
        """The height up to which events are delivered now."""
        if not self.finality:
            return int(self.w3.eth.block_number)
        assert self._final_height is not None
        return int(self._final_height())

    def _decode(self, log: Any) -> FinalEvent | None:
        topics = log["topics"]
        if not topics:
            return None
        abi = self._by_topic.get(bytes(topics[0]))
        if abi is None:
            return None
        data = get_event_data(self.w3.codec, abi, log)
        return FinalEvent(
            name=data["event"],
            args=dict(data["args"]),
            block_number=int(log["blockNumber"]),
            log_index=int(log["logIndex"]),
            transaction_hash=bytes(log["transactionHash"]),
            block_hash=bytes(log["blockHash"]),
            address=self.address,
        )

    def poll(self) -> list[FinalEvent]:
        """New final events after everything delivered so far, in ``(block, log index)`` order."""
        final = self.final_height()
        found: list[FinalEvent] = []
        start = self._scanned + 1
        while start <= final:
            end = min(final, start + self.batch_blocks - 1)
            logs = self.w3.eth.get_logs(
                {
                    "address": self.address,
                    "fromBlock": start,
                    "toBlock": end,
                    "topics": [list(self._by_topic)],
                }
            )
            for log in logs:
                event = self._decode(log)
                if event is not None and event.position > self._delivered:
                    found.append(event)
            start = end + 1
        self._scanned = max(self._scanned, final)
        found.sort(key=lambda e: e.position)
        if found:
            self._delivered = found[-1].position
            self._outstanding.extend(found)
        if self.auto_ack:
            for event in found:
                self._acked = event.position
            self._outstanding.clear()
        if not self._outstanding and final > self._acked[0]:
            # Everything up to the final height is handled: remember that, so a restart does
            # not rescan from the last event.
            self._acked = (final, WHOLE_BLOCK)
        self._save_cursor_if_moved()
        return found

    def ack(self, event: FinalEvent) -> None:
        """Mark ``event`` (and every event delivered before it) handled, durably."""
        if event.position > self._delivered:
            raise ValueError(f"event at {event.position} was never delivered by this stream")
        if event.position <= self._acked:
            return
        self._acked = event.position
        self._outstanding = [e for e in self._outstanding if e.position > event.position]
        if not self._outstanding and self._scanned > self._acked[0]:
            self._acked = (self._scanned, WHOLE_BLOCK)
        self._save_cursor()

    def _save_cursor_if_moved(self) -> None:
        if self._saved != self._acked:
            self._save_cursor()
