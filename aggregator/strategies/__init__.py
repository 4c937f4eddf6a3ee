"""Aggregation strategies: small swappable objects that turn client adapters into a global one.

``base`` holds the interface and the registry; each family lives in its own module and registers
its strategies on import, so ``get_strategy(name)`` knows every one of them.
"""

from prismesh.aggregator.strategies import coordinatewise, fair, fedavg, fedprox, robust, serveropt
from prismesh.aggregator.strategies.base import (
    AggregateResult,
    ClientUpdate,
    Strategy,
    aggregate,
    available_strategies,
    client_settings,
    get_strategy,
    prepare_updates,
    register_strategy,
)
from prismesh.aggregator.strategies.coordinatewise import Median, TrimmedMean
from prismesh.aggregator.strategies.fair import FairAvg
from prismesh.aggregator.strategies.fedavg import FedAvg, FedAvgExact
from prismesh.aggregator.strategies.fedprox import FedProx
from prismesh.aggregator.strategies.robust import (
    ClippedFedAvg,
    Combination,
    GeoMedian,
    Krum,
    MultiKrum,
    RobustStrategy,
    bounded_weights,
)
from prismesh.aggregator.strategies.serveropt import FedAdam, FedAvgM, FedYogi, ServerState

__all__ = [
    "AggregateResult",
    "ClientUpdate",
    "ClippedFedAvg",
    "Combination",
    "FairAvg",
    "FedAdam",
    "FedAvg",
    "FedAvgExact",
    "FedAvgM",
    "FedProx",
    "FedYogi",
    "GeoMedian",
    "Krum",
    "Median",
    "MultiKrum",
    "RobustStrategy",
    "ServerState",
    "Strategy",
    "TrimmedMean",
    "aggregate",
    "available_strategies",
    "bounded_weights",
    "client_settings",
    "coordinatewise",
    "fair",
    "fedavg",
    "fedprox",
    "get_strategy",
    "prepare_updates",
    "register_strategy",
    "robust",
    "serveropt",
]
