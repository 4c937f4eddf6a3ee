"""The robust rules in ΔW space, checked against dense matrices on small adapters: what each rule
keeps, clips and excludes (and why), that the result is the exact re-factorisation of
G + Σ α_i Δ_i, that the trimmed mean trims at n = 4, and that counts are bounded."""

from __future__ import annotations

import numpy as np
import pytest

from prismesh.aggregator.adapters import LORA_A_SUFFIX, LORA_B_SUFFIX, Adapter, save_adapter
from prismesh.aggregator.strategies import ClientUpdate, bounded_weights, get_strategy
from prismesh.aggregator.strategies.coordinatewise import truncated_svd
from prismesh.aggregator.strategies.robust import weiszfeld
from prismesh.aggregator.updates import update_gram

MODULES = {
    "base_model.model.model.layers.0.self_attn.q_proj": (6, 5),
    "base_model.model.model.layers.0.mlp.up_proj": (7, 4),
}
R = 3
CONFIG = {"r": R, "lora_alpha": 6, "target_modules": ["q_proj", "up_proj"], "peft_type": "LORA"}


def adapter(seed: int, scale: float = 1.0) -> Adapter:
    rng = np.random.default_rng(seed)
    tensors = {}
    for m, (out, inp) in MODULES.items():
        tensors[m + LORA_A_SUFFIX] = rng.normal(size=(R, inp)).astype(np.float32)
        tensors[m + LORA_B_SUFFIX] = (scale * rng.normal(size=(out, R))).astype(np.float32)
    return Adapter(dict(CONFIG), tensors)


def moved(glob: Adapter, seed: int, size: float) -> Adapter:
    """The global with its factors nudged: an update of roughly ``size``."""
    rng = np.random.default_rng(seed)
    return Adapter(dict(CONFIG), {
        k: (v + size * rng.normal(size=v.shape)).astype(np.float32) for k, v in glob.tensors.items()
    })


def dense(ad: Adapter, m: str) -> np.ndarray:
    return ad.scaling(m) * ad.tensors[m + LORA_B_SUFFIX].astype(np.float64) @ ad.tensors[m + LORA_A_SUFFIX].astype(np.float64)


def flat_delta(ad: Adapter, glob: Adapter) -> np.ndarray:
    return np.concatenate([(dense(ad, m) - dense(glob, m)).ravel() for m in sorted(MODULES)])


def rank_r(mat: np.ndarray) -> np.ndarray:
    u, s, vt = np.linalg.svd(mat, full_matrices=False)
    return (u[:, :R] * s[:R]) @ vt[:R]


@pytest.fixture
def glob() -> Adapter:
    return adapter(100)


@pytest.fixture
def honest(glob) -> list[ClientUpdate]:
    return [ClientUpdate(f"0x{i}", n, moved(glob, i, 0.1)) for i, n in enumerate((120, 45, 300))]


def expect_combination(result, ups: list[ClientUpdate], glob: Adapter, alpha: dict[str, float]) -> None:
    """The aggregate is the best rank-r approximation of G + Σ α_i Δ_i, module by module."""
    for m in MODULES:
        want = dense(glob, m) + sum(alpha[u.client] * (dense(u.adapter, m) - dense(glob, m)) for u in ups)
        np.testing.assert_allclose(dense(result.adapter, m), rank_r(want), atol=2e-5)


def test_clipped_fedavg_without_outliers_is_fedavg_exact_byte_for_byte(honest, glob, tmp_path):
    clipped = get_strategy("clipped-fedavg", clip=100.0, max_norm=None, max_weight=None).aggregate(honest, glob)
    exact = get_strategy("fedavg-exact").aggregate(honest, glob)
    assert clipped.metrics["excluded"] == {} and clipped.metrics["clip_factors"] == {}
    a = save_adapter(clipped.adapter, tmp_path / "a") / "adapter_model.safetensors"
    b = save_adapter(exact.adapter, tmp_path / "b") / "adapter_model.safetensors"
    assert a.read_bytes() == b.read_bytes()


