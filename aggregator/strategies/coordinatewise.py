"""Coordinate-wise robust statistics of the updates in ΔW space: ``median`` and ``trimmed-mean``.

Each coordinate of every module's update Δ_i = s·B_i·A_i − s_g·B_g·A_g takes its median or its
trimmed mean over the clients, one client one value (sample counts do not enter a coordinate-wise
statistic), and the new global s_g·B_g·A_g + stat(Δ) is
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

    refactorizes = True  # the result is a truncated ΔW, not in the global adapter's basis

    def __init__(self, split: str = "balanced") -> None:
        if split not in ("balanced", "B"):
            raise ValueError(f"split must be 'balanced' or 'B', got {split!r}")
        self.split = split

    def options(self) -> dict[str, Any]:
        return {"split": self.split}

    def _stat(self, stack: np.ndarray) -> np.ndarray:
        """The statistic over axis 0 of ``stack`` (clients × coordinates)."""
        raise NotImplementedError

    def _details(self, n: int) -> dict[str, Any]:
        return {}

    def aggregate(
        self, updates: Sequence[ClientUpdate], global_adapter: Adapter | None = None
    ) -> AggregateResult:
        ordered, sample_w = prepare_updates(updates)
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
                value = self._stat(stack).reshape(ordered[0].adapter.tensors[key].shape)
                out[key] = (value + g if g is not None else value).astype(ordered[0].adapter.tensors[key].dtype)
            for m in modules:
                self._module(m, ordered, base, spec, out, errors)
        metrics = _weights_metrics(self, ordered, np.full(len(ordered), 1.0 / len(ordered)))
        metrics.update({
            "sample_weights": {u.client: float(x) for u, x in zip(ordered, sample_w, strict=True)},
            "excluded": {}, "clip_factors": {}, **self._details(len(ordered)),
        })
        metrics.update(truncation_metrics(errors))
        return AggregateResult(Adapter(config, dict(sorted(out.items()))), metrics)

    def _module(
        self,
        m: str,
        ordered: list[ClientUpdate],
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
            block = self._stat(stack.reshape(len(ordered), -1)).reshape(hi - lo, n_in)
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


def _trimmed(stack: np.ndarray, k: int) -> np.ndarray:
    """Mean over axis 0 of ``stack`` (clients × coordinates) after dropping its k lowest and k
    highest values per coordinate. k = 1 needs no sort: the sum minus the maximum and the minimum
    (three passes over the rows; the rounding of an extreme value that is subtracted stays far
    below the kept values' precision for any update that passed the checks)."""
    n = stack.shape[0]
    if k == 0:
        return stack.mean(axis=0)
    if k == 1:
        return (stack.sum(axis=0) - stack.max(axis=0) - stack.min(axis=0)) / (n - 2)
    return np.sort(stack, axis=0)[k : n - k].mean(axis=0)


@register_strategy
class Median(_Coordinatewise):
    """Coordinate-wise median of the updates in ΔW, one client one vote (a weight would let a
    sample-count claim move a median). Robust to fewer than half of the clients, but it keeps only
    what most clients agree on: a hospital's own knowledge is a minority view by definition."""

    name = "median"

    def _stat(self, stack: np.ndarray) -> np.ndarray:
        n = stack.shape[0]
        if n in (3, 4):  # the middle value / the mean of the middle two, without a sort
            return _trimmed(stack, 1)
        return np.median(stack, axis=0)


@register_strategy
class TrimmedMean(_Coordinatewise):
    """Coordinate-wise trimmed mean of the updates in ΔW (Yin et al. 2018): per coordinate, the
    k lowest and k highest client values are dropped and the rest averaged, one client one value
    (as for the median, a weight would let a claim dominate the coordinates where the claimant
    survives the trim), k = ceil(``trim``·n) capped at (n − 1) // 2, so it trims one value on
    each side from n = 3 (n = 4: the mean of the middle two) and ``trim=0`` is the plain mean."""

    name = "trimmed-mean"

    def __init__(self, trim: float = 0.1, split: str = "balanced") -> None:
        super().__init__(split)
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

    def _stat(self, stack: np.ndarray) -> np.ndarray:
        return _trimmed(stack, self.trimmed(stack.shape[0]))
