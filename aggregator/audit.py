"""``prismesh audit``: re-derive a task's whole history from the chain and the store alone.

For every round it checks that each revealed adapter's bytes match its CID and its revealed
sha256; re-runs the aggregator's checks on every revealed update (against the round's global
adapter) and the task's strategy on those that pass, with the task's bounded weights, so who was
included and why each other update was rejected or excluded is re-derived, not taken on trust;
that the aggregate is exactly what the strategy computes (same bytes, so the same CID), that
every included client's contribution score is what ``aggregator.contribution`` computes,
that every reward is the contract's split of the round's pool by those scores (and that no
one else earned anything), that the task never paid beyond its budget, and that every finality
certificate carries a quorum of valid validator signatures over the chain's own block hash.
Nothing is taken from the daemons' local state, so an update the aggregator could not fetch in
time but the audit can is reported as wrongly left out.

Sealed tasks (updates encrypted to the aggregator and the auditors): with an auditor's key
(``key``) every check above runs on the decrypted adapters, each decryption is checked against
the revealed plaintext hash, and a central-DP aggregate's noise is regenerated from the seed
sealed beside it. Without a key the audit checks everything that needs no plaintext (the
ciphertexts against their CIDs, that each is sealed for its task, round and client to the
task's recipients with the keys they published, the reward arithmetic from the on-chain scores,
the budget, finality) and lists what it could not check.
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
    unchecked: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.findings) and all(f.ok for f in self.findings)

    def add(self, check: str, subject: str, ok: bool, detail: str = "") -> None:
        self.findings.append(Finding(check, subject, ok, detail))

    def failures(self) -> list[Finding]:
        return [f for f in self.findings if not f.ok]

    def skip(self, check: str, subject: str, why: str) -> None:
        """A check that could not run (e.g. it needs plaintext and no key was given)."""
        self.unchecked.append(Finding(check, subject, False, why))

    def render(self) -> str:
        partial = f"; {len(self.unchecked)} not checked" if self.unchecked else ""
        lines = [f"audit of task {self.task_id}: {'PASS' if self.ok else 'FAIL'} "
                 f"({len(self.findings) - len(self.failures())}/{len(self.findings)} checks hold{partial})"]
        for f in self.findings:
            mark = "ok  " if f.ok else "FAIL"
            lines.append(f"  {mark} {f.check:<22} {f.subject}" + (f" — {f.detail}" if f.detail else ""))
        for f in self.unchecked:
            lines.append(f"  --   {f.check:<22} {f.subject} — not checked: {f.detail}")
        return "\n".join(lines)


def _sha256(path: Path) -> bytes:
    return hashlib.sha256(path.read_bytes()).digest()


def audit_task(w3: Any, manifest: Any, store: Any, task_id: int, *, check_finality: bool = True,
               key: Any = None) -> AuditReport:
    """Run every check for ``task_id``; never raises on a failed check, only records it.
    ``key`` is an auditor's X25519 private key, for tasks whose updates are sealed."""
    from prismesh.aggregator.adapters import load_adapter, save_adapter
    from prismesh.aggregator.contribution import (
        PublishedAdapters,
        cids_published_before,
        published_before,
        score_updates,
    )
    from prismesh.aggregator.history import aggregation_base
    from prismesh.aggregator.strategies import aggregate, get_strategy
    from prismesh.aggregator.verify import expected_lora_shapes
    from prismesh.aggregator.weights import WeightRule
    from prismesh.chain.evm.contracts import Coordinator, Registry
    from prismesh.chain.sealing import (
        SealContext,
        fetch_any_adapter,
        stored_kind,
    )
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

    opened_events = coord.get_events("RoundOpened", start, taskId=task_id)
    opened = {ev.round: ev for ev in opened_events}
    revealed_events = coord.get_events("UpdateRevealed", start, taskId=task_id)
    reveals: dict[int, dict[str, Any]] = {}
    for ev in revealed_events:
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
    privacy = spec.privacy_spec
    keys_at = _published_keys(Registry.read_only(manifest, w3), start) if privacy.sealed else {}
    coord_address = coord.address

    included = {(acc.round, c) for acc in accepted for c in acc.included}
    for ev in coord.get_events("RoundFailed", start, taskId=task_id):
        report.add("round outcome", f"round {ev.round}", True, f"failed on chain: {ev.reason}")

    with tempfile.TemporaryDirectory(prefix="prismesh-audit-") as tmp:
        work = Path(tmp)
        history = PublishedAdapters()
        adapters: dict[str, Any] = {}
        problems: dict[str, str] = {}
        for r, by_client in sorted(reveals.items()):
            for client, ev in sorted(by_client.items()):
                subject = f"round {r} {client} {ev.cid}"
                # A node may reveal the same adapter in a retried round: fetched once.
                if ev.cid not in adapters and ev.cid not in problems:
                    if privacy.sealed:
                        context = SealContext(int(w3.eth.chain_id), coord_address, task_id, r, client, "update")
                        _open_sealed_update(report, store, ev, subject, context, privacy.recipients, keys_at, key,
                                            work, adapters, problems, (r, client) in included)
                    else:
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
                        "not opened (no key)" if d is None
                        else "intact" if digest == bytes(ev.sha256) else "stored bytes differ from the revealed sha256")
                    report.add("adapter (excluded)", subject, True, f"not in an accepted aggregate; {state}")
                    continue
                if d is None and ev.cid not in problems:  # sealed, intact, and no key to open it
                    report.add("adapter vs CID", subject, True, "ciphertext intact")
                    report.skip("adapter vs sha256", subject, "the plaintext needs a recipient's key")
                    continue
                if d is None:
                    report.add("adapter vs CID", subject, False, problems[ev.cid])
                    continue
                report.add("adapter vs CID", subject, True, "opened with key" if privacy.sealed else "")
                report.add("adapter vs sha256", subject, digest == bytes(ev.sha256),
                           "" if digest == bytes(ev.sha256) else f"stored {digest.hex()} != revealed {bytes(ev.sha256).hex()}")

        strategy = get_strategy(spec.strategy, **spec.strategy_options)
        state = None  # a server optimiser's state, rebuilt round by round as the daemon does
        state_known = True
        lora_cfg = spec.lora.to_dict()
        try:
            expected = expected_lora_shapes(spec.model_config, lora_cfg)
        except ValueError as exc:
            report.add("task spec", params.hyper_params_cid, False, f"no adapter shapes: {exc}")
            expected = None
        for acc in accepted:
            r = acc.round
            subject = f"round {r} aggregate {acc.aggregate_cid}"
            missing = [c for c in acc.included if c not in reveals.get(r, {})]
            if missing:
                report.add("included revealed", subject, False, f"included without a reveal: {missing}")
                state_known = False
                continue
            try:
                store.verify(acc.aggregate_cid)
                report.add("aggregate stored", subject, True)
            except StorageError as exc:
                report.add("aggregate stored", subject, False, str(exc))
            if expected is None:
                continue
            if privacy.sealed and key is None:
                for check in ("inclusion re-derived", "aggregate recomputed", "scores recomputed"):
                    report.skip(check, subject, "needs the revealed updates' plaintext (a recipient's key)")
                continue
            if strategy.stateful and not state_known:
                report.add("aggregate recomputed", subject, False,
                           f"{strategy.name}'s state cannot be rebuilt past an earlier round that failed its checks")
                continue
            try:
                global_cid = opened[r].global_adapter_cid if r in opened else ""
                gdir = work / "global" / global_cid
                if global_cid and not gdir.exists():
                    fetch_any_adapter(store, global_cid, gdir, key)
                raw = load_adapter(gdir) if global_cid else None
                glob = aggregation_base(spec, raw)
                candidates, rejected = _verified_reveals(
                    reveals.get(r, {}), adapters, expected, lora_cfg, spec.norm_bound, raw, rule.weight, problems
                )
                result = aggregate(strategy, candidates, glob, state) if candidates else None
                if result is not None:
                    state = result.state
                excluded = dict(result.metrics.get("excluded", {})) if result is not None else {}
                kept = [u for u in candidates if u.client not in excluded]
                _audit_inclusion(report, r, sorted(acc.included), sorted(u.client for u in kept),
                                 {**rejected, **excluded}, reveals.get(r, {}))
                if result is None:
                    report.add("aggregate recomputed", subject, False, "no revealed update passes the checks")
                    state_known = False
                    continue
                published = fetch_any_adapter(store, acc.aggregate_cid, work / "published-aggregate" / f"round{r}", key)
                if privacy.central_dp:
                    out = _recompute_dp(report, subject, coord, spec, kept, glob, published, key,
                                        (int(w3.eth.chain_id), coord_address, task_id, r, acc.aggregator),
                                        work / "recomputed" / f"round{r}")
                    if out is None:
                        continue
                else:
                    out = save_adapter(result.adapter, work / "recomputed" / f"round{r}")
                known = published_before(coord, store, task_id, r, work / "published", private_key=key,
                                         cids=cids_published_before(opened_events, revealed_events, r),
                                         cache=history)
                scored[r] = score_updates(kept, glob, known)
            except Exception as exc:  # noqa: BLE001 - recorded as a failed check
                report.add("aggregate recomputed", subject, False, f"{type(exc).__name__}: {exc}")
                state_known = False
                continue
            if stored_kind(store, acc.aggregate_cid) == "directory":
                cid = cid_of_path(out)
                same = cid == acc.aggregate_cid
                report.add("aggregate recomputed", subject, same, "" if same else f"recomputed CID {cid}")
            else:  # sealed to the members: the ciphertext is fresh randomness, compare the plaintext
                same = all((out / n).read_bytes() == (published / n).read_bytes()
                           for n in ("adapter_config.json", "adapter_model.safetensors"))
                report.add("aggregate recomputed", subject, same,
                           "opened and compared file by file" if same else "opened aggregate differs from the recomputed one")
            digest = _sha256(out / "adapter_model.safetensors")
            report.add("aggregate sha256", subject, digest == bytes(acc.aggregate_sha256))

    _audit_rewards(report, params, accepted, earned, scored)
    if check_finality:
        _audit_finality(w3, manifest, report, [a.block_number for a in accepted])
    return report


