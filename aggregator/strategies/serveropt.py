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

They act on the LoRA factors tensor by tensor, which needs the inner rule's factors in the
global adapter's basis (any coordinate-wise or weighted rule). An inner rule that re-factorises
ΔW (``fedavg-exact``, rules that combine updates in ΔW space) returns factors in a new basis each
round; ``fedavgm`` with ``momentum=0`` then moves ΔW itself, per LoRA module:
ΔW ← (1 − η)·ΔW_global + η·ΔW_inner, re-factorised to the task's rank exactly as ``fedavg-exact``
does (a sum of two low-rank terms, never formed densely). Momentum and the adaptive optimisers
would need a dense per-module state in ΔW space, so they refuse such an inner rule.

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

from prismesh.aggregator.adapters import LORA_A_SUFFIX, LORA_B_SUFFIX, Adapter, to_numpy
from prismesh.aggregator.lowrank import single_threaded_blas
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
                 lr: float = 1.0, delta_w_space: bool = False) -> None:
        if not isinstance(inner, str) or not inner:
            raise ValueError("inner must be a strategy name")
        self.inner = get_strategy(inner, **(inner_options or {}))
        if self.inner.stateful:
            raise ValueError(f"inner strategy {inner!r} is stateful; a server optimiser wraps a stateless rule")
        if self.inner.refactorizes and not delta_w_space:
            raise ValueError(
                f"inner strategy {inner!r} re-factorises the LoRA update, so its factors are not in the "
                "global adapter's basis; only fedavgm with momentum 0 moves such a result (in ΔW space)"
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
        if self.inner.refactorizes:
            out = _move_delta_w(combined.adapter, global_adapter, self.lr)
            metrics["server_step"] = new.step
            return AggregateResult(Adapter(dict(combined.adapter.config), out), metrics, new)
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
        if not (isinstance(momentum, (int, float)) and math.isfinite(momentum) and 0.0 <= momentum < 1.0):
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        super().__init__(inner, inner_options, lr, delta_w_space=momentum == 0.0)
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


def _move_delta_w(combined: Adapter, glob: Adapter, lr: float) -> dict[str, np.ndarray]:
    """ΔW ← (1 − η)·ΔW_global + η·ΔW_combined per LoRA module, re-factorised to the combined
    adapter's rank; other tensors move as x + η·(c − x)."""
    from prismesh.aggregator.strategies.fedavg import refactorise

    modules = combined.lora_modules()
    pairs = {m + s for m in modules for s in (LORA_A_SUFFIX, LORA_B_SUFFIX)}
    out: dict[str, np.ndarray] = {}
    for key in sorted(set(combined.tensors) - pairs):
        c = np.asarray(combined.tensors[key], np.float64)
        x = np.asarray(to_numpy(glob.tensors[key], key), np.float64)
        out[key] = (x + lr * (c - x)).astype(np.asarray(combined.tensors[key]).dtype)
    with single_threaded_blas():
        for m in modules:
            kb, ka = m + LORA_B_SUFFIX, m + LORA_A_SUFFIX
            if kb not in glob.tensors or ka not in glob.tensors:
                raise ValueError(f"global adapter lacks the LoRA factors of {m}")
            b_cat = np.concatenate([
                ((1.0 - lr) * glob.scaling(m)) * np.asarray(to_numpy(glob.tensors[kb], kb), np.float64),
                (lr * combined.scaling(m)) * np.asarray(combined.tensors[kb], np.float64),
            ], axis=1)
            a_cat = np.concatenate([np.asarray(to_numpy(glob.tensors[ka], ka), np.float64),
                                    np.asarray(combined.tensors[ka], np.float64)], axis=0)
            r, _ = combined.rank_alpha(m)
            b_new, a_new, _, _ = refactorise(b_cat, a_cat, r, combined.scaling(m))
            out[kb] = b_new.astype(np.asarray(combined.tensors[kb]).dtype)
            out[ka] = a_new.astype(np.asarray(combined.tensors[ka]).dtype)
    return dict(sorted(out.items()))
