"""Sample-weighted averaging: ``fedavg`` (A and B averaged separately, the usual practice; note that
mean(B)·mean(A) is not mean(B·A) unless the clients share A) and ``fedavg-exact`` (the weighted
mean of each module's ΔW = scaling·B·A, re-factorised to the task's rank by truncated SVD)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from prismesh.aggregator.adapters import LORA_A_SUFFIX, LORA_B_SUFFIX, Adapter, to_numpy
from prismesh.aggregator.lowrank import lowrank_svd, single_threaded_blas
from prismesh.aggregator.strategies.base import (
    AggregateResult,
    ClientUpdate,
    Strategy,
    _output_config,
    _weighted_mean,
    _weights_metrics,
    prepare_updates,
    register_strategy,
)


@register_strategy
class FedAvg(Strategy):
    """Sample-weighted mean of every tensor (LoRA A and B averaged separately).

    ``server_lr`` η ≠ 1 makes it FedAvg with a server learning rate (FedOpt/SGD):
    new = global + η·(mean − global), which needs the round's global adapter.
    """

    name = "fedavg"

    def __init__(self, server_lr: float = 1.0) -> None:
        if not (math.isfinite(server_lr) and server_lr > 0):
            raise ValueError(f"server_lr must be a positive number, got {server_lr}")
        self.server_lr = float(server_lr)

    def options(self) -> dict[str, Any]:
        return {"server_lr": self.server_lr}

    def aggregate(
        self, updates: Sequence[ClientUpdate], global_adapter: Adapter | None = None
    ) -> AggregateResult:
        ordered, w = prepare_updates(updates)
        if self.server_lr != 1.0 and global_adapter is None:
            raise ValueError("fedavg with server_lr != 1 needs the round's global adapter")
        out: dict[str, np.ndarray] = {}
        for key in sorted(ordered[0].adapter.tensors):
            mean, dtype = _weighted_mean(ordered, w, key)
            if self.server_lr != 1.0:
                g = _global_tensor(global_adapter, key, mean.shape)
                mean = g + self.server_lr * (mean - g)
            out[key] = mean.astype(dtype)
        adapter = Adapter(_output_config(ordered, global_adapter), out)
        return AggregateResult(adapter, _weights_metrics(self, ordered, w))


def _global_tensor(global_adapter: Adapter | None, key: str, shape: tuple) -> np.ndarray:
    if global_adapter is None or key not in global_adapter.tensors:
        raise ValueError(f"global adapter lacks tensor {key}")
    g = np.asarray(to_numpy(global_adapter.tensors[key], key), dtype=np.float64)
    if g.shape != shape:
        raise ValueError(f"global adapter tensor {key} is {g.shape}, updates have {shape}")
    return g


def combine_exact(
    ordered: Sequence[ClientUpdate],
    coefficients: np.ndarray,
    global_adapter: Adapter | None,
    config: dict[str, Any],
    split: str = "balanced",
) -> tuple[dict[str, np.ndarray], dict[str, tuple[float, float]]]:
    """The global adapter moved by a combination of the clients' updates, re-factorised exactly.

    Per LoRA module, ΔW' = s_g·B_g·A_g + Σ_i c_i·(s_i·B_i·A_i − s_g·B_g·A_g)
    = (1 − Σc)·s_g·B_g·A_g + Σ_i c_i·s_i·B_i·A_i is truncated to the output rank by
    :func:`lowrank_svd` (never forming an out×in matrix) and split into factors (see
    ``FedAvgExact``). With Σc = 1 the global term vanishes and this is the weighted mean of the
    clients' ΔW (``fedavg-exact``); a global adapter without tensors (round 1 from the bare model)
    counts as zero. Other tensors (biases, DoRA magnitudes) move the same way, coordinate by
    coordinate. Returns the tensors and, per module, (tail², ||ΔW'||²) of the truncation.
    """
    if split not in ("balanced", "B"):
        raise ValueError(f"split must be 'balanced' or 'B', got {split!r}")
    coefficients = np.asarray(coefficients, dtype=np.float64)
    g_coef = 1.0 - float(coefficients.sum())
    base = global_adapter if global_adapter is not None and global_adapter.tensors else None
    if abs(g_coef) < 1e-12:
        g_coef = 0.0  # weights that sum to one up to rounding: no global term at all
    out_spec = Adapter(config, {})
    modules = ordered[0].adapter.lora_modules()
    pair_keys = {m + s for m in modules for s in (LORA_A_SUFFIX, LORA_B_SUFFIX)}
    out: dict[str, np.ndarray] = {}
    errors: dict[str, tuple[float, float]] = {}
    for key in sorted(set(ordered[0].adapter.tensors) - pair_keys):
        mean, dtype = _weighted_mean(list(ordered), coefficients, key)
        if g_coef and base is not None and key in base.tensors:
            mean += g_coef * _global_tensor(base, key, mean.shape)
        out[key] = mean.astype(dtype)
    with single_threaded_blas():
        for m in modules:
            _combine_module(m, ordered, coefficients, base, g_coef, out_spec, split, out, errors)
    return dict(sorted(out.items())), errors


def _combine_module(
    m: str,
    ordered: Sequence[ClientUpdate],
    coefficients: np.ndarray,
    base: Adapter | None,
    g_coef: float,
    out_spec: Adapter,
    split: str,
    out: dict[str, np.ndarray],
    errors: dict[str, tuple[float, float]],
) -> None:
    """Re-factorise one module into ``out``; record (tail², ||ΔW'||²) in ``errors``."""
    b_parts = [
        (ci * u.adapter.scaling(m)) * np.asarray(u.adapter.tensors[m + LORA_B_SUFFIX], np.float64)
        for ci, u in zip(coefficients, ordered, strict=True)
    ]
    a_parts = [np.asarray(u.adapter.tensors[m + LORA_A_SUFFIX], np.float64) for u in ordered]
    if g_coef and base is not None:
        if m + LORA_A_SUFFIX not in base.tensors or m + LORA_B_SUFFIX not in base.tensors:
            raise ValueError(f"global adapter lacks module {m}")
        b_parts.append(
            (g_coef * base.scaling(m)) * np.asarray(to_numpy(base.tensors[m + LORA_B_SUFFIX]), np.float64)
        )
        a_parts.append(np.asarray(to_numpy(base.tensors[m + LORA_A_SUFFIX]), np.float64))
    b_cat = np.concatenate(b_parts, axis=1)
    a_cat = np.concatenate(a_parts, axis=0)
    r, _ = out_spec.rank_alpha(m)
    b_new, a_new, tail_sq, norm_sq = refactorise(b_cat, a_cat, r, out_spec.scaling(m), split)
    errors[m] = (tail_sq, norm_sq)
    dtype_b = ordered[0].adapter.tensors[m + LORA_B_SUFFIX].dtype
    dtype_a = ordered[0].adapter.tensors[m + LORA_A_SUFFIX].dtype
    out[m + LORA_B_SUFFIX] = b_new.astype(dtype_b)
    out[m + LORA_A_SUFFIX] = a_new.astype(dtype_a)


def truncation_metrics(errors: dict[str, tuple[float, float]]) -> dict[str, Any]:
    """Relative Frobenius error ||ΔW − s·B'·A'||_F / ||ΔW||_F per module, overall and at worst."""
    tail_total = sum(t for t, _ in errors.values())
    norm_total = sum(n for _, n in errors.values())
    rel = {m: math.sqrt(t / n) if n > 0 else 0.0 for m, (t, n) in errors.items()}
    return {
        "rel_frobenius_error": rel,
        "rel_frobenius_error_overall": math.sqrt(tail_total / norm_total) if norm_total > 0 else 0.0,
        "rel_frobenius_error_max": max(rel.values(), default=0.0),
    }


@register_strategy
class FedAvgExact(Strategy):
    """Sample-weighted mean of ΔW = scaling·B·A per module, re-factorised to rank r by SVD.

    For each LoRA module, ΔW = Σ_i w_i·s_i·B_i·A_i (float64) is truncated to the output rank r
    and split so that s·B'·A' equals the truncation: ``split="balanced"`` gives both factors
    √S (B' = U√(S/s), A' = √(S/s)Vᵀ); ``split="B"`` puts S on B' and keeps A' = Vᵀ orthonormal,
    so no rank direction has both factors at zero when training resumes. Tensors that are not
    LoRA A/B pairs (biases, DoRA magnitudes) are averaged as in ``fedavg``. Metrics report the
    relative Frobenius error ||ΔW − s·B'·A'||_F / ||ΔW||_F per module and overall.
    """

    name = "fedavg-exact"
    refactorizes = True

    def __init__(self, split: str = "balanced", server_lr: float = 1.0) -> None:
        if split not in ("balanced", "B"):
            raise ValueError(f"split must be 'balanced' or 'B', got {split!r}")
        if not (math.isfinite(server_lr) and server_lr > 0):
            raise ValueError(f"server_lr must be a positive number, got {server_lr}")
        self.split = split
        self.server_lr = float(server_lr)

    def options(self) -> dict[str, Any]:
        return {"split": self.split, "server_lr": self.server_lr}

    def aggregate(
        self, updates: Sequence[ClientUpdate], global_adapter: Adapter | None = None
    ) -> AggregateResult:
        ordered, w = prepare_updates(updates)
        if self.server_lr != 1.0 and (global_adapter is None or not global_adapter.tensors):
            raise ValueError("fedavg-exact with server_lr != 1 needs the round's global adapter")
        config = _output_config(ordered, global_adapter)
        # With a server learning rate η the target is ΔW_g + η·(Σ w_i ΔW_i − ΔW_g): the clients'
        # coefficients become η·w_i and the global keeps 1 − η (combine_exact's global term).
        glob = global_adapter if self.server_lr != 1.0 else None
        tensors, errors = combine_exact(ordered, self.server_lr * w, glob, config, self.split)
        metrics = _weights_metrics(self, ordered, w)
        metrics.update(truncation_metrics(errors))
        return AggregateResult(Adapter(config, tensors), metrics)


def refactorise(b_cat: np.ndarray, a_cat: np.ndarray, r: int, scale: float,
                split: str = "balanced") -> tuple[np.ndarray, np.ndarray, float, float]:
    """Rank-r factors (B', A') with scale·B'·A' the best approximation of ``b_cat @ a_cat`` (a sum
    of low-rank terms, never formed densely), the squared tail and the squared norm of the target.

    ``split="balanced"`` gives both factors √S; ``"B"`` puts S on B' and keeps A' orthonormal.
    """
    u_, s_, v_ = lowrank_svd(b_cat, a_cat, r)
    k = u_.shape[1]
    head, tail = s_[:k], s_[k:]
    if split == "balanced":
        root = np.sqrt(head / scale)
        b_new, a_new = u_ * root, root[:, None] * v_.T
    else:
        b_new, a_new = u_ * (head / scale), v_.T.copy()
    if k < r:  # fewer singular directions than the rank: pad with zero directions
        b_new = np.pad(b_new, ((0, 0), (0, r - k)))
        a_new = np.pad(a_new, ((0, r - k), (0, 0)))
    return b_new, a_new, float(np.sum(tail**2)), float(np.sum(s_**2))
