"""Runs the validator committee: over a seeded simulated chain, or over the devnet's real blocks.

Two drivers share :mod:`prismesh.chain.finality.hotstuff` (rules) and :mod:`prismesh.chain.finality.transport` (network + loop):

* :func:`simulate` runs ``n = 3f + 1`` replicas (honest, silent, Byzantine, twins) over a
  :class:`SimLedger` block tree on a virtual clock. Every run replays exactly from its seed; the
  randomized Byzantine tests and the finality benchmark use it.
* :class:`Committee` runs the replicas over a real chain (:class:`Web3Ledger`) and posts commit
  certificates to the FinalityGadget. In-process mode (the embedded eth-tester chain, which is
  not thread-safe) is driven synchronously by whoever mines: ``run_until_final(height)``.
  Beside anvil, :meth:`Committee.start_thread` runs the same loop on the wall clock.

The on-chain certificate. When a replica commits a node by the three-chain rule, its validator
signs ``commit_digest(chain id, gadget, height, hash, view)`` for the node's payload block, but
only for nodes whose payload raises the committed height (the same nodes at every honest replica,
since they commit the same sequence). A :class:`CertificateCollector` checks each signature with
ecrecover and keeps them per ``(height, hash, view)``; ``2f + 1`` of them form a certificate.

Not spinning forever. Posting a certificate is a transaction, so it mines a block that would in
turn need a certificate. The committee therefore posts a certificate for height ``h`` only when
some block in ``(final height, h]`` carries a transaction that is not a call to the gadget
("needs finality"). Blocks holding only certificates become final when the next real work is
certified (a certificate for ``h`` finalizes every height ``<= h``), and with no other work the
chain stops growing. Leaders keep proposing (empty nodes re-carry their parent's payload); beside
anvil an idle leader waits ``idle_interval`` before proposing, so an idle devnet costs little.

Final implies durable. With a ``durability`` hook (beside anvil: :class:`StateDumper`, which
writes anvil's state file), a certificate is posted only once the chain's state containing its
block is on disk, one dump per certificate. A devnet killed and restarted from that file holds
every certified block; the certificate transaction itself may be lost with the blocks after
the dump, and the committee certifies the same blocks again. :func:`supervise` runs the
committee as a service: it waits out an unreachable RPC endpoint, notices a chain that lost
blocks under it, and rebuilds itself from the gadget's final block, one log line per attempt.
"""

from __future__ import annotations

import logging
import random
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from eth_keys import keys as eth_keys
from eth_utils import keccak, to_checksum_address

from prismesh.chain import telemetry
from prismesh.chain.finality.gadget import (
    CommitCertificate,
    FinalityGadgetClient,
    GadgetRevert,
    ValidatorKey,
    commit_digest,
    committee_domain,
    generate_validator_keys,
    verify_vote_signature,
)
from prismesh.chain.finality.hotstuff import (
    Action,
    ChainRef,
    Message,
    Node,
    PacemakerConfig,
    Proposal,
    Replica,
    Send,
    SetTimer,
    ValidatorSet,
    Vote,
    genesis_node,
    vote_digest,
)
from prismesh.chain.finality.transport import (
    Endpoint,
    EventLoop,
    NetworkConditions,
    Partition,
    SimNetwork,
)

FAULT_KINDS = ("silent", "equivocate", "double_vote", "fork_vote", "byzantine", "twins")

log = logging.getLogger("prismesh.committee")


# --------------------------------------------------------------------------- ledgers


class SimLedger:
    """A block tree for simulation. Honest producers extend the head; forks are made on demand.

    When a certified node carries a fork block, ``tip_extending`` moves the head onto that fork
    (block producers follow finality), so leaders can always extend what was certified.
    """

    def __init__(self, seed: int = 0) -> None:
        self._rng = random.Random(seed ^ 0x5EED)
        self.genesis = ChainRef(0, keccak(b"sim-genesis" + seed.to_bytes(8, "big")))
        self.parent: dict[bytes, bytes] = {self.genesis.block_hash: b""}
        self.height_of: dict[bytes, int] = {self.genesis.block_hash: 0}
        self.created_at: dict[bytes, float] = {self.genesis.block_hash: 0.0}
        self.head = self.genesis

    def _new_block(self, base: ChainRef, now: float) -> ChainRef:
        block_hash = self._rng.getrandbits(256).to_bytes(32, "big")
        self.parent[block_hash] = base.block_hash
        self.height_of[block_hash] = base.height + 1
        self.created_at[block_hash] = now
        return ChainRef(base.height + 1, block_hash)

    def grow(self, now: float) -> ChainRef:
        """Mine one block on the head."""
        self.head = self._new_block(self.head, now)
        return self.head

    def fork(self, base: ChainRef, now: float = 0.0) -> ChainRef:
        """A new block on ``base`` that conflicts with any other child of ``base``."""
        return self._new_block(base, now)

    def extends(self, ancestor: ChainRef, descendant: ChainRef) -> bool:
        if self.height_of.get(descendant.block_hash) != descendant.height:
            return False
        cur = descendant.block_hash
        height = descendant.height
        while height > ancestor.height:
            cur = self.parent[cur]
            height -= 1
        return height == ancestor.height and cur == ancestor.block_hash

    def tip_extending(self, base: ChainRef) -> ChainRef:
        if not self.extends(base, self.head):
            self.head = base
        return self.head


