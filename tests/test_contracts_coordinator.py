"""Coordinator on a real anvil chain: each external function, each revert path, phase timing."""

from __future__ import annotations

import pytest
from eth_utils import keccak

from prismesh.chain.evm.contracts import (
    AlreadyCommitted,
    AlreadyParticipant,
    AlreadyRevealed,
    BatchCallFailed,
    ClientNotApproved,
    ClientStatus,
    CommitDeadlinePassed,
    CommitmentMismatch,
    DuplicateIncluded,
    EmptyBatch,
    EmptyCid,
    EmptyCommitment,
    EmptyContentHash,
    InvalidMetricName,
    InvalidTaskParameter,
    LengthMismatch,
    MetricAlreadyReported,
    NotAggregator,
    NotAuthorizedToFail,
    NotCommitted,
    NotEnoughParticipants,
    NotGovernance,
    NothingToClaim,
    NotParticipant,
    NotRevealed,
    Phase,
    RevealDeadlinePassed,
    ScoreOutOfRange,
    SubmissionStatus,
    TaskFull,
    TaskStatus,
    TooFewIncluded,
    TooManyIncluded,
    UnknownRound,
    UnknownTask,
    UnsortedIncluded,
    WrongGlobalAdapter,
    WrongPhase,
    WrongTaskStatus,
    ZeroSamples,
    make_commitment,
    sort_included,
)
from tests.conftest import (
    ChainEnv,
    commit,
    commit_reveal_all,
    make_update,
    onboard,
    open_task,
    reveal,
    task_params,
)


def test_create_task_stores_params_and_emits(chain_env: ChainEnv) -> None:
    coord = chain_env.coordinator()
    params = task_params(initial_adapter_cid="bafyinitial")
    receipt = coord.create_task(params)
    task = coord.task_id_from(receipt)
    assert task == coord.task_count() == 1
    (ev,) = coord.events_in(receipt, "TaskCreated")
    assert ev.params == params and ev.creator == chain_env.governance.address
    assert coord.get_task_params(task) == params
    state = coord.get_task(task)
    assert state.status is TaskStatus.CREATED and state.global_sha256 == params.initial_adapter_sha256
    assert state.global_cid_hash == keccak(text="bafyinitial")[:16]
    assert coord.global_adapter_cid(task) == "bafyinitial"
    assert state.current_round == 0 and state.participant_count == 0
    assert coord.max_participants() == 32 and coord.metric_scale() == 1_000_000
    assert coord.score_scale() == 1_000_000 and coord.max_phase_duration() == 30 * 24 * 3600
    assert coord.registry_address() == chain_env.manifest.address("Registry")
    assert coord.reward_token_address() == chain_env.manifest.address("RewardToken")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("base_model_id", ""),
        ("hyper_params_cid", ""),
        ("num_rounds", 0),
        ("max_participants", 0),
        ("max_participants", 33),
        ("min_participants", 0),
        ("min_participants", 5),
        ("commit_duration", 0),
        ("reveal_duration", 0),
        ("aggregation_duration", 0),
        ("commit_duration", 30 * 24 * 3600 + 1),
        ("reveal_duration", 2**32 - 1),
        ("aggregation_duration", 2**31),
        ("sample_cap", 0),
        ("reward_budget", 4 * 10 + 3 - 1),
        ("reward_budget", 2**128),
        ("max_failed_rounds", 2**32 - 3),
        ("initial_adapter_sha256", b"\x01" * 32),
    ],
)
def test_create_task_rejects_bad_params(chain_env: ChainEnv, field: str, value: object) -> None:
    with pytest.raises(InvalidTaskParameter) as exc:
        chain_env.coordinator().create_task(task_params(**{field: value}))
    expected = {
        "base_model_id": "baseModelId",
        "hyper_params_cid": "hyperParamsCid",
        "num_rounds": "numRounds",
        "max_participants": "maxParticipants",
        "min_participants": "minParticipants",
        "commit_duration": "commitDuration",
        "reveal_duration": "revealDuration",
        "aggregation_duration": "aggregationDuration",
        "sample_cap": "sampleCap",
        "reward_budget": "rewardBudget",
        "max_failed_rounds": "maxFailedRounds",
        "initial_adapter_sha256": "initialAdapterSha256",
    }[field]
    assert exc.value.args == {"field": expected}


