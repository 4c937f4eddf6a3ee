"""Server-side optimisers (FedOpt): ``fedavgm``, ``fedadam`` and ``fedyogi``.

The seam with any other strategy: an *inner* rule decides how the clients' updates combine
(``fedavg``, ``fairavg``, ``median``, ``trimmed-mean``, a robust rule ...); the server optimiser
decides how that combination moves the global adapter. With ``x`` the round's global adapter
and ``c`` the inner rule's result, the pseudo-gradient is ``Δ = c − x`` per tensor, and

* ``fedavgm`` (Hsu et al. 2019): ``m ← β·m + Δ``; ``x ← x + η·m``
  (``momentum=0`` is FedAvg with a server learning rate; ``η > 1`` undoes the shrinking of
  each client's contribution by its weight, which is what holds plain FedAvg back when the
  clients' knowledge is disjoint);
* ``fedadam`` (Reddi et al. 2021): ``m ← β₁m + (1−β₁)Δ``; ``v ← β₂v + (1−β₂)Δ²``;
  ``x ← x + η·m / (√v + τ)``;
* ``fedyogi``: as ``fedadam`` with ``v ← v − (1−β₂)·Δ²·sign(v − Δ²)``.

They act on the LoRA factors tensor by tensor, so the inner rule must return factors in the
global adapter's basis (any coordinate-wise or weighted rule does; ``fedavg-exact``, which
re-factorises ΔW by SVD, does not, and is refused — use its own ``server_lr`` instead).

The state (``m``, ``v``, the step count) is float64 and deterministic in the task's history;
it is never stored. The aggregator daemon and the audit rebuild it identically by replaying
the task's accepted rounds from the chain and the store (:mod:`prismesh.aggregator.history`).
A round whose global adapter has no tensors (a task starting from the bare base model) has no
pseudo-gradient: its result is the inner rule's, and the optimiser starts at the next round.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from prismesh.aggregator.adapters import Adapter, to_numpy
from prismesh.aggregator.strategies.base import (
    AggregateResult,
    ClientUpdate,
    Strategy,
    get_strategy,
    register_strategy,
)


@dataclass
class ServerState:
    """A server optimiser's state after ``step`` pseudo-gradient steps (float64 tensors)."""

    step: int = 0
    m: dict[str, np.ndarray] = field(default_factory=dict)
    v: dict[str, np.ndarray] = field(default_factory=dict)


class _ServerOptimizer(Strategy):
    """Wraps an inner (stateless) rule and moves the global adapter along its pseudo-gradient."""

    stateful = True

    def __init__(self, inner: str = "fedavg", inner_options: dict[str, Any] | None = None,
                 lr: float = 1.0) -> None:
        if not isinstance(inner, str) or not inner:
            raise ValueError("inner must be a strategy name")
        self.inner = get_strategy(inner, **(inner_options or {}))
        if self.inner.stateful:
            raise ValueError(f"inner strategy {inner!r} is stateful; a server optimiser wraps a stateless rule")
        if self.inner.refactorizes:
            raise ValueError(
                f"inner strategy {inner!r} re-factorises the LoRA update, so its factors are not in the "
                "global adapter's basis; use its own server_lr option instead"
            )
        self.inner_options = dict(inner_options or {})
        self.lr = _positive("lr", lr)

    def _common_options(self) -> dict[str, Any]:
        return {"inner": self.inner.name, "inner_options": self.inner.options(), "lr": self.lr}

    def client_train_settings(self) -> dict[str, Any]:
        return self.inner.client_train_settings()

    def _move(self, key: str, x: np.ndarray, delta: np.ndarray, state: ServerState) -> np.ndarray:
        raise NotImplementedError

    def aggregate(self, updates: Sequence[ClientUpdate], global_adapter: Adapter | None = None,
                  state: ServerState | None = None) -> AggregateResult:
        combined = self.inner.aggregate(updates, global_adapter)
        metrics = dict(combined.metrics)
        metrics.update(strategy=self.name, options=self.options(), inner_strategy=self.inner.name)
        prev = state if state is not None else ServerState()
        if global_adapter is None or not global_adapter.tensors:
            metrics["server_step"] = "skipped: the round's global adapter has no tensors"
            return AggregateResult(combined.adapter, metrics, prev)
        new = ServerState(prev.step + 1, dict(prev.m), dict(prev.v))
        out: dict[str, np.ndarray] = {}
        delta_sq = move_sq = 0.0
        for key in sorted(combined.adapter.tensors):
            c_raw = combined.adapter.tensors[key]
            c = np.asarray(c_raw, dtype=np.float64)
            if key not in global_adapter.tensors:
                raise ValueError(f"global adapter lacks tensor {key}")
            x = np.asarray(to_numpy(global_adapter.tensors[key], key), dtype=np.float64)
            if x.shape != c.shape:
                raise ValueError(f"global adapter tensor {key} is {x.shape}, updates have {c.shape}")
            delta = c - x
            moved = self._move(key, x, delta, new)
            delta_sq += float(np.sum(delta**2))
            move_sq += float(np.sum((moved - x) ** 2))
            out[key] = moved.astype(np.asarray(c_raw).dtype)
        metrics["server_step"] = new.step
        metrics["pseudo_gradient_norm"] = math.sqrt(delta_sq)
        metrics["server_move_norm"] = math.sqrt(move_sq)
        return AggregateResult(Adapter(dict(combined.adapter.config), out), metrics, new)


