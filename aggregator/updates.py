"""The geometry of client updates in ΔW space, computed through the LoRA factors.

A client's *update* in a round is what it changed: for each LoRA module,
Δ = s·B·A − s_g·B_g·A_g, its adapter's weight change minus the global adapter's (zero when the
round starts from the bare base model). Averaging, distances and agreement only mean something
in that space: A and B alone are defined up to an invertible r×r factor, and the absolute size
of an adapter says nothing about what one round did to it.

Everything here works on inner products ⟨X, Y⟩_F = Σ_modules trace(Xᵀ Y), which for low-rank
products need only the factors: ⟨B₁A₁, B₂A₂⟩ = Σ (B₁ᵀB₂) ⊙ (A₁A₂ᵀ). The Gram matrix of n
updates therefore costs O(n²r²·(out + in)) per module and never forms an out×in matrix, so it
runs on adapters of real models. Tensors that are not LoRA A/B pairs (biases, DoRA magnitudes)
enter as plain vectors. Sums run in float64, in module order, on one BLAS thread, so the result
is the same on every run.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from prismesh.aggregator.adapters import LORA_A_SUFFIX, LORA_B_SUFFIX, Adapter
from prismesh.aggregator.lowrank import single_threaded_blas


def _pair(adapter: Adapter, module: str) -> tuple[np.ndarray, np.ndarray, float]:
    a = np.asarray(adapter.tensors[module + LORA_A_SUFFIX], dtype=np.float64)
    b = np.asarray(adapter.tensors[module + LORA_B_SUFFIX], dtype=np.float64)
    return b, a, adapter.scaling(module)


def _extra_keys(adapter: Adapter) -> list[str]:
    pairs = {m + s for m in adapter.lora_modules() for s in (LORA_A_SUFFIX, LORA_B_SUFFIX)}
    return sorted(set(adapter.tensors) - pairs)


def update_gram(adapters: Sequence[Adapter], base: Adapter | None = None) -> np.ndarray:
    """The n×n Gram matrix G[i, j] = ⟨Δ_i, Δ_j⟩_F of the updates ``adapters`` made from ``base``.

    ``base`` is the round's global adapter (``None`` or an adapter without tensors: the round
    started from the bare base model, so Δ is the adapter's own weight change). Every adapter
    must carry the same tensor names and shapes (``prepare_updates`` / ``verify_adapter``
    ensure it); a mismatch raises ``ValueError`` naming the tensor.
    """
    n = len(adapters)
    if n == 0:
        return np.zeros((0, 0))
    ref = adapters[0]
    has_base = base is not None and bool(base.tensors)
    for i, ad in enumerate(adapters[1:], start=1):
        if set(ad.tensors) != set(ref.tensors):
            raise ValueError(f"update {i} has other tensors than update 0")
    gram = np.zeros((n, n))
    # Points are the n adapters plus (optionally) the base; Δ_i = P_i − P_base.
    k = n + 1 if has_base else n
    with single_threaded_blas():
        for m in ref.lora_modules():
            factors = [_pair(ad, m) for ad in adapters]
            if has_base:
                if m + LORA_A_SUFFIX not in base.tensors or m + LORA_B_SUFFIX not in base.tensors:
                    raise ValueError(f"global adapter lacks module {m}")
                factors.append(_pair(base, m))
            ranks = {f[1].shape[0] for f in factors}
            if len(ranks) != 1:
                raise ValueError(f"module {m}: updates have different ranks {sorted(ranks)}")
            (r,) = ranks
            b_all = np.concatenate([s * b for b, _, s in factors], axis=1)  # out × k·r
            a_all = np.concatenate([a for _, a, _ in factors], axis=0)  # k·r × in
            h = (b_all.T @ b_all) * (a_all @ a_all.T)
            points = h.reshape(k, r, k, r).sum(axis=(1, 3))
            gram += _centre(points, has_base)
        for key in _extra_keys(ref):
            vecs = [np.asarray(ad.tensors[key], np.float64).ravel() for ad in adapters]
            if has_base and key in base.tensors:
                g = np.asarray(base.tensors[key], np.float64).ravel()
                vecs = [v - g for v in vecs]
            stack = np.stack(vecs)
            gram += stack @ stack.T
    return gram


def module_update_norms(adapter: Adapter, base: Adapter | None = None) -> dict[str, float]:
    """||Δ_m||_F = ||s·B·A − s_g·B_g·A_g||_F for every LoRA module of ``adapter``, from the factors.

    ``base`` is the round's global adapter (``None`` or without tensors: Δ is the adapter's own
    weight change). Tensors that are not LoRA pairs are left out (see :func:`update_gram`).
    """
    has_base = base is not None and bool(base.tensors)
    out: dict[str, float] = {}
    with single_threaded_blas():
        for m in adapter.lora_modules():
            factors = [_pair(adapter, m)]
            if has_base:
                if m + LORA_A_SUFFIX not in base.tensors or m + LORA_B_SUFFIX not in base.tensors:
                    raise ValueError(f"global adapter lacks module {m}")
                factors.append(_pair(base, m))
            if len({f[1].shape for f in factors}) != 1:
                raise ValueError(f"module {m}: the update's rank or width differs from the global adapter's")
            b_all = np.concatenate([s * b for b, _, s in factors], axis=1)
            a_all = np.concatenate([a for _, a, _ in factors], axis=0)
            r = factors[0][1].shape[0]
            h = (b_all.T @ b_all) * (a_all @ a_all.T)
            points = h.reshape(len(factors), r, len(factors), r).sum(axis=(1, 3))
            sq = float(_centre(points, has_base)[0, 0])
            out[m] = float(np.sqrt(max(sq, 0.0)))
    return out


def _centre(points: np.ndarray, has_base: bool) -> np.ndarray:
    """⟨P_i − P_b, P_j − P_b⟩ from the Gram matrix of the points (the base is the last one)."""
    if not has_base:
        return points
    p = points[:-1, :-1]
    cross = points[:-1, -1]
    return p - cross[:, None] - cross[None, :] + points[-1, -1]


def norms(gram: np.ndarray) -> np.ndarray:
    """‖Δ_i‖_F from a Gram matrix (tiny negative rounding clipped to zero)."""
    return np.sqrt(np.clip(np.diag(gram), 0.0, None))


def cosines(gram: np.ndarray) -> np.ndarray:
    """cos(Δ_i, Δ_j); zero where either update is zero."""
    nrm = norms(gram)
    denom = np.outer(nrm, nrm)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(denom > 0, gram / np.where(denom > 0, denom, 1.0), 0.0)
    return np.clip(out, -1.0, 1.0)


def distances(gram: np.ndarray) -> np.ndarray:
    """‖Δ_i − Δ_j‖_F for every pair."""
    d = np.diag(gram)
    sq = d[:, None] + d[None, :] - 2.0 * gram
    return np.sqrt(np.clip(sq, 0.0, None))
