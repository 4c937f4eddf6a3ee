"""The dashboard's one data layer: final events read incrementally into an in-memory model.

A :class:`ChainIndex` follows three contracts of a deployment. The Coordinator's and the
Registry's events are taken only once their block is final (the FinalityGadget's height, read
once per refresh so both contracts are seen at the same height); the gadget's own
``BlockFinalized`` certificates are read up to the head, since they are what makes blocks final.
Each :meth:`ChainIndex.refresh` reads only the blocks after the last one it read (at most
``batch_blocks`` of them, in one ``eth_getLogs`` for the three contracts), so a long chain is read
once and no page request touches it. Gas and block times come from the blocks holding the rounds'
transactions, a bounded number per refresh.

Events are decoded from the ABIs in the manifest and applied by name; fields an event does not
carry (a contribution score, an exclusion reason) stay ``None`` and the pages show them as not
recorded, and events this module does not know are kept per task as they are.
"""

from __future__ import annotations

import copy
import logging
import threading
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

from eth_utils import to_checksum_address

log = logging.getLogger("prismesh.dashboard")

METRIC_SCALE = 1_000_000  # Coordinator.METRIC_SCALE: 0.734 is reported as 734000
PHASE_NAMES = ("None", "Open", "Commit", "Reveal", "Aggregating", "Finalized", "Failed")
TASK_STATUS = ("None", "Created", "Running", "Completed", "Failed", "Cancelled")
CLIENT_STATUS = ("None", "Pending", "Approved", "Suspended", "Revoked")
MAX_OTHER_EVENTS = 200  # unknown events kept per task
MAX_CERTIFICATES = 50  # BlockFinalized events kept for the finality page


def _snake(name: str) -> str:
    out = []
    for i, ch in enumerate(name):
        if ch.isupper() and i and (not name[i - 1].isupper() or (i + 1 < len(name) and name[i + 1].islower())):
            out.append("_")
        out.append(ch.lower())
    return "".join(out)