def test_governance_only(chain_env: ChainEnv) -> None:
    task = open_task(chain_env, chain_env.clients[:2], start=False)
    stranger = chain_env.coordinator(chain_env.outsiders[0])
    for call in (
        lambda: stranger.create_task(task_params()),
        lambda: stranger.start_task(task),
        lambda: stranger.cancel_task(task, "no"),
    ):
        with pytest.raises(NotGovernance) as exc:
            call()
        assert exc.value.args == {"account": chain_env.outsiders[0].address}


def test_unknown_task(chain_env: ChainEnv) -> None:
    coord = chain_env.coordinator()
    with pytest.raises(UnknownTask) as exc:
        coord.start_task(7)
    assert exc.value.args == {"taskId": 7}
    with pytest.raises(UnknownTask):
        coord.get_task(7)
    with pytest.raises(UnknownTask):
        coord.with_sender(chain_env.clients[0]).join_task(7)


def test_join_task_paths(chain_env: ChainEnv) -> None:
    a, b, c, d, e = chain_env.clients[:5]
    onboard(chain_env, [a, b, c])
    coord = chain_env.coordinator()
    task = coord.task_id_from(
        coord.create_task(task_params(max_participants=2, min_participants=2))
    )
    receipt = coord.with_sender(a).join_task(task)
    (ev,) = coord.events_in(receipt, "ParticipantJoined")
    assert (ev.client, ev.participant_count) == (a.address, 1)
    with pytest.raises(AlreadyParticipant):
        coord.with_sender(a).join_task(task)
    coord.with_sender(b).join_task(task)
    with pytest.raises(TaskFull) as exc:
        coord.with_sender(c).join_task(task)
    assert exc.value.args["maxParticipants"] == 2
    assert coord.get_participants(task) == [a.address, b.address]
    assert coord.is_participant(task, a.address) and not coord.is_participant(task, c.address)

    # Unregistered, pending, suspended and revoked clients cannot join.
    task2 = coord.task_id_from(coord.create_task(task_params()))
    with pytest.raises(ClientNotApproved) as exc:
        coord.with_sender(d).join_task(task2)
    assert exc.value.args == {"client": d.address, "status": ClientStatus.NONE}
    chain_env.registry(e).register(b"\x01" * 32)
    with pytest.raises(ClientNotApproved) as exc:
        coord.with_sender(e).join_task(task2)
    assert exc.value.args["status"] is ClientStatus.PENDING
    chain_env.registry().suspend(c.address)
    with pytest.raises(ClientNotApproved) as exc:
        coord.with_sender(c).join_task(task2)
    assert exc.value.args["status"] is ClientStatus.SUSPENDED
    chain_env.registry().revoke(c.address)
    with pytest.raises(ClientNotApproved) as exc:
        coord.with_sender(c).join_task(task2)
    assert exc.value.args["status"] is ClientStatus.REVOKED

    coord.start_task(task)
    with pytest.raises(WrongTaskStatus) as exc:
        coord.with_sender(c).join_task(task)
    assert exc.value.args["actual"] is TaskStatus.RUNNING


def test_start_task(chain_env: ChainEnv) -> None:
    clients = chain_env.clients[:2]
    task = open_task(chain_env, clients[:1], start=False, initial_adapter_cid="bafyinit")
    coord = chain_env.coordinator()
    with pytest.raises(NotEnoughParticipants) as exc:
        coord.start_task(task)
    assert exc.value.args == {"taskId": task, "have": 1, "need": 2}
    onboard(chain_env, clients[1:])
    coord.with_sender(clients[1]).join_task(task)
    receipt = coord.start_task(task)
    names = [e.event for e in coord.events_in(receipt)]
    assert names == ["TaskStarted", "RoundOpened"]
    opened = coord.events_in(receipt, "RoundOpened")[0]
    ts = chain_env.devnet.timestamp
    assert (opened.round, opened.global_adapter_cid) == (1, "bafyinit")
    assert opened.commit_deadline == ts + 600 and opened.reveal_deadline == ts + 900
    assert opened.aggregation_deadline == ts + 1500
    info = coord.get_round(task, 1)
    assert (info.opened_at, info.commit_deadline, info.aggregation_deadline) == (ts, ts + 600, ts + 1500)
    assert coord.phase_of(task, 1) is Phase.OPEN
    with pytest.raises(WrongTaskStatus):
        coord.start_task(task)


