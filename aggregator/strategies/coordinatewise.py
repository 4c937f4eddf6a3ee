"""Coordinate-wise robust statistics of the updates in ΔW space: ``median`` and ``trimmed-mean``.

Each coordinate of every module's update Δ_i = s·B_i·A_i − s_g·B_g·A_g takes its median or its
trimmed mean over the clients (the kept values averaged with bounded sample weights, as in the
ΔW-space rules of :mod:`~prismesh.aggregator.strategies.robust`), and the new global s_g·B_g·A_g + stat(Δ) is
truncated back to rank r. A and B are never combined separately (their product is what the model
uses, and they are defined only up to an r×r factor). The statistic is dense: each module's
updates are formed row block by row block, so memory stays bounded, but the cost grows with
out×in×n; the truncation of a large module uses a seeded randomized range finder.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from prismesh.aggregator.adapters import LORA_A_SUFFIX, LORA_B_SUFFIX, Adapter, to_numpy
from prismesh.aggregator.lowrank import _fix_signs, single_threaded_blas
from prismesh.aggregator.strategies.base import (
    AggregateResult,
    ClientUpdate,
    Strategy,
    _output_config,
    _weights_metrics,
    prepare_updates,
    register_strategy,
)
from prismesh.aggregator.strategies.fedavg import truncation_metrics
from prismesh.aggregator.strategies.robust import bounded_weights

BLOCK_BYTES = 1 << 27  # one row block of n clients' ΔW rows (float64) at most, 128 MiB
EXACT_SVD_MAX = 1024  # dense SVD up to this min(out, in); a randomized range finder above it
OVERSAMPLE, POWER_ITERATIONS = 10, 2


def truncated_svd(
    m: np.ndarray, rank: int, exact_max: int = EXACT_SVD_MAX
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Leading ``rank`` singular triplets of a dense ``m`` and the squared norm of the rest.

    Exact (LAPACK) when min(out, in) <= ``exact_max``; above it a randomized range finder with a
    fixed seed, ``OVERSAMPLE`` extra columns and ``POWER_ITERATIONS`` re-orthonormalised power
    iterations (Halko et al. 2011), so the result is deterministic. Signs are pinned.
    """
    total = float(np.sum(m * m))
    if min(m.shape) <= exact_max:
        u, s, vt = np.linalg.svd(m, full_matrices=False)
    else:
        rng = np.random.default_rng(0)
        q = np.linalg.qr(m @ rng.standard_normal((m.shape[1], min(rank + OVERSAMPLE, min(m.shape)))))[0]
        for _ in range(POWER_ITERATIONS):
            q = np.linalg.qr(m.T @ q)[0]
            q = np.linalg.qr(m @ q)[0]
        u_small, s, vt = np.linalg.svd(q.T @ m, full_matrices=False)
        u = q @ u_small
    k = min(rank, s.size)
    u, s_k, v = u[:, :k].copy(), s[:k], vt[:k].T.copy()
    _fix_signs(u, v)
    return u, s_k, v, max(total - float(np.sum(s_k**2)), 0.0)


