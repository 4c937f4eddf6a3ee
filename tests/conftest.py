"""Shared chain fixtures: one real anvil per test session, isolated per test by snapshots.

``anvil_devnet`` (session) starts anvil on a free port; ``chain_deployment`` (session) deploys
the contracts on it once (account 0 governance, account 1 aggregator, FinalityGadget with
accounts 16..19 when its source exists). ``anvil`` / ``chain_env`` (function) take an
``evm_snapshot`` before the test and ``evm_revert`` after, so every test starts from the same
freshly deployed chain. ``embedded_env`` does the same on the in-process py-evm chain.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from eth_account.signers.local import LocalAccount
from web3 import Web3
from web3.types import TxReceipt

from prismesh.chain.evm.contracts import (
    Coordinator,
    Registry,
    RewardToken,
    TaskParams,
    Weighting,
    make_commitment,
)
from prismesh.chain.evm.deploy import deploy_to_devnet
from prismesh.chain.evm.devnet import (
    AnvilDevnet,
    Devnet,
    EmbeddedDevnet,
    start_anvil,
    start_embedded,
)
from prismesh.chain.evm.manifest import Manifest


@dataclass
class ChainEnv:
    """A deployed chain and its cast: governance (0), aggregator (1), clients (2..9),
    outsiders (10..15, never registered by fixtures), validators (16..19)."""

    devnet: Devnet
    manifest: Manifest

    @property
    def w3(self) -> Web3:
        return self.devnet.w3

    @property
    def governance(self) -> LocalAccount:
        return self.devnet.accounts[0]

    @property
    def aggregator(self) -> LocalAccount:
        return self.devnet.accounts[1]

    @property
    def clients(self) -> list[LocalAccount]:
        return self.devnet.accounts[2:10]

    @property
    def outsiders(self) -> list[LocalAccount]:
        return self.devnet.accounts[10:16]

    @property
    def validators(self) -> list[LocalAccount]:
        return self.devnet.accounts[16:20]

    def registry(self, sender: LocalAccount | None = None) -> Registry:
        return Registry(self.manifest, self.w3, sender or self.governance)

    def coordinator(self, sender: LocalAccount | None = None) -> Coordinator:
        return Coordinator(self.manifest, self.w3, sender or self.governance)

    def token(self, sender: LocalAccount | None = None) -> RewardToken:
        return RewardToken(self.manifest, self.w3, sender or self.governance)


def _deploy(dev: Devnet) -> Manifest:
    validators = [a.address for a in dev.accounts[16:20]]
    return deploy_to_devnet(dev, validators=validators, aggregators=[dev.accounts[1].address])


@pytest.fixture(scope="session")
def anvil_devnet() -> Iterator[AnvilDevnet]:
    """One anvil for the whole session (free port, no state file)."""
    dev = start_anvil()
    try:
        yield dev
    finally:
        dev.stop()


@pytest.fixture(scope="session")
def chain_deployment(anvil_devnet: AnvilDevnet) -> Manifest:
    """The contracts deployed once on the session anvil (before any per-test snapshot)."""
    return _deploy(anvil_devnet)


@pytest.fixture
def anvil(anvil_devnet: AnvilDevnet, chain_deployment: Manifest) -> Iterator[AnvilDevnet]:
    """The session anvil, reverted to its post-deployment state after the test."""
    snap = anvil_devnet.snapshot()
    try:
        yield anvil_devnet
    finally:
        anvil_devnet.revert(snap)


@pytest.fixture
def chain_env(anvil: AnvilDevnet, chain_deployment: Manifest) -> ChainEnv:
    """Deployed contracts on the session anvil, isolated per test."""
    return ChainEnv(anvil, chain_deployment)


@pytest.fixture(scope="session")
def embedded_session() -> tuple[EmbeddedDevnet, Manifest]:
    dev = start_embedded()
    return dev, _deploy(dev)


@pytest.fixture
def embedded_env(embedded_session: tuple[EmbeddedDevnet, Manifest]) -> Iterator[ChainEnv]:
    """Deployed contracts on the in-process chain, isolated per test."""
    dev, manifest = embedded_session
    snap = dev.snapshot()
    try:
        yield ChainEnv(dev, manifest)
    finally:
        dev.revert(snap)


# ----------------------------------------------------------------------------- helpers
# Plain functions for contract tests (import from tests.conftest).

DESCRIPTOR = bytes.fromhex("11" * 32)


def onboard(env: ChainEnv, clients: list[LocalAccount]) -> None:
    """Register and approve ``clients``."""
    reg = env.registry()
    for c in clients:
        reg.with_sender(c).register(DESCRIPTOR)
        reg.approve(c.address)


def task_params(**overrides: object) -> TaskParams:
    """Small-task defaults; override any field by name (an initial adapter CID without its
    sha256 gets a made-up one)."""
    values: dict[str, object] = dict(
        base_model_id="tiny-qwen3",
        base_model_hash=hashlib.sha256(b"tiny-qwen3").digest(),
        hyper_params_cid="bafkreihyperparams",
        initial_adapter_cid="",
        initial_adapter_sha256=b"\x00" * 32,
        num_rounds=3,
        max_failed_rounds=1,
        min_participants=2,
        max_participants=4,
        weighting=Weighting.SAMPLES,
        sample_cap=1_000,
        commit_duration=600,
        reveal_duration=300,
        aggregation_duration=600,
        reward_per_update=10,
        aggregator_reward=3,
        reward_budget=1_000,
    )
    values.update(overrides)
    if values["initial_adapter_cid"] and "initial_adapter_sha256" not in overrides:
        values["initial_adapter_sha256"] = hashlib.sha256(str(values["initial_adapter_cid"]).encode()).digest()
    return TaskParams(**values)  # type: ignore[arg-type]


def open_task(
    env: ChainEnv, clients: list[LocalAccount], start: bool = True, **overrides: object
) -> int:
    """Onboard ``clients``, create a task, let them join, start it; returns the task id."""
    onboard(env, clients)
    coord = env.coordinator()
    task = coord.task_id_from(coord.create_task(task_params(**overrides)))
    for c in clients:
        coord.with_sender(c).join_task(task)
    if start:
        coord.start_task(task)
    return task


@dataclass(frozen=True)
class Update:
    """One client's update for one round of one task on one deployment, with its commitment."""

    client: LocalAccount
    task: int
    round: int
    cid: str
    sha256: bytes
    num_samples: int
    salt: bytes
    chain_id: int
    coordinator: str

    @property
    def commitment(self) -> bytes:
        return make_commitment(
            self.chain_id, self.coordinator, self.task, self.round, self.client.address,
            self.cid, self.sha256, self.num_samples, self.salt,
        )  # fmt: skip

    def but(self, **changes: object) -> Update:
        """A copy with some fields changed (a tampered or replayed update)."""
        return replace(self, **changes)  # type: ignore[arg-type]