def test_commit_paths(chain_env: ChainEnv) -> None:
    env = chain_env
    a, b, c = env.clients[:3]
    task = open_task(env, [a, b, c])
    coord = env.coordinator(a)
    ua = make_update(env, a, task, 1)
    with pytest.raises(UnknownRound) as exc:
        commit(env, task, 2, ua)
    assert exc.value.args == {"taskId": task, "round": 2, "currentRound": 1}
    with pytest.raises(EmptyCommitment):
        coord.commit_update(task, 1, b"\x00" * 32)
    with pytest.raises(NotParticipant):
        env.coordinator(env.outsiders[0]).commit_update(task, 1, ua.commitment)
    assert not coord.get_submission(task, 1, a.address).committed

    receipt = commit(env, task, 1, ua)
    evs = coord.events_in(receipt)
    assert [e.event for e in evs] == ["PhaseChanged", "UpdateCommitted"]
    assert (evs[0].previous, evs[0].current) == (Phase.OPEN, Phase.COMMIT)
    assert evs[1].commitment == ua.commitment and evs[1].client == a.address
    sub = coord.get_submission(task, 1, a.address)
    assert sub.commitment == ua.commitment and sub.status is SubmissionStatus.COMMITTED
    assert sub.committed and not sub.revealed
    assert not coord.get_submission(task, 2, a.address).committed
    with pytest.raises(AlreadyCommitted):
        commit(env, task, 1, make_update(env, a, task, 1, num_samples=5))

    env.registry().suspend(b.address)
    with pytest.raises(ClientNotApproved) as exc:
        commit(env, task, 1, make_update(env, b, task, 1))
    assert exc.value.args["status"] is ClientStatus.SUSPENDED
    env.registry().revoke(b.address)
    with pytest.raises(ClientNotApproved) as exc:
        commit(env, task, 1, make_update(env, b, task, 1))
    assert exc.value.args["status"] is ClientStatus.REVOKED

    env.devnet.increase_time(601)
    assert coord.phase_of(task, 1) is Phase.REVEAL
    with pytest.raises(CommitDeadlinePassed) as exc:
        commit(env, task, 1, make_update(env, c, task, 1))
    assert exc.value.args["deadline"] == coord.get_round(task, 1).commit_deadline


def test_last_commit_moves_to_reveal_early(chain_env: ChainEnv) -> None:
    a, b = chain_env.clients[:2]
    task = open_task(chain_env, [a, b])
    coord = chain_env.coordinator()
    commit(chain_env, task, 1, make_update(chain_env, a, task, 1))
    assert coord.phase_of(task, 1) is Phase.COMMIT
    receipt = commit(chain_env, task, 1, make_update(chain_env, b, task, 1))
    changes = coord.events_in(receipt, "PhaseChanged")
    assert [(e.previous, e.current) for e in changes] == [(Phase.COMMIT, Phase.REVEAL)]
    assert coord.get_task(task).phase is Phase.REVEAL