class _Coordinatewise(Strategy):
    """A weighted statistic over clients of each coordinate of the updates, in ΔW space."""

    def __init__(self, max_weight: float | None = 2.0, split: str = "balanced") -> None:
        if max_weight is not None and not (isinstance(max_weight, (int, float)) and math.isfinite(max_weight) and max_weight > 0):
            raise ValueError(f"max_weight must be a positive number, got {max_weight!r}")
        if split not in ("balanced", "B"):
            raise ValueError(f"split must be 'balanced' or 'B', got {split!r}")
        self.max_weight = None if max_weight is None else float(max_weight)
        self.split = split

    def options(self) -> dict[str, Any]:
        return {"max_weight": self.max_weight, "split": self.split}

    def _stat(self, stack: np.ndarray, w: np.ndarray) -> np.ndarray:
        """The statistic over axis 0 of ``stack`` (clients × coordinates) with weights ``w``."""
        raise NotImplementedError

    def _details(self, n: int) -> dict[str, Any]:
        return {}

    def aggregate(
        self, updates: Sequence[ClientUpdate], global_adapter: Adapter | None = None
    ) -> AggregateResult:
        ordered, _ = prepare_updates(updates)
        w, capped = bounded_weights(ordered, self.max_weight)
        base = global_adapter if global_adapter is not None and global_adapter.tensors else None
        config = _output_config(ordered, global_adapter)
        spec = Adapter(config, {})
        modules = ordered[0].adapter.lora_modules()
        pairs = {m + s for m in modules for s in (LORA_A_SUFFIX, LORA_B_SUFFIX)}
        out: dict[str, np.ndarray] = {}
        errors: dict[str, tuple[float, float]] = {}
        with single_threaded_blas():
            for key in sorted(set(ordered[0].adapter.tensors) - pairs):
                g = _global(base, key)
                stack = np.stack([np.asarray(u.adapter.tensors[key], np.float64).ravel() for u in ordered])
                if g is not None:
                    stack -= g.ravel()
                value = self._stat(stack, w).reshape(ordered[0].adapter.tensors[key].shape)
                out[key] = (value + g if g is not None else value).astype(ordered[0].adapter.tensors[key].dtype)
            for m in modules:
                self._module(m, ordered, w, base, spec, out, errors)
        metrics = _weights_metrics(self, ordered, w)
        metrics.update({"capped_samples": capped, "excluded": {}, "clip_factors": {}, **self._details(len(ordered))})
        metrics.update(truncation_metrics(errors))
        return AggregateResult(Adapter(config, dict(sorted(out.items()))), metrics)

    def _module(
        self,
        m: str,
        ordered: list[ClientUpdate],
        w: np.ndarray,
        base: Adapter | None,
        spec: Adapter,
        out: dict[str, np.ndarray],
        errors: dict[str, tuple[float, float]],
    ) -> None:
        factors = [
            (u.adapter.scaling(m) * np.asarray(u.adapter.tensors[m + LORA_B_SUFFIX], np.float64),
             np.asarray(u.adapter.tensors[m + LORA_A_SUFFIX], np.float64))
            for u in ordered
        ]
        g_b = g_a = None
        if base is not None:
            g_b, g_a = _global(base, m + LORA_B_SUFFIX), _global(base, m + LORA_A_SUFFIX)
            if g_b is None or g_a is None:
                raise ValueError(f"global adapter lacks module {m}")
            g_b = base.scaling(m) * g_b
        n_out, n_in = factors[0][0].shape[0], factors[0][1].shape[1]
        rows = max(1, BLOCK_BYTES // (8 * len(ordered) * n_in))
        dense = np.empty((n_out, n_in))
        for lo in range(0, n_out, rows):
            hi = min(n_out, lo + rows)
            glob = g_b[lo:hi] @ g_a if g_b is not None else None
            stack = np.stack([b[lo:hi] @ a for b, a in factors])
            if glob is not None:
                stack -= glob
            block = self._stat(stack.reshape(len(ordered), -1), w).reshape(hi - lo, n_in)
            dense[lo:hi] = block + glob if glob is not None else block
        r, _ = spec.rank_alpha(m)
        scale = spec.scaling(m)
        u_, head, v_, tail_sq = truncated_svd(dense, r)
        k = head.size
        if self.split == "balanced":
            root = np.sqrt(head / scale)
            b_new, a_new = u_ * root, root[:, None] * v_.T
        else:
            b_new, a_new = u_ * (head / scale), v_.T.copy()
        if k < r:
            b_new = np.pad(b_new, ((0, 0), (0, r - k)))
            a_new = np.pad(a_new, ((0, r - k), (0, 0)))
        errors[m] = (tail_sq, tail_sq + float(np.sum(head**2)))
        out[m + LORA_B_SUFFIX] = b_new.astype(ordered[0].adapter.tensors[m + LORA_B_SUFFIX].dtype)
        out[m + LORA_A_SUFFIX] = a_new.astype(ordered[0].adapter.tensors[m + LORA_A_SUFFIX].dtype)


def _global(base: Adapter | None, key: str) -> np.ndarray | None:
    if base is None or key not in base.tensors:
        return None
    return np.asarray(to_numpy(base.tensors[key], key), dtype=np.float64)


@register_strategy
class Median(_Coordinatewise):
    """Coordinate-wise median of the updates in ΔW, one client one vote (a weight would let a
    sample-count claim move a median). Robust to fewer than half of the clients, but it keeps only
    what most clients agree on: a hospital's own knowledge is a minority view by definition."""

    name = "median"

    def _stat(self, stack: np.ndarray, w: np.ndarray) -> np.ndarray:
        return np.median(stack, axis=0)


@register_strategy
class TrimmedMean(_Coordinatewise):
    """Coordinate-wise trimmed mean of the updates in ΔW: per coordinate, the k lowest and k
    highest client values are dropped and the rest averaged with their bounded sample weights,
    k = ceil(``trim``·n) capped at (n − 1) // 2, so it trims one value on each side from n = 3
    (n = 4: the mean of the middle two) and ``trim=0`` is the weighted mean. Among equal values
    the lowest client id is trimmed at the bottom and the highest at the top."""

    name = "trimmed-mean"

    def __init__(self, trim: float = 0.1, max_weight: float | None = 2.0, split: str = "balanced") -> None:
        super().__init__(max_weight, split)
        if not (isinstance(trim, (int, float)) and 0.0 <= trim < 0.5):
            raise ValueError(f"trim must be in [0, 0.5), got {trim!r}")
        self.trim = float(trim)

    def options(self) -> dict[str, Any]:
        return {"trim": self.trim, **super().options()}

    def trimmed(self, n: int) -> int:
        """Values dropped at each end of a coordinate with ``n`` clients."""
        return min(math.ceil(self.trim * n), (n - 1) // 2)

    def _details(self, n: int) -> dict[str, Any]:
        return {"trimmed_per_side": self.trimmed(n)}

    def _stat(self, stack: np.ndarray, w: np.ndarray) -> np.ndarray:
        n = stack.shape[0]
        k = self.trimmed(n)
        wcol = w[:, None]
        if k == 0:
            return np.sum(stack * wcol, axis=0) / float(w.sum())
        # The k-th smallest and largest values per coordinate (a sort of values only, which is
        # fast along the client axis), then elementwise masks: no per-coordinate argsort.
        ordered = np.sort(stack, axis=0)
        lo, hi = ordered[k - 1], ordered[n - k]
        del ordered
        trim = stack < lo
        ties = stack == lo
        trim |= ties & (np.cumsum(ties, axis=0) <= k - (stack < lo).sum(axis=0))
        above = stack > hi
        ties = (stack == hi) & ~trim
        from_top = np.cumsum(ties[::-1], axis=0)[::-1]
        trim |= above | (ties & (from_top <= k - above.sum(axis=0)))
        keep_w = np.where(trim, 0.0, wcol)
        return np.sum(np.where(trim, 0.0, stack) * keep_w, axis=0) / np.sum(keep_w, axis=0)