def _plain(value: Any) -> Any:
    """Decoded ABI values as plain Python: snake-case dict keys, bytes as 0x-hex, lists."""
    if isinstance(value, (bytes, bytearray)):
        return "0x" + bytes(value).hex()
    if hasattr(value, "items"):
        return {_snake(str(k)): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _name(table: tuple[str, ...], value: Any) -> str:
    try:
        return table[int(value)]
    except (IndexError, TypeError, ValueError):
        return f"unknown ({value})"


def _address(value: Any) -> str:
    try:
        return to_checksum_address(value)
    except (TypeError, ValueError):
        return str(value)


# ------------------------------------------------------------------------ model


@dataclass
class ClientRound:
    """One participant in one round, as the final events tell it."""

    committed_block: int | None = None
    cid: str | None = None
    sha256: str | None = None
    num_samples: int | None = None
    revealed_block: int | None = None
    included: bool | None = None  # None until the round's aggregate (or failure) is final
    exclusion: str | None = None  # the reason, when the chain records one
    score: int | None = None  # the contribution score, when the chain records one
    reward: int = 0
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def status(self) -> str:
        if self.included is True:
            return "included"
        if self.included is False:
            return "excluded" if self.cid is not None else "missed"
        if self.cid is not None:
            return "revealed"
        if self.committed_block is not None:
            return "committed"
        return "waiting"


@dataclass
class RoundRecord:
    number: int
    opened_block: int
    global_cid: str = ""
    deadlines: dict[str, int] = field(default_factory=dict)
    phases: list[tuple[str, int]] = field(default_factory=list)
    clients: dict[str, ClientRound] = field(default_factory=dict)
    aggregate_cid: str | None = None
    aggregate_sha256: str | None = None
    aggregator: str | None = None
    aggregate_block: int | None = None
    aggregator_reward: int = 0
    failure: str | None = None
    txs: list[str] = field(default_factory=list)
    opened_at: int | None = None  # the opening block's timestamp

    @property
    def phase(self) -> str:
        return self.phases[-1][0] if self.phases else "Open"

    def client(self, address: str) -> ClientRound:
        rec = self.clients.get(address)
        if rec is None:
            rec = self.clients[address] = ClientRound()
        return rec


@dataclass
class TaskRecord:
    task_id: int
    created_block: int
    creator: str
    params: dict[str, Any]
    status: str = "Created"
    participants: list[str] = field(default_factory=list)
    rounds: dict[int, RoundRecord] = field(default_factory=dict)
    rewards_paid: int = 0
    final_adapter: str | None = None
    end_reason: str | None = None
    last_block: int = 0
    other_events: deque = field(default_factory=lambda: deque(maxlen=MAX_OTHER_EVENTS))

    @property
    def num_rounds(self) -> int:
        return int(self.params.get("num_rounds") or 0)

    @property
    def completed_rounds(self) -> int:
        return sum(1 for r in self.rounds.values() if r.aggregate_cid is not None)

    @property
    def current_round(self) -> RoundRecord | None:
        return self.rounds[max(self.rounds)] if self.rounds else None

    @property
    def reward_budget(self) -> int | None:
        value = self.params.get("reward_budget")
        return int(value) if value is not None else None


@dataclass
class HospitalRecord:
    address: str
    status: str = "None"
    descriptor_hash: str | None = None
    registered_block: int | None = None
    last_block: int | None = None
    rewards: int = 0
    claimed: int = 0
    tasks: set[int] = field(default_factory=set)
    rounds_included: int = 0
    rounds_excluded: int = 0

    def touch(self, block: int) -> None:
        self.last_block = block if self.last_block is None else max(self.last_block, block)


@dataclass
class Certificate:
    height: int
    block_hash: str
    view: int
    previous_height: int
    submitter: str
    tx_hash: str
    tx_block: int
    signers: list[str] | None = None  # filled from the transaction, once checked
    valid_signers: int | None = None
    problems: list[str] = field(default_factory=list)


@dataclass
class FinalityRecord:
    gadget: str | None
    validators: list[str] = field(default_factory=list)
    quorum: int | None = None
    final_height: int = 0
    final_hash: str | None = None
    final_view: int | None = None
    head: int = 0
    head_time: int | None = None
    final_time: int | None = None
    certificates: deque = field(default_factory=lambda: deque(maxlen=MAX_CERTIFICATES))
    certificate_count: int = 0

    @property
    def lag_blocks(self) -> int:
        return max(0, self.head - self.final_height)

    @property
    def lag_seconds(self) -> int | None:
        if self.head_time is None or self.final_time is None:
            return None
        return max(0, self.head_time - self.final_time)

    @property
    def last_certificate(self) -> Certificate | None:
        for cert in reversed(self.certificates):
            if cert.height == self.final_height:
                return cert
        return self.certificates[-1] if self.certificates else None


# ------------------------------------------------------------------------ index


@dataclass(frozen=True)
class RawEvent:
    """One decoded event: its contract, name, plain arguments and position."""

    contract: str
    name: str
    args: dict[str, Any]
    block_number: int
    log_index: int
    tx_hash: str

    @property
    def position(self) -> tuple[int, int]:
        return (self.block_number, self.log_index)


class EventReader:
    """Events of several contracts from one ``eth_getLogs`` per block range (a chain that
    builds every receipt of the range for each call, like the embedded one, pays once)."""

    def __init__(self, w3: Any, contracts: dict[str, tuple[str, list[dict[str, Any]]]], batch_blocks: int = 2000) -> None:
        from eth_utils import event_abi_to_log_topic

        self.w3 = w3
        self.batch_blocks = batch_blocks
        self._by_key: dict[tuple[str, bytes], tuple[str, dict[str, Any]]] = {}
        self.addresses: dict[str, str] = {}
        for name, (address, abi) in contracts.items():
            address = to_checksum_address(address)
            self.addresses[name] = address
            for item in abi:
                if item.get("type") == "event" and not item.get("anonymous"):
                    self._by_key[(address, bytes(event_abi_to_log_topic(item)))] = (name, item)

    def read(self, start: int, end: int, contracts: tuple[str, ...] | None = None) -> list[RawEvent]:
        """Events in blocks ``[start, end]`` in (block, log index) order."""
        from web3._utils.events import get_event_data

        addresses = [a for n, a in self.addresses.items() if contracts is None or n in contracts]
        found: list[RawEvent] = []
        while start <= end and addresses:
            stop = min(end, start + self.batch_blocks - 1)
            for log in self.w3.eth.get_logs({"address": addresses, "fromBlock": start, "toBlock": stop}):
                topics = log["topics"]
                if not topics:
                    continue
                entry = self._by_key.get((to_checksum_address(log["address"]), bytes(topics[0])))
                if entry is None:
                    continue
                contract, abi = entry
                data = get_event_data(self.w3.codec, abi, log)
                found.append(RawEvent(contract, data["event"], _plain(data["args"]), int(log["blockNumber"]),
                                      int(log["logIndex"]), "0x" + bytes(log["transactionHash"]).hex()))
            start = stop + 1
        found.sort(key=lambda e: e.position)
        return found


class ChainIndex:
    """Final events of a deployment, read incrementally; thread-safe snapshots for the pages.

    ``chain_lock`` guards every use of ``w3`` (pass the lock the chain's other users hold when
    they share one in-process chain); the model has its own lock, held only while applying
    events or taking a snapshot, so pages never wait for the chain.
    """

    def __init__(
        self,
        w3: Any,
        manifest: Any,
        *,
        finality: bool | None = None,
        chain_lock: Any = None,
        blocks_per_refresh: int = 400,
        batch_blocks: int = 2000,
    ) -> None:
        self.w3 = w3
        self.manifest = manifest
        self.chain_lock = chain_lock if chain_lock is not None else threading.RLock()
        self._lock = threading.RLock()
        self.blocks_per_refresh = blocks_per_refresh
        self.finality = bool(manifest.finality_gadget) if finality is None else finality
        if self.finality and not manifest.finality_gadget:
            raise ValueError("the deployment has no finality gadget; open the dashboard with finality off")
        self.chain_id = int(manifest.chain_id)
        contracts = {name: (manifest.address(name), manifest.abis[name]) for name in ("Coordinator", "Registry")}
        self._gadget = None
        if manifest.finality_gadget:
            contracts["FinalityGadget"] = (manifest.finality_gadget, manifest.abis["FinalityGadget"])
            self._gadget = w3.eth.contract(
                address=to_checksum_address(manifest.finality_gadget), abi=manifest.abis["FinalityGadget"]
            )
        self._reader = EventReader(w3, contracts, batch_blocks)
        self._scanned = int(manifest.deploy_block) - 1  # every final block up to here is read
        self._seen_certificates: set[tuple[int, int]] = set()
        self.tasks: dict[int, TaskRecord] = {}
        self.hospitals: dict[str, HospitalRecord] = {}
        self.aggregators: set[str] = set()
        self.finality_info = FinalityRecord(manifest.finality_gadget)
        self.version = 0
        self.refreshed = 0  # refreshes done
        self.events_seen = 0  # Coordinator and Registry events applied
        self._gas: dict[str, int] = {}  # tx hash -> gas used (final, so it never changes)
        self._gas_owner: set[str] = set()  # transactions already counted in some round
        self._block_txs: dict[int, list[str]] = {}  # blocks whose gas/time is still to be read
        self._times: OrderedDict[int, int] = OrderedDict()
        self._time_queue: deque[int] = deque()
        self._awaiting_time: dict[int, list[RoundRecord]] = {}  # block -> rounds opened in it
        self._cert_queue: deque[Certificate] = deque()
        self._aggregator_role: str | None = None
        self.token_symbol, self.token_decimals = "", 18
        self._token_read = False

    # ------------------------------------------------------------------ refresh

    @property
    def caught_up(self) -> bool:
        """Whether every final block has been read (a long chain is read a batch per refresh)."""
        return self._scanned >= self.finality_info.final_height and self.refreshed > 0

    @property
    def indexed_to(self) -> int:
        return max(self._scanned, 0)

    def refresh(self) -> bool:
        """Read what became final since the last call, at most ``batch_blocks`` blocks of it (call
        again while not :attr:`caught_up`); True when anything changed."""
        with self.chain_lock:
            self._read_constants()
            head = int(self.w3.eth.block_number)
            final_hash, final_view = None, None
            if self._gadget is not None:
                fn = self._gadget.functions
                gadget_final = int(fn.finalizedHeight().call())
                final_hash, final_view = bytes(fn.finalizedHash().call()), int(fn.finalizedView().call())
            final = gadget_final if self.finality else head
            upto = min(final, self._scanned + self._reader.batch_blocks)
            events = self._reader.read(self._scanned + 1, upto) if upto > self._scanned else []
            # Certificates are read up to the head once caught up: they are what makes blocks final.
            tail = []
            if self._gadget is not None and upto >= final:
                tail = self._reader.read(max(final, self._scanned) + 1, head, ("FinalityGadget",))
        changed = bool(events)
        with self._lock:
            info = self.finality_info
            if (head, final) != (info.head, info.final_height):
                changed = True
            info.head = head
            info.final_height, info.final_view = (gadget_final if self._gadget is not None else final), final_view
            info.final_hash = "0x" + final_hash.hex() if final_hash else None
            for ev in events + tail:
                if ev.contract == "FinalityGadget":
                    if ev.position not in self._seen_certificates:
                        self._seen_certificates.add(ev.position)
                        self._apply_gadget(ev)
                        changed = True
                elif ev.contract == "Registry":
                    self._apply_registry(ev)
                else:
                    self._apply_coordinator(ev)
            self._scanned = max(self._scanned, upto)
            self.events_seen += sum(1 for ev in events if ev.contract != "FinalityGadget")
        changed |= self._fetch_details(head, final)
        with self._lock:
            self.refreshed += 1
            if changed:
                self.version += 1
        return changed

    def _read_constants(self) -> None:
        """What never changes: the validator set, the token's symbol and decimals, the role id."""
        if self._token_read:
            return
        self._token_read = True
        if self._gadget is not None:
            validators = [_address(v) for v in self._gadget.functions.validators().call()]
            quorum = int(self._gadget.functions.quorum().call())
            with self._lock:
                self.finality_info.validators, self.finality_info.quorum = validators, quorum
        try:
            token = self.w3.eth.contract(address=self.manifest.address("RewardToken"), abi=self.manifest.abis["RewardToken"])
            self.token_symbol = str(token.functions.symbol().call())
            self.token_decimals = int(token.functions.decimals().call())
        except Exception:  # noqa: BLE001 - amounts are then shown with 18 decimals, unnamed
            pass
        try:
            reg = self.w3.eth.contract(address=self.manifest.address("Registry"), abi=self.manifest.abis["Registry"])
            self._aggregator_role = "0x" + bytes(reg.functions.AGGREGATOR_ROLE().call()).hex()
        except Exception:  # noqa: BLE001 - a registry without the role constant lists no aggregators
            self._aggregator_role = ""

    def _fetch_details(self, head: int, final: int) -> bool:
        """Gas and times of event blocks, and certificate signatures, a bounded number per call.

        A block's ``gasUsed`` is its transactions' sum, so a block holding one transaction (every
        block of an automining devnet) needs no receipt."""
        budget = self.blocks_per_refresh
        with self._lock:
            wanted = {b: [] for b in (head, final) if b not in self._times}
            for b in list(self._block_txs)[:budget]:
                wanted[b] = self._block_txs.pop(b)
            while self._time_queue and len(wanted) < budget:
                b = self._time_queue.popleft()
                if b not in self._times:
                    wanted.setdefault(b, [])
            certs = []
            while self._cert_queue and len(certs) < 8:
                certs.append(self._cert_queue.popleft())
        if not (wanted or certs):
            return False
        gas: dict[str, int] = {}
        times: dict[int, int] = {}
        retry: dict[int, list[str]] = {}
        checked = []
        with self.chain_lock:
            for b, txs in wanted.items():
                try:
                    block = self.w3.eth.get_block(b)
                    times[b] = int(block["timestamp"])
                    if txs and len(block["transactions"]) == 1:
                        gas[txs[0]] = int(block["gasUsed"])
                    else:
                        for h in txs:
                            gas[h] = int(self.w3.eth.get_transaction_receipt(h)["gasUsed"])
                except Exception:  # noqa: BLE001 - read again at the next refresh
                    if txs:
                        retry[b] = txs
            for cert in certs:
                checked.append((cert, *self._check_certificate(cert)))
        with self._lock:
            self._gas.update(gas)
            for b, txs in retry.items():
                self._block_txs.setdefault(b, []).extend(txs)
            for b, t in times.items():
                self._remember_time(b, t)
            for b, t in times.items():
                for rnd in self._awaiting_time.pop(b, ()):
                    rnd.opened_at = t
            info = self.finality_info
            info.head_time = self._times.get(info.head, info.head_time)
            info.final_time = self._times.get(info.final_height, info.final_time)
            for cert, signers, valid, problems in checked:
                cert.signers, cert.valid_signers, cert.problems = signers, valid, problems
        return True

    def _remember_time(self, block: int, ts: int) -> None:
        self._times[block] = ts
        self._times.move_to_end(block)
        while len(self._times) > 20_000:
            self._times.popitem(last=False)

    def _check_certificate(self, cert: Certificate) -> tuple[list[str], int, list[str]]:
        """The certificate's signers, how many are valid validator signatures over the commit
        digest, and what is wrong (mismatched block hash, bad signatures)."""
        from eth_keys import keys as eth_keys

        from prismesh.chain.finality.gadget import commit_digest

        problems: list[str] = []
        try:
            tx = self.w3.eth.get_transaction(cert.tx_hash)
            _, args = self._gadget.decode_function_input(tx["input"])
        except Exception as exc:  # noqa: BLE001 - shown on the page as a problem
            return [], 0, [f"certificate transaction unreadable: {exc}"]
        signers = [_address(s) for s in args["signers"]]
        validators = set(self.finality_info.validators)
        digest = commit_digest(self.chain_id, self._gadget.address, cert.height, bytes(args["blockHash"]), cert.view)
        valid = 0
        for claimed, sig in zip(signers, args["signatures"], strict=False):
            sig = bytes(sig)
            try:
                v = sig[64] - 27 if sig[64] >= 27 else sig[64]
                who = eth_keys.Signature(
                    vrs=(v, int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:64], "big"))
                ).recover_public_key_from_msg_hash(digest).to_checksum_address()
            except Exception:  # noqa: BLE001 - a malformed signature is a finding
                problems.append(f"malformed signature from {claimed}")
                continue
            if who != claimed or who not in validators:
                problems.append(f"signature claimed by {claimed} recovers to {who}")
            else:
                valid += 1
        try:
            chain_hash = "0x" + bytes(self.w3.eth.get_block(cert.height)["hash"]).hex()
            if chain_hash != cert.block_hash:
                problems.append(f"block hash {cert.block_hash} is not the chain's {chain_hash}")
        except Exception as exc:  # noqa: BLE001
            problems.append(f"block {cert.height} unreadable: {exc}")
        return signers, valid, problems

    # ------------------------------------------------------------------ applying events

    def _apply_gadget(self, ev: Any) -> None:
        args = ev.args
        info = self.finality_info
        if ev.name == "ValidatorSetInitialized":
            info.validators = [_address(v) for v in args.get("validators", [])]
            info.quorum = int(args.get("quorum", 0)) or info.quorum
        elif ev.name == "BlockFinalized":
            cert = Certificate(
                height=int(args["height"]),
                block_hash=str(args.get("block_hash")),
                view=int(args.get("view_number", 0)),
                previous_height=int(args.get("previous_height", 0)),
                submitter=_address(args.get("submitter", "")),
                tx_hash=ev.tx_hash,
                tx_block=ev.block_number,
            )
            info.certificates.append(cert)
            info.certificate_count += 1
            self._cert_queue.append(cert)
            while len(self._cert_queue) > 8:  # only the newest ones are shown
                self._cert_queue.popleft()

    def _hospital(self, address: str) -> HospitalRecord:
        rec = self.hospitals.get(address)
        if rec is None:
            rec = self.hospitals[address] = HospitalRecord(address)
        return rec

    def _apply_registry(self, ev: Any) -> None:
        args = ev.args
        name = ev.name
        if name in ("RoleGranted", "RoleRevoked"):
            if self._aggregator_role and args.get("role") == self._aggregator_role:
                account = _address(args.get("account"))
                (self.aggregators.add if name == "RoleGranted" else self.aggregators.discard)(account)
            return
        client = args.get("client")
        if client is None:
            return
        rec = self._hospital(_address(client))
        rec.touch(ev.block_number)
        if name == "ClientRegistered":
            rec.status = "Pending"
            rec.registered_block = ev.block_number
            rec.descriptor_hash = args.get("descriptor_hash")
        elif name == "DescriptorUpdated":
            rec.descriptor_hash = args.get("descriptor_hash")
        elif name == "ClientStatusChanged":
            rec.status = _name(CLIENT_STATUS, args.get("current"))

    def _apply_coordinator(self, ev: Any) -> None:
        args = ev.args
        name = ev.name
        task_id = args.get("task_id")
        if task_id is None:
            return
        task_id = int(task_id)
        block = ev.block_number
        tx = ev.tx_hash
        if name == "TaskCreated":
            params = args.get("params") or {}
            self.tasks[task_id] = TaskRecord(task_id, block, _address(args.get("creator", "")), params, last_block=block)
            return
        task = self.tasks.get(task_id)
        if task is None:  # events of a task created before the deploy block: not ours
            return
        task.last_block = max(task.last_block, block)
        rnd_no = args.get("round")
        rnd = task.rounds.get(int(rnd_no)) if rnd_no is not None else None
        if rnd is not None and tx not in rnd.txs and tx not in self._gas_owner:
            self._gas_owner.add(tx)
            rnd.txs.append(tx)
            self._block_txs.setdefault(block, []).append(tx)
        who = args.get("client") or args.get("recipient") or args.get("account")
        if who is not None:
            hospital = self.hospitals.get(_address(who))
            if hospital is not None:
                hospital.touch(block)
        if name == "ParticipantJoined":
            client = _address(args["client"])
            if client not in task.participants:
                task.participants.append(client)
            self._hospital(client).tasks.add(task_id)
        elif name == "TaskStarted":
            task.status = "Running"
        elif name == "RoundOpened":
            number = int(rnd_no)
            rnd = RoundRecord(number, block, global_cid=str(args.get("global_adapter_cid", "")))
            rnd.deadlines = {k[: -len("_deadline")]: int(v) for k, v in args.items() if k.endswith("_deadline")}
            rnd.phases.append(("Open", block))
            task.rounds[number] = rnd
            if block in self._times:
                rnd.opened_at = self._times[block]
            else:
                self._awaiting_time.setdefault(block, []).append(rnd)
            if tx not in self._gas_owner:  # the aggregate that opened it pays for it otherwise
                self._gas_owner.add(tx)
                rnd.txs.append(tx)
                self._block_txs.setdefault(block, []).append(tx)
            else:
                self._time_queue.append(block)
        elif rnd is None:
            if name in ("TaskCompleted", "TaskFailed", "TaskCancelled"):
                task.status = name[len("Task"):]
                task.final_adapter = args.get("final_adapter_cid")
                task.end_reason = args.get("reason")
            elif name != "RewardsClaimed":
                task.other_events.append((name, block, args))
        elif name == "PhaseChanged":
            rnd.phases.append((_name(PHASE_NAMES, args.get("current")), block))
        elif name == "UpdateCommitted":
            rnd.client(_address(args["client"])).committed_block = block
        elif name == "UpdateRevealed":
            c = rnd.client(_address(args["client"]))
            c.cid, c.sha256 = str(args.get("cid")), args.get("sha256")
            c.num_samples, c.revealed_block = int(args.get("num_samples", 0)), block
        elif name == "AggregateAccepted":
            included = {_address(a) for a in args.get("included", [])}
            rnd.aggregate_cid = str(args.get("aggregate_cid"))
            rnd.aggregate_sha256 = args.get("aggregate_sha256")
            rnd.aggregator = _address(args.get("aggregator", ""))
            rnd.aggregate_block = block
            for address in included:
                rnd.client(address)
            for address, c in rnd.clients.items():
                c.included = address in included
                hospital = self._hospital(address)
                if c.included:
                    hospital.rounds_included += 1
                elif c.cid is not None:
                    hospital.rounds_excluded += 1
        elif name in ("RewardPaid", "RewardEarned"):
            amount = int(args.get("amount", 0))
            recipient = _address(args.get("recipient", ""))
            task.rewards_paid += amount
            if args.get("is_aggregator"):
                rnd.aggregator_reward += amount
            else:
                c = rnd.client(recipient)
                c.reward += amount
                if args.get("score") is not None:
                    c.score = int(args["score"])
                self._hospital(recipient).rewards += amount
        elif name == "MetricReported":
            metric = str(args.get("metric"))
            rnd.client(_address(args["client"])).metrics[metric] = int(args.get("value", 0)) / METRIC_SCALE
        elif name == "RoundFailed":
            rnd.failure = str(args.get("reason", ""))
            for c in rnd.clients.values():
                c.included = False
                if c.cid is not None and c.exclusion is None:
                    c.exclusion = f"the round failed: {rnd.failure}"
        elif "reason" in args and args.get("client") is not None:  # an exclusion recorded on chain
            rnd.client(_address(args["client"])).exclusion = str(args["reason"])
        else:
            task.other_events.append((name, block, args))
        if name == "RewardsClaimed":
            account = self.hospitals.get(_address(args.get("account", "")))
            if account is not None:
                account.claimed += int(args.get("amount", 0))

    # ------------------------------------------------------------------ snapshots

    def gas_of(self, round_: RoundRecord) -> tuple[int, int]:
        """(gas of the round's transactions whose receipts are in, transactions still unknown)."""
        with self._lock:
            known = [self._gas[h] for h in round_.txs if h in self._gas]
        return sum(known), len(round_.txs) - len(known)

    def block_time(self, block: int | None) -> int | None:
        """The timestamp of ``block`` if the index has fetched it (it queues it otherwise)."""
        if block is None:
            return None
        with self._lock:
            ts = self._times.get(block)
            if ts is None and len(self._time_queue) < 10_000:
                self._time_queue.append(block)
            return ts

    def task_ids(self) -> list[int]:
        with self._lock:
            return sorted(self.tasks)

    def task(self, task_id: int) -> TaskRecord | None:
        """A deep copy of one task (the pages read it while the index moves on)."""
        with self._lock:
            rec = self.tasks.get(task_id)
            return copy.deepcopy(rec) if rec is not None else None

    def task_page(self, offset: int, limit: int) -> tuple[list[TaskRecord], int]:
        """Newest tasks first: ``limit`` copies from ``offset``, and the number of tasks."""
        with self._lock:
            ids = sorted(self.tasks, reverse=True)
            return [copy.deepcopy(self.tasks[i]) for i in ids[offset : offset + limit]], len(ids)

    def hospital_list(self) -> list[HospitalRecord]:
        with self._lock:
            return [copy.deepcopy(h) for _, h in sorted(self.hospitals.items())]

    def finality_snapshot(self) -> FinalityRecord:
        with self._lock:
            return copy.deepcopy(self.finality_info)

    def task_last_block(self, task_id: int) -> int | None:
        with self._lock:
            rec = self.tasks.get(task_id)
            return rec.last_block if rec is not None else None