def test_reveal_paths(chain_env: ChainEnv) -> None:
    env = chain_env
    a, b, c = env.clients[:3]
    task = open_task(env, [a, b, c])
    coord = env.coordinator()
    ua, ub = make_update(env, a, task, 1), make_update(env, b, task, 1)
    commit(env, task, 1, ua)
    with pytest.raises(WrongPhase) as exc:
        reveal(env, task, 1, ua)
    assert exc.value.args["expected"] is Phase.REVEAL and exc.value.args["actual"] is Phase.COMMIT
    commit(env, task, 1, ub)
    zero = make_update(env, c, task, 1, num_samples=0)
    commit(env, task, 1, zero)  # everyone committed: Reveal opens early
    assert coord.phase_of(task, 1) is Phase.REVEAL

    with pytest.raises(ZeroSamples):
        reveal(env, task, 1, zero)
    with pytest.raises(EmptyCid):
        reveal(env, task, 1, zero.but(cid="", num_samples=3))
    with pytest.raises(EmptyContentHash):
        reveal(env, task, 1, zero.but(sha256=b"\x00" * 32, num_samples=3))
    with pytest.raises(NotParticipant):
        reveal(env, task, 1, make_update(env, env.outsiders[0], task, 1))
    wrong = ua.but(num_samples=ua.num_samples + 1)
    with pytest.raises(CommitmentMismatch) as exc:
        reveal(env, task, 1, wrong)
    assert exc.value.args["expected"] == ua.commitment and exc.value.args["actual"] == wrong.commitment
    with pytest.raises(CommitmentMismatch):  # b replays a's values
        reveal(env, task, 1, ua.but(client=b))

    receipt = reveal(env, task, 1, ua)
    (ev,) = coord.events_in(receipt, "UpdateRevealed")
    assert (ev.cid, ev.sha256, ev.num_samples) == (ua.cid, ua.sha256, ua.num_samples)
    sub = coord.get_submission(task, 1, a.address)
    assert sub.revealed and not sub.accepted and sub.num_samples == ua.num_samples
    assert coord.revealed_in(task, ua.sha256) == 1 and coord.revealed_in(task, ub.sha256) == 0
    with pytest.raises(AlreadyRevealed):
        reveal(env, task, 1, ua)

    env.registry().suspend(b.address)
    with pytest.raises(ClientNotApproved):
        reveal(env, task, 1, ub)
    env.registry().approve(b.address)

    env.devnet.increase_time(901)
    assert coord.phase_of(task, 1) is Phase.AGGREGATING
    with pytest.raises(RevealDeadlinePassed):
        reveal(env, task, 1, ub)


def test_not_committed_reveal(chain_env: ChainEnv) -> None:
    a, b, c = chain_env.clients[:3]
    task = open_task(chain_env, [a, b, c])
    commit(chain_env, task, 1, make_update(chain_env, a, task, 1))
    chain_env.devnet.increase_time(601)
    with pytest.raises(NotCommitted) as exc:
        reveal(chain_env, task, 1, make_update(chain_env, b, task, 1))
    assert exc.value.args == {"taskId": task, "round": 1, "client": b.address}


def test_aggregate_as_soon_as_all_revealed(chain_env: ChainEnv) -> None:
    env = chain_env
    clients = env.clients[:3]
    task = open_task(env, clients)
    coord = env.coordinator(env.aggregator)
    ups = [make_update(env, c, task, 1) for c in clients]
    for u in ups:
        commit(env, task, 1, u)
    for u in ups[:2]:
        reveal(env, task, 1, u)
    included = sort_included(c.address for c in clients)
    with pytest.raises(WrongPhase) as exc:
        coord.submit_aggregate(task, 1, "bafyagg", b"\x07" * 32, included[:2])
    assert exc.value.args["actual"] is Phase.REVEAL
    receipt = reveal(env, task, 1, ups[2])
    assert coord.events_in(receipt, "PhaseChanged")[0].current is Phase.AGGREGATING
    receipt = coord.submit_aggregate(task, 1, "bafyagg", b"\x07" * 32, included)
    (acc,) = coord.events_in(receipt, "AggregateAccepted")
    assert acc.included == included and acc.aggregate_cid == "bafyagg"
    assert acc.aggregator == env.aggregator.address
    assert coord.included(task, 1) == included
    assert all(coord.get_submission(task, 1, c).accepted for c in included)
    (opened,) = coord.get_events("RoundOpened", 0, taskId=task, round=1)
    assert env.devnet.timestamp < opened.commit_deadline  # no deadline had to pass


