"""Chained HotStuff consensus rules, and nothing else.

This module is meant to be read side by side with the HotStuff paper (Yin et al., PODC 2019,
"HotStuff: BFT Consensus with Linearity and Responsiveness"), section 5 (chained HotStuff) and
its event-driven form (Algorithms 4 and 5). Names follow the paper where they can:

* A *node* is a proposal in the tree of proposals (the paper's "node", not an EVM block). Each
  node carries a ``payload``: a reference ``(height, hash)`` to a real block of the devnet chain.
  A node extends its parent's payload, so the committed nodes order (and finalize) chain blocks.
* ``justify`` is the quorum certificate (QC) a node carries; a QC holds ``2f + 1`` distinct
  validator signatures over ``(domain, view, node id)``.
* ``locked`` is the paper's ``b_lock``; ``high_qc`` its ``qc_high``; ``last_voted_view`` its
  ``vheight`` (views of votes strictly increase).

The rules, each in one place below:

* **Vote rule** (:meth:`Replica._on_proposal`): vote for a node of view ``v`` only if ``v`` is
  greater than every view voted before, the proposal comes from the leader of ``v``, the payload
  extends the parent's payload on the chain, and ``safe_node`` holds: the node extends the locked
  node, *or* its justify QC is newer (higher view) than the locked node.
* **Update** on every newly seen QC (:meth:`Replica._update`): with ``b'' = qc.node``,
  ``b' = b''.justify.node`` and ``b = b'.justify.node``: raise ``high_qc``; lock ``b'`` if it is
  newer than the lock (two-chain); commit ``b`` and its ancestors if ``b'' -> b' -> b`` are
  *direct* parent links, i.e. parent links with consecutive views (three-chain). Consecutive
  views are what the paper obtains with dummy nodes; without them a parent-link-only rule is
  unsafe when locks and votes are compared by view.
* **Proposals** (:meth:`Replica.propose`): a leader extends the node of its ``high_qc`` (so
  ``parent == justify.node``) with the newest chain block that extends the parent's payload.
* **Pacemaker**: the leader of view ``v`` is ``v mod n``. Votes are broadcast, so every replica
  forms QCs and a commit needs only three consecutive honest leaders. A replica enters ``v + 1``
  on a QC for ``v``; on a local timeout it broadcasts ``NewView(v + 1, high_qc)``; ``f + 1``
  NewViews for a higher view make it join (so correct replicas synchronize), ``2f + 1`` make it
  enter. The leader of ``v`` proposes once it holds a QC for ``v - 1`` or ``2f + 1`` NewViews for
  ``v`` (taking the highest QC they carry). Timeouts double after each failed view (capped).

Replicas are pure state machines: every input returns a list of actions (:class:`Send`,
:class:`SetTimer`, :class:`ProposeReady`, :class:`Committed`) that a driver executes, so the same
code runs in the seeded simulation and beside the real chain.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from eth_utils import keccak

ZERO_ID = b"\x00" * 32
GENESIS_VIEW = 0
_NODE_TAG = keccak(b"PrisMesh.HotStuff.Node.v1")
_VOTE_TAG = keccak(b"PrisMesh.HotStuff.Vote.v1")
MAX_FETCH_NODES = 64
MAX_PENDING = 512


class SafetyViolation(AssertionError):
    """Raised when a replica would commit a node that conflicts with one it already committed.

    Under at most f Byzantine validators this can never happen; the simulation tests rely on
    the replica checking it itself rather than trusting the caller to notice.
    """


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class ChainRef:
    """A block of the devnet chain: its height (number) and 32-byte hash."""

    height: int
    block_hash: bytes


@dataclass(frozen=True)
class QC:
    """Quorum certificate: ``2f + 1`` signatures of distinct validators on one node of one view."""

    view: int
    node_id: bytes
    signatures: tuple[tuple[int, bytes], ...] = ()

    def key(self) -> tuple[int, bytes, tuple[tuple[int, bytes], ...]]:
        return (self.view, self.node_id, self.signatures)


@dataclass(frozen=True)
class Node:
    """A proposal in the HotStuff tree. ``node_id`` is the keccak hash of its contents."""

    view: int
    parent_id: bytes
    payload: ChainRef
    justify: QC
    proposer: int
    node_id: bytes = field(init=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "node_id", node_hash(self))


def node_hash(node: Node) -> bytes:
    """The id of a node: a hash over view, parent, payload, justify (view + node) and proposer."""
    return keccak(
        _NODE_TAG
        + node.view.to_bytes(8, "big")
        + node.parent_id
        + node.payload.height.to_bytes(8, "big")
        + node.payload.block_hash
        + node.justify.view.to_bytes(8, "big")
        + node.justify.node_id
        + (node.proposer % 2**32).to_bytes(4, "big")
    )


def genesis_node(payload: ChainRef) -> Node:
    """The root every replica starts from; it is committed by definition."""
    return Node(GENESIS_VIEW, ZERO_ID, payload, QC(GENESIS_VIEW, ZERO_ID), -1)


def genesis_qc(genesis: Node) -> QC:
    """The certificate for the genesis node; it carries no signatures and is valid only for it."""
    return QC(GENESIS_VIEW, genesis.node_id)


@functools.lru_cache(maxsize=1 << 14)
def vote_digest(domain: bytes, view: int, node_id: bytes) -> bytes:
    """What a validator signs when it votes: domain-separated by committee and view."""
    return keccak(_VOTE_TAG + domain + view.to_bytes(8, "big") + node_id)


# --------------------------------------------------------------------------- messages


@dataclass(frozen=True)
class Proposal:
    node: Node


@dataclass(frozen=True)
class Vote:
    view: int
    node_id: bytes
    voter: int
    signature: bytes


@dataclass(frozen=True)
class NewView:
    """Pacemaker message: the sender gave up on ``view - 1`` and carries its highest QC."""

    view: int
    high_qc: QC


@dataclass(frozen=True)
class FetchRequest:
    node_ids: tuple[bytes, ...]


@dataclass(frozen=True)
class FetchResponse:
    nodes: tuple[Node, ...]


@dataclass(frozen=True)
class _LearnQC:
    """Internal: a QC formed from votes whose node had to be fetched first."""

    qc: QC


Message = Proposal | Vote | NewView | FetchRequest | FetchResponse


# --------------------------------------------------------------------------- actions


@dataclass(frozen=True)
class Send:
    """Send ``message`` to validator ``to``, or to every other validator when ``to`` is None."""

    to: int | None
    message: Message


@dataclass(frozen=True)
class SetTimer:
    """Call :meth:`Replica.on_timer` with ``view`` after ``duration`` seconds."""

    view: int
    duration: float


@dataclass(frozen=True)
class ProposeReady:
    """This replica leads ``view`` and may now call :meth:`Replica.propose` (drivers pace it)."""

    view: int


@dataclass(frozen=True)
class Committed:
    """Nodes newly committed by the three-chain rule, oldest first."""

    nodes: tuple[Node, ...]


Action = Send | SetTimer | ProposeReady | Committed


# --------------------------------------------------------------------------- environment


class Ledger(Protocol):
    """The replica's view of the real chain (payload validation and the leader's choice)."""

    def extends(self, ancestor: ChainRef, descendant: ChainRef) -> bool:
        """True if ``descendant`` is a known block equal to or descending from ``ancestor``."""
        ...

    def tip_extending(self, base: ChainRef) -> ChainRef:
        """The newest known block that extends ``base`` (``base`` itself if none is newer)."""
        ...


class VoteSigner(Protocol):
    def sign_vote(self, digest: bytes) -> bytes: ...


VerifyFn = Callable[[bytes, bytes, bytes], bool]
"""``verify(public_key, digest, signature) -> bool``."""


@dataclass(frozen=True)
class ValidatorSet:
    """The committee: public keys in index order, and the signature check to use for votes."""

    public_keys: tuple[bytes, ...]
    verify: VerifyFn
    domain: bytes = ZERO_ID

    def __post_init__(self) -> None:
        n = len(self.public_keys)
        if n < 1 or (n - 1) % 3 != 0:
            raise ValueError(f"committee size must be n = 3f + 1 (1, 4, 7, ...), got n = {n}")

    @property
    def n(self) -> int:
        return len(self.public_keys)

    @property
    def f(self) -> int:
        return (self.n - 1) // 3

    @property
    def quorum(self) -> int:
        return 2 * self.f + 1

    def leader(self, view: int) -> int:
        return view % self.n


@dataclass(frozen=True)
class PacemakerConfig:
    """Timeouts in seconds of the driver's clock; each failed view doubles the next one."""

    base_timeout: float = 1.0
    max_backoff_exponent: int = 6


