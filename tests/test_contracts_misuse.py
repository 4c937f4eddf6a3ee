"""Every hole the misuse campaign found, on a real anvil: each case was accepted before and is
refused (or bounded) now. The old-height finality certificate is in test_finality_gadget.py."""

from __future__ import annotations

import pytest

from prismesh.chain.evm.contracts import (
    ClientStatus,
    CommitmentMismatch,
    CopiedGlobal,
    DuplicateUpdate,
    InvalidTaskParameter,
    NotAuthorizedToFail,
    NotMinter,
    Phase,
    PhaseStillOpen,
    SamplesAboveCap,
    TaskStatus,
    WrongPhase,
)
from prismesh.chain.evm.toolchain import compile_contracts
from tests.conftest import (
    ChainEnv,
    commit,
    commit_reveal_all,
    make_update,
    open_task,
    reveal,
    task_params,
)


def _finish_round(env: ChainEnv, task: int, rnd: int, clients: list, sha: bytes | None = None) -> None:
    commit_reveal_all(env, task, rnd, clients)
    env.coordinator(env.aggregator).submit_aggregate(
        task, rnd, f"bafyagg{rnd}", sha or bytes([rnd]) * 32, [c.address for c in clients]
    )


def test_weight_capture_is_refused(chain_env: ChainEnv) -> None:
    """A claim of 2^64 - 1 samples used to give one client a FedAvg weight of 1.0."""
    env = chain_env
    a, b = env.clients[:2]
    task = open_task(env, [a, b], sample_cap=500)
    liar = make_update(env, a, task, 1, num_samples=2**32 - 1)
    commit(env, task, 1, liar)
    commit(env, task, 1, make_update(env, b, task, 1, num_samples=500))
    with pytest.raises(SamplesAboveCap) as exc:
        reveal(env, task, 1, liar)
    assert exc.value.args == {"taskId": task, "numSamples": 2**32 - 1, "sampleCap": 500}
    reveal(env, task, 1, make_update(env, b, task, 1, num_samples=500))  # the cap itself is fine
    # Counts beyond uint32 cannot even be encoded any more.
    with pytest.raises(ValueError, match="uint32"):
        env.coordinator(a).reveal_update(task, 1, liar.cid, liar.sha256, 2**64 - 1, liar.salt)


def test_copied_cid_across_rounds_and_copied_global_are_refused(chain_env: ChainEnv) -> None:
    env = chain_env
    a, b, c = env.clients[:3]
    task = open_task(env, [a, b, c], initial_adapter_cid="bafyinit", min_participants=2)
    init_sha = env.coordinator().get_task_params(task).initial_adapter_sha256
    # Round 1: c reveals the initial adapter (the round's global) as its update.
    ua, ub = make_update(env, a, task, 1), make_update(env, b, task, 1)
    global_copy = make_update(env, c, task, 1).but(cid="bafyinit", sha256=init_sha)
    for u in (ua, ub, global_copy):
        commit(env, task, 1, u)
    reveal(env, task, 1, ua)
    reveal(env, task, 1, ub)
    with pytest.raises(CopiedGlobal) as exc:
        reveal(env, task, 1, global_copy)
    assert exc.value.args["sha256"] == init_sha
    env.devnet.increase_time(901)
    agg_sha = b"\xa9" * 32
    env.coordinator(env.aggregator).submit_aggregate(task, 1, "bafyagg1", agg_sha, [a.address, b.address])

    # Round 2: c reveals a's public round-1 update; b reveals round 1's aggregate (now global).
    stolen = make_update(env, c, task, 2).but(cid=ua.cid, sha256=ua.sha256)
    global_copy = make_update(env, b, task, 2).but(cid="bafyagg1", sha256=agg_sha)
    honest = make_update(env, a, task, 2)
    for u in (honest, global_copy, stolen):
        commit(env, task, 2, u)
    with pytest.raises(DuplicateUpdate) as exc:
        reveal(env, task, 2, stolen)
    assert exc.value.args == {"taskId": task, "round": 2, "sha256": ua.sha256, "revealedIn": 1}
    with pytest.raises(CopiedGlobal):
        reveal(env, task, 2, global_copy)
    reveal(env, task, 2, honest)
    assert env.coordinator().revealed_in(task, ua.sha256) == 1


def test_duplicate_update_in_one_round_is_refused(chain_env: ChainEnv) -> None:
    env = chain_env
    a, b = env.clients[:2]
    task = open_task(env, [a, b])
    ua = make_update(env, a, task, 1)
    twin = make_update(env, b, task, 1).but(cid=ua.cid, sha256=ua.sha256)
    commit(env, task, 1, ua)
    commit(env, task, 1, twin)
    reveal(env, task, 1, ua)
    with pytest.raises(DuplicateUpdate) as exc:
        reveal(env, task, 1, twin)
    assert exc.value.args["revealedIn"] == 1


def test_commitment_replay_fails(chain_env: ChainEnv) -> None:
    """A round-1 commitment replayed in round 2 (or in another task) can never be revealed."""
    env = chain_env
    a, b = env.clients[:2]
    task = open_task(env, [a, b], num_rounds=3)
    other = open_task(env, [], start=False)
    env.coordinator(a).join_task(other)
    env.coordinator(b).join_task(other)
    env.coordinator().start_task(other)
    ua = make_update(env, a, task, 1)
    commit(env, task, 1, ua)
    commit(env, task, 1, make_update(env, b, task, 1))
    reveal(env, task, 1, ua)
    reveal(env, task, 1, make_update(env, b, task, 1))
    env.coordinator(env.aggregator).submit_aggregate(task, 1, "bafyagg1", b"\x01" * 32, [a.address, b.address])

    # The same commitment, committed again in round 2 and in the other task's round 1.
    env.coordinator(a).commit_update(task, 2, ua.commitment)
    env.coordinator(a).commit_update(other, 1, ua.commitment)
    env.devnet.increase_time(601)
    for t, r in ((task, 2), (other, 1)):
        with pytest.raises(CommitmentMismatch):
            env.coordinator(a).reveal_update(t, r, ua.cid, ua.sha256, ua.num_samples, ua.salt)