def test_clipped_fedavg_clips_to_the_median_and_excludes_with_reasons(honest, glob):
    big = ClientUpdate("0xbig", 100, moved(glob, 7, 0.14))
    free = ClientUpdate("0xfree", 100, moved(glob, 8, 1e-4))
    huge = ClientUpdate("0xhuge", 100, moved(glob, 9, 30.0))
    ups = [*honest, big, free, huge]
    nu = {u.client: np.linalg.norm(flat_delta(u.adapter, glob)) for u in ups}
    med = float(np.median(list(nu.values())))
    result = get_strategy("clipped-fedavg", clip=1.0, max_weight=1.0).aggregate(ups, glob)
    m = result.metrics
    assert m["median_norm"] == pytest.approx(med, rel=1e-6)
    assert set(m["excluded"]) == {"0xfree", "0xhuge"}
    assert "below 0.1x" in m["excluded"]["0xfree"] and "unchanged" in m["excluded"]["0xfree"]
    assert "above 2x" in m["excluded"]["0xhuge"]
    trained = float(np.median([v for c, v in nu.items() if c != "0xfree"]))  # free riders out first
    assert m["trained_median_norm"] == pytest.approx(trained, rel=1e-6)
    assert 1.0 < nu["0xbig"] / trained < 2.0
    clipped = {c for c, v in nu.items() if v > trained and c not in m["excluded"]}
    assert set(m["clip_factors"]) == clipped and "0xbig" in clipped
    for c in clipped:
        assert m["clip_factors"][c] == pytest.approx(trained / nu[c], rel=1e-6)
    kept = [u for u in ups if u.client not in m["excluded"]]
    w, _ = bounded_weights(kept, 1.0)
    # the weights are re-derived over all six (the cap uses the round's median count)
    w_all, _ = bounded_weights(sorted(ups, key=lambda u: u.client), 1.0)
    w_kept = {u.client: x for u, x in zip(sorted(ups, key=lambda u: u.client), w_all, strict=True) if u.client not in m["excluded"]}
    total = sum(w_kept.values())
    alpha = {c: x / total * m["clip_factors"].get(c, 1.0) for c, x in w_kept.items()}
    alpha.update({c: 0.0 for c in m["excluded"]})
    assert m["coefficients"] == pytest.approx(alpha)
    expect_combination(result, ups, glob, alpha)
    assert len(w) == len(kept)


def test_the_default_screens_and_clip(honest, glob, tmp_path):
    strategy = get_strategy("clipped-fedavg")
    assert strategy.options() == {
        "clip": 1.5, "min_norm": 0.1, "max_norm": 2.0, "max_cos": 0.99, "max_weight": 2.0, "split": "balanced"
    }
    # honest updates of similar size and counts within twice the median: nothing fires, and the
    # aggregate is fedavg-exact's, byte for byte
    result = strategy.aggregate(honest[:2], glob)
    assert result.metrics["excluded"] == {} and result.metrics["clip_factors"] == {}
    a = save_adapter(result.adapter, tmp_path / "a") / "adapter_model.safetensors"
    b = save_adapter(get_strategy("fedavg-exact").aggregate(honest[:2], glob).adapter, tmp_path / "b")
    assert a.read_bytes() == (b / "adapter_model.safetensors").read_bytes()


def test_the_same_update_from_two_clients_excludes_both(honest, glob):
    twin = moved(glob, 3, 0.1)
    ups = [*honest, ClientUpdate("0xa", 10, twin), ClientUpdate("0xb", 99, twin)]
    m = get_strategy("clipped-fedavg").aggregate(ups, glob).metrics
    assert set(m["excluded"]) == {"0xa", "0xb"}
    assert "cosine 1.0000 >= 0.99 with 0xb" in m["excluded"]["0xa"]
    assert m["coefficients"]["0xa"] == m["coefficients"]["0xb"] == 0.0
    assert get_strategy("clipped-fedavg", max_cos=None).aggregate(ups, glob).metrics["excluded"] == {}


def test_counts_are_capped_at_the_median(honest, glob):
    liar = ClientUpdate("0xliar", 2**64 - 1, moved(glob, 5, 0.1))
    ordered = sorted([*honest, liar], key=lambda u: u.client)
    w, capped = bounded_weights(ordered, 1.0)
    median = float(np.median([120, 45, 300, 2**64 - 1]))
    assert capped == {"0x2": median, "0xliar": median}
    assert w[-1] == pytest.approx(median / (120 + 45 + 2 * median))
    w_raw, none = bounded_weights(ordered, None)
    assert none == {} and w_raw[-1] > 0.999999


def test_multi_krum_keeps_the_closest_and_names_the_rest(honest, glob):
    far = ClientUpdate("0xfar", 100, moved(glob, 11, 0.5))
    ups = [*honest, far]
    result = get_strategy("multi-krum").aggregate(ups, glob)
    m = result.metrics
    flats = {u.client: flat_delta(u.adapter, glob) for u in ups}
    scores = {}
    for c, x in flats.items():
        d2 = sorted(np.sum((x - y) ** 2) for o, y in flats.items() if o != c)
        scores[c] = d2[0]  # n=4, f=(4-1)//3=1: n-f-2 = 1 neighbour
    assert m["krum_scores"] == pytest.approx(scores, rel=1e-5)
    assert list(m["excluded"]) == ["0xfar"] and "Krum score" in m["excluded"]["0xfar"] and "f=1" in m["excluded"]["0xfar"]
    one = get_strategy("krum").aggregate(ups, glob).metrics
    assert len(one["excluded"]) == 3 and min(scores, key=scores.get) not in one["excluded"]


