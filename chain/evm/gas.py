"""Gas report: full rounds with 3 and with 32 participants on anvil, every other external call
once, and each per-client and per-aggregate figure beside its target.

Targets (issue "contributions that cannot be faked"): commit + reveal at most 150,000 gas per
client per round, and an aggregate at most 80,000 + 30,000 per included client. Every external
state-changing function of the contracts is called at least once with realistic arguments
(CIDv1 strings, 32-byte hashes), and the gas used by each receipt is tabulated per contract and
function. The run is deterministic (fixed salts and inputs), so the figures only change when
the contracts or the compiler settings change.
"""

from __future__ import annotations

import base64
import hashlib
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from statistics import mean
from typing import Any

from prismesh.chain.evm.toolchain import EVM_VERSION, OPTIMIZER_RUNS, SOLC_VERSION

COMMIT_REVEAL_TARGET = 150_000
AGGREGATE_FIXED_TARGET = 80_000
AGGREGATE_PER_CLIENT_TARGET = 30_000
SIZES = (3, 32)
ROUNDS = 2


def _cid(tag: str) -> str:
    """A well-formed CIDv1 (dag-pb, sha2-256, base32: "bafybei...") of the length Kubo prints
    for a directory, so calldata and event costs are those of real CIDs."""
    raw = bytes([0x01, 0x70, 0x12, 0x20]) + hashlib.sha256(tag.encode()).digest()
    return "b" + base64.b32encode(raw).decode().lower().rstrip("=")


def aggregate_target(included: int) -> int:
    """The gas an aggregate of ``included`` clients may use."""
    return AGGREGATE_FIXED_TARGET + AGGREGATE_PER_CLIENT_TARGET * included


@dataclass
class Scenario:
    """Gas of one task with ``clients`` participants, every one included in every round."""

    clients: int
    commits: list[list[int]] = field(default_factory=list)  # [round][client]
    reveals: list[list[int]] = field(default_factory=list)
    aggregates: list[int] = field(default_factory=list)  # [round]

    def commit_reveal(self) -> list[int]:
        """commit + reveal of every client in every round."""
        return [c + r for cs, rs in zip(self.commits, self.reveals, strict=True) for c, r in zip(cs, rs, strict=True)]

    def rows(self) -> list[tuple[str, int, int, int]]:
        """(figure, measured, target, clients) rows; each measured figure is the worst case."""
        out = [("commit + reveal per client per round (max)", max(self.commit_reveal()), COMMIT_REVEAL_TARGET)]
        for i, gas in enumerate(self.aggregates, start=1):
            out.append((f"aggregate, round {i}", gas, aggregate_target(self.clients)))
        return [(what, gas, target, self.clients) for what, gas, target in out]


