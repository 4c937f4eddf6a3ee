"""What each page shows, built from the index's snapshots (plain data for the templates).

Nothing here reads the chain or the store: stored objects come from the checker's cache, audits
from the runner's, so building a page costs memory reads proportional to what the page shows.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from typing import Any

from eth_utils import to_checksum_address

from prismesh.chain.evm.contracts import SCORE_SCALE
from prismesh.dashboard.charts import bar_chart, line_chart
from prismesh.dashboard.index import ClientRound, RoundRecord, TaskRecord

TASKS_PER_PAGE = 25
ROUNDS_PER_PAGE = 12
HOSPITALS_PER_PAGE = 100


class NotFound(LookupError):
    """The page names something the chain does not hold (shown as 404)."""


class Unavailable(LookupError):
    """The page may exist once the index has read further (shown as 503)."""


def pages(total: int, per_page: int, page: int | None, *, default_last: bool = False) -> tuple[int, int]:
    """``(page, page count)``; ``page`` None means the first (or, with ``default_last``, the last)."""
    count = max(1, math.ceil(total / per_page))
    if page is None:
        page = count if default_last else 1
    if page < 1 or page > count:
        raise NotFound(f"page {page} does not exist (there are {count})")
    return page, count


def fairness(values: list[float]) -> dict[str, float]:
    """Macro-Acc (mean), Min-Acc and H-mean over clients (the paper's eq. 3-5)."""
    if not values:
        return {}
    h = 0.0 if min(values) <= 0 else len(values) / sum(1.0 / v for v in values)
    return {"Macro-Acc": sum(values) / len(values), "Min-Acc": min(values), "H-mean": h}


@dataclass
class Cell:
    """One hospital in one round, ready to print."""

    status: str
    reward: int = 0
    score: float | None = None  # the contribution score as a fraction of the contract's scale
    exclusion: str | None = None  # the reason the chain records
    derived_reason: str | None = None  # the reason the audit re-derived from the chain and the store
    accuracy: float | None = None
    cid: str | None = None
    num_samples: int | None = None
    object: Any = None


@dataclass
class HospitalRow:
    address: str
    label: str | None
    cells: list[Cell | None] = field(default_factory=list)
    total_reward: int = 0
    included: int = 0
    excluded: int = 0


def short_address(address: str) -> str:
    return f"{address[:6]}…{address[-4:]}"


SUBJECT = re.compile(r"round (\d+) (0x[0-9a-fA-F]{40})\b")


def audit_reasons(result: Any) -> dict[tuple[int, str], str]:
    """Why each update was left out, as the audit re-derived it: its findings about an update
    that was rejected or excluded, by (round, client)."""
    out: dict[tuple[int, str], str] = {}
    if result is None or result.state != "done":
        return out
    for f in result.checks:
        name = f.check.lower()
        if ("exclu" in name or "reject" in name) and f.detail:
            m = SUBJECT.search(f.subject)
            if m:
                out[(int(m.group(1)), to_checksum_address(m.group(2)))] = f.detail
    return out


class Views:
    """Builds page contexts from a :class:`prismesh.dashboard.service.Dashboard`."""

    def __init__(self, dash: Any) -> None:
        self.dash = dash

    # ------------------------------------------------------------------ helpers

    def label(self, address: str | None) -> str | None:
        return self.dash.labels.get(address) if address else None

    def header(self) -> dict[str, Any]:
        info = self.dash.index.finality_snapshot()
        return {
            "chain_id": self.dash.index.chain_id,
            "head": info.head,
            "final": info.final_height,
            "lag": info.lag_blocks,
            "finality": self.dash.index.finality,
            "error": self.dash.error,
            "indexing": None if self.dash.index.caught_up else self.dash.index.indexed_to,
            "key": self.dash.key,
            "token": self.dash.index.token_symbol,
            "decimals": self.dash.index.token_decimals,
            "now": int(time.time()),
        }

    def _strategy(self, task: TaskRecord) -> tuple[Any, Any]:
        return self.dash.checker.spec(task.params.get("hyper_params_cid"))

    # ------------------------------------------------------------------ tasks

    def tasks(self, page: int | None) -> dict[str, Any]:
        index = self.dash.index
        total = len(index.task_ids())
        page, count = pages(total, TASKS_PER_PAGE, page)
        records, _ = index.task_page((page - 1) * TASKS_PER_PAGE, TASKS_PER_PAGE)
        rows = []
        for t in records:
            spec, spec_status = self._strategy(t)
            current = t.current_round
            budget = t.reward_budget
            rows.append({
                "id": t.task_id,
                "status": t.status,
                "done": t.completed_rounds,
                "rounds": t.num_rounds,
                "round": current.number if current else None,
                "phase": current.phase if current else None,
                "strategy": spec.strategy if spec else None,
                "spec_status": spec_status,
                "participants": len(t.participants),
                "max_participants": t.params.get("max_participants"),
                "paid": t.rewards_paid,
                "budget": budget,
                "budget_used": (t.rewards_paid / budget) if budget else None,
                "last_block": t.last_block,
            })
        return {"rows": rows, "page": page, "pages": count, "total": total}

    def task(self, task_id: int, round_page: int | None) -> dict[str, Any]:
        index, checker = self.dash.index, self.dash.checker
        task = index.task(task_id)
        if task is None and not index.caught_up:
            raise Unavailable(f"still reading the chain (up to block {index.indexed_to} of "
                              f"{index.finality_snapshot().final_height}); task {task_id} may be further on")
        if task is None:
            raise NotFound(f"no task {task_id} on chain (final events up to block {index.finality_snapshot().final_height})")
        spec, spec_status = self._strategy(task)
        rounds = [task.rounds[n] for n in sorted(task.rounds)]
        page, count = pages(len(rounds), ROUNDS_PER_PAGE, round_page, default_last=True)
        shown = rounds[(page - 1) * ROUNDS_PER_PAGE : page * ROUNDS_PER_PAGE]
        participants = list(task.participants)
        for r in rounds:
            participants += [a for a in r.clients if a not in participants]

        timeline = [self._round_row(r) for r in shown]
        result = self.dash.audits.result(task_id)
        derived = audit_reasons(result)
        table = []
        for address in participants:
            row = HospitalRow(address, self.label(address))
            for r in rounds:
                c = r.clients.get(address)
                if c is not None:
                    row.total_reward += c.reward
                    row.included += c.included is True
                    row.excluded += c.included is False and c.cid is not None
            for r in shown:
                c = r.clients.get(address)
                row.cells.append(self._cell(c, derived.get((r.number, address))) if c is not None else None)
            table.append(row)

        per_client: dict[str, list[tuple[int, float]]] = {}
        summary: dict[str, list[tuple[int, float]]] = {"Macro-Acc": [], "Min-Acc": [], "H-mean": []}
        other_metrics = []
        gas_bars, upload_bars = [], []
        for r in rounds:
            accs = []
            for address, c in sorted(r.clients.items(), key=lambda kv: participants.index(kv[0]) if kv[0] in participants else 0):
                for metric, value in sorted(c.metrics.items()):
                    if metric == "accuracy":
                        per_client.setdefault(self.label(address) or short_address(address), []).append((r.number, value))
                        accs.append(value)
                    elif len(other_metrics) < 500:
                        other_metrics.append((r.number, address, metric, value))
            for k, v in fairness(accs).items():
                summary[k].append((r.number, v))
            gas, pending = index.gas_of(r)
            gas_bars.append((r.number, float(gas) if not pending else None))
            uploads = self._uploads(r)
            upload_bars.append((r.number, float(uploads[0]) if uploads[1] else None))
        series = [(label, pts) for label, pts in per_client.items()] + [(k, v) for k, v in summary.items() if v]
        charts = {
            "accuracy": line_chart(series, title="accuracy per hospital (reported on chain) and Macro / Min / H-mean",
                                   y_label="accuracy", y_range=(0.0, 1.0), dashed=tuple(summary)),
            "gas": bar_chart(gas_bars, title="gas of the round's transactions", y_label="gas"),
            "bytes": bar_chart(upload_bars, title="bytes uploaded (verified updates' DAG sizes)", y_label="bytes"),
        }
        objects = {
            "spec": spec_status,
            "initial": checker.status(task.params.get("initial_adapter_cid")),
            "final": checker.status(task.final_adapter),
        }
        return {
            "task": task,
            "spec": spec,
            "objects": objects,
            "timeline": timeline,
            "table": table,
            "shown_rounds": [r.number for r in shown],
            "page": page,
            "pages": count,
            "charts": charts,
            "other_metrics": other_metrics,
            "other_events": list(task.other_events)[-50:],
            "audit": result,
            "audit_current": result is not None and self.dash.audits.is_current(result),
            "params": sorted((k, v) for k, v in task.params.items()),
            "label": self.label,
        }

    def _uploads(self, r: RoundRecord) -> tuple[int, int, int]:
        """(bytes of verified updates, how many verified, how many revealed)."""
        total, known, revealed = 0, 0, 0
        for c in r.clients.values():
            if c.cid is None:
                continue
            revealed += 1
            status = self.dash.checker.status(c.cid)
            if status.ok and status.size is not None:
                total += status.size
                known += 1
        return total, known, revealed

    def _round_row(self, r: RoundRecord) -> dict[str, Any]:
        gas, pending = self.dash.index.gas_of(r)
        uploads, known, revealed = self._uploads(r)
        return {
            "number": r.number,
            "phase": r.phase,
            "phases": r.phases,
            "opened_block": r.opened_block,
            "opened_at": r.opened_at,
            "deadlines": sorted(r.deadlines.items(), key=lambda kv: kv[1]),
            "global": r.global_cid,
            "global_status": self.dash.checker.status(r.global_cid),
            "aggregate": r.aggregate_cid,
            "aggregate_status": self.dash.checker.status(r.aggregate_cid),
            "aggregate_block": r.aggregate_block,
            "aggregator": r.aggregator,
            "aggregator_reward": r.aggregator_reward,
            "failure": r.failure,
            "gas": gas,
            "gas_pending": pending,
            "txs": len(r.txs),
            "upload_bytes": uploads,
            "uploads_known": known,
            "uploads": revealed,
            "commits": sum(1 for c in r.clients.values() if c.committed_block is not None),
            "reveals": revealed,
        }

    def _cell(self, c: ClientRound, derived_reason: str | None = None) -> Cell:
        return Cell(
            derived_reason=derived_reason,
            status=c.status,
            reward=c.reward,
            score=c.score / SCORE_SCALE if c.score is not None else None,
            exclusion=c.exclusion,
            accuracy=c.metrics.get("accuracy"),
            cid=c.cid,
            num_samples=c.num_samples,
            object=self.dash.checker.status(c.cid) if c.cid else None,
        )

    # ------------------------------------------------------------------ other pages

    def audit(self, task_id: int) -> dict[str, Any]:
        if self.dash.index.task(task_id) is None:
            if not self.dash.index.caught_up:
                raise Unavailable(f"still reading the chain (up to block {self.dash.index.indexed_to})")
            raise NotFound(f"no task {task_id} on chain")
        result = self.dash.audits.result(task_id)
        return {
            "task_id": task_id,
            "audit": result,
            "audit_current": result is not None and self.dash.audits.is_current(result),
            "last_block": self.dash.index.task_last_block(task_id),
        }

    def finality(self) -> dict[str, Any]:
        info = self.dash.index.finality_snapshot()
        return {"info": info, "certificates": list(reversed(info.certificates)), "last": info.last_certificate,
                "label": self.label}

    def hospitals(self, page: int | None) -> dict[str, Any]:
        index = self.dash.index
        records = index.hospital_list()
        page, count = pages(len(records), HOSPITALS_PER_PAGE, page)
        shown = records[(page - 1) * HOSPITALS_PER_PAGE : page * HOSPITALS_PER_PAGE]
        rows = [{"h": h, "label": self.label(h.address), "last_time": index.block_time(h.last_block)} for h in shown]
        return {"rows": rows, "page": page, "pages": count, "total": len(records),
                "aggregators": sorted(index.aggregators)}
