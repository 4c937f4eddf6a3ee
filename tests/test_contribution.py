"""Contribution scores and bounded weights, on adapters built in numpy (no chain, no training):
every kind of free rider scores a small fraction of the honest median; the geometry through
the factors equals the dense computation; the scores are deterministic; weights are bounded.

The end-to-end measurement on the federation (real training, real chain, real audit) is in
test_free_riders.py and tests/benchmarks/bench_free_riders.py.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from prismesh.aggregator.adapters import Adapter
from prismesh.aggregator.contribution import (
    SCORE_SCALE,
    PublishedAdapters,
    contribution_scores,
    inner_products,
    measure,
    published_before,
    score_updates,
    split_pool,
    to_fixed,
)
from prismesh.aggregator.strategies import ClientUpdate
from prismesh.aggregator.weights import WeightRule, normalised

R, IN, OUT, MODULES = 4, 48, 40, ("q", "v", "o")
CONFIG = {"peft_type": "LORA", "r": R, "lora_alpha": 8, "target_modules": list(MODULES)}


def _key(m: str, ab: str) -> str:
    return f"base_model.model.layers.0.attn.{m}_proj.lora_{ab}.weight"


def _adapter(factors: dict[str, tuple[np.ndarray, np.ndarray]]) -> Adapter:
    tensors = {}
    for m, (a, b) in factors.items():
        tensors[_key(m, "A")] = a.astype(np.float32)
        tensors[_key(m, "B")] = b.astype(np.float32)
    return Adapter(dict(CONFIG), tensors)


def _factors(ad: Adapter) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {m: (np.asarray(ad.tensors[_key(m, "A")], np.float64), np.asarray(ad.tensors[_key(m, "B")], np.float64))
            for m in MODULES}


class Round:
    """A global adapter and honest updates trained from it: a shared task direction (in B) plus
    each client's own part, as LoRA training from a common A moves mostly B."""

    def __init__(self, seed: int, honest: int = 5, shared: float = 1.0, own: float = 1.0) -> None:
        rng = np.random.default_rng(seed)
        self.rng = rng
        self.glob = _adapter({m: (rng.normal(0, 0.15, (R, IN)), rng.normal(0, 0.02, (OUT, R))) for m in MODULES})
        g = _factors(self.glob)
        task = {m: rng.normal(0, 0.01, (OUT, R)) for m in MODULES}
        self.honest = []
        for _ in range(honest):
            self.honest.append(_adapter({
                m: (a + rng.normal(0, 0.002, a.shape), b + shared * task[m] + own * rng.normal(0, 0.01, b.shape))
                for m, (a, b) in g.items()
            }))

    def free_riders(self, earlier: Adapter) -> dict[str, Adapter]:
        g = _factors(self.glob)
        spread_a = np.std(np.concatenate([a.ravel() for a, _ in g.values()]))
        spread_b = np.std(np.concatenate([b.ravel() for _, b in g.values()]))
        rng = self.rng
        return {
            "copy-global": _adapter(g),
            "copy-peer": earlier,
            "perturb": _adapter({m: (a + rng.normal(0, 1e-3 * spread_a, a.shape), b + rng.normal(0, 1e-3 * spread_b, b.shape))
                                 for m, (a, b) in g.items()}),
            "noise": _adapter({m: (rng.normal(0, spread_a, (R, IN)), rng.normal(0, spread_b, (OUT, R))) for m in MODULES}),
            "noise-on-global": _adapter({m: (a, b + rng.normal(0, 0.014, b.shape)) for m, (a, b) in g.items()}),
        }


def test_every_free_rider_earns_a_small_fraction_of_the_honest_median() -> None:
    previous = Round(seed=1)
    rnd = Round(seed=2)
    riders = rnd.free_riders(earlier=previous.honest[0])
    adapters = rnd.honest + list(riders.values())
    known = [previous.glob, *previous.honest, rnd.glob]
    scores = contribution_scores(adapters, rnd.glob, known)
    honest = scores[: len(rnd.honest)]
    median = float(np.median(honest))
    assert median > 0.2 and (honest > 0).all()
    for name, score in zip(riders, scores[len(rnd.honest):], strict=True):
        assert score <= 0.1 * median, (name, score, median)
    # Exact copies and near-copies score exactly or essentially nothing.
    assert scores[len(rnd.honest)] == 0.0  # copy of the global
    assert scores[len(rnd.honest) + 1] == 0.0  # copy of an earlier published update
    # Without the earlier round among the known adapters the stale copy would look novel: the
    # known set is what catches it.
    blind = contribution_scores(adapters, rnd.glob, [rnd.glob])
    assert blind[len(rnd.honest) + 1] > 0


