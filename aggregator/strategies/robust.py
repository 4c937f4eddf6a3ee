"""Byzantine-robust rules in ΔW space: ``clipped-fedavg``, ``multi-krum`` / ``krum`` and ``geomedian``.

A hospital's update is untrusted: its size, its direction and its self-reported sample count.
Every rule here works on the round's updates Δ_i = s·B_i·A_i − s_g·B_g·A_g (what a client changed
from the global adapter it was given), through their Gram matrix (:mod:`prismesh.aggregator.updates`,
factors only, never an out×in matrix), and decides one coefficient α_i per client: its bounded
sample weight times a clip factor, or zero when the rule excludes it (with a reason). The new
global is the exact rank-r re-factorisation of s_g·B_g·A_g + Σ α_i·Δ_i (``combine_exact``, the
machinery of ``fedavg-exact`` with the global adapter as an extra term).

That split is the seam with server optimisers: :meth:`RobustStrategy.combine` says how the
clients' updates combine (coefficients, exclusions, clipping) and nothing about how far the
combined update moves the global; a server optimiser can take the coefficients and apply its own
step. Every rule is deterministic: clients in id order, float64, fixed iteration counts.

Sample counts are self-reported, so no rule trusts them raw: a client's weight is capped at
``max_weight`` times the round's median count (:func:`bounded_weights`), so a claimed 2^64 − 1
weighs no more than a typical hospital.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from prismesh.aggregator.adapters import Adapter
from prismesh.aggregator.strategies.base import (
    AggregateResult,
    ClientUpdate,
    Strategy,
    _output_config,
    _weights_metrics,
    prepare_updates,
    register_strategy,
)
from prismesh.aggregator.strategies.fedavg import combine_exact, truncation_metrics
from prismesh.aggregator.updates import cosines, distances, norms, update_gram


@dataclass(frozen=True)
class Combination:
    """How a rule combines the round's updates (clients in id order).

    ``coefficients`` are the α_i of G + Σ α_i·Δ_i (zero for an excluded client); ``excluded``
    and ``clip_factors`` say why (a reason per excluded client; the factor < 1 applied to each
    clipped one); ``details`` carries what the rule measured (scores, the median norm, ...).
    """

    coefficients: np.ndarray
    excluded: dict[str, str] = field(default_factory=dict)
    clip_factors: dict[str, float] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)


def bounded_weights(
    ordered: Sequence[ClientUpdate], max_weight: float | None
) -> tuple[np.ndarray, dict[str, float]]:
    """Sample weights summing to one, each count capped at ``max_weight`` × the median count.

    Returns the weights and the capped clients with the count they were held to. ``None`` trusts
    the counts as reported (plain FedAvg weighting).
    """
    counts = np.array([float(u.num_samples) for u in ordered], dtype=np.float64)
    capped: dict[str, float] = {}
    if max_weight is not None:
        limit = max_weight * float(np.median(counts))
        for i, u in enumerate(ordered):
            if counts[i] > limit:
                capped[u.client] = limit
                counts[i] = limit
    return counts / counts.sum(), capped


def _check_positive(name: str, value: float | None, allow_none: bool = False) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)


class RobustStrategy(Strategy):
    """A rule that yields per-client coefficients from the Gram matrix of the round's updates.

    Subclasses implement :meth:`combine`. Options shared by every rule: ``max_weight`` (cap on a
    client's sample count as a multiple of the round's median count; ``None`` trusts counts) and
    ``split`` (how the re-factorised ΔW is split between B and A, as in ``fedavg-exact``).
    """

    refactorizes = True  # the result is re-factorised ΔW (combine_exact), not in the global's basis

    def __init__(self, max_weight: float | None = 2.0, split: str = "balanced") -> None:
        self.max_weight = _check_positive("max_weight", max_weight, allow_none=True)
        if split not in ("balanced", "B"):
            raise ValueError(f"split must be 'balanced' or 'B', got {split!r}")
        self.split = split

    def options(self) -> dict[str, Any]:
        return {"max_weight": self.max_weight, "split": self.split}

    def combine(
        self, ordered: Sequence[ClientUpdate], weights: np.ndarray, gram: np.ndarray
    ) -> Combination:
        """The coefficients for ``ordered`` (id order) with bounded ``weights`` and the Gram
        matrix of their updates."""
        raise NotImplementedError

    def aggregate(
        self, updates: Sequence[ClientUpdate], global_adapter: Adapter | None = None
    ) -> AggregateResult:
        ordered, _ = prepare_updates(updates)
        w, capped = bounded_weights(ordered, self.max_weight)
        base = global_adapter if global_adapter is not None and global_adapter.tensors else None
        gram = update_gram([u.adapter for u in ordered], base)
        comb = self.combine(ordered, w, gram)
        config = _output_config(ordered, global_adapter)
        tensors, errors = combine_exact(ordered, comb.coefficients, base, config, self.split)
        metrics = _weights_metrics(self, ordered, w)
        metrics.update(
            {
                "coefficients": {u.client: float(c) for u, c in zip(ordered, comb.coefficients, strict=True)},
                "update_norms": {u.client: float(x) for u, x in zip(ordered, norms(gram), strict=True)},
                "excluded": dict(comb.excluded),
                "clip_factors": dict(comb.clip_factors),
                "capped_samples": capped,
                **comb.details,
            }
        )
        metrics.update(truncation_metrics(errors))
        return AggregateResult(Adapter(config, tensors), metrics)


def _renormalised(weights: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """``weights`` restricted to ``keep`` and rescaled to sum to one (zero elsewhere)."""
    out = np.where(keep, weights, 0.0)
    total = out.sum()
    return out / total if total > 0 else out


@register_strategy
class ClippedFedAvg(RobustStrategy):
    """FedAvg of updates clipped to a multiple of the round's median update norm.

    With ν_i = ||Δ_i||_F and m the median of the round's ν (unweighted: a count must not move
    it): an update with ν_i < ``min_norm``·m is excluded (a free rider: it returns the global,
    barely changed); with m' the median of the others, one with ν_i > ``max_norm``·m' is
    excluded (far outside the round's honest majority, e.g. a boosted model replacement), and updates whose pairwise cosine reaches
    ``max_cos`` are all excluded (hospitals with their own data never publish the same update;
    copies mean collusion or one party under several keys). The rest are clipped to ``clip``·m'
    and averaged with their bounded sample weights. No constant has to be guessed: every bound is
    relative to the round itself. ``None`` turns a screen off.
    """

    name = "clipped-fedavg"

    def __init__(
        self,
        clip: float = 1.5,
        min_norm: float | None = 0.1,
        max_norm: float | None = 2.0,
        max_cos: float | None = 0.99,
        max_weight: float | None = 2.0,
        split: str = "balanced",
    ) -> None:
        super().__init__(max_weight, split)
        self.clip = _check_positive("clip", clip)
        self.min_norm = None if min_norm is None else float(min_norm)
        if self.min_norm is not None and not (0 <= self.min_norm < 1):
            raise ValueError(f"min_norm must be in [0, 1), got {min_norm!r}")
        self.max_norm = _check_positive("max_norm", max_norm, allow_none=True)
        if self.max_norm is not None and self.max_norm < self.clip:
            raise ValueError(f"max_norm ({max_norm}) must be at least clip ({clip})")
        self.max_cos = None if max_cos is None else float(max_cos)
        if self.max_cos is not None and not (0 < self.max_cos <= 1):
            raise ValueError(f"max_cos must be in (0, 1], got {max_cos!r}")

    def options(self) -> dict[str, Any]:
        return {
            "clip": self.clip, "min_norm": self.min_norm, "max_norm": self.max_norm, "max_cos": self.max_cos,
            **super().options(),
        }

    def combine(
        self, ordered: Sequence[ClientUpdate], weights: np.ndarray, gram: np.ndarray
    ) -> Combination:
        nu = norms(gram)
        med_all = float(np.median(nu))
        excluded: dict[str, str] = {}
        if med_all <= 0:
            for u in ordered:
                excluded[u.client] = "the round's median update norm is zero: nothing to clip against"
            return Combination(np.zeros(len(ordered)), excluded, {}, {"median_norm": med_all})
        keep = np.ones(len(ordered), dtype=bool)
        for i, u in enumerate(ordered):
            ratio = nu[i] / med_all
            if self.min_norm is not None and ratio < self.min_norm:
                excluded[u.client] = (
                    f"update norm {nu[i]:.4g} is {ratio:.3g}x the round's median {med_all:.4g}, below "
                    f"{self.min_norm:g}x: the global adapter returned (almost) unchanged"
                )
                keep[i] = False
        # Free riders out, the median of the updates that did train sets the clip and the upper
        # screen, so near-zero copies of the global cannot drag the clip onto honest updates.
        med = float(np.median(nu[keep]))
        for i, u in enumerate(ordered):
            if keep[i] and self.max_norm is not None and nu[i] / med > self.max_norm:
                excluded[u.client] = (
                    f"update norm {nu[i]:.4g} is {nu[i] / med:.3g}x the median {med:.4g} of the "
                    f"round's trained updates, above {self.max_norm:g}x"
                )
                keep[i] = False
        if self.max_cos is not None:
            cos = cosines(gram)
            for i, u in enumerate(ordered):
                twins = [ordered[j].client for j in range(len(ordered)) if j != i and cos[i, j] >= self.max_cos]
                if twins and u.client not in excluded:
                    best = max(cos[i, j] for j in range(len(ordered)) if j != i)
                    excluded[u.client] = (
                        f"update has cosine {best:.4f} >= {self.max_cos:g} with {', '.join(twins)}: "
                        f"the same update from several clients"
                    )
                    keep[i] = False
        bound = self.clip * med
        factors = np.where(keep & (nu > bound), bound / np.where(nu > 0, nu, 1.0), 1.0)
        clip_factors = {u.client: float(factors[i]) for i, u in enumerate(ordered) if keep[i] and factors[i] < 1.0}
        alpha = _renormalised(weights, keep) * factors
        return Combination(alpha, excluded, clip_factors, {"median_norm": med_all, "trained_median_norm": med, "clip_norm": bound})


@register_strategy
class MultiKrum(RobustStrategy):
    """Multi-Krum (Blanchard et al. 2017) on ΔW distances: keep the ``m`` updates whose summed
    squared distance to their n − f − 2 nearest neighbours is smallest, average them with their
    bounded sample weights.

    ``f`` is the number of Byzantine clients assumed, by default (n − 1) // 3 (the chain's
    n = 3f + 1 rule; at least one neighbour is always scored); ``m`` defaults to n − f. Ties go
    to the lower client id. Honest updates that differ because hospitals hold different data
    score as badly as attacks: on non-IID federations Krum drops honest knowledge.
    """

    name = "multi-krum"

    def __init__(
        self, f: int | None = None, m: int | None = None, max_weight: float | None = 2.0, split: str = "balanced"
    ) -> None:
        super().__init__(max_weight, split)
        for label, v in (("f", f), ("m", m)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < (0 if label == "f" else 1)):
                raise ValueError(f"{label} must be an integer >= {0 if label == 'f' else 1}, got {v!r}")
        self.f, self.m = f, m

    def options(self) -> dict[str, Any]:
        return {"f": self.f, "m": self.m, **super().options()}

    def combine(
        self, ordered: Sequence[ClientUpdate], weights: np.ndarray, gram: np.ndarray
    ) -> Combination:
        n = len(ordered)
        f = (n - 1) // 3 if self.f is None else self.f
        neighbours = max(1, n - f - 2)
        m = n - f if self.m is None else self.m
        if n > 1 and neighbours > n - 1:
            raise ValueError(f"krum with f={f} needs more than {n} clients")
        m = max(1, min(m, n))
        d2 = distances(gram) ** 2
        scores = np.zeros(n)
        for i in range(n):
            others = np.sort(np.delete(d2[i], i)) if n > 1 else np.zeros(0)
            scores[i] = float(others[:neighbours].sum())
        order = sorted(range(n), key=lambda i: (scores[i], i))
        keep = np.zeros(n, dtype=bool)
        keep[order[:m]] = True
        excluded = {
            ordered[i].client: (
                f"Krum score {scores[i]:.4g} (squared ΔW distance to its {neighbours} nearest "
                f"update(s)) ranks {rank + 1} of {n}; only the best {m} are kept (f={f})"
            )
            for rank, i in enumerate(order)
            if not keep[i]
        }
        details = {"krum_scores": {u.client: float(s) for u, s in zip(ordered, scores, strict=True)}, "krum_f": f}
        return Combination(_renormalised(weights, keep), excluded, {}, details)


@register_strategy
class Krum(MultiKrum):
    """Krum: the single update with the best Multi-Krum score becomes the round's update."""

    name = "krum"

    def __init__(self, f: int | None = None, max_weight: float | None = 2.0, split: str = "balanced") -> None:
        super().__init__(f=f, m=1, max_weight=max_weight, split=split)

    def options(self) -> dict[str, Any]:
        return {"f": self.f, "max_weight": self.max_weight, "split": self.split}


