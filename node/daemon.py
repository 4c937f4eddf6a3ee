"""The client node daemon: one per GPU host.

It reacts only to *final* coordinator events (the finality-aware stream), and every step it
takes is recorded in a small state file before and after the side effect, so that a
``kill -9`` anywhere followed by a restart neither loses nor repeats a submission:

* training is deterministic and its adapter is pinned before the CID is recorded; a restart
  that finds the CID recorded and the object in the store re-uses it;
* the commit salt is derived from a signature of the node's own key over (chain, coordinator,
  task, round), so it is secret, never has to be stored, and is the same after a restart;
* before sending a commit or a reveal the node reads its on-chain submission, so a transaction
  that landed just before a crash is not sent twice.

It claims no more samples than the task's cap (the contract refuses more), and once a task is
over it claims the rewards its updates earned.

Faults around it are waited out or repaired, never crash-looped on: an unreachable chain or
store at start-up is retried with back-off (one log line per attempt); a damaged state file is
set aside and rebuilt by replaying the final events (a finished round is recorded as such, not
trained again); a trained adapter is kept on disk under a key of what it was trained from (task
spec, starting adapter, local data), so a retried round or a lost store never costs a second
training; the node re-adds its own adapter and the task spec when the store lost them; a
transaction the devnet lost in a crash (a join, commit or reveal in a block that was never
final) is sent again. A chain that no longer holds the history the node acted on stops it from
acting until it has resynchronised, and a commitment under this node's key that the node did
not make (a second daemon with the same key) stops it with a clear message.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from eth_account.messages import encode_defunct
from eth_utils import keccak

from prismesh.chain import telemetry
from prismesh.chain.localstate import (
    RetryDelay,
    StateFile,
    atomic_write_bytes,
    atomic_write_json,
    check_fields,
    check_types,
    debug_enabled,
    describe_error,
    read_config,
    resolve_account_spec,
    resolve_path,
)
from prismesh.chain.startup import held_spec_bytes

log = logging.getLogger("prismesh.node")

DUPLICATE_IDENTITY_EXIT = 3
# How many past rounds' adapters a node keeps in the store (audits re-check them).
HEAL_HISTORY = 200


class DuplicateIdentity(RuntimeError):
    """A commitment under this node's key that this node did not make: another daemon signs
    with the same key. Restarting does not help, so the daemon stops (exit code 3)."""


@dataclass
class NodeConfig:
    """What one hospital's node needs; read from a TOML or JSON file."""

    name: str
    manifest: Path
    keystore: str
    base_model: Path
    train_data: Path
    state_dir: Path
    test_data: Path | None = None
    store: str = "embedded"
    rpc_url: str | None = None
    descriptor: dict[str, Any] = field(default_factory=dict)
    auto_join: bool = True
    finality: bool = True
    poll_interval: float = 1.0
    device: str = "auto"
    # Seconds between checks that the adapters this node revealed (and the task specs) are
    # whole in the store; what the store lost is re-added from this node's copies.
    heal_interval: float = 10.0
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    encryption_key: str | None = None  # X25519 key file; default: beside the keystore

    @classmethod
    def load(cls, path: Path) -> NodeConfig:
        return cls.from_dict(read_config(path), base=path.parent, where=str(path))

    @classmethod
    def from_dict(cls, data: dict[str, Any], base: Path = Path("."), where: str = "node config") -> NodeConfig:
        required = ("name", "manifest", "keystore", "base_model", "train_data", "state_dir")
        check_fields(data, set(cls.__dataclass_fields__), required, where)
        check_types(data, cls, where, positive=("poll_interval",))
        values = dict(data)
        for key in ("manifest", "base_model", "train_data", "state_dir", "test_data"):
            if values.get(key):
                values[key] = resolve_path(values[key], base)
        values["keystore"] = resolve_account_spec(str(values["keystore"]), base, where)
        if values.get("encryption_key"):
            values["encryption_key"] = str(resolve_path(values["encryption_key"], base))
        return cls(**values)


def file_sha256(path: Path) -> bytes:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.digest()


