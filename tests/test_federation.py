"""End to end on the embedded chain: finality committee, store, three node daemons and the
aggregator daemon run a whole task; then bad updates, determinism and the audit.

A tiny untrained model stands in for the base model: these tests check the system's flow and
its guarantees, not learning quality (the learning tests and the experiment do that).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from prismesh.aggregator.adapters import load_adapter, save_adapter
from prismesh.chain.evm.contracts import TaskStatus
from prismesh.chain.storage import add_adapter, fetch_adapter
from prismesh.chain.storage.unixfs import cid_to_str as unixfs_cid
from prismesh.chain.taskspec import LoraSpec, TaskSpec, model_fingerprint
from prismesh.node.synthetic import make_benchmark
from prismesh.node.trainer import TrainConfig, create_initial_adapter
from prismesh.runs.federation import Federation, TaskSettings, model_config_of
from tests.conftest import tiny_federation_inputs

pytestmark = pytest.mark.timeout(600)

TARGETS = ("q_proj", "v_proj")


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> tuple[Path, list]:
    return tiny_federation_inputs(tmp_path_factory.mktemp("bench"))


def make_spec(base: Path, strategy: str = "fedavg", norm_bound: float = 1e4, report_metrics: bool = False) -> TaskSpec:
    return TaskSpec(
        base_model_id="test/tiny-qwen3",
        base_model_sha256=model_fingerprint(base),
        lora=LoraSpec(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS),
        model_config=model_config_of(base),
        train={"lr": 1e-3, "max_length": 96, "seed": 0},
        strategy=strategy,
        norm_bound=norm_bound,
        report_metrics=report_metrics,
    )


def start(tmp: Path, bench, *, rounds: int = 1, strategy: str = "fedavg", finality: bool = True, parallel: bool = False,
          report_metrics: bool = False):
    base, clients = bench
    fed = Federation(tmp / "fed", finality=finality, parallel=parallel)
    for c in clients:
        fed.add_hospital(c.name, c.train_path, c.test_path, base, device="cpu")
    fed.add_aggregator()
    fed.approve_all()
    spec = make_spec(base, strategy, report_metrics=report_metrics)
    initial = create_initial_adapter(base, tmp / "initial", TrainConfig.from_dict({**spec.train_config(), "device": "cpu"}))
    task = fed.create_task(spec, TaskSettings(num_rounds=rounds, min_participants=2), initial_adapter=initial)
    return fed, task


def test_full_task_with_finality_pays_every_client(tmp_path, bench):
    fed, task = start(tmp_path, bench, rounds=2, report_metrics=True)
    try:
        state = fed.run_task(task)
        assert state.status == TaskStatus.COMPLETED
        coord = fed.coordinator()
        accepted = coord.get_events("AggregateAccepted", fed.manifest.deploy_block, taskId=task)
        assert [ev.round for ev in accepted] == [1, 2]
        addresses = sorted(h.daemon.address for h in fed.hospitals)
        for ev in accepted:
            assert sorted(ev.included) == addresses
        # Round 2 trained from round 1's aggregate.
        opened = {ev.round: ev for ev in coord.get_events("RoundOpened", fed.manifest.deploy_block, taskId=task)}
        assert opened[2].global_adapter_cid == accepted[0].aggregate_cid
        # Published adapters name the task's base model, never a hospital's local model path.
        for cid in [ev.cid for ev in coord.get_events("UpdateRevealed", fed.manifest.deploy_block, taskId=task)] + [
            ev.aggregate_cid for ev in accepted
        ]:
            link = next(lnk for lnk in fed.store.node(cid).links if lnk.name == "adapter_config.json")
            conf = json.loads(fed.store.cat(unixfs_cid(link.cid)))
            assert conf["base_model_name_or_path"] == "test/tiny-qwen3", cid
        # Each round's pool (reward per update x included updates) is split by contribution
        # score; the nodes claimed what they earned when the task completed.
        from prismesh.chain.evm.contracts import RewardToken

        t = RewardToken(fed.manifest, fed.w3, fed.governance)
        earned = coord.get_events("RewardEarned", fed.manifest.deploy_block, taskId=task)
        for ev in accepted:
            shares = [e for e in earned if e.round == ev.round and not e.is_aggregator]
            assert sorted(e.recipient for e in shares) == addresses
            pool = TaskSettings().reward_per_update * len(addresses)
            assert pool - len(shares) <= sum(e.amount for e in shares) <= pool or all(e.score == 0 for e in shares)
        for a in addresses:
            assert t.balance_of(a) == sum(e.amount for e in earned if e.recipient == a)
            assert coord.rewards_owed(task, a) == 0
        # Each node reported its accuracy on both aggregates, each report inside a transaction
        # the node sent anyway: round 1's with its round-2 commitment, round 2's with its claim.
        metrics = coord.get_events("MetricReported", fed.manifest.deploy_block, taskId=task)
        assert sorted((e.round, e.client) for e in metrics) == [(r, a) for r in (1, 2) for a in addresses]
        carriers = {(e.client, e.tx_hash) for e in coord.get_events("UpdateCommitted", fed.manifest.deploy_block,
                                                                     taskId=task) if e.round == 2}
        carriers |= {(e.account, e.tx_hash) for e in coord.get_events("RewardsClaimed", fed.manifest.deploy_block,
                                                                       taskId=task)}
        assert all((e.client, e.tx_hash) in carriers for e in metrics), metrics
        for h in fed.hospitals:
            reports = h.daemon.state.section("metrics")
            assert sorted(reports) == [f"{task}:1", f"{task}:2"] and all(r["sent"] for r in reports.values())
            assert reports[f"{task}:1"]["aggregate_cid"] == accepted[0].aggregate_cid
        # The aggregator claimed its fees when the task completed.
        agg = fed.aggregator.account.address
        assert t.balance_of(agg) == 2 * TaskSettings().aggregator_reward and coord.fees_owed(agg) == 0
        # Each event a node acted on was final when it acted: everything up to the last
        # aggregate is certified by the committee.
        assert fed.committee.final_height >= accepted[-1].block_number
        from prismesh.aggregator.audit import audit_task

        report = audit_task(fed.w3, fed.manifest, fed.store, task)
        assert report.ok, report.render()
        for check in ("aggregate recomputed", "scores recomputed", "rewards recomputed"):
            found = [f for f in report.findings if f.check == check]
            assert len(found) == 2 and all(f.ok for f in found), check
        assert any(f.check == "finality certificate" for f in report.findings)
        # The aggregator scored against what it followed in its own events; the chain agrees.
        from prismesh.aggregator.contribution import published_cids

        for rnd in (1, 2):
            assert fed.aggregator._published_cids(task, rnd) == published_cids(coord, task, rnd)
        # What it verified and merged it kept, measured, for the rounds after: round 2 scored
        # against round 1's reveals and global without fetching them again.
        kept = fed.aggregator._published
        assert len(kept) >= len(set(published_cids(coord, task, 2)))
        for cid in published_cids(coord, task, 2):
            assert kept.get(cid, lambda cid=cid: pytest.fail(f"{cid} fetched again")).finite

        # Tamper with one stored client adapter: the audit must fail and name it.
        victim = coord.get_events("UpdateRevealed", fed.manifest.deploy_block, taskId=task)[0]
        root = fed.store.node(victim.cid)
        link = next(lnk for lnk in root.links if lnk.name == "adapter_model.safetensors")
        path = fed.store.block_path(link.cid)
        raw = bytearray(path.read_bytes())
        raw[-1] ^= 0x01
        path.write_bytes(bytes(raw))
        tampered = audit_task(fed.w3, fed.manifest, fed.store, task)
        assert not tampered.ok
        failed = tampered.failures()
        assert any(f.check == "adapter vs CID" and victim.cid in f.subject for f in failed), tampered.render()
        assert any(f.check == "aggregate recomputed" and f"round {victim.round}" in f.subject for f in failed)
    finally:
        fed.close()


def _corrupting(fed, node, how: str, tmp: Path) -> None:
    """Make ``node`` publish a bad adapter: NaN weights, a wrong shape, or stored bytes that do
    not match the CID it reveals (its own honest training runs first, as a real node's would)."""
    import hashlib

    original = node.daemon._train_and_pin

    def train_and_pin(task, rnd, global_cid, spec, rec):
        rec = original(task, rnd, global_cid, spec, rec)
        ad = load_adapter(fetch_adapter(fed.store, rec["cid"], tmp / f"{how}-src"))
        tensors = dict(ad.tensors)
        key = sorted(tensors)[0]
        if how == "nan":
            arr = np.array(tensors[key], dtype=np.float32)
            arr.flat[0] = np.nan
            tensors[key] = arr
        elif how == "shape":
            tensors[key] = np.zeros((3, 3), dtype=np.float32)
        out = save_adapter(type(ad)(ad.config, tensors), tmp / f"{how}-out")
        cid = add_adapter(fed.store, out)
        if how == "tamper":
            root = fed.store.node(cid)
            link = next(lnk for lnk in root.links if lnk.name == "adapter_model.safetensors")
            path = fed.store.block_path(link.cid)
            raw = bytearray(path.read_bytes())
            raw[len(raw) // 2] ^= 0xFF
            path.write_bytes(bytes(raw))
        digest = hashlib.sha256((out / "adapter_model.safetensors").read_bytes()).hexdigest()
        rec.update(cid=cid, sha256=digest)
        node.daemon.state.save()
        return rec

    node.daemon._train_and_pin = train_and_pin


def test_bad_updates_are_excluded_with_reasons_and_honest_clients_paid(tmp_path, bench):
    base, clients = bench
    fed = Federation(tmp_path / "fed", finality=False, parallel=True)
    try:
        extra = make_benchmark(tmp_path / "more", seed=1, scale=0.05)
        for i, c in enumerate((clients + extra)[:5]):
            fed.add_hospital(f"site-{i}", c.train_path, c.test_path, base, device="cpu")
        fed.add_aggregator()
        fed.approve_all()
        spec = make_spec(base)
        initial = create_initial_adapter(base, tmp_path / "initial", TrainConfig.from_dict({**spec.train_config(), "device": "cpu"}))
        task = fed.create_task(spec, TaskSettings(num_rounds=1, min_participants=2), initial_adapter=initial)
        honest = fed.hospitals[:2]
        bad = {"nan": fed.hospitals[2], "shape": fed.hospitals[3], "tamper": fed.hospitals[4]}
        for how, node in bad.items():
            _corrupting(fed, node, how, tmp_path)
        state = fed.run_task(task)
        assert state.status == TaskStatus.COMPLETED
        rec = fed.aggregator.state.section("rounds")[f"{task}:1"]
        assert rec["included"] == sorted(h.daemon.address for h in honest)
        rejected = rec["rejected"]
        assert set(rejected) == {n.daemon.address for n in bad.values()}
        assert "finite" in rejected[bad["nan"].daemon.address].lower()
        assert "shape" in rejected[bad["shape"].daemon.address].lower()
        assert "fetch failed" in rejected[bad["tamper"].daemon.address].lower()
        # The report file names every exclusion too.
        report = json.loads((fed.aggregator.reports_dir / f"task{task}-round1.json").read_text())
        assert set(report["rejected"]) == set(rejected)
        from prismesh.chain.evm.contracts import RewardToken

        token = RewardToken(fed.manifest, fed.w3, fed.governance)
        coord = fed.coordinator()
        earned = coord.get_events("RewardEarned", fed.manifest.deploy_block, taskId=task)
        assert {e.recipient for e in earned if not e.is_aggregator} == {h.daemon.address for h in honest}
        for h in honest:
            assert token.balance_of(h.daemon.address) == sum(e.amount for e in earned if e.recipient == h.daemon.address)
        for n in bad.values():  # excluded updates earn nothing
            assert token.balance_of(n.daemon.address) == 0 == coord.rewards_owed(task, n.daemon.address)
    finally:
        fed.close()