def _published_keys(registry: Any, start: int) -> dict[str, list[tuple[int, bytes]]]:
    """Every EncryptionKeySet event: address (lower case) -> [(block, key)] in chain order."""
    out: dict[str, list[tuple[int, bytes]]] = {}
    for ev in registry.get_events("EncryptionKeySet", 0):
        out.setdefault(ev.account.lower(), []).append((ev.block_number, bytes(ev.key)))
    return out


def _open_sealed_update(report: AuditReport, store: Any, ev: Any, subject: str, context: Any,
                        recipients: tuple[str, ...], keys_at: dict[str, list[tuple[int, bytes]]], key: Any,
                        work: Path, adapters: dict[str, Path], problems: dict[str, str], counts: bool) -> None:
    """A sealed update: its ciphertext stored as one, sealed for its own task, round and client
    to the task's recipients, and (with a key) opened into ``adapters``; what is wrong lands in
    ``problems`` (the aggregator must then have refused it). A failed check is a finding that
    fails the audit only for an update an accepted aggregate ``counts``."""
    from prismesh.chain.sealing import SealError, fetch_any_adapter, read_header, stored_kind
    from prismesh.chain.storage import StorageError

    def add(check: str, ok: bool, detail: str = "") -> None:
        report.add(check, subject, ok or not counts, detail if counts or ok else f"{detail} (refused, not paid)")

    try:
        kind = stored_kind(store, ev.cid)
        if kind != "sealed":
            problems[ev.cid] = f"stored as a {kind}, not a sealed object"
            add("sealed as required", False, problems[ev.cid])
            return
        header = read_header(store.cat(ev.cid))
    except (StorageError, SealError) as exc:
        problems[ev.cid] = str(exc)
        return
    wrong = _sealing_problems(header, context, recipients, keys_at, ev.block_number)
    add("sealed for its round", "context" not in wrong, wrong.get("context", ""))
    add("sealed to recipients", "recipients" not in wrong, wrong.get("recipients", ""))
    if wrong:
        problems[ev.cid] = "; ".join(wrong.values())
        return
    if key is None:
        return
    try:
        adapters[ev.cid] = fetch_any_adapter(store, ev.cid, work / "updates" / ev.cid, key, context)
        add("opened with key", True)
    except (StorageError, SealError) as exc:
        problems[ev.cid] = f"could not be opened with the key: {exc}"
        add("opened with key", False, str(exc))