def test_noise_cannot_drag_the_consensus_nor_buy_votes() -> None:
    rnd = Round(seed=3)
    rng = np.random.default_rng(7)
    g = _factors(rnd.glob)
    huge = _adapter({m: (a, b + rng.normal(0, 50.0, b.shape)) for m, (a, b) in g.items()})
    scores = contribution_scores(rnd.honest + [huge], rnd.glob, [rnd.glob])
    honest = scores[:-1]
    assert scores[-1] <= 0.1 * float(np.median(honest)) and (honest > 0.2).all()
    # Claimed weights play no part in the score.
    ups = [ClientUpdate(f"0x{i:040x}", 1 + 1000 * (i == 5), ad) for i, ad in enumerate(rnd.honest + [huge])]
    same = score_updates(ups, rnd.glob, [rnd.glob])
    ups[5] = ClientUpdate(ups[5].client, 1, ups[5].adapter)
    assert score_updates(ups, rnd.glob, [rnd.glob]) == same


def test_colluding_twins_share_one_reward() -> None:
    rnd = Round(seed=4)
    twin = _adapter(_factors(rnd.honest[0]))  # the same tensors under another identity
    alone = contribution_scores(rnd.honest, rnd.glob, [rnd.glob])
    paired = contribution_scores(rnd.honest + [twin], rnd.glob, [rnd.glob])
    assert paired[0] == pytest.approx(paired[-1])
    assert paired[0] + paired[-1] == pytest.approx(alone[0], rel=0.05)
    assert paired[1] == pytest.approx(alone[1], rel=0.05)


def test_inner_products_through_factors_equal_the_dense_computation() -> None:
    rnd = Round(seed=5, honest=3)
    ads = [rnd.glob, *rnd.honest, Adapter(dict(CONFIG), {})]
    fast = inner_products(ads, ads[:2])
    scale = CONFIG["lora_alpha"] / R

    def dense(ad: Adapter) -> np.ndarray:
        if not ad.tensors:
            return np.zeros(len(MODULES) * OUT * IN)
        return np.concatenate([(scale * b @ a).ravel() for a, b in _factors(ad).values()])

    slow = np.array([[dense(x) @ dense(y) for y in ads[:2]] for x in ads])
    np.testing.assert_allclose(fast, slow, rtol=1e-12, atol=1e-15)
    assert (fast[-1] == 0).all()
    with pytest.raises(ValueError, match="different tensors"):
        inner_products([rnd.glob], [Adapter(dict(CONFIG), {"x": np.zeros(3)})])


def test_scores_are_deterministic_and_order_free() -> None:
    rnd = Round(seed=6)
    riders = rnd.free_riders(earlier=rnd.glob)
    ups = [ClientUpdate(f"0x{i:040x}", 10, ad) for i, ad in enumerate(rnd.honest + list(riders.values()))]
    first = score_updates(ups, rnd.glob, [rnd.glob])
    assert score_updates(list(reversed(ups)), rnd.glob, [rnd.glob]) == first
    assert all(isinstance(v, int) and 0 <= v <= SCORE_SCALE for v in first.values())
    # Starting from the bare base model (a global without tensors) works the same way.
    bare = score_updates(ups[:3], Adapter(dict(CONFIG), {}))
    assert len(bare) == 3 and sum(bare.values()) > 0