def test_geomedian_is_weiszfeld_over_the_updates(honest, glob):
    outlier = ClientUpdate("0xout", 100, moved(glob, 12, 50.0))
    ups = sorted([*honest, outlier], key=lambda u: u.client)
    x = np.stack([flat_delta(u.adapter, glob) for u in ups])
    w, _ = bounded_weights(ups, 1.0)
    z = w @ x
    for _ in range(100):  # Weiszfeld on the dense vectors
        d = np.linalg.norm(x - z, axis=1)
        z = ((w / d) @ x) / np.sum(w / d)
    result = get_strategy("geomedian").aggregate(ups, glob)
    beta = result.metrics["coefficients"]
    np.testing.assert_allclose(sum(beta[u.client] * x[i] for i, u in enumerate(ups)), z, atol=1e-6)
    assert beta["0xout"] < 0.01
    expect_combination(result, ups, glob, beta)
    b, iters = weiszfeld(update_gram([u.adapter for u in ups], glob), w)
    assert iters < 100 and b.sum() == pytest.approx(1.0)


def test_trimmed_mean_trims_at_four_clients(honest, glob):
    out = ClientUpdate("0xout", 10**6, moved(glob, 13, 10.0))
    ups = sorted([*honest, out], key=lambda u: u.client)
    strat = get_strategy("trimmed-mean")
    assert strat.trimmed(4) == 1 and strat.trimmed(3) == 1 and strat.trimmed(2) == 0 and strat.trimmed(32) == 4
    result = strat.aggregate(ups, glob)
    assert result.metrics["trimmed_per_side"] == 1
    for m in MODULES:
        deltas = np.stack([dense(u.adapter, m) - dense(glob, m) for u in ups])
        trimmed = np.sort(deltas, axis=0)[1:3].mean(axis=0)  # one client one value: no weights
        # the outlier (100x the honest updates, claiming a million samples) is trimmed everywhere
        assert np.abs(trimmed).max() < np.abs(deltas[:3]).max() + 1e-9
        np.testing.assert_allclose(dense(result.adapter, m), rank_r(dense(glob, m) + trimmed), atol=2e-5)


def test_trimmed_statistic_without_a_sort_matches_the_sorted_one():
    from prismesh.aggregator.strategies.coordinatewise import _trimmed

    rng = np.random.default_rng(3)
    for n, k in ((3, 1), (4, 1), (9, 1), (9, 3), (32, 4)):
        x = rng.normal(size=(n, 500))
        x[0, :7] = 1e7  # an outlier far above the rest: its rounding must not leak into the mean
        np.testing.assert_allclose(_trimmed(x, k), np.sort(x, axis=0)[k : n - k].mean(axis=0), rtol=1e-9, atol=1e-9)


def test_median_is_one_client_one_vote(glob):
    ups = [ClientUpdate(f"0x{i}", n, moved(glob, 20 + i, 0.1)) for i, n in enumerate((1, 50, 70, 10**9))]
    result = get_strategy("median").aggregate(ups, glob)
    for m in MODULES:
        deltas = np.stack([dense(u.adapter, m) - dense(glob, m) for u in ups])
        np.testing.assert_allclose(dense(result.adapter, m), rank_r(dense(glob, m) + np.median(deltas, axis=0)), atol=2e-5)


def test_randomized_truncation_matches_the_exact_one():
    rng = np.random.default_rng(0)
    mat = rng.normal(size=(300, 200)) * 0.01 + (rng.normal(size=(300, 4)) * [9, 7, 5, 3]) @ rng.normal(size=(4, 200))
    u, s, v, tail = truncated_svd(mat, 4, exact_max=100)
    exact = np.linalg.svd(mat, compute_uv=False)
    np.testing.assert_allclose(s, exact[:4], rtol=1e-8)
    assert tail == pytest.approx(float(np.sum(exact[4:] ** 2)), rel=1e-6)
    u2, s2, v2, _ = truncated_svd(mat, 4)
    np.testing.assert_allclose(np.abs(u.T @ u2), np.eye(4), atol=1e-6)  # same subspace, signs pinned
    np.testing.assert_allclose(u * s @ v.T, u2 * s2 @ v2.T, atol=1e-8)


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="clip must be a positive number"):
        get_strategy("clipped-fedavg", clip=0)
    with pytest.raises(ValueError, match="min_norm must be in"):
        get_strategy("clipped-fedavg", min_norm=1.5)
    with pytest.raises(ValueError, match=r"max_norm \(0.5\) must be at least clip"):
        get_strategy("clipped-fedavg", max_norm=0.5)
    with pytest.raises(ValueError, match="max_weight must be a positive number"):
        get_strategy("geomedian", max_weight=-1)
    with pytest.raises(ValueError, match="f must be an integer"):
        get_strategy("multi-krum", f=-1)
    with pytest.raises(ValueError, match="trim must be in"):
        get_strategy("trimmed-mean", trim=0.5)
    with pytest.raises(ValueError, match="bad options"):
        get_strategy("median", max_weight=2)