def weiszfeld(
    gram: np.ndarray, weights: np.ndarray, *, iterations: int = 100, tol: float = 1e-10
) -> tuple[np.ndarray, int]:
    """The weighted geometric median of the updates as a convex combination β of them.

    Weiszfeld's iteration β ← (w_i / d_i) / Σ (w_j / d_j), with d_i = ||Δ_i − Σ_j β_j Δ_j|| read
    off the Gram matrix, starting from the weighted mean. A distance below 1e-12 of the updates'
    scale is floored there (the median sits on an update). Stops after ``iterations`` or when no
    β_i moves by more than ``tol``; both are fixed, so the result is deterministic. Returns β
    and the iterations run.
    """
    beta = weights.astype(np.float64).copy()
    scale = float(np.sqrt(max(np.max(np.diag(gram)), 0.0))) if gram.size else 0.0
    floor = max(scale * 1e-12, np.finfo(np.float64).tiny)
    done = 0
    while done < iterations:
        done += 1
        g_beta = gram @ beta
        d2 = np.diag(gram) - 2.0 * g_beta + float(beta @ g_beta)
        d = np.maximum(np.sqrt(np.clip(d2, 0.0, None)), floor)
        new = weights / d
        new /= new.sum()
        moved = float(np.max(np.abs(new - beta)))
        beta = new
        if moved <= tol:
            break
    return beta, done


