"""Coordinator on a real anvil chain: each external function, each revert path, phase timing."""

from __future__ import annotations

import pytest

from prismesh.chain.evm.contracts import (
    AlreadyCommitted,
    AlreadyParticipant,
    AlreadyRevealed,
    ClientNotApproved,
    ClientStatus,
    CommitDeadlinePassed,
    CommitmentMismatch,
    DuplicateIncluded,
    EmptyCid,
    EmptyCommitment,
    InvalidMetricName,
    InvalidTaskParameter,
    MetricAlreadyReported,
    NotAggregator,
    NotAuthorizedToFail,
    NotCommitted,
    NotEnoughParticipants,
    NotGovernance,
    NotParticipant,
    NotRevealed,
    Phase,
    RevealDeadlinePassed,
    RewardBudgetExceeded,
    TaskFull,
    TaskStatus,
    TooFewIncluded,
    TooManyIncluded,
    UnknownRound,
    UnknownTask,
    WrongPhase,
    WrongTaskStatus,
    ZeroSamples,
    make_commitment,
)
from tests.conftest import (
    ChainEnv,
    Update,
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
    assert state.status is TaskStatus.CREATED and state.global_adapter_cid == "bafyinitial"
    assert state.current_round == 0 and state.participant_count == 0
    assert coord.max_participants() == 32 and coord.metric_scale() == 1_000_000
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
        ("reward_per_update", 2**256 // 4),
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
        "reward_per_update": "rewardPerUpdate",
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
    assert coord.phase_of(task, 1) is Phase.OPEN
    with pytest.raises(WrongTaskStatus):
        coord.start_task(task)


def test_commit_paths(chain_env: ChainEnv) -> None:
    a, b, c = chain_env.clients[:3]
    task = open_task(chain_env, [a, b, c])
    coord = chain_env.coordinator(a)
    ua = make_update(a, task, 1)
    with pytest.raises(UnknownRound) as exc:
        commit(chain_env, task, 2, ua)
    assert exc.value.args == {"taskId": task, "round": 2, "currentRound": 1}
    with pytest.raises(EmptyCommitment):
        coord.commit_update(task, 1, b"\x00" * 32)
    with pytest.raises(NotParticipant):
        chain_env.coordinator(chain_env.outsiders[0]).commit_update(task, 1, ua.commitment)

    receipt = commit(chain_env, task, 1, ua)
    evs = coord.events_in(receipt)
    assert [e.event for e in evs] == ["PhaseChanged", "UpdateCommitted"]
    assert (evs[0].previous, evs[0].current) == (Phase.OPEN, Phase.COMMIT)
    assert evs[1].commitment == ua.commitment and evs[1].client == a.address
    sub = coord.get_submission(task, 1, a.address)
    assert sub.commitment == ua.commitment and not sub.revealed
    with pytest.raises(AlreadyCommitted):
        commit(chain_env, task, 1, make_update(a, task, 1, num_samples=5))

    chain_env.registry().suspend(b.address)
    with pytest.raises(ClientNotApproved) as exc:
        commit(chain_env, task, 1, make_update(b, task, 1))
    assert exc.value.args["status"] is ClientStatus.SUSPENDED
    chain_env.registry().revoke(b.address)
    with pytest.raises(ClientNotApproved) as exc:
        commit(chain_env, task, 1, make_update(b, task, 1))
    assert exc.value.args["status"] is ClientStatus.REVOKED

    chain_env.devnet.increase_time(601)
    assert coord.phase_of(task, 1) is Phase.REVEAL
    with pytest.raises(CommitDeadlinePassed) as exc:
        commit(chain_env, task, 1, make_update(c, task, 1))
    assert exc.value.args["deadline"] == coord.get_round(task, 1).commit_deadline


def test_last_commit_moves_to_reveal_early(chain_env: ChainEnv) -> None:
    a, b = chain_env.clients[:2]
    task = open_task(chain_env, [a, b])
    coord = chain_env.coordinator()
    commit(chain_env, task, 1, make_update(a, task, 1))
    assert coord.phase_of(task, 1) is Phase.COMMIT
    receipt = commit(chain_env, task, 1, make_update(b, task, 1))
    changes = coord.events_in(receipt, "PhaseChanged")
    assert [(e.previous, e.current) for e in changes] == [(Phase.COMMIT, Phase.REVEAL)]
    assert coord.get_round(task, 1).phase is Phase.REVEAL


def test_reveal_paths(chain_env: ChainEnv) -> None:
    a, b, c = chain_env.clients[:3]
    task = open_task(chain_env, [a, b, c])
    coord = chain_env.coordinator()
    ua, ub = make_update(a, task, 1), make_update(b, task, 1)
    commit(chain_env, task, 1, ua)
    with pytest.raises(WrongPhase) as exc:
        reveal(chain_env, task, 1, ua)
    assert exc.value.args["expected"] is Phase.REVEAL and exc.value.args["actual"] is Phase.COMMIT
    commit(chain_env, task, 1, ub)
    zero = Update(c, "bafyzero", b"\x05" * 32, 0, b"\x06" * 32)
    commit(chain_env, task, 1, zero)  # everyone committed: Reveal opens early
    assert coord.phase_of(task, 1) is Phase.REVEAL

    with pytest.raises(ZeroSamples):
        reveal(chain_env, task, 1, zero)
    empty = Update(c, "", b"\x05" * 32, 3, b"\x06" * 32)
    with pytest.raises(EmptyCid):
        reveal(chain_env, task, 1, empty)
    with pytest.raises(NotParticipant):
        reveal(chain_env, task, 1, make_update(chain_env.outsiders[0], task, 1))
    wrong = Update(a, ua.cid, ua.sha256, ua.num_samples + 1, ua.salt)
    with pytest.raises(CommitmentMismatch) as exc:
        reveal(chain_env, task, 1, wrong)
    assert (
        exc.value.args["expected"] == ua.commitment and exc.value.args["actual"] == wrong.commitment
    )
    stolen = Update(b, ua.cid, ua.sha256, ua.num_samples, ua.salt)  # b replays a's values
    with pytest.raises(CommitmentMismatch):
        reveal(chain_env, task, 1, stolen)

    receipt = reveal(chain_env, task, 1, ua)
    (ev,) = coord.events_in(receipt, "UpdateRevealed")
    assert (ev.cid, ev.sha256, ev.num_samples) == (ua.cid, ua.sha256, ua.num_samples)
    sub = coord.get_submission(task, 1, a.address)
    assert sub.revealed and sub.cid == ua.cid and sub.num_samples == ua.num_samples
    with pytest.raises(AlreadyRevealed):
        reveal(chain_env, task, 1, ua)

    chain_env.registry().suspend(b.address)
    with pytest.raises(ClientNotApproved):
        reveal(chain_env, task, 1, ub)
    chain_env.registry().approve(b.address)

    chain_env.devnet.increase_time(901)
    assert coord.phase_of(task, 1) is Phase.AGGREGATING
    with pytest.raises(RevealDeadlinePassed):
        reveal(chain_env, task, 1, ub)


def test_not_committed_reveal(chain_env: ChainEnv) -> None:
    a, b, c = chain_env.clients[:3]
    task = open_task(chain_env, [a, b, c])
    commit(chain_env, task, 1, make_update(a, task, 1))
    chain_env.devnet.increase_time(601)
    with pytest.raises(NotCommitted) as exc:
        reveal(chain_env, task, 1, make_update(b, task, 1))
    assert exc.value.args == {"taskId": task, "round": 1, "client": b.address}


def test_aggregate_as_soon_as_all_revealed(chain_env: ChainEnv) -> None:
    clients = chain_env.clients[:3]
    task = open_task(chain_env, clients)
    coord = chain_env.coordinator(chain_env.aggregator)
    ups = [make_update(c, task, 1) for c in clients]
    for u in ups:
        commit(chain_env, task, 1, u)
    for u in ups[:2]:
        reveal(chain_env, task, 1, u)
    included = [c.address for c in clients]
    with pytest.raises(WrongPhase) as exc:
        coord.submit_aggregate(task, 1, "bafyagg", b"\x07" * 32, included[:2])
    assert exc.value.args["actual"] is Phase.REVEAL
    receipt = reveal(chain_env, task, 1, ups[2])
    assert coord.events_in(receipt, "PhaseChanged")[0].current is Phase.AGGREGATING
    receipt = coord.submit_aggregate(task, 1, "bafyagg", b"\x07" * 32, included)
    (acc,) = coord.events_in(receipt, "AggregateAccepted")
    assert acc.included == included and acc.aggregate_cid == "bafyagg"
    assert acc.aggregator == chain_env.aggregator.address
    assert coord.get_included(task, 1) == included
    assert chain_env.devnet.timestamp < coord.get_round(task, 1).commit_deadline


def test_aggregate_after_reveal_deadline_with_partial_reveals(chain_env: ChainEnv) -> None:
    a, b, c = chain_env.clients[:3]
    task = open_task(chain_env, [a, b, c])
    coord = chain_env.coordinator(chain_env.aggregator)
    for cl in (a, b, c):
        commit(chain_env, task, 1, make_update(cl, task, 1))
    for cl in (a, b):
        reveal(chain_env, task, 1, make_update(cl, task, 1))
    chain_env.devnet.increase_time(901)
    with pytest.raises(NotRevealed) as exc:
        coord.submit_aggregate(task, 1, "bafyagg", b"\x07" * 32, [a.address, c.address])
    assert exc.value.args == {"taskId": task, "round": 1, "client": c.address}
    coord.submit_aggregate(task, 1, "bafyagg", b"\x07" * 32, [a.address, b.address])
    assert coord.get_submission(task, 1, a.address).accepted
    assert not coord.get_submission(task, 1, c.address).accepted


def test_aggregate_reverts(chain_env: ChainEnv) -> None:
    clients = chain_env.clients[:3]
    task = open_task(chain_env, clients, reward_budget=40)  # 3*10 + 3 = 33 per round
    commit_reveal_all(chain_env, task, 1, clients)
    addrs = [c.address for c in clients]
    agg = chain_env.coordinator(chain_env.aggregator)
    with pytest.raises(NotAggregator):
        chain_env.coordinator(chain_env.clients[0]).submit_aggregate(
            task, 1, "bafy", b"\x01" * 32, addrs
        )
    with pytest.raises(NotAggregator):
        chain_env.coordinator().submit_aggregate(task, 1, "bafy", b"\x01" * 32, addrs)
    with pytest.raises(EmptyCid):
        agg.submit_aggregate(task, 1, "", b"\x01" * 32, addrs)
    with pytest.raises(DuplicateIncluded) as exc:
        agg.submit_aggregate(task, 1, "bafy", b"\x01" * 32, [addrs[0], addrs[1], addrs[0]])
    assert exc.value.args["client"] == addrs[0]
    with pytest.raises(TooFewIncluded) as exc:
        agg.submit_aggregate(task, 1, "bafy", b"\x01" * 32, addrs[:1])
    assert exc.value.args == {"taskId": task, "round": 1, "included": 1, "minimum": 2}
    with pytest.raises(TooManyIncluded):
        agg.submit_aggregate(task, 1, "bafy", b"\x01" * 32, addrs + addrs[:2])
    with pytest.raises(NotRevealed):
        agg.submit_aggregate(
            task, 1, "bafy", b"\x01" * 32, [addrs[0], chain_env.outsiders[0].address]
        )
    with pytest.raises(UnknownRound):
        agg.submit_aggregate(task, 2, "bafy", b"\x01" * 32, addrs)
    chain_env.registry().suspend(addrs[2])
    with pytest.raises(ClientNotApproved):
        agg.submit_aggregate(task, 1, "bafy", b"\x01" * 32, addrs)
    chain_env.registry().approve(addrs[2])

    agg.submit_aggregate(task, 1, "bafy1", b"\x01" * 32, addrs)  # pays 33 of 40
    commit_reveal_all(chain_env, task, 2, clients)
    with pytest.raises(RewardBudgetExceeded) as exc:
        agg.submit_aggregate(task, 2, "bafy2", b"\x02" * 32, addrs)
    assert exc.value.args == {"taskId": task, "required": 33, "remaining": 7}
    token = chain_env.token()
    assert token.total_supply() == 33


def test_fail_round_retries_then_fails_task(chain_env: ChainEnv) -> None:
    a, b, c = chain_env.clients[:3]
    task = open_task(chain_env, [a, b, c], max_failed_rounds=1, initial_adapter_cid="bafyinit")
    coord = chain_env.coordinator()
    outsider = chain_env.coordinator(chain_env.outsiders[0])
    with pytest.raises(WrongPhase):
        outsider.fail_round(task, 1, "too early")
    commit(chain_env, task, 1, make_update(a, task, 1))
    reveal_later = make_update(b, task, 1)
    commit(chain_env, task, 1, reveal_later)
    chain_env.devnet.increase_time(601)
    reveal(chain_env, task, 1, make_update(a, task, 1))
    reveal(chain_env, task, 1, reveal_later)  # all committers revealed: Aggregating, 2 >= min
    with pytest.raises(NotAuthorizedToFail):
        outsider.fail_round(task, 1, "viable round")
    receipt = chain_env.coordinator(chain_env.aggregator).fail_round(
        task, 1, "updates failed verification"
    )
    names = [e.event for e in coord.events_in(receipt)]
    assert names == ["PhaseChanged", "RoundFailed", "RoundOpened"]
    reopened = coord.events_in(receipt, "RoundOpened")[0]
    assert (reopened.round, reopened.global_adapter_cid) == (2, "bafyinit")
    r1 = coord.get_round(task, 1)
    assert r1.phase is Phase.FAILED and r1.failure_reason == "updates failed verification"

    # Round 2: nobody commits; after the deadlines anyone may fail it; the task then fails.
    chain_env.devnet.increase_time(901)
    assert coord.phase_of(task, 2) is Phase.AGGREGATING
    receipt = outsider.fail_round(task, 2, "no updates")
    assert [e.event for e in coord.events_in(receipt)][-1] == "TaskFailed"
    state = coord.get_task(task)
    assert state.status is TaskStatus.FAILED and state.failed_rounds == 2
    with pytest.raises(WrongTaskStatus):
        commit(chain_env, task, 2, make_update(a, task, 2))


def test_cancel_task(chain_env: ChainEnv) -> None:
    a, b = chain_env.clients[:2]
    task = open_task(chain_env, [a, b])
    coord = chain_env.coordinator()
    commit(chain_env, task, 1, make_update(a, task, 1))
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
        commit(chain_env, task, 1, make_update(b, task, 1))
    created = open_task(chain_env, [], start=False)
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


def test_commitment_helper_matches_contract(chain_env: ChainEnv) -> None:
    coord = chain_env.coordinator()
    sender = chain_env.clients[0].address
    for cid, n in (("bafyshort", 1), ("bafy" + "x" * 100, 2**64 - 1)):
        sha, salt = b"\xaa" * 32, b"\xbb" * 32
        assert coord.compute_commitment(cid, sha, n, salt, sender) == make_commitment(
            cid, sha, n, salt, sender
        )
    assert make_commitment("a", sha, 1, salt, sender) != make_commitment(
        "a", sha, 1, salt, chain_env.clients[1].address
    )
    with pytest.raises(ValueError, match="sha256 must be 32 bytes"):
        make_commitment("a", b"\x01", 1, salt, sender)