def make_update(
    env: ChainEnv, client: LocalAccount, task: int, rnd: int, num_samples: int = 100, tag: str = ""
) -> Update:
    """A made-up update with content (CID and sha256) unique to client, task, round and tag."""
    ident = f"{client.address}-{task}-{rnd}-{tag}".encode()
    return Update(
        client=client,
        task=task,
        round=rnd,
        cid="bafy" + hashlib.sha256(b"cid" + ident).hexdigest()[:40],
        sha256=hashlib.sha256(b"sha" + ident).digest(),
        num_samples=num_samples,
        salt=hashlib.sha256(b"salt" + ident).digest(),
        chain_id=env.devnet.chain_id,
        coordinator=env.manifest.address("Coordinator"),
    )


def commit(env: ChainEnv, task: int, rnd: int, upd: Update) -> TxReceipt:
    return env.coordinator(upd.client).commit_update(task, rnd, upd.commitment)


def reveal(env: ChainEnv, task: int, rnd: int, upd: Update) -> TxReceipt:
    return env.coordinator(upd.client).reveal_update(
        task, rnd, upd.cid, upd.sha256, upd.num_samples, upd.salt
    )


def commit_reveal_all(
    env: ChainEnv, task: int, rnd: int, clients: list[LocalAccount]
) -> list[Update]:
    updates = [make_update(env, c, task, rnd, 100 + i) for i, c in enumerate(clients)]
    for u in updates:
        commit(env, task, rnd, u)
    for u in updates:
        reveal(env, task, rnd, u)
    return updates


def tiny_federation_inputs(root: Path) -> tuple[Path, list]:
    """A small synthetic benchmark and a one-layer random Qwen3 whose tokenizer covers it: the
    shared inputs of the end-to-end federation tests (in-process and multi-process)."""
    from prismesh.node.basemodel import build_random_model
    from prismesh.node.data import load_jsonl
    from prismesh.node.synthetic import make_benchmark

    clients = make_benchmark(root / "data", seed=0, scale=0.05)
    texts = []
    for c in clients:
        for m in load_jsonl(c.train_path)[:50] + load_jsonl(c.test_path)[:20]:
            texts.append(m.question + " " + " ".join(m.options.values()))
    base = build_random_model(root / "base", texts, seed=0, hidden_size=32, layers=1)
    return base, clients
