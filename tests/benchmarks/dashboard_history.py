"""A synthetic consortium history written through the real contracts, for the dashboard's tests
and its benchmark: hospitals registered and approved, tasks created from real task specs in the
store, and rounds of commits, reveals, aggregates, rewards and metric reports, finalized by the
HotStuff committee.

The adapters are stand-ins (a few KiB of seeded bytes, stored, so their CIDs are real and
verifiable): what is measured is the dashboard, not training. Transactions skip the typed
clients' pre-flight call and fee look-up (``FastSender``), since this history is known to be
valid; everything else is the typed clients' own encoding.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from prismesh.chain.evm.contracts import (
    SCORE_SCALE,
    Coordinator,
    Registry,
    TaskParams,
    TransactionFailed,
    TxSender,
)
from prismesh.chain.identity import descriptor_hash
from prismesh.chain.taskspec import LoraSpec, TaskSpec

GOVERNANCE, AGGREGATOR, FIRST_CLIENT = 0, 1, 2


class FastSender(TxSender):
    """Sends with a local nonce and fixed fees: no pre-flight call, no fee look-up."""

    def __init__(self, w3: Any, account: Any, decoder: Any) -> None:
        super().__init__(w3, account, decoder)
        self._nonce: int | None = None

    def send(self, tx: dict[str, Any], contract: str | None = None, function: str | None = None) -> Any:
        if self._nonce is None:
            self._nonce = int(self.w3.eth.get_transaction_count(self.account.address, "pending"))
        tx = {**tx, "from": self.account.address, "value": tx.get("value", 0), "gas": tx.get("gas", 3_000_000),
              "maxPriorityFeePerGas": 10**9, "maxFeePerGas": 10**11, "chainId": self.chain_id, "nonce": self._nonce}
        self._nonce += 1
        tx_hash = self.w3.eth.send_raw_transaction(self.account.sign_transaction(tx).raw_transaction)
        receipt = self.w3.eth.wait_for_transaction_receipt(tx_hash, timeout=self.timeout, poll_latency=0.01)
        if receipt["status"] != 1:
            raise TransactionFailed("TransactionFailed", {"tx_hash": tx_hash.hex()}, contract=contract, function=function)
        return receipt


def fast(client: Any) -> Any:
    client._tx = FastSender(client.w3, client.sender, client.decoder)
    return client


def stand_in_adapter(store: Any, tag: str, size: int = 4096) -> tuple[str, bytes]:
    """A stored stand-in for an adapter: seeded bytes; returns (CID, sha256)."""
    seed = hashlib.sha256(tag.encode()).digest()
    data = (seed * (size // len(seed) + 1))[:size]
    return store.add_bytes(data), hashlib.sha256(data).digest()


@dataclass
class History:
    tasks: list[int] = field(default_factory=list)
    hospitals: list[str] = field(default_factory=list)
    descriptors: list[dict[str, str]] = field(default_factory=list)
    transactions: int = 0


def spec_for(task: int, strategy: str = "fedavg") -> TaskSpec:
    return TaskSpec(
        base_model_id=f"bench/model-{task % 3}",
        base_model_sha256=hashlib.sha256(f"model-{task % 3}".encode()).hexdigest(),
        lora=LoraSpec(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=("q_proj", "v_proj")),
        model_config={"model_type": "qwen3", "hidden_size": 32},
        strategy=strategy,
    )


def onboard(dev: Any, manifest: Any, n_clients: int, names: list[str] | None = None) -> History:
    history = History()
    gov = fast(Registry(manifest, dev.w3, dev.accounts[GOVERNANCE]))
    for i in range(n_clients):
        account = dev.accounts[FIRST_CLIENT + i]
        name = names[i] if names else f"hospital-{chr(ord('a') + i)}"
        descriptor = {"name": name, "kind": "hospital"}
        fast(Registry(manifest, dev.w3, account)).register(descriptor_hash(descriptor))
        gov.approve(account.address)
        history.hospitals.append(account.address)
        history.descriptors.append(descriptor)
        history.transactions += 2
    return history


def create_task(dev: Any, manifest: Any, store: Any, history: History, *, rounds: int,
                spec: TaskSpec | None = None, start: bool = True) -> int:
    gov = fast(Coordinator(manifest, dev.w3, dev.accounts[GOVERNANCE]))
    n = len(history.hospitals)
    task_no = len(history.tasks) + 1
    spec = spec or spec_for(task_no)
    spec_cid = store.add_bytes(spec.to_bytes())
    initial, initial_sha = stand_in_adapter(store, f"initial-{task_no}")
    params = TaskParams.for_spec(
        spec, spec_cid, initial, initial_sha, num_rounds=rounds, min_participants=2, max_participants=n,
        max_failed_rounds=1, commit_duration=3600, reveal_duration=3600, aggregation_duration=3600,
        reward_per_update=10 * 10**18, aggregator_reward=2 * 10**18, sample_cap=4096,
    )
    task = gov.task_id_from(gov.create_task(params))
    for i in range(n):
        fast(Coordinator(manifest, dev.w3, dev.accounts[FIRST_CLIENT + i])).join_task(task)
    if start:
        gov.start_task(task)
    history.tasks.append(task)
    history.transactions += 2 + n
    return task


def play_round(dev: Any, manifest: Any, store: Any, history: History, task: int, rnd: int, *,
               accuracy: Callable[[int, int], float] | None = None,
               on_phase: Callable[[str], None] | None = None) -> None:
    """Every hospital commits, reveals and reports; the aggregator includes them all, scoring
    hospital i at (i + 1) / n of the scale (so their rewards differ)."""
    clients = [dev.accounts[FIRST_CLIENT + i] for i in range(len(history.hospitals))]
    coord = {c.address: fast(Coordinator(manifest, dev.w3, c)) for c in clients}
    updates = {}
    for i, c in enumerate(clients):
        cid, sha = stand_in_adapter(store, f"update-{task}-{rnd}-{i}")
        salt = hashlib.sha256(f"salt-{task}-{rnd}-{i}".encode()).digest()
        samples = 100 + 10 * i
        updates[c.address] = (cid, sha, samples, salt)
        coord[c.address].commit_update(task, rnd, coord[c.address].commitment_for(task, rnd, cid, sha, samples, salt))
        if on_phase is not None and i == 0:
            on_phase("committed")
    for c in clients:
        cid, sha, samples, salt = updates[c.address]
        coord[c.address].reveal_update(task, rnd, cid, sha, samples, salt)
    aggregate, agg_sha = stand_in_adapter(store, f"aggregate-{task}-{rnd}")
    scores = {c.address: SCORE_SCALE * (i + 1) // len(clients) for i, c in enumerate(clients)}
    fast(Coordinator(manifest, dev.w3, dev.accounts[AGGREGATOR])).submit_aggregate(task, rnd, aggregate, agg_sha, scores)
    acc = accuracy or (lambda i, r: min(0.95, 0.2 + 0.1 * r + 0.03 * i))
    for i, c in enumerate(clients):
        coord[c.address].report_metric(task, rnd, "accuracy", acc(i, rnd))
    history.transactions += 3 * len(clients) + 1


def build_history(dev: Any, manifest: Any, store: Any, committee: Any, *, tasks: int, rounds: int,
                  clients: int = 3, progress: Callable[[int], None] | None = None) -> History:
    """``tasks`` completed tasks of ``rounds`` rounds each; finality after every task."""
    history = onboard(dev, manifest, clients)
    for _ in range(tasks):
        task = create_task(dev, manifest, store, history, rounds=rounds)
        for rnd in range(1, rounds + 1):
            play_round(dev, manifest, store, history, task, rnd)
        if committee is not None:
            committee.run_until_final()
        if progress is not None:
            progress(task)
    return history