@register_strategy
class GeoMedian(RobustStrategy):
    """The weighted geometric median of the updates in ΔW space (RFA, Pillutla et al. 2022).

    Weiszfeld's algorithm over the Gram matrix: the median is a convex combination Σ β_i Δ_i of
    the updates, so the new global is G + Σ β_i Δ_i, re-factorised exactly. Fewer than half of
    the weight can move it only a bounded distance, however large their updates, so counts are
    capped at the round's median (``max_weight=1``): with a cap of twice the median, one liar
    among four hospitals could claim almost half of the weight. Nobody is excluded; an outlier
    just gets a small β.
    """

    name = "geomedian"

    def __init__(
        self, iterations: int = 100, max_weight: float | None = 1.0, split: str = "balanced"
    ) -> None:
        super().__init__(max_weight, split)
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
            raise ValueError(f"iterations must be an integer >= 1, got {iterations!r}")
        self.iterations = iterations

    def options(self) -> dict[str, Any]:
        return {"iterations": self.iterations, **super().options()}

    def combine(
        self, ordered: Sequence[ClientUpdate], weights: np.ndarray, gram: np.ndarray
    ) -> Combination:
        beta, done = weiszfeld(gram, weights, iterations=self.iterations)
        return Combination(beta, {}, {}, {"weiszfeld_iterations": done})
