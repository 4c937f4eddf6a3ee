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
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eth_account.messages import encode_defunct
from eth_utils import keccak

from prismesh.chain import telemetry
from prismesh.chain.localstate import (
    RetryDelay,
    StateFile,
    check_fields,
    read_config,
    resolve_account_spec,
    resolve_path,
)

log = logging.getLogger("prismesh.node")


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
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"

    @classmethod
    def load(cls, path: Path) -> NodeConfig:
        return cls.from_dict(read_config(path), base=path.parent, where=str(path))

    @classmethod
    def from_dict(cls, data: dict[str, Any], base: Path = Path("."), where: str = "node config") -> NodeConfig:
        required = ("name", "manifest", "keystore", "base_model", "train_data", "state_dir")
        check_fields(data, set(cls.__dataclass_fields__), required, where)
        values = dict(data)
        for key in ("manifest", "base_model", "train_data", "state_dir", "test_data"):
            if values.get(key):
                values[key] = resolve_path(values[key], base)
        values["keystore"] = resolve_account_spec(str(values["keystore"]), base)
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
        self._stop = threading.Event()
        self._specs: dict[int, Any] = {}
        self._data: tuple[list, list] | None = None
        self._evaluator: Any = None
        self._fingerprint: str | None = None
        telemetry.actor(self.address, "node", config.name)

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
        return bool(self.registry.is_approved(self.address))

    # ------------------------------------------------------------------ loop

    def step(self) -> int:
        """Handle every newly final event once and push committed rounds forward.

        Returns how many actions were taken (0 when idle)."""
        actions = 0
        for event in self.stream.poll():
            actions += self._handle(event)
            self.stream.ack(event)
        actions += self._advance_pending()
        telemetry.observe_finality("node", self.config.name, self.stream, self.w3)
        return actions

    def run(self) -> None:
        """Run until SIGTERM/SIGINT; a signal finishes the current step, then returns."""
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
            except Exception:  # noqa: BLE001 - an unreachable chain at start-up is waited out
                log.exception("%s: could not check the registration; retrying", self.config.name)
                delay = retry.next()
            if self._stop.wait(delay):
                log.info("%s: stopped cleanly", self.config.name)
                return
        log.info("%s: approved; following final events", self.config.name)
        while not self._stop.is_set():
            try:
                acted = self.step()
            except Exception as exc:  # noqa: BLE001 - the failed step is retried from the durable cursor
                telemetry.retry("node", self.config.name, exc)
                delay = retry.next()
                log.exception("%s: step failed; retrying in %.0f s from the last handled event", self.config.name, delay)
                self.stream.rewind()
                self._stop.wait(delay)
                continue
            retry.reset()
            if acted == 0:
                self._stop.wait(self.config.poll_interval)
        log.info("%s: stopped cleanly", self.config.name)

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
            return self._advance_pending()
        if name == "AggregateAccepted":
            return self._on_aggregate(ev)
        if name == "RoundFailed":
            log.warning("%s: task %d round %d failed: %s", self.config.name, ev.task_id, ev.round, ev.reason)
        elif name == "TaskCompleted":
            log.info("%s: task %d completed; final adapter %s", self.config.name, ev.task_id, ev.final_adapter_cid)
        if name in ("TaskCompleted", "TaskFailed", "TaskCancelled"):
            return self._claim(ev.task_id)
        return 0

    def _claim(self, task: int) -> int:
        """Mint the rewards this node's updates earned in a finished task (once)."""
        owed = self.coordinator.rewards_owed(task, self.address)
        if owed == 0:
            return 0
        self.coordinator.claim_rewards(task)
        log.info("%s: task %d: claimed %d reward units", self.config.name, task, owed)
        return 1

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
        log.info("%s: joined task %d", self.config.name, ev.task_id)
        return 1

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
        task, rnd = ev.task_id, ev.round
        if not self.coordinator.is_participant(task, self.address):
            log.info("%s: task %d round %d opened; skipping: not a participant of this task", self.config.name, task, rnd)
            return 0
        key = f"{task}:{rnd}"
        rec = self.state.section("rounds").get(key, {})
        if rec.get("stage") in ("committed", "revealed", "missed"):
            log.info("%s: task %d round %d: skipping the opening event: this round is already %s",
                     self.config.name, task, rnd, rec["stage"])
            return 0
        params = self.coordinator.get_task_params(task)
        spec = self.task_spec(task, params.hyper_params_cid)
        log.info("%s: task %d round %d opened (global %s)", self.config.name, task, rnd, ev.global_adapter_cid or "fresh")
        rec = self._train_and_pin(task, rnd, ev.global_adapter_cid, spec, rec)
        self._commit(task, rnd, rec)
        return 1

    def _on_aggregate(self, ev: Any) -> int:
        task, rnd = ev.task_id, ev.round
        if not self.coordinator.is_participant(task, self.address):
            return 0
        key = f"{task}:{rnd}"
        reports = self.state.section("metrics")
        if key in reports:
            return 0
        params = self.coordinator.get_task_params(task)
        spec = self.task_spec(task, params.hyper_params_cid)
        if not spec.report_metrics:
            return 0
        from prismesh.chain.evm.contracts import ContractRevert

        adapter = self.fetch_global(ev.aggregate_cid)
        _, test = self.local_data(spec)
        acc = self.evaluator().accuracy(adapter, test, scoring=spec.metric_scoring)
        try:
            self.coordinator.report_metric(task, rnd, "accuracy", acc)
        except ContractRevert as exc:
            if exc.error_name != "MetricAlreadyReported":
                raise
        reports[key] = {"accuracy": acc, "aggregate_cid": ev.aggregate_cid}
        self.state.save()
        log.info("%s: task %d round %d aggregate accuracy on local test set %.3f", self.config.name, task, rnd, acc)
        return 1

    # ------------------------------------------------------------------ round work

    def _train_and_pin(self, task: int, rnd: int, global_cid: str, spec: Any, rec: dict) -> dict:
        from prismesh.chain.storage import add_adapter
        from prismesh.node.trainer import TrainConfig, train_lora

        cid = rec.get("cid")
        if cid and self.store.has(cid):
            log.info("%s: task %d round %d: re-using pinned adapter %s", self.config.name, task, rnd, cid)
            return rec
        init = self.fetch_global(global_cid) if global_cid else None
        train, _ = self.local_data(spec)
        cfg = TrainConfig.from_dict({**spec.train_config(), "device": self.config.device})
        out = self.config.state_dir / "adapters" / f"task{task}-round{rnd}"
        if out.exists():
            shutil.rmtree(out)
        log.info("%s: task %d round %d: training on %d local samples", self.config.name, task, rnd, len(train))
        result = train_lora(
            self.config.base_model, train, out, cfg, init_adapter=init, progress=self.progress,
            base_model_name=spec.base_model_id,
        )
        cid = add_adapter(self.store, result.adapter_dir)
        cap = self.coordinator.get_task_params(task).sample_cap
        rec = {
            "stage": "pinned",
            "cid": cid,
            "sha256": file_sha256(result.adapter_dir / "adapter_model.safetensors").hex(),
            # The claim the task allows: the local count, up to the task's cap.
            "num_samples": min(int(result.num_samples), int(cap)),
            "trained_samples": int(result.num_samples),
            "train_seconds": float(result.metrics.get("seconds", 0.0)),
            "metrics": {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))},
        }
        self.state.section("rounds")[f"{task}:{rnd}"] = rec
        self.state.save()
        telemetry.round_joined(self.config.name, rec["train_seconds"])
        if telemetry.enabled():
            telemetry.uploaded(self.config.name, self.store.stat(cid).cumulative_size)
        log.info("%s: task %d round %d: adapter pinned as %s", self.config.name, task, rnd, cid)
        return rec

    def salt(self, task: int, rnd: int) -> bytes:
        """A secret, reproducible salt: a hash of this key's signature over the round's identity."""
        text = f"prismesh-commit-salt/{self.manifest.chain_id}/{self.coordinator.address}/{task}/{rnd}"
        sig = self.account.sign_message(encode_defunct(text=text)).signature
        return keccak(bytes(sig))

    def _commit(self, task: int, rnd: int, rec: dict) -> None:
        from prismesh.chain.evm.contracts import ContractRevert, make_commitment

        sub = self.coordinator.get_submission(task, rnd, self.address)
        commitment = make_commitment(
            self.manifest.chain_id, self.coordinator.address, task, rnd, self.address,
            rec["cid"], bytes.fromhex(rec["sha256"]), rec["num_samples"], self.salt(task, rnd),
        )  # fmt: skip
        if not sub.committed:
            try:
                self.coordinator.commit_update(task, rnd, commitment)
            except ContractRevert as exc:
                rec["stage"] = "missed"
                rec["reason"] = str(exc)
                self.state.save()
                log.warning("%s: task %d round %d: commit refused: %s", self.config.name, task, rnd, exc)
                return
            log.info("%s: task %d round %d: committed", self.config.name, task, rnd)
        elif bytes(sub.commitment) != commitment:
            log.error("%s: task %d round %d: an unknown commitment is on chain; not revealing", self.config.name, task, rnd)
            rec["stage"] = "missed"
            self.state.save()
            return
        rec["stage"] = "committed"
        self.state.save()

    def _advance_pending(self) -> int:
        """Reveal every committed update whose round has reached its reveal phase."""
        from prismesh.chain.evm.contracts import ContractRevert, Phase

        done = 0
        for key, rec in sorted(self.state.section("rounds").items()):
            if rec.get("stage") != "committed":
                continue
            task, rnd = (int(x) for x in key.split(":"))
            sub = self.coordinator.get_submission(task, rnd, self.address)
            if sub.revealed:
                rec["stage"] = "revealed"
                self.state.save()
                continue
            phase = self.coordinator.phase_of(task, rnd)
            if phase < Phase.REVEAL:
                continue
            if phase > Phase.REVEAL:
                rec["stage"] = "missed"
                rec["reason"] = f"round moved to {phase.name} before the reveal"
                self.state.save()
                log.warning("%s: task %d round %d: %s", self.config.name, task, rnd, rec["reason"])
                continue
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

    # ------------------------------------------------------------------ local resources

    def task_spec(self, task_id: int, cid: str) -> Any:
        from prismesh.chain.taskspec import TaskSpec

        if task_id not in self._specs:
            raw = self.store.cat(cid)
            self._specs[task_id] = TaskSpec.from_bytes(raw, where=f"hyper-parameter file {cid}")
        return self._specs[task_id]

    def fetch_global(self, cid: str) -> Path:
        from prismesh.chain.storage import fetch_adapter

        dest = self.config.state_dir / "global" / cid
        if not dest.exists():
            fetch_adapter(self.store, cid, dest)
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
    "TaskFailed", "TaskCancelled",
)