class NodeDaemon:
    """Takes part in the tasks it joined: final events in, pinned adapters and transactions out."""

    def __init__(
        self,
        config: NodeConfig,
        *,
        w3: Any,
        manifest: Any,
        account: Any,
        store: Any,
        stream: Any,
        progress: bool = False,
        stop: threading.Event | None = None,
    ) -> None:
        from prismesh.chain.evm.contracts import Coordinator, Registry

        self.config = config
        self.w3 = w3
        self.manifest = manifest
        self.account = account
        self.address = account.address
        self.store = store
        self.stream = stream
        self.progress = progress
        self.registry = Registry(manifest, w3, account)
        self.coordinator = Coordinator(manifest, w3, account)
        self.state = StateFile(config.state_dir / "node-state.json")
        self._stop = stop or threading.Event()
        self._specs: dict[int, Any] = {}
        self._spec_cids: dict[int, str] = {}
        self._params: dict[int, Any] = {}
        self._data: tuple[list, list] | None = None
        self._data_key: str | None = None
        self._evaluator: Any = None
        self._salts: dict[str, bytes] = {}
        self._fingerprint: str | None = None
        self._healed_at = 0.0
        self._behind_logged = False
        telemetry.actor(self.address, "node", config.name)
        self._box_key: Any = None
        self.recover()

    # ------------------------------------------------------------------ recovery

    def recover(self) -> None:
        """After a damaged state or cursor file: say so, and replay every final event from the
        deployment block, which rebuilds the records without training a finished round again."""
        damaged = [d for d in (self.state.damaged, getattr(self.stream.raw, "damaged", None)) if d]
        for aside, why in damaged:
            log.warning("%s: %s was damaged (%s); kept as %s; rebuilding from the chain and the store",
                        self.config.name, aside.name.split(".damaged-")[0], why, aside)
        if self.state.damaged is not None:
            self.stream.resync(self.manifest.deploy_block - 1)

    def resync(self, safe_height: int) -> None:
        """Forget what was learned from blocks after ``safe_height`` (a history the chain no
        longer holds) and follow the chain again from there."""
        rounds = self.state.section("rounds")
        dropped = sorted(k for k, r in rounds.items() if r.get("opened_block", safe_height + 1) > safe_height)
        orphaned = self.state.section("orphaned")
        for key in dropped:
            orphaned[f"{key}@{int(time.time())}"] = rounds.pop(key)
            self.state.section("metrics").pop(key, None)
        self.state.section("joins").clear()
        self.state.save()
        self._specs.clear()
        self._spec_cids.clear()
        self._params.clear()
        self.stream.resync(safe_height)
        log.error("%s: resynchronised from block %d; %d round record(s) of the lost history set aside: %s",
                  self.config.name, safe_height, len(dropped), ", ".join(dropped) or "none")

    # ------------------------------------------------------------------ identity

    def ensure_registered(self) -> bool:
        """Register once; return whether governance has approved this node yet."""
        from prismesh.chain.evm.contracts import ClientStatus
        from prismesh.chain.identity import descriptor_hash

        status = self.registry.status_of(self.address)
        if status == ClientStatus.NONE:
            descriptor = {"name": self.config.name, **self.config.descriptor}
            self.registry.register(descriptor_hash(descriptor))
            log.info("%s: registered %s; waiting for governance approval", self.config.name, self.address)
        elif status in (ClientStatus.SUSPENDED, ClientStatus.REVOKED):
            log.warning("%s: this node is %s by governance", self.config.name, status.name.lower())
        if status != ClientStatus.REVOKED:
            self.publish_encryption_key()
        return bool(self.registry.is_approved(self.address))

    def box_key(self) -> Any:
        """This node's X25519 key, or None when it has none (it then cannot open aggregates
        sealed to the task's members; sealing its own updates needs only the recipients' keys)."""
        if self._box_key is None:
            from prismesh.chain.sealing import load_daemon_box_key

            try:
                self._box_key = load_daemon_box_key(self.config.keystore, self.account, self.config.encryption_key)
            except ValueError as exc:
                log.info("%s: no encryption key: %s", self.config.name, exc)
                self._box_key = False
        return self._box_key or None

    def publish_encryption_key(self) -> None:
        """Put this node's public key on chain beside its identity when it is not there yet."""
        from prismesh.chain.sealing import fingerprint, public_key_bytes

        key = self.box_key()
        if key is None:
            return
        public = public_key_bytes(key)
        if self.registry.encryption_key_of(self.address) != public:
            self.registry.set_encryption_key(public)
            log.info("%s: published encryption key %s", self.config.name, fingerprint(public))

    # ------------------------------------------------------------------ loop

    def step(self) -> int:
        """Handle every newly final event once and push committed rounds forward.

        Returns how many actions were taken (0 when idle)."""
        actions = 0
        for event in self.stream.poll():
            actions += self._handle(event)
            # The cursor moves past the whole batch in one write. Handling is idempotent (what
            # an event made this node do is in its state before the handler returns), so a
            # crash before that write only delivers the batch again.
            self.stream.ack(event, durable=False)
        self.stream.flush()
        actions += self._advance_joins()
        actions += self._advance_pending()
        actions += self._advance_claims()
        self._flush_metrics()
        self._heal_store()
        telemetry.observe_finality("node", self.config.name, self.stream, self.w3)
        return actions

    def run(self) -> None:
        """Run until SIGTERM/SIGINT; a signal finishes the current step, then returns.

        A failed step logs one line and is retried from the durable cursor with back-off; a
        chain that lost the history the node acted on is resynchronised from the last block the
        node can still verify. :class:`DuplicateIdentity` ends the run."""
        from prismesh.chain.finality.events import ChainDiverged

        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                signal.signal(sig, lambda *_: self._stop.set())
            except ValueError:  # not the main thread
                pass
        retry = RetryDelay(self.config.poll_interval)
        while True:
            try:
                if self.ensure_registered():
                    break
                delay = self.config.poll_interval
            except Exception as exc:  # noqa: BLE001 - an unreachable chain at start-up is waited out
                delay = retry.next()
                log.warning("%s: could not check the registration (attempt %d): %s; retrying in %.1f s",
                            self.config.name, retry.attempts, describe_error(exc), delay, exc_info=debug_enabled())
            if self._stop.wait(delay):
                log.info("%s: stopped cleanly", self.config.name)
                return
        retry.reset()
        log.info("%s: approved; following final events", self.config.name)
        while not self._stop.is_set():
            try:
                acted = self.step()
            except DuplicateIdentity:
                raise
            except ChainDiverged as exc:
                log.error("%s: THE CHAIN DOES NOT HOLD THE HISTORY THIS NODE ACTED ON: %s",
                          self.config.name, exc)
                self.resync(exc.safe_height)
                continue
            except Exception as exc:  # noqa: BLE001 - the failed step is retried from the durable cursor
                telemetry.retry("node", self.config.name, exc)
                delay = retry.next()
                log.warning("%s: step failed (attempt %d): %s; retrying in %.1f s from the last handled event",
                            self.config.name, retry.attempts, describe_error(exc), delay, exc_info=debug_enabled())
                try:
                    self.stream.rewind()
                except Exception:  # noqa: BLE001 - the cursor file is re-read at the next try
                    pass
                self._stop.wait(delay)
                continue
            if retry.attempts:
                log.info("%s: resumed after %d failed attempt(s)", self.config.name, retry.attempts)
            retry.reset()
            self._log_behind()
            if acted == 0:
                self._stop.wait(self.config.poll_interval)
        log.info("%s: stopped cleanly", self.config.name)

    def _log_behind(self) -> None:
        behind = bool(getattr(self.stream, "behind", False))
        if behind and not self._behind_logged:
            log.warning("%s: the chain's final height is below blocks this node already handled "
                        "(the devnet restarted from its durable state); waiting for them to be "
                        "certified again", self.config.name)
        elif self._behind_logged and not behind:
            log.info("%s: the chain's final height caught up again", self.config.name)
        self._behind_logged = behind

    def stop(self) -> None:
        self._stop.set()

    # ------------------------------------------------------------------ events

    def _handle(self, ev: Any) -> int:
        name = ev.event
        if name == "TaskCreated":
            return self._on_task_created(ev)
        if name == "RoundOpened":
            return self._on_round_opened(ev)
        if name == "PhaseChanged":
            from prismesh.chain.evm.contracts import Phase

            # Only a move to Reveal asks something of this node before the step's own pass (a
            # reveal has a deadline; other events of the batch may mean long work).
            return self._advance_pending() if ev.current == Phase.REVEAL else 0
        if name in ("AggregateAccepted", "RoundFailed"):
            self._close_round(ev.task_id, ev.round)
        if name == "AggregateAccepted":
            return self._on_aggregate(ev)
        if name == "RoundFailed":
            log.warning("%s: task %d round %d failed: %s", self.config.name, ev.task_id, ev.round, ev.reason)
        elif name == "TaskCompleted":
            log.info("%s: task %d completed; final adapter %s", self.config.name, ev.task_id, ev.final_adapter_cid)
        if name in ("TaskCompleted", "TaskFailed", "TaskCancelled"):
            return self._claim(ev.task_id)
        if name == "RewardsClaimed" and ev.account == self.address:
            # Final: the claim can no longer be lost.
            if self.state.section("claims").pop(str(ev.task_id), None) is not None:
                self.state.save()
        return 0

    def _claim(self, task: int) -> int:
        """Mint the rewards this node's updates earned in a finished task (once). The claim is
        watched until its RewardsClaimed event is final: a devnet crash can lose it before."""
        owed = self.coordinator.rewards_owed(task, self.address)
        if owed == 0:
            return 0
        self._send_with_metrics(task, ("claimRewards", (task,)))
        self.state.section("claims")[str(task)] = owed
        self.state.save()
        log.info("%s: task %d: claimed %d reward units", self.config.name, task, owed)
        return 1

    def _advance_claims(self) -> int:
        claims = self.state.section("claims")
        done = 0
        for key in sorted(claims, key=int):
            task = int(key)
            if self.coordinator.rewards_owed(task, self.address) > 0:
                log.warning("%s: task %d: the chain lost this node's reward claim (a devnet restart); "
                            "claiming again", self.config.name, task)
                self.coordinator.claim_rewards(task)
                done += 1
        return done

    def _on_task_created(self, ev: Any) -> int:
        if not self.config.auto_join:
            log.info("%s: task %d created; auto_join is off, not joining", self.config.name, ev.task_id)
            return 0
        reason = self._why_not_join(ev.task_id, ev.params)
        if reason:
            log.info("%s: not joining task %d: %s", self.config.name, ev.task_id, reason)
            return 0
        from prismesh.chain.evm.contracts import ContractRevert

        try:
            self.coordinator.join_task(ev.task_id)
        except ContractRevert as exc:
            log.info("%s: could not join task %d: %s", self.config.name, ev.task_id, exc)
            return 0
        # Until the task starts, the join is checked again: a devnet crash can lose the block
        # that held it (it was not final yet).
        self.state.section("joins")[str(ev.task_id)] = ev.block_number
        self.state.save()
        log.info("%s: joined task %d", self.config.name, ev.task_id)
        return 1

    def _advance_joins(self) -> int:
        from prismesh.chain.evm.contracts import ContractRevert, TaskStatus

        joins = self.state.section("joins")
        done = 0
        for key in sorted(joins, key=int):
            task = int(key)
            if self.coordinator.get_task(task).status != TaskStatus.CREATED:
                joins.pop(key)
                self.state.save()
                continue
            if self.coordinator.is_participant(task, self.address):
                continue
            log.warning("%s: task %d: the chain lost this node's join (a devnet restart); joining again",
                        self.config.name, task)
            try:
                self.coordinator.join_task(task)
                done += 1
            except ContractRevert as exc:
                log.info("%s: could not join task %d again: %s", self.config.name, task, exc)
                joins.pop(key)
                self.state.save()
        return done

    def _why_not_join(self, task_id: int, params: Any) -> str | None:
        if self.coordinator.is_participant(task_id, self.address):
            return "already a participant"
        if not self.registry.is_approved(self.address):
            return "this node is not approved"
        try:
            spec = self.task_spec(task_id, params.hyper_params_cid)
        except Exception as exc:  # noqa: BLE001 - any unusable spec is a reason to stay out
            return f"unusable hyper-parameter file {params.hyper_params_cid}: {exc}"
        if bytes(params.base_model_hash) != spec.base_model_hash:
            return "the task's base-model hash differs from its hyper-parameter file"
        if spec.base_model_sha256 != self.fingerprint():
            return f"local base model {self.config.base_model} does not match the task's hash"
        return None

    def _on_round_opened(self, ev: Any) -> int:
        from prismesh.chain.evm.contracts import Phase

        task, rnd = ev.task_id, ev.round
        if not self.coordinator.is_participant(task, self.address):
            log.info("%s: task %d round %d opened; skipping: not a participant of this task", self.config.name, task, rnd)
            return 0
        key = f"{task}:{rnd}"
        rec = self.state.section("rounds").get(key, {})
        if rec.get("stage") in ("committed", "revealed", "missed", "closed"):
            log.info("%s: task %d round %d: skipping the opening event: this round is already %s",
                     self.config.name, task, rnd, rec["stage"])
            return 0
        sub = self.coordinator.get_submission(task, rnd, self.address)
        committed = sub.committed
        phase = self.coordinator.phase_of(task, rnd)
        if phase > Phase.COMMIT and not committed:
            # Replaying history (a rebuilt state, a resync): a round whose commit phase is
            # over without this node's commitment is recorded, not trained for.
            self._record_round(key, {"stage": "closed" if phase >= Phase.FINALIZED else "missed",
                                     "opened_block": ev.block_number,
                                     "reason": f"the round was {phase.name} when this node handled its opening"})
            log.info("%s: task %d round %d: already %s on chain; nothing to do", self.config.name, task, rnd, phase.name)
            return 0
        if phase >= Phase.FINALIZED and committed:
            self._record_round(key, {"stage": "closed", "opened_block": ev.block_number,
                                     "reason": f"the round was {phase.name} when this node handled its opening"})
            return 0
        params = self.task_params(task)
        spec = self.task_spec(task, params.hyper_params_cid)
        log.info("%s: task %d round %d opened (global %s)", self.config.name, task, rnd, ev.global_adapter_cid or "fresh")
        rec = self._train_and_pin(task, rnd, ev.global_adapter_cid, spec, rec)
        if rec.get("stage") == "missed":
            return 0
        rec["opened_block"] = ev.block_number
        rec["global_cid"] = ev.global_adapter_cid
        self._commit(task, rnd, rec)
        return 1

    def _record_round(self, key: str, rec: dict) -> None:
        self.state.section("rounds")[key] = rec
        self.state.save()

    def _close_round(self, task: int, rnd: int) -> None:
        """The round's outcome is final: nothing this node sent for it can be lost any more."""
        rec = self.state.section("rounds").get(f"{task}:{rnd}")
        if rec is not None and rec.get("stage") in ("committed", "revealed", "pinned"):
            rec["final_stage"] = rec["stage"]
            rec["stage"] = "closed"
            self.state.save()

    def _on_aggregate(self, ev: Any) -> int:
        task, rnd = ev.task_id, ev.round
        if not self.coordinator.is_participant(task, self.address):
            return 0
        key = f"{task}:{rnd}"
        reports = self.state.section("metrics")
        if key in reports:
            return 0
        params = self.task_params(task)
        spec = self.task_spec(task, params.hyper_params_cid)
        if not spec.report_metrics:
            return 0
        adapter = self.fetch_global(ev.aggregate_cid)
        _, test = self.local_data(spec)
        acc = self.evaluator().accuracy(adapter, test, scoring=spec.metric_scoring)
        # Sent with this node's next transaction of the step (the next round's commitment, the
        # reward claim), or alone when the step ends (`_flush_metrics`).
        reports[key] = {"accuracy": acc, "aggregate_cid": ev.aggregate_cid, "sent": False}
        self.state.save()
        log.info("%s: task %d round %d aggregate accuracy on local test set %.3f", self.config.name, task, rnd, acc)
        return 1

    # ------------------------------------------------------------------ metric reports

    def _unsent_metrics(self, task: int | None = None) -> list[tuple[str, dict]]:
        # Records written before reports were deferred carry no "sent": they went at once.
        return [(key, rec) for key, rec in sorted(self.state.section("metrics").items())
                if not rec.get("sent", True) and (task is None or key.split(":")[0] == str(task))]

    def _metric_calls(self, pending: list[tuple[str, dict]]) -> list[Any]:
        calls = []
        for key, rec in pending:
            task, rnd = (int(x) for x in key.split(":"))
            calls.append(self.coordinator.metric_call(task, rnd, "accuracy", rec["accuracy"]))
        return calls

    def _mark_sent(self, pending: list[tuple[str, dict]]) -> None:
        for _, rec in pending:
            rec["sent"] = True
        self.state.save()

    def _send_with_metrics(self, task: int, call: Any) -> Any:
        """Send ``call`` with this node's unsent metric reports of ``task`` in the same
        transaction (one fewer transaction, and block, per report). A batch the chain refuses
        is not retried as a batch: ``call`` goes alone and meets its own errors exactly as
        before, and the reports go alone when the step ends."""
        from prismesh.chain.evm.contracts import ContractRevert

        pending = self._unsent_metrics(task)
        if pending:
            try:
                receipt = self.coordinator.send_calls([*self._metric_calls(pending), call])
            except ContractRevert as exc:
                log.info("%s: task %d: %s with the metric reports was refused (%s); sending it alone",
                         self.config.name, task, call[0], exc.error_name)
            else:
                self._mark_sent(pending)
                return receipt
        return self.coordinator.send_calls([call])

    def _flush_metrics(self) -> int:
        """Send the metric reports no transaction of this step carried, in one transaction.

        A refused batch is sent report by report: one already on chain (sent before a crash) is
        recognised, and one the contract refuses for good (this node was suspended, say) is
        recorded as refused and not tried again, so that it cannot stall every later step."""
        from prismesh.chain.evm.contracts import ContractRevert

        pending = self._unsent_metrics()
        if not pending:
            return 0
        try:
            self.coordinator.send_calls(self._metric_calls(pending))
        except ContractRevert:
            for key, rec in pending:
                try:
                    self.coordinator.send_calls(self._metric_calls([(key, rec)]))
                except ContractRevert as one:
                    if one.error_name != "MetricAlreadyReported":
                        log.warning("%s: metric report %s was refused (%s); not sending it again",
                                    self.config.name, key, one)
                        rec["refused"] = one.error_name or str(one)
        self._mark_sent(pending)
        return len(pending)

    # ------------------------------------------------------------------ round work

    def _train_and_pin(self, task: int, rnd: int, global_cid: str, spec: Any, rec: dict) -> dict:
        """This round's adapter, pinned: the one recorded, the one kept on disk for the same
        spec, starting adapter and data (a retried round, a lost store or state), else trained.

        The contract refuses the same weights revealed twice in one task. A retried round starts
        from the same global adapter, so the adapter kept for it is re-used only while it was
        never revealed; once it was, the retry trains with a seed derived from the round, which
        gives other weights (and is the same again after a restart)."""
        cid = rec.get("cid")
        if cid and self.store.has(cid):
            log.info("%s: task %d round %d: re-using pinned adapter %s", self.config.name, task, rnd, cid)
            return rec
        spec_cid = self._spec_cids.get(task, "")
        rec = self._kept_or_trained(task, rnd, global_cid, spec, spec_cid, "")
        if rec.get("stage") == "missed":
            return rec
        seen = self.coordinator.revealed_in(task, bytes.fromhex(rec["sha256"]))
        if seen not in (0, rnd):
            log.info("%s: task %d round %d: these weights were revealed in round %d; a retry needs "
                     "other ones, training with a seed of this round", self.config.name, task, rnd, seen)
            seed = int.from_bytes(hashlib.sha256(f"{spec.train.get('seed', 0)}/{task}/{rnd}".encode()).digest()[:4], "big")
            spec = replace(spec, train={**spec.train, "seed": seed % 2**31})
            rec = self._kept_or_trained(task, rnd, global_cid, spec, spec_cid, f"round-{rnd}")
            if rec.get("stage") == "missed":
                return rec
        self._record_round(f"{task}:{rnd}", rec)
        return rec

    def _kept_or_trained(self, task: int, rnd: int, global_cid: str, spec: Any, spec_cid: str, variant: str) -> dict:
        from prismesh.chain.privacy import BudgetExceeded
        from prismesh.chain.sealing import SealError
        from prismesh.chain.storage import restore_held

        out = self.adapter_dir(spec_cid, global_cid, variant)
        meta_path = out.with_suffix(".json")
        if out.is_dir() and meta_path.is_file():
            meta = json.loads(meta_path.read_text())
            sealed = out.with_suffix(".sealed")
            held: Any = (sealed.read_bytes() if sealed.is_file() else None) if meta.get("sealed") else out
            if restore_held(self.store, meta["cid"], held):
                log.info("%s: task %d round %d: re-using adapter %s kept on disk (no retraining)",
                         self.config.name, task, rnd, meta["cid"])
                return {**meta, "stage": "pinned", "dir": str(out)}
        init = self.fetch_global(global_cid) if global_cid else None
        train, _ = self.local_data(spec)
        privacy = spec.privacy_spec
        try:
            privacy_note = self._privacy_budget(task, rnd, spec, len(train))
        except BudgetExceeded as exc:
            return self._miss(task, rnd, f"privacy budget: {exc}")
        if out.exists():
            shutil.rmtree(out)
        result = self.train_round(task, rnd, spec, init, out)
        if privacy.local_dp:
            self._privatize(task, rnd, result.adapter_dir, init, privacy.client_dp)
        try:
            cid = self._pin_update(task, rnd, result.adapter_dir, privacy, keep=out.with_suffix(".sealed"))
        except SealError as exc:
            return self._miss(task, rnd, f"cannot seal the update: {exc}")
        cap = self.task_params(task).sample_cap
        rec = {
            "stage": "pinned",
            "cid": cid,
            "sealed": privacy.sealed,
            **({"privacy": privacy_note} if privacy_note else {}),
            "sha256": file_sha256(result.adapter_dir / "adapter_model.safetensors").hex(),
            # The claim the task allows: the local count, up to the task's cap.
            "num_samples": min(int(result.num_samples), int(cap)),
            "trained_samples": int(result.num_samples),
            "train_seconds": float(result.metrics.get("seconds", 0.0)),
            "metrics": {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))},
        }
        atomic_write_json(meta_path, {k: v for k, v in rec.items() if k != "stage"}, indent=1)
        rec["dir"] = str(out)
        self._record_round(f"{task}:{rnd}", rec)
        telemetry.round_joined(self.config.name, rec["train_seconds"])
        if telemetry.enabled():
            telemetry.uploaded(self.config.name, self.store.stat(cid).cumulative_size)
        log.info("%s: task %d round %d: adapter pinned as %s", self.config.name, task, rnd, cid)
        return rec

    # ------------------------------------------------------------------ privacy

    def _miss(self, task: int, rnd: int, reason: str) -> dict:
        rec = {"stage": "missed", "reason": reason}
        self.state.section("rounds")[f"{task}:{rnd}"] = rec
        self.state.save()
        log.error("%s: task %d round %d: not taking part: %s", self.config.name, task, rnd, reason)
        return rec

    def _privacy_budget(self, task: int, rnd: int, spec: Any, num_samples: int) -> dict | None:
        """The ε this node will have spent after this round (client level when it adds the noise
        itself, sample level with DP-SGD), checked against the task's budget before training."""
        from prismesh.chain.privacy import check_budget, client_epsilon, sample_epsilon

        privacy = spec.privacy_spec
        sample_dp = float(spec.train.get("dp_noise_multiplier", 0.0) or 0.0) > 0
        if not (privacy.local_dp or sample_dp):
            return None
        done = sum(1 for ev in self.coordinator.get_events("UpdateRevealed", self.manifest.deploy_block, taskId=task,
                                                              client=self.address) if ev.round < rnd)
        note: dict[str, Any] = {"rounds": done + 1, "delta": privacy.delta}
        if privacy.local_dp:
            note["client_epsilon"] = client_epsilon(privacy, done + 1)
        if sample_dp:
            note["sample_epsilon"] = sample_epsilon(privacy, spec.train, num_samples, done + 1)
        spent = min(v for k, v in note.items() if k.endswith("epsilon"))
        warning = check_budget(privacy, spent, f"task {task} round {rnd}")
        if warning:
            log.warning("%s: %s; training anyway (on_budget = warn)", self.config.name, warning)
        return note

    def _privatize(self, task: int, rnd: int, adapter_dir: Path, init: Path | None, cdp: Any) -> None:
        """Local client-level DP: clip this update in ΔW space and add noise only this node knows."""
        from prismesh.aggregator.adapters import load_adapter, save_adapter
        from prismesh.aggregator.dp import privatize_update

        base = load_adapter(init) if init is not None else None
        noisy, metrics = privatize_update(load_adapter(adapter_dir), base, cdp.clip, cdp.noise_multiplier,
                                          self.secret("client-dp-seed", task, rnd))
        save_adapter(noisy, adapter_dir)
        log.info("%s: task %d round %d: update clipped (factor %.3g) and noised (σ = %g) before it leaves",
                 self.config.name, task, rnd, metrics["clip_factor"], cdp.noise_multiplier)

    def _pin_update(self, task: int, rnd: int, adapter_dir: Path, privacy: Any, keep: Path | None = None) -> str:
        """Pin the adapter: in the clear, or sealed to the task's recipients (never the clear
        when the task asks for sealing: a missing key is an error). A sealed object's bytes are
        kept at ``keep`` (sealing is randomised, so only these bytes give the committed CID)."""
        from prismesh.chain.sealing import SealContext, add_sealed, seal_dir, task_recipients
        from prismesh.chain.storage import add_adapter

        if not privacy.sealed:
            return add_adapter(self.store, adapter_dir)
        recipients = task_recipients(self.registry, privacy.recipients)
        ctx = SealContext(self.manifest.chain_id, self.coordinator.address, task, rnd, self.address, "update")
        blob = seal_dir(adapter_dir, recipients, ctx)
        if keep is not None:
            atomic_write_bytes(keep, blob)
        return add_sealed(self.store, blob)

    def secret(self, label: str, task: int, rnd: int) -> bytes:
        """A secret, reproducible value for one round: a hash of this key's signature over it."""
        text = f"prismesh-{label}/{self.manifest.chain_id}/{self.coordinator.address}/{task}/{rnd}"
        return keccak(bytes(self.account.sign_message(encode_defunct(text=text)).signature))

    def train_round(self, task: int, rnd: int, spec: Any, init: Path | None, out: Path) -> Any:
        """Train this round's adapter from ``init`` (the global adapter's directory, ``None`` for
        the bare model) into ``out``; returns the trainer's ``TrainResult``. Everything around it
        (pinning, commit, reveal) is the same for every node, so this is the step the attack
        harness (``prismesh.runs.attacks``) replaces."""
        from prismesh.node.trainer import TrainConfig, train_lora

        train, _ = self.local_data(spec)
        cfg = TrainConfig.from_dict({**spec.train_config(), "device": self.config.device})
        log.info("%s: task %d round %d: training on %d local samples", self.config.name, task, rnd, len(train))
        return train_lora(
            self.config.base_model, train, out, cfg, init_adapter=init, progress=self.progress,
            base_model_name=spec.base_model_id,
            noise_seed=int.from_bytes(self.secret("dp-sgd-seed", task, rnd)[:8], "big"),
        )

    def adapter_dir(self, spec_cid: str, global_cid: str, variant: str = "") -> Path:
        """Where the adapter trained from ``global_cid`` under task spec ``spec_cid`` on this
        node's data is kept: training is deterministic, so the same inputs give the same adapter,
        and a retried round (same starting adapter) re-uses it instead of training again.
        ``variant`` names a retry's own seed."""
        text = f"{spec_cid}\n{global_cid}\n{self.data_key()}" + (f"\n{variant}" if variant else "")
        return self.config.state_dir / "adapters" / hashlib.sha256(text.encode()).hexdigest()[:24]

    def data_key(self) -> str:
        """A digest of the local training (and test) files: a changed file never re-uses an
        adapter trained on the old one."""
        if self._data_key is None:
            h = hashlib.sha256()
            for path in (self.config.train_data, self.config.test_data):
                h.update(file_sha256(path) if path is not None else b"-")
            self._data_key = h.hexdigest()
        return self._data_key

    def salt(self, task: int, rnd: int) -> bytes:
        """A secret, reproducible salt: a hash of this key's signature over the round's identity
        (deterministic, so kept once made: every pass over a pending round compares commitments)."""
        text = f"prismesh-commit-salt/{self.manifest.chain_id}/{self.coordinator.address}/{task}/{rnd}"
        salt = self._salts.get(text)
        if salt is None:
            salt = self._salts[text] = keccak(bytes(self.account.sign_message(encode_defunct(text=text)).signature))
        return salt

    def commitment(self, task: int, rnd: int, rec: dict) -> bytes:
        """The commitment this node makes for the update recorded in ``rec``."""
        from prismesh.chain.evm.contracts import make_commitment

        return make_commitment(
            self.manifest.chain_id, self.coordinator.address, task, rnd, self.address,
            rec["cid"], bytes.fromhex(rec["sha256"]), rec["num_samples"], self.salt(task, rnd),
        )  # fmt: skip

    def _foreign(self, task: int, rnd: int) -> DuplicateIdentity:
        return DuplicateIdentity(
            f"{self.config.name}: task {task} round {rnd}: the chain holds a commitment from this "
            f"node's key {self.address} that this node did not make: another daemon is signing "
            "with the same key (on another host, or with another state directory). Stop one of "
            "them; each hospital needs its own key (prismesh keys new)."
        )

    def _commit(self, task: int, rnd: int, rec: dict) -> None:
        from prismesh.chain.evm.contracts import ContractRevert

        sub = self.coordinator.get_submission(task, rnd, self.address)
        commitment = self.commitment(task, rnd, rec)
        if not sub.committed:
            try:
                self._send_with_metrics(task, ("commitUpdate", (task, rnd, commitment)))
            except ContractRevert as exc:
                rec["stage"] = "missed"
                rec["reason"] = str(exc)
                self.state.save()
                log.warning("%s: task %d round %d: commit refused: %s", self.config.name, task, rnd, exc)
                return
            log.info("%s: task %d round %d: committed", self.config.name, task, rnd)
        elif bytes(sub.commitment) != commitment:
            rec["stage"] = "missed"
            rec["reason"] = "a commitment this node did not make is on chain"
            self.state.save()
            raise self._foreign(task, rnd)
        rec["stage"] = "committed"
        self.state.save()

    def _advance_pending(self) -> int:
        """Reveal every committed update whose round has reached its reveal phase, and send
        again what a devnet crash lost (a commit or reveal in a block that never became final)."""
        from prismesh.chain.evm.contracts import ContractRevert, Phase

        done = 0
        for key, rec in sorted(self.state.section("rounds").items()):
            stage = rec.get("stage")
            if stage not in ("committed", "revealed"):
                continue
            task, rnd = (int(x) for x in key.split(":"))
            phase = self.coordinator.phase_of(task, rnd)
            if stage == "revealed":
                if phase >= Phase.FINALIZED:
                    rec["stage"] = "closed"
                    self.state.save()
                    continue
                if phase > Phase.REVEAL:
                    continue
            sub = self.coordinator.get_submission(task, rnd, self.address)
            if bytes(sub.commitment) == b"\x00" * 32:
                if phase <= Phase.COMMIT:  # OPEN until the round's first commitment
                    log.warning("%s: task %d round %d: the chain lost this node's commitment (a devnet "
                                "restart); committing again", self.config.name, task, rnd)
                    self._ensure_adapter(task, rnd, rec)
                    self._commit(task, rnd, rec)
                    done += 1
                else:
                    rec["stage"] = "missed"
                    rec["reason"] = f"the commitment was lost and the round moved to {phase.name}"
                    self.state.save()
                    log.warning("%s: task %d round %d: %s", self.config.name, task, rnd, rec["reason"])
                continue
            if bytes(sub.commitment) != self.commitment(task, rnd, rec):
                raise self._foreign(task, rnd)
            if sub.revealed:
                if stage != "revealed":
                    rec["stage"] = "revealed"
                    self.state.save()
                continue
            if stage == "revealed":
                log.warning("%s: task %d round %d: the chain lost this node's reveal (a devnet restart); "
                            "revealing again", self.config.name, task, rnd)
            if phase < Phase.REVEAL:
                continue
            if phase > Phase.REVEAL:
                rec["stage"] = "missed"
                rec["reason"] = f"round moved to {phase.name} before the reveal"
                self.state.save()
                log.warning("%s: task %d round %d: %s", self.config.name, task, rnd, rec["reason"])
                continue
            self._ensure_adapter(task, rnd, rec)
            try:
                self.coordinator.reveal_update(
                    task, rnd, rec["cid"], bytes.fromhex(rec["sha256"]), rec["num_samples"], self.salt(task, rnd)
                )
            except ContractRevert as exc:
                rec["stage"] = "missed"
                rec["reason"] = str(exc)
                self.state.save()
                log.warning("%s: task %d round %d: reveal refused: %s", self.config.name, task, rnd, exc)
                continue
            rec["stage"] = "revealed"
            self.state.save()
            log.info("%s: task %d round %d: revealed %s (%d samples)", self.config.name, task, rnd, rec["cid"], rec["num_samples"])
            done += 1
        return done

    # ------------------------------------------------------------------ store healing

    def _held_adapter(self, rec: dict) -> Path | bytes | None:
        """What this node still holds of the adapter of ``rec``: its directory, or for a sealed
        update the sealed bytes kept beside it (``restore_held`` checks either against the CID)."""
        from prismesh.chain.storage import cid_of_path

        def held(out: Path) -> Path | bytes | None:
            sealed = out.with_suffix(".sealed")
            if rec.get("sealed") and sealed.is_file():
                return sealed.read_bytes()
            return out if cid_of_path(out) == rec["cid"] else None

        recorded = Path(rec["dir"]) if rec.get("dir") else None
        if recorded is not None and recorded.is_dir():
            return held(recorded)
        for meta in (self.config.state_dir / "adapters").glob("*.json"):
            out = meta.with_suffix("")
            try:
                if out.is_dir() and json.loads(meta.read_text()).get("cid") == rec["cid"]:
                    return held(out)
            except (OSError, ValueError):
                continue
        return None

    def _ensure_adapter(self, task: int, rnd: int, rec: dict) -> None:
        """Before the update is revealed (the aggregator fetches it next), make sure the store
        holds it whole, re-adding it from the copy on disk when the store lost or damaged it."""
        from prismesh.chain.storage import restore_held

        if self.store.has(rec["cid"]):
            try:
                if self.store.check(rec["cid"]).ok:
                    return
            except Exception:  # noqa: BLE001 - judged by the repair below
                pass
        if restore_held(self.store, rec["cid"], self._held_adapter(rec)):
            log.warning("%s: task %d round %d: the store had lost or damaged adapter %s; re-added it from disk",
                        self.config.name, task, rnd, rec["cid"])

    def _heal_store(self) -> None:
        """Every ``heal_interval`` seconds: the adapters of rounds still in play (and the global
        adapters they started from) are whole in the store, and those of recent finished rounds
        (what an audit re-checks) are still there; re-added from this node's copies when not."""
        now = time.monotonic()
        if now - self._healed_at < self.config.heal_interval:
            return
        self._healed_at = now
        from prismesh.chain.storage import restore_held

        records = sorted(self.state.section("rounds").items(), key=lambda kv: kv[1].get("opened_block", 0))
        for key, rec in records:
            if rec.get("stage") in ("committed", "revealed") and rec.get("cid"):
                task, rnd = (int(x) for x in key.split(":"))
                self._ensure_adapter(task, rnd, rec)
                # The round's starting adapter, fetched by this node: the aggregator needs it too.
                held = self.config.state_dir / "global" / rec.get("global_cid", "")
                if rec.get("global_cid") and held.is_dir() and not self.store.check(rec["global_cid"]).ok:
                    if restore_held(self.store, rec["global_cid"], held):
                        log.warning("%s: the store had lost or damaged global adapter %s; re-added it from disk",
                                    self.config.name, rec["global_cid"])
        for key, rec in records[-HEAL_HISTORY:]:
            if rec.get("stage") == "closed" and rec.get("cid") and not self.store.has(rec["cid"]):
                held = self._held_adapter(rec)
                if held is not None and restore_held(self.store, rec["cid"], held):
                    log.warning("%s: round %s: the store had lost adapter %s; re-added it from disk",
                                self.config.name, key, rec["cid"])

    # ------------------------------------------------------------------ local resources

    def task_params(self, task_id: int) -> Any:
        """A task's on-chain parameters, read once: the contract writes them only when the task
        is created, and this node asks only about tasks whose final events it handles (a
        resync forgets them with the history)."""
        params = self._params.get(task_id)
        if params is None:
            params = self._params[task_id] = self.coordinator.get_task_params(task_id)
        return params

    def task_spec(self, task_id: int, cid: str) -> Any:
        from prismesh.chain.taskspec import TaskSpec

        if task_id not in self._specs:
            raw = held_spec_bytes(self.store, cid, self.config.state_dir / "specs", log, self.config.name)
            self._specs[task_id] = TaskSpec.from_bytes(raw, where=f"hyper-parameter file {cid}")
            self._spec_cids[task_id] = cid
        return self._specs[task_id]

    def fetch_global(self, cid: str) -> Path:
        """A round's global adapter: in the clear, or sealed to the task's members."""
        from prismesh.chain.sealing import fetch_any_adapter

        dest = self.config.state_dir / "global" / cid
        if not dest.exists():
            fetch_any_adapter(self.store, cid, dest, self.box_key())
        return dest

    def fingerprint(self) -> str:
        from prismesh.chain.taskspec import model_fingerprint

        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self.config.base_model)
        return self._fingerprint

    def local_data(self, spec: Any) -> tuple[list, list]:
        """The local train and test examples; they never leave this host."""
        from prismesh.node.data import load_jsonl, train_test_split

        if self._data is None:
            train = load_jsonl(self.config.train_data)
            if self.config.test_data is not None:
                self._data = (train, load_jsonl(self.config.test_data))
            else:
                self._data = train_test_split(train, spec.test_fraction, spec.split_seed)
        return self._data

    def evaluator(self) -> Any:
        from prismesh.node.evaluate import Evaluator

        if self._evaluator is None:
            self._evaluator = Evaluator(self.config.base_model, device=self.config.device)
        return self._evaluator