@dataclass
class GasReport:
    """Gas used per (contract, function), in call order of first appearance, and the scenarios."""

    calls: dict[tuple[str, str], list[int]] = field(default_factory=lambda: defaultdict(list))
    scenarios: dict[int, Scenario] = field(default_factory=dict)
    chain: str = ""

    def record(self, contract: str, function: str, receipt: Any) -> int:
        gas = int(receipt["gasUsed"])
        self.calls[(contract, function)].append(gas)
        return gas

    def rows(self) -> list[tuple[str, str, int, int, int, int]]:
        return [(c, f, len(g), min(g), round(mean(g)), max(g)) for (c, f), g in self.calls.items()]

    def target_rows(self) -> list[tuple[str, int, int, int]]:
        """(figure, measured, target, clients) for every scenario."""
        return [row for n in sorted(self.scenarios) for row in self.scenarios[n].rows()]

    def on_target(self) -> bool:
        return all(gas <= target for _, gas, target, _ in self.target_rows())

    def per_included_client(self) -> int | None:
        """The marginal aggregate cost of one more included client, from the smallest and the
        largest scenario's last round (None with a single scenario)."""
        if len(self.scenarios) < 2:
            return None
        lo, hi = self.scenarios[min(self.scenarios)], self.scenarios[max(self.scenarios)]
        return round((hi.aggregates[-1] - lo.aggregates[-1]) / (hi.clients - lo.clients))

    def round_total(self, clients: int = 3) -> int:
        """Gas of round 1 of the ``clients`` scenario: every commit, reveal and the aggregate."""
        s = self.scenarios[clients]
        return sum(s.commits[0]) + sum(s.reveals[0]) + s.aggregates[0]

    def markdown(self) -> str:
        lines = [
            "# Gas report",
            "",
            f"Measured by `prismesh gas-report` on {self.chain}: solc {SOLC_VERSION}, optimizer on "
            f"({OPTIMIZER_RUNS} runs), evmVersion {EVM_VERSION}. Gas is the receipt's `gasUsed` "
            "(21,000 intrinsic gas included). Generated: edit `chain/evm/gas.py`, not this file.",
            "",
            "## Targets",
            "",
            f"Tasks with {' and '.join(str(n) for n in sorted(self.scenarios))} participants run "
            f"{ROUNDS} rounds each; every participant commits, reveals and is included with its "
            "own contribution score. The first aggregate also creates the aggregator's fee "
            "record (its storage starts at zero); later ones only update it.",
            "",
            "| Clients | Figure | Measured | Target | |",
            "| ---: | --- | ---: | ---: | --- |",
        ]
        for what, gas, target, n in self.target_rows():
            mark = "within" if gas <= target else "**over**"
            lines.append(f"| {n} | {what} | {gas:,} | {target:,} | {mark} ({gas / target:.0%}) |")
        per_client = self.per_included_client()
        if per_client is not None:
            lines.append(f"| {min(self.scenarios)}→{max(self.scenarios)} | aggregate, gas per additional "
                         f"included client (round 2) | {per_client:,} | {AGGREGATE_PER_CLIENT_TARGET:,} | "
                         f"{'within' if per_client <= AGGREGATE_PER_CLIENT_TARGET else '**over**'} "
                         f"({per_client / AGGREGATE_PER_CLIENT_TARGET:.0%}) |")
        lines += [
            "",
            f"One 3-client round (3 commits + 3 reveals + 1 aggregate): **{self.round_total(3):,} gas**.",
            "",
            "## Every external call",
            "",
            "| Contract | Function | Calls | Min | Mean | Max |",
            "| --- | --- | ---: | ---: | ---: | ---: |",
        ]
        for c, f, n, lo, avg, hi in self.rows():
            lines.append(f"| {c} | {f} | {n} | {lo:,} | {avg:,} | {hi:,} |")
        lines += [
            "",
            "Notes: the first commit of a round also moves it Open -> Commit, and the last commit "
            "or reveal moves it to Reveal or Aggregating (one more storage write and event). "
            "`submitAggregate` credits each included client's reward to its participant record "
            "(written at join, so the credit never creates a storage slot) and opens the next "
            "round; the tokens are minted once per task by `claimRewards` (and `claimFees` for "
            "aggregators). `joinTask` pays for the participant's storage up front. CIDs travel "
            "only in events; storage keeps their hashes. Sealed updates (docs/privacy.md) cost "
            "nothing more per round: the reveal carries the ciphertext's CID and the plaintext "
            "weights' hash in the same fields; each identity pays `setEncryptionKey` once. "
            "`multicall` is a node's metric report sent with its next commitment, as the nodes "
            "send them: one transaction's base cost less than `reportMetric` and `commitUpdate` apart.",
            "",
        ]
        return "\n".join(lines)


def _fund(dev: Any, funder: Any, accounts: Sequence[Any]) -> None:
    """Give gas money to derived accounts the devnet did not fund (not recorded)."""
    from prismesh.chain.evm.contracts import TxSender

    sender = TxSender(dev.w3, funder)
    for a in accounts:
        if dev.w3.eth.get_balance(a.address) < 10**18:
            sender.send({"to": a.address, "value": 10 * 10**18, "gas": 21_000})