class Web3Ledger:
    """The devnet chain seen through web3: canonical hashes by height, cached (no reorgs)."""

    def __init__(self, w3: Any, gadget: str | None = None) -> None:
        self.w3 = w3
        self.gadget = to_checksum_address(gadget) if gadget else None
        self._hashes: dict[int, bytes] = {}
        self._needs: dict[int, bool] = {}

    def block_hash(self, height: int) -> bytes | None:
        cached = self._hashes.get(height)
        if cached is not None:
            return cached
        try:
            block = self.w3.eth.get_block(height)
        except Exception:  # the block does not exist (yet)
            return None
        self._hashes[height] = bytes(block["hash"])
        return self._hashes[height]

    def head(self) -> ChainRef:
        height = int(self.w3.eth.block_number)
        block_hash = self.block_hash(height)
        assert block_hash is not None
        return ChainRef(height, block_hash)

    def extends(self, ancestor: ChainRef, descendant: ChainRef) -> bool:
        return (
            ancestor.height <= descendant.height
            and self.block_hash(descendant.height) == descendant.block_hash
            and self.block_hash(ancestor.height) == ancestor.block_hash
        )

    def tip_extending(self, base: ChainRef) -> ChainRef:
        head = self.head()
        return head if self.extends(base, head) else base

    def lost_history(self) -> str | None:
        """Why the chain no longer matches the hashes cached here (a devnet restarted from an
        older state, or replaced), or None when it does."""
        if not self._hashes:
            return None
        top = max(self._hashes)
        head = int(self.w3.eth.block_number)
        if head < top:
            return f"the chain's head {head} is below block {top} the committee has seen"
        block = self.w3.eth.get_block(top)
        if bytes(block["hash"]) != self._hashes[top]:
            return f"block {top} changed its hash"
        return None

    def block_needs_finality(self, height: int) -> bool:
        """Whether block ``height`` carries a transaction other than a call to the gadget."""
        cached = self._needs.get(height)
        if cached is not None:
            return cached
        block = self.w3.eth.get_block(height, full_transactions=True)
        needs = any(
            tx.get("to") is None or to_checksum_address(tx["to"]) != self.gadget
            for tx in block["transactions"]
        )
        self._needs[height] = needs
        return needs

    def needs_finality(self, low: int, high: int) -> bool:
        """Whether any block in ``(low, high]`` needs finality."""
        return any(self.block_needs_finality(h) for h in range(high, low, -1))


# --------------------------------------------------------------------------- faulty replicas


class SilentReplica:
    """A validator that is down: drops every input during ``[start, end)`` (forever by default).

    Outside the window it runs the wrapped honest replica, so a validator can come back.
    """

    def __init__(
        self,
        inner: Replica,
        clock: Callable[[], float] | None = None,
        start: float = 0.0,
        end: float = float("inf"),
    ) -> None:
        self.inner = inner
        self.index = inner.index
        self.clock = clock or (lambda: 0.0)
        self.start_time = start
        self.end_time = end
        self._timer_armed = False

    def _down(self) -> bool:
        return self.start_time <= self.clock() < self.end_time

    def start(self) -> list[Action]:
        return [] if self._down() else self.inner.start()

    def on_message(self, sender: int, message: Message) -> list[Action]:
        if self._down():
            return []
        out = self.inner.on_message(sender, message)
        if not self._timer_armed:
            # Coming back: re-arm the pacemaker, which stopped while the validator was down.
            self._timer_armed = True
            out = out + self.inner.on_timer(self.inner.view)
        return out

    def on_timer(self, view: int) -> list[Action]:
        return [] if self._down() else self.inner.on_timer(view)

    def propose(self, view: int) -> list[Action]:
        return [] if self._down() else self.inner.propose(view)