def test_aggregate_after_reveal_deadline_with_partial_reveals(chain_env: ChainEnv) -> None:
    env = chain_env
    a, b, c = env.clients[:3]
    task = open_task(env, [a, b, c])
    coord = env.coordinator(env.aggregator)
    for cl in (a, b, c):
        commit(env, task, 1, make_update(env, cl, task, 1))
    for cl in (a, b):
        reveal(env, task, 1, make_update(env, cl, task, 1))
    env.devnet.increase_time(901)
    with pytest.raises(NotRevealed) as exc:
        coord.submit_aggregate(task, 1, "bafyagg", b"\x07" * 32, [a.address, c.address])
    assert exc.value.args == {"taskId": task, "round": 1, "client": c.address}
    coord.submit_aggregate(task, 1, "bafyagg", b"\x07" * 32, [a.address, b.address])
    assert coord.get_submission(task, 1, a.address).accepted
    assert not coord.get_submission(task, 1, c.address).accepted


def _submit_raw(env: ChainEnv, task: int, rnd: int, included: list[str], scores: list[int],
                cid: str = "bafy", sha: bytes = b"\x01" * 32) -> object:
    """submitAggregate with the lists exactly as given (the typed client would sort them)."""
    coord = env.coordinator(env.aggregator)
    return coord._transact("submitAggregate", task, rnd, cid, sha, included, scores)


def test_aggregate_reverts(chain_env: ChainEnv) -> None:
    env = chain_env
    clients = env.clients[:3]
    task = open_task(env, clients)
    commit_reveal_all(env, task, 1, clients)
    addrs = sort_included(c.address for c in clients)
    full = [1_000_000] * 3
    agg = env.coordinator(env.aggregator)
    with pytest.raises(NotAggregator):
        env.coordinator(env.clients[0]).submit_aggregate(task, 1, "bafy", b"\x01" * 32, addrs)
    with pytest.raises(NotAggregator):
        env.coordinator().submit_aggregate(task, 1, "bafy", b"\x01" * 32, addrs)
    with pytest.raises(EmptyCid):
        agg.submit_aggregate(task, 1, "", b"\x01" * 32, addrs)
    with pytest.raises(EmptyContentHash):
        agg.submit_aggregate(task, 1, "bafy", b"\x00" * 32, addrs)
    with pytest.raises(DuplicateIncluded) as exc:
        _submit_raw(env, task, 1, [addrs[0], addrs[1], addrs[1]], full)
    assert exc.value.args["client"] == addrs[1]
    with pytest.raises(UnsortedIncluded) as exc:
        _submit_raw(env, task, 1, [addrs[1], addrs[0], addrs[2]], full)
    assert exc.value.args["index"] == 1
    with pytest.raises(LengthMismatch):
        _submit_raw(env, task, 1, addrs, full[:2])
    with pytest.raises(ScoreOutOfRange) as exc:
        _submit_raw(env, task, 1, addrs, [1_000_000, 1_000_001, 0])
    assert exc.value.args == {"client": addrs[1], "score": 1_000_001}
    with pytest.raises(TooFewIncluded) as exc:
        agg.submit_aggregate(task, 1, "bafy", b"\x01" * 32, addrs[:1])
    assert exc.value.args == {"taskId": task, "round": 1, "included": 1, "minimum": 2}
    with pytest.raises(TooManyIncluded):
        agg.submit_aggregate(task, 1, "bafy", b"\x01" * 32, addrs + [env.outsiders[0].address])
    with pytest.raises(NotRevealed):
        agg.submit_aggregate(task, 1, "bafy", b"\x01" * 32, [addrs[0], env.outsiders[0].address])
    with pytest.raises(UnknownRound):
        agg.submit_aggregate(task, 2, "bafy", b"\x01" * 32, addrs)
    env.registry().suspend(addrs[2])
    with pytest.raises(ClientNotApproved):
        agg.submit_aggregate(task, 1, "bafy", b"\x01" * 32, addrs)
    env.registry().approve(addrs[2])
    agg.submit_aggregate(task, 1, "bafy1", b"\x01" * 32, addrs)