def run_node(config_path: Path, *, once: bool = False, progress: bool = True, metrics_port: int | None = None,
             metrics_host: str | None = None) -> int:
    """``prismesh node --config FILE``: connect, register, then follow final events until SIGTERM.
    ``metrics_port`` / ``metrics_host`` override the config's."""
    from dataclasses import replace

    from prismesh.chain.evm.manifest import connect, load_manifest
    from prismesh.chain.finality.coordinator_stream import open_final_stream
    from prismesh.chain.identity import load_daemon_account
    from prismesh.chain.storage import open_store

    config = NodeConfig.load(config_path)
    if metrics_port is not None:
        config = replace(config, metrics_port=metrics_port)
    if metrics_host is not None:
        config = replace(config, metrics_host=metrics_host)
    account = load_daemon_account(config.keystore)
    manifest = load_manifest(config.manifest)
    if config.rpc_url:
        manifest = replace(manifest, rpc_url=config.rpc_url)
    w3 = connect(manifest)
    store = open_store(config.store)
    stream = open_final_stream(w3, manifest, NODE_EVENTS, config.state_dir / "cursor.json", finality=config.finality)
    daemon = NodeDaemon(config, w3=w3, manifest=manifest, account=account, store=store, stream=stream, progress=progress)
    if config.metrics_port is not None:
        port = telemetry.serve(config.metrics_port, config.metrics_host)
        log.info("%s: metrics on http://%s:%d/metrics", config.name, config.metrics_host, port)
    log.info("%s: node %s on chain %d (%s)", config.name, account.address, manifest.chain_id, manifest.rpc_url)
    if once:
        daemon.ensure_registered()
        daemon.step()
        return 0
    daemon.run()
    return 0


def wait_until(predicate, timeout: float, interval: float = 0.2) -> bool:
    """Poll ``predicate`` until it holds or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())
