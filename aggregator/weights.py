"""How much each included update weighs in the aggregate: the task's rule, in one place.

A client's sample count is self-reported: the data never leaves the hospital, so nobody can
check it. Weighting by it lets one liar take over the global model (2^64 - 1 claimed samples
gave weight 1.0 to one client and 2.7e-17 to the others). A task therefore fixes the rule on
chain (``Coordinator.TaskParams``) and everyone applies the same one:

* ``samples``: weight = the claimed count, which the contract caps at the task's
  ``sample_cap`` (a claim above it is refused); the weights are the capped counts normalised.
  A liar gains at most ``cap / (cap + Σ others)`` of the aggregate, so governance sets the cap
  near the largest dataset a site may honestly hold.
* ``uniform``: every included update weighs the same, whatever it claims.

The aggregator daemon, the audit and the experiment all take weights from here, and strategies
receive the bounded weight as ``ClientUpdate.num_samples``, so every strategy (robust ones
included) sees only bounded weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

WEIGHTINGS = ("samples", "uniform")


@dataclass(frozen=True)
class WeightRule:
    """A task's weighting: ``samples`` (capped claimed counts) or ``uniform``."""

    weighting: str = "samples"
    sample_cap: int | None = None

    def __post_init__(self) -> None:
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"unknown weighting {self.weighting!r}; known: {', '.join(WEIGHTINGS)}")
        if self.sample_cap is not None and self.sample_cap < 1:
            raise ValueError(f"sample_cap must be at least 1, got {self.sample_cap}")

    @classmethod
    def of_task(cls, params: object) -> WeightRule:
        """The rule a task's on-chain parameters (``TaskParams``) fix."""
        weighting = getattr(params, "weighting")  # noqa: B009 - a Weighting enum or its name
        name = weighting.name.lower() if hasattr(weighting, "name") else str(weighting).lower()
        return cls(name, int(getattr(params, "sample_cap")))  # noqa: B009

    def weight(self, num_samples: int) -> int:
        """The bounded integer weight of one update claiming ``num_samples``."""
        if isinstance(num_samples, bool) or int(num_samples) != num_samples or num_samples < 1:
            raise ValueError(f"a sample count must be a positive integer, got {num_samples!r}")
        if self.weighting == "uniform":
            return 1
        n = int(num_samples)
        return min(n, self.sample_cap) if self.sample_cap is not None else n

    def weights(self, claims: Mapping[str, int]) -> dict[str, int]:
        """Bounded integer weights of every client's claim (strategies normalise them)."""
        return {client: self.weight(n) for client, n in claims.items()}


def normalised(weights: Mapping[str, int]) -> dict[str, float]:
    """Weights summing to one (float64, in client order)."""
    total = float(sum(weights.values()))
    if total <= 0:
        raise ValueError("weights must not all be zero")
    return {c: w / total for c, w in sorted(weights.items())}