# --------------------------------------------------------------------------- replica


class Replica:
    """One validator's chained-HotStuff state machine (see the module docstring for the rules)."""

    def __init__(
        self,
        index: int,
        signer: VoteSigner,
        validators: ValidatorSet,
        genesis: Node,
        ledger: Ledger,
        pacemaker: PacemakerConfig | None = None,
        keep_history: int | None = None,
    ) -> None:
        """``keep_history`` bounds memory for long runs: nodes more than that many views below
        the committed node are forgotten (a replica lagging further cannot be helped to catch up
        then), and ``committed_log`` keeps that many entries."""
        if not 0 <= index < validators.n:
            raise ValueError(f"replica index {index} outside the committee of {validators.n}")
        self.index = index
        self.signer = signer
        self.validators = validators
        self.ledger = ledger
        self.pacemaker = pacemaker or PacemakerConfig()
        self.keep_history = keep_history
        self.genesis = genesis
        self.nodes: dict[bytes, Node] = {genesis.node_id: genesis}
        self.view = GENESIS_VIEW
        self.last_voted_view = GENESIS_VIEW
        self.locked: Node = genesis
        self.high_qc: QC = genesis_qc(genesis)
        self.committed: Node = genesis
        self.committed_log: list[Node] = [genesis]
        self._votes: dict[tuple[int, bytes], dict[int, bytes]] = {}
        # Highest NewView view heard from each validator: a NewView for w also gives up on
        # every view below w, so support for view v counts senders whose NewView is >= v.
        self._new_views: dict[int, int] = {}
        self._sent_new_view = GENESIS_VIEW
        self._proposed_views: set[int] = set()
        self._valid_qcs: set[tuple] = {self.high_qc.key()}
        self._pending: list[tuple[int, Message]] = []
        self._missing: set[bytes] = set()
        self._failed_views = 0
        self._announced_view = GENESIS_VIEW
        self._last_sent: list[Message] = []  # this view's proposal and vote, resent on timeout

    # ----------------------------------------------------------------- entry points

    def start(self) -> list[Action]:
        """Enter view 1 (the first view after genesis)."""
        out: list[Action] = []
        self._enter_view(GENESIS_VIEW + 1, out)
        return out

    def on_message(self, sender: int, message: Message) -> list[Action]:
        """Handle one message from validator ``sender`` (channels authenticate the sender)."""
        out: list[Action] = []
        self._dispatch(sender, message, out)
        return out

    def on_timer(self, view: int) -> list[Action]:
        """Pacemaker timeout for ``view``: ask to move on, carrying the highest QC."""
        out: list[Action] = []
        if view != self.view:
            return out
        self._failed_views += 1
        # Resend this view's proposal and vote (lossy links), then ask to move on.
        for message in self._last_sent:
            if getattr(message, "view", None) == self.view or (
                isinstance(message, Proposal) and message.node.view == self.view
            ):
                out.append(Send(None, message))
        self._send_new_view(max(self.view + 1, self._sent_new_view), out)
        if self._missing:
            out.append(Send(None, FetchRequest(tuple(sorted(self._missing)))))
        out.append(SetTimer(self.view, self._timeout()))
        return out

    def propose(self, view: int) -> list[Action]:
        """As leader of ``view``: extend the node of ``high_qc`` with the newest chain block."""
        out: list[Action] = []
        if not self._can_propose(view):
            return out
        self._proposed_views.add(view)
        parent = self.nodes[self.high_qc.node_id]
        payload = self.ledger.tip_extending(parent.payload)
        node = Node(view, parent.node_id, payload, self.high_qc, self.index)
        out.append(Send(None, Proposal(node)))
        self._last_sent = [Proposal(node)]
        self._on_proposal(self.index, node, out)
        return out

    # ----------------------------------------------------------------- queries

    @property
    def committed_payload(self) -> ChainRef:
        return self.committed.payload

    def is_leader(self, view: int) -> bool:
        return self.validators.leader(view) == self.index

    def extends(self, node: Node, ancestor: Node) -> bool:
        """Walk parent links from ``node`` down to ``ancestor``'s view."""
        cur: Node | None = node
        while cur is not None and cur.view > ancestor.view:
            cur = self.nodes.get(cur.parent_id)
        return cur is not None and cur.node_id == ancestor.node_id

    def safe_node(self, node: Node) -> bool:
        """The paper's safeNode predicate: extends the lock, or carries a QC newer than it."""
        return self.extends(node, self.locked) or node.justify.view > self.locked.view

    # ----------------------------------------------------------------- dispatch

    def _dispatch(self, sender: int, message: Message, out: list[Action]) -> None:
        if isinstance(message, Proposal):
            self._on_proposal(sender, message.node, out)
        elif isinstance(message, Vote):
            self._on_vote(sender, message, out)
        elif isinstance(message, NewView):
            self._on_new_view(sender, message, out)
        elif isinstance(message, FetchRequest):
            self._on_fetch_request(sender, message, out)
        elif isinstance(message, FetchResponse):
            self._on_fetch_response(message, out)
        elif isinstance(message, _LearnQC) and message.qc.node_id in self.nodes:
            if self._qc_valid(message.qc):
                self._update(message.qc, out)

    def _on_proposal(self, sender: int, node: Node, out: list[Action]) -> None:
        if sender != self.validators.leader(node.view) or node.proposer != sender:
            return
        if node.view <= node.justify.view or node.parent_id != node.justify.node_id:
            return
        if not self._qc_valid(node.justify):
            return
        if node.parent_id not in self.nodes:
            self._wait_for(sender, Proposal(node), (node.parent_id,), out)
            return
        parent = self.nodes[node.parent_id]
        payload_ok = self.ledger.extends(parent.payload, node.payload)
        known = node.node_id in self.nodes
        self.nodes.setdefault(node.node_id, node)
        self._update(node.justify, out)
        if node.view > self.view:
            self._enter_view(node.view, out)
        # The vote rule.
        if (
            payload_ok
            and node.view == self.view
            and node.view > self.last_voted_view
            and self.safe_node(node)
        ):
            self.last_voted_view = node.view
            digest = vote_digest(self.validators.domain, node.view, node.node_id)
            vote = Vote(node.view, node.node_id, self.index, self.signer.sign_vote(digest))
            out.append(Send(None, vote))
            self._last_sent = [m for m in self._last_sent if isinstance(m, Proposal)] + [vote]
            self._on_vote(self.index, vote, out)
        if not known:
            # Votes may have outrun the proposal, and fetches may have waited for this node.
            self._form_qc(node.view, node.node_id, out)
            if node.node_id in self._missing:
                self._retry_pending(out)

    def _on_vote(self, sender: int, vote: Vote, out: list[Action]) -> None:
        if sender != vote.voter or not 0 <= vote.voter < self.validators.n:
            return
        if vote.view <= self.high_qc.view:
            return
        votes = self._votes.setdefault((vote.view, vote.node_id), {})
        if vote.voter in votes:
            return
        digest = vote_digest(self.validators.domain, vote.view, vote.node_id)
        if not self.validators.verify(
            self.validators.public_keys[vote.voter], digest, vote.signature
        ):
            return
        votes[vote.voter] = vote.signature
        if len(votes) < self.validators.quorum:
            return
        if vote.node_id in self.nodes:
            self._form_qc(vote.view, vote.node_id, out)
        elif len(votes) == self.validators.quorum:
            qc = QC(vote.view, vote.node_id, tuple(sorted(votes.items())))
            self._valid_qcs.add(qc.key())
            self._wait_for(sender, _LearnQC(qc), (vote.node_id,), out)

    def _form_qc(self, view: int, node_id: bytes, out: list[Action]) -> None:
        """If a quorum voted for a known node that is newer than ``high_qc``, certify it."""
        votes = self._votes.get((view, node_id), {})
        if len(votes) < self.validators.quorum or view <= self.high_qc.view:
            return
        qc = QC(view, node_id, tuple(sorted(votes.items()))[: self.validators.quorum])
        self._valid_qcs.add(qc.key())
        self._update(qc, out)

    def _on_new_view(self, sender: int, msg: NewView, out: list[Action]) -> None:
        if not 0 <= sender < self.validators.n or msg.view <= msg.high_qc.view:
            return
        if not self._qc_valid(msg.high_qc):
            return
        if msg.high_qc.node_id not in self.nodes:
            self._wait_for(sender, msg, (msg.high_qc.node_id,), out)
            return
        self._update(msg.high_qc, out)
        if msg.view > self._new_views.get(sender, GENESIS_VIEW):
            self._new_views[sender] = msg.view
        wished = sorted(self._new_views.values(), reverse=True)
        f, quorum = self.validators.f, self.validators.quorum
        # f + 1 validators gave up on views below ``join``: at least one is correct, so join.
        if len(wished) > f and wished[f] > max(self.view, self._sent_new_view):
            self._send_new_view(wished[f], out)
            wished = sorted(self._new_views.values(), reverse=True)
        # 2f + 1 gave up on views below ``enter``: enter it.
        if len(wished) >= quorum and wished[quorum - 1] > self.view:
            self._enter_view(wished[quorum - 1], out)
        self._maybe_ready(out)

    def _on_fetch_request(self, sender: int, msg: FetchRequest, out: list[Action]) -> None:
        found: list[Node] = []
        seen: set[bytes] = set()
        stack = list(msg.node_ids[:MAX_FETCH_NODES])
        while stack and len(found) < MAX_FETCH_NODES:
            node = self.nodes.get(stack.pop())
            if node is None or node.node_id in seen or node.view == GENESIS_VIEW:
                continue
            seen.add(node.node_id)
            found.append(node)
            stack.append(node.parent_id)
        if found:
            out.append(Send(sender, FetchResponse(tuple(sorted(found, key=lambda b: b.view)))))

    def _on_fetch_response(self, msg: FetchResponse, out: list[Action]) -> None:
        added = False
        for node in sorted(msg.nodes[:MAX_FETCH_NODES], key=lambda b: b.view):
            if node.node_id in self.nodes or node.parent_id != node.justify.node_id:
                continue
            if node.view <= node.justify.view or node.parent_id not in self.nodes:
                continue
            if node.node_id != node_hash(node) or not self._qc_valid(node.justify):
                continue
            self._insert(node, out)
            added = True
        if added:
            self._retry_pending(out)

    def _insert(self, node: Node, out: list[Action]) -> None:
        """Store a validated node; certify it if its votes arrived first."""
        if node.node_id in self.nodes:
            return
        self.nodes[node.node_id] = node
        self._form_qc(node.view, node.node_id, out)

    def _retry_pending(self, out: list[Action]) -> None:
        self._missing = {m for m in self._missing if m not in self.nodes}
        pending, self._pending = self._pending, []
        for sender, message in pending:
            self._dispatch(sender, message, out)

    # ----------------------------------------------------------------- the rules

    def _update(self, qc: QC, out: list[Action]) -> None:
        """Process a newly seen QC: raise high_qc, lock on the two-chain, commit the three-chain."""
        if qc.view > self.high_qc.view:
            self.high_qc = qc
            self._failed_views = 0
        b2 = self.nodes.get(qc.node_id)
        b1 = self.nodes.get(b2.justify.node_id) if b2 is not None else None
        b0 = self.nodes.get(b1.justify.node_id) if b1 is not None else None
        if b1 is not None and b1.view > self.locked.view:
            self.locked = b1
        if (
            b0 is not None
            and b2.parent_id == b1.node_id
            and b1.parent_id == b0.node_id
            and b2.view == b1.view + 1
            and b1.view == b0.view + 1
            and b0.view > self.committed.view
        ):
            self._commit(b0, out)
        if qc.view >= self.view:
            self._enter_view(qc.view + 1, out)
        self._maybe_ready(out)

    def _commit(self, node: Node, out: list[Action]) -> None:
        chain: list[Node] = []
        cur: Node | None = node
        while cur is not None and cur.view > self.committed.view:
            chain.append(cur)
            cur = self.nodes.get(cur.parent_id)
        if cur is None or cur.node_id != self.committed.node_id:
            raise SafetyViolation(
                f"replica {self.index}: node of view {node.view} does not extend the committed "
                f"node of view {self.committed.view}"
            )
        chain.reverse()
        for b in chain:
            if not self.ledger.extends(self.committed.payload, b.payload):
                raise SafetyViolation(
                    f"replica {self.index}: committed payload {b.payload} does not extend "
                    f"{self.committed.payload}"
                )
            self.committed = b
            self.committed_log.append(b)
        out.append(Committed(tuple(chain)))
        self._prune()

    # ----------------------------------------------------------------- pacemaker

    def _enter_view(self, view: int, out: list[Action]) -> None:
        if view <= self.view:
            return
        self.view = view
        out.append(SetTimer(view, self._timeout()))
        self._maybe_ready(out)

    def _timeout(self) -> float:
        exp = min(self._failed_views, self.pacemaker.max_backoff_exponent)
        return self.pacemaker.base_timeout * (2**exp)

    def _send_new_view(self, view: int, out: list[Action]) -> None:
        if view < self._sent_new_view:
            return
        self._sent_new_view = view
        out.append(Send(None, NewView(view, self.high_qc)))
        self._new_views[self.index] = view

    def _can_propose(self, view: int) -> bool:
        if view != self.view or not self.is_leader(view) or view in self._proposed_views:
            return False
        if self.high_qc.view == view - 1:
            return True
        support = sum(1 for wished in self._new_views.values() if wished >= view)
        return support >= self.validators.quorum

    def _maybe_ready(self, out: list[Action]) -> None:
        # The QCs carried by NewViews were already adopted by ``_update`` when they arrived.
        if self.view > self._announced_view and self._can_propose(self.view):
            self._announced_view = self.view
            out.append(ProposeReady(self.view))

    # ----------------------------------------------------------------- helpers

    def _qc_valid(self, qc: QC) -> bool:
        key = qc.key()
        if key in self._valid_qcs:
            return True
        if qc.view == GENESIS_VIEW:
            return qc.node_id == self.genesis.node_id and not qc.signatures
        sigs = qc.signatures
        voters = [v for v, _ in sigs]
        if len(set(voters)) != len(voters) or len(voters) < self.validators.quorum:
            return False
        digest = vote_digest(self.validators.domain, qc.view, qc.node_id)
        for voter, sig in sigs:
            if not 0 <= voter < self.validators.n:
                return False
            if not self.validators.verify(self.validators.public_keys[voter], digest, sig):
                return False
        self._valid_qcs.add(key)
        return True

    def _wait_for(
        self, sender: int, message: Message, needed: Sequence[bytes], out: list[Action]
    ) -> None:
        missing = tuple(i for i in needed if i not in self.nodes)
        if len(self._pending) < MAX_PENDING:
            self._pending.append((sender, message))
        new = [m for m in missing if m not in self._missing]
        self._missing.update(missing)
        if new:
            out.append(Send(None, FetchRequest(tuple(new))))

    def _prune(self) -> None:
        """Forget votes and NewViews for views that can no longer matter."""
        floor = self.high_qc.view
        self._votes = {k: v for k, v in self._votes.items() if k[0] > floor}
        self._proposed_views = {v for v in self._proposed_views if v >= self.view}
        if len(self._valid_qcs) > 4096:
            self._valid_qcs = {self.high_qc.key()}
        if self.keep_history is not None and len(self.committed_log) > 2 * self.keep_history:
            floor_view = self.committed.view - self.keep_history
            self.nodes = {k: b for k, b in self.nodes.items() if b.view >= floor_view}
            self.nodes[self.genesis.node_id] = self.genesis
            self.committed_log = self.committed_log[-self.keep_history :]