def _scenario(report: GasReport, dev: Any, manifest: Any, gov: Any, agg: Any, clients: list[Any],
              rounds: int) -> tuple[int, Any]:
    """Register, approve and enrol ``clients`` in a new task and run ``rounds`` full rounds."""
    from prismesh.chain.evm.contracts import Coordinator, Registry, TaskParams, Weighting

    rec = report.record
    reg = Registry(manifest, dev.w3, gov)
    coord = Coordinator(manifest, dev.w3, gov)
    n = len(clients)
    for i, c in enumerate(clients):
        rec("Registry", "register", reg.with_sender(c).register(hashlib.sha3_256(f"hospital-{n}-{i}".encode()).digest()))
        rec("Registry", "approve", reg.approve(c.address))
        # Each identity publishes the X25519 key it receives sealed aggregates on, once.
        rec("Registry", "setEncryptionKey",
            reg.with_sender(c).set_encryption_key(hashlib.sha256(f"x25519-{n}-{i}".encode()).digest()))
    params = TaskParams(
        base_model_id="Qwen/Qwen3-0.6B",
        base_model_hash=hashlib.sha256(b"base-model").digest(),
        hyper_params_cid=_cid("hyper"),
        initial_adapter_cid=_cid("initial"),
        initial_adapter_sha256=hashlib.sha256(b"initial").digest(),
        num_rounds=rounds + 1,
        max_failed_rounds=2,
        min_participants=2,
        max_participants=n,
        weighting=Weighting.SAMPLES,
        sample_cap=5_000,
        commit_duration=3600,
        reveal_duration=600,
        aggregation_duration=1800,
        reward_per_update=10 * 10**18,
        aggregator_reward=5 * 10**18,
        reward_budget=(10 * n + 5) * (rounds + 1) * 10**18,
    )
    receipt = coord.create_task(params)
    rec("Coordinator", "createTask", receipt)
    task = coord.task_id_from(receipt)
    for c in clients:
        rec("Coordinator", "joinTask", coord.with_sender(c).join_task(task))
    rec("Coordinator", "startTask", coord.start_task(task))

    scenario = Scenario(n)
    for rnd in range(1, rounds + 1):
        reveals, commits = [], []
        for i, c in enumerate(clients):
            tag = f"{n}-{rnd}-{i}"
            cid, sha = _cid(f"update-{tag}"), hashlib.sha256(f"adapter-{tag}".encode()).digest()
            salt = hashlib.sha256(f"salt-{tag}".encode()).digest()
            samples = 1000 + 100 * i
            mine = coord.with_sender(c)
            commitment = mine.commitment_for(task, rnd, cid, sha, samples, salt)
            commits.append(rec("Coordinator", "commitUpdate", mine.commit_update(task, rnd, commitment)))
            reveals.append((mine, cid, sha, samples, salt))
        scenario.commits.append(commits)
        scenario.reveals.append([
            rec("Coordinator", "revealUpdate", mine.reveal_update(task, rnd, cid, sha, samples, salt))
            for mine, cid, sha, samples, salt in reveals
        ])
        scores = {c.address: 1_000_000 - 20_000 * i for i, c in enumerate(clients)}
        receipt = coord.with_sender(agg).submit_aggregate(
            task, rnd, _cid(f"aggregate-{n}-{rnd}"), hashlib.sha256(f"agg-{n}-{rnd}".encode()).digest(), scores
        )
        scenario.aggregates.append(rec("Coordinator", "submitAggregate", receipt))
    report.scenarios[n] = scenario
    return task, params


