"""Aggregation strategies: small swappable objects that turn client adapters into a global one.

Modelled on Flower's ``Strategy``: the daemon only calls ``strategy.aggregate(updates, global)``,
so a task names its strategy (``get_strategy(name, **options)``) and new ones register themselves.

Every strategy is deterministic: updates are ordered by client id before any arithmetic, weights
and sums are float64, and the result is cast back to the clients' dtype — the same inputs in any
order give a byte-identical aggregate and so the same CID.

* ``fedavg`` — sample-weighted mean of every tensor (A and B separately), the usual practice.
  Note that mean(B)·mean(A) is not mean(B·A) unless the clients share A.
* ``fedavg-exact`` — sample-weighted mean of each module's ΔW = scaling·B·A, re-factorised to the
  task's rank by truncated SVD; the relative Frobenius error of that truncation is reported.
* ``median`` and ``trimmed-mean`` — coordinate-wise robust statistics (unweighted), which bound
  the influence of a minority of outlying clients.
"""

from __future__ import annotations

import ctypes
import math
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from prismesh.aggregator.adapters import LORA_A_SUFFIX, LORA_B_SUFFIX, Adapter, to_numpy


@dataclass(frozen=True)
class ClientUpdate:
    """One client's contribution: its id (address), its number of training samples, its adapter."""

    client: str
    num_samples: int
    adapter: Adapter


@dataclass(frozen=True)
class AggregateResult:
    """The aggregated adapter and what the strategy measured (weights used, errors, ...)."""

    adapter: Adapter
    metrics: dict[str, Any] = field(default_factory=dict)


class Strategy(ABC):
    """Aggregation rule. Subclasses set ``name`` and implement :meth:`aggregate`."""

    name: ClassVar[str] = ""

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


@register_strategy
class FedAvg(Strategy):
    """Sample-weighted mean of every tensor (LoRA A and B averaged separately).

    ``server_lr`` η ≠ 1 makes it FedAvg with a server learning rate (FedOpt/SGD):
    new = global + η·(mean − global), which needs the round's global adapter.
    """

    name = "fedavg"

    def __init__(self, server_lr: float = 1.0) -> None:
        if not (math.isfinite(server_lr) and server_lr > 0):
            raise ValueError(f"server_lr must be a positive number, got {server_lr}")
        self.server_lr = float(server_lr)

    def options(self) -> dict[str, Any]:
        return {"server_lr": self.server_lr}

    def aggregate(
        self, updates: Sequence[ClientUpdate], global_adapter: Adapter | None = None
    ) -> AggregateResult:
        ordered, w = prepare_updates(updates)
        if self.server_lr != 1.0 and global_adapter is None:
            raise ValueError("fedavg with server_lr != 1 needs the round's global adapter")
        out: dict[str, np.ndarray] = {}
        for key in sorted(ordered[0].adapter.tensors):
            mean, dtype = _weighted_mean(ordered, w, key)
            if self.server_lr != 1.0:
                g = _global_tensor(global_adapter, key, mean.shape)
                mean = g + self.server_lr * (mean - g)
            out[key] = mean.astype(dtype)
        adapter = Adapter(_output_config(ordered, global_adapter), out)
        return AggregateResult(adapter, _weights_metrics(self, ordered, w))


def _global_tensor(global_adapter: Adapter | None, key: str, shape: tuple) -> np.ndarray:
    if global_adapter is None or key not in global_adapter.tensors:
        raise ValueError(f"global adapter lacks tensor {key}")
    g = np.asarray(to_numpy(global_adapter.tensors[key], key), dtype=np.float64)
    if g.shape != shape:
        raise ValueError(f"global adapter tensor {key} is {g.shape}, updates have {shape}")
    return g


_BLAS_THREADS: tuple[Any, Any] | None | bool = False  # False: not looked up yet


