"""Finality-aware contract event stream with a persisted cursor (what node and aggregator consume).

:class:`FinalEventStream` yields a contract's events only once their block is at or below the
final height (the FinalityGadget's, or any ``final_height()`` callable), in ``(block, log index)``
order, each once. The cursor is the position of the last *acknowledged* event; it is written
atomically (temp file, fsync, rename) so that after a crash or restart a new stream resumes right
after it: an event acknowledged is never delivered again, an event not yet acknowledged is
delivered again (acknowledge after acting on it). An acknowledgement may be deferred
(``ack(event, durable=False)``) and written with the next durable one, :meth:`flush` or
``poll``: a consumer that handles a batch of events idempotently writes its cursor once for the
batch, and a crash in between delivers the batch's handled events again. With ``auto_ack=True``
events count as handled once returned. ``finality=False`` treats the latest block as final
(fast unit tests of other parts, where no committee runs).

The cursor also records the hash of its block and a few earlier checkpoints. Before scanning
further, the stream checks that block is still on the chain with the same hash: a chain that
lost blocks (a devnet restarted from an old state) or was replaced (redeployed at the same
addresses) raises :class:`ChainDiverged`, naming the last checkpoint still on the chain, from
which the daemon resynchronises (:meth:`FinalEventStream.resync`) instead of acting on events
of another history.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eth_utils import event_abi_to_log_topic, to_checksum_address
from web3._utils.events import get_event_data

from prismesh.chain.localstate import atomic_write_json, set_aside

WHOLE_BLOCK = 2**31  # a cursor log index meaning "every log of this block is handled"
CURSOR_FORMAT = 2
MAX_CHECKPOINTS = 32
VERIFY_EVERY_S = 2.0
# Deferred acknowledgements written anyway once this many are pending, so a daemon catching up
# on a long history never has more than this many events to handle again after a crash.
MAX_DEFERRED_ACKS = 64


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


class ChainDiverged(CursorError):
    """The chain no longer holds the block the cursor was taken at (or holds another one there).

    ``safe_height`` is the highest block this stream handled that the chain still holds with
    the same hash (its deployment block minus one when none is left): resynchronise from it."""

    def __init__(self, message: str, cursor_block: int, safe_height: int) -> None:
        super().__init__(message)
        self.cursor_block = cursor_block
        self.safe_height = safe_height


class FinalEventStream:
    """Events of ``contract`` named ``event_names``, delivered once their block is final.

    ``contract`` is a web3 contract object, or an ``(address, abi)`` pair. ``final_height`` is a
    callable, or an object with ``finalized_height()`` (the gadget client); it is ignored when
    ``finality`` is False. ``cursor_path`` (optional) persists the position across restarts.
    ``from_block`` is where a fresh cursor starts (e.g. the deployment block). With
    ``recover_damaged`` an unreadable cursor file is moved aside (``damaged`` says where) and
    the stream starts again from ``from_block``, so the daemon can rebuild what it handled.
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
        recover_damaged: bool = False,
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
        self.from_block = from_block
        self._acked: tuple[int, int] = (from_block - 1, WHOLE_BLOCK)
        self._anchor: tuple[int, bytes] | None = None
        self._checkpoints: list[tuple[int, bytes]] = []
        self._hashes: dict[int, bytes] = {}
        self.damaged: tuple[Path, str] | None = None
        if self.cursor_path is not None and self.cursor_path.exists():
            try:
                self._acked = self._load_cursor()
            except CursorError as exc:
                if not recover_damaged or "belongs to" in str(exc):
                    raise
                self.damaged = (set_aside(self.cursor_path), str(exc))
        self._saved = self._acked
        self._deferred = 0
        self._verified_at: int | None = None
        self._verified_time = 0.0
        self.behind = False
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
            if data.get("block_hash"):
                self._anchor = (position[0], bytes.fromhex(data["block_hash"]))
            self._checkpoints = [(int(h), bytes.fromhex(x)) for h, x in data.get("checkpoints", [])]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CursorError(f"unreadable event cursor {self.cursor_path}: {exc}") from exc
        if identity != self._identity():
            raise CursorError(
                f"event cursor {self.cursor_path} belongs to {identity}, not {self._identity()}"
            )
        return position

    def _save_cursor(self) -> None:
        if self.cursor_path is None:
            return
        self._move_anchor()
        data = {
            "format": CURSOR_FORMAT,
            **self._identity(),
            "block": self._acked[0],
            "log_index": self._acked[1],
            "block_hash": self._anchor[1].hex() if self._anchor else None,
            "checkpoints": [[h, x.hex()] for h, x in self._checkpoints],
        }
        atomic_write_json(self.cursor_path, data)
        self._saved = self._acked
        self._deferred = 0

    def _move_anchor(self) -> None:
        """Anchor the cursor to its block's hash; the previous anchor becomes a checkpoint."""
        block = self._acked[0]
        if block < 0 or (self._anchor is not None and self._anchor[0] == block):
            return
        block_hash = self._block_hash(block)
        if block_hash is None:
            return
        if self._anchor is not None and self._anchor[0] < block:
            self._checkpoints.append(self._anchor)
            if len(self._checkpoints) > MAX_CHECKPOINTS:
                # Keep the recent half whole and every other older one: the kept heights
                # thin out with age, so an old fork point is still found after a long run.
                half = MAX_CHECKPOINTS // 2
                self._checkpoints = self._checkpoints[:-half][::2] + self._checkpoints[-half:]
        self._anchor = (block, block_hash)

    def _block_hash(self, height: int, fresh: bool = False) -> bytes | None:
        """The chain's hash of block ``height``; ``fresh`` asks the chain, never the cache of
        hashes seen on recently delivered events."""
        cached = None if fresh else self._hashes.get(height)
        if cached is not None:
            return cached
        try:
            block = self.w3.eth.get_block(height)
        except Exception:  # noqa: BLE001 - no such block on this chain (yet)
            return None
        if block is None:
            return None
        return bytes(block["hash"])

    # ----------------------------------------------------------------- history checks

    def verify_history(self) -> None:
        """Raise :class:`ChainDiverged` unless the chain still holds the cursor's block, with
        the hash it had when its events were handled."""
        if self._anchor is None:
            return
        block, expected = self._anchor
        head = int(self.w3.eth.block_number)
        if block > head:
            reason = (f"the chain's head is block {head}, below block {block} this daemon "
                      "already handled: blocks were lost (a devnet restarted from an old state?)")
        else:
            found = self._block_hash(block, fresh=True)
            if found == expected:
                return
            reason = (f"block {block} has hash 0x{(found or b'').hex()} on the chain but had "
                      f"0x{expected.hex()} when this daemon handled it: the chain was replaced")
        safe = self._last_verifiable(head)
        raise ChainDiverged(
            f"{reason}; refusing to act on this history; the last block it can verify is {safe}",
            block,
            safe,
        )

    def _last_verifiable(self, head: int) -> int:
        for height, block_hash in sorted(self._checkpoints, reverse=True):
            if height <= head and self._block_hash(height, fresh=True) == block_hash:
                return height
        return self.from_block - 1

    def resync(self, height: int) -> None:
        """Continue from block ``height`` (every later event is delivered again once final)."""
        self._acked = (height, WHOLE_BLOCK)
        self._delivered = self._acked
        self._scanned = height
        self._outstanding.clear()
        self._hashes.clear()
        self._checkpoints = [c for c in self._checkpoints if c[0] < height]
        self._anchor = None
        self._verified_at = None
        self._save_cursor()

    @property
    def cursor(self) -> tuple[int, int]:
        """``(block, log index)`` of the last acknowledged position."""
        return self._acked

    @property
    def scanned_height(self) -> int:
        """The height up to which every matching event has been delivered."""
        return self._scanned

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
        """New final events after everything delivered so far, in ``(block, log index)`` order.

        Raises :class:`ChainDiverged` when the chain lost or replaced the cursor's block."""
        final = self.final_height()
        now = time.monotonic()
        if final != self._verified_at or now - self._verified_time >= VERIFY_EVERY_S:
            # Whenever the final height moves (up, or down after a devnet restart), and every
            # few seconds anyway, check the handled history is still the chain's before
            # reading anything newer.
            self.verify_history()
            self._verified_at = final
            self._verified_time = now
            self.behind = final < self._acked[0]
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
                    self._hashes[event.block_number] = event.block_hash
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
        if len(self._hashes) > 256:
            keep = self._anchor[0] if self._anchor else -1
            self._hashes = {h: x for h, x in self._hashes.items() if h >= keep}
        return found

    def ack(self, event: FinalEvent, durable: bool = True) -> None:
        """Mark ``event`` (and every event delivered before it) handled; on disk now unless
        ``durable`` is False, then with the next durable ack, :meth:`flush` or ``poll`` (or once
        ``MAX_DEFERRED_ACKS`` are pending)."""
        if event.position > self._delivered:
            raise ValueError(f"event at {event.position} was never delivered by this stream")
        if event.position > self._acked:
            self._acked = event.position
            self._outstanding = [e for e in self._outstanding if e.position > event.position]
            if not self._outstanding and self._scanned > self._acked[0]:
                self._acked = (self._scanned, WHOLE_BLOCK)
        self._deferred += 1
        if durable or self._deferred >= MAX_DEFERRED_ACKS:
            self._save_cursor_if_moved()

    def flush(self) -> None:
        """Write the deferred acknowledgements (a no-op when none is pending)."""
        self._save_cursor_if_moved()

    def _save_cursor_if_moved(self) -> None:
        if self._saved != self._acked:
            self._save_cursor()
