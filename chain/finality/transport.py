"""The message layer validators talk through, and its seeded simulated network.

Replicas (:mod:`prismesh.chain.finality.hotstuff`) never touch sockets or clocks: they return actions. The
:class:`EventLoop` here executes them: it hands each ``Send`` to a :class:`SimNetwork`, which
decides from a seeded RNG whether and when the message arrives (delay, drop, duplication,
reordering through random delays, and time-windowed partitions), and it fires pacemaker timers
and the leaders' proposals. The same loop runs on a virtual clock (simulation, and the embedded
chain's in-process committee: every schedule replays exactly from its seed) or on the wall clock
(a background thread beside anvil).

Addresses are *endpoints*; each endpoint runs one replica for one validator index. Two endpoints
may share an index (twins: one key, two replicas); a message addressed to an index reaches every
endpoint of that index, which is what equivocating twins look like to everybody else.
"""

from __future__ import annotations

import heapq
import random
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from prismesh.chain.finality.hotstuff import (
    Action,
    Committed,
    Message,
    Node,
    ProposeReady,
    Send,
    SetTimer,
)


class ReplicaLike(Protocol):
    index: int

    def start(self) -> list[Action]: ...

    def on_message(self, sender: int, message: Message) -> list[Action]: ...

    def on_timer(self, view: int) -> list[Action]: ...

    def propose(self, view: int) -> list[Action]: ...