NODE_EVENTS = (
    "TaskCreated", "RoundOpened", "PhaseChanged", "AggregateAccepted", "RoundFailed", "TaskCompleted",
    "TaskFailed", "TaskCancelled", "RewardsClaimed",
)


def run_node(config_path: Path, *, once: bool = False, progress: bool = True, metrics_port: int | None = None,
             metrics_host: str | None = None) -> int:
    """``prismesh node --config FILE``: connect, register, then follow final events until SIGTERM.
    ``metrics_port`` / ``metrics_host`` override the config's.

    Start-up waits for the chain and the store (one log line per attempt); it fails at once,
    with one line naming the file and field, only on what waiting cannot fix."""
    from prismesh.chain.finality.coordinator_stream import open_final_stream
    from prismesh.chain.localstate import Stopped
    from prismesh.chain.startup import open_daemon, stop_on_signals, with_metrics

    stop = stop_on_signals()
    config = with_metrics(NodeConfig.load(config_path), metrics_port, metrics_host)
    try:
        parts = open_daemon("node", config.name, config, stop=stop, log=log)
    except Stopped:
        log.info("%s: stopped cleanly (before the chain answered)", config.name)
        return 0
    stream = open_final_stream(parts.w3, parts.manifest, NODE_EVENTS, config.state_dir / "cursor.json",
                               finality=config.finality, recover_damaged=True)
    daemon = NodeDaemon(config, w3=parts.w3, manifest=parts.manifest, account=parts.account,
                        store=parts.store, stream=stream, progress=progress, stop=stop)
    if config.metrics_port is not None:
        port = telemetry.serve(config.metrics_port, config.metrics_host)
        log.info("%s: metrics on http://%s:%d/metrics", config.name, config.metrics_host, port)
    log.info("%s: node %s on chain %d (%s)", config.name, parts.account.address, parts.manifest.chain_id,
             parts.manifest.rpc_url)
    try:
        if once:
            daemon.ensure_registered()
            daemon.step()
            return 0
        daemon.run()
    finally:
        parts.lock.release()
    return 0


def wait_until(predicate, timeout: float, interval: float = 0.2) -> bool:
    """Poll ``predicate`` until it holds or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())