def test_fixed_point_and_the_contracts_split() -> None:
    assert to_fixed([0.0, 0.5, 1.0, 1.2, -0.1, 0.1234565]) == [0, 500_000, 1_000_000, 1_000_000, 0, 123_456]
    # 3 included updates at 10 each: a pool of 30 split 2:1:0, rounded down like the contract.
    assert split_pool({"a": 600_000, "b": 300_000, "c": 0}, 10, 1_000) == {"a": 20, "b": 10, "c": 0}
    assert split_pool({"a": 1, "b": 1, "c": 1}, 10, 20) == {"a": 6, "b": 6, "c": 6}  # budget left caps the pool
    assert split_pool({"a": 0, "b": 0}, 10, 1_000) == {"a": 0, "b": 0}


def test_weight_rules_bound_every_claim() -> None:
    capped = WeightRule("samples", 500)
    assert capped.weights({"a": 120, "b": 2**63, "c": 500}) == {"a": 120, "b": 500, "c": 500}
    assert WeightRule("uniform", 500).weights({"a": 120, "b": 2**63}) == {"a": 1, "b": 1}
    assert WeightRule("samples").weight(7) == 7
    shares = normalised(capped.weights({"honest": 400, "liar": 2**64 - 1}))
    assert shares == {"honest": pytest.approx(400 / 900), "liar": pytest.approx(500 / 900)}
    for bad in (0, -3, 1.5, True):
        with pytest.raises(ValueError, match="positive integer"):
            capped.weight(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown weighting"):
        WeightRule("median")
    with pytest.raises(ValueError, match="sample_cap"):
        WeightRule("samples", 0)

    class Params:  # what Coordinator.get_task_params returns, as far as the rule needs
        from prismesh.chain.evm.contracts import Weighting

        weighting = Weighting.UNIFORM
        sample_cap = 64

    assert WeightRule.of_task(Params()) == WeightRule("uniform", 64)


def _history(seed: int, rounds: int) -> tuple[Round, list[Adapter]]:
    """A round after ``rounds`` earlier ones: its known adapters are every earlier global and
    update, plus one rejected update with a NaN and one of another layout (both left out)."""
    known: list[Adapter] = []
    for r in range(rounds):
        earlier = Round(seed=seed + r, honest=3)
        known += [earlier.glob, *earlier.honest]
    nan = _adapter(_factors(known[1]))
    nan.tensors[_key("q", "B")][0, 0] = np.nan
    other = _adapter({m: (np.ones((R + 1, IN)), np.ones((OUT, R + 1))) for m in MODULES})
    return Round(seed=seed + rounds, honest=4), [*known, nan, other]


def test_measured_history_scores_exactly_as_the_raw_history() -> None:
    rnd, known = _history(seed=40, rounds=3)
    ups = [ClientUpdate(f"0x{i:040x}", 1, ad) for i, ad in enumerate(rnd.honest)]
    measured = [measure(k) for k in known]
    assert [m.finite for m in measured[-2:]] == [False, True]
    assert np.isnan(measured[-2].sq_norm)
    assert measured[0].sq_norm == inner_products([known[0]], [known[0]])[0, 0]
    raw = contribution_scores(rnd.honest, rnd.glob, [rnd.glob, *known])
    cached = contribution_scores(rnd.honest, rnd.glob, [measure(rnd.glob), *measured])
    assert np.array_equal(raw, cached)  # bit for bit: the chain's scores and the audit's agree
    assert score_updates(ups, rnd.glob, [rnd.glob, *known]) == score_updates(ups, rnd.glob, [measure(rnd.glob), *measured])
    # A factor pair that does not fit together is measured as NaN, not an error.
    broken = Adapter(dict(CONFIG), {_key("q", "A"): np.ones((R, IN)), _key("q", "B"): np.ones((OUT, R + 2))})
    assert np.isnan(measure(broken).sq_norm)


def test_published_adapters_are_loaded_and_measured_once_per_cid(monkeypatch: pytest.MonkeyPatch) -> None:
    import prismesh.aggregator.contribution as contribution

    _, known = _history(seed=50, rounds=2)
    measured: list[int] = []
    real_measure = contribution.measure
    monkeypatch.setattr(contribution, "measure", lambda ad: measured.append(1) or real_measure(ad))
    loads: list[str] = []

    def loader(i: int):
        return lambda: loads.append(f"cid{i}") or known[i]

    cache = PublishedAdapters()
    first = [cache.get(f"cid{i}", loader(i)) for i in range(4)]
    again = [cache.get(f"cid{i}", loader(i)) for i in range(6)]  # the next round knows two more
    assert loads == [f"cid{i}" for i in range(6)] and len(measured) == 6 and len(cache) == 6
    assert [k.adapter for k in again[:4]] == [k.adapter for k in first]
    assert cache.bytes_kept == sum(v.nbytes for k in known[:6] for v in k.tensors.values())

    # Over its budget it drops the least recently used adapter first (measures stay).
    size = sum(v.nbytes for v in known[0].tensors.values())
    lru = PublishedAdapters(max_bytes=2 * size)
    lru.get("cid0", loader(0))
    lru.get("cid1", loader(1))
    lru.get("cid0", loader(0))  # used again: cid1 is now the oldest
    lru.get("cid2", loader(2))
    loads.clear()
    lru.get("cid0", loader(0))
    lru.get("cid1", loader(1))
    assert loads == ["cid1"] and lru.bytes_kept == 2 * size

    # Past its budget the cache reads the adapter again but keeps its measures.
    tight = PublishedAdapters(max_bytes=0)
    measured.clear()
    loads.clear()
    one = tight.get("cid0", loader(0))
    two = tight.get("cid0", loader(0))
    assert loads == ["cid0", "cid0"] and len(measured) == 1 and tight.bytes_kept == 0
    assert one.sq_norm == two.sq_norm

    def unavailable():
        raise OSError("store down")

    with pytest.raises(OSError):
        tight.get("cid9", unavailable)
    assert tight.get("cid9", loader(1)).finite  # a failed load is tried again, not remembered
    with pytest.raises(ValueError, match="max_bytes"):
        PublishedAdapters(max_bytes=-1)


def test_published_before_reads_a_cid_from_the_store_once_per_task(tmp_path: Path) -> None:
    from prismesh.aggregator.adapters import save_adapter
    from prismesh.chain.storage import EmbeddedStore, add_adapter

    _, known = _history(seed=60, rounds=1)
    store = EmbeddedStore(tmp_path / "ipfs")
    cids = [add_adapter(store, save_adapter(ad, tmp_path / f"ad{i}")) for i, ad in enumerate(known[:3])]
    cache = PublishedAdapters()
    work = tmp_path / "published"
    before = published_before(None, store, 1, 2, work, cids=cids[:2], cache=cache)
    for cid in cids[:2]:  # the store and the fetched copies are gone: the kept ones still count
        store.unpin(cid)
    assert store.gc() > 0
    shutil.rmtree(work)
    after = published_before(None, store, 1, 3, work, cids=cids, cache=cache)
    assert [k.adapter for k in after[:2]] == [k.adapter for k in before]
    assert len(after) == 3 and all(k.finite for k in after)
    # Without the cache the same call loses the two it can no longer fetch.
    assert len(published_before(None, store, 1, 3, tmp_path / "fresh", cids=cids)) == 1


def test_an_added_adapter_is_a_copy_the_caller_cannot_change() -> None:
    _, known = _history(seed=70, rounds=1)
    cache = PublishedAdapters()
    ad = _adapter(_factors(known[1]))
    cache.add("cid-a", ad)
    before = cache.get("cid-a", lambda: pytest.fail("an added adapter is not loaded again"))
    ad.tensors[_key("q", "B")][:] = 0.0  # e.g. a strategy clipping the update in place
    kept = cache.get("cid-a", lambda: pytest.fail("an added adapter is not loaded again"))
    assert kept is before and np.array_equal(kept.adapter.tensors[_key("q", "B")], known[1].tensors[_key("q", "B")])
    assert kept.sq_norm == inner_products([known[1]], [known[1]])[0, 0]


def test_the_scoring_history_benchmark_runs_and_agrees(capsys: pytest.CaptureFixture[str]) -> None:
    from tests.benchmarks.bench_scoring_history import main

    assert main(["--rounds", "3", "--clients", "2"]) == 0
    out = capsys.readouterr().out
    assert "scores identical in every round" in out and "| 3 | 7 |" in out  # 3 globals + 2 x 2 reveals