def _openblas_threads() -> tuple[Any, Any] | None:
    """numpy's OpenBLAS thread getter/setter, found among the loaded libraries (Linux), or None."""
    global _BLAS_THREADS
    if _BLAS_THREADS is False:
        _BLAS_THREADS = None
        try:
            with open("/proc/self/maps", encoding="utf-8") as fh:
                paths = sorted({ln.split()[-1] for ln in fh if "openblas" in ln.lower()})
        except OSError:
            paths = []
        for path in paths:
            try:
                lib = ctypes.CDLL(path)
            except OSError:
                continue
            for stem in (
                "scipy_openblas_{}64_",
                "openblas_{}64_",
                "scipy_openblas_{}",
                "openblas_{}",
            ):
                get = getattr(lib, stem.format("get_num_threads"), None)
                set_ = getattr(lib, stem.format("set_num_threads"), None)
                if get is not None and set_ is not None:
                    get.restype, set_.argtypes = ctypes.c_int, [ctypes.c_int]
                    _BLAS_THREADS = (get, set_)
                    return _BLAS_THREADS
    return _BLAS_THREADS or None


@contextmanager
def single_threaded_blas() -> Iterator[None]:
    """Run numpy's BLAS/LAPACK on one thread inside the block.

    The factorizations here are tall and skinny (out × N·r), where threads gain little, while a
    multi-threaded OpenBLAS on a busy host can be 30× slower (spinning threads) and its results
    depend on the thread count; one thread keeps them fast and bit-reproducible.
    """
    threads = _openblas_threads()
    if threads is None:
        yield
        return
    get, set_ = threads
    before = get()
    set_(1)
    try:
        yield
    finally:
        set_(before)


def _fix_signs(u: np.ndarray, v: np.ndarray) -> None:
    """Make the largest-magnitude entry of each column of ``u`` positive (flipping ``v`` too).

    Singular vectors are defined up to sign; pinning it makes the factors reproducible. A zero
    column of ``u`` (a null direction) takes its sign from ``v`` instead.
    """
    if u.shape[1] == 0:
        return
    cols = np.arange(u.shape[1])
    ref = np.where(np.abs(u).max(axis=0) > 0, u[np.argmax(np.abs(u), axis=0), cols], 0.0)
    ref = np.where(ref == 0, v[np.argmax(np.abs(v), axis=0), cols], ref)
    signs = np.where(ref < 0, -1.0, 1.0)
    u *= signs
    v *= signs


