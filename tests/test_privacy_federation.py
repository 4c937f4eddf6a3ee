"""Sealed updates end to end on the embedded chain: three hospitals seal their adapters to the
aggregator and an appointed auditor, the aggregator adds client-level DP noise and seals the
aggregate to the members; two misbehaving nodes (one seals to the wrong recipients, one reveals
a hash its plaintext does not have) are refused with their reasons and earn nothing; a party
without a key cannot read an update from the store; the audit re-derives everything with the
auditor's key (the DP noise included) and, without it, says what it could not check."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prismesh.chain.evm.contracts import TaskStatus
from prismesh.chain.sealing import (
    NotARecipient,
    SealContext,
    fetch_any_adapter,
    new_box_key,
    read_header,
)
from prismesh.chain.taskspec import LoraSpec, TaskSpec, model_fingerprint
from prismesh.node.daemon import NodeDaemon
from prismesh.node.trainer import TrainConfig, create_initial_adapter
from prismesh.runs.federation import Federation, TaskSettings, model_config_of
from tests.conftest import tiny_federation_inputs

pytestmark = [pytest.mark.timeout(900), pytest.mark.slow]


class WrongRecipients(NodeDaemon):
    """Seals its update to the auditor only: the aggregator holds no key for it."""

    def _pin_update(self, task, rnd, adapter_dir, privacy, keep=None):
        from dataclasses import replace

        only_auditor = replace(privacy, recipients=privacy.recipients[1:])
        return super()._pin_update(task, rnd, adapter_dir, only_auditor, keep)


class HashLiar(NodeDaemon):
    """Reveals a plaintext hash its sealed adapter does not have."""

    def _train_and_pin(self, task, rnd, global_cid, spec, rec):
        rec = super()._train_and_pin(task, rnd, global_cid, spec, rec)
        if rec.get("stage") == "pinned" and not rec.get("lied"):
            import hashlib

            rec["sha256"] = hashlib.sha256(f"not my weights {task}/{rnd}".encode()).hexdigest()
            rec["lied"] = True
            self.state.save()
        return rec


@pytest.fixture(scope="module")
def sealed_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("sealed")
    base, clients = tiny_federation_inputs(root / "bench")
    fed = Federation(root / "fed", parallel=False)
    for c in clients:
        fed.add_hospital(c.name, c.train_path, c.test_path, base, device="cpu")
    # The misbehaving nodes train on other hospitals' test files: updates of their own.
    fed.add_hospital("wrong-recipients", clients[0].test_path, clients[0].test_path, base, node_class=WrongRecipients)
    fed.add_hospital("hash-liar", clients[1].test_path, clients[1].test_path, base, node_class=HashLiar)
    fed.add_aggregator()
    auditor, auditor_key = fed.add_auditor()
    fed.approve_all()
    spec = TaskSpec(
        base_model_id="test/tiny-qwen3",
        base_model_sha256=model_fingerprint(base),
        lora=LoraSpec(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=("q_proj", "v_proj")),
        model_config=model_config_of(base),
        train={"lr": 1e-3, "max_length": 96, "seed": 0},
        strategy="fedavg-exact",
        report_metrics=False,
        privacy={
            "recipients": [fed.aggregator.account.address, auditor.address],
            "aggregate": "members",
            "client_dp": {"clip": 0.5, "noise_multiplier": 1.0, "where": "aggregator"},
            "delta": 1e-5,
            "epsilon_budget": 20.0,
        },
    )
    initial = create_initial_adapter(base, root / "initial", TrainConfig.from_dict({**spec.train_config(), "device": "cpu"}))
    task = fed.create_task(spec, TaskSettings(num_rounds=2, min_participants=2), initial_adapter=initial)
    state = fed.run_task(task)
    yield fed, task, state, auditor_key
    fed.close()


def test_sealed_round_end_to_end_with_refusals(sealed_run) -> None:
    fed, task, state, _ = sealed_run
    assert state.status == TaskStatus.COMPLETED
    coord = fed.coordinator()
    start = fed.manifest.deploy_block
    names = {h.daemon.address: h.name for h in fed.hospitals}
    honest = sorted(h.daemon.address for h in fed.hospitals[:3])
    bad = {h.name: h.daemon.address for h in fed.hospitals[3:]}
    accepted = coord.get_events("AggregateAccepted", start, taskId=task)
    assert [a.round for a in accepted] == [1, 2]
    for acc in accepted:
        assert sorted(acc.included) == honest
        # The aggregate is sealed to every member and recipient; round 2 trained from it.
        header = read_header(fed.store.cat(acc.aggregate_cid))
        assert header.context.kind == "aggregate" and header.context.round == acc.round
        assert {a.lower() for a in header.recipient_addresses()} >= {a.lower() for a in honest}
    # Each refusal is recorded with its reason, naming the client and round.
    for rnd in (1, 2):
        report = json.loads((fed.root / "aggregator" / "rounds" / f"task{task}-round{rnd}.json").read_text())
        rejected = report["rejected"]
        assert set(rejected) == set(bad.values()), rejected
        assert "NotARecipient" in rejected[bad["wrong-recipients"]]
        assert f"task {task} round {rnd} update of client {bad['wrong-recipients'].lower()}" in rejected[bad["wrong-recipients"]]
        assert "differs from the revealed" in rejected[bad["hash-liar"]]
        privacy = report["metrics"]["privacy"]
        assert privacy["client_epsilon_per_round"][-1] == privacy["client_epsilon"] > 0 and privacy["rounds"] == rnd
    # The refused clients earned nothing.
    earned = coord.get_events("RewardEarned", start, taskId=task)
    assert not [e for e in earned if e.recipient in bad.values()]
    for address in bad.values():
        assert coord.rewards_owed(task, address) == 0
    assert {names[e.recipient] for e in earned if not e.is_aggregator} == {names[a] for a in honest}


def test_a_party_without_a_key_cannot_read_an_update(sealed_run, tmp_path) -> None:
    fed, task, _, auditor_key = sealed_run
    coord = fed.coordinator()
    reveal = next(ev for ev in coord.get_events("UpdateRevealed", fed.manifest.deploy_block, taskId=task)
                  if ev.client == fed.hospitals[0].daemon.address)
    blob = fed.store.cat(reveal.cid)
    kept = fed.hospitals[0].daemon.state.section("rounds")[f"{task}:{reveal.round}"]["dir"]
    plain = (Path(kept) / "adapter_model.safetensors").read_bytes()
    assert plain[8:200] not in blob  # the weights never appear in what the store serves
    with pytest.raises(NotARecipient, match=f"round {reveal.round} update of client"):
        fetch_any_adapter(fed.store, reveal.cid, tmp_path / "nokey")
    with pytest.raises(NotARecipient):
        fetch_any_adapter(fed.store, reveal.cid, tmp_path / "wrongkey", new_box_key())
    expected = SealContext(fed.manifest.chain_id, coord.address, task, reveal.round, reveal.client, "update")
    opened = fetch_any_adapter(fed.store, reveal.cid, tmp_path / "auditor", auditor_key, expected)
    assert (opened / "adapter_model.safetensors").read_bytes() == plain


def test_audit_with_and_without_the_auditor_key(sealed_run) -> None:
    from prismesh.aggregator.audit import audit_task

    fed, task, _, auditor_key = sealed_run
    bad = {h.daemon.address for h in fed.hospitals[3:]}
    with_key = audit_task(fed.w3, fed.manifest, fed.store, task, key=auditor_key)
    checks = {f.check for f in with_key.findings}
    assert {"aggregate recomputed", "dp noise reproduced", "scores recomputed", "rewards recomputed",
            "opened with key", "sealed to recipients", "sealed for its round"} <= checks
    # The refused updates fail no check: their problems are findings, and the audit re-derives
    # each refusal (the auditor can open the update sealed to it alone; the aggregator could not).
    assert with_key.ok, with_key.render()
    for b in bad:
        refused = [f for f in with_key.findings if f.check == "exclusion re-derived" and b in f.subject]
        assert len(refused) == 2, with_key.render()
    wrong = [f for f in with_key.findings if f.check == "sealed to recipients" and "refused, not paid" in f.detail]
    assert len(wrong) == 2 and all(f.ok for f in wrong), with_key.render()
    for check in ("aggregate recomputed", "dp noise reproduced", "scores recomputed"):
        found = [f for f in with_key.findings if f.check == check]
        assert len(found) == 2 and all(f.ok for f in found), with_key.render()
    assert not with_key.unchecked

    without = audit_task(fed.w3, fed.manifest, fed.store, task)
    assert {f.check for f in without.unchecked} == {"adapter vs sha256", "inclusion re-derived", "aggregate recomputed",
                                                    "scores recomputed"}
    assert all("key" in f.detail for f in without.unchecked)
    assert {f.check for f in without.findings if f.ok} >= {"adapter vs CID", "sealed for its round", "rewards recomputed",
                                                           "within budget", "aggregate stored", "finality certificate"}
    assert without.ok, without.render()
    assert "not checked" in without.render()
