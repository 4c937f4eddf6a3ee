"""The aggregator daemon: final reveals in, a verified aggregate's CID out.

It learns of rounds and reveals only from the finality-aware event stream. A round is ready
when the chain says it is Aggregating (every committer revealed, or the reveal deadline
passed) *and* every block up to that moment is final, so no reveal can still be missing.
Then every revealed adapter is fetched and verified in parallel Ray tasks (as an update of the
round's global adapter), the task's strategy merges the valid ones with the task's bounded
weights (``aggregator.weights``; a robust strategy may exclude or clip some, with reasons), each
kept update gets its contribution score (``aggregator.contribution``), the result is pinned and
its CID submitted with the kept clients and their scores, which set their rewards. Rejections,
exclusions and clip factors are recorded in the round's state and report.

Restart safety: reveals are persisted as they arrive, the aggregate's CID is recorded once it
is pinned, and the on-chain round is read before submitting, so a crash at any point neither
loses a round nor submits one twice. Aggregation is deterministic, so recomputing after a
crash gives the same bytes and the same CID.

Faults are waited out or repaired: an unreachable chain, store or Ray at start-up is retried
with back-off (one log line per attempt); a damaged state file is set aside and rebuilt by
replaying the final events; a submission the devnet lost in a crash (its block never became
final) is sent again; the aggregate this daemon computed and the task spec are re-added to the
store when it lost or damaged them; a chain that no longer holds the history the daemon acted
on is resynchronised from the last block it can verify.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import signal
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from prismesh.aggregator.contribution import PublishedAdapters
from prismesh.aggregator.history import (  # noqa: F401 - aggregation_base and config_only_adapter are re-exported
    ReplayMemo,
    aggregation_base,
    config_only_adapter,
    server_state_before,
)
from prismesh.chain import telemetry
from prismesh.chain.localstate import (
    RetryDelay,
    StateFile,
    check_fields,
    check_types,
    debug_enabled,
    describe_error,
    read_config,
    resolve_account_spec,
    resolve_path,
)
from prismesh.chain.startup import held_spec_bytes

log = logging.getLogger("prismesh.aggregator")

HEAL_RECENT_AGGREGATES = 8
# How many past aggregates the daemon keeps in the store (audits re-compute them).
HEAL_HISTORY = 200

# Server-optimiser states kept in memory at once, one per task.
MAX_REPLAY_MEMOS = 4
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
    # Seconds between checks that the aggregates rounds start from are whole in the store.
    heal_interval: float = 10.0
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    encryption_key: str | None = None  # X25519 key file; default: beside the keystore

    @classmethod
    def load(cls, path: Path) -> AggregatorConfig:
        return cls.from_dict(read_config(path), base=path.parent, where=str(path))

    @classmethod
    def from_dict(cls, data: dict[str, Any], base: Path = Path("."), where: str = "aggregator config") -> AggregatorConfig:
        check_fields(data, set(cls.__dataclass_fields__), ("manifest", "keystore", "state_dir"), where)
        check_types(data, cls, where, positive=("poll_interval", "fetch_timeout_s", "ray_num_cpus"))
        values = dict(data)
        for key in ("manifest", "state_dir"):
            values[key] = resolve_path(values[key], base)
        values["keystore"] = resolve_account_spec(str(values["keystore"]), base, where)
        if values.get("encryption_key"):
            values["encryption_key"] = str(resolve_path(values["encryption_key"], base))
        return cls(**values)


def sha256_file(path: Path) -> bytes:
    return hashlib.sha256(path.read_bytes()).digest()


class AggregatorDaemon:
    """Aggregates every round of every running task once its reveals are final."""

    def __init__(self, config: AggregatorConfig, *, w3: Any, manifest: Any, account: Any, store: Any, store_spec: str,
                 stream: Any, stop: threading.Event | None = None) -> None:
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
        self._stop = stop or threading.Event()
        self.reports_dir = config.state_dir / "rounds"
        self._healed_at = 0.0
        self._behind_logged = False
        telemetry.actor(account.address, "aggregator", "aggregator")
        self._box_key: Any = None
        self._params: dict[int, Any] = {}
        self._specs: dict[int, Any] = {}
        self._published = PublishedAdapters()
        self._replayed: OrderedDict[int, ReplayMemo] = OrderedDict()
        self._owns_ray = False
        if config.parallel:
            # Ray starts now, on a thread, while the first round's clients train.
            from prismesh.aggregator.parallel import start_ray_in_background

            local_cpus = None if config.ray_address else config.ray_num_cpus
            self._owns_ray = start_ray_in_background(config.ray_address, local_cpus)
        self.recover()

    # ------------------------------------------------------------------ recovery

    def recover(self) -> None:
        """After a damaged state or cursor file: say so, and replay every final event from the
        deployment block (rounds already over are recorded, not aggregated again)."""
        damaged = [d for d in (self.state.damaged, getattr(self.stream.raw, "damaged", None)) if d]
        for aside, why in damaged:
            log.warning("%s was damaged (%s); kept as %s; rebuilding from the chain and the store",
                        aside.name.split(".damaged-")[0], why, aside)
        if self.state.damaged is not None:
            self.stream.resync(self.manifest.deploy_block - 1)

    def resync(self, safe_height: int) -> None:
        """Forget what was learned from blocks after ``safe_height`` and follow the chain again."""
        rounds = self.state.section("rounds")
        dropped = sorted(k for k, r in rounds.items() if r.get("opened_block", safe_height + 1) > safe_height)
        orphaned = self.state.section("orphaned")
        for key in dropped:
            orphaned[f"{key}@{int(time.time())}"] = rounds.pop(key)
        for rec in rounds.values():
            rec["reveals"] = {c: r for c, r in rec.get("reveals", {}).items()
                              if r.get("block", safe_height + 1) <= safe_height}
            rec.pop("aggregating_final", None)
            if rec.get("status") != "done":
                rec["status"] = "open"
        self.state.save()
        self._params.clear()
        self._specs.clear()
        self.stream.resync(safe_height)
        log.error("resynchronised from block %d; %d round record(s) of the lost history set aside: %s",
                  safe_height, len(dropped), ", ".join(dropped) or "none")

    # ------------------------------------------------------------------ encryption key

    def box_key(self) -> Any:
        """This aggregator's X25519 key (loaded once; see ``prismesh.chain.sealing``)."""
        if self._box_key is None:
            from prismesh.chain.sealing import load_daemon_box_key

            self._box_key = load_daemon_box_key(self.config.keystore, self.account, self.config.encryption_key)
        return self._box_key

    def publish_encryption_key(self) -> bool:
        """Put this aggregator's public key on chain when it is not there yet; False when no
        key is available (it then cannot open sealed updates)."""
        from prismesh.chain.sealing import fingerprint, public_key_bytes

        try:
            public = public_key_bytes(self.box_key())
        except ValueError as exc:
            log.warning("no encryption key (%s); sealed updates cannot be opened", exc)
            return False
        if self.registry.encryption_key_of(self.account.address) != public:
            self.registry.set_encryption_key(public)
            log.info("published encryption key %s on chain", fingerprint(public))
        return True

    # ------------------------------------------------------------------ loop

    def step(self) -> int:
        actions = 0
        # A batch's records are saved once, then the cursor moves past the batch once:
        # recording is idempotent, so a crash in between only delivers the batch again.
        events = self.stream.poll()
        changed = [self._record(ev) for ev in events]
        if any(changed):
            self.state.save()
        for ev, new in zip(events, changed, strict=True):
            if new and ev.event == "RoundOpened":
                self._keep_spec(ev.task_id)
            self.stream.ack(ev, durable=False)
        self.stream.flush()
        for _key, rec in sorted(self.state.section("rounds").items()):
            if rec.get("status") in ("submitted", "failed"):
                self._check_landed(rec)
            if rec.get("status") == "open" and self._ready(rec):
                self.aggregate_round(rec)
                actions += 1
        self._heal_store()
        telemetry.observe_finality("aggregator", "aggregator", self.stream, self.w3)
        return actions

    def _check_landed(self, rec: dict) -> None:
        """A submission (or failRound) whose round is still Aggregating on chain was lost with
        a block the devnet never made durable (it crashed before the block was final): do it
        again. Until the outcome arrives as a final event the record is not done."""
        from prismesh.chain.evm.contracts import Phase

        phase = self.coordinator.phase_of(rec["task"], rec["round"])
        if phase == Phase.AGGREGATING:
            log.warning("task %d round %d: the chain lost this aggregator's %s (a devnet restart); doing it again",
                        rec["task"], rec["round"], "aggregate" if rec["status"] == "submitted" else "failRound")
            rec["status"] = "open"
            self.state.save()

    def run(self) -> None:
        """Run until SIGTERM/SIGINT. A failed step logs one line and is retried from the durable
        cursor with back-off; a chain that lost the history this daemon acted on is
        resynchronised from the last block it can still verify."""
        from prismesh.chain.finality.events import ChainDiverged

        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                signal.signal(sig, lambda *_: self._stop.set())
            except ValueError:
                pass
        try:
            if not self.registry.is_aggregator(self.account.address):
                log.warning("%s does not hold the aggregator role yet; its submissions will revert", self.account.address)
            self.publish_encryption_key()
        except Exception as exc:  # noqa: BLE001 - the loop below waits for the chain
            log.warning("could not check the aggregator role or publish the encryption key: %s", describe_error(exc))
        log.info("aggregator %s following final events", self.account.address)
        retry = RetryDelay(self.config.poll_interval)
        while not self._stop.is_set():
            try:
                acted = self.step()
            except ChainDiverged as exc:
                log.error("THE CHAIN DOES NOT HOLD THE HISTORY THIS AGGREGATOR ACTED ON: %s", exc)
                self.resync(exc.safe_height)
                continue
            except Exception as exc:  # noqa: BLE001 - the failed step is retried from the durable cursor
                telemetry.retry("aggregator", "aggregator", exc)
                delay = retry.next()
                log.warning("aggregator step failed (attempt %d): %s; retrying in %.1f s from the last handled event",
                            retry.attempts, describe_error(exc), delay, exc_info=debug_enabled())
                try:
                    self.stream.rewind()
                except Exception:  # noqa: BLE001 - the cursor file is re-read at the next try
                    pass
                self._stop.wait(delay)
                continue
            if retry.attempts:
                log.info("aggregator resumed after %d failed attempt(s)", retry.attempts)
            retry.reset()
            self._log_behind()
            if acted == 0:
                self._stop.wait(self.config.poll_interval)
        self.close()
        log.info("aggregator stopped cleanly")

    def _log_behind(self) -> None:
        behind = bool(getattr(self.stream, "behind", False))
        if behind and not self._behind_logged:
            log.warning("the chain's final height is below blocks this aggregator already handled (the "
                        "devnet restarted from its durable state); waiting for them to be certified again")
        elif self._behind_logged and not behind:
            log.info("the chain's final height caught up again")
        self._behind_logged = behind

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        """Stop the local Ray this daemon started (its processes go with it)."""
        if self._owns_ray:
            from prismesh.aggregator.parallel import stop_ray

            stop_ray()
            self._owns_ray = False

    # ------------------------------------------------------------------ events

    def _record(self, ev: Any) -> bool:
        """Note ``ev`` in the rounds' records (unsaved); whether anything changed."""
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
                    "opened_block": ev.block_number,
                }
                return True
        elif name == "UpdateRevealed":
            rec = rounds.get(f"{ev.task_id}:{ev.round}")
            if rec is not None:
                rec["reveals"][ev.client] = {
                    "cid": ev.cid,
                    "sha256": bytes(ev.sha256).hex(),
                    "num_samples": int(ev.num_samples),
                    "block": ev.block_number,
                }
                return True
        elif name == "PhaseChanged":
            rec = rounds.get(f"{ev.task_id}:{ev.round}")
            if rec is not None and int(ev.current) == int(Phase.AGGREGATING):
                rec["aggregating_final"] = True
                return True
        elif name in ("AggregateAccepted", "RoundFailed"):
            rec = rounds.get(f"{ev.task_id}:{ev.round}")
            if rec is not None and rec.get("status") != "done":
                rec["status"] = "done"
                return True
        return False

    def _ready(self, rec: dict) -> bool:
        """Aggregating on chain, and every reveal of the round delivered to this daemon.

        The final PhaseChanged to Aggregating comes after every reveal in the stream, so once it
        was delivered nothing can be missing. A phase moved by a deadline emits no event: then
        the phase is read first and the head second, and every block up to that head must have
        been *delivered* (the stream's scanned height, not a fresh final height, which can be
        newer than the events this daemon has seen)."""
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
        return self.stream.scanned_height >= head

    # ------------------------------------------------------------------ aggregation

    def aggregate_round(self, rec: dict) -> str | None:
        """Verify, merge, pin and submit one round; returns the aggregate CID (None if failed)."""
        from prismesh.chain.evm.contracts import ContractRevert, Phase

        task, rnd = rec["task"], rec["round"]
        phase = self.coordinator.phase_of(task, rnd)
        if phase != Phase.AGGREGATING:
            log.info("task %d round %d is %s on chain; nothing to do", task, rnd, phase.name)
            rec["status"] = "done"
            self.state.save()
            return None
        params = self.task_params(task)
        if rec.get("aggregate_cid") and not self._restore_aggregate(rec):
            rec.pop("aggregate_cid")
        if not rec.get("aggregate_cid"):
            started = time.perf_counter()
            outcome = self.compute(task, rnd, params, rec)
            if outcome is None:
                telemetry.aggregation("aggregator", time.perf_counter() - started, "failed")
                return None
            out_dir, scores, rejected, metrics = outcome
            telemetry.aggregation("aggregator", time.perf_counter() - started, "aggregated")
            telemetry.exclusions(rejected.values())
            cid = self._pin_aggregate(task, rnd, out_dir)
            rec.update(
                aggregate_cid=cid,
                aggregate_sha256=sha256_file(out_dir / "adapter_model.safetensors").hex(),
                aggregate_dir=str(out_dir),
                included=sorted(scores),
                scores=scores,
                rejected=rejected,
                excluded=metrics.get("excluded", {}),
                clipped=metrics.get("clip_factors", {}),
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

    def _pin_aggregate(self, task: int, rnd: int, out_dir: Path) -> str:
        """Pin the aggregate in the clear, or sealed to every participant and recipient when the
        task's spec says ``privacy.aggregate = "members"``."""
        from prismesh.chain.sealing import (
            Recipient,
            SealContext,
            add_sealed,
            seal_dir,
            task_recipients,
        )
        from prismesh.chain.storage import add_adapter

        privacy = self._spec(task).privacy_spec
        if privacy.aggregate != "members":
            return add_adapter(self.store, out_dir)
        recipients = task_recipients(self.registry, privacy.recipients)
        named = {r.address.lower() for r in recipients}
        for client in self.coordinator.get_participants(task):
            key = self.registry.encryption_key_of(client)
            if client.lower() in named:
                continue
            if key == b"\x00" * 32:
                log.warning("task %d round %d: participant %s has no encryption key; it cannot open the aggregate",
                            task, rnd, client)
                continue
            recipients.append(Recipient(client, key))
        ctx = SealContext(self.manifest.chain_id, self.coordinator.address, task, rnd, self.account.address, "aggregate")
        return add_sealed(self.store, seal_dir(out_dir, recipients, ctx))

    def task_params(self, task: int) -> Any:
        """A task's on-chain parameters, read once: the contract writes them only when the task
        is created (a resync forgets them with the history)."""
        params = self._params.get(task)
        if params is None:
            params = self._params[task] = self.coordinator.get_task_params(task)
        return params

    def _spec(self, task: int) -> Any:
        from prismesh.chain.taskspec import TaskSpec

        spec = self._specs.get(task)
        if spec is None:
            cid = self.task_params(task).hyper_params_cid
            spec = self._specs[task] = TaskSpec.from_bytes(self.store.cat(cid), where=f"hyper-parameter file {cid}")
        return spec

    def _replay_memo(self, task: int) -> ReplayMemo:
        """The task's replay memo; those of the least recently aggregated tasks beyond
        ``MAX_REPLAY_MEMOS`` are dropped (a dropped task replays from round 1 again)."""
        memo = self._replayed.pop(task, None) or ReplayMemo()
        self._replayed[task] = memo
        while len(self._replayed) > MAX_REPLAY_MEMOS:
            self._replayed.popitem(last=False)
        return memo

    def _claim_fees_if_done(self, task: int) -> None:
        """Mint the fees this aggregator earned once a task it aggregated is complete (a claim a
        devnet crash loses is made again with the next task's: the fees stay owed until then)."""
        from prismesh.chain.evm.contracts import TaskStatus

        if self.coordinator.get_task(task).status != TaskStatus.COMPLETED:
            return
        owed = self.coordinator.fees_owed(self.account.address)
        if owed:
            self.coordinator.claim_fees()
            log.info("task %d complete: claimed %d units of aggregator fees", task, owed)

    def compute(self, task: int, rnd: int, params: Any, rec: dict) -> tuple[Path, dict[str, int], dict[str, str], dict] | None:
        """Fetch and verify every reveal in parallel as an update of the round's global adapter,
        merge the valid ones and score those the strategy keeps. Verification failures are
        ``rejected``; updates the strategy excludes (``metrics["excluded"]``, with reasons) get
        no score, so neither is included nor paid."""
        log.info("aggregating task %d round %d: fetching and verifying %d updates", task, rnd, len(rec["reveals"]))
        from prismesh.aggregator.adapters import load_adapter, save_adapter
        from prismesh.aggregator.contribution import published_before, score_updates
        from prismesh.aggregator.parallel import (
            Rejected,
            SealedStoreFetch,
            StoreFetch,
            UpdateRef,
            fetch_and_verify,
        )
        from prismesh.aggregator.strategies import aggregate, get_strategy
        from prismesh.aggregator.verify import expected_lora_shapes
        from prismesh.aggregator.weights import WeightRule
        from prismesh.chain.privacy import BudgetExceeded, check_budget, client_epsilon
        from prismesh.chain.sealing import fetch_any_adapter
        from prismesh.chain.taskspec import TaskSpec

        raw = held_spec_bytes(self.store, params.hyper_params_cid, self.config.state_dir / "specs", log, "aggregator")
        spec = TaskSpec.from_bytes(raw, where=f"hyper-parameter file {params.hyper_params_cid}")
        privacy = spec.privacy_spec
        key = self.box_key() if (privacy.sealed or privacy.central_dp) else None
        if privacy.central_dp:
            # The aggregate this round would release, counted before anything is computed.
            spent = client_epsilon(privacy, self.coordinator.get_task(task).completed_rounds + 1)
            try:
                warning = check_budget(privacy, spent, f"task {task} round {rnd}")
            except BudgetExceeded as exc:
                self._fail(task, rnd, f"privacy budget: {exc}"[:1000], rec, {})
                return None
            if warning:
                log.warning("%s; releasing anyway (on_budget = warn)", warning)
        lora_cfg = spec.lora.to_dict()
        expected = expected_lora_shapes(spec.model_config, lora_cfg)
        refs = [
            UpdateRef(client, r["cid"], r["num_samples"], sha256=r["sha256"])
            for client, r in sorted(rec["reveals"].items())
        ]
        work = self.config.state_dir / "work" / f"task{task}-round{rnd}"
        # Whatever an interrupted attempt left behind is fetched afresh.
        shutil.rmtree(work, ignore_errors=True)
        if rec.get("global_cid"):
            self._restore_held_aggregate(rec["global_cid"])
        global_raw = (load_adapter(fetch_any_adapter(self.store, rec["global_cid"], work / "global", key))
                      if rec.get("global_cid") else None)
        fetch: Any = StoreFetch(self.store_spec)
        if privacy.sealed:
            from prismesh.chain.sealing import private_key_raw

            fetch = SealedStoreFetch(self.store_spec, private_key_raw(key), self.manifest.chain_id,
                                     self.coordinator.address, task, rnd)
        results = fetch_and_verify(
            refs,
            fetch,
            expected,
            lora_cfg,
            spec.norm_bound,
            work,
            parallel=self.config.parallel,
            timeout_s=self.config.fetch_timeout_s,
            global_adapter=global_raw,
        )
        verified, rejected = [], {}
        for res in results:
            if isinstance(res, Rejected):
                rejected[res.client] = res.reason
            else:
                verified.append(res)
        for client, reason in rejected.items():
            log.warning("task %d round %d: excluding %s: %s", task, rnd, client, reason)
        # What this round fetched and checked is known to the next one without a fetch.
        for v in verified:
            self._published.add(v.cid, v.adapter)
        if global_raw is not None:
            self._published.add(rec["global_cid"], global_raw)
        if len(verified) < params.min_participants:
            reason = (
                f"{len(verified)} valid update(s), fewer than the minimum {params.min_participants}"
                + (f"; rejected: {json.dumps(rejected, sort_keys=True)}" if rejected else "")
            )
            self._fail(task, rnd, reason[:1000], rec, rejected)
            return None
        rule = WeightRule.of_task(params)
        updates = [replace(v.to_update(), num_samples=rule.weight(v.num_samples)) for v in verified]
        strategy = get_strategy(spec.strategy, **spec.strategy_options)
        global_adapter = aggregation_base(spec, global_raw)
        # A server optimiser's state is rebuilt from the chain and the store, never stored here;
        # in memory, the last rebuild lets the next round replay only what was accepted since.
        state = server_state_before(self.coordinator, self.manifest.deploy_block, self.store, spec, strategy,
                                    task, rnd, work / "history", memo=self._replay_memo(task))
        result = aggregate(strategy, updates, global_adapter, state)
        excluded = dict(result.metrics.get("excluded", {}))
        for client, reason in sorted(excluded.items()):
            log.warning("task %d round %d: strategy %s excludes %s: %s", task, rnd, spec.strategy, client, reason)
        kept = [u for u in updates if u.client not in excluded]
        if len(kept) < params.min_participants:
            reason = (
                f"{len(kept)} update(s) kept by {spec.strategy}, fewer than the minimum "
                f"{params.min_participants}; excluded: {json.dumps(excluded, sort_keys=True)}"
            )
            self._fail(task, rnd, reason[:1000], rec, {**rejected, **excluded})
            return None
        target = self.config.state_dir / "aggregates" / f"task{task}-round{rnd}"
        if privacy.central_dp:
            # The strategy's checks decide who is kept; the release is the DP mechanism over them.
            out, dp_metrics = self._dp_aggregate(task, rnd, spec, kept, global_adapter, target, key)
            metrics = {"excluded": excluded, **dp_metrics}
        else:
            out, metrics = save_adapter(result.adapter, target), dict(result.metrics)
        known = published_before(self.coordinator, self.store, task, rnd, self.config.state_dir / "work" / "published",
                                 private_key=key, cids=self._published_cids(task, rnd), cache=self._published)
        scores = score_updates(kept, global_adapter, known)
        if privacy.sealed or privacy.client_dp is not None or spec.train.get("dp_noise_multiplier"):
            from prismesh.chain.privacy import privacy_report

            done = self.coordinator.get_task(task).completed_rounds + 1
            samples = {v.client: int(v.num_samples) for v in verified}
            metrics["privacy"] = privacy_report(privacy, spec.train, done, samples)
        return out, scores, rejected, _jsonable(metrics)

    def _dp_aggregate(self, task: int, rnd: int, spec: Any, updates: list, global_adapter: Any, target: Path,
                      key: Any) -> tuple[Path, dict]:
        """Client-level DP at the aggregator: the mean of the clipped updates plus Gaussian noise
        from a seed only this aggregator (and, sealed beside the aggregate, the task's
        recipients) can know; see ``prismesh.aggregator.dp`` and docs/privacy.md."""
        from prismesh.aggregator.adapters import save_adapter
        from prismesh.aggregator.dp import dp_aggregate
        from prismesh.chain.sealing import derive_secret

        privacy = spec.privacy_spec
        cdp = privacy.client_dp
        ordered = sorted(updates, key=lambda u: u.client)
        seed = derive_secret(key, "dp-noise-seed", self.manifest.chain_id, self.coordinator.address, task, rnd)
        denominator = max(int(self.coordinator.get_task(task).participant_count), len(ordered))
        adapter, metrics = dp_aggregate([u.adapter for u in ordered], global_adapter, dict(global_adapter.config),
                                        cdp.clip, cdp.noise_multiplier, denominator, seed)
        metrics["clients"] = [u.client for u in ordered]
        out = save_adapter(adapter, target)
        record = dp_record(self.registry, privacy, seed, metrics["dp"],
                           (self.manifest.chain_id, self.coordinator.address, task, rnd, self.account.address))
        (out / DP_RECORD_NAME).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
        return out, metrics

    # ------------------------------------------------------------------ store healing

    def _keep_spec(self, task: int) -> None:
        """Keep a copy of the task spec from the start, so a store that loses it later is
        repaired from here (the aggregation needs it at the end of every round)."""
        params = self.task_params(task)
        held_spec_bytes(self.store, params.hyper_params_cid, self.config.state_dir / "specs", log, "aggregator")

    def _restore_aggregate(self, rec: dict) -> bool:
        """The aggregate of ``rec`` is whole in the store (re-added from this daemon's copy
        when the store lost or damaged it); False when neither holds it."""
        from prismesh.chain.storage import restore_held

        held = rec.get("aggregate_dir") or str(self.config.state_dir / "aggregates" / f"task{rec['task']}-round{rec['round']}")
        try:
            if self.store.check(rec["aggregate_cid"]).ok:
                return True
        except Exception:  # noqa: BLE001 - judged by the repair below
            pass
        if restore_held(self.store, rec["aggregate_cid"], held):
            log.warning("task %d round %d: the store had lost or damaged aggregate %s; re-added it from %s",
                        rec["task"], rec["round"], rec["aggregate_cid"], held)
            return True
        return False

    def _restore_held_aggregate(self, cid: str) -> None:
        """Re-add aggregate ``cid`` from this daemon's copy if it computed it and the store
        lost it (a round starts from the previous aggregate: nodes and this daemon need it)."""
        for rec in self.state.section("rounds").values():
            if rec.get("aggregate_cid") == cid:
                self._restore_aggregate(rec)
                return

    def _heal_store(self) -> None:
        """Every few seconds: the aggregates that rounds start from (and the most recent ones)
        are whole in the store, re-added from this daemon's copies when not."""
        now = time.monotonic()
        if now - self._healed_at < self.config.heal_interval:
            return
        self._healed_at = now
        rounds = self.state.section("rounds")
        needed = {r.get("global_cid") for r in rounds.values() if r.get("status") != "done"}
        computed = sorted((r for r in rounds.values() if r.get("aggregate_cid")),
                          key=lambda r: r.get("opened_block", 0))
        for age, rec in enumerate(reversed(computed)):
            if rec["aggregate_cid"] in needed or age < HEAL_RECENT_AGGREGATES:
                self._restore_aggregate(rec)  # every block re-hashed
            elif age < HEAL_HISTORY and not self.store.has(rec["aggregate_cid"]):
                self._restore_aggregate(rec)  # the audit of a finished task needs it too

    def _published_cids(self, task: int, rnd: int) -> list[str]:
        """What the task published before round ``rnd``'s reveals, from the events this daemon
        recorded (every round's global adapter up to ``rnd``, then every earlier round's
        reveals, in chain order): no rescan of the chain per round."""
        recs = sorted((rec for rec in self.state.section("rounds").values() if rec.get("task") == task),
                      key=lambda rec: rec["round"])
        cids = [rec["global_cid"] for rec in recs if rec["round"] <= rnd and rec.get("global_cid")]
        cids += [r["cid"] for rec in recs if rec["round"] < rnd for r in rec.get("reveals", {}).values()]
        return cids

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


DP_RECORD_NAME = "prismesh-dp.json"


def dp_record(registry: Any, privacy: Any, seed: bytes, mechanism: dict, context: tuple) -> dict:
    """What a central-DP aggregate carries beside its weights (``prismesh-dp.json``): the
    mechanism, a hash commitment to the noise seed, and the seed sealed to the task's recipients,
    so a key-holding auditor regenerates the noise and nobody else can subtract it."""
    import hashlib

    from prismesh.chain.sealing import SealContext, seal, task_recipients

    chain_id, coordinator, task, rnd, aggregator = context
    ctx = SealContext(chain_id, coordinator, task, rnd, aggregator, "dp-seed")
    sealed = seal(seed, task_recipients(registry, privacy.recipients), ctx)
    return {
        "format": "prismesh-dp/1",
        **mechanism,
        "seed_sha256": hashlib.sha256(b"prismesh dp seed\n" + seed).hexdigest(),
        "sealed_seed": sealed.hex(),
    }


def run_aggregator(config_path: Path, *, ray_address: str | None = None, once: bool = False,
                   metrics_port: int | None = None, metrics_host: str | None = None) -> int:
    """``prismesh aggregator --config FILE``: connect, start Ray, follow final events until SIGTERM.

    Start-up waits for the chain, the store and Ray (one log line per attempt); it fails at
    once, with one line naming the file and field, only on what waiting cannot fix.
    ``metrics_port`` / ``metrics_host`` override the config's."""

    from prismesh.aggregator.parallel import ensure_ray
    from prismesh.chain.finality.coordinator_stream import open_final_stream
    from prismesh.chain.localstate import Stopped, retry_until
    from prismesh.chain.startup import open_daemon, stop_on_signals, with_metrics

    stop = stop_on_signals()
    cfg = with_metrics(AggregatorConfig.load(config_path), metrics_port, metrics_host)
    if cfg.metrics_port is not None:
        log.info("metrics on http://%s:%d/metrics", cfg.metrics_host, telemetry.serve(cfg.metrics_port, cfg.metrics_host))
    try:
        parts = open_daemon("aggregator", "aggregator", cfg, stop=stop, log=log)
    except Stopped:
        log.info("aggregator stopped cleanly (before the chain answered)")
        return 0
    try:
        if cfg.parallel:
            address = ray_address or cfg.ray_address
            retry_until("aggregator: starting Ray", lambda: ensure_ray(address, None if address else cfg.ray_num_cpus),
                        log=log, stop=stop, first=max(0.5, cfg.poll_interval))
        stream = open_final_stream(parts.w3, parts.manifest, AGGREGATOR_EVENTS, cfg.state_dir / "cursor.json",
                                   finality=cfg.finality, recover_damaged=True)
        daemon = AggregatorDaemon(cfg, w3=parts.w3, manifest=parts.manifest, account=parts.account,
                                  store=parts.store, store_spec=cfg.store, stream=stream, stop=stop)
        if once:
            daemon.step()
            return 0
        daemon.run()
    except Stopped:
        log.info("aggregator stopped cleanly")
    finally:
        parts.lock.release()
    return 0


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
