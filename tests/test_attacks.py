"""The attack harness: each behaviour's crafted adapter, and malicious hospitals run through the
real daemons on the chain, where the robust default excludes them, they earn nothing and the
audit re-derives every exclusion."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from prismesh.aggregator.adapters import Adapter, load_adapter
from prismesh.aggregator.updates import module_update_norms, update_gram
from prismesh.aggregator.verify import expected_lora_shapes, verify_adapter
from prismesh.chain.evm.contracts import TaskStatus
from prismesh.chain.taskspec import TaskSpec
from prismesh.node.data import load_jsonl, write_jsonl
from prismesh.node.trainer import TrainConfig, create_initial_adapter, train_lora
from prismesh.runs.attacks import ATTACKS, MAX_SAMPLES, Attack, attacker_data, craft
from prismesh.runs.federation import Federation, TaskSettings
from tests.conftest import tiny_federation_inputs
from tests.test_federation import make_spec

pytestmark = pytest.mark.timeout(900)
BOUND = 50.0


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> tuple[Path, list]:
    return tiny_federation_inputs(tmp_path_factory.mktemp("bench"))


def spec_for(base: Path, strategy: str = "clipped-fedavg") -> TaskSpec:
    return make_spec(base, strategy, norm_bound=BOUND)


@pytest.fixture(scope="module")
def round_two(bench, tmp_path_factory):
    """A round-2 situation: a global adapter trained one round, an honest update from it, and
    the attacker's own update trained on its data."""
    base, clients = bench
    tmp = tmp_path_factory.mktemp("craft")
    spec = spec_for(base)
    cfg = TrainConfig.from_dict({**spec.train_config(), "device": "cpu"})
    init = create_initial_adapter(base, tmp / "init", cfg)
    train = {c.name: load_jsonl(c.train_path) for c in clients}
    glob = train_lora(base, train[clients[0].name], tmp / "g", cfg, init_adapter=init, progress=False).adapter_dir
    honest = train_lora(base, train[clients[1].name], tmp / "h", cfg, init_adapter=glob, progress=False)
    own = train_lora(base, attacker_data(train, Attack("wrong-answers")), tmp / "w", cfg, init_adapter=glob, progress=False)
    expected = expected_lora_shapes(spec.model_config, spec.lora.to_dict())
    return spec, expected, load_adapter(glob), load_adapter(honest.adapter_dir), load_adapter(own.adapter_dir), own.num_samples, train


def test_attacker_data_is_drawn_from_the_task_and_poisoned_when_asked(round_two):
    *_, train = round_two
    clean = attacker_data(train, Attack("sign-flip", seed=3))
    wrong = attacker_data(train, Attack("wrong-answers", seed=3))
    pool = {m.id: m for v in train.values() for m in v}
    assert len(clean) == sorted(len(v) for v in train.values())[1]
    assert all(m.id in pool and m.answer == pool[m.id].answer for m in clean)
    assert all(m.answer != pool[m.id].answer and m.answer in m.options for m in wrong)
    assert attacker_data(train, Attack("wrong-answers", seed=3)) == wrong  # seeded


@pytest.mark.parametrize("kind", [k for k in ATTACKS if k != "collude"] + ["collude"])
def test_each_crafted_adapter_passes_the_per_update_checks_as_the_attack_intends(round_two, kind):
    spec, expected, glob, honest, own, n, _ = round_two
    attack = Attack(kind, norm_bound=BOUND)
    adapter, count = craft(attack, own, glob, n, n_clients=4)
    again, _ = craft(attack, own, glob, n, n_clients=4)
    assert all(np.array_equal(adapter.tensors[k], again.tensors[k]) for k in adapter.tensors)  # deterministic
    sizes = module_update_norms(adapter, glob)
    own_sizes = module_update_norms(own, glob)
    reasons = verify_adapter(adapter, expected, spec.lora.to_dict(), spec.norm_bound, glob)
    assert reasons == [], reasons  # every attack is built to pass the per-update checks
    assert count == (MAX_SAMPLES if kind == "inflated-count" else n)
    top = max(sizes.values())
    if kind in ("sign-flip", "noise"):
        assert 0.9 * BOUND < top <= BOUND
    elif kind in ("boosted-replacement", "inflated-count"):
        assert top > 2 * max(own_sizes.values())
    elif kind == "free-rider":
        assert top < 0.01 * max(module_update_norms(glob, None).values())
    elif kind == "wrong-answers":
        assert all(np.array_equal(adapter.tensors[k], own.tensors[k]) for k in own.tensors)
    gram = update_gram([adapter, own, honest], glob)
    cos = gram[0, 1] / np.sqrt(gram[0, 0] * gram[1, 1])
    if kind in ("sign-flip", "collude"):
        assert cos < -0.9  # the attacker's own update, negated (up to the rank-r truncation)
    if kind == "collude":
        assert max(sizes.values()) < 2 * max(own_sizes.values())  # at its natural size