def _sealing_problems(header: Any, expected: Any, recipients: tuple[str, ...],
                      keys_at: dict[str, list[tuple[int, bytes]]], block: int) -> dict[str, str]:
    """What is wrong with a sealed object's header: it must name its own task, round and client,
    and be sealed to exactly the task's recipients under the keys they had published when it was
    revealed. Keys ``context`` and ``recipients``, absent when right."""
    out: dict[str, str] = {}
    if header.context.to_dict() != expected.to_dict():
        out["context"] = f"sealed for {header.context.describe()}, revealed as {expected.describe()}"
    want = {a.lower() for a in recipients}
    got = {r.address.lower(): r.public_key for r in header.recipients}
    problems = []
    if set(got) != want:
        problems.append(f"recipients {sorted(got)} differ from the task's {sorted(want)}")
    for address, public in sorted(got.items()):
        history = [k for b, k in keys_at.get(address, []) if b <= block]
        if not history or history[-1] != public:
            problems.append(f"{address}: key {public.hex()[:12]}… is not the one it published")
    if problems:
        out["recipients"] = "; ".join(problems)
    return out


def _recompute_dp(report: AuditReport, subject: str, coord: Any, spec: Any, updates: list, glob: Any,
                  published: Path, key: Any, context: tuple, out_dir: Path) -> Path | None:
    """Regenerate a central-DP aggregate: open the seed sealed beside it, check it against its
    commitment, recompute the clipped mean plus the same noise. None (with a finding) when the
    seed cannot be had."""
    import json

    from prismesh.aggregator.adapters import save_adapter
    from prismesh.aggregator.daemon import DP_RECORD_NAME
    from prismesh.aggregator.dp import dp_aggregate
    from prismesh.chain.sealing import SealContext, SealError, open_sealed

    chain_id, coordinator, task, rnd, aggregator = context
    try:
        record = json.loads((published / DP_RECORD_NAME).read_text())
        seed = open_sealed(bytes.fromhex(record["sealed_seed"]), key,
                           SealContext(chain_id, coordinator, task, rnd, aggregator, "dp-seed"))
    except (OSError, KeyError, ValueError, SealError) as exc:
        report.add("dp noise reproduced", subject, False, f"no usable noise seed: {exc}")
        return None
    committed = hashlib.sha256(b"prismesh dp seed\n" + seed).hexdigest() == record.get("seed_sha256")
    cdp = spec.privacy_spec.client_dp
    participants = int(coord.get_task(task).participant_count)
    settings_ok = (record.get("clip") == cdp.clip and record.get("noise_multiplier") == cdp.noise_multiplier
                   and record.get("denominator") == max(participants, len(updates)))
    report.add("dp noise reproduced", subject, committed and settings_ok,
               ("seed matches its commitment" if committed else "seed differs from its commitment")
               + ("" if settings_ok else f"; mechanism {record} differs from the task's"))
    ordered = sorted(updates, key=lambda u: u.client)
    adapter, _ = dp_aggregate([u.adapter for u in ordered], glob, dict(glob.config), cdp.clip, cdp.noise_multiplier,
                              int(record.get("denominator", participants)), seed)
    out = save_adapter(adapter, out_dir)
    (out / DP_RECORD_NAME).write_bytes((published / DP_RECORD_NAME).read_bytes())
    return out


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