def test_rewards_split_by_score_accrue_and_are_claimed(chain_env: ChainEnv) -> None:
    env = chain_env
    clients = env.clients[:3]
    task = open_task(env, clients, max_participants=3, reward_per_update=100, aggregator_reward=7, reward_budget=400)
    commit_reveal_all(env, task, 1, clients)
    a, b, c = (x.address for x in clients)
    agg = env.coordinator(env.aggregator)
    receipt = agg.submit_aggregate(task, 1, "bafy1", b"\x01" * 32, {a: 600_000, b: 300_000, c: 0})
    earned = {e.recipient: (e.score, e.amount, e.is_aggregator) for e in agg.events_in(receipt, "RewardEarned")}
    # A pool of 3 * 100, split 2:1:0 by score; the aggregator's fee on top.
    assert earned == {a: (600_000, 200, False), b: (300_000, 100, False), c: (0, 0, False),
                      env.aggregator.address: (0, 7, True)}
    coord = env.coordinator()
    assert coord.rewards_owed(task, a) == 200 and coord.fees_owed(env.aggregator.address) == 7
    assert coord.get_task(task).rewards_paid == 307
    token = env.token()
    assert token.total_supply() == 0  # credited, not minted yet

    # Round 2: the budget left (93) caps the pool; scores that all are zero pay no client.
    commit_reveal_all(env, task, 2, clients)
    receipt = agg.submit_aggregate(task, 2, "bafy2", b"\x02" * 32, {a: 1, b: 1, c: 1})
    amounts = {e.recipient: e.amount for e in agg.events_in(receipt, "RewardEarned")}
    assert amounts == {a: 31, b: 31, c: 31, env.aggregator.address: 0}
    assert coord.get_task(task).rewards_paid == 400
    commit_reveal_all(env, task, 3, clients)
    receipt = agg.submit_aggregate(task, 3, "bafy3", b"\x03" * 32, {a: 0, b: 0, c: 0})
    assert sum(e.amount for e in agg.events_in(receipt, "RewardEarned")) == 0
    assert coord.get_task(task).status is TaskStatus.COMPLETED

    receipt = env.coordinator(clients[0]).claim_rewards(task)
    (ev,) = coord.events_in(receipt, "RewardsClaimed")
    assert (ev.account, ev.amount) == (a, 231) and token.balance_of(a) == 231
    assert coord.rewards_owed(task, a) == 0
    with pytest.raises(NothingToClaim):
        env.coordinator(clients[0]).claim_rewards(task)
    with pytest.raises(NothingToClaim):
        env.coordinator(env.outsiders[0]).claim_rewards(task)
    receipt = env.coordinator(env.aggregator).claim_fees()
    assert coord.events_in(receipt, "FeesClaimed")[0].amount == 7
    with pytest.raises(NothingToClaim):
        env.coordinator(env.aggregator).claim_fees()
    env.coordinator(clients[1]).claim_rewards(task)
    env.coordinator(clients[2]).claim_rewards(task)
    assert token.total_supply() == 400 == coord.get_task(task).rewards_paid


def test_fail_round_retries_then_fails_task(chain_env: ChainEnv) -> None:
    env = chain_env
    a, b, c = env.clients[:3]
    task = open_task(env, [a, b, c], max_failed_rounds=1, initial_adapter_cid="bafyinit")
    coord = env.coordinator()
    outsider = env.coordinator(env.outsiders[0])
    with pytest.raises(WrongPhase):
        outsider.fail_round(task, 1, "too early")
    commit(env, task, 1, make_update(env, a, task, 1))
    reveal_later = make_update(env, b, task, 1)
    commit(env, task, 1, reveal_later)
    env.devnet.increase_time(601)
    reveal(env, task, 1, make_update(env, a, task, 1))
    reveal(env, task, 1, reveal_later)  # all committers revealed: Aggregating, 2 >= min
    with pytest.raises(NotAuthorizedToFail) as exc:
        outsider.fail_round(task, 1, "viable round")
    assert exc.value.args["aggregationDeadline"] == coord.get_round(task, 1).aggregation_deadline
    with pytest.raises(WrongGlobalAdapter):
        env.coordinator(env.aggregator).fail_round(task, 1, "wrong cid", "bafyother")
    receipt = env.coordinator(env.aggregator).fail_round(task, 1, "updates failed verification")
    names = [e.event for e in coord.events_in(receipt)]
    assert names == ["PhaseChanged", "RoundFailed", "RoundOpened"]
    reopened = coord.events_in(receipt, "RoundOpened")[0]
    assert (reopened.round, reopened.global_adapter_cid) == (2, "bafyinit")
    assert coord.events_in(receipt, "RoundFailed")[0].reason == "updates failed verification"
    assert coord.phase_of(task, 1) is Phase.FAILED and coord.get_round(task, 1).phase is Phase.FAILED

    # Round 2: nobody commits; after the deadlines anyone may fail it; the task then fails.
    env.devnet.increase_time(901)
    assert coord.phase_of(task, 2) is Phase.AGGREGATING
    receipt = outsider.fail_round(task, 2, "no updates")
    assert [e.event for e in coord.events_in(receipt)][-1] == "TaskFailed"
    state = coord.get_task(task)
    assert state.status is TaskStatus.FAILED and state.failed_rounds == 2
    with pytest.raises(WrongTaskStatus):
        commit(env, task, 2, make_update(env, a, task, 2))


