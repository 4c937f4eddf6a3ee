"""A task's accepted rounds, read back from the chain and the store, and the state a stateful
strategy (a server optimiser) carries through them.

A server optimiser's state is a deterministic function of the task's history: for every accepted
round, in order, the strategy's own step on that round's included updates and global adapter.
Nothing of it is stored or trusted: the aggregator daemon rebuilds it before each round and the
audit rebuilds it while it re-derives every aggregate, both through :func:`replay_round`, so a
restarted daemon (or a different aggregator) computes the same bytes as before and as the audit.
Failed rounds contribute nothing (their global adapter carries over unchanged).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


def aggregation_base(spec: Any, global_adapter: Any | None) -> Any:
    """The adapter a round's aggregate takes its config from: the round's global adapter, or
    the task's bare LoRA config in round 1; either way naming the task's base model, so the
    aggregate's bytes never depend on a path someone's adapter happened to record."""
    if global_adapter is None:
        return config_only_adapter(spec)
    from prismesh.aggregator.adapters import Adapter

    return Adapter({**global_adapter.config, "base_model_name_or_path": spec.base_model_id}, global_adapter.tensors)


def config_only_adapter(spec: Any) -> Any:
    """The round's starting point when a task starts from the bare base model: no tensors, and
    the task's own LoRA config, so the aggregate never inherits one client's local settings."""
    from prismesh.aggregator.adapters import Adapter

    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": spec.base_model_id,
        "bias": "none",
        **spec.lora.to_dict(),
    }
    return Adapter(config, {})


@dataclass(frozen=True)
class Contribution:
    """One included update as revealed on chain."""

    client: str
    cid: str
    num_samples: int


def round_updates(contributions: list[Contribution], adapter_dirs: dict[str, Path], rule: Any = None) -> list[Any]:
    """The ``ClientUpdate``s of one round, weighted by the task's rule (``WeightRule``; default:
    claimed counts), from the fetched adapter directories (``adapter_dirs`` maps CID → directory)."""
    from prismesh.aggregator.adapters import load_adapter
    from prismesh.aggregator.strategies import ClientUpdate
    from prismesh.aggregator.weights import WeightRule

    rule = rule if rule is not None else WeightRule("samples")
    return [ClientUpdate(c.client, rule.weight(int(c.num_samples)), load_adapter(adapter_dirs[c.cid]))
            for c in contributions]


def replay_round(strategy: Any, spec: Any, global_adapter: Any | None, updates: list[Any], state: Any = None) -> Any:
    """Aggregate one round from its updates and the round's global adapter (as fetched, or None),
    exactly as the daemon did; returns the strategy's ``AggregateResult`` (with its new state)."""
    from prismesh.aggregator.strategies import aggregate

    return aggregate(strategy, updates, aggregation_base(spec, global_adapter), state)


@dataclass
class ReplayMemo:
    """The last state :func:`server_state_before` rebuilt for one task and the accepted rounds
    it covers, ``(round, aggregate CID)`` in order: the next round replays only what was
    accepted since, while the chain's accepted rounds still begin with these (otherwise it
    replays the whole history again). A strategy's step returns a new state and leaves the one
    it was given alone, so a kept state is never changed under the memo."""

    covered: tuple[tuple[int, str], ...] = ()
    state: Any = None


def server_state_before(coordinator: Any, start_block: int, store: Any, spec: Any, strategy: Any,
                        task_id: int, round_no: int, work: Path, memo: ReplayMemo | None = None) -> Any:
    """The state of ``strategy`` after every accepted round of ``task_id`` before ``round_no``,
    replayed from the chain's events and the store's adapters (``None`` for a stateless one).
    With ``memo`` (one per task, kept by the caller) each accepted round is replayed once, not
    once for every later round."""
    if not getattr(strategy, "stateful", False):
        return None
    from prismesh.aggregator.adapters import load_adapter
    from prismesh.aggregator.weights import WeightRule
    from prismesh.chain.storage import fetch_adapter

    accepted = sorted((acc for acc in coordinator.get_events("AggregateAccepted", start_block, taskId=task_id)
                       if acc.round < round_no), key=lambda e: e.round)
    history = tuple((int(acc.round), str(acc.aggregate_cid)) for acc in accepted)
    done, state = 0, None
    if memo is not None and memo.covered and history[: len(memo.covered)] == memo.covered:
        done, state = len(memo.covered), memo.state
    if done < len(accepted):
        rule = WeightRule.of_task(coordinator.get_task_params(task_id))
        opened = {ev.round: ev for ev in coordinator.get_events("RoundOpened", start_block, taskId=task_id)}
        reveals: dict[int, dict[str, Any]] = {}
        for ev in coordinator.get_events("UpdateRevealed", start_block, taskId=task_id):
            reveals.setdefault(ev.round, {})[ev.client] = ev
        for acc in accepted[done:]:
            contributions = [
                Contribution(c, reveals[acc.round][c].cid, int(reveals[acc.round][c].num_samples)) for c in acc.included
            ]
            dirs = {c.cid: fetch_adapter(store, c.cid, work / "updates" / c.cid) for c in contributions}
            global_cid = opened[acc.round].global_adapter_cid if acc.round in opened else ""
            glob = load_adapter(fetch_adapter(store, global_cid, work / "global" / global_cid)) if global_cid else None
            state = replay_round(strategy, spec, glob, round_updates(contributions, dirs, rule), state).state
    if memo is not None:
        memo.covered, memo.state = history, state
    return state