def _verified_reveals(
    by_client: dict[str, Any],
    adapters: dict[str, Path],
    expected: dict[str, Any],
    lora_cfg: dict[str, Any],
    norm_bound: float,
    global_adapter: Any,
    weight: Any,
    problems: dict[str, str] | None = None,
) -> tuple[list[Any], dict[str, str]]:
    """The round's revealed updates that pass the aggregator's checks, and why the others fail:
    the same ``verify_adapter`` against the same global adapter and norm bound; each update
    carries its claim as the task's rule ``weight`` bounds it."""
    from prismesh.aggregator.adapters import load_adapter
    from prismesh.aggregator.strategies import ClientUpdate
    from prismesh.aggregator.verify import verify_adapter

    candidates, rejected = [], {}
    for client, ev in sorted(by_client.items()):
        path = adapters.get(ev.cid)
        if path is None:
            rejected[client] = (problems or {}).get(ev.cid, "the adapter could not be fetched intact by the audit")
            continue
        if _sha256(path / "adapter_model.safetensors") != bytes(ev.sha256):
            rejected[client] = "adapter weights sha256 differs from the revealed one"
            continue
        try:
            adapter = load_adapter(path)
        except Exception as exc:  # noqa: BLE001 - an unreadable adapter is a reason, not a crash
            rejected[client] = f"unreadable adapter: {exc}"
            continue
        reasons = verify_adapter(adapter, expected, lora_cfg, norm_bound, global_adapter)
        if reasons:
            rejected[client] = "; ".join(reasons)
        else:
            candidates.append(ClientUpdate(client, weight(int(ev.num_samples)), adapter))
    return candidates, rejected


def _audit_inclusion(
    report: AuditReport, r: int, included: list[str], kept: list[str], reasons: dict[str, str], revealed: dict[str, Any]
) -> None:
    """Who was paid is re-derived: the chain's included list must be exactly the reveals that pass
    the checks and the strategy keeps; each one left out gets a finding with its reason."""
    extra = [c for c in included if c not in kept]
    dropped = [c for c in kept if c not in included]
    detail = "; ".join(
        [f"{c} included, but: {reasons.get(c, 'not kept')}" for c in extra]
        + [f"{c} left out, but it passes every check and the strategy keeps it" for c in dropped]
    )
    report.add("inclusion re-derived", f"round {r}", not extra and not dropped,
               detail or f"{len(included)} included, as the checks and the strategy decide")
    for client in sorted(set(revealed) - set(included)):
        if client in reasons:
            report.add("exclusion re-derived", f"round {r} {client}", True, reasons[client])


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
