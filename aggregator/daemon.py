"""The aggregator daemon: final reveals in, a verified aggregate's CID out.

It learns of rounds and reveals only from the finality-aware event stream. A round is ready
when the chain says it is Aggregating (every committer revealed, or the reveal deadline
passed) *and* every block up to that moment is final, so no reveal can still be missing.
Then every revealed adapter is fetched and verified in parallel Ray tasks, the task's strategy
merges the valid ones with the task's bounded weights (``aggregator.weights``), each included
update gets its contribution score (``aggregator.contribution``), the result is pinned and its
CID submitted with the included clients and their scores, which set their rewards.

Restart safety: reveals are persisted as they arrive, the aggregate's CID is recorded once it
is pinned, and the on-chain round is read before submitting, so a crash at any point neither
loses a round nor submits one twice. Aggregation is deterministic, so recomputing after a
crash gives the same bytes and the same CID.
"""

from __future__ import annotations

import hashlib
import json
import logging
import signal
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from prismesh.aggregator.history import (  # noqa: F401 - aggregation_base and config_only_adapter are re-exported
    aggregation_base,
    config_only_adapter,
    server_state_before,
)
from prismesh.chain import telemetry
from prismesh.chain.localstate import (
    StateFile,
    check_fields,
    read_config,
    resolve_account_spec,
    resolve_path,
)

log = logging.getLogger("prismesh.aggregator")

AGGREGATOR_EVENTS = ("RoundOpened", "UpdateRevealed", "PhaseChanged", "AggregateAccepted", "RoundFailed")


@dataclass
class AggregatorConfig:
    """What the aggregator host needs; read from a TOML or JSON file."""

    manifest: Path
    keystore: str
    state_dir: Path
    store: str = "embedded"
    rpc_url: str | None = None
    ray_address: str | None = None
    ray_num_cpus: int | None = None
    parallel: bool = True
    finality: bool = True
    poll_interval: float = 1.0
    fetch_timeout_s: float = 600.0
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"

    @classmethod
    def load(cls, path: Path) -> AggregatorConfig:
        return cls.from_dict(read_config(path), base=path.parent, where=str(path))

    @classmethod
    def from_dict(cls, data: dict[str, Any], base: Path = Path("."), where: str = "aggregator config") -> AggregatorConfig:
        check_fields(data, set(cls.__dataclass_fields__), ("manifest", "keystore", "state_dir"), where)
        values = dict(data)
        for key in ("manifest", "state_dir"):
            values[key] = resolve_path(values[key], base)
        values["keystore"] = resolve_account_spec(str(values["keystore"]), base)
        return cls(**values)


def sha256_file(path: Path) -> bytes:
    return hashlib.sha256(path.read_bytes()).digest()


