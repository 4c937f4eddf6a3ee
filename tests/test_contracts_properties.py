"""Stateful property test of the Coordinator on anvil (hypothesis).

Random sequences of honest and dishonest actions are applied to one running task: honest
commits and reveals, tampered reveals, copies (of the round's global adapter, of a peer's update
of this or an earlier round), claims above the sample cap, replayed commitments, aggregates over
arbitrary client lists with arbitrary scores, failures by the aggregator and by strangers,
suspensions, phase closing, claims and clock jumps. After every step the chain must satisfy:

* total minted <= budget, and minted + still owed == the task's rewardsPaid <= budget;
* no client earns twice in a round;
* no copied update is accepted, let alone paid: every accepted reveal has a content hash new to
  the task and different from the round's global adapter;
* no round is stuck: once a phase's deadline has passed the round has moved on, and once the
  aggregation deadline has passed anyone can fail the round;
* phases only move forward.

Each example starts from the same snapshot and is reverted afterwards.
"""

from __future__ import annotations

from collections import Counter

from eth_account.signers.local import LocalAccount
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from prismesh.chain.evm.contracts import (
    CommitmentMismatch,
    ContractRevert,
    CopiedGlobal,
    DuplicateUpdate,
    Phase,
    RewardEarned,
    SamplesAboveCap,
    TaskStatus,
    UpdateRevealed,
)
from tests.conftest import ChainEnv, Update, make_update, open_task

