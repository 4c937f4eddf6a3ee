"""Stateful property test of the Coordinator's invariants on anvil (hypothesis).

Random sequences of commits, honest and tampered reveals, aggregates over arbitrary client
lists (duplicates and non-revealers included), failed rounds, metric reports and clock jumps
are applied to one running task; after every step the chain must satisfy:

* one accepted submission per client per round (and at most one accepted aggregate per round);
* tokens minted equal the rewards recorded (RewardPaid events, the task's rewardsPaid);
* phases only move forward;
* a finalized (or failed) round never changes.

Each example starts from the same snapshot and is reverted afterwards.
"""

from __future__ import annotations

from collections import Counter

from eth_account.signers.local import LocalAccount
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from prismesh.chain.evm.contracts import (
    AggregateAccepted,
    CommitmentMismatch,
    ContractRevert,
    Phase,
    RewardPaid,
)
from tests.conftest import ChainEnv, Update, make_update, open_task

N_CLIENTS = 4


def test_coordinator_invariants(chain_env: ChainEnv) -> None:
    env = chain_env
    clients = env.clients[:N_CLIENTS]
    task = open_task(
        env,
        clients,
        num_rounds=3,
        min_participants=2,
        max_participants=N_CLIENTS,
        max_failed_rounds=3,
        commit_duration=100,
        reveal_duration=100,
        reward_per_update=10,
        aggregator_reward=3,
        reward_budget=90,  # two full rounds fit, a third may not: the budget check is reached
    )
    coord = env.coordinator()
    token = env.token()
    reached: Counter[str] = Counter()

    class CoordinatorMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.snap = env.devnet.snapshot()
            self.updates: dict[tuple[int, str], Update] = {}
            self.accepted: dict[int, list[str]] = {}
            self.rewards = 0
            self.max_phase: dict[int, Phase] = {}
            self.frozen: dict[int, object] = {}
            self.salt_counter = 0

        def teardown(self) -> None:
            env.devnet.revert(self.snap)

        def _round(self) -> int:
            return coord.get_task(task).current_round

        def _record(self, receipt: object) -> None:
            for ev in coord.events_in(receipt):
                if isinstance(ev, AggregateAccepted):
                    assert ev.round not in self.accepted, "second aggregate accepted for a round"
                    assert len(set(ev.included)) == len(ev.included), "client accepted twice"
                    for c in ev.included:
                        upd = self.updates.get((ev.round, c))
                        assert upd is not None, "accepted a client that never committed"
                        sub = coord.get_submission(task, ev.round, c)
                        assert sub.revealed and sub.cid == upd.cid
                    self.accepted[ev.round] = list(ev.included)
                    reached["accepted"] += 1
                elif isinstance(ev, RewardPaid):
                    self.rewards += ev.amount

        def _commit(self, c: LocalAccount, samples: int) -> None:
            rnd = self._round()
            self.salt_counter += 1
            base = make_update(c, task, rnd, samples)
            upd = Update(c, base.cid, base.sha256, samples, self.salt_counter.to_bytes(32, "big"))
            try:
                receipt = env.coordinator(c).commit_update(task, rnd, upd.commitment)
            except ContractRevert:
                return
            assert (rnd, c.address) not in self.updates, "second commit accepted"
            self.updates[(rnd, c.address)] = upd
            self._record(receipt)

        def _reveal(self, c: LocalAccount, tamper: bool) -> None:
            rnd = self._round()
            upd = self.updates.get((rnd, c.address)) or make_update(c, task, rnd)
            if tamper:
                upd = Update(upd.client, upd.cid + "x", upd.sha256, upd.num_samples, upd.salt)
            try:
                receipt = env.coordinator(upd.client).reveal_update(
                    task, rnd, upd.cid, upd.sha256, upd.num_samples, upd.salt
                )
            except CommitmentMismatch:
                assert tamper or (rnd, upd.client.address) not in self.updates
                reached["mismatch"] += 1
                return
            except ContractRevert:
                return
            assert not tamper, "a reveal not matching its commitment was accepted"
            assert upd.num_samples > 0
            self._record(receipt)

        @rule(i=st.integers(0, N_CLIENTS - 1), samples=st.sampled_from([0, 1, 250]))
        def commit_one(self, i: int, samples: int) -> None:
            self._commit(clients[i], samples)

        @rule(n=st.integers(2, N_CLIENTS), zero_samples=st.booleans())
        def commit_many(self, n: int, zero_samples: bool) -> None:
            for k, c in enumerate(clients[:n]):
                self._commit(c, 0 if (zero_samples and k == 0) else 100 + k)

        @rule(i=st.integers(0, N_CLIENTS - 1), tamper=st.booleans())
        def reveal_one(self, i: int, tamper: bool) -> None:
            self._reveal(clients[i], tamper)

        @rule(n=st.integers(1, N_CLIENTS), tamper_first=st.booleans())
        def reveal_many(self, n: int, tamper_first: bool) -> None:
            for k, c in enumerate(clients[:n]):
                self._reveal(c, tamper_first and k == 0)

        @rule(picks=st.lists(st.integers(0, N_CLIENTS - 1), min_size=0, max_size=6))
        def aggregate_any(self, picks: list[int]) -> None:
            self._aggregate([clients[p].address for p in picks])

        @rule(mode=st.sampled_from(["revealed", "duplicate", "non_revealer", "one"]))
        def aggregate_revealed(self, mode: str) -> None:
            rnd = self._round()
            revealed = [
                c.address for c in clients if coord.get_submission(task, rnd, c.address).revealed
            ]
            others = [c.address for c in clients if c.address not in revealed]
            included = {
                "revealed": revealed,
                "duplicate": revealed + revealed[:1],
                "non_revealer": revealed + others[:1],
                "one": revealed[:1],
            }[mode]
            self._aggregate(included)

        @rule(
            n_commit=st.integers(2, N_CLIENTS),
            n_reveal=st.integers(0, N_CLIENTS),
            mode=st.sampled_from(["revealed", "duplicate", "non_revealer", "one"]),
            tamper_first=st.booleans(),
        )
        def drive_round(self, n_commit: int, n_reveal: int, mode: str, tamper_first: bool) -> None:
            """Commit, reveal and aggregate in one step (warping past deadlines as needed),
            so that random runs also reach acceptance and the budget limit."""
            self.commit_many(n_commit, False)
            if n_commit < N_CLIENTS:
                env.devnet.increase_time(101)
            self.reveal_many(min(n_reveal, n_commit), tamper_first)
            if n_reveal < n_commit:
                env.devnet.increase_time(101)
            self.aggregate_revealed(mode)

        @rule(n_commit=st.integers(2, N_CLIENTS))
        def drive_honest_round(self, n_commit: int) -> None:
            """A clean round (commits, reveals, aggregate of exactly the revealers)."""
            self.drive_round(n_commit, n_commit, "revealed", False)

        def _aggregate(self, included: list[str]) -> None:
            rnd = self._round()
            try:
                receipt = env.coordinator(env.aggregator).submit_aggregate(
                    task, rnd, f"bafyagg{rnd}", rnd.to_bytes(32, "big"), included
                )
            except ContractRevert:
                return
            self._record(receipt)

        @rule()
        def fail(self) -> None:
            try:
                receipt = env.coordinator(env.aggregator).fail_round(task, self._round(), "test")
            except ContractRevert:
                return
            reached["failed"] += 1
            self._record(receipt)

        @rule(i=st.integers(0, N_CLIENTS - 1))
        def metric(self, i: int) -> None:
            try:
                env.coordinator(clients[i]).report_metric(task, self._round(), "accuracy", 0.5)
            except ContractRevert:
                return

        @rule(seconds=st.sampled_from([30, 101, 250]))
        def warp(self, seconds: int) -> None:
            env.devnet.increase_time(seconds)

        @invariant()
        def tokens_match_rewards(self) -> None:
            supply = token.total_supply()
            assert supply == self.rewards == coord.get_task(task).rewards_paid

        @invariant()
        def phases_forward_and_final_rounds_frozen(self) -> None:
            current = self._round()
            for rnd in range(1, current + 1):
                phase = coord.phase_of(task, rnd)
                assert phase >= self.max_phase.get(rnd, Phase.NONE), f"round {rnd} went back"
                self.max_phase[rnd] = phase
                if phase in (Phase.FINALIZED, Phase.FAILED):
                    info = (coord.get_round(task, rnd), coord.get_included(task, rnd))
                    if rnd in self.frozen:
                        assert self.frozen[rnd] == info, f"final round {rnd} changed"
                    else:
                        self.frozen[rnd] = info
                        assert (
                            rnd < current
                            or phase is Phase.FAILED
                            or (coord.get_task(task).completed_rounds == 3)
                        )

    run_state_machine_as_test(
        CoordinatorMachine,
        settings=settings(
            max_examples=20,
            stateful_step_count=10,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )
    # The random runs must have reached the interesting transitions, not only reverts.
    assert reached["accepted"] > 0 and reached["failed"] > 0 and reached["mismatch"] > 0, reached
