"""FedProx (Li et al. 2020): ``fedprox``, a proximal term on every client, any rule on the server.

Each client adds ``(mu/2)·||w − w_global||²`` over its LoRA weights to its local loss, which keeps
its update near the round's global adapter (less client drift under non-IID data). The term
lives in the trainer (``TrainConfig.prox_mu``); the strategy's part is to require it of every
client — :meth:`FedProx.client_train_settings` gives ``{"prox_mu": mu}`` for the task spec's
``train`` section — and to combine the updates with its ``inner`` rule (FedAvg by default).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from prismesh.aggregator.adapters import Adapter
from prismesh.aggregator.strategies.base import (
    AggregateResult,
    ClientUpdate,
    Strategy,
    get_strategy,
    register_strategy,
)


@register_strategy
class FedProx(Strategy):
    """FedProx: clients train with ``prox_mu = mu``; updates combine with the ``inner`` rule."""

    name = "fedprox"

    def __init__(self, mu: float = 0.01, inner: str = "fedavg", inner_options: dict[str, Any] | None = None) -> None:
        if isinstance(mu, bool) or not (isinstance(mu, (int, float)) and math.isfinite(mu) and mu > 0):
            raise ValueError(f"mu must be a positive number, got {mu!r}")
        self.mu = float(mu)
        self.inner = get_strategy(inner, **(inner_options or {}))
        if self.inner.stateful:
            raise ValueError(f"inner strategy {inner!r} is stateful; wrap fedprox in it instead")
        self.refactorizes = self.inner.refactorizes

    def options(self) -> dict[str, Any]:
        return {"mu": self.mu, "inner": self.inner.name, "inner_options": self.inner.options()}

    def client_train_settings(self) -> dict[str, Any]:
        return {**self.inner.client_train_settings(), "prox_mu": self.mu}

    def aggregate(
        self, updates: Sequence[ClientUpdate], global_adapter: Adapter | None = None
    ) -> AggregateResult:
        result = self.inner.aggregate(updates, global_adapter)
        metrics = {**result.metrics, "strategy": self.name, "options": self.options()}
        return AggregateResult(result.adapter, metrics)
