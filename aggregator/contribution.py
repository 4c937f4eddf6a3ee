"""Contribution scores: how much each included update added, recomputable by anyone.

Write W for an adapter's weight change in ΔW space (Σ over LoRA modules of s·B·A, relative to
the base model), G for the round's global adapter and Δ_i = W_i − G for update i. Its score is

    score_i = novelty_i · max(0, cos(Δ_i, c_{-i}))

    novelty_i = min(1, min_{K ∈ known} ‖W_i − K‖ / median_j ‖Δ_j‖)
    c_{-i}    = Σ_{j ≠ i} novelty_j · Δ_j / ‖Δ_j‖

where ``known`` is everything the task published before the round's reveals: the round's global
adapter, every earlier global and every update revealed in an earlier round.

* **Novelty** is how far the update is from anything a client could have copied, measured in
  units of a typical update of the round. A copy of the global (Δ = 0), a tiny perturbation of
  it, and a copy of any earlier published update (re-serialised so that its hash is new) are
  all within a sliver of something known and score about 0, whatever else they look like.
* **Agreement** is the cosine between the update and the leave-one-out consensus direction of
  the *other* included updates. An update is never compared with itself, so it cannot raise
  its own score; each other update votes with its unit direction, so neither a huge update
  (noise at the norm bound) nor a large claimed sample count can drag the consensus; copies
  do not vote (their novelty is 0), so free riders cannot vouch for each other; updates of
  one round that are the same work (twins within 1e-3 of a typical update, i.e. a colluding
  copy) share one novelty and do not vouch for each other either. Pure noise
  points in a random direction of a space of millions of dimensions: its cosine with the
  consensus is about 0, while honest clients training the same task share a direction.

The score needs only the chain (which updates were included, which adapters were published)
and the stored adapters: no validation data, no model. It assumes that honest clients are the
majority of the novel updates and that their updates share some direction (the task's); where
honest updates are orthogonal (disjoint data and nothing in common) agreement cannot tell them
from noise, and no data-free score can.

Inner products of low-rank adapters use only the factors (⟨B₁A₁, B₂A₂⟩ = Σ (B₁ᵀB₂)⊙(A₁A₂ᵀ)),
float64, module by module in sorted order on one BLAS thread, so the scores are the same on
every run. The chain stores them as integers in [0, SCORE_SCALE] (``to_fixed``), and
``split_pool`` mirrors the contract's integer arithmetic, so the audit recomputes every reward.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from prismesh.aggregator.adapters import LORA_A_SUFFIX, LORA_B_SUFFIX, Adapter
from prismesh.aggregator.lowrank import single_threaded_blas
from prismesh.aggregator.strategies.base import ClientUpdate

SCORE_SCALE = 1_000_000
# Updates of one round closer than this (in units of a typical update) are one piece of work.
TWIN_TOLERANCE = 1e-3


def _factors(adapters: Sequence[Adapter], module: str) -> tuple[np.ndarray, np.ndarray]:
    """s·B stacked side by side (out × k·r) and A stacked (k·r × in) for the adapters."""
    bs, as_ = [], []
    for ad in adapters:
        a = np.asarray(ad.tensors[module + LORA_A_SUFFIX], dtype=np.float64)
        b = np.asarray(ad.tensors[module + LORA_B_SUFFIX], dtype=np.float64)
        bs.append(ad.scaling(module) * b)
        as_.append(a)
    return np.concatenate(bs, axis=1), np.concatenate(as_, axis=0)


def inner_products(left: Sequence[Adapter], right: Sequence[Adapter]) -> np.ndarray:
    """⟨W_a, W_b⟩ for every a in ``left`` and b in ``right``, W being the adapter's weight change
    in ΔW space (an adapter without tensors is zero). Every adapter with tensors must have the
    same tensor names and ranks; a mismatch raises ``ValueError`` naming it."""
    out = np.zeros((len(left), len(right)))
    li = [i for i, ad in enumerate(left) if ad.tensors]
    ri = [j for j, ad in enumerate(right) if ad.tensors]
    if not li or not ri:
        return out
    lefts, rights = [left[i] for i in li], [right[j] for j in ri]
    ref = lefts[0]
    for ad in lefts + rights:
        if set(ad.tensors) != set(ref.tensors):
            raise ValueError("adapters with different tensors cannot be compared")
    block = np.zeros((len(li), len(ri)))
    with single_threaded_blas():
        for m in ref.lora_modules():
            bl, al = _factors(lefts, m)
            br, ar = _factors(rights, m)
            r = al.shape[0] // len(lefts)
            if al.shape[0] != r * len(lefts) or ar.shape[0] != r * len(rights):
                raise ValueError(f"module {m}: adapters have different ranks")
            h = (bl.T @ br) * (al @ ar.T)
            block += h.reshape(len(lefts), r, len(rights), r).sum(axis=(1, 3))
        pairs = {m + s for m in ref.lora_modules() for s in (LORA_A_SUFFIX, LORA_B_SUFFIX)}
        for key in sorted(set(ref.tensors) - pairs):
            lv = np.stack([np.asarray(ad.tensors[key], np.float64).ravel() for ad in lefts])
            rv = np.stack([np.asarray(ad.tensors[key], np.float64).ravel() for ad in rights])
            block += lv @ rv.T
    out[np.ix_(li, ri)] = block
    return out


def scores_from_geometry(
    points: np.ndarray, to_known: np.ndarray, known_sq: np.ndarray
) -> np.ndarray:
    """Scores in [0, 1] from inner products: ``points`` is the (n+1)×(n+1) matrix of the n
    updates followed by the round's global adapter, ``to_known`` the n×k products with the
    known adapters and ``known_sq`` their k squared norms."""
    p = np.asarray(points, dtype=np.float64)
    n = p.shape[0] - 1
    if n <= 0:
        return np.zeros(0)
    cross = p[:n, n]
    delta = p[:n, :n] - cross[:, None] - cross[None, :] + p[n, n]  # ⟨Δ_i, Δ_j⟩
    nrm = np.sqrt(np.clip(np.diag(delta), 0.0, None))
    own = np.diag(p)[:n]
    dist_sq = [nrm**2]
    if np.asarray(to_known).size:
        dist_sq.append(own[:, None] - 2.0 * np.asarray(to_known) + np.asarray(known_sq)[None, :])
    nearest = np.sqrt(np.clip(np.column_stack(dist_sq).min(axis=1), 0.0, None))
    typical = float(np.median(nrm))
    novelty = np.minimum(1.0, nearest / typical) if typical > 0 else np.zeros(n)
    # Same-round twins (within a hair of each other): one piece of work, paid once, split.
    gap_sq = np.diag(delta)[:, None] + np.diag(delta)[None, :] - 2.0 * delta
    twins = np.sqrt(np.clip(gap_sq, 0.0, None)) <= TWIN_TOLERANCE * typical
    novelty = novelty / twins.sum(axis=1)
    alive = nrm > 0
    inv = np.where(alive, 1.0 / np.where(alive, nrm, 1.0), 0.0)
    unit = delta * np.outer(inv, inv)
    out = np.zeros(n)
    for i in range(n):
        votes = novelty * alive
        votes[twins[i]] = 0.0  # neither itself nor its twins vouch for an update
        ref_sq = float(votes @ unit @ votes)
        if novelty[i] <= 0 or ref_sq <= 0:
            continue
        cos = float(unit[i] @ votes) / np.sqrt(ref_sq)
        out[i] = novelty[i] * min(1.0, max(0.0, cos))
    return out


@dataclass(frozen=True)
class KnownAdapter:
    """A published adapter with what scoring needs of it on its own, measured once: whether
    its values are all finite and its squared norm in ΔW space."""

    adapter: Adapter
    finite: bool
    sq_norm: float


def measure(adapter: Adapter) -> KnownAdapter:
    """``adapter`` (as numpy) with its measures. The norm of a non-finite adapter, or of one
    whose factors do not fit together, is NaN: no update has its layout, so none is compared
    with it."""
    ad = adapter.as_numpy()
    finite = all(np.isfinite(v).all() for v in ad.tensors.values())
    sq_norm = float("nan")
    if finite:
        try:
            sq_norm = float(inner_products([ad], [ad])[0, 0])
        except ValueError:
            pass
    return KnownAdapter(ad, finite, sq_norm)


def _layout(adapter: Adapter) -> dict[str, tuple[int, ...]]:
    return {k: np.shape(v) for k, v in adapter.tensors.items()}


def contribution_scores(
    adapters: Sequence[Adapter], base: Adapter | None = None, known: Sequence[Adapter | KnownAdapter] = ()
) -> np.ndarray:
    """Scores in [0, 1] of the updates ``adapters`` made from ``base`` (the round's global
    adapter; None or no tensors: the bare base model), ``known`` being every adapter the task
    published before the round (earlier globals and reveals), measured or not. A known adapter
    of another layout, or with non-finite values (an update rejected in its round), is left out:
    nothing is close to it, and a NaN would spoil every score."""
    glob = base if base is not None else Adapter({}, {})
    points = list(adapters) + [glob]
    p = inner_products(points, points)
    layout = _layout(adapters[0]) if adapters else {}
    kept = [m for m in (k if isinstance(k, KnownAdapter) else measure(k) for k in known)
            if m.finite and _layout(m.adapter) == layout]
    to_known = (inner_products(list(adapters), [m.adapter for m in kept]) if kept
                else np.zeros((len(adapters), 0)))
    known_sq = np.array([m.sq_norm for m in kept])
    return scores_from_geometry(p, to_known, known_sq)


def to_fixed(scores: Sequence[float]) -> list[int]:
    """Scores as the contract stores them: integers in [0, SCORE_SCALE] (round half to even)."""
    return [int(np.clip(np.rint(s * SCORE_SCALE), 0, SCORE_SCALE)) for s in scores]


def score_updates(
    updates: Sequence[ClientUpdate], base: Adapter | None = None, known: Sequence[Adapter | KnownAdapter] = ()
) -> dict[str, int]:
    """Fixed-point contribution scores of the included ``updates`` (any order) made from
    ``base``, the round's global adapter, with ``known`` the adapters published before the
    round: what the aggregator submits and the audit recomputes. Claimed sample counts play no
    part: a score is about what an update is, not what its sender says."""
    ordered = sorted(updates, key=lambda u: u.client)
    if not ordered:
        return {}
    scores = contribution_scores([u.adapter.as_numpy() for u in ordered], base, known)
    return dict(zip([u.client for u in ordered], to_fixed(scores), strict=True))


def split_pool(scores: Mapping[str, int], reward_per_update: int, remaining: int) -> dict[str, int]:
    """Each included client's reward exactly as ``Coordinator.submitAggregate`` credits it:
    a pool of ``reward_per_update`` per included update (at most the budget ``remaining``),
    split in proportion to the fixed-point scores, rounded down."""
    total = sum(scores.values())
    pool = 0 if total == 0 else min(reward_per_update * len(scores), remaining)
    return {c: (pool * s) // total if total else 0 for c, s in scores.items()}


class PublishedAdapters:
    """Published adapters by CID, loaded and measured once for every later round.

    Each round's updates are scored against everything its task published before it, so
    re-reading and re-measuring that history per round made scoring cost grow with the task's
    length (about 0.1 s a round by round 8 of a three-client task). A CID names its content, so
    one instance can serve every task. Measures are kept for every CID; loaded adapters up to
    ``max_bytes``, the least recently used dropped first (a later round reads those from disk
    again). An adapter that could not be loaded is not remembered: the next round tries again."""

    def __init__(self, max_bytes: int = 64 << 20) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be non-negative, got {max_bytes}")
        self.max_bytes = max_bytes
        self._kept: OrderedDict[str, tuple[KnownAdapter, int]] = OrderedDict()
        self._measures: dict[str, tuple[bool, float]] = {}
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._measures)

    @property
    def bytes_kept(self) -> int:
        return self._bytes

    def add(self, cid: str, adapter: Adapter) -> None:
        """Remember ``adapter`` as the content of ``cid`` (one the caller fetched and checked
        itself, e.g. a verified update), so a later round does not fetch it again. A copy is
        kept: the caller's arrays may be changed by what it does next."""
        if cid not in self._kept:
            ad = adapter.as_numpy()
            self.get(cid, lambda: Adapter(ad.config, {k: np.array(v, copy=True) for k, v in ad.tensors.items()}))

    def get(self, cid: str, load: Callable[[], Adapter]) -> KnownAdapter:
        """The adapter ``cid`` with its measures; ``load`` reads it when it is not kept."""
        if cid in self._kept:
            self._kept.move_to_end(cid)
            return self._kept[cid][0]
        adapter = load().as_numpy()
        if cid in self._measures:
            finite, sq_norm = self._measures[cid]
            known = KnownAdapter(adapter, finite, sq_norm)
        else:
            known = measure(adapter)
            self._measures[cid] = (known.finite, known.sq_norm)
        size = sum(int(v.nbytes) for v in adapter.tensors.values())
        if size <= self.max_bytes:
            while self._bytes + size > self.max_bytes:
                _, (_, dropped) = self._kept.popitem(last=False)
                self._bytes -= dropped
            self._kept[cid] = (known, size)
            self._bytes += size
        return known


