"""Gas report: one full 3-client round (plus the governance and failure paths) on anvil.

Every external state-changing function of the three contracts is called at least once with
realistic arguments (CIDv1 strings, 32-byte hashes), and the gas used by each receipt is
tabulated per contract and function. The run is deterministic (fixed salts and inputs), so the
table only changes when the contracts or the compiler settings change.
"""

from __future__ import annotations

import base64
import hashlib
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from statistics import mean
from typing import Any

from prismesh.chain.evm.toolchain import EVM_VERSION, OPTIMIZER_RUNS, SOLC_VERSION


def _cid(tag: str) -> str:
    """A well-formed CIDv1 (dag-pb, sha2-256, base32: "bafybei...") of the length Kubo prints
    for a directory, so string storage costs are those of real CIDs."""
    raw = bytes([0x01, 0x70, 0x12, 0x20]) + hashlib.sha256(tag.encode()).digest()
    return "b" + base64.b32encode(raw).decode().lower().rstrip("=")


@dataclass
class GasReport:
    """Gas used per (contract, function), in call order of first appearance."""

    calls: dict[tuple[str, str], list[int]] = field(default_factory=lambda: defaultdict(list))
    chain: str = ""

    def record(self, contract: str, function: str, receipt: Any) -> None:
        self.calls[(contract, function)].append(int(receipt["gasUsed"]))

    def rows(self) -> list[tuple[str, str, int, int, int, int]]:
        return [(c, f, len(g), min(g), round(mean(g)), max(g)) for (c, f), g in self.calls.items()]

    def round_total(self) -> int:
        """Gas of one full round for 3 clients: 3 commits, 3 reveals, 1 aggregate."""
        c = self.calls
        per = [
            sum(c[("Coordinator", "commitUpdate")][:3]),
            sum(c[("Coordinator", "revealUpdate")][:3]),
            c[("Coordinator", "submitAggregate")][0],
        ]
        return sum(per)

    def markdown(self) -> str:
        lines = [
            "# Gas report",
            "",
            f"Measured by `prismesh gas-report` on {self.chain}: solc {SOLC_VERSION}, optimizer on "
            f"({OPTIMIZER_RUNS} runs), evmVersion {EVM_VERSION}. One task with 3 clients and a "
            "full round (join, commit, reveal, aggregate with rewards, metric reports), then the "
            "registry's governance paths, a failed round and a cancelled task. Gas is the "
            "receipt's `gasUsed` (21,000 intrinsic gas included).",
            "",
            "| Contract | Function | Calls | Min | Mean | Max |",
            "| --- | --- | ---: | ---: | ---: | ---: |",
        ]
        for c, f, n, lo, avg, hi in self.rows():
            lines.append(f"| {c} | {f} | {n} | {lo:,} | {avg:,} | {hi:,} |")
        lines += [
            "",
            f"One 3-client round (3 commits + 3 reveals + 1 aggregate): **{self.round_total():,} gas**.",
            "",
            "Notes: the first commit of a round also moves it Open -> Commit, and the last commit "
            "or reveal moves it to Reveal or Aggregating (one more storage write and event); "
            "`submitAggregate` mints one reward per included client plus the aggregator's and "
            "opens the next round in the same transaction.",
            "",
        ]
        return "\n".join(lines)


