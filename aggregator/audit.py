"""``prismesh audit``: re-derive a task's whole history from the chain and the store alone.

For every round it checks that each revealed adapter's bytes match its CID and its revealed
sha256, that the aggregate is exactly what the task's strategy computes from the included
adapters with the task's bounded weights (same bytes, so the same CID), that every included
client's contribution score is what ``aggregator.contribution`` computes from those adapters,
that every reward is the contract's split of the round's pool by those scores (and that no
one else earned anything), that the task never paid beyond its budget, and that every finality
certificate carries a quorum of valid validator signatures over the chain's own block hash.
Nothing is taken from the daemons' local state.
"""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Finding:
    """One check: what was checked, whether it held, and the detail an auditor needs."""

    check: str
    subject: str
    ok: bool
    detail: str = ""


@dataclass
class AuditReport:
    task_id: int
    findings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.findings) and all(f.ok for f in self.findings)

    def add(self, check: str, subject: str, ok: bool, detail: str = "") -> None:
        self.findings.append(Finding(check, subject, ok, detail))

    def failures(self) -> list[Finding]:
        return [f for f in self.findings if not f.ok]

    def render(self) -> str:
        lines = [f"audit of task {self.task_id}: {'PASS' if self.ok else 'FAIL'} "
                 f"({len(self.findings) - len(self.failures())}/{len(self.findings)} checks hold)"]
        for f in self.findings:
            mark = "ok  " if f.ok else "FAIL"
            lines.append(f"  {mark} {f.check:<22} {f.subject}" + (f" — {f.detail}" if f.detail else ""))
        return "\n".join(lines)


def _sha256(path: Path) -> bytes:
    return hashlib.sha256(path.read_bytes()).digest()


