"""Coordinate-wise robust statistics over the clients' tensors: ``median`` and ``trimmed-mean``."""

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
    _weights_metrics,
    prepare_updates,
    register_strategy,
)


class _Coordinatewise(Strategy):
    """Unweighted coordinate-wise statistic over clients, one tensor at a time."""

    def _stat(self, stack: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def aggregate(
        self, updates: Sequence[ClientUpdate], global_adapter: Adapter | None = None
    ) -> AggregateResult:
        ordered, w = prepare_updates(updates)
        out: dict[str, np.ndarray] = {}
        for key in sorted(ordered[0].adapter.tensors):
            stack = np.stack([np.asarray(u.adapter.tensors[key], np.float64) for u in ordered])
            out[key] = self._stat(stack).astype(ordered[0].adapter.tensors[key].dtype)
        metrics = _weights_metrics(self, ordered, np.full(len(ordered), 1.0 / len(ordered)))
        metrics["sample_weights"] = {u.client: float(x) for u, x in zip(ordered, w, strict=True)}
        return AggregateResult(Adapter(_output_config(ordered, global_adapter), out), metrics)


@register_strategy
class Median(_Coordinatewise):
    """Coordinate-wise median of every tensor (robust to < half outlying clients; unweighted)."""

    name = "median"

    def _stat(self, stack: np.ndarray) -> np.ndarray:
        return np.median(stack, axis=0)


@register_strategy
class TrimmedMean(_Coordinatewise):
    """Coordinate-wise mean after dropping the ``trim`` fraction of lowest and highest values."""

    name = "trimmed-mean"

    def __init__(self, trim: float = 0.1) -> None:
        if not 0.0 <= trim < 0.5:
            raise ValueError(f"trim must be in [0, 0.5), got {trim}")
        self.trim = float(trim)

    def options(self) -> dict[str, Any]:
        return {"trim": self.trim}

    def _stat(self, stack: np.ndarray) -> np.ndarray:
        k = int(math.floor(self.trim * stack.shape[0]))
        ordered = np.sort(stack, axis=0)
        return ordered[k : stack.shape[0] - k].mean(axis=0)
