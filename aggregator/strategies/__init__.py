"""Aggregation strategies: small swappable objects that turn client adapters into a global one.

``base`` holds the interface and the registry; each family lives in its own module and registers
its strategies on import, so ``get_strategy(name)`` knows every one of them.
"""

from prismesh.aggregator.strategies import coordinatewise, fair, fedavg, fedprox, serveropt
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
from prismesh.aggregator.strategies.serveropt import FedAdam, FedAvgM, FedYogi, ServerState

__all__ = [
    "AggregateResult",
    "ClientUpdate",
    "FairAvg",
    "FedAdam",
    "FedAvg",
    "FedAvgExact",
    "FedAvgM",
    "FedProx",
    "FedYogi",
    "Median",
    "ServerState",
    "Strategy",
    "TrimmedMean",
    "aggregate",
    "available_strategies",
    "client_settings",
    "coordinatewise",
    "fair",
    "fedavg",
    "fedprox",
    "serveropt",
    "get_strategy",
    "prepare_updates",
    "register_strategy",
]