def audit_task(w3: Any, manifest: Any, store: Any, task_id: int, *, check_finality: bool = True) -> AuditReport:
    """Run every check for ``task_id``; never raises on a failed check, only records it."""
    from prismesh.aggregator.adapters import load_adapter, save_adapter
    from prismesh.aggregator.contribution import published_before, score_updates
    from prismesh.aggregator.history import Contribution, aggregation_base, round_updates
    from prismesh.aggregator.strategies import aggregate, get_strategy
    from prismesh.aggregator.weights import WeightRule
    from prismesh.chain.evm.contracts import Coordinator
    from prismesh.chain.storage import StorageError, cid_of_path, fetch_adapter
    from prismesh.chain.taskspec import TaskSpec

    report = AuditReport(task_id)
    coord = Coordinator.read_only(manifest, w3)
    start = manifest.deploy_block
    params = coord.get_task_params(task_id)
    try:
        spec = TaskSpec.from_bytes(store.cat(params.hyper_params_cid))
        report.add("task spec", params.hyper_params_cid, spec.base_model_hash == bytes(params.base_model_hash),
                   "base-model hash matches the chain" if spec.base_model_hash == bytes(params.base_model_hash)
                   else "base-model hash differs from the chain's")
    except Exception as exc:  # noqa: BLE001 - recorded as a failed check
        report.add("task spec", params.hyper_params_cid, False, str(exc))
        return report

    opened = {ev.round: ev for ev in coord.get_events("RoundOpened", start, taskId=task_id)}
    reveals: dict[int, dict[str, Any]] = {}
    for ev in coord.get_events("UpdateRevealed", start, taskId=task_id):
        reveals.setdefault(ev.round, {})[ev.client] = ev
    accepted = coord.get_events("AggregateAccepted", start, taskId=task_id)
    if not accepted:
        report.add("rounds", f"task {task_id}", False, "no accepted aggregate on chain")
    rule = WeightRule.of_task(params)
    over = [f"round {r} {c}" for r, by in reveals.items() for c, ev in by.items() if ev.num_samples > params.sample_cap]
    report.add("claims within cap", f"task {task_id}", not over,
               f"sample cap {params.sample_cap}" + (f"; above it: {over}" if over else ""))
    earned: dict[int, list[Any]] = {}
    for ev in coord.get_events("RewardEarned", start, taskId=task_id):
        earned.setdefault(ev.round, []).append(ev)
    scored: dict[int, dict[str, int]] = {}

    included = {(acc.round, c) for acc in accepted for c in acc.included}
    for ev in coord.get_events("RoundFailed", start, taskId=task_id):
        report.add("round outcome", f"round {ev.round}", True, f"failed on chain: {ev.reason}")

    with tempfile.TemporaryDirectory(prefix="prismesh-audit-") as tmp:
        work = Path(tmp)
        adapters: dict[str, Any] = {}
        problems: dict[str, str] = {}
        for r, by_client in sorted(reveals.items()):
            for client, ev in sorted(by_client.items()):
                subject = f"round {r} {client} {ev.cid}"
                # A node may reveal the same adapter in a retried round: fetched once.
                if ev.cid not in adapters and ev.cid not in problems:
                    try:
                        adapters[ev.cid] = fetch_adapter(store, ev.cid, work / "updates" / ev.cid)
                    except StorageError as exc:
                        problems[ev.cid] = str(exc)
                d = adapters.get(ev.cid)
                digest = _sha256(d / "adapter_model.safetensors") if d is not None else None
                if (r, client) not in included:
                    # Not part of any accepted aggregate (its round failed, or the aggregator
                    # excluded it): nothing anyone was paid for or built on depends on it.
                    state = problems.get(ev.cid) or (
                        "intact" if digest == bytes(ev.sha256) else "stored bytes differ from the revealed sha256")
                    report.add("adapter (excluded)", subject, True, f"not in an accepted aggregate; {state}")
                    continue
                if d is None:
                    report.add("adapter vs CID", subject, False, problems[ev.cid])
                    continue
                report.add("adapter vs CID", subject, True)
                report.add("adapter vs sha256", subject, digest == bytes(ev.sha256),
                           "" if digest == bytes(ev.sha256) else f"stored {digest.hex()} != revealed {bytes(ev.sha256).hex()}")

        strategy = get_strategy(spec.strategy, **spec.strategy_options)
        state = None  # a server optimiser's state, rebuilt round by round as the daemon does
        state_known = True
        for acc in accepted:
            r = acc.round
            subject = f"round {r} aggregate {acc.aggregate_cid}"
            missing = [c for c in acc.included if c not in reveals.get(r, {})]
            if missing:
                report.add("included revealed", subject, False, f"included without a reveal: {missing}")
                state_known = False
                continue
            refs = [reveals[r][c] for c in acc.included]
            if any(ref.cid not in adapters for ref in refs):
                report.add("aggregate recomputed", subject, False, "an included adapter could not be fetched intact")
                state_known = False
                continue
            if strategy.stateful and not state_known:
                report.add("aggregate recomputed", subject, False,
                           f"{strategy.name}'s state cannot be rebuilt past an earlier round that failed its checks")
                continue
            try:
                global_cid = opened[r].global_adapter_cid if r in opened else ""
                gdir = work / "global" / global_cid
                if global_cid and not gdir.exists():
                    fetch_adapter(store, global_cid, gdir)
                glob = aggregation_base(spec, load_adapter(gdir) if global_cid else None)
                contributions = [Contribution(ref.client, ref.cid, int(ref.num_samples)) for ref in refs]
                updates = round_updates(contributions, adapters, rule)
                result = aggregate(strategy, updates, glob, state)
                state = result.state
                out = save_adapter(result.adapter, work / "recomputed" / f"round{r}")
                cid = cid_of_path(out)
                known = published_before(coord, store, task_id, r, work / "published")
                scored[r] = score_updates(updates, glob, known)
            except Exception as exc:  # noqa: BLE001 - recorded as a failed check
                report.add("aggregate recomputed", subject, False, f"{type(exc).__name__}: {exc}")
                state_known = False
                continue
            same = cid == acc.aggregate_cid
            report.add("aggregate recomputed", subject, same, "" if same else f"recomputed CID {cid}")
            digest = _sha256(out / "adapter_model.safetensors")
            report.add("aggregate sha256", subject, digest == bytes(acc.aggregate_sha256))
            try:
                store.verify(acc.aggregate_cid)
                report.add("aggregate stored", subject, True)
            except StorageError as exc:
                report.add("aggregate stored", subject, False, str(exc))

    _audit_rewards(report, params, accepted, earned, scored)
    if check_finality:
        _audit_finality(w3, manifest, report, [a.block_number for a in accepted])
    return report