def test_experiment_loop_takes_attackers(bench, tmp_path):
    """``prismesh experiment --attack``'s loop: the attackers join each round and pass through
    the daemon's per-update checks before the strategy."""
    from prismesh.runs.experiment import federate

    base, clients = bench
    spec = spec_for(base)
    cfg = TrainConfig.from_dict({**spec.train_config(), "device": "cpu"})
    init = create_initial_adapter(base, tmp_path / "init", cfg)
    train = {c.name: load_jsonl(c.train_path) for c in clients}
    _, hist = federate(base, train, cfg, "clipped-fedavg", 2, tmp_path / "work", init,
                       attack=Attack("free-rider"), malicious=1)
    assert "empty update" in hist[0]["strategy_metrics"]["rejected"]["malicious-1"]
    assert "unchanged" in hist[1]["strategy_metrics"]["excluded"]["malicious-1"]


def test_unknown_attack_is_refused():
    with pytest.raises(ValueError, match="unknown attack 'nope'; known: sign-flip"):
        Attack("nope")


def test_malicious_hospitals_through_the_daemons_are_excluded_and_earn_nothing(tmp_path, bench):
    """Three honest hospitals, a sign-flipper at the norm bound and a free rider, two rounds
    through the real node and aggregator daemons on the chain with finality: the default
    strategy keeps exactly the honest updates each round (the free rider's round-1 copy of the
    global is rejected as empty, its round-2 nudge excluded as too small; the flipped update is
    excluded as far above the round's median), only honest hospitals are paid, and the audit
    re-derives every inclusion and exclusion."""
    base, clients = bench
    train = {c.name: load_jsonl(c.train_path) for c in clients}
    fed = Federation(tmp_path / "fed", finality=True, parallel=False)
    try:
        for c in clients:
            fed.add_hospital(c.name, c.train_path, c.test_path, base, device="cpu")
        bad = {}
        for kind in ("sign-flip", "free-rider"):
            data = tmp_path / f"{kind}.jsonl"
            write_jsonl(data, attacker_data(train, Attack(kind), fmt="medqa"))
            bad[kind] = fed.add_hospital(kind, data, clients[0].test_path, base, device="cpu", attack=Attack(kind))
        fed.add_aggregator()
        fed.approve_all()
        spec = spec_for(base, TaskSpec.__dataclass_fields__["strategy"].default)
        assert spec.strategy == "clipped-fedavg"  # the default for new tasks
        initial = create_initial_adapter(base, tmp_path / "initial", TrainConfig.from_dict({**spec.train_config(), "device": "cpu"}))
        task = fed.create_task(spec, TaskSettings(num_rounds=2, min_participants=2), initial_adapter=initial)
        state = fed.run_task(task)
        assert state.status == TaskStatus.COMPLETED
        honest = sorted(h.daemon.address for h in fed.hospitals[:3])
        flip, free = bad["sign-flip"].daemon.address, bad["free-rider"].daemon.address
        coord = fed.coordinator()
        accepted = coord.get_events("AggregateAccepted", fed.manifest.deploy_block, taskId=task)
        assert [sorted(ev.included) for ev in accepted] == [honest, honest]
        r1 = fed.aggregator.state.section("rounds")[f"{task}:1"]
        r2 = fed.aggregator.state.section("rounds")[f"{task}:2"]
        assert "empty update" in r1["rejected"][free]
        assert "above 2x" in r1["excluded"][flip]
        assert "unchanged" in r2["excluded"][free] and flip in r2["excluded"]
        report = json.loads((fed.aggregator.reports_dir / f"task{task}-round2.json").read_text())
        assert set(report["excluded"]) == {flip, free}
        from prismesh.chain.evm.contracts import RewardToken

        token = RewardToken(fed.manifest, fed.w3, fed.governance)
        earned = coord.get_events("RewardEarned", fed.manifest.deploy_block, taskId=task)
        for a in honest:
            assert token.balance_of(a) == sum(e.amount for e in earned if e.recipient == a) > 0
        for a in (flip, free):
            assert token.balance_of(a) == 0 == coord.rewards_owed(task, a)
            assert not [e for e in earned if e.recipient == a]

        from prismesh.aggregator.audit import audit_task

        audit = audit_task(fed.w3, fed.manifest, fed.store, task)
        assert audit.ok, audit.render()
        excl = [f for f in audit.findings if f.check == "exclusion re-derived"]
        assert len(excl) == 4 and {f.subject.split()[-1] for f in excl} == {flip, free}
        assert sum(f.check == "inclusion re-derived" for f in audit.findings) == 2
    finally:
        fed.close()