N_CLIENTS = 4
BUDGET = 90  # two full rounds fit (4 * 10 + 3 = 43 each), a third only partly
DURATION = 100


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
        commit_duration=DURATION,
        reveal_duration=DURATION,
        aggregation_duration=DURATION,
        sample_cap=300,
        reward_per_update=10,
        aggregator_reward=3,
        reward_budget=BUDGET,
        initial_adapter_cid="bafyinit",
    )
    coord = env.coordinator()
    token = env.token()
    stranger = env.outsiders[0]
    reached: Counter[str] = Counter()

    class CoordinatorMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.snap = env.devnet.snapshot()
            self.updates: dict[tuple[int, str], Update] = {}
            self.paid: Counter[tuple[int, str]] = Counter()
            self.revealed: dict[bytes, tuple[int, str]] = {}
            self.max_phase: dict[int, Phase] = {}
            self.counter = 0

        def teardown(self) -> None:
            env.devnet.revert(self.snap)

        def _round(self) -> int:
            return coord.get_task(task).current_round

        def _record(self, receipt: object, global_before: bytes) -> None:
            for ev in coord.events_in(receipt):
                if isinstance(ev, UpdateRevealed):
                    assert ev.sha256 not in self.revealed, "a copied update was accepted"
                    assert ev.sha256 != global_before, "the global adapter was accepted as an update"
                    self.revealed[ev.sha256] = (ev.round, ev.client)
                elif isinstance(ev, RewardEarned) and not ev.is_aggregator:
                    key = (ev.round, ev.recipient)
                    assert key in self.revealed.values(), "paid without an accepted (new) update"
                    self.paid[key] += 1
                    assert self.paid[key] == 1, f"client paid twice in round {ev.round}"
                    reached["paid"] += 1

        def _send(self, fn, *args) -> bool:  # noqa: ANN001 - a client method
            before = coord.get_task(task).global_sha256
            try:
                receipt = fn(*args)
            except ContractRevert as exc:
                reached[exc.error_name] += 1
                return False
            self._record(receipt, before)
            return True

        def _fresh(self, c: LocalAccount, rnd: int, samples: int) -> Update:
            self.counter += 1
            return make_update(env, c, task, rnd, samples, tag=str(self.counter))

        @rule(i=st.integers(0, N_CLIENTS - 1),
              kind=st.sampled_from(["honest", "honest", "copy-global", "copy-earlier", "copy-peer",
                                    "over-cap", "replay"]))
        def commit(self, i: int, kind: str) -> None:
            c, rnd = clients[i], self._round()
            upd = self._fresh(c, rnd, 100 + i)
            if kind == "copy-global":
                upd = upd.but(sha256=coord.get_task(task).global_sha256, cid="bafycopy")
            elif kind in ("copy-earlier", "copy-peer") and self.revealed:
                sha = sorted(self.revealed)[self.counter % len(self.revealed)]
                upd = upd.but(sha256=sha, cid="bafycopy")
            elif kind == "over-cap":
                upd = upd.but(num_samples=301)
            elif kind == "replay":
                old = [u for (r, a), u in self.updates.items() if a == c.address and r < rnd]
                if old:  # commit an earlier round's commitment, keep its values for the reveal
                    upd = old[-1]
            if self._send(env.coordinator(c).commit_update, task, rnd, upd.commitment):
                self.updates[(rnd, c.address)] = upd

        @rule(i=st.integers(0, N_CLIENTS - 1), tamper=st.booleans())
        def reveal(self, i: int, tamper: bool) -> None:
            c, rnd = clients[i], self._round()
            upd = self.updates.get((rnd, c.address)) or self._fresh(c, rnd, 50)
            if tamper:
                upd = upd.but(num_samples=upd.num_samples + 1)
            replayed = upd.round != rnd
            ok = self._send(env.coordinator(c).reveal_update, task, rnd, upd.cid, upd.sha256, upd.num_samples, upd.salt)
            if ok:
                assert not tamper and not replayed, "a reveal not matching its commitment was accepted"
                assert upd.num_samples <= 300, "a claim above the cap was accepted"

        @rule(n=st.integers(0, N_CLIENTS), late=st.booleans(),
              scores=st.lists(st.integers(0, 1_000_000), min_size=N_CLIENTS, max_size=N_CLIENTS))
        def drive_round(self, n: int, late: bool, scores: list[int]) -> None:
            """Honest commits and reveals of the first n clients (warping past deadlines when
            some stay silent), then an aggregate of the revealed ones, so random runs reach
            acceptance, payment and the budget limit."""
            rnd = self._round()
            for i in range(n):
                self.commit(i, "honest")
            if n < N_CLIENTS:
                env.devnet.increase_time(DURATION + 1)
            for i in range(n):
                self.reveal(i, False)
            if late:
                env.devnet.increase_time(DURATION + 1)
            self.aggregate_revealed(scores)
            assert self._round() >= rnd

        @rule(i=st.integers(0, N_CLIENTS - 1),
              kinds=st.permutations(["copy-global", "copy-earlier", "over-cap", "replay", "tamper"]),
              scores=st.lists(st.integers(0, 1_000_000), min_size=N_CLIENTS, max_size=N_CLIENTS))
        def dishonest_round(self, i: int, kinds: list[str], scores: list[int]) -> None:
            """Everyone commits, clients i and i+1 dishonestly (the first two of ``kinds``);
            everyone reveals; the revealed are aggregated. Dishonest reveals must be refused.
            A round already under way is first left to run out (and failed by a stranger)."""
            if coord.phase_of(task, self._round()) is not Phase.OPEN:
                env.devnet.increase_time(3 * DURATION + 1)
                self.fail(True)
            rnd = self._round()
            cheat = {i: kinds[0], (i + 1) % N_CLIENTS: kinds[1]}
            for k in range(N_CLIENTS):
                kind = cheat.get(k, "honest")
                self.commit(k, "honest" if kind == "tamper" else kind)
            env.devnet.increase_time(DURATION + 1)
            for k in range(N_CLIENTS):
                self.reveal(k, cheat.get(k) == "tamper")
            self.aggregate_revealed(scores)
            assert self._round() >= rnd

        @rule(picks=st.lists(st.integers(0, N_CLIENTS - 1), max_size=6),
              scores=st.lists(st.integers(0, 1_000_000), min_size=6, max_size=6))
        def aggregate(self, picks: list[int], scores: list[int]) -> None:
            rnd = self._round()
            included = {clients[p].address: scores[k] for k, p in enumerate(picks)}
            if self._send(env.coordinator(env.aggregator).submit_aggregate, task, rnd,
                          f"bafyagg{rnd}", rnd.to_bytes(32, "big"), included):
                reached["accepted"] += 1

        @rule(scores=st.lists(st.integers(0, 1_000_000), min_size=N_CLIENTS, max_size=N_CLIENTS))
        def aggregate_revealed(self, scores: list[int]) -> None:
            rnd = self._round()
            included = {c.address: s for c, s in zip(clients, scores, strict=True)
                        if coord.get_submission(task, rnd, c.address).revealed}
            if self._send(env.coordinator(env.aggregator).submit_aggregate, task, rnd,
                          f"bafyagg{rnd}", (rnd + 1000).to_bytes(32, "big"), included):
                reached["accepted"] += 1

        @rule(by_stranger=st.booleans())
        def fail(self, by_stranger: bool) -> None:
            who = stranger if by_stranger else env.aggregator
            if self._send(env.coordinator(who).fail_round, task, self._round(), "test"):
                reached["failed"] += 1

        @rule(i=st.integers(0, N_CLIENTS - 1))
        def toggle_suspension(self, i: int) -> None:
            reg = env.registry()
            addr = clients[i].address
            (reg.approve if not reg.is_approved(addr) else reg.suspend)(addr)

        @rule()
        def advance(self) -> None:
            if self._send(env.coordinator(stranger).advance_phase, task, self._round()):
                reached["advanced"] += 1

        @rule(i=st.integers(0, N_CLIENTS))
        def claim(self, i: int) -> None:
            if i == N_CLIENTS:
                self._send(env.coordinator(env.aggregator).claim_fees)
            else:
                self._send(env.coordinator(clients[i]).claim_rewards, task)

        @rule(seconds=st.sampled_from([30, DURATION + 1, 3 * DURATION + 1]))
        def warp(self, seconds: int) -> None:
            env.devnet.increase_time(seconds)
            env.devnet.mine()

        @invariant()
        def money_is_bounded(self) -> None:
            state = coord.get_task(task)
            owed = sum(coord.rewards_owed(task, c.address) for c in clients)
            fees = coord.fees_owed(env.aggregator.address)
            supply = token.total_supply()
            assert supply + owed + fees == state.rewards_paid <= BUDGET
            assert supply <= BUDGET

        @invariant()
        def no_round_is_stuck(self) -> None:
            state = coord.get_task(task)
            rnd = state.current_round
            phase = coord.phase_of(task, rnd)
            assert phase >= self.max_phase.get(rnd, Phase.NONE), f"round {rnd} went back"
            self.max_phase[rnd] = phase
            if state.status is not TaskStatus.RUNNING:
                return
            info = coord.get_round(task, rnd)
            now = env.devnet.timestamp
            if now > info.commit_deadline:
                assert phase >= Phase.REVEAL
            if now > info.reveal_deadline:
                assert phase >= Phase.AGGREGATING
            if now > info.aggregation_deadline and phase is Phase.AGGREGATING:
                # Anyone may end the round: a call from a stranger must not revert.
                cid = coord.round_global_cid(task, rnd)
                coord.contract.functions.failRound(task, rnd, cid, "stuck?").call({"from": stranger.address})
                reached["past-deadline"] += 1

    run_state_machine_as_test(
        CoordinatorMachine,
        settings=settings(
            max_examples=25,
            stateful_step_count=12,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )
    # The random runs must have reached the interesting transitions, not only reverts.
    for what in ("accepted", "failed", "paid", "past-deadline", CommitmentMismatch.__name__,
                 CopiedGlobal.__name__, DuplicateUpdate.__name__, SamplesAboveCap.__name__):
        assert reached[what] > 0, f"{what} never reached: {sorted(reached.items())}"