def lowrank_svd(
    b_cat: np.ndarray, a_cat: np.ndarray, rank: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Leading ``rank`` singular triplets of ``b_cat @ a_cat`` (out×K · K×in, K small), and all
    its singular values, without forming the out×in product.

    With B = Q_b R_b and Aᵀ = Q_a R_a (QR), B·A = Q_b (R_b R_aᵀ) Q_aᵀ, so the singular values are
    those of the K×K core M = U_m S V_mᵀ. The leading vectors follow without forming Q:
    U_k S_k = B·R_aᵀ·V_m,k and V_k S_k = Aᵀ·R_bᵀ·U_m,k. Cost O((out+in)·K²) instead of
    O(out·in·min(out, in)) for a dense SVD. Directions whose singular value is at rounding level
    are null: their U column is zero and their V column comes from Q_a (an orthonormal
    completion). Returns U (out×k), S (all), V (in×k), k = min(rank, len(S)), signs pinned.
    """
    r_b = np.linalg.qr(b_cat, mode="r")
    r_a = np.linalg.qr(a_cat.T, mode="r")
    u_m, s, vt_m = np.linalg.svd(r_b @ r_a.T)
    k = min(rank, s.size)
    tol = (s[0] if s.size else 0.0) * max(*b_cat.shape, *a_cat.shape) * np.finfo(np.float64).eps
    live = s[:k] > tol
    us = b_cat @ (r_a.T @ vt_m[:k].T)
    vs = a_cat.T @ (r_b.T @ u_m[:, :k])
    u = np.zeros_like(us)
    v = np.zeros_like(vs)
    u[:, live] = us[:, live] / s[:k][live]
    v[:, live] = vs[:, live] / s[:k][live]
    if not live.all():
        q_a = np.linalg.qr(a_cat.T)[0]
        v_all = q_a @ vt_m[:k].T
        v[:, ~live] = v_all[:, ~live]
    _fix_signs(u, v)
    return u, s, v


@register_strategy
class FedAvgExact(Strategy):
    """Sample-weighted mean of ΔW = scaling·B·A per module, re-factorised to rank r by SVD.

    For each LoRA module, ΔW = Σ_i w_i·s_i·B_i·A_i (float64) is truncated to the output rank r
    and split so that s·B'·A' equals the truncation: ``split="balanced"`` gives both factors
    √S (B' = U√(S/s), A' = √(S/s)Vᵀ); ``split="B"`` puts S on B' and keeps A' = Vᵀ orthonormal,
    so no rank direction has both factors at zero when training resumes. Tensors that are not
    LoRA A/B pairs (biases, DoRA magnitudes) are averaged as in ``fedavg``. Metrics report the
    relative Frobenius error ||ΔW − s·B'·A'||_F / ||ΔW||_F per module and overall.
    """

    name = "fedavg-exact"

    def __init__(self, split: str = "balanced") -> None:
        if split not in ("balanced", "B"):
            raise ValueError(f"split must be 'balanced' or 'B', got {split!r}")
        self.split = split

    def options(self) -> dict[str, Any]:
        return {"split": self.split}

    def aggregate(
        self, updates: Sequence[ClientUpdate], global_adapter: Adapter | None = None
    ) -> AggregateResult:
        ordered, w = prepare_updates(updates)
        config = _output_config(ordered, global_adapter)
        out_spec = Adapter(config, {})
        modules = ordered[0].adapter.lora_modules()
        pair_keys = {m + s for m in modules for s in (LORA_A_SUFFIX, LORA_B_SUFFIX)}
        out: dict[str, np.ndarray] = {}
        errors: dict[str, tuple[float, float]] = {}
        for key in sorted(set(ordered[0].adapter.tensors) - pair_keys):
            mean, dtype = _weighted_mean(ordered, w, key)
            out[key] = mean.astype(dtype)
        with single_threaded_blas():
            for m in modules:
                self._module(m, ordered, w, out_spec, out, errors)
        tail_total = sum(t for t, _ in errors.values())
        norm_total = sum(n for _, n in errors.values())
        rel = {m: math.sqrt(t / n) if n > 0 else 0.0 for m, (t, n) in errors.items()}
        metrics = _weights_metrics(self, ordered, w)
        metrics["rel_frobenius_error"] = rel
        metrics["rel_frobenius_error_overall"] = (
            math.sqrt(tail_total / norm_total) if norm_total > 0 else 0.0
        )
        metrics["rel_frobenius_error_max"] = max(rel.values(), default=0.0)
        return AggregateResult(Adapter(config, dict(sorted(out.items()))), metrics)

    def _module(
        self,
        m: str,
        ordered: list[ClientUpdate],
        w: np.ndarray,
        out_spec: Adapter,
        out: dict[str, np.ndarray],
        errors: dict[str, tuple[float, float]],
    ) -> None:
        """Aggregate one module into ``out``; record (tail², ||ΔW||²) in ``errors``."""
        b_cat = np.concatenate(
            [
                (wi * u.adapter.scaling(m))
                * np.asarray(u.adapter.tensors[m + LORA_B_SUFFIX], np.float64)
                for wi, u in zip(w, ordered, strict=True)
            ],
            axis=1,
        )
        a_cat = np.concatenate(
            [np.asarray(u.adapter.tensors[m + LORA_A_SUFFIX], np.float64) for u in ordered],
            axis=0,
        )
        r, _ = out_spec.rank_alpha(m)
        scale = out_spec.scaling(m)
        u_, s_, v_ = lowrank_svd(b_cat, a_cat, r)
        k = u_.shape[1]
        head, tail = s_[:k], s_[k:]
        if self.split == "balanced":
            root = np.sqrt(head / scale)
            b_new, a_new = u_ * root, root[:, None] * v_.T
        else:
            b_new, a_new = u_ * (head / scale), v_.T.copy()
        if k < r:  # fewer singular directions than the rank: pad with zero directions
            b_new = np.pad(b_new, ((0, 0), (0, r - k)))
            a_new = np.pad(a_new, ((0, r - k), (0, 0)))
        norm_sq, tail_sq = float(np.sum(s_**2)), float(np.sum(tail**2))
        errors[m] = (tail_sq, norm_sq)
        dtype_b = ordered[0].adapter.tensors[m + LORA_B_SUFFIX].dtype
        dtype_a = ordered[0].adapter.tensors[m + LORA_A_SUFFIX].dtype
        out[m + LORA_B_SUFFIX] = b_new.astype(dtype_b)
        out[m + LORA_A_SUFFIX] = a_new.astype(dtype_a)


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
