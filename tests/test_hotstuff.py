"""Chained HotStuff rules: QC validity, vote rule, lock, three-chain commit, pacemaker bounds."""

from __future__ import annotations

import pytest

from prismesh.chain.finality.committee import SimConfig, SimLedger, check_safety, simulate
from prismesh.chain.finality.gadget import generate_validator_keys, verify_vote_signature
from prismesh.chain.finality.hotstuff import (
    QC,
    ChainRef,
    Committed,
    Node,
    Proposal,
    Replica,
    Send,
    ValidatorSet,
    Vote,
    genesis_node,
    genesis_qc,
    vote_digest,
)
from prismesh.chain.finality.transport import NetworkConditions, Partition, SimNetwork

KEYS = generate_validator_keys(4, seed=1)
DOMAIN = b"\x11" * 32


def _vset() -> ValidatorSet:
    return ValidatorSet(tuple(k.public_key for k in KEYS), verify_vote_signature, DOMAIN)


def _qc(view: int, node: Node, signers: list[int]) -> QC:
    digest = vote_digest(DOMAIN, view, node.node_id)
    return QC(view, node.node_id, tuple((i, KEYS[i].sign_vote(digest)) for i in signers))


def _setup(index: int = 1) -> tuple[Replica, SimLedger, Node]:
    ledger = SimLedger(7)
    genesis = genesis_node(ledger.genesis)
    return Replica(index, KEYS[index], _vset(), genesis, ledger), ledger, genesis


def _chain(ledger: SimLedger, genesis: Node, views: list[int]) -> list[Node]:
    """Nodes at ``views``, each extending the previous with a fresh block and certified by 0..2."""
    nodes = [genesis]
    qc = genesis_qc(genesis)
    for v in views:
        parent = nodes[-1]
        node = Node(v, parent.node_id, ledger.grow(0.0), qc, v % 4)
        nodes.append(node)
        qc = _qc(v, node, [0, 2, 3])
    return nodes[1:]


def test_committee_size_must_be_3f_plus_1() -> None:
    with pytest.raises(ValueError, match="3f \\+ 1"):
        ValidatorSet(tuple(k.public_key for k in KEYS[:3]), verify_vote_signature)


