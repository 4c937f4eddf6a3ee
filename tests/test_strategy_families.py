"""The strategies that close the gap: fairness-aware weighting, FedProx, and the server-side
optimisers (FedAvgM, FedAdam, FedYogi) wrapping any inner rule — checked against hand-computed
updates on real PEFT adapters, and each run on a tiny federation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from prismesh.aggregator.adapters import Adapter, save_adapter
from prismesh.aggregator.strategies import (
    ClientUpdate,
    ServerState,
    aggregate,
    client_settings,
    get_strategy,
)
from prismesh.aggregator.strategies.fair import fair_weights
from tests.test_strategies import client_dirs, updates  # noqa: F401 - shared fixtures


def _f64(adapter: Adapter) -> dict[str, np.ndarray]:
    return {k: np.asarray(v, np.float64) for k, v in adapter.tensors.items()}


def _shifted(ups: list[ClientUpdate], amount: float) -> list[ClientUpdate]:
    """The same clients one round later: every tensor moved by ``amount`` (a second round)."""
    return [ClientUpdate(u.client, u.num_samples,
                         Adapter(u.adapter.config, {k: (np.asarray(v) + amount * (i + 1)).astype(np.float32)
                                                    for k, v in u.adapter.tensors.items()}))
            for i, u in enumerate(ups)]


def test_fair_weights_power_and_cap():
    n = np.array([300.0, 100.0, 25.0])
    np.testing.assert_allclose(fair_weights(n, 1.0), n / n.sum())
    np.testing.assert_allclose(fair_weights(n, 0.0), [1 / 3] * 3)
    sq = np.sqrt(n)
    np.testing.assert_allclose(fair_weights(n, 0.5), sq / sq.sum())
    capped = fair_weights(n, 1.0, cap=0.5)
    assert capped.sum() == pytest.approx(1.0) and capped[0] == pytest.approx(0.5)
    np.testing.assert_allclose(capped[1:], 0.5 * n[1:] / n[1:].sum())  # excess shared in proportion
    twice = fair_weights(np.array([1000.0, 900.0, 10.0]), 1.0, cap=0.4)  # two clients over the cap
    np.testing.assert_allclose(twice, [0.4, 0.4, 0.2])
    assert fair_weights(n, 1.0, cap=0.2).sum() == pytest.approx(1.0)  # cap below 1/n: unreachable, ignored


def test_fairavg_is_a_reweighted_mean(updates):  # noqa: F811
    fed = get_strategy("fedavg").aggregate(updates, None)
    same = get_strategy("fairavg", power=1.0).aggregate(updates, None)
    for k in fed.adapter.tensors:  # power 1 is FedAvg, byte for byte
        assert fed.adapter.tensors[k].tobytes() == same.adapter.tensors[k].tobytes()
    uni = get_strategy("fairavg").aggregate(updates, None)
    assert uni.metrics["weights"] == {u.client: pytest.approx(1 / 3) for u in updates}
    assert uni.metrics["sample_weights"]["0xclient2"] == pytest.approx(300 / 465)
    key = sorted(updates[0].adapter.tensors)[0]
    want = sum(np.asarray(u.adapter.tensors[key], np.float64) for u in updates) / 3
    np.testing.assert_allclose(uni.adapter.tensors[key], want, rtol=1e-6, atol=1e-8)
    for bad, match in (({"power": 2.0}, "power"), ({"cap": 0.0}, "cap"), ({"pow": 1}, "bad options")):
        with pytest.raises(ValueError, match=match):
            get_strategy("fairavg", **bad)


def test_fedavgm_momentum_against_hand_computation(updates):  # noqa: F811
    g = updates[0].adapter
    s = get_strategy("fedavgm", inner="fairavg", lr=2.0, momentum=0.5)
    assert s.stateful and s.options()["inner_options"] == {"power": 0.0, "cap": None}
    r1 = s.aggregate(updates, g, state=None)
    inner1 = _f64(get_strategy("fairavg").aggregate(updates, g).adapter)
    x0 = _f64(g)
    d1 = {k: inner1[k] - x0[k] for k in x0}
    for k in x0:
        np.testing.assert_allclose(r1.adapter.tensors[k], x0[k] + 2.0 * d1[k], rtol=1e-5, atol=1e-6)
    assert r1.state.step == 1
    # Round 2 starts from round 1's aggregate; momentum carries half of round 1's step.
    x1 = r1.adapter
    later = _shifted(updates, 0.01)
    r2 = aggregate(s, later, x1, r1.state)
    inner2 = _f64(get_strategy("fairavg").aggregate(later, x1).adapter)
    for k in x0:
        d2 = inner2[k] - np.asarray(x1.tensors[k], np.float64)
        np.testing.assert_allclose(r2.adapter.tensors[k], np.asarray(x1.tensors[k], np.float64) + 2.0 * (0.5 * d1[k] + d2),
                                   rtol=1e-5, atol=1e-6)
    assert r2.state.step == 2 and r2.metrics["server_move_norm"] > 0
    # Without momentum, fedavgm is FedAvg with a server learning rate.
    plain = get_strategy("fedavgm", lr=1.5, momentum=0.0).aggregate(updates, g).adapter
    srv = get_strategy("fedavg", server_lr=1.5).aggregate(updates, g).adapter
    for k in x0:
        np.testing.assert_allclose(plain.tensors[k], srv.tensors[k], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["fedadam", "fedyogi"])
def test_adaptive_server_optimizers_against_hand_computation(updates, name):  # noqa: F811
    g = updates[0].adapter
    b1, b2, tau, lr = 0.9, 0.99, 1e-3, 0.01
    s = get_strategy(name, lr=lr, beta1=b1, beta2=b2, tau=tau)
    x = _f64(g)
    m = {k: 0.0 for k in x}
    v = {k: np.full(x[k].shape, tau**2) for k in x}
    state, glob = None, g
    for ups in (updates, _shifted(updates, 0.003)):
        res = s.aggregate(ups, glob, state=state)
        inner = _f64(get_strategy("fedavg").aggregate(ups, glob).adapter)
        for k in x:
            d = inner[k] - x[k]
            m[k] = b1 * m[k] + (1 - b1) * d
            if name == "fedadam":
                v[k] = b2 * v[k] + (1 - b2) * d**2
            else:
                v[k] = v[k] - (1 - b2) * d**2 * np.sign(v[k] - d**2)
            x[k] = x[k] + lr * m[k] / (np.sqrt(v[k]) + tau)
            np.testing.assert_allclose(res.adapter.tensors[k], x[k], rtol=1e-5, atol=1e-6)
            x[k] = np.asarray(res.adapter.tensors[k], np.float64)  # the next round starts from the stored bytes
        state, glob = res.state, res.adapter
    assert state.step == 2


def test_server_optimizers_are_deterministic_and_refuse_what_they_cannot_wrap(updates, tmp_path):  # noqa: F811
    g = updates[0].adapter
    s = get_strategy("fedadam", inner="fairavg", inner_options={"power": 0.5})
    a = s.aggregate(updates, g, state=ServerState()).adapter
    b = s.aggregate(list(reversed(updates)), g, state=None).adapter
    assert (save_adapter(a, tmp_path / "a") / "adapter_model.safetensors").read_bytes() == \
        (save_adapter(b, tmp_path / "b") / "adapter_model.safetensors").read_bytes()
    # A task starting from the bare base model has no pseudo-gradient in round 1.
    bare = Adapter(g.config, {})
    first = s.aggregate(updates, bare, state=None)
    assert first.state.step == 0 and "skipped" in first.metrics["server_step"]
    with pytest.raises(ValueError, match="re-factorises"):
        get_strategy("fedavgm", inner="fedavg-exact")
    for robust in ("clipped-fedavg", "trimmed-mean"):  # rules in ΔW space: only momentum 0 moves them
        with pytest.raises(ValueError, match="re-factorises"):
            get_strategy("fedadam", inner=robust)
        assert get_strategy("fedavgm", inner=robust, momentum=0.0).options()["momentum"] == 0.0
    with pytest.raises(ValueError, match="stateful"):
        get_strategy("fedavgm", inner="fedadam")
    with pytest.raises(ValueError, match="unknown aggregation strategy"):
        get_strategy("fedyogi", inner="nope")
    for name, bad, match in (("fedavgm", {"lr": 0}, "lr"), ("fedavgm", {"momentum": 1.0}, "momentum"),
                             ("fedadam", {"tau": -1.0}, "tau"), ("fedyogi", {"beta2": 1.0}, "beta2")):
        with pytest.raises(ValueError, match=match):
            get_strategy(name, **bad)


def test_fedavg_exact_server_lr_scales_the_dense_update(updates):  # noqa: F811
    from tests.test_strategies import dense_delta, weighted_dense_delta

    g = updates[0].adapter
    # Output rank 16 holds the three clients' and the global's rank-4 terms: no truncation.
    wide = Adapter({**g.config, "r": 16, "lora_alpha": 32}, g.tensors)
    res = get_strategy("fedavg-exact", server_lr=2.0).aggregate(updates, wide)
    assert res.metrics["rel_frobenius_error_max"] < 1e-6
    for m in g.lora_modules():
        want = (1.0 - 2.0) * dense_delta(g, m) + 2.0 * weighted_dense_delta(updates, m)
        np.testing.assert_allclose(dense_delta(res.adapter, m), want, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="global adapter"):
        get_strategy("fedavg-exact", server_lr=2.0).aggregate(updates, None)
    # A server learning rate wraps a rule that re-factorises ΔW by moving ΔW itself.
    wrapped = get_strategy("fedavgm", inner="fedavg-exact", lr=2.0, momentum=0.0).aggregate(updates, wide)
    for m in g.lora_modules():
        np.testing.assert_allclose(dense_delta(wrapped.adapter, m), dense_delta(res.adapter, m), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="re-factorises"):
        get_strategy("fedadam", inner="fedavg-exact")


def test_fedprox_requires_the_proximal_term_of_clients(updates):  # noqa: F811
    s = get_strategy("fedprox", mu=0.05)
    assert s.client_train_settings() == {"prox_mu": 0.05}
    assert client_settings("fedprox", {"mu": 0.05}) == {"prox_mu": 0.05}
    assert client_settings("fedavgm", {"inner": "fedprox", "inner_options": {"mu": 0.1}}) == {"prox_mu": 0.1}
    assert client_settings("fedavg") == {}
    plain = get_strategy("fedavg").aggregate(updates, None).adapter
    prox = s.aggregate(updates, None)
    assert prox.metrics["strategy"] == "fedprox"
    for k in plain.tensors:
        assert plain.tensors[k].tobytes() == prox.adapter.tensors[k].tobytes()
    with pytest.raises(ValueError, match="mu"):
        get_strategy("fedprox", mu=0)


def test_proximal_term_keeps_the_update_near_the_start(tmp_path):
    """FedProx in the trainer: a large mu pulls the trained LoRA weights back towards where the
    round started; mu = 0 is plain training, byte for byte."""
    from prismesh.aggregator.adapters import load_adapter
    from prismesh.node.basemodel import build_random_model
    from prismesh.node.data import MCQ, format_completion, format_prompt
    from prismesh.node.trainer import TrainConfig, create_initial_adapter, train_lora

    data = [MCQ(f"Case {i}: which?", {"A": "Alpha", "B": "Bravo"}, "AB"[i % 2], "medqa", "en", f"q{i}")
            for i in range(16)]
    base = build_random_model(tmp_path / "m", [format_prompt(m) + format_completion(m) for m in data] * 3)
    cfg = dict(lr=5e-2, rank=2, alpha=4, max_length=48, dropout=0.0)
    start = create_initial_adapter(base, tmp_path / "start", TrainConfig(**cfg))
    x0 = _f64(load_adapter(start))

    def moved(mu: float, name: str) -> float:
        out = train_lora(base, data, tmp_path / name, TrainConfig(**cfg, prox_mu=mu), init_adapter=start, progress=False)
        x = _f64(load_adapter(out.adapter_dir))
        return math.sqrt(sum(float(np.sum((x[k] - x0[k]) ** 2)) for k in x0))

    free, held = moved(0.0, "free"), moved(50.0, "held")
    assert held < 0.7 * free
    plain = train_lora(base, data, tmp_path / "plain", TrainConfig(**cfg), init_adapter=start, progress=False)
    assert (plain.adapter_dir / "adapter_model.safetensors").read_bytes() == \
        (tmp_path / "free" / "adapter_model.safetensors").read_bytes()