class AggregatorDaemon:
    """Aggregates every round of every running task once its reveals are final."""

    def __init__(self, config: AggregatorConfig, *, w3: Any, manifest: Any, account: Any, store: Any, store_spec: str, stream: Any) -> None:
        from prismesh.chain.evm.contracts import Coordinator, Registry

        self.config = config
        self.w3 = w3
        self.manifest = manifest
        self.account = account
        self.store = store
        self.store_spec = store_spec
        self.stream = stream
        self.coordinator = Coordinator(manifest, w3, account)
        self.registry = Registry(manifest, w3, account)
        self.state = StateFile(config.state_dir / "aggregator-state.json")
        self._stop = threading.Event()
        self.reports_dir = config.state_dir / "rounds"
        telemetry.actor(account.address, "aggregator", "aggregator")

    # ------------------------------------------------------------------ loop

    def step(self) -> int:
        actions = 0
        for ev in self.stream.poll():
            self._record(ev)
            self.stream.ack(ev)
        for _key, rec in sorted(self.state.section("rounds").items()):
            if rec.get("status") == "open" and self._ready(rec):
                self.aggregate_round(rec)
                actions += 1
        telemetry.observe_finality("aggregator", "aggregator", self.stream, self.w3)
        return actions

    def run(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                signal.signal(sig, lambda *_: self._stop.set())
            except ValueError:
                pass
        if not self.registry.is_aggregator(self.account.address):
            log.warning("%s does not hold the aggregator role yet; its submissions will revert", self.account.address)
        from prismesh.chain.localstate import RetryDelay

        log.info("aggregator %s following final events", self.account.address)
        retry = RetryDelay(self.config.poll_interval)
        while not self._stop.is_set():
            try:
                acted = self.step()
            except Exception as exc:  # noqa: BLE001 - the failed step is retried from the durable cursor
                telemetry.retry("aggregator", "aggregator", exc)
                delay = retry.next()
                log.exception("aggregator step failed; retrying in %.0f s from the last handled event", delay)
                self.stream.rewind()
                self._stop.wait(delay)
                continue
            retry.reset()
            if acted == 0:
                self._stop.wait(self.config.poll_interval)
        log.info("aggregator stopped cleanly")

    def stop(self) -> None:
        self._stop.set()

    # ------------------------------------------------------------------ events

    def _record(self, ev: Any) -> None:
        from prismesh.chain.evm.contracts import Phase

        rounds = self.state.section("rounds")
        name = ev.event
        if name == "RoundOpened":
            key = f"{ev.task_id}:{ev.round}"
            if key not in rounds:
                rounds[key] = {
                    "task": ev.task_id,
                    "round": ev.round,
                    "global_cid": ev.global_adapter_cid,
                    "reveal_deadline": ev.reveal_deadline,
                    "status": "open",
                    "reveals": {},
                }
                self.state.save()
        elif name == "UpdateRevealed":
            rec = rounds.get(f"{ev.task_id}:{ev.round}")
            if rec is not None:
                rec["reveals"][ev.client] = {
                    "cid": ev.cid,
                    "sha256": bytes(ev.sha256).hex(),
                    "num_samples": int(ev.num_samples),
                }
                self.state.save()
        elif name == "PhaseChanged":
            rec = rounds.get(f"{ev.task_id}:{ev.round}")
            if rec is not None and int(ev.current) == int(Phase.AGGREGATING):
                rec["aggregating_final"] = True
                self.state.save()
        elif name in ("AggregateAccepted", "RoundFailed"):
            rec = rounds.get(f"{ev.task_id}:{ev.round}")
            if rec is not None and rec.get("status") != "done":
                rec["status"] = "done"
                self.state.save()

    def _ready(self, rec: dict) -> bool:
        """Aggregating on chain, and every block up to now final (no reveal can be missing)."""
        from prismesh.chain.evm.contracts import Phase

        if rec.get("aggregating_final"):
            return True
        phase = self.coordinator.phase_of(rec["task"], rec["round"])
        if phase in (Phase.FINALIZED, Phase.FAILED):
            rec["status"] = "done"
            self.state.save()
            return False
        if phase != Phase.AGGREGATING:
            return False
        head = int(self.w3.eth.block_number)
        if self.stream.final_height() >= head:
            return True
        return False

    # ------------------------------------------------------------------ aggregation

    def aggregate_round(self, rec: dict) -> str | None:
        """Verify, merge, pin and submit one round; returns the aggregate CID (None if failed)."""
        from prismesh.chain.evm.contracts import ContractRevert, Phase
        from prismesh.chain.storage import add_adapter

        task, rnd = rec["task"], rec["round"]
        onchain = self.coordinator.get_round(task, rnd)
        if self.coordinator.phase_of(task, rnd) != Phase.AGGREGATING:
            log.info("task %d round %d is %s on chain; nothing to do", task, rnd, onchain.phase.name)
            rec["status"] = "done"
            self.state.save()
            return None
        params = self.coordinator.get_task_params(task)
        if not rec.get("aggregate_cid") or not self.store.has(rec["aggregate_cid"]):
            started = time.perf_counter()
            outcome = self.compute(task, rnd, params, rec)
            if outcome is None:
                telemetry.aggregation("aggregator", time.perf_counter() - started, "failed")
                return None
            out_dir, scores, rejected, metrics = outcome
            telemetry.aggregation("aggregator", time.perf_counter() - started, "aggregated")
            telemetry.exclusions(rejected.values())
            cid = add_adapter(self.store, out_dir)
            rec.update(
                aggregate_cid=cid,
                aggregate_sha256=sha256_file(out_dir / "adapter_model.safetensors").hex(),
                included=sorted(scores),
                scores=scores,
                rejected=rejected,
                metrics=metrics,
            )
            self.state.save()
            self._write_report(rec)
            log.info("task %d round %d: aggregate %s pinned (%d included, %d rejected)", task, rnd, cid, len(scores), len(rejected))
        try:
            self.coordinator.submit_aggregate(
                task, rnd, rec["aggregate_cid"], bytes.fromhex(rec["aggregate_sha256"]), rec["scores"]
            )
        except ContractRevert:
            if self.coordinator.phase_of(task, rnd) == Phase.FINALIZED:
                log.info("task %d round %d was already finalized", task, rnd)
            else:
                raise
        rec["status"] = "submitted"
        self.state.save()
        log.info("task %d round %d: aggregate %s submitted", task, rnd, rec["aggregate_cid"])
        self._claim_fees_if_done(task)
        return rec["aggregate_cid"]

    def _claim_fees_if_done(self, task: int) -> None:
        """Mint the fees this aggregator earned once a task it aggregated is complete."""
        from prismesh.chain.evm.contracts import TaskStatus

        if self.coordinator.get_task(task).status != TaskStatus.COMPLETED:
            return
        owed = self.coordinator.fees_owed(self.account.address)
        if owed:
            self.coordinator.claim_fees()
            log.info("task %d complete: claimed %d units of aggregator fees", task, owed)

    def compute(self, task: int, rnd: int, params: Any, rec: dict) -> tuple[Path, dict[str, int], dict[str, str], dict] | None:
        """Fetch and verify every reveal in parallel, merge the valid ones, score each."""
        log.info("aggregating task %d round %d: fetching and verifying %d updates", task, rnd, len(rec["reveals"]))
        from prismesh.aggregator.adapters import load_adapter, save_adapter
        from prismesh.aggregator.contribution import published_before, score_updates
        from prismesh.aggregator.parallel import Rejected, StoreFetch, UpdateRef, fetch_and_verify
        from prismesh.aggregator.strategies import aggregate, get_strategy
        from prismesh.aggregator.verify import expected_lora_shapes
        from prismesh.aggregator.weights import WeightRule
        from prismesh.chain.storage import fetch_adapter
        from prismesh.chain.taskspec import TaskSpec

        spec = TaskSpec.from_bytes(self.store.cat(params.hyper_params_cid), where=f"hyper-parameter file {params.hyper_params_cid}")
        lora_cfg = spec.lora.to_dict()
        expected = expected_lora_shapes(spec.model_config, lora_cfg)
        refs = [
            UpdateRef(client, r["cid"], r["num_samples"], sha256=r["sha256"])
            for client, r in sorted(rec["reveals"].items())
        ]
        work = self.config.state_dir / "work" / f"task{task}-round{rnd}"
        results = fetch_and_verify(
            refs,
            StoreFetch(self.store_spec),
            expected,
            lora_cfg,
            spec.norm_bound,
            work,
            parallel=self.config.parallel,
            timeout_s=self.config.fetch_timeout_s,
        )
        verified, rejected = [], {}
        for res in results:
            if isinstance(res, Rejected):
                rejected[res.client] = res.reason
            else:
                verified.append(res)
        for client, reason in rejected.items():
            log.warning("task %d round %d: excluding %s: %s", task, rnd, client, reason)
        if len(verified) < params.min_participants:
            reason = (
                f"{len(verified)} valid update(s), fewer than the minimum {params.min_participants}"
                + (f"; rejected: {json.dumps(rejected, sort_keys=True)}" if rejected else "")
            )
            self._fail(task, rnd, reason[:1000], rec, rejected)
            return None
        global_adapter = aggregation_base(
            spec, load_adapter(fetch_adapter(self.store, rec["global_cid"], work / "global")) if rec.get("global_cid") else None
        )
        rule = WeightRule.of_task(params)
        updates = [replace(v.to_update(), num_samples=rule.weight(v.num_samples)) for v in verified]
        strategy = get_strategy(spec.strategy, **spec.strategy_options)
        # A server optimiser's state is rebuilt from the chain and the store, never kept here.
        state = server_state_before(self.coordinator, self.manifest.deploy_block, self.store, spec, strategy,
                                    task, rnd, work / "history")
        result = aggregate(strategy, updates, global_adapter, state)
        out = save_adapter(result.adapter, self.config.state_dir / "aggregates" / f"task{task}-round{rnd}")
        known = published_before(self.coordinator, self.store, task, rnd, self.config.state_dir / "work" / "published")
        scores = score_updates(updates, global_adapter, known)
        return out, scores, rejected, _jsonable(result.metrics)

    def _fail(self, task: int, rnd: int, reason: str, rec: dict, rejected: dict[str, str]) -> None:
        from prismesh.chain.evm.contracts import ContractRevert

        log.error("task %d round %d fails: %s", task, rnd, reason)
        try:
            self.coordinator.fail_round(task, rnd, reason, rec.get("global_cid", ""))
        except ContractRevert as exc:
            log.error("task %d round %d: failRound refused: %s", task, rnd, exc)
        telemetry.exclusions(rejected.values())
        rec.update(status="failed", rejected=rejected, failure=reason)
        self.state.save()
        self._write_report(rec)

    def _write_report(self, rec: dict) -> None:
        self.reports_dir.mkdir(parents=True, exist_ok=True)
        path = self.reports_dir / f"task{rec['task']}-round{rec['round']}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(rec, indent=1, sort_keys=True))
        tmp.replace(path)


def _jsonable(value: Any) -> Any:
    import numpy as np

    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value
