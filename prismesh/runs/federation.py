"""A whole federation in one process: a devnet with its finality committee, the embedded store,
one node daemon per hospital and the aggregator daemon.

The chain is the embedded py-evm chain (nothing to start; the tests) or an anvil whose state
lives in a file under the federation's directory (the demo: the chain outlives the run, so
``prismesh audit`` and ``prismesh govern status`` work on it afterwards). Either way the
committee runs in this process and is stepped in turn with the daemons. Each role still talks
to the others only through the chain (final events, transactions) and the store (CIDs), exactly
as separate hosts would.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("prismesh.federation")


# Devnet account roles (the committee's certificate submitter is the last account, an auditor
# the one before it).
GOVERNANCE, AGGREGATOR, FIRST_CLIENT = 0, 1, 2


@dataclass
class Hospital:
    """One client site: its name, its local data files and its node daemon."""

    name: str
    train_path: Path
    test_path: Path
    daemon: Any = None
    free_rider: str | None = None


@dataclass
class TaskSettings:
    """On-chain task parameters the demo chooses (durations in seconds of chain time).

    ``sample_cap`` bounds what a client may claim; ``weighting`` is ``samples`` (capped claims)
    or ``uniform``."""

    num_rounds: int = 3
    min_participants: int = 2
    commit_duration: int = 3600
    reveal_duration: int = 3600
    aggregation_duration: int = 3600
    reward_per_update: int = 10 * 10**18
    aggregator_reward: int = 2 * 10**18
    max_failed_rounds: int = 2
    sample_cap: int = 4096
    weighting: str = "samples"


def make_stream(devnet: Any, manifest: Any, names: tuple[str, ...], cursor_path: Path | None,
                finality: bool = True) -> Any:
    """The finality-aware stream of coordinator events, the only event source of a daemon."""
    from prismesh.chain.finality.coordinator_stream import open_final_stream

    return open_final_stream(devnet.w3, manifest, names, cursor_path, finality=finality)


class Federation:
    """Sets up and drives an in-process federation on the embedded chain."""

    def __init__(self, root: Path, *, n_validators: int = 4, finality: bool = True, parallel: bool = True,
                 chain: str = "embedded") -> None:
        from prismesh.chain.evm.deploy import deploy_to_devnet
        from prismesh.chain.evm.devnet import start_anvil, start_embedded
        from prismesh.chain.finality.committee import devnet_validator_keys, in_process_committee
        from prismesh.chain.storage import open_store

        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        if chain == "embedded":
            self.devnet = start_embedded()
        elif chain == "anvil":
            self.devnet = start_anvil(state_file=self.state_file)
        else:
            raise ValueError(f"chain must be 'embedded' or 'anvil', got {chain!r}")
        self.w3 = self.devnet.w3
        self.accounts = self.devnet.accounts
        self.finality = finality
        self.parallel = parallel
        keys = devnet_validator_keys(n=n_validators)
        self.validator_keys = keys
        self.manifest = deploy_to_devnet(
            self.devnet,
            validators=[k.address for k in keys],
            aggregators=[self.accounts[AGGREGATOR].address],
            manifest_path=self.root / "manifest.json",
        )
        self.committee = in_process_committee(self.devnet, self.manifest.to_json(), keys=keys) if finality else None
        self.store_spec = f"embedded:{self.root / 'ipfs'}"
        self.store = open_store(self.store_spec)
        self.hospitals: list[Hospital] = []
        self.aggregator: Any = None
        self.auditor: Any = None
        self._evaluators: dict[tuple[str, str], Any] = {}

    @property
    def state_file(self) -> Path:
        """Where an anvil federation keeps its chain (written when the federation closes)."""
        return self.root / "chain" / "anvil-state.json"

    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    # ------------------------------------------------------------------ roles

    @property
    def governance(self) -> Any:
        return self.accounts[GOVERNANCE]

    def coordinator(self, account: Any = None) -> Any:
        from prismesh.chain.evm.contracts import Coordinator

        return Coordinator(self.manifest, self.w3, account or self.governance)

    def registry(self, account: Any = None) -> Any:
        from prismesh.chain.evm.contracts import Registry

        return Registry(self.manifest, self.w3, account or self.governance)

    def add_hospital(self, name: str, train_path: Path, test_path: Path, base_model: Path, *, device: str = "cpu",
                     progress: bool = False, free_rider: str | None = None, attack: Any = None,
                     node_class: type | None = None) -> Hospital:
        """A hospital's node; with ``free_rider`` (one of ``FREE_RIDER_KINDS``) a participant
        that does no training and submits that kind of copy or junk instead. With ``attack`` (a
        ``prismesh.runs.attacks.Attack``) the node is malicious: it trains on ``train_path`` (the
        attacker's data) and publishes the attack's adapter; the rest of its protocol is the
        honest node's. ``node_class`` replaces the node daemon's class (a misbehaving node in a
        test)."""
        from prismesh.node.daemon import NODE_EVENTS, NodeConfig, NodeDaemon

        index = FIRST_CLIENT + len(self.hospitals)
        if index >= len(self.accounts) - 2:
            raise ValueError(f"no devnet account left for hospital {name!r}")
        account = self.accounts[index]
        state_dir = self.root / "nodes" / name
        cfg = NodeConfig(
            name=name,
            manifest=self.root / "manifest.json",
            keystore=f"dev:{index}",
            base_model=base_model,
            train_data=train_path,
            test_data=test_path,
            state_dir=state_dir,
            store=self.store_spec,
            descriptor={"institution": name, "kind": "hospital"},
            finality=self.finality,
            device=device,
        )
        stream = make_stream(self.devnet, self.manifest, NODE_EVENTS, state_dir / "cursor.json", self.finality)
        kwargs = dict(w3=self.w3, manifest=self.manifest, account=account, store=self.store, stream=stream, progress=progress)
        if node_class is not None:
            daemon = node_class(cfg, **kwargs)
        elif free_rider is not None:
            daemon = free_rider_node(free_rider)(cfg, **kwargs)
        elif attack is not None:
            from prismesh.runs.attacks import MaliciousNode

            daemon = MaliciousNode(cfg, attack=attack, **kwargs)
        else:
            daemon = NodeDaemon(cfg, **kwargs)
        # The hospitals of this process take turns, so they share one loaded base model for
        # evaluating aggregates instead of loading one each.
        daemon.evaluator = lambda: self.shared_evaluator(base_model, device)
        hospital = Hospital(name, train_path, test_path, daemon, free_rider)
        self.hospitals.append(hospital)
        return hospital

    def shared_evaluator(self, base_model: Path, device: str) -> Any:
        """One ``Evaluator`` per base model and device for every hospital of this federation."""
        key = (str(Path(base_model).resolve()), device)
        if key not in self._evaluators:
            from prismesh.node.evaluate import Evaluator

            self._evaluators[key] = Evaluator(base_model, device=device)
        return self._evaluators[key]

    def add_aggregator(self) -> Any:
        from prismesh.aggregator.daemon import AGGREGATOR_EVENTS, AggregatorConfig, AggregatorDaemon

        state_dir = self.root / "aggregator"
        cfg = AggregatorConfig(
            manifest=self.root / "manifest.json",
            keystore=f"dev:{AGGREGATOR}",
            state_dir=state_dir,
            store=self.store_spec,
            finality=self.finality,
            parallel=self.parallel,
            # One host shared with the nodes' training; a round's small updates are one Ray task.
            ray_num_cpus=1,
        )
        stream = make_stream(self.devnet, self.manifest, AGGREGATOR_EVENTS, state_dir / "cursor.json", self.finality)
        self.aggregator = AggregatorDaemon(
            cfg, w3=self.w3, manifest=self.manifest, account=self.accounts[AGGREGATOR],
            store=self.store, store_spec=self.store_spec, stream=stream,
        )
        self.aggregator.publish_encryption_key()
        return self.aggregator

    def add_auditor(self) -> tuple[Any, Any]:
        """An auditor the consortium appoints: governance grants it the auditor role and it
        publishes its X25519 key (derived from its devnet key). Returns (account, private key);
        name ``account.address`` among a task's ``privacy.recipients`` to let it read updates."""
        from prismesh.chain.evm.contracts import Registry
        from prismesh.chain.sealing import box_key_from_signing_key, public_key_bytes

        account = self.accounts[len(self.accounts) - 2]
        self.registry().add_auditor(account.address)
        key = box_key_from_signing_key(bytes(account.key))
        Registry(self.manifest, self.w3, account).set_encryption_key(public_key_bytes(key))
        self.auditor = (account, key)
        return self.auditor

    def descriptors(self) -> list[dict[str, Any]]:
        """The institution descriptors the hospitals register (their keccak hashes go on chain)."""
        return [{"name": h.daemon.config.name, **h.daemon.config.descriptor} for h in self.hospitals]

    def approve_all(self) -> None:
        """Each node registers itself; governance approves it (the institution vetting step)."""
        reg = self.registry()
        for h in self.hospitals:
            h.daemon.ensure_registered()
            if not reg.is_approved(h.daemon.address):
                reg.approve(h.daemon.address)

    # ------------------------------------------------------------------ tasks

    def create_task(self, spec: Any, settings: TaskSettings, initial_adapter: Path | None = None) -> int:
        """Pin the task's hyper-parameter file (and initial adapter), create the task on chain."""
        from prismesh.chain.evm.contracts import TaskParams
        from prismesh.chain.storage import add_adapter
        from prismesh.node.daemon import file_sha256

        spec_cid = self.store.add_bytes(spec.to_bytes())
        init_cid, init_sha = "", b""
        if initial_adapter is not None:
            init_cid = add_adapter(self.store, initial_adapter)
            init_sha = file_sha256(Path(initial_adapter) / "adapter_model.safetensors")
        params = TaskParams.for_spec(
            spec,
            spec_cid,
            init_cid,
            init_sha,
            num_rounds=settings.num_rounds,
            min_participants=settings.min_participants,
            max_participants=max(len(self.hospitals), settings.min_participants),
            max_failed_rounds=settings.max_failed_rounds,
            commit_duration=settings.commit_duration,
            reveal_duration=settings.reveal_duration,
            aggregation_duration=settings.aggregation_duration,
            reward_per_update=settings.reward_per_update,
            aggregator_reward=settings.aggregator_reward,
            sample_cap=settings.sample_cap,
            weighting=settings.weighting,
        )
        coord = self.coordinator()
        receipt = coord.create_task(params)
        return coord.task_id_from(receipt)

    def finalize(self) -> int:
        """Let the committee finalize every block mined so far (no-op without finality)."""
        if self.committee is None:
            return int(self.w3.eth.block_number)
        return self.committee.run_until_final()

    def step(self) -> int:
        """One pass: finality, then every node, then the aggregator; returns actions taken.

        One finality wait per step, plus one more only when the nodes mined something the
        aggregator has to see final in the same step (their reveals)."""
        self.finalize()
        head = int(self.w3.eth.block_number)
        actions = 0
        for h in self.hospitals:
            actions += h.daemon.step()
        if int(self.w3.eth.block_number) != head:
            self.finalize()
        if self.aggregator is not None:
            actions += self.aggregator.step()
        return actions

    def run_task(self, task_id: int, *, start_when_joined: bool = True, timeout: float = 3600.0,
                 on_step: Callable[[], None] | None = None) -> Any:
        """Drive the federation until the task completes, fails or is cancelled."""
        from prismesh.chain.evm.contracts import TaskStatus

        coord = self.coordinator()
        deadline = time.monotonic() + timeout
        idle = 0
        while time.monotonic() < deadline:
            state = coord.get_task(task_id)
            if state.status == TaskStatus.CREATED and start_when_joined and state.participant_count >= len(self.hospitals):
                coord.start_task(task_id)
                log.info("task %d started with %d participants", task_id, state.participant_count)
                continue
            if state.status in (TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED):
                self.finalize()
                for h in self.hospitals:  # let nodes report metrics on the last aggregate
                    h.daemon.step()
                self.finalize()
                return state
            acted = self.step()
            if on_step is not None:
                on_step()
            idle = idle + 1 if acted == 0 else 0
            if idle > 3:
                # Nothing moves: let chain time pass so deadline-driven phases can advance.
                self.devnet.increase_time(60)
                self.devnet.mine()
                idle = 0
        raise TimeoutError(f"task {task_id} did not finish within {timeout:.0f} s")

    def close(self) -> None:
        if self.aggregator is not None:
            self.aggregator.close()
        try:
            self.devnet.stop()
        except Exception:  # noqa: BLE001 - closing is best effort
            pass


def model_config_of(base_model: Path) -> dict[str, Any]:
    """The base model's config.json, as the task spec carries it for shape checks."""
    return json.loads((Path(base_model) / "config.json").read_text())


# ---------------------------------------------------------------------------- free riders

FREE_RIDER_KINDS = ("copy-global", "copy-peer", "perturb", "noise")


def free_rider_node(kind: str) -> type:
    """A node daemon class that joins, commits and reveals like any other but never trains:

    * ``copy-global``: the round's global adapter itself;
    * ``copy-peer``: the previous round's best-scored update of another participant (the global in
      round 1);
    * ``perturb``: the global plus Gaussian noise of 1e-3 of its factors' spread;
    * ``noise``: Gaussian factors with the spread of the global's (a plausible-looking adapter).

    The weights file carries the free rider's own metadata, so its bytes (and sha256) are new and
    the chain's copy checks pass: what is left to stop it is the contribution score. It always
    claims the task's sample cap (the most weight it can get)."""
    if kind not in FREE_RIDER_KINDS:
        raise ValueError(f"unknown free-rider kind {kind!r}; known: {', '.join(FREE_RIDER_KINDS)}")
    from prismesh.node.daemon import NodeDaemon

    class FreeRiderNode(NodeDaemon):
        def _train_and_pin(self, task: int, rnd: int, global_cid: str, spec: Any, rec: dict) -> dict:
            cid = rec.get("cid")
            if cid and self.store.has(cid):
                return rec
            tensors = self._fake_tensors(task, rnd, global_cid)
            cid, sha = self._pin(task, rnd, global_cid, tensors)
            rec = {"stage": "pinned", "cid": cid, "sha256": sha, "free_rider": kind,
                   "num_samples": int(self.task_params(task).sample_cap)}
            self.state.section("rounds")[f"{task}:{rnd}"] = rec
            self.state.save()
            log.info("%s: task %d round %d: free rider (%s) pinned %s", self.config.name, task, rnd, kind, cid)
            return rec

        def _fake_tensors(self, task: int, rnd: int, global_cid: str) -> dict[str, Any]:
            import numpy as np

            from prismesh.aggregator.adapters import load_adapter

            if not global_cid:
                raise ValueError("a free rider needs a task with an initial adapter")
            glob = load_adapter(self.fetch_global(global_cid)).as_numpy().tensors
            seed = hashlib.sha256(f"{self.address}/{task}/{rnd}/{kind}".encode()).digest()
            rng = np.random.default_rng(int.from_bytes(seed[:8], "big"))
            if kind == "copy-peer" and rnd > 1:
                # The previous round's best-scored peer update: the most valuable thing to copy.
                start = self.manifest.deploy_block
                peers = {ev.client: ev for ev in self.coordinator.get_events(
                    "UpdateRevealed", start, taskId=task, round=rnd - 1) if ev.client != self.address}
                scores = {ev.recipient: ev.score for ev in self.coordinator.get_events(
                    "RewardEarned", start, taskId=task, round=rnd - 1) if ev.recipient in peers}
                if peers:
                    best = max(sorted(peers), key=lambda c: scores.get(c, -1))
                    return dict(load_adapter(self.fetch_global(peers[best].cid)).as_numpy().tensors)
            if kind in ("copy-global", "copy-peer"):
                return dict(glob)
            # Each kind of factor gets the spread the global's factors of that kind have (the
            # global's B is all zero at the start: then B gets A's spread).
            spread = {}
            for suffix in ("lora_A.weight", "lora_B.weight"):
                values = [t.ravel() for k, t in glob.items() if k.endswith(suffix)]
                spread[suffix] = float(np.std(np.concatenate(values))) if values else 0.0
            spread["lora_B.weight"] = spread["lora_B.weight"] or spread["lora_A.weight"]
            out = {}
            for key, t in sorted(glob.items()):
                sigma = next((v for suffix, v in spread.items() if key.endswith(suffix)), float(np.std(t)))
                if kind == "perturb":
                    out[key] = (t + rng.standard_normal(t.shape) * 1e-3 * sigma).astype(t.dtype)
                else:
                    out[key] = (rng.standard_normal(t.shape) * sigma).astype(t.dtype)
            return out

        def _pin(self, task: int, rnd: int, global_cid: str, tensors: dict[str, Any]) -> tuple[str, str]:
            from prismesh.aggregator.adapters import (
                SAFETENSORS_METADATA,
                WEIGHTS_NAME,
                Adapter,
                load_adapter,
                save_adapter,
                serialize_safetensors,
            )
            from prismesh.chain.storage import add_adapter
            from prismesh.node.daemon import file_sha256

            config = load_adapter(self.fetch_global(global_cid)).config
            out = save_adapter(Adapter(config, tensors), self.config.state_dir / "adapters" / f"task{task}-round{rnd}")
            meta = {**SAFETENSORS_METADATA, "origin": f"{self.address}/{task}/{rnd}"}
            (out / WEIGHTS_NAME).write_bytes(serialize_safetensors(tensors, meta))
            return add_adapter(self.store, out), file_sha256(out / WEIGHTS_NAME).hex()

    FreeRiderNode.__name__ = f"FreeRiderNode[{kind}]"
    return FreeRiderNode


def reward_shares(fed: Federation, task_id: int) -> list[dict[str, Any]]:
    """Per accepted round, each participant's score, reward and reward relative to the median
    honest reward (0 when the participant was not included), read from the chain's events."""
    import statistics

    coord = fed.coordinator()
    start = fed.manifest.deploy_block
    rows = []
    earned: dict[int, dict[str, Any]] = {}
    for ev in coord.get_events("RewardEarned", start, taskId=task_id):
        if not ev.is_aggregator:
            earned.setdefault(ev.round, {})[ev.recipient] = ev
    for acc in coord.get_events("AggregateAccepted", start, taskId=task_id):
        got = earned.get(acc.round, {})
        honest = [int(got[h.daemon.address].amount) if h.daemon.address in got else 0
                  for h in fed.hospitals if h.free_rider is None]
        median = statistics.median(honest) if honest else 0
        for h in fed.hospitals:
            ev = got.get(h.daemon.address)
            amount = int(ev.amount) if ev else 0
            rows.append({
                "round": acc.round,
                "name": h.name,
                "kind": h.free_rider or "honest",
                "included": ev is not None,
                "score": int(ev.score) if ev else 0,
                "reward": amount,
                "share_of_honest_median": amount / median if median else 0.0,
            })
    return rows