def test_vote_signatures_are_low_s_and_both_forms_of_a_valid_one_count() -> None:
    """Votes are signed by libsecp256k1 (always the low-s form); a valid high-s signature of
    the same vote (OpenSSL's other form, from an older or another signer) counts too; a
    signature of another digest, by another key, or not DER does not."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, utils
    from cryptography.hazmat.primitives.asymmetric.utils import (
        decode_dss_signature,
        encode_dss_signature,
    )

    order = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
    digest = vote_digest(DOMAIN, 3, b"\x22" * 32)
    key = KEYS[0]
    sig = key.sign_vote(digest)
    r, s = decode_dss_signature(sig)
    assert s <= order // 2 and sig == key.sign_vote(digest)  # low s, deterministic (RFC 6979)
    high = encode_dss_signature(r, order - s)
    assert verify_vote_signature(key.public_key, digest, sig)
    assert verify_vote_signature(key.public_key, digest, high)
    openssl = ec.derive_private_key(int.from_bytes(key.private_key, "big"), ec.SECP256K1())
    assert verify_vote_signature(key.public_key, digest, openssl.sign(digest, ec.ECDSA(utils.Prehashed(hashes.SHA256()))))
    assert not verify_vote_signature(key.public_key, vote_digest(DOMAIN, 4, b"\x22" * 32), sig)
    assert not verify_vote_signature(KEYS[1].public_key, digest, sig)
    assert not verify_vote_signature(key.public_key, digest, sig[:-1])
    assert not verify_vote_signature(key.public_key[:-1], digest, sig)
    with pytest.raises(ValueError, match="32 bytes"):
        key.sign_vote(digest[:31])


def test_qc_needs_quorum_of_distinct_valid_signatures() -> None:
    rep, ledger, genesis = _setup()
    node = _chain(ledger, genesis, [1])[0]
    assert rep._qc_valid(_qc(1, node, [0, 2, 3]))
    assert not rep._qc_valid(_qc(1, node, [0, 2]))  # too few
    dup = _qc(1, node, [0, 2])
    assert not rep._qc_valid(QC(1, node.node_id, dup.signatures + (dup.signatures[0],)))
    forged = _qc(1, node, [0, 2, 3])
    swapped = ((0, forged.signatures[1][1]),) + forged.signatures[1:]
    assert not rep._qc_valid(QC(1, node.node_id, swapped))  # signature of 2 claimed as 0
    wrong_view = _qc(2, node, [0, 2, 3])
    assert not rep._qc_valid(QC(1, node.node_id, wrong_view.signatures))
    assert not rep._qc_valid(QC(0, node.node_id))  # only genesis has an empty QC


def test_votes_once_per_view_and_only_for_the_leader() -> None:
    rep, ledger, genesis = _setup(index=2)
    rep.start()
    node = Node(1, genesis.node_id, ledger.grow(0.0), genesis_qc(genesis), 1)
    out = rep.on_message(1, Proposal(node))
    votes = [a.message for a in out if isinstance(a, Send) and isinstance(a.message, Vote)]
    assert len(votes) == 1 and votes[0].view == 1 and votes[0].node_id == node.node_id
    # An equivocating second proposal in the same view gets no vote.
    other = Node(1, genesis.node_id, ledger.fork(ledger.genesis), genesis_qc(genesis), 1)
    out = rep.on_message(1, Proposal(other))
    assert not [a for a in out if isinstance(a, Send) and isinstance(a.message, Vote)]
    # A proposal from a validator that does not lead the view is ignored.
    rep2, ledger2, genesis2 = _setup(index=2)
    rep2.start()
    bad = Node(1, genesis2.node_id, ledger2.grow(0.0), genesis_qc(genesis2), 3)
    assert rep2.on_message(3, Proposal(bad)) == []


def test_no_vote_for_payload_that_does_not_extend_the_parent() -> None:
    rep, ledger, genesis = _setup(index=2)
    rep.start()
    unknown = ChainRef(1, b"\x99" * 32)
    node = Node(1, genesis.node_id, unknown, genesis_qc(genesis), 1)
    out = rep.on_message(1, Proposal(node))
    assert not [a for a in out if isinstance(a, Send) and isinstance(a.message, Vote)]


def test_three_chain_commits_with_consecutive_views_only() -> None:
    rep, ledger, genesis = _setup()
    b1, b2, b3 = _chain(ledger, genesis, [1, 2, 3])
    out = []
    for node in (b1, b2, b3):
        rep.nodes[node.node_id] = node
    rep._update(_qc(3, b3, [0, 2, 3]), out)
    assert rep.locked == b2
    assert rep.committed == b1
    assert any(isinstance(a, Committed) and a.nodes == (b1,) for a in out)

    rep2, ledger2, genesis2 = _setup()
    c1, c2, c4 = _chain(ledger2, genesis2, [1, 2, 4])  # a gap between 2 and 4: no direct link
    for node in (c1, c2, c4):
        rep2.nodes[node.node_id] = node
    rep2._update(_qc(4, c4, [0, 2, 3]), [])
    assert rep2.locked == c2
    assert rep2.committed == genesis2


def test_lock_blocks_conflicting_proposal_without_newer_qc() -> None:
    rep, ledger, genesis = _setup(index=2)
    b1, b2, b3 = _chain(ledger, genesis, [1, 2, 3])
    for node in (b1, b2, b3):
        rep.nodes[node.node_id] = node
    rep._update(_qc(3, b3, [0, 2, 3]), [])
    assert rep.locked == b2
    fork_payload = ledger.fork(b1.payload)
    stale = Node(5, b1.node_id, fork_payload, _qc(1, b1, [0, 2, 3]), 1)
    rep.nodes[stale.node_id] = stale
    assert not rep.safe_node(stale)  # conflicts with the lock and carries an older QC
    newer = Node(5, b3.node_id, ledger.grow(0.0), _qc(3, b3, [0, 2, 3]), 1)
    rep.nodes[newer.node_id] = newer
    assert rep.safe_node(newer)


def test_no_faults_every_block_final_within_bounded_views() -> None:
    """The stated bound, with no faults and delays below the timeout: no view ever times out; a
    replica commits the node of view v at the latest while it handles the proposal of view v + 3
    (which carries the QC of v + 2), so its view right after the commit is at most v + 4; a block
    rides in the first proposal after it is mined, so it is final at every replica before that
    replica's view exceeds (first view begun after the block was mined) + 4."""
    result = simulate(SimConfig(n=4, seed=3, duration=12.0, block_interval=0.37))
    check_safety(result)
    assert all(r._sent_new_view == 0 for r in result.replicas), "a view timed out"
    assert result.commits
    for rec in result.commits:
        assert rec.replica_view - rec.node.view <= 4, (rec.node.view, rec.replica_view)
    # Blocks: the first view entered after a block is mined, plus 3, bounds its finality.
    first_commit: dict[int, float] = {}
    for rec in result.commits:
        first_commit.setdefault(rec.node.payload.height, rec.time)
    ep0_views = [(v.time, v.view) for v in result.views if v.endpoint == 0]
    final_heights = sorted(first_commit)
    checked = 0
    for block_hash, height in result.ledger.height_of.items():
        made = result.ledger.created_at[block_hash]
        later = [view for t, view in ep0_views if t >= made]
        if height == 0 or len(later) < 5:
            continue
        deadline_view = later[0] + 4
        final_by = min(h for h in final_heights if h >= height)
        commit_time = first_commit[final_by]
        view_then = max(view for t, view in ep0_views if t <= commit_time)
        assert view_then <= deadline_view, (height, view_then, deadline_view)
        checked += 1
    assert checked >= 20
    # Finality kept pace with the chain.
    assert result.min_honest_final_height() >= result.ledger.head.height - 2


