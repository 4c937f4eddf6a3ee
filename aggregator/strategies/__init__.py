"""Aggregation strategies: small swappable objects that turn client adapters into a global one.

``base`` holds the interface and the registry; each family lives in its own module and registers
its strategies on import, so ``get_strategy(name)`` knows every one of them.
"""

from prismesh.aggregator.strategies import coordinatewise, fedavg, robust
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
from prismesh.aggregator.strategies.robust import (
    ClippedFedAvg,
    Combination,
    GeoMedian,
    Krum,
    MultiKrum,
    RobustStrategy,
    bounded_weights,
)

__all__ = [
    "AggregateResult",
    "ClientUpdate",
    "ClippedFedAvg",
    "Combination",
    "FedAvg",
    "FedAvgExact",
    "GeoMedian",
    "Krum",
    "Median",
    "MultiKrum",
    "RobustStrategy",
    "Strategy",
    "TrimmedMean",
    "available_strategies",
    "bounded_weights",
    "coordinatewise",
    "fedavg",
    "get_strategy",
    "prepare_updates",
    "register_strategy",
    "robust",
]