def run_gas_report(devnet: Any | None = None) -> GasReport:
    """Run the scenario on ``devnet`` (a fresh anvil when None, stopped afterwards)."""
    from prismesh.chain.evm.contracts import (
        Coordinator,
        Registry,
        RewardToken,
        TaskParams,
        make_commitment,
    )
    from prismesh.chain.evm.deploy import deploy
    from prismesh.chain.evm.devnet import start_anvil

    own = devnet is None
    dev = devnet if devnet is not None else start_anvil()
    report = GasReport(chain=f"{dev.kind} (chain id {dev.chain_id})")
    try:
        gov, agg = dev.accounts[0], dev.accounts[1]
        clients = dev.accounts[2:5]
        extra = dev.accounts[5]
        validators = [a.address for a in dev.accounts[16:20]]
        manifest = deploy(
            dev.w3,
            gov,
            validators=validators,
            kind=dev.kind,
            rpc_url=dev.rpc_url,
            on_receipt=report.record,
        )
        reg = Registry(manifest, dev.w3, gov)
        coord = Coordinator(manifest, dev.w3, gov)
        token = RewardToken(manifest, dev.w3, gov)
        rec = report.record

        rec("Registry", "grantRole", reg.add_aggregator(agg.address))
        for i, c in enumerate(clients + [extra]):
            rec(
                "Registry",
                "register",
                reg.with_sender(c).register(hashlib.sha3_256(f"hospital-{i}".encode()).digest()),
            )
            rec("Registry", "approve", reg.approve(c.address))

        params = TaskParams(
            base_model_id="Qwen/Qwen3-0.6B",
            base_model_hash=hashlib.sha256(b"base-model").digest(),
            hyper_params_cid=_cid("hyper"),
            initial_adapter_cid="",
            num_rounds=3,
            min_participants=2,
            max_participants=8,
            max_failed_rounds=1,
            commit_duration=3600,
            reveal_duration=600,
            reward_per_update=10 * 10**18,
            aggregator_reward=5 * 10**18,
            reward_budget=1000 * 10**18,
        )
        receipt = coord.create_task(params)
        rec("Coordinator", "createTask", receipt)
        task = coord.task_id_from(receipt)
        for c in clients:
            rec("Coordinator", "joinTask", coord.with_sender(c).join_task(task))
        rec("Coordinator", "startTask", coord.start_task(task))

        reveals = []
        for i, c in enumerate(clients):
            cid, sha = _cid(f"update-{i}"), hashlib.sha256(f"adapter-{i}".encode()).digest()
            salt = hashlib.sha256(f"salt-{i}".encode()).digest()
            n = 1000 + 100 * i
            rec(
                "Coordinator",
                "commitUpdate",
                coord.with_sender(c).commit_update(
                    task, 1, make_commitment(cid, sha, n, salt, c.address)
                ),
            )
            reveals.append((c, cid, sha, n, salt))
        for c, cid, sha, n, salt in reveals:
            rec(
                "Coordinator",
                "revealUpdate",
                coord.with_sender(c).reveal_update(task, 1, cid, sha, n, salt),
            )
        included = [c.address for c in clients]
        rec(
            "Coordinator",
            "submitAggregate",
            coord.with_sender(agg).submit_aggregate(
                task, 1, _cid("aggregate-1"), hashlib.sha256(b"agg-1").digest(), included
            ),
        )
        for i, c in enumerate(clients):
            rec(
                "Coordinator",
                "reportMetric",
                coord.with_sender(c).report_metric(task, 1, "accuracy", 0.61 + 0.01 * i),
            )

        # Round 2 fails: nobody commits before the deadline, so anyone may fail it.
        dev.increase_time(params.commit_duration + params.reveal_duration + 1)
        rec(
            "Coordinator",
            "failRound",
            coord.with_sender(extra).fail_round(task, 2, "no updates before the deadline"),
        )
        rec("Coordinator", "cancelTask", coord.cancel_task(task, "gas report done"))

        # Registry governance paths and ERC-20 transfers.
        rec(
            "Registry",
            "updateDescriptor",
            reg.with_sender(extra).update_descriptor(hashlib.sha256(b"new").digest()),
        )
        rec("Registry", "suspend", reg.suspend(extra.address))
        rec("Registry", "approve", reg.approve(extra.address))
        rec("Registry", "revoke", reg.revoke(extra.address))
        rec(
            "RewardToken", "transfer", token.with_sender(clients[0]).transfer(extra.address, 10**18)
        )
        rec("RewardToken", "approve", token.with_sender(clients[1]).approve(extra.address, 10**18))
        rec(
            "RewardToken",
            "transferFrom",
            token.with_sender(extra).transfer_from(clients[1].address, extra.address, 10**18),
        )
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
