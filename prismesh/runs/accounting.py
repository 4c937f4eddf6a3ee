"""Where a federated run's wall time goes: each row (start-up, every round, the tail after the
last round) split into training and the overhead around it: chain, finality, storage,
aggregation, evaluation and other.

A :class:`Ledger` times named parts of the work; parts nest, and time inside an inner part is
the inner part's only, so the parts of a row never add up to more than its wall time. Time in
no part is ``other``. The demo wraps its federation's chain connection, committee, store,
aggregator and nodes (:func:`instrument`) so nothing in the daemons has to know about it.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Iterator
from typing import Any

OVERHEAD_PARTS = ("chain", "finality", "storage", "aggregation", "evaluation")
PARTS = ("training", *OVERHEAD_PARTS)
# Work inside these parts is theirs whatever it calls: the committee's own chain calls are
# finality.
_ABSORBING = {"finality"}


class Ledger:
    """Seconds per part since the last :meth:`cut`, measured with ``clock``."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self._stack: list[str] = []
        self._totals = dict.fromkeys(PARTS, 0.0)
        self._since = self._row_start = clock()

    @contextlib.contextmanager
    def part(self, name: str) -> Iterator[None]:
        if name not in PARTS:
            raise ValueError(f"unknown part {name!r}; parts are {', '.join(PARTS)}")
        if self._stack and self._stack[-1] in _ABSORBING:
            yield
            return
        self._switch(name)
        try:
            yield
        finally:
            self._switch(None)

    def _switch(self, name: str | None) -> None:
        now = self.clock()
        if self._stack:
            self._totals[self._stack[-1]] += now - self._since
        self._since = now
        if name is None:
            self._stack.pop()
        else:
            self._stack.append(name)

    def cut(self, label: str, training: float | None = None) -> dict[str, Any]:
        """Close the current row as ``label`` and start the next one now (see :func:`make_row`)."""
        now = self.clock()
        if self._stack:
            self._totals[self._stack[-1]] += now - self._since
        self._since = now
        wall = now - self._row_start
        self._row_start = now
        parts, self._totals = self._totals, dict.fromkeys(PARTS, 0.0)
        return make_row(label, wall, parts, training)

    def wrap(self, obj: Any, method: str, name: str) -> None:
        """Time ``obj.method`` as part ``name`` (an instance attribute shadows the method)."""
        inner = getattr(obj, method)

        @functools.wraps(inner)
        def timed(*args: Any, **kwargs: Any) -> Any:
            with self.part(name):
                return inner(*args, **kwargs)

        setattr(obj, method, timed)


def make_row(label: str, wall: float, parts: dict[str, float], training: float | None = None) -> dict[str, Any]:
    """A report row: ``wall`` seconds, of which ``training`` and the overhead split by part;
    ``other`` is what no part accounts for, so training + overhead = wall exactly. Training is
    the clients' own measured training time when given (what the trainer reports, without
    loading the model), else the time spent in the ``training`` part; the difference lands in
    ``other``. ``parts`` keeps the raw seconds per part."""
    train = parts.get("training", 0.0) if training is None else training
    overhead = {p: parts.get(p, 0.0) for p in OVERHEAD_PARTS}
    overhead["other"] = wall - train - sum(overhead.values())
    return {
        "row": label,
        "wall_seconds": wall,
        "training_seconds": train,
        "overhead_seconds": wall - train,
        "overhead": overhead,
        "parts": dict(parts),
    }


def with_training(row: dict[str, Any], training: float) -> dict[str, Any]:
    """``row`` with the clients' measured training seconds in place of its own."""
    return make_row(row["row"], row["wall_seconds"], row["parts"], training)


def rounded(row: dict[str, Any], digits: int = 3) -> dict[str, Any]:
    """The row for a report: seconds to ``digits`` decimals, without the raw parts."""
    out = {k: round(v, digits) if isinstance(v, float) else v for k, v in row.items() if k != "parts"}
    out["overhead"] = {k: round(v, digits) for k, v in row["overhead"].items()}
    return out


def evaluation_with_its_round(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Report rows (from round 1 on, the tail last) with each aggregate's evaluation moved into
    the row of the round that produced it.

    A federated round's row closes when its aggregate is accepted, and the sites evaluate that
    aggregate afterwards, so the evaluation in row ``r + 1`` (the tail for the last round) is
    round ``r``'s. A loop that evaluates inside each round is compared with these rows. Wall and
    overhead seconds move with the evaluation; the total is unchanged."""
    evals = [float(r["overhead"].get("evaluation", 0.0)) for r in rows]
    out = []
    for i, row in enumerate(rows):
        evaluation = (evals[0] if i == 0 else 0.0) + (evals[i + 1] if i + 1 < len(rows) else 0.0)
        delta = evaluation - evals[i]
        out.append({**row, "overhead": {**row["overhead"], "evaluation": evaluation},
                    "wall_seconds": row["wall_seconds"] + delta, "overhead_seconds": row["overhead_seconds"] + delta})
    return out


def instrument(fed: Any, ledger: Ledger) -> None:
    """Time an in-process federation's work by part: its chain connection, committee, store,
    aggregation and each node's training and evaluation."""
    ledger.wrap(fed.w3.manager, "_make_request", "chain")
    if hasattr(fed.w3.provider, "make_batch_request"):  # a transaction's gas, fees and nonce
        ledger.wrap(fed.w3.provider, "make_batch_request", "chain")
    ledger.wrap(fed, "finalize", "finality")
    for name in dir(fed.store):
        if not name.startswith("_") and callable(getattr(fed.store, name)):
            ledger.wrap(fed.store, name, "storage")
    if fed.aggregator is not None:
        ledger.wrap(fed.aggregator, "compute", "aggregation")
    for h in fed.hospitals:
        ledger.wrap(h.daemon, "_on_aggregate", "evaluation")
        ledger.wrap(h.daemon, "_train_and_pin", "training")
