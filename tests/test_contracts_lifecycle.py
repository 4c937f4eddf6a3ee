"""The full task lifecycle, 3 clients over 3 rounds, on anvil and on the embedded EVM."""

from __future__ import annotations

import hashlib

import pytest

from prismesh.chain.evm.contracts import Phase, TaskStatus, WrongTaskStatus, sort_included
from tests.conftest import ChainEnv, commit, make_update, open_task, reveal


def _run_lifecycle(env: ChainEnv) -> None:
    clients = env.clients[:3]
    agg = env.aggregator
    per_update, agg_fee = 10, 3
    task = open_task(
        env,
        clients,
        num_rounds=3,
        max_participants=3,
        reward_per_update=per_update,
        aggregator_reward=agg_fee,
        reward_budget=3 * (3 * per_update + agg_fee),
        initial_adapter_cid="bafyinitial",
    )
    coord = env.coordinator()
    token = env.token()
    start_block = env.devnet.block_number
    expected_global = "bafyinitial"
    earned = {c.address: 0 for c in clients}
    for rnd in (1, 2, 3):
        assert coord.get_task(task).current_round == rnd
        assert coord.phase_of(task, rnd) is Phase.OPEN
        assert coord.round_global_cid(task, rnd) == expected_global
        # Round 2 excludes the third client's update (e.g. rejected by verification).
        included = clients if rnd != 2 else clients[:2]
        updates = [make_update(env, c, task, rnd, 50 * (i + 1)) for i, c in enumerate(clients)]
        for i, u in enumerate(updates):
            if rnd == 1 or i == 2:
                commit(env, task, rnd, u)
            else:  # the last round's accuracy goes with this commitment, as a node sends it
                mine = env.coordinator(u.client)
                mine.send_calls([mine.metric_call(task, rnd - 1, "accuracy", 0.5 + 0.1 * i + 0.01 * (rnd - 1)),
                                 ("commitUpdate", (task, rnd, u.commitment))])
        assert coord.phase_of(task, rnd) is Phase.REVEAL
        for u in updates:
            receipt = reveal(env, task, rnd, u)
            ev = coord.events_in(receipt, "UpdateRevealed")[0]
            assert (ev.cid, ev.sha256, ev.num_samples) == (u.cid, u.sha256, u.num_samples)
        assert coord.phase_of(task, rnd) is Phase.AGGREGATING
        agg_cid = f"bafyaggregate{rnd}"
        agg_sha = hashlib.sha256(agg_cid.encode()).digest()
        scores = {c.address: 500_000 + 100_000 * i for i, c in enumerate(included)}
        receipt = env.coordinator(agg).submit_aggregate(task, rnd, agg_cid, agg_sha, scores)
        names = [e.event for e in coord.events_in(receipt)]
        paid = {e.recipient: e for e in coord.events_in(receipt, "RewardEarned")}
        pool, total = per_update * len(included), sum(scores.values())
        for c, score in scores.items():
            assert (paid[c].score, paid[c].amount) == (score, pool * score // total)
            earned[c] += paid[c].amount
        assert paid[agg.address].is_aggregator and paid[agg.address].amount == agg_fee
        tail = ["PhaseChanged", "AggregateAccepted"] + (["RoundOpened"] if rnd < 3 else ["TaskCompleted"])
        assert names[-3:] == tail
        if rnd < 3:
            nxt = coord.events_in(receipt, "RoundOpened")[0]
            assert (nxt.round, nxt.global_adapter_cid) == (rnd + 1, agg_cid)
        assert coord.phase_of(task, rnd) is Phase.FINALIZED
        assert coord.get_task(task).global_sha256 == agg_sha
        assert coord.included(task, rnd) == sort_included(c.address for c in included)
        if rnd < 3:
            env.coordinator(clients[2]).report_metric(task, rnd, "accuracy", 0.7 + 0.01 * rnd)
        expected_global = agg_cid

    state = coord.get_task(task)
    assert state.status is TaskStatus.COMPLETED
    assert state.completed_rounds == 3 and coord.global_adapter_cid(task) == "bafyaggregate3"
    total = sum(earned.values()) + 3 * agg_fee
    assert state.rewards_paid == total <= 3 * (3 * per_update + agg_fee)
    assert token.total_supply() == 0
    for i, c in enumerate(clients):
        assert coord.rewards_owed(task, c.address) == earned[c.address]
        mine = env.coordinator(c)
        mine.send_calls([mine.metric_call(task, 3, "accuracy", 0.5 + 0.1 * i + 0.03), ("claimRewards", (task,))])
        assert token.balance_of(c.address) == earned[c.address]
    env.coordinator(agg).claim_fees()
    assert token.balance_of(agg.address) == 3 * agg_fee and token.total_supply() == total
    with pytest.raises(WrongTaskStatus):
        commit(env, task, 3, make_update(env, clients[0], task, 4))

    # The event history alone tells the whole story (what nodes and auditors read).
    opened = coord.get_events("RoundOpened", start_block, taskId=task)
    assert [(e.round, e.global_adapter_cid) for e in opened] == [
        (1, "bafyinitial"),
        (2, "bafyaggregate1"),
        (3, "bafyaggregate2"),
    ]
    accepted = coord.get_events("AggregateAccepted", start_block, taskId=task)
    assert [len(e.included) for e in accepted] == [3, 2, 3]
    assert sum(e.amount for e in coord.get_events("RewardEarned", 0, taskId=task)) == total
    metrics = coord.get_events("MetricReported", start_block, taskId=task)
    assert len(metrics) == 9 and metrics[-1].value == 730_000
    assert sorted((e.round, e.client, e.value) for e in metrics) == sorted(
        (rnd, c.address, (500_000 + 100_000 * i + 10_000 * rnd)) for rnd in (1, 2, 3) for i, c in enumerate(clients)
    )
    assert len(coord.get_events("TaskCompleted", start_block)) == 1


def test_lifecycle_on_anvil(chain_env: ChainEnv) -> None:
    _run_lifecycle(chain_env)


def test_lifecycle_on_embedded_evm(embedded_env: ChainEnv) -> None:
    assert embedded_env.devnet.kind == "embedded"
    _run_lifecycle(embedded_env)


def test_every_transaction_is_encoded_as_web3_encodes_it(chain_env: ChainEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    """The clients encode their transactions' calldata directly; over a whole lifecycle every
    transaction's bytes equal web3's ``encode_abi`` for the same arguments. Arguments only web3
    takes (a struct as a dict) still go through web3; arguments it refuses are named by it."""
    from prismesh.chain.evm.contracts import ContractClient

    encode = ContractClient._calldata
    sent: set[str] = set()

    def compared(self: ContractClient, fn: str, args: tuple) -> str:
        data = encode(self, fn, args)
        assert fn in self._transactions, f"{self.NAME}.{fn} is not encoded directly"
        assert data == self.contract.encode_abi(fn, args=list(args)), f"{self.NAME}.{fn}{args}"
        sent.add(f"{self.NAME}.{fn}")
        return data

    monkeypatch.setattr(ContractClient, "_calldata", compared)
    _run_lifecycle(chain_env)
    assert {"Registry.register", "Registry.approve", "Coordinator.createTask", "Coordinator.joinTask",
            "Coordinator.startTask", "Coordinator.commitUpdate", "Coordinator.revealUpdate",
            "Coordinator.submitAggregate", "Coordinator.reportMetric", "Coordinator.claimRewards",
            "Coordinator.claimFees", "Coordinator.multicall"} <= sent
    monkeypatch.setattr(ContractClient, "_calldata", encode)
    from tests.conftest import task_params

    coord = chain_env.coordinator()
    struct = task_params().to_abi()
    (entry,) = [e for e in coord.abi if e.get("name") == "createTask"]
    as_dict = dict(zip([c["name"] for c in entry["inputs"][0]["components"]], struct, strict=True))
    assert coord._calldata("createTask", (as_dict,)) == coord.contract.encode_abi("createTask", args=[struct])
    with pytest.raises(Exception, match="commitUpdate"):  # noqa: B017 - web3's own error names the function
        coord._calldata("commitUpdate", (7, "one", b"\x01" * 32))