def test_vanished_aggregator_round_is_failed_by_anyone_after_its_deadline(chain_env: ChainEnv) -> None:
    env = chain_env
    clients = env.clients[:3]
    task = open_task(env, clients, initial_adapter_cid="bafyinit")
    commit_reveal_all(env, task, 1, clients)
    coord = env.coordinator()
    assert coord.phase_of(task, 1) is Phase.AGGREGATING
    info = coord.get_round(task, 1)
    anyone = env.coordinator(env.outsiders[0])
    with pytest.raises(NotAuthorizedToFail):
        anyone.fail_round(task, 1, "aggregator vanished")
    env.devnet.increase_time(info.aggregation_deadline - env.devnet.timestamp + 1)
    receipt = anyone.fail_round(task, 1, "aggregator vanished")
    reopened = coord.events_in(receipt, "RoundOpened")[0]
    assert (reopened.round, reopened.global_adapter_cid) == (2, "bafyinit")
    assert coord.phase_of(task, 1) is Phase.FAILED and coord.get_task(task).current_round == 2


def test_every_phase_ends_by_its_deadline(chain_env: ChainEnv) -> None:
    """Commit, reveal and aggregation deadlines are bounded; past them a round always moves."""
    env = chain_env
    longest = 30 * 24 * 3600
    clients = env.clients[:2]
    task = open_task(env, clients, commit_duration=longest, reveal_duration=longest, aggregation_duration=longest)
    coord = env.coordinator()
    info = coord.get_round(task, 1)
    assert info.aggregation_deadline - info.opened_at == 3 * longest
    env.devnet.increase_time(3 * longest + 1)
    assert coord.phase_of(task, 1) is Phase.AGGREGATING
    env.coordinator(env.outsiders[0]).fail_round(task, 1, "nothing happened")
    assert coord.get_task(task).current_round == 2


@pytest.mark.parametrize("field", ["commit_duration", "reveal_duration", "aggregation_duration"])
def test_extreme_durations_are_refused_at_creation(chain_env: ChainEnv, field: str) -> None:
    """2^62 used to hold a round open for ever and 2^64 - 1 made startTask panic."""
    coord = chain_env.coordinator()
    for value in (30 * 24 * 3600 + 1, 2**32 - 1):
        with pytest.raises(InvalidTaskParameter):
            coord.create_task(task_params(**{field: value}))
    for value in (2**62, 2**64 - 1):  # no longer representable in the ABI
        with pytest.raises(ValueError, match="uint32"):
            coord.create_task(task_params(**{field: value}))


def test_budget_must_cover_one_round(chain_env: ChainEnv) -> None:
    coord = chain_env.coordinator()
    with pytest.raises(InvalidTaskParameter) as exc:
        coord.create_task(task_params(reward_budget=0))
    assert exc.value.args == {"field": "rewardBudget"}
    one_round = 4 * 10 + 3  # max_participants * reward_per_update + aggregator_reward
    coord.create_task(task_params(reward_budget=one_round))
    coord.create_task(task_params(reward_budget=0, reward_per_update=0, aggregator_reward=0))


def test_minting_only_by_the_coordinator(chain_env: ChainEnv) -> None:
    """The token's admin used to grant itself the minter role and mint 1e30."""
    env = chain_env
    token = env.token()
    with pytest.raises(NotMinter):
        token.mint(env.governance.address, 10**30)
    abi = {e["name"] for e in compile_contracts()["RewardToken"]["abi"] if e["type"] == "function"}
    assert not abi & {"grantRole", "revokeRole", "renounceRole", "setMinter", "transferOwnership"}
    assert token.minter() == env.manifest.address("Coordinator")
    assert token.total_supply() == 0


def test_suspended_participant_cannot_hold_a_phase_open(chain_env: ChainEnv) -> None:
    env = chain_env
    a, b, c = env.clients[:3]
    task = open_task(env, [a, b, c])
    coord = env.coordinator()
    anyone = env.coordinator(env.outsiders[0])
    ua, ub = make_update(env, a, task, 1), make_update(env, b, task, 1)
    commit(env, task, 1, ua)
    commit(env, task, 1, ub)
    with pytest.raises(PhaseStillOpen) as exc:
        anyone.advance_phase(task, 1)
    assert exc.value.args["waitingFor"] == c.address
    env.registry().suspend(c.address)
    receipt = anyone.advance_phase(task, 1)
    changes = coord.events_in(receipt, "PhaseChanged")
    assert [(e.previous, e.current) for e in changes] == [(Phase.COMMIT, Phase.REVEAL)]
    reveal(env, task, 1, ua)
    with pytest.raises(PhaseStillOpen):
        anyone.advance_phase(task, 1)
    env.registry().suspend(b.address)  # b committed but may no longer reveal
    anyone.advance_phase(task, 1)
    assert coord.phase_of(task, 1) is Phase.AGGREGATING
    with pytest.raises(WrongPhase):
        anyone.advance_phase(task, 1)
    assert env.registry().status_of(c.address) is ClientStatus.SUSPENDED
    # One reveal is fewer than the minimum: anyone may fail the round at once.
    anyone.fail_round(task, 1, "too few updates")
    assert coord.get_task(task).status is TaskStatus.RUNNING and coord.get_task(task).current_round == 2