@dataclass(frozen=True)
class NetworkConditions:
    """How messages travel: a uniform delay (which reorders), a drop and a duplication rate."""

    min_delay: float = 0.001
    max_delay: float = 0.01
    drop_rate: float = 0.0
    duplicate_rate: float = 0.0

    def __post_init__(self) -> None:
        if not 0 <= self.min_delay <= self.max_delay:
            raise ValueError(f"need 0 <= min_delay <= max_delay, got {self.min_delay}, {self.max_delay}")
        for name in ("drop_rate", "duplicate_rate"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise ValueError(f"{name} must lie in [0, 1], got {value}")


@dataclass(frozen=True)
class Partition:
    """From ``start`` to ``end`` only endpoints inside one group reach each other."""

    start: float
    end: float
    groups: tuple[frozenset[int], ...]

    def separates(self, src: int, dst: int, now: float) -> bool:
        if not self.start <= now < self.end:
            return False
        return not any(src in g and dst in g for g in self.groups)


@dataclass
class SimNetwork:
    """Seeded network model. ``phases`` switch conditions at given times (e.g. chaos, then calm)."""

    seed: int
    conditions: NetworkConditions = field(default_factory=NetworkConditions)
    phases: Sequence[tuple[float, NetworkConditions]] = ()
    partitions: Sequence[Partition] = ()
    sent: int = 0
    dropped: int = 0

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    def conditions_at(self, now: float) -> NetworkConditions:
        current = self.conditions
        for start, cond in self.phases:
            if now >= start:
                current = cond
        return current

    def transit(self, src: int, dst: int, now: float) -> list[float]:
        """Arrival times of one message from ``src`` to ``dst`` sent at ``now`` (empty: lost)."""
        self.sent += 1
        cond = self.conditions_at(now)
        if any(p.separates(src, dst, now) for p in self.partitions):
            self.dropped += 1
            return []
        if cond.drop_rate and self._rng.random() < cond.drop_rate:
            self.dropped += 1
            return []
        copies = 2 if cond.duplicate_rate and self._rng.random() < cond.duplicate_rate else 1
        return [now + self._rng.uniform(cond.min_delay, cond.max_delay) for _ in range(copies)]


@dataclass
class Endpoint:
    validator: int
    replica: ReplicaLike


CommitHook = Callable[[int, tuple[Node, ...]], None]


class EventLoop:
    """Drives replicas over a :class:`SimNetwork` on a virtual or a wall clock.

    ``propose_delay(endpoint, view)`` paces leaders (0 in simulation; beside a real chain a small
    delay keeps idle views cheap). ``on_commit(endpoint, nodes)`` reports every commit.
    """

    def __init__(
        self,
        endpoints: Sequence[Endpoint],
        network: SimNetwork,
        *,
        realtime: bool = False,
        propose_delay: Callable[[int, int], float] | None = None,
        on_commit: CommitHook | None = None,
        observer: Callable[[int, Action], None] | None = None,
    ) -> None:
        if not endpoints:
            raise ValueError("an event loop needs at least one endpoint")
        self.endpoints = list(endpoints)
        self.network = network
        self.realtime = realtime
        self.propose_delay = propose_delay or (lambda _ep, _view: 0.0)
        self.on_commit = on_commit
        self.observer = observer
        self._queue: list[tuple[float, int, str, int, Any]] = []
        self._seq = 0
        self._t0 = time.monotonic()
        self._virtual_now = 0.0
        self._lock = threading.RLock()
        self.delivered = 0
        self.started = False

    # ----------------------------------------------------------------- clock

    def now(self) -> float:
        if self.realtime:
            return time.monotonic() - self._t0
        return self._virtual_now

    # ----------------------------------------------------------------- scheduling

    def _push(self, at: float, kind: str, endpoint: int, payload: Any) -> None:
        with self._lock:
            self._seq += 1
            heapq.heappush(self._queue, (at, self._seq, kind, endpoint, payload))

    def call_at(self, at: float, fn: Callable[[], None]) -> None:
        """Run ``fn`` at time ``at`` on the loop (e.g. to grow a simulated chain)."""
        self._push(at, "call", -1, fn)

    def start(self) -> None:
        if self.started:
            return
        self.started = True
        for ep_index, ep in enumerate(self.endpoints):
            self._execute(ep_index, ep.replica.start())

    def _targets(self, sender_ep: int, to: int | None) -> Iterable[int]:
        for i, ep in enumerate(self.endpoints):
            if i == sender_ep:
                continue
            if to is None or ep.validator == to:
                yield i

    def _execute(self, ep_index: int, actions: list[Action]) -> None:
        now = self.now()
        for action in actions:
            if self.observer is not None:
                self.observer(ep_index, action)
            if isinstance(action, Send):
                sender = self.endpoints[ep_index].validator
                for target in self._targets(ep_index, action.to):
                    for at in self.network.transit(ep_index, target, now):
                        self._push(at, "msg", target, (sender, action.message))
            elif isinstance(action, SetTimer):
                self._push(now + action.duration, "timer", ep_index, action.view)
            elif isinstance(action, ProposeReady):
                delay = self.propose_delay(ep_index, action.view)
                self._push(now + delay, "propose", ep_index, action.view)
            elif isinstance(action, Committed) and self.on_commit is not None:
                self.on_commit(ep_index, action.nodes)

    def _handle(self, kind: str, ep_index: int, payload: Any) -> None:
        if kind == "call":
            payload()
            return
        replica = self.endpoints[ep_index].replica
        if kind == "msg":
            self.delivered += 1
            sender, message = payload
            actions = replica.on_message(sender, message)
        elif kind == "timer":
            actions = replica.on_timer(payload)
        else:
            actions = replica.propose(payload)
        self._execute(ep_index, actions)

    # ----------------------------------------------------------------- running

    def run(
        self,
        until: float | None = None,
        stop: Callable[[], bool] | None = None,
        max_events: int | None = None,
    ) -> int:
        """Process events in time order on the virtual clock; returns how many ran.

        Stops when the queue is empty, the next event lies after ``until``, ``stop()`` is true
        (checked after each event) or ``max_events`` ran.
        """
        if self.realtime:
            raise RuntimeError("run() drives the virtual clock; use run_realtime() for wall time")
        self.start()
        count = 0
        while self._queue:
            at = self._queue[0][0]
            if until is not None and at > until:
                self._virtual_now = max(self._virtual_now, until)
                break
            _, _, kind, ep, payload = heapq.heappop(self._queue)
            self._virtual_now = max(self._virtual_now, at)
            self._handle(kind, ep, payload)
            count += 1
            if (stop is not None and stop()) or (max_events is not None and count >= max_events):
                break
        return count

    def run_realtime(self, stop_event: threading.Event, poll: float = 0.05) -> None:
        """Process events at their wall-clock times until ``stop_event`` is set (thread body)."""
        if not self.realtime:
            raise RuntimeError("run_realtime() needs EventLoop(realtime=True)")
        self.start()
        while not stop_event.is_set():
            with self._lock:
                head = self._queue[0] if self._queue else None
                due = head is not None and head[0] <= self.now()
                item = heapq.heappop(self._queue) if due else None
            if item is None:
                wait = poll if head is None else min(poll, max(0.0, head[0] - self.now()))
                stop_event.wait(wait)
                continue
            _, _, kind, ep, payload = item
            self._handle(kind, ep, payload)