class ByzantineReplica(Replica):
    """A replica that breaks the rules on purpose.

    * ``equivocate``: as leader, sends two conflicting nodes (different chain blocks) to the two
      halves of the committee and votes for both.
    * ``double_vote``: after each vote also signs a vote for a conflicting sibling node.
    * ``fork_vote``: votes for every proposal it sees, ignoring the lock and the view order.
    """

    def __init__(
        self,
        *args: Any,
        equivocate: bool = False,
        double_vote: bool = False,
        fork_vote: bool = False,
        fork: Callable[[ChainRef], ChainRef] | None = None,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.equivocate = equivocate
        self.double_vote = double_vote
        self.fork_vote = fork_vote
        self.fork = fork or (lambda base: ChainRef(base.height + 1, keccak(base.block_hash)))
        self._rng = random.Random(seed)
        self._signed: set[bytes] = set()

    def _sign_and_send(self, node: Node, out: list[Action]) -> None:
        if node.node_id in self._signed:
            return
        self._signed.add(node.node_id)
        digest = vote_digest(self.validators.domain, node.view, node.node_id)
        vote = Vote(node.view, node.node_id, self.index, self.signer.sign_vote(digest))
        out.append(Send(None, vote))
        self._on_vote(self.index, vote, out)

    def _sibling(self, node: Node) -> Node:
        parent = self.nodes.get(node.parent_id)
        base = parent.payload if parent is not None else node.payload
        sibling = Node(node.view, node.parent_id, self.fork(base), node.justify, node.proposer)
        self.nodes.setdefault(sibling.node_id, sibling)
        return sibling

    def propose(self, view: int) -> list[Action]:
        if not self.equivocate:
            return super().propose(view)
        out: list[Action] = []
        if not self._can_propose(view):
            return out
        self._proposed_views.add(view)
        parent = self.nodes[self.high_qc.node_id]
        a = Node(
            view,
            parent.node_id,
            self.ledger.tip_extending(parent.payload),
            self.high_qc,
            self.index,
        )
        b = Node(view, parent.node_id, self.fork(parent.payload), self.high_qc, self.index)
        self.nodes.setdefault(a.node_id, a)
        self.nodes.setdefault(b.node_id, b)
        others = [i for i in range(self.validators.n) if i != self.index]
        self._rng.shuffle(others)
        half = len(others) // 2
        for k, i in enumerate(others):
            out.append(Send(i, Proposal(a if k < half else b)))
        self.view = max(self.view, view)
        self._sign_and_send(a, out)
        self._sign_and_send(b, out)
        return out

    def _on_proposal(self, sender: int, node: Node, out: list[Action]) -> None:
        voted_before = self.last_voted_view
        super()._on_proposal(sender, node, out)
        voted = self.last_voted_view != voted_before
        if voted:
            self._signed.add(node.node_id)
        known = node.node_id in self.nodes and sender == self.validators.leader(node.view)
        if self.fork_vote and known and not voted:
            self._sign_and_send(node, out)
        if self.double_vote and known:
            self._sign_and_send(self._sibling(node), out)


# --------------------------------------------------------------------------- simulation


@dataclass
class SimConfig:
    """One seeded schedule: committee, faults, network phases and partitions, chain growth."""

    n: int = 4
    seed: int = 0
    faults: Mapping[int, str] = field(default_factory=dict)
    silent_windows: Mapping[int, tuple[float, float]] = field(default_factory=dict)
    duration: float = 30.0
    gst: float = 0.0
    chaos: NetworkConditions = field(
        default_factory=lambda: NetworkConditions(0.01, 0.5, 0.2, 0.05)
    )
    calm: NetworkConditions = field(default_factory=lambda: NetworkConditions(0.01, 0.1))
    partitions: Sequence[Partition] = ()
    block_interval: float = 0.5
    base_timeout: float = 1.0
    max_backoff_exponent: int = 1
    stop_when_final_after: float | None = None
    keys: Sequence[ValidatorKey] | None = None


@dataclass
class CommitRecord:
    time: float
    endpoint: int
    node: Node
    replica_view: int  # the replica's view right after the commit


@dataclass
class ViewRecord:
    time: float
    endpoint: int
    view: int


@dataclass
class SimResult:
    config: SimConfig
    ledger: SimLedger
    endpoints: list[Endpoint]
    honest: list[int]
    commits: list[CommitRecord]
    views: list[ViewRecord]
    replicas: list[Replica]
    end_time: float
    messages_sent: int
    messages_dropped: int

    def committed_logs(self) -> dict[int, list[Node]]:
        return {ep: self.replicas[ep].committed_log for ep in self.honest}

    def final_height(self, endpoint: int) -> int:
        return self.replicas[endpoint].committed.payload.height

    def min_honest_final_height(self) -> int:
        return min(self.final_height(ep) for ep in self.honest)

    def height_at(self, t: float) -> int:
        """Height of the highest block created at or before ``t``."""
        return max(
            (self.ledger.height_of[h] for h, c in self.ledger.created_at.items() if c <= t),
            default=0,
        )


def check_safety(result: SimResult) -> None:
    """Assert no two conflicting nodes or blocks are committed by honest replicas."""
    logs = list(result.committed_logs().values())
    longest = max(logs, key=len)
    for log in logs:
        ids = [b.node_id for b in log]
        ref = [b.node_id for b in longest[: len(log)]]
        if ids != ref:
            raise AssertionError("two honest replicas committed conflicting nodes")
    by_height: dict[int, bytes] = {}
    for log in logs:
        for b in log:
            prev = by_height.setdefault(b.payload.height, b.payload.block_hash)
            if prev != b.payload.block_hash:
                raise AssertionError(f"two different blocks final at height {b.payload.height}")
    heights = [b.payload for b in longest]
    for lo, hi in zip(heights, heights[1:], strict=False):
        if not result.ledger.extends(lo, hi):
            raise AssertionError(f"final block {hi} does not extend final block {lo}")


def simulate(config: SimConfig) -> SimResult:
    """Run one seeded schedule on the virtual clock and return everything a test asserts on."""
    unknown = {k for k in config.faults.values() if k not in FAULT_KINDS}
    if unknown:
        raise ValueError(f"unknown fault kind(s) {sorted(unknown)}; known: {FAULT_KINDS}")
    keys = (
        list(config.keys) if config.keys is not None else generate_validator_keys(config.n, seed=1)
    )
    if len(keys) != config.n:
        raise ValueError(f"{len(keys)} keys for a committee of {config.n}")
    ledger = SimLedger(config.seed)
    vset = ValidatorSet(
        tuple(k.public_key for k in keys), verify_vote_signature, keccak(b"sim" + bytes(8))
    )
    genesis = genesis_node(ledger.genesis)
    pace = PacemakerConfig(config.base_timeout, config.max_backoff_exponent)
    network = SimNetwork(
        config.seed,
        config.chaos if config.gst > 0 else config.calm,
        phases=[(config.gst, config.calm)],
        partitions=config.partitions,
    )
    loop_ref: list[EventLoop] = []

    def clock() -> float:
        return loop_ref[0].now() if loop_ref else 0.0

    endpoints: list[Endpoint] = []
    replicas: list[Replica] = []
    honest: list[int] = []
    for i in range(config.n):
        kind = config.faults.get(i)
        args = (i, keys[i], vset, genesis, ledger, pace)
        copies = 2 if kind == "twins" else 1
        for _ in range(copies):
            if kind in {"equivocate", "double_vote", "fork_vote", "byzantine"}:
                rep: Replica = ByzantineReplica(
                    *args,
                    equivocate=kind in {"equivocate", "byzantine"},
                    double_vote=kind in {"double_vote", "byzantine"},
                    fork_vote=kind in {"fork_vote", "byzantine"},
                    fork=lambda base: ledger.fork(base, clock()),
                    seed=config.seed * 31 + i,
                )
            else:
                rep = Replica(*args)
            replicas.append(rep)
            driver: Any = rep
            if kind == "silent":
                driver = SilentReplica(rep, clock)
            elif i in config.silent_windows:
                start, end = config.silent_windows[i]
                driver = SilentReplica(rep, clock, start, end)
            if kind is None:
                honest.append(len(endpoints))
            endpoints.append(Endpoint(i, driver))

    commits: list[CommitRecord] = []
    waiting = set(honest)
    after = config.stop_when_final_after

    def on_commit(ep: int, nodes: tuple[Node, ...]) -> None:
        now = clock()
        commits.extend(CommitRecord(now, ep, b, replicas[ep].view) for b in nodes)
        if after is not None and ep in waiting:
            if any(ledger.created_at[b.payload.block_hash] > after for b in nodes):
                waiting.discard(ep)

    views: list[ViewRecord] = []
    last_view = [0] * len(endpoints)

    def observe(ep: int, action: Action) -> None:
        if isinstance(action, SetTimer) and action.view > last_view[ep]:
            last_view[ep] = action.view
            views.append(ViewRecord(clock(), ep, action.view))

    loop = EventLoop(endpoints, network, on_commit=on_commit, observer=observe)
    loop_ref.append(loop)

    def grow() -> None:
        ledger.grow(loop.now())
        nxt = loop.now() + config.block_interval
        if nxt <= config.duration:
            loop.call_at(nxt, grow)

    loop.call_at(config.block_interval, grow)
    stop = (lambda: not waiting) if after is not None else None
    loop.run(until=config.duration, stop=stop)
    return SimResult(
        config,
        ledger,
        endpoints,
        honest,
        commits,
        views,
        replicas,
        loop.now(),
        network.sent,
        network.dropped,
    )


def random_schedule(seed: int, n: int = 4, after_gst: float = 20.0) -> SimConfig:
    """A randomized Byzantine schedule: f faulty validators of random kinds, chaos until GST.

    The run stops as soon as every honest replica has finalized a block made after GST, or
    ``after_gst`` seconds after GST (the liveness bound the tests assert).
    """
    rng = random.Random(seed)
    f = (n - 1) // 3
    faulty = rng.sample(range(n), f)
    kinds = ("silent", "equivocate", "double_vote", "fork_vote", "byzantine", "twins")
    faults = {i: rng.choice(kinds) for i in faulty}
    gst = rng.uniform(2.0, 8.0)
    chaos = NetworkConditions(
        0.005, rng.uniform(0.05, 0.8), rng.uniform(0.0, 0.3), rng.uniform(0, 0.1)
    )
    calm = NetworkConditions(0.04, rng.uniform(0.1, 0.3))
    partitions = []
    endpoints = n + sum(1 for k in faults.values() if k == "twins")
    for _ in range(rng.randint(0, 2)):
        start = rng.uniform(0, gst)
        members = list(range(endpoints))
        rng.shuffle(members)
        cut = rng.randint(1, endpoints - 1)
        groups = (frozenset(members[:cut]), frozenset(members[cut:]))
        partitions.append(Partition(start, min(gst, start + rng.uniform(0.5, 4.0)), groups))
    return SimConfig(
        n=n,
        seed=seed,
        faults=faults,
        duration=gst + after_gst,
        gst=gst,
        chaos=chaos,
        calm=calm,
        partitions=tuple(partitions),
        block_interval=rng.uniform(0.2, 1.0),
        stop_when_final_after=gst,
    )


# --------------------------------------------------------------------------- certificates


class CertificateCollector:
    """Gathers validators' commit signatures (checked with ecrecover) into certificates."""

    def __init__(self, chain_id: int, gadget: str, validators: Sequence[str]) -> None:
        n = len(validators)
        if n < 1 or (n - 1) % 3:
            raise ValueError(f"committee size must be n = 3f + 1, got {n}")
        self.chain_id = chain_id
        self.gadget = to_checksum_address(gadget)
        self.validators = [to_checksum_address(v) for v in validators]
        self.quorum = 2 * ((n - 1) // 3) + 1
        self._sigs: dict[tuple[int, bytes, int], dict[str, bytes]] = {}

    def add(self, height: int, block_hash: bytes, view: int, signer: str, signature: bytes) -> bool:
        """Record one signature; False (and ignored) unless it is a validator's valid signature."""
        signer = to_checksum_address(signer)
        if signer not in self.validators or len(signature) != 65:
            return False
        digest = commit_digest(self.chain_id, self.gadget, height, block_hash, view)
        try:
            sig = eth_keys.Signature(signature[:64] + bytes([signature[64] - 27]))
            recovered = sig.recover_public_key_from_msg_hash(digest).to_checksum_address()
        except Exception:
            return False
        if recovered != signer:
            return False
        self._sigs.setdefault((height, block_hash, view), {})[signer] = signature
        return True

    def best(self, above: int) -> CommitCertificate | None:
        """The highest-height certificate with a quorum and height above ``above``."""
        ready = [k for k, v in self._sigs.items() if len(v) >= self.quorum and k[0] > above]
        if not ready:
            return None
        height, block_hash, view = max(ready)
        sigs = sorted(self._sigs[(height, block_hash, view)].items())[: self.quorum]
        return CommitCertificate(
            height, block_hash, view, tuple(s for s, _ in sigs), tuple(sig for _, sig in sigs)
        )

    def prune(self, final_height: int) -> None:
        self._sigs = {k: v for k, v in self._sigs.items() if k[0] > final_height}


# --------------------------------------------------------------------------- chain committee


class Committee:
    """n = 3f + 1 validators finalizing a real chain through the FinalityGadget at ``gadget``.

    ``submitter`` (a funded LocalAccount, best one used by nothing else so its nonces do not
    race) sends the certificates. ``silent`` lists validator indices that stay down (faults for
    benchmarks). ``realtime`` selects the wall clock (thread beside anvil) over the virtual one.
    """

    def __init__(
        self,
        w3: Any,
        gadget: str,
        keys: Sequence[ValidatorKey],
        submitter: Any,
        *,
        silent: Sequence[int] = (),
        seed: int = 0,
        realtime: bool = False,
        network: NetworkConditions | None = None,
        base_timeout: float | None = None,
        busy_interval: float = 0.0,
        idle_interval: float = 0.5,
        durability: Callable[[int], int] | None = None,
    ) -> None:
        self.w3 = w3
        self.durability = durability
        self.durable_height = -1
        self.client = FinalityGadgetClient(w3, gadget)
        self.keys = list(keys)
        on_chain = self.client.validators()
        if [k.address for k in self.keys] != on_chain:
            raise ValueError(
                f"validator keys {[k.address for k in self.keys]} do not match the gadget's "
                f"validator set {on_chain} at {self.client.address}"
            )
        self.submitter = submitter
        self.chain_id = int(w3.eth.chain_id)
        self.ledger = Web3Ledger(w3, self.client.address)
        self.collector = CertificateCollector(self.chain_id, self.client.address, on_chain)
        self.realtime = realtime
        self.busy_interval = busy_interval
        self.idle_interval = idle_interval
        self.final_height = self.client.finalized_height()
        self.certificates: list[tuple[CommitCertificate, Any]] = []
        self.errors: list[BaseException] = []
        self.submit_errors: list[BaseException] = []
        vset = ValidatorSet(
            tuple(k.public_key for k in self.keys),
            verify_vote_signature,
            committee_domain(self.chain_id, self.client.address),
        )
        # HotStuff starts from the gadget's final block: everything after it, including blocks
        # mined before the committee started, still needs a certificate.
        start_hash = self.ledger.block_hash(self.final_height)
        assert start_hash is not None
        start = ChainRef(self.final_height, start_hash)
        genesis = genesis_node(start)
        timeout = base_timeout if base_timeout is not None else (2.0 if realtime else 1.0)
        pace = PacemakerConfig(base_timeout=timeout)
        self.replicas = [
            Replica(i, k, vset, genesis, self.ledger, pace, keep_history=2000)
            for i, k in enumerate(self.keys)
        ]
        self._signed_height = [start.height] * len(self.keys)
        endpoints = []
        for i, rep in enumerate(self.replicas):
            driver: Any = SilentReplica(rep) if i in set(silent) else rep
            endpoints.append(Endpoint(i, driver))
        conditions = network or NetworkConditions(0.0005, 0.002)
        self.loop = EventLoop(
            endpoints,
            SimNetwork(seed, conditions),
            realtime=realtime,
            propose_delay=self._propose_delay,
            on_commit=self._on_commit,
        )
        self._silent = set(silent)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    # ----------------------------------------------------------------- hooks

    def _propose_delay(self, endpoint: int, view: int) -> float:
        if not self.realtime:
            return 0.0
        rep = self.replicas[endpoint]
        parent = rep.nodes.get(rep.high_qc.node_id)
        pending = parent is not None and parent.payload.height > rep.committed.payload.height
        head = self.ledger.head().height
        fresh = parent is not None and head > parent.payload.height
        busy = pending or (fresh and self.ledger.needs_finality(parent.payload.height, head))
        return self.busy_interval if busy else self.idle_interval

    def _on_commit(self, endpoint: int, nodes: tuple[Node, ...]) -> None:
        if endpoint in self._silent:
            return
        key = self.keys[endpoint]
        for node in nodes:
            height = node.payload.height
            if height <= self._signed_height[endpoint]:
                continue
            self._signed_height[endpoint] = height
            if not self.ledger.needs_finality(self.final_height, height):
                continue
            digest = commit_digest(
                self.chain_id, self.client.address, height, node.payload.block_hash, node.view
            )
            self.collector.add(
                height, node.payload.block_hash, node.view, key.address, key.sign_commit(digest)
            )
        self._maybe_submit()

    def _maybe_submit(self) -> None:
        cert = self.collector.best(self.final_height)
        if cert is None:
            return
        if self.durability is not None and cert.height > self.durable_height:
            # Final implies durable: the chain's state holding this block goes to disk before
            # its certificate leaves the committee (one dump covers the head, so the next
            # certificates up to it need none).
            try:
                self.durable_height = self.durability(cert.height)
            except Exception as exc:
                if not self.realtime:
                    raise
                self.submit_errors.append(exc)
                return
        try:
            receipt = self.client.submit_certificate(cert, self.submitter)
        except GadgetRevert as exc:
            telemetry.error("committee", "committee", exc.error_name)
            restored = exc.error_name == "BlockHashMismatch" and self.ledger.block_hash(cert.height) == cert.block_hash
            if exc.error_name == "UncheckableHeight" or restored:
                # The gadget cannot check this block's hash: more than 256 blocks old, or (the
                # chain reports the hash but the EVM's BLOCKHASH disagrees) a block anvil
                # restored from its state file, for which it answers BLOCKHASH wrongly. A
                # certificate for a recent block mined since finalizes these too.
                self.collector.prune(cert.height)
                self._mine_if_idle(cert.height)
                return
            if exc.error_name != "StaleHeight":
                raise
            self.final_height = self.client.finalized_height()
            return
        except Exception as exc:
            telemetry.error("committee", "committee", type(exc).__name__)
            if not self.realtime:
                raise
            # Beside anvil a failed send (node busy, restarting) is retried at the next commit:
            # the collector keeps the signatures.
            self.submit_errors.append(exc)
            return
        self.final_height = cert.height
        self.certificates.append((cert, receipt))
        self.collector.prune(self.final_height)
        if telemetry.enabled():
            telemetry.certificate("committee", receipt, cert.height, int(self.w3.eth.block_number))

    def _mine_if_idle(self, height: int) -> None:
        """Beside anvil, mine one empty block when none follows ``height``, so that there is a
        block the gadget can check to certify (nothing else may come for a while)."""
        if not self.realtime or self.ledger.head().height > height:
            return
        try:
            self.w3.provider.make_request("evm_mine", [])
        except Exception as exc:  # noqa: BLE001 - a chain without evm_mine waits for real work
            self.submit_errors.append(exc)

    # ----------------------------------------------------------------- in-process mode

    def _check_chain(self) -> None:
        """Refuse to run over a chain reverted under the committee (snapshots in tests)."""
        start = self.replicas[0].genesis.payload
        block = self.w3.eth.get_block(start.height) if start.height <= self.w3.eth.block_number else None
        reverted = block is None or bytes(block["hash"]) != start.block_hash
        if reverted or self.client.finalized_height() < self.final_height:
            raise RuntimeError(
                "the chain was reverted below what this committee has seen; create a new "
                "Committee after reverting a snapshot"
            )

    def run_until_final(self, height: int | None = None, max_events: int = 200_000) -> int:
        """Drive the committee (virtual clock) until ``height`` (default: the head) is final.

        Returns the gadget's final height. If no block in ``(final, height]`` carries a
        transaction other than certificates, there is nothing to finalize and it returns at once.
        """
        if self.realtime:
            raise RuntimeError(
                "run_until_final drives the in-process committee; this one is realtime"
            )
        self._check_chain()
        target = self.ledger.head().height if height is None else height
        if target <= self.final_height or not self.ledger.needs_finality(self.final_height, target):
            return self.final_height
        self.loop.run(stop=lambda: self.final_height >= target, max_events=max_events)
        if self.final_height < target:
            raise TimeoutError(
                f"height {target} not final after {max_events} events (final: {self.final_height}); "
                f"are more than f = {(len(self.keys) - 1) // 3} validators down?"
            )
        return self.final_height

    # ----------------------------------------------------------------- thread mode

    def start_thread(self) -> None:
        """Run the committee on the wall clock in a daemon thread (beside anvil)."""
        if not self.realtime:
            raise RuntimeError("start_thread needs Committee(realtime=True)")
        if self._thread is not None:
            return
        self._thread = threading.Thread(
            target=self._thread_main, name="prismesh-committee", daemon=True
        )
        self._thread.start()

    def _thread_main(self) -> None:
        try:
            self.loop.run_realtime(self._stop)
        except BaseException as exc:  # surfaced through .errors and wait_final
            self.errors.append(exc)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def wait_final(self, height: int, timeout: float = 30.0) -> int:
        """Block until the gadget reports ``height`` final (thread mode); its final height."""
        deadline = threading.Event()
        waited = 0.0
        while waited < timeout:
            if self.errors:
                raise RuntimeError("committee thread failed") from self.errors[0]
            if self.final_height >= height:
                return self.final_height
            deadline.wait(0.02)
            waited += 0.02
        raise TimeoutError(
            f"height {height} not final within {timeout}s (final: {self.final_height})"
        )


VALIDATOR_ACCOUNT_OFFSET = 16


def devnet_validator_keys(devnet: Any = None, n: int = 4) -> list[ValidatorKey]:
    """The devnet committee's keys: dev accounts 16 .. 16 + n - 1 (as ``prismesh deploy`` uses).

    They come from the devnet's mnemonic, so they exist whether or not the devnet funds them.
    """
    from prismesh.chain.evm.devnet import dev_accounts

    if n < 1 or (n - 1) % 3:
        raise ValueError(f"committee size must be n = 3f + 1 (1, 4, 7, ...), got {n}")
    accounts = dev_accounts(VALIDATOR_ACCOUNT_OFFSET + n)[VALIDATOR_ACCOUNT_OFFSET:]
    return [ValidatorKey(bytes(a.key)) for a in accounts]


def gadget_address_from_manifest(manifest: Any) -> str:
    """The FinalityGadget address of a deployment manifest (``Manifest`` or its JSON dict)."""
    entry = getattr(manifest, "finality_gadget", None)
    if entry is None and isinstance(manifest, Mapping):
        entry = manifest.get("finality_gadget")
    if not isinstance(entry, str):
        raise KeyError("the deployment manifest has no finality_gadget (deploy with validators)")
    return to_checksum_address(entry)


def start_committee_thread(
    devnet: Any,
    manifest: Any,
    *,
    keys: Sequence[ValidatorKey] | None = None,
    submitter: Any = None,
    silent: Sequence[int] = (),
    durability: Callable[[int], int] | None = None,
) -> Committee:
    """Start the committee beside anvil; ``devnet`` has ``.w3`` and ``.accounts``. Call ``.stop()``.

    The submitter defaults to validator 0's own account (dev account 16), which nothing else
    sends from, so its nonces cannot race with other users of the devnet. A devnet with a
    ``state_file`` gets that file written before every certificate unless ``durability`` says
    otherwise.
    """
    keys = list(keys) if keys is not None else devnet_validator_keys(devnet)
    submitter = submitter if submitter is not None else devnet.accounts[VALIDATOR_ACCOUNT_OFFSET]
    if durability is None and getattr(devnet, "state_file", None) is not None:
        from prismesh.chain.evm.devnet import StateDumper

        durability = StateDumper(devnet.w3, devnet.state_file)
    committee = Committee(
        devnet.w3,
        gadget_address_from_manifest(manifest),
        keys,
        submitter,
        silent=silent,
        realtime=True,
        durability=durability,
    )
    committee.start_thread()
    return committee


def in_process_committee(
    devnet: Any,
    manifest: Any,
    *,
    keys: Sequence[ValidatorKey] | None = None,
    submitter: Any = None,
) -> Committee:
    """The committee for the embedded chain: call ``run_until_final()`` after mining."""
    keys = list(keys) if keys is not None else devnet_validator_keys(devnet)
    submitter = submitter if submitter is not None else devnet.accounts[VALIDATOR_ACCOUNT_OFFSET]
    return Committee(devnet.w3, gadget_address_from_manifest(manifest), keys, submitter)


def supervise(
    rpc_url: str,
    manifest: Any,
    stop: threading.Event,
    *,
    n: int = 4,
    silent: Sequence[int] = (),
    state_file: Any = None,
    check_interval: float = 1.0,
    on_final: Callable[[int], None] | None = None,
) -> None:
    """Run the committee beside anvil until ``stop`` is set, surviving the chain's faults.

    An unreachable endpoint is waited out with back-off; a committee thread that failed, or a
    chain that lost blocks under it (anvil killed and restarted from its state file), is
    replaced by a fresh committee that starts from the gadget's final block. Each fault logs
    one line (the traceback with ``PRISMESH_DEBUG``). With ``state_file`` every certificate
    waits for anvil's state to be written there."""
    from types import SimpleNamespace

    from prismesh.chain.evm.devnet import StateDumper, dev_accounts, http_web3
    from prismesh.chain.localstate import RetryDelay, debug_enabled, describe_error

    retry = RetryDelay(check_interval, ceiling=30.0)
    keys = devnet_validator_keys(n=n)
    while not stop.is_set():
        committee: Committee | None = None
        try:
            w3 = http_web3(rpc_url)
            durability = StateDumper(w3, state_file) if state_file else None
            devnet = SimpleNamespace(w3=w3, accounts=dev_accounts(VALIDATOR_ACCOUNT_OFFSET + n))
            committee = Committee(
                w3, gadget_address_from_manifest(manifest), keys,
                devnet.accounts[VALIDATOR_ACCOUNT_OFFSET], silent=silent, realtime=True,
                durability=durability,
            )
            committee.start_thread()
            if retry.attempts:
                log.info("committee resumed from final height %d", committee.final_height)
            retry.reset()
            last = committee.final_height
            if on_final is not None:
                on_final(last)
            while not stop.wait(check_interval):
                if committee.errors:
                    raise committee.errors[0]
                reason = committee.ledger.lost_history()
                if reason:
                    raise RuntimeError(f"{reason}: the devnet restarted from an older state; "
                                       "restarting the committee from the gadget's final block")
                if committee.final_height != last:
                    last = committee.final_height
                    if on_final is not None:
                        on_final(last)
        except Exception as exc:  # noqa: BLE001 - every fault is waited out, then retried
            wait = retry.next()
            log.warning("committee: %s; retrying in %.1f s (attempt %d)", describe_error(exc), wait,
                        retry.attempts, exc_info=debug_enabled())
            stop.wait(wait)
        finally:
            if committee is not None:
                committee.stop()


def main(argv: Sequence[str] | None = None) -> int:
    """Process mode: ``python -m prismesh.chain.finality.committee --rpc URL --manifest PATH`` runs the committee
    beside an already running anvil (e.g. a detached ``prismesh devnet``) until interrupted."""
    import argparse
    import os
    import signal

    from prismesh.chain.evm.manifest import load_manifest
    from prismesh.chain.localstate import DEBUG_ENV

    parser = argparse.ArgumentParser(prog="python -m prismesh.chain.finality.committee", description=main.__doc__)
    parser.add_argument("--rpc", default="http://127.0.0.1:8545", help="anvil's JSON-RPC URL")
    parser.add_argument("--manifest", required=True, help="deployment manifest (JSON)")
    parser.add_argument("--validators", type=int, default=4, help="committee size n = 3f + 1")
    parser.add_argument("--silent", default="", help="comma-separated validator indices kept down")
    parser.add_argument("--state", default=None,
                        help="anvil's state file: written before every certificate (final implies durable)")
    parser.add_argument("--debug", action="store_true", help="tracebacks in the retry log lines")
    parser.add_argument("--log-format", choices=("text", "json"), default="text",
                        help="log as text lines, or as one JSON object per line")
    telemetry.add_arguments(parser)
    args = parser.parse_args(argv)
    if args.debug:
        os.environ[DEBUG_ENV] = "1"
    if args.log_format == "json":
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(telemetry.JsonFormatter())
        logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    else:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                            stream=sys.stdout, force=True)
    if args.metrics_port is not None:
        host = args.metrics_host or "127.0.0.1"
        log.info("metrics on http://%s:%s/metrics", host, telemetry.serve(args.metrics_port, host))
    silent = [int(x) for x in args.silent.split(",") if x.strip()]
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    log.info("committee of %d beside %s%s; SIGTERM or Ctrl-C stops it", args.validators, args.rpc,
             f", writing {args.state} before each certificate" if args.state else "")
    started = time.monotonic()
    try:
        supervise(args.rpc, load_manifest(args.manifest), stop, n=args.validators, silent=silent,
                  state_file=args.state, on_final=lambda h: log.info("final height %d", h))
    except KeyboardInterrupt:
        pass
    log.info("committee stopped after %.0f s", time.monotonic() - started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