@register_strategy
class FedAvgM(_ServerOptimizer):
    """Server momentum: ``m ← β·m + Δ``, ``x ← x + η·m``."""

    name = "fedavgm"

    def __init__(self, inner: str = "fedavg", inner_options: dict[str, Any] | None = None,
                 lr: float = 1.0, momentum: float = 0.9) -> None:
        super().__init__(inner, inner_options, lr)
        if not (math.isfinite(momentum) and 0.0 <= momentum < 1.0):
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.momentum = float(momentum)

    def options(self) -> dict[str, Any]:
        return {**self._common_options(), "momentum": self.momentum}

    def _move(self, key: str, x: np.ndarray, delta: np.ndarray, state: ServerState) -> np.ndarray:
        m = self.momentum * state.m.get(key, 0.0) + delta
        state.m[key] = m
        return x + self.lr * m


class _Adaptive(_ServerOptimizer):
    def __init__(self, inner: str = "fedavg", inner_options: dict[str, Any] | None = None,
                 lr: float = 1e-2, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3) -> None:
        super().__init__(inner, inner_options, lr)
        for name, b in (("beta1", beta1), ("beta2", beta2)):
            if not (math.isfinite(b) and 0.0 <= b < 1.0):
                raise ValueError(f"{name} must be in [0, 1), got {b}")
        self.beta1, self.beta2 = float(beta1), float(beta2)
        self.tau = _positive("tau", tau)

    def options(self) -> dict[str, Any]:
        return {**self._common_options(), "beta1": self.beta1, "beta2": self.beta2, "tau": self.tau}

    def _second_moment(self, v: np.ndarray, d2: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _move(self, key: str, x: np.ndarray, delta: np.ndarray, state: ServerState) -> np.ndarray:
        m = self.beta1 * state.m.get(key, 0.0) + (1.0 - self.beta1) * delta
        v_prev = state.v.get(key)
        if v_prev is None:  # Reddi et al.: v starts at τ²
            v_prev = np.full(delta.shape, self.tau**2)
        v = self._second_moment(v_prev, delta**2)
        state.m[key], state.v[key] = m, v
        return x + self.lr * m / (np.sqrt(v) + self.tau)


@register_strategy
class FedAdam(_Adaptive):
    """Adam on the server: per-coordinate steps scaled by the running second moment."""

    name = "fedadam"

    def _second_moment(self, v: np.ndarray, d2: np.ndarray) -> np.ndarray:
        return self.beta2 * v + (1.0 - self.beta2) * d2


@register_strategy
class FedYogi(_Adaptive):
    """Yogi on the server: the second moment grows additively, so it forgets less abruptly."""

    name = "fedyogi"

    def _second_moment(self, v: np.ndarray, d2: np.ndarray) -> np.ndarray:
        return v - (1.0 - self.beta2) * d2 * np.sign(v - d2)


def _positive(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)
