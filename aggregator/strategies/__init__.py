"""Aggregation strategies: small swappable objects that turn client adapters into a global one.

``base`` holds the interface and the registry; each family lives in its own module and registers
its strategies on import, so ``get_strategy(name)`` knows every one of them.
"""

from prismesh.aggregator.strategies import coordinatewise, fedavg
from prismesh.aggregator.strategies.base import (
    AggregateResult,
    ClientUpdate,
    Strategy,
    available_strategies,
    get_strategy,
    prepare_updates,
    register_strategy,
)
from prismesh.aggregator.strategies.coordinatewise import Median, TrimmedMean
from prismesh.aggregator.strategies.fedavg import FedAvg, FedAvgExact

__all__ = [
    "AggregateResult",
    "ClientUpdate",
    "FedAvg",
    "FedAvgExact",
    "Median",
    "Strategy",
    "TrimmedMean",
    "available_strategies",
    "coordinatewise",
    "fedavg",
    "get_strategy",
    "prepare_updates",
    "register_strategy",
]
