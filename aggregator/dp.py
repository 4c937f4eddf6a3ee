"""Client-level differential privacy in ΔW space: clip each update, add seeded Gaussian noise.

A client's update is Δ_i = s·B_i·A_i − s_g·B_g·A_g per LoRA module (``aggregator.updates``); its
size is the Frobenius norm over all modules together. Clipping scales Δ_i by
c_i = min(1, C / ‖Δ_i‖), so no client moves the released matrix by more than C. Noise is
N(0, (σC)²) on every entry of every module's ΔW (an out×in matrix: a client's update may point
anywhere in that space, so the noise must too), and the result is truncated to the task's rank r
by SVD, which is post-processing and removes most of the noise's energy (a Gaussian matrix
spreads it over min(out, in) directions; only r survive).

* ``dp_aggregate`` (``where = "aggregator"``): G + (Σ_i c_i·Δ_i + σC·Z) / n, n = the task's
  participant count (fixed before any update is seen: an excluded client counts as a zero
  update), under add/remove-one-hospital adjacency.
* ``privatize_update`` (``where = "client"``): G + c·Δ + σC·Z, each client on its own update.

The noise comes from a 32-byte seed through SHA-256 per module into NumPy's PCG64, so whoever
holds the seed regenerates it bit for bit (the audit), and nobody else can. Everything runs in
float64 on one BLAS thread, so the same inputs give the same bytes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from prismesh.aggregator.adapters import LORA_A_SUFFIX, LORA_B_SUFFIX, Adapter
from prismesh.aggregator.lowrank import _fix_signs, single_threaded_blas
from prismesh.aggregator.updates import norms, update_gram

SEED_BYTES = 32


def noise_matrix(seed: bytes, module: str, shape: tuple[int, int]) -> np.ndarray:
    """Standard normal out×in noise for ``module``, a pure function of (seed, module)."""
    if len(seed) != SEED_BYTES:
        raise ValueError(f"a DP noise seed is {SEED_BYTES} bytes, got {len(seed)}")
    digest = hashlib.sha256(b"prismesh dp noise\n" + seed + module.encode()).digest()
    words = np.frombuffer(digest, dtype=">u4").astype(np.uint64).tolist()
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(words)))
    return rng.standard_normal(shape)


def _dense(adapter: Adapter | None, module: str) -> np.ndarray | None:
    if adapter is None or module + LORA_A_SUFFIX not in adapter.tensors:
        return None
    a = np.asarray(adapter.tensors[module + LORA_A_SUFFIX], np.float64)
    b = np.asarray(adapter.tensors[module + LORA_B_SUFFIX], np.float64)
    return adapter.scaling(module) * (b @ a)


def _check_pairs_only(adapters: Sequence[Adapter]) -> list[str]:
    ref = adapters[0]
    modules = ref.lora_modules()
    pairs = {m + s for m in modules for s in (LORA_A_SUFFIX, LORA_B_SUFFIX)}
    extra = sorted(set(ref.tensors) - pairs)
    if extra:
        raise ValueError(f"client-level DP handles LoRA A/B pairs only; the adapters also carry {extra[:3]}")
    return modules


def clip_factors(adapters: Sequence[Adapter], base: Adapter | None, clip: float) -> tuple[np.ndarray, np.ndarray]:
    """(‖Δ_i‖_F over all modules, c_i = min(1, clip / ‖Δ_i‖)) for each adapter."""
    has_base = base is not None and bool(base.tensors)
    nu = norms(update_gram(list(adapters), base if has_base else None))
    with np.errstate(divide="ignore"):
        c = np.where(nu > clip, clip / np.where(nu > 0, nu, 1.0), 1.0)
    return nu, c


def _refactor(matrix: np.ndarray, rank: int, scale: float, dtype_b: Any, dtype_a: Any) -> tuple[np.ndarray, np.ndarray, float]:
    """Balanced rank-r factors with s·B·A = the truncated SVD of ``matrix``; and the relative
    Frobenius error of the truncation."""
    u, s, vt = np.linalg.svd(matrix, full_matrices=False)
    k = min(rank, s.size)
    u, v = u[:, :k].copy(), vt[:k].T.copy()
    _fix_signs(u, v)
    root = np.sqrt(s[:k] / scale)
    b, a = u * root, root[:, None] * v.T
    if k < rank:
        b = np.pad(b, ((0, 0), (0, rank - k)))
        a = np.pad(a, ((0, rank - k), (0, 0)))
    total = float(np.sum(s**2))
    err = float(np.sqrt(np.sum(s[k:] ** 2) / total)) if total > 0 else 0.0
    return b.astype(dtype_b), a.astype(dtype_a), err


def _release(base: Adapter | None, config_adapter: Adapter, modules: list[str], sums: dict[str, np.ndarray],
             denominator: float, sigma_c: float, seed: bytes, dtypes: dict[str, tuple[Any, Any]]) -> tuple[dict, dict]:
    out: dict[str, np.ndarray] = {}
    errors: dict[str, float] = {}
    for m in modules:
        g = _dense(base, m)
        shape = sums[m].shape
        released = sums[m] + sigma_c * noise_matrix(seed, m, shape)
        dense = (g if g is not None else 0.0) + released / denominator
        r, _ = config_adapter.rank_alpha(m)
        b, a, err = _refactor(dense, r, config_adapter.scaling(m), *dtypes[m])
        out[m + LORA_B_SUFFIX], out[m + LORA_A_SUFFIX] = b, a
        errors[m] = err
    return dict(sorted(out.items())), errors


def dp_aggregate(adapters: Sequence[Adapter], base: Adapter | None, config: dict, clip: float,
                 noise_multiplier: float, denominator: int, seed: bytes) -> tuple[Adapter, dict[str, Any]]:
    """The central-DP aggregate G + (Σ c_i·Δ_i + σC·Z) / ``denominator`` (clients in the given
    order; the caller sorts them), re-factorised to the config's rank. Returns it with metrics
    (norms, clip factors, truncation errors)."""
    if not adapters:
        raise ValueError("no updates to aggregate")
    if denominator < len(adapters):
        raise ValueError(f"the DP denominator {denominator} is below the {len(adapters)} updates")
    modules = _check_pairs_only(adapters)
    has_base = base is not None and bool(base.tensors)
    with single_threaded_blas():
        nu, c = clip_factors(adapters, base, clip)
        sums: dict[str, np.ndarray] = {}
        dtypes = {}
        for m in modules:
            g = _dense(base, m) if has_base else None
            acc = None
            for ci, ad in zip(c, adapters, strict=True):
                delta = _dense(ad, m)
                if g is not None:
                    delta = delta - g
                acc = ci * delta if acc is None else acc + ci * delta
            sums[m] = acc
            dtypes[m] = (adapters[0].tensors[m + LORA_B_SUFFIX].dtype, adapters[0].tensors[m + LORA_A_SUFFIX].dtype)
        tensors, errors = _release(base if has_base else None, Adapter(config, {}), modules, sums,
                                   float(denominator), noise_multiplier * clip, seed, dtypes)
    metrics = {
        "dp": {"mechanism": "gaussian, central", "clip": clip, "noise_multiplier": noise_multiplier,
               "denominator": denominator},
        "update_norms": [float(x) for x in nu],
        "clip_factors": [float(x) for x in c],
        "rel_frobenius_error_max": max(errors.values(), default=0.0),
    }
    return Adapter(dict(config), tensors), metrics


def privatize_update(adapter: Adapter, base: Adapter | None, clip: float, noise_multiplier: float,
                     seed: bytes) -> tuple[Adapter, dict[str, Any]]:
    """A client's own update made differentially private before it leaves the hospital:
    G + c·Δ + σC·Z, re-factorised to the adapter's rank (local DP)."""
    modules = _check_pairs_only([adapter])
    has_base = base is not None and bool(base.tensors)
    with single_threaded_blas():
        nu, c = clip_factors([adapter], base, clip)
        sums, dtypes = {}, {}
        for m in modules:
            delta = _dense(adapter, m)
            g = _dense(base, m) if has_base else None
            sums[m] = c[0] * (delta - g if g is not None else delta)
            dtypes[m] = (adapter.tensors[m + LORA_B_SUFFIX].dtype, adapter.tensors[m + LORA_A_SUFFIX].dtype)
        tensors, errors = _release(base if has_base else None, adapter, modules, sums, 1.0,
                                   noise_multiplier * clip, seed, dtypes)
    metrics = {"dp": {"mechanism": "gaussian, local", "clip": clip, "noise_multiplier": noise_multiplier},
               "update_norm": float(nu[0]), "clip_factor": float(c[0]),
               "rel_frobenius_error_max": max(errors.values(), default=0.0)}
    return Adapter(dict(adapter.config), tensors), metrics