def test_cancel_task(chain_env: ChainEnv) -> None:
    env = chain_env
    a, b = env.clients[:2]
    task = open_task(env, [a, b])
    coord = env.coordinator()
    commit(env, task, 1, make_update(env, a, task, 1))
    receipt = coord.cancel_task(task, "withdrawn")
    assert [e.event for e in coord.events_in(receipt)] == [
        "PhaseChanged",
        "RoundFailed",
        "TaskCancelled",
    ]
    assert coord.get_task(task).status is TaskStatus.CANCELLED
    assert coord.phase_of(task, 1) is Phase.FAILED
    with pytest.raises(WrongTaskStatus):
        coord.cancel_task(task, "again")
    with pytest.raises(WrongTaskStatus):
        commit(env, task, 1, make_update(env, b, task, 1))
    created = open_task(env, [], start=False)
    coord.cancel_task(created, "never started")
    assert coord.get_task(created).status is TaskStatus.CANCELLED


def test_report_metric(chain_env: ChainEnv) -> None:
    a, b = chain_env.clients[:2]
    task = open_task(chain_env, [a, b])
    coord = chain_env.coordinator(a)
    receipt = coord.report_metric(task, 1, "accuracy", 0.734)
    (ev,) = coord.events_in(receipt, "MetricReported")
    assert (ev.client, ev.metric, ev.value) == (a.address, "accuracy", 734_000)
    assert coord.get_metric(task, 1, a.address, "accuracy") == (True, 734_000)
    assert coord.get_metric(task, 1, b.address, "accuracy") == (False, 0)
    coord.report_metric(task, 1, "loss", -12, scaled=True)
    assert coord.get_metric(task, 1, a.address, "loss") == (True, -12)
    with pytest.raises(MetricAlreadyReported):
        coord.report_metric(task, 1, "accuracy", 0.5)
    with pytest.raises(InvalidMetricName):
        coord.report_metric(task, 1, "", 0.5)
    with pytest.raises(InvalidMetricName):
        coord.report_metric(task, 1, "x" * 33, 0.5)
    with pytest.raises(UnknownRound):
        coord.report_metric(task, 2, "accuracy", 0.5)
    with pytest.raises(NotParticipant):
        chain_env.coordinator(chain_env.outsiders[0]).report_metric(task, 1, "accuracy", 0.5)


def test_multicall_folds_a_metric_report_into_a_commitment(chain_env: ChainEnv) -> None:
    a, b = chain_env.clients[:2]
    task = open_task(chain_env, [a, b])
    coord = chain_env.coordinator(a)
    upd_a, upd_b = make_update(chain_env, a, task, 1), make_update(chain_env, b, task, 1)
    receipt = coord.send_calls([coord.metric_call(task, 1, "accuracy", 0.5),
                                ("commitUpdate", (task, 1, upd_a.commitment))])
    (metric,) = coord.events_in(receipt, "MetricReported")
    (committed,) = coord.events_in(receipt, "UpdateCommitted")
    # Each call ran as the sender, with that function's own checks.
    assert metric.client == committed.client == a.address
    assert coord.get_metric(task, 1, a.address, "accuracy") == (True, 500_000)
    assert coord.get_submission(task, 1, a.address).commitment == upd_a.commitment
    # The same two calls sent apart cost more: one more transaction's base cost.
    other = chain_env.coordinator(b)
    apart = other.report_metric(task, 1, "accuracy", 0.5).gasUsed
    apart += commit(chain_env, task, 1, upd_b).gasUsed
    assert receipt.gasUsed < apart - 15_000


