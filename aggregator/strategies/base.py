"""The ``Strategy`` interface, the client update it consumes, and the strategy registry.

Modelled on Flower's ``Strategy``: the daemon only calls ``strategy.aggregate(updates, global)``,
so a task names its strategy (``get_strategy(name, **options)``) and new ones register
themselves with ``@register_strategy``.

Two optional capabilities, both off by default:

* ``stateful``: a server optimiser carries state from round to round. Its ``aggregate`` takes
  ``state=`` (the state after the previous accepted round, ``None`` at the start) and returns
  the new state in ``AggregateResult.state``. The state is never trusted from anyone's disk: the
  daemon and the audit both rebuild it by replaying the task's accepted rounds from the chain
  and the store (:mod:`prismesh.aggregator.history`); :func:`aggregate` calls either kind.
* ``client_train_settings()``: training settings the strategy needs every client to use (FedProx's
  proximal weight); they belong in the task spec's ``train`` section (:func:`client_settings`).

Every strategy is deterministic: updates are ordered by client id before any arithmetic, weights
and sums are float64, and the result is cast back to the clients' dtype, so the same inputs in
any order give a byte-identical aggregate and therefore the same CID.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from prismesh.aggregator.adapters import Adapter


@dataclass(frozen=True)
class ClientUpdate:
    """One client's contribution: its id (address), its number of training samples, its adapter."""

    client: str
    num_samples: int
    adapter: Adapter


@dataclass(frozen=True)
class AggregateResult:
    """The aggregated adapter, what the strategy measured (weights used, errors, ...) and, for a
    stateful strategy, its state after this round."""

    adapter: Adapter
    metrics: dict[str, Any] = field(default_factory=dict)
    state: Any = None


class Strategy(ABC):
    """Aggregation rule. Subclasses set ``name`` and implement :meth:`aggregate`."""

    name: ClassVar[str] = ""
    stateful: ClassVar[bool] = False  # True: aggregate() takes state= and returns result.state
    # True: the result's LoRA factors are a fresh factorisation (not comparable tensor by tensor
    # with the global adapter's), so a server optimiser on the factors cannot wrap it.
    refactorizes: ClassVar[bool] = False

    @abstractmethod
    def aggregate(
        self, updates: Sequence[ClientUpdate], global_adapter: Adapter | None = None
    ) -> AggregateResult:
        """Combine ``updates`` (any order) into a new global adapter.

        ``global_adapter`` is the adapter the round started from; its config is the aggregate's
        config when given (otherwise the config of the first client by id).
        """

    def options(self) -> dict[str, Any]:
        """The strategy's settings, recorded in the metrics so a result can be re-derived."""
        return {}

    def client_train_settings(self) -> dict[str, Any]:
        """Training settings every client must use with this strategy (none by default)."""
        return {}


def aggregate(
    strategy: Strategy,
    updates: Sequence[ClientUpdate],
    global_adapter: Adapter | None = None,
    state: Any = None,
) -> AggregateResult:
    """Run one round of ``strategy``, handing a stateful one the state of the previous round."""
    if strategy.stateful:
        return strategy.aggregate(updates, global_adapter, state=state)  # type: ignore[call-arg]
    return strategy.aggregate(updates, global_adapter)


def client_settings(name: str, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The training settings strategy ``name`` (with ``options``) requires of every client."""
    return get_strategy(name, **(options or {})).client_train_settings()


def prepare_updates(
    updates: Sequence[ClientUpdate],
) -> tuple[list[ClientUpdate], np.ndarray]:
    """Validate updates, order them by client id and return float64 sample weights summing to 1.

    Raises ``ValueError`` naming the client for empty input, duplicate clients, non-positive
    sample counts, or adapters whose tensor names, shapes or dtypes differ.
    """
    if not updates:
        raise ValueError("no updates to aggregate")
    ordered = sorted(updates, key=lambda u: u.client)
    seen: set[str] = set()
    for u in ordered:
        if u.client in seen:
            raise ValueError(f"client {u.client} appears more than once")
        seen.add(u.client)
        if isinstance(u.num_samples, bool) or int(u.num_samples) != u.num_samples:
            raise ValueError(f"client {u.client}: num_samples must be an integer")
        if u.num_samples <= 0:
            raise ValueError(
                f"client {u.client}: num_samples must be positive, got {u.num_samples}"
            )
    ordered = [ClientUpdate(u.client, int(u.num_samples), u.adapter.as_numpy()) for u in ordered]
    ref = ordered[0]
    ref_sig = {k: (v.shape, v.dtype) for k, v in ref.adapter.tensors.items()}
    for u in ordered[1:]:
        sig = {k: (v.shape, v.dtype) for k, v in u.adapter.tensors.items()}
        if sig.keys() != ref_sig.keys():
            diff = sorted(sig.keys() ^ ref_sig.keys())
            raise ValueError(
                f"client {u.client}: tensor names differ from client {ref.client} "
                f"({len(diff)} differ, e.g. {diff[0]})"
            )
        for k, (shape, dtype) in sig.items():
            if (shape, dtype) != ref_sig[k]:
                raise ValueError(
                    f"client {u.client}: tensor {k} is {shape} {dtype}, client {ref.client} "
                    f"has {ref_sig[k][0]} {ref_sig[k][1]}"
                )
    counts = np.array([u.num_samples for u in ordered], dtype=np.float64)
    return ordered, counts / counts.sum()


def _weights_metrics(strategy: Strategy, ordered: list[ClientUpdate], w: np.ndarray) -> dict:
    return {
        "strategy": strategy.name,
        "options": strategy.options(),
        "clients": [u.client for u in ordered],
        "num_samples": {u.client: u.num_samples for u in ordered},
        "weights": {u.client: float(x) for u, x in zip(ordered, w, strict=True)},
    }


def _output_config(ordered: list[ClientUpdate], global_adapter: Adapter | None) -> dict:
    return dict(global_adapter.config if global_adapter is not None else ordered[0].adapter.config)


def _weighted_mean(
    ordered: list[ClientUpdate], w: np.ndarray, key: str
) -> tuple[np.ndarray, np.dtype]:
    """Σ w_i x_i in float64, summed in client-id order; returns the sum and the input dtype."""
    first = ordered[0].adapter.tensors[key]
    acc = np.zeros(first.shape, dtype=np.float64)
    for wi, u in zip(w, ordered, strict=True):
        acc += wi * np.asarray(u.adapter.tensors[key], dtype=np.float64)
    return acc, first.dtype


_REGISTRY: dict[str, type[Strategy]] = {}


def register_strategy(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator: make a strategy available to :func:`get_strategy` under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    _REGISTRY[cls.name] = cls
    return cls


def available_strategies() -> list[str]:
    """Names accepted by :func:`get_strategy`."""
    return sorted(_REGISTRY)


def get_strategy(name: str, **options: Any) -> Strategy:
    """The strategy registered as ``name`` (``fedavg``, ``fedavg-exact``, ...), built with ``options``."""
    try:
        cls = _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown aggregation strategy {name!r}; known: {', '.join(available_strategies())}"
        ) from None
    try:
        return cls(**options)
    except TypeError as exc:
        raise ValueError(f"bad options {sorted(options)} for strategy {name!r}: {exc}") from exc
