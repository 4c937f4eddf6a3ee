"""Fairness-aware weighting: ``fairavg``, a weighted mean of the LoRA tensors whose weights lean
towards small clients.

Sample-weighted FedAvg gives a client its share of the data, so the smallest hospital's update
is shrunk to that share and its knowledge barely reaches the others. ``fairavg`` weights client
``k`` by ``n_k ** power`` (``power=1`` is FedAvg, ``0`` uniform) and, with ``cap``, limits any one
client's weight to ``cap`` (the excess is shared out among the others in proportion), so no
single large client dominates. Like FedAvg it only needs the revealed sample counts, so anyone
recomputes it; unlike q-FFL it needs no client-reported loss, which nobody could check.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from prismesh.aggregator.adapters import Adapter
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


def fair_weights(counts: np.ndarray, power: float, cap: float | None = None) -> np.ndarray:
    """Weights ∝ counts**power summing to 1, each at most ``cap`` when given (water-filling)."""
    raw = np.asarray(counts, dtype=np.float64) ** power
    w = raw / raw.sum()
    if cap is None or cap * len(w) < 1.0 - 1e-12:
        return w
    fixed = np.zeros(len(w), dtype=bool)
    for _ in range(len(w)):
        over = (w > cap + 1e-15) & ~fixed
        if not over.any():
            break
        fixed |= over
        w[fixed] = cap
        free = ~fixed
        w[free] = raw[free] / raw[free].sum() * (1.0 - cap * fixed.sum())
    return w


@register_strategy
class FairAvg(Strategy):
    """Weighted mean of every tensor with weights ∝ ``num_samples ** power``, capped at ``cap``."""

    name = "fairavg"

    def __init__(self, power: float = 0.0, cap: float | None = None) -> None:
        if isinstance(power, bool) or not (isinstance(power, (int, float)) and 0.0 <= power <= 1.0):
            raise ValueError(f"power must be in [0, 1], got {power!r}")
        if cap is not None and not (isinstance(cap, (int, float)) and math.isfinite(cap) and 0.0 < cap <= 1.0):
            raise ValueError(f"cap must be in (0, 1], got {cap!r}")
        self.power = float(power)
        self.cap = None if cap is None else float(cap)

    def options(self) -> dict[str, Any]:
        return {"power": self.power, "cap": self.cap}

    def aggregate(
        self, updates: Sequence[ClientUpdate], global_adapter: Adapter | None = None
    ) -> AggregateResult:
        ordered, sample_w = prepare_updates(updates)
        counts = np.array([u.num_samples for u in ordered], dtype=np.float64)
        w = fair_weights(counts, self.power, self.cap)
        out: dict[str, np.ndarray] = {}
        for key in sorted(ordered[0].adapter.tensors):
            mean, dtype = _weighted_mean(ordered, w, key)
            out[key] = mean.astype(dtype)
        metrics = _weights_metrics(self, ordered, w)
        metrics["sample_weights"] = {u.client: float(x) for u, x in zip(ordered, sample_w, strict=True)}
        return AggregateResult(Adapter(_output_config(ordered, global_adapter), out), metrics)