class _Unavailable(Exception):
    """A published adapter that cannot be fetched intact, opened or loaded."""


def published_before(coordinator: object, store: object, task_id: int, round: int, workdir: object,
                     private_key: object = None, cids: list[str] | None = None,
                     cache: PublishedAdapters | None = None) -> list[KnownAdapter]:
    """The adapters ``known`` to round ``round`` of a task: every round's global adapter up to
    this one and every update revealed in an earlier round (failed rounds included), in chain
    order, each with its measures. ``cids`` gives them when the caller already has them from
    the events it followed (the aggregator daemon), else they are read from the chain. Sealed
    ones are opened with ``private_key`` (the aggregator's or an auditor's). Adapters that
    cannot be fetched intact, opened and loaded are left out, by the aggregator and the audit
    alike. Fetches are kept under ``workdir``; ``cache`` keeps the loaded and measured adapters
    for the task's later rounds."""
    from pathlib import Path

    from prismesh.aggregator.adapters import load_adapter
    from prismesh.chain.sealing import fetch_any_adapter

    if cids is None:
        cids = published_cids(coordinator, task_id, round)
    cache = cache if cache is not None else PublishedAdapters(max_bytes=0)
    out: list[KnownAdapter] = []
    seen: set[str] = set()
    for cid in cids:
        if cid in seen:
            continue
        seen.add(cid)
        dest = Path(workdir) / cid  # type: ignore[arg-type]

        def load(cid: str = cid, dest: Path = dest) -> Adapter:
            try:
                path = dest if (dest / "adapter_model.safetensors").is_file() else fetch_any_adapter(
                    store, cid, dest, private_key)
                return load_adapter(path)
            except Exception as exc:  # noqa: BLE001 - an unavailable or malformed adapter is simply not known
                raise _Unavailable(cid) from exc

        try:
            out.append(cache.get(cid, load))
        except _Unavailable:
            continue
    return out


def published_cids(coordinator: object, task_id: int, round: int) -> list[str]:
    """The CIDs :func:`published_before` loads, read from the chain's events."""
    start = coordinator.manifest.deploy_block  # type: ignore[attr-defined]
    return cids_published_before(
        coordinator.get_events("RoundOpened", start, taskId=task_id),  # type: ignore[attr-defined]
        coordinator.get_events("UpdateRevealed", start, taskId=task_id),  # type: ignore[attr-defined]
        round,
    )


def cids_published_before(opened: Sequence[object], revealed: Sequence[object], round: int) -> list[str]:
    """The CIDs known to round ``round`` from a task's ``RoundOpened`` and ``UpdateRevealed``
    events, in chain order: a reader holding the events asks for every round without
    reading them again."""
    cids = [ev.global_adapter_cid for ev in opened  # type: ignore[attr-defined]
            if ev.round <= round and ev.global_adapter_cid]  # type: ignore[attr-defined]
    cids += [ev.cid for ev in revealed if ev.round < round]  # type: ignore[attr-defined]
    return cids