def run_gas_report(devnet: Any | None = None, sizes: Sequence[int] = SIZES, rounds: int = ROUNDS) -> GasReport:
    """Run the scenarios on ``devnet`` (a fresh anvil when None, stopped afterwards)."""
    from prismesh.chain.evm.contracts import Coordinator, Registry, RewardToken
    from prismesh.chain.evm.deploy import deploy
    from prismesh.chain.evm.devnet import dev_accounts, start_anvil

    own = devnet is None
    dev = devnet if devnet is not None else start_anvil()
    report = GasReport(chain=f"{dev.kind} (chain id {dev.chain_id})")
    try:
        gov, agg, extra = dev.accounts[0], dev.accounts[1], dev.accounts[5]
        validators = [a.address for a in dev.accounts[16:20]]
        manifest = deploy(
            dev.w3, gov, validators=validators, aggregators=[agg.address], kind=dev.kind,
            rpc_url=dev.rpc_url, on_receipt=report.record, admin_delay=3600,
        )
        reg = Registry(manifest, dev.w3, gov)
        coord = Coordinator(manifest, dev.w3, gov)
        token = RewardToken(manifest, dev.w3, gov)
        rec = report.record

        # Clients: devnet accounts 2..4 for the 3-client task, derived accounts beyond the
        # devnet's 20 for the larger one (funded here).
        pool = dev_accounts(20 + max(sizes))[20:]
        _fund(dev, gov, pool)
        tasks = {}
        for n in sizes:
            clients = list(dev.accounts[2:5]) if n == 3 else pool[:n]
            tasks[n] = (_scenario(report, dev, manifest, gov, agg, clients, rounds), clients)

        (task, params), clients = tasks[min(sizes)]
        c0 = clients[0]
        for i, c in enumerate(clients):
            rec("Coordinator", "reportMetric", coord.with_sender(c).report_metric(task, 1, "accuracy", 0.61 + 0.01 * i))
        rec("Coordinator", "claimRewards", coord.with_sender(c0).claim_rewards(task))
        rec("Coordinator", "claimFees", coord.with_sender(agg).claim_fees())

        # The last round: governance suspends one client mid-round, and the others' phases
        # close without waiting for it; the aggregator vanishes and anyone fails the round
        # once its aggregation deadline passed.
        rnd = rounds + 1
        late = []
        for i, c in enumerate(clients[:-1]):
            cid, sha, salt = _cid(f"late-{i}"), hashlib.sha256(f"late-{i}".encode()).digest(), bytes([i + 1]) * 32
            mine = coord.with_sender(c)
            commitment = mine.commitment_for(task, rnd, cid, sha, 100, salt)
            if i == 0:  # a node's metric report rides with its next commitment
                rec("Coordinator", "multicall", mine.send_calls([
                    mine.metric_call(task, rounds, "accuracy", 0.7), ("commitUpdate", (task, rnd, commitment))]))
            else:
                mine.commit_update(task, rnd, commitment)
            late.append((mine, cid, sha, salt))
        rec("Registry", "suspend", reg.suspend(clients[-1].address))
        rec("Coordinator", "advancePhase", coord.with_sender(extra).advance_phase(task, rnd))
        for mine, cid, sha, salt in late:
            mine.reveal_update(task, rnd, cid, sha, 100, salt)
        dev.increase_time(params.commit_duration + params.reveal_duration + params.aggregation_duration + 1)
        rec("Coordinator", "failRound", coord.with_sender(extra).fail_round(task, rnd, "aggregator vanished"))
        rec("Coordinator", "cancelTask", coord.cancel_task(task, "gas report done"))
        rec("Registry", "approve", reg.approve(clients[-1].address))

        # Registry paths: descriptors, revocation, the two-step admin transfer.
        rec("Registry", "register", reg.with_sender(extra).register(hashlib.sha256(b"extra").digest()))
        rec("Registry", "updateDescriptor", reg.with_sender(extra).update_descriptor(hashlib.sha256(b"new").digest()))
        rec("Registry", "revoke", reg.revoke(extra.address))
        rec("Registry", "grantRole", reg.add_aggregator(extra.address))
        rec("Registry", "changeDefaultAdminDelay", reg.change_default_admin_delay(7200))
        rec("Registry", "rollbackDefaultAdminDelay", reg.rollback_default_admin_delay())
        rec("Registry", "beginDefaultAdminTransfer", reg.begin_default_admin_transfer(extra.address))
        rec("Registry", "cancelDefaultAdminTransfer", reg.cancel_default_admin_transfer())
        rec("Registry", "beginDefaultAdminTransfer", reg.begin_default_admin_transfer(extra.address))
        dev.increase_time(3601)
        dev.mine()
        rec("Registry", "acceptDefaultAdminTransfer", reg.with_sender(extra).accept_default_admin_transfer())
        rec("Registry", "revokeRole", reg.with_sender(extra).remove_aggregator(extra.address))
        rec("Registry", "renounceRole", reg.renounce_role(reg.governance_role(), gov.address))

        # ERC-20 transfers of a claimed reward.
        rec("RewardToken", "transfer", token.with_sender(c0).transfer(extra.address, 10**18))
        rec("RewardToken", "approve", token.with_sender(c0).approve(extra.address, 10**18))
        rec("RewardToken", "transferFrom", token.with_sender(extra).transfer_from(c0.address, extra.address, 10**18))
    finally:
        if own:
            dev.stop()
    return report


def write_report(report: GasReport, path: Path) -> Path:
    """Write the markdown table atomically."""
    import os
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        fh.write(report.markdown())
    os.replace(tmp, path)
    return path