def test_audit_flags_an_honest_update_left_out(tmp_path, bench):
    """An aggregator that leaves out an honest update (here: pays only two of three) is caught:
    the audit re-derives who passes the checks and who the strategy keeps."""
    base, clients = bench
    fed = Federation(tmp_path / "fed", finality=False, parallel=False)
    try:
        for c in clients:
            fed.add_hospital(c.name, c.train_path, c.test_path, base, device="cpu")
        agg = fed.add_aggregator()
        fed.approve_all()
        spec = spec_for(base)
        initial = create_initial_adapter(base, tmp_path / "initial", TrainConfig.from_dict({**spec.train_config(), "device": "cpu"}))
        task = fed.create_task(spec, TaskSettings(num_rounds=1, min_participants=2), initial_adapter=initial)
        victim = fed.hospitals[0].daemon.address
        compute = agg.compute

        def biased(task_id, rnd, params, rec):
            rec = {**rec, "reveals": {c: r for c, r in rec["reveals"].items() if c != victim}}
            return compute(task_id, rnd, params, rec)

        agg.compute = biased
        assert fed.run_task(task).status == TaskStatus.COMPLETED
        from prismesh.aggregator.audit import audit_task

        audit = audit_task(fed.w3, fed.manifest, fed.store, task, check_finality=False)
        failed = {f.check: f for f in audit.failures()}
        assert "inclusion re-derived" in failed and victim in failed["inclusion re-derived"].detail
        assert "passes every check" in failed["inclusion re-derived"].detail
        assert "aggregate recomputed" in failed
    finally:
        fed.close()


def test_free_rider_in_round_one_is_the_global_itself(round_two):
    spec, expected, glob, _, own, n, _ = round_two
    initial_like = Adapter(glob.config, {k: (np.zeros_like(v) if k.endswith(".lora_B.weight") else v) for k, v in glob.tensors.items()})
    adapter, _ = craft(Attack("free-rider"), own, initial_like, n, 4)
    assert all(np.array_equal(adapter.tensors[k], initial_like.tensors[k]) for k in adapter.tensors)
    assert verify_adapter(adapter, expected, spec.lora.to_dict(), None, initial_like) == [
        "empty update: the adapter makes no change to the round's global adapter"
    ]


def test_each_attack_against_the_default_in_process(tmp_path, bench):
    """Every attack of the harness against the default strategy on the in-process federation
    (the small seeded benchmark, the tiny model), two rounds through the daemon's per-update
    checks. Every attack but the honest-size wrong-answer poisoning is rejected or excluded in
    every round, so the final global is the honest run's byte for byte and Min-Acc is the same
    (within any bound); the wrong-answer adapter looks like a hospital with other data and is
    kept, at no more than an honest hospital's share (docs/robustness.md: what the default cannot
    see; the learning effect of every cell is the robustness benchmark's table)."""
    from prismesh.runs.robustness import make_setup, run_cell

    setup = make_setup(tmp_path, seed=0, scale=0.05, base=bench[0])
    honest = run_cell(setup, "clipped-fedavg", None, 0, rounds=2)
    weights = (Path(honest["final"]) / "adapter_model.safetensors").read_bytes()
    for kind in ATTACKS:
        attack = Attack(kind)
        cell = run_cell(setup, "clipped-fedavg", attack, attack.clients, rounds=2)
        for h in cell["rounds"]:
            assert all(c.startswith("malicious-") for c in h["rejected"]), h["rejected"]
            assert [c for c in h["included"] if not c.startswith("malicious-")] == sorted(setup.train)
            if kind != "wrong-answers":
                assert not any(c.startswith("malicious-") for c in h["included"]), (kind, h)
                assert {c for c in h["coefficients"] if c.startswith("malicious-")} <= set(h["excluded"])
            else:
                share = h["coefficients"]["malicious-1"]
                assert 0 < share <= max(v for c, v in h["coefficients"].items() if c != "malicious-1") + 1e-9
        if kind != "wrong-answers":
            assert (Path(cell["final"]) / "adapter_model.safetensors").read_bytes() == weights, kind
            assert cell["accuracy"] == honest["accuracy"] and abs(cell["min_acc"] - honest["min_acc"]) <= 0.03
