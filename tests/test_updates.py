"""The ΔW-space geometry of updates, checked against dense matrices on small adapters."""

from __future__ import annotations

import numpy as np
import pytest

from prismesh.aggregator.adapters import LORA_A_SUFFIX, LORA_B_SUFFIX, Adapter
from prismesh.aggregator.updates import cosines, distances, norms, update_gram

MODULES = {"base_model.model.model.layers.0.self_attn.q_proj": (6, 5), "base_model.model.model.layers.0.mlp.up_proj": (7, 4)}
CONFIG = {"r": 3, "lora_alpha": 6, "target_modules": ["q_proj", "up_proj"]}


def adapter(seed: int, extra: bool = False) -> Adapter:
    rng = np.random.default_rng(seed)
    tensors = {}
    for m, (out, inp) in MODULES.items():
        tensors[m + LORA_A_SUFFIX] = rng.normal(size=(3, inp)).astype(np.float32)
        tensors[m + LORA_B_SUFFIX] = rng.normal(size=(out, 3)).astype(np.float32)
    if extra:
        tensors["base_model.model.model.layers.0.mlp.up_proj.lora_magnitude_vector"] = rng.normal(size=7).astype(np.float32)
    return Adapter(dict(CONFIG), tensors)


def dense(ad: Adapter, base: Adapter | None) -> np.ndarray:
    parts = []
    for m in sorted(MODULES):
        w = ad.scaling(m) * np.asarray(ad.tensors[m + LORA_B_SUFFIX], np.float64) @ np.asarray(ad.tensors[m + LORA_A_SUFFIX], np.float64)
        if base is not None:
            w -= base.scaling(m) * np.asarray(base.tensors[m + LORA_B_SUFFIX], np.float64) @ np.asarray(base.tensors[m + LORA_A_SUFFIX], np.float64)
        parts.append(w.ravel())
    for k in sorted(ad.tensors):
        if not k.endswith((LORA_A_SUFFIX, LORA_B_SUFFIX)):
            v = np.asarray(ad.tensors[k], np.float64)
            parts.append((v - np.asarray(base.tensors[k], np.float64)) if base is not None else v)
    return np.concatenate(parts)


@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("extra", [False, True])
def test_gram_equals_dense(with_base: bool, extra: bool) -> None:
    ads = [adapter(s, extra) for s in range(4)]
    base = adapter(99, extra) if with_base else None
    vecs = np.stack([dense(a, base) for a in ads])
    np.testing.assert_allclose(update_gram(ads, base), vecs @ vecs.T, rtol=1e-9, atol=1e-9)


def test_geometry_helpers() -> None:
    base = adapter(7)
    ads = [adapter(1), adapter(1), base, adapter(2)]
    g = update_gram(ads, base)
    n = norms(g)
    assert n[2] == pytest.approx(0.0, abs=1e-9)  # returning the global unchanged is no update
    c = cosines(g)
    assert c[0, 1] == pytest.approx(1.0)
    assert c[0, 2] == 0.0 and c[2, 2] == 0.0
    d = distances(g)
    assert d[0, 1] == pytest.approx(0.0, abs=1e-6)
    assert d[0, 3] == pytest.approx(np.linalg.norm(dense(ads[0], base) - dense(ads[3], base)))


def test_empty_base_means_bare_model() -> None:
    ads = [adapter(1), adapter(2)]
    np.testing.assert_allclose(update_gram(ads, Adapter(dict(CONFIG), {})), update_gram(ads, None))


def test_mismatched_updates_are_refused() -> None:
    a, b = adapter(1), adapter(2)
    b.tensors.pop(next(iter(b.tensors)))
    with pytest.raises(ValueError, match="other tensors"):
        update_gram([a, b])