def _audit_rewards(report: AuditReport, params: Any, accepted: list[Any], earned: dict[int, list[Any]],
                   scored: dict[int, dict[str, int]]) -> None:
    """Every reward re-derived: recomputed scores, the contract's split of each round's pool by
    the on-chain scores within the budget left, nothing for anyone not included."""
    from prismesh.aggregator.contribution import split_pool

    paid = 0
    for acc in sorted(accepted, key=lambda a: a.round):
        r = acc.round
        subject = f"round {r} rewards"
        events = earned.get(r, [])
        clients = {ev.recipient: ev for ev in events if not ev.is_aggregator}
        fees = [ev for ev in events if ev.is_aggregator]
        strangers = sorted(set(clients) - set(acc.included))
        missing = sorted(set(acc.included) - set(clients))
        report.add("rewards only included", subject, not strangers and not missing and len(fees) == 1,
                   (f"earned without inclusion: {strangers}; " if strangers else "")
                   + (f"included without a reward record: {missing}; " if missing else "")
                   + f"{len(fees)} aggregator fee record(s)")
        on_chain = {c: int(ev.score) for c, ev in clients.items()}
        if r in scored:
            # Tolerance of one unit in a million: another BLAS may round the last bit apart.
            off = {c: (on_chain.get(c), s) for c, s in scored[r].items() if abs(on_chain.get(c, -9) - s) > 1}
            report.add("scores recomputed", subject, not off,
                       "scores " + ", ".join(f"{c[:10]}={s}" for c, s in sorted(scored[r].items()))
                       + (f"; on chain vs recomputed differ: {off}" if off else ""))
        remaining = params.reward_budget - paid
        expected = split_pool(on_chain, params.reward_per_update, remaining)
        wrong = {c: (int(ev.amount), expected.get(c)) for c, ev in clients.items() if int(ev.amount) != expected.get(c)}
        clients_paid = sum(expected.values())
        fee = min(params.aggregator_reward, remaining - clients_paid)
        fee_ok = len(fees) == 1 and int(fees[0].amount) == fee
        report.add("rewards recomputed", subject, not wrong and fee_ok,
                   f"pool split {clients_paid} + fee {fee}" + (f"; on chain vs contract rule: {wrong}" if wrong else "")
                   + ("" if fee_ok else f"; fee on chain {[int(f.amount) for f in fees]}"))
        paid += sum(int(ev.amount) for ev in events)
    report.add("within budget", "task rewards", paid <= params.reward_budget,
               f"{paid} earned of a budget of {params.reward_budget}")


def _audit_finality(w3: Any, manifest: Any, report: AuditReport, accepted_blocks: list[int]) -> None:
    """Every BlockFinalized certificate: quorum of distinct validator signatures, real block hash."""
    from eth_keys import keys as eth_keys

    from prismesh.chain.finality.gadget import FinalityGadgetClient, commit_digest

    if not manifest.finality_gadget:
        report.add("finality", "deployment", False, "the manifest names no finality gadget")
        return
    gadget = FinalityGadgetClient(w3, manifest.finality_gadget)
    validators = set(gadget.validators())
    quorum = gadget.quorum()
    events = gadget.contract.events.BlockFinalized.get_logs(from_block=manifest.deploy_block)
    heights = []
    for log in events:
        tx = w3.eth.get_transaction(log["transactionHash"])
        _, args = gadget.contract.decode_function_input(tx["input"])
        height, block_hash, view = int(args["height"]), bytes(args["blockHash"]), int(args["viewNumber"])
        subject = f"height {height}"
        digest = commit_digest(int(w3.eth.chain_id), gadget.address, height, block_hash, view)
        signers = set()
        bad = []
        for claimed, sig in zip(args["signers"], args["signatures"], strict=True):
            sig = bytes(sig)
            try:
                v = sig[64] - 27 if sig[64] >= 27 else sig[64]
                pub = eth_keys.Signature(vrs=(v, int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:64], "big"))).recover_public_key_from_msg_hash(digest)
                who = pub.to_checksum_address()
            except Exception:  # noqa: BLE001 - a malformed signature is a failed check
                bad.append(claimed)
                continue
            if who != claimed or who not in validators:
                bad.append(claimed)
            else:
                signers.add(who)
        chain_hash = bytes(w3.eth.get_block(height)["hash"])
        ok = len(signers) >= quorum and not bad and chain_hash == block_hash
        detail = f"{len(signers)}/{len(validators)} valid signatures (quorum {quorum})"
        if bad:
            detail += f"; invalid from {bad}"
        if chain_hash != block_hash:
            detail += f"; block hash {block_hash.hex()} != chain's {chain_hash.hex()}"
        report.add("finality certificate", subject, ok, detail)
        heights.append(height)
    top = max(heights, default=0)
    for b in accepted_blocks:
        report.add("aggregate final", f"block {b}", b <= top, f"final height {top}")