def test_multicall_is_atomic_and_grants_nothing(chain_env: ChainEnv) -> None:
    a, b = chain_env.clients[:2]
    task = open_task(chain_env, [a, b])
    coord = chain_env.coordinator(a)
    coord.report_metric(task, 1, "accuracy", 0.5)
    upd = make_update(chain_env, a, task, 1)
    # A later call's revert undoes the earlier ones and surfaces as that call's own error.
    with pytest.raises(MetricAlreadyReported) as err:
        coord.send_calls([("commitUpdate", (task, 1, upd.commitment)), coord.metric_call(task, 1, "accuracy", 0.7)])
    assert err.value.args["client"] == a.address
    assert coord.get_submission(task, 1, a.address).status is SubmissionStatus.NONE
    # A batch carries the caller's identity into every call: no governance, aggregator or
    # membership rights come with it.
    with pytest.raises(NotGovernance) as gov:
        coord.send_calls([coord.metric_call(task, 1, "loss", 1), ("cancelTask", (task, "batched"))])
    assert gov.value.args["account"] == a.address
    with pytest.raises(NotAggregator):
        coord.send_calls([coord.metric_call(task, 1, "loss", 1),
                          ("submitAggregate", (task, 1, "bafyagg", b"\x01" * 32, [a.address], [1]))])
    outsider = chain_env.coordinator(chain_env.outsiders[0])
    with pytest.raises(NotParticipant):
        outsider.send_calls([outsider.metric_call(task, 1, "loss", 1), ("commitUpdate", (task, 1, upd.commitment))])
    assert coord.get_task(task).status is TaskStatus.RUNNING
    assert coord.get_metric(task, 1, a.address, "loss") == (False, 0)
    # Malformed batches are named.
    with pytest.raises(EmptyBatch):
        coord.multicall([])
    with pytest.raises(BatchCallFailed) as unknown:
        coord._transact("multicall", [bytes.fromhex(coord._calldata(*coord.metric_call(task, 1, "loss", 1))[2:]),
                                      bytes.fromhex("deadbeef")])
    assert unknown.value.args["index"] == 1
    # The error of a batch names the functions it carried.
    assert err.value.function == "commitUpdate+reportMetric"
    with pytest.raises(ValueError, match="at least one call"):
        coord.send_calls([])


def test_commitment_helper_matches_contract(chain_env: ChainEnv) -> None:
    coord = chain_env.coordinator()
    sender = chain_env.clients[0].address
    chain, where = chain_env.devnet.chain_id, coord.address
    sha, salt = b"\xaa" * 32, b"\xbb" * 32
    for cid, n in (("bafyshort", 1), ("bafy" + "x" * 100, 2**32 - 1)):
        assert coord.compute_commitment(7, 3, sender, cid, sha, n, salt) == make_commitment(
            chain, where, 7, 3, sender, cid, sha, n, salt
        )
    base = make_commitment(chain, where, 7, 3, sender, "a", sha, 1, salt)
    # Every bound field changes the commitment: chain, deployment, task, round, sender.
    assert len({
        base,
        make_commitment(chain + 1, where, 7, 3, sender, "a", sha, 1, salt),
        make_commitment(chain, chain_env.manifest.address("Registry"), 7, 3, sender, "a", sha, 1, salt),
        make_commitment(chain, where, 8, 3, sender, "a", sha, 1, salt),
        make_commitment(chain, where, 7, 4, sender, "a", sha, 1, salt),
        make_commitment(chain, where, 7, 3, chain_env.clients[1].address, "a", sha, 1, salt),
    }) == 6
    with pytest.raises(ValueError, match="sha256 must be 32 bytes"):
        make_commitment(chain, where, 7, 3, sender, "a", b"\x01", 1, salt)