def test_f_plus_one_silent_stalls_then_resumes() -> None:
    cfg = SimConfig(
        n=4,
        seed=11,
        duration=30.0,
        silent_windows={2: (5.0, 15.0), 3: (5.0, 15.0)},
        block_interval=0.5,
    )
    result = simulate(cfg)
    check_safety(result)
    live = [0, 1]
    during = [c for c in result.commits if c.endpoint in live and 6.5 <= c.time < 15.0]
    assert during == [], "a commit happened with f + 1 validators down"
    before = max(c.node.payload.height for c in result.commits if c.time < 5.0 and c.endpoint in live)
    after = min(result.final_height(ep) for ep in range(4))
    assert after > before + 10, (before, after)
    assert after >= result.height_at(20.0)


def test_schedules_replay_exactly_from_their_seed() -> None:
    cfg = dict(n=4, seed=5, duration=8.0, gst=3.0, faults={1: "byzantine"})
    a, b = simulate(SimConfig(**cfg)), simulate(SimConfig(**cfg))
    assert [(c.time, c.endpoint, c.node.node_id) for c in a.commits] == [
        (c.time, c.endpoint, c.node.node_id) for c in b.commits
    ]
    c = simulate(SimConfig(**{**cfg, "seed": 6}))
    assert [x.node.node_id for x in c.commits] != [x.node.node_id for x in a.commits]


def test_network_drops_delays_and_partitions_are_seeded() -> None:
    cond = NetworkConditions(0.1, 0.5, drop_rate=0.5, duplicate_rate=0.2)
    part = Partition(1.0, 2.0, (frozenset({0, 1}), frozenset({2, 3})))
    runs = []
    for _ in range(2):
        net = SimNetwork(42, cond, partitions=[part])
        runs.append([tuple(net.transit(s, d, t * 0.1)) for t in range(40) for s in range(4) for d in range(4)])
    assert runs[0] == runs[1]
    net = SimNetwork(42, cond, partitions=[part])
    assert net.transit(0, 2, 1.5) == []  # across the partition
    arrivals = [a for t in range(200) for a in net.transit(0, 1, 0.0)]
    assert 0 < len(arrivals) < 300
    assert all(0.1 <= a <= 0.5 for a in arrivals)
    assert len(set(arrivals)) == len(arrivals)  # random delays: messages overtake each other
    with pytest.raises(ValueError, match="drop_rate"):
        NetworkConditions(drop_rate=1.5)
