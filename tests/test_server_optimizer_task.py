"""A stateful server optimiser on chain: the aggregator daemon rebuilds its state from the chain
and the store alone, so a restarted (or different) aggregator computes the same aggregate, and
``prismesh audit`` re-derives every round of a task that uses it."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from prismesh.aggregator.audit import audit_task
from prismesh.aggregator.daemon import AGGREGATOR_EVENTS, AggregatorConfig, AggregatorDaemon
from prismesh.aggregator.history import (
    Contribution,
    ReplayMemo,
    replay_round,
    round_updates,
    server_state_before,
)
from prismesh.aggregator.strategies import get_strategy
from prismesh.aggregator.weights import WeightRule
from prismesh.chain.evm.contracts import TaskStatus
from prismesh.chain.storage import fetch_adapter
from prismesh.node.trainer import TrainConfig, create_initial_adapter
from prismesh.runs.federation import Federation, TaskSettings, make_stream
from tests.conftest import tiny_federation_inputs
from tests.test_federation import make_spec

pytestmark = pytest.mark.timeout(600)

OPTIONS = {"inner": "fairavg", "lr": 2.0, "momentum": 0.5}


@pytest.mark.slow
def test_fedavgm_task_is_restart_safe_and_audited(tmp_path: Path) -> None:
    base, clients = tiny_federation_inputs(tmp_path / "bench")
    fed = Federation(tmp_path / "fed", finality=False, parallel=False)
    try:
        for c in clients:
            fed.add_hospital(c.name, c.train_path, c.test_path, base, device="cpu")
        fed.add_aggregator()
        fed.approve_all()
        spec = replace(make_spec(base, "fedavgm"), strategy_options=OPTIONS)
        initial = create_initial_adapter(base, tmp_path / "initial", TrainConfig.from_dict({**spec.train_config(), "device": "cpu"}))
        task = fed.create_task(spec, TaskSettings(num_rounds=3, min_participants=2), initial_adapter=initial)
        assert fed.run_task(task).status == TaskStatus.COMPLETED

        report = audit_task(fed.w3, fed.manifest, fed.store, task, check_finality=False)
        assert report.ok, report.render()
        assert sum(f.check == "aggregate recomputed" and f.ok for f in report.findings) == 3

        coord = fed.coordinator()
        start = fed.manifest.deploy_block
        accepted = {ev.round: ev for ev in coord.get_events("AggregateAccepted", start, taskId=task)}
        opened = {ev.round: ev for ev in coord.get_events("RoundOpened", start, taskId=task)}
        reveals = {(ev.round, ev.client): ev for ev in coord.get_events("UpdateRevealed", start, taskId=task)}
        strategy = get_strategy("fedavgm", **OPTIONS)

        # A fresh aggregator (empty state directory, as after losing the host) recomputes round 3
        # byte for byte: the momentum is rebuilt from rounds 1 and 2 on chain.
        other = AggregatorDaemon(
            AggregatorConfig(manifest=tmp_path / "fed" / "manifest.json", keystore="dev:1",
                             state_dir=tmp_path / "other-aggregator", parallel=False, finality=False),
            w3=fed.w3, manifest=fed.manifest, account=fed.accounts[1], store=fed.store,
            store_spec=fed.store_spec,
            stream=make_stream(fed.devnet, fed.manifest, AGGREGATOR_EVENTS, tmp_path / "other-aggregator" / "cursor.json",
                               finality=False),
        )
        rec = {"global_cid": opened[3].global_adapter_cid,
               "reveals": {c: {"cid": reveals[(3, c)].cid, "sha256": bytes(reveals[(3, c)].sha256).hex(),
                               "num_samples": int(reveals[(3, c)].num_samples)} for c in accepted[3].included}}
        out_dir, _scores, rejected, metrics = other.compute(task, 3, coord.get_task_params(task), rec)
        from prismesh.chain.storage import cid_of_path

        assert cid_of_path(out_dir) == accepted[3].aggregate_cid and not rejected
        assert metrics["server_step"] == 3

        # The state matters: round 3 recomputed without it is a different adapter.
        state = server_state_before(coord, start, fed.store, spec, strategy, task, 3, tmp_path / "h")
        assert state.step == 2

        # Kept from round to round, the replay covers each accepted round once: round 3's state
        # replays only round 2 on top of round 1's, and is the same as the whole replay's.
        memo = ReplayMemo()
        first = server_state_before(coord, start, fed.store, spec, strategy, task, 2, tmp_path / "m1", memo=memo)
        assert first.step == 1 and memo.covered == ((1, accepted[1].aggregate_cid),)
        again = server_state_before(coord, start, fed.store, spec, strategy, task, 3, tmp_path / "m2", memo=memo)
        assert again.step == 2 and memo.covered == ((1, accepted[1].aggregate_cid), (2, accepted[2].aggregate_cid))
        fetched = {p.name for p in (tmp_path / "m2" / "updates").iterdir()}
        assert fetched == {reveals[(2, c)].cid for c in accepted[2].included}  # round 1's not fetched again
        assert all((again.m[k] == state.m[k]).all() for k in state.m) and again.m.keys() == state.m.keys()
        assert first.step == 1  # the kept state was not changed by the step after it
        # A memo that no longer matches the chain (another history) is not trusted: whole replay.
        memo.covered = ((1, "QmSomethingElse"),)
        redone = server_state_before(coord, start, fed.store, spec, strategy, task, 3, tmp_path / "m3", memo=memo)
        assert redone.step == 2 and all((redone.m[k] == state.m[k]).all() for k in state.m)
        assert {p.name for p in (tmp_path / "m3" / "updates").iterdir()} >= {reveals[(1, c)].cid for c in accepted[1].included}
        # The daemon keeps one memo per task for its most recently aggregated tasks only.
        from prismesh.aggregator.daemon import MAX_REPLAY_MEMOS

        for t in range(100, 100 + MAX_REPLAY_MEMOS + 2):
            other._replay_memo(t)
        assert list(other._replayed) == list(range(102, 100 + MAX_REPLAY_MEMOS + 2))
        assert other._replay_memo(103) is other._replay_memo(103)
        contributions = [Contribution(c, reveals[(3, c)].cid, int(reveals[(3, c)].num_samples)) for c in accepted[3].included]
        dirs = {c.cid: fetch_adapter(fed.store, c.cid, tmp_path / "u" / c.cid) for c in contributions}
        from prismesh.aggregator.adapters import load_adapter, save_adapter

        glob = load_adapter(fetch_adapter(fed.store, opened[3].global_adapter_cid, tmp_path / "g"))
        rule = WeightRule.of_task(coord.get_task_params(task))
        updates = round_updates(contributions, dirs, rule)
        with_state = replay_round(strategy, spec, glob, updates, state)
        without = replay_round(strategy, spec, glob, updates, None)
        assert cid_of_path(save_adapter(with_state.adapter, tmp_path / "w")) == accepted[3].aggregate_cid
        assert cid_of_path(save_adapter(without.adapter, tmp_path / "wo")) != accepted[3].aggregate_cid
    finally:
        fed.close()
