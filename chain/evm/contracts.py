"""Typed web3.py clients for the PrisMesh contracts; reverts become named Python exceptions.

Every transaction is signed locally by the client's ``LocalAccount`` (no unlocked node
accounts), so the same code runs on anvil, the embedded chain and a real network. A revert
raises a ``ContractRevert`` subclass named after the Solidity custom error (or OpenZeppelin's),
with the error's arguments as a dict, e.g. ``WrongPhase(taskId=1, round=2, expected=Phase.REVEAL,
actual=Phase.COMMIT)``.

The commitment a client submits is ``keccak256(abi.encode(chainid, coordinator, taskId, round,
sender, cid, sha256, numSamples, salt))`` with ABI types ``(uint256, address, uint256, uint32,
address, string, bytes32, uint32, bytes32)``; ``make_commitment`` computes it.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import os
import re
import sys
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar, get_type_hints

from eth_abi import decode as abi_decode
from eth_abi import encode as abi_encode
from eth_account.signers.local import LocalAccount
from eth_utils import function_signature_to_4byte_selector, keccak, to_checksum_address
from hexbytes import HexBytes
from web3 import HTTPProvider, Web3
from web3.exceptions import ContractLogicError, Web3RPCError
from web3.types import TxReceipt

from prismesh.chain import telemetry

if TYPE_CHECKING:
    from prismesh.chain.evm.manifest import Manifest


def _in_process_failure() -> tuple[type[Exception], ...]:
    """The in-process chain's own revert exception, once that chain is loaded. Only the embedded
    chain imports eth-tester (half a second and about 6 MiB), so a process that talks to anvil
    never pays for it, and nothing can raise it there."""
    tester = sys.modules.get("eth_tester.exceptions")
    return (tester.TransactionFailed,) if tester is not None else ()


def _reverts(*more: type[Exception]) -> tuple[type[Exception], ...]:
    """The exceptions a revert (or a failed estimate, with ``ValueError``) arrives as."""
    return (ContractLogicError, Web3RPCError, *more, *_in_process_failure())


# ------------------------------------------------------------------------------- enums


class ClientStatus(IntEnum):
    """Registry.ClientStatus."""

    NONE = 0
    PENDING = 1
    APPROVED = 2
    SUSPENDED = 3
    REVOKED = 4


class TaskStatus(IntEnum):
    """Coordinator.TaskStatus."""

    NONE = 0
    CREATED = 1
    RUNNING = 2
    COMPLETED = 3
    FAILED = 4
    CANCELLED = 5


class Phase(IntEnum):
    """Coordinator.Phase (ordered: a round's phase only increases)."""

    NONE = 0
    OPEN = 1
    COMMIT = 2
    REVEAL = 3
    AGGREGATING = 4
    FINALIZED = 5
    FAILED = 6


class Weighting(IntEnum):
    """Coordinator.Weighting: how the aggregate weights the included updates."""

    SAMPLES = 0
    UNIFORM = 1


class SubmissionStatus(IntEnum):
    """Coordinator.SubmissionStatus."""

    NONE = 0
    COMMITTED = 1
    REVEALED = 2
    ACCEPTED = 3


# Which error/event argument names carry which enum, so decoded values come back typed.
_ENUM_ARGS: dict[str, dict[str, type[IntEnum]]] = {
    "InvalidStatusTransition": {"current": ClientStatus, "requested": ClientStatus},
    "AlreadyRegistered": {"status": ClientStatus},
    "ClientNotApproved": {"status": ClientStatus},
    "WrongTaskStatus": {"expected": TaskStatus, "actual": TaskStatus},
    "WrongPhase": {"expected": Phase, "actual": Phase},
}

METRIC_SCALE = 1_000_000
SCORE_SCALE = 1_000_000
MAX_PARTICIPANTS = 32
MAX_PHASE_DURATION = 30 * 24 * 3600

# ------------------------------------------------------------------------------ errors


class ContractRevert(Exception):
    """A contract call reverted. ``error_name`` is the Solidity error's name and ``args`` (also
    ``error_args``) its decoded arguments by name."""

    def __init__(
        self,
        error_name: str,
        args: dict[str, Any] | None = None,
        *,
        contract: str | None = None,
        function: str | None = None,
        data: bytes | None = None,
    ) -> None:
        self.error_name = error_name
        self.error_args: dict[str, Any] = dict(args or {})
        self.contract = contract
        self.function = function
        self.data = data
        super().__init__(self._message())

    @property  # type: ignore[override]
    def args(self) -> dict[str, Any]:  # noqa: D401 - mirrors the Solidity error's arguments
        """The error's arguments by name (shadows ``BaseException.args`` on purpose)."""
        return self.error_args

    def _message(self) -> str:
        inner = ", ".join(f"{k}={_fmt(v)}" for k, v in self.error_args.items())
        where = ""
        if self.contract or self.function:
            where = f" in {self.contract or '?'}.{self.function or '?'}"
        return f"{self.error_name}({inner}){where}"

    def __str__(self) -> str:
        return self._message()

    def __reduce__(self) -> tuple[Any, ...]:
        return (
            _rebuild_revert,
            (type(self), self.error_name, self.error_args, self.contract, self.function, self.data),
        )


def _rebuild_revert(
    cls: type[ContractRevert], name: str, args: dict, contract: Any, function: Any, data: Any
) -> ContractRevert:
    return cls(name, args, contract=contract, function=function, data=data)


def _fmt(v: Any) -> str:
    if isinstance(v, IntEnum):
        return f"{type(v).__name__}.{v.name}"
    if isinstance(v, (bytes, bytearray)):
        role = ROLE_NAMES.get(bytes(v))
        return role if role is not None else "0x" + bytes(v).hex()
    if isinstance(v, str):
        return v if v.startswith("0x") else repr(v)
    return repr(v)


class RevertWithReason(ContractRevert):
    """``require(cond, "reason")`` / ``revert("reason")``: Solidity's ``Error(string)``."""


class PanicRevert(ContractRevert):
    """Solidity ``Panic(uint256)`` (overflow, division by zero, assert...)."""


class UnknownRevert(ContractRevert):
    """A revert whose data matches no known error (``args['data']`` holds it)."""


class TransactionFailed(ContractRevert):
    """A mined transaction failed and replaying it gave no revert data (e.g. out of gas)."""


# Registry
class EmptyDescriptor(ContractRevert): ...


class AlreadyRegistered(ContractRevert): ...


class NotRegistered(ContractRevert): ...


class InvalidStatusTransition(ContractRevert): ...


class EmptyEncryptionKey(ContractRevert): ...


class NotAnIdentity(ContractRevert): ...


# Coordinator
class NotGovernance(ContractRevert): ...


class NotAggregator(ContractRevert): ...


class NotAuthorizedToFail(ContractRevert): ...


class InvalidTaskParameter(ContractRevert): ...


class UnknownTask(ContractRevert): ...


class WrongTaskStatus(ContractRevert): ...


class ClientNotApproved(ContractRevert): ...


class AlreadyParticipant(ContractRevert): ...


class TaskFull(ContractRevert): ...


class NotParticipant(ContractRevert): ...


class NotEnoughParticipants(ContractRevert): ...


class UnknownRound(ContractRevert): ...


class WrongPhase(ContractRevert): ...


class CommitDeadlinePassed(ContractRevert): ...


class RevealDeadlinePassed(ContractRevert): ...


class AlreadyCommitted(ContractRevert): ...


class AlreadyRevealed(ContractRevert): ...


class NotCommitted(ContractRevert): ...


class CommitmentMismatch(ContractRevert): ...


class EmptyCommitment(ContractRevert): ...


class EmptyCid(ContractRevert): ...


class ZeroSamples(ContractRevert): ...


class EmptyContentHash(ContractRevert): ...


class SamplesAboveCap(ContractRevert): ...


class CopiedGlobal(ContractRevert): ...


class DuplicateUpdate(ContractRevert): ...


class PhaseStillOpen(ContractRevert): ...


class NotRevealed(ContractRevert): ...


class DuplicateIncluded(ContractRevert): ...


class UnsortedIncluded(ContractRevert): ...


class LengthMismatch(ContractRevert): ...


class ScoreOutOfRange(ContractRevert): ...


class TooFewIncluded(ContractRevert): ...


class TooManyIncluded(ContractRevert): ...


class WrongGlobalAdapter(ContractRevert): ...


class NothingToClaim(ContractRevert): ...


class TokenMinterMismatch(ContractRevert): ...


class InvalidMetricName(ContractRevert): ...


class MetricAlreadyReported(ContractRevert): ...


class EmptyBatch(ContractRevert): ...


class BatchCallFailed(ContractRevert): ...


# RewardToken
class NotMinter(ContractRevert): ...


class ZeroMinter(ContractRevert): ...


# OpenZeppelin 5
class AccessControlUnauthorizedAccount(ContractRevert): ...


class AccessControlBadConfirmation(ContractRevert): ...


class AccessControlInvalidDefaultAdmin(ContractRevert): ...


class AccessControlEnforcedDefaultAdminRules(ContractRevert): ...


class AccessControlEnforcedDefaultAdminDelay(ContractRevert): ...


class SafeCastOverflowedUintDowncast(ContractRevert): ...


class ERC20InsufficientBalance(ContractRevert): ...


class ERC20InvalidSender(ContractRevert): ...


class ERC20InvalidReceiver(ContractRevert): ...


class ERC20InsufficientAllowance(ContractRevert): ...


class ERC20InvalidApprover(ContractRevert): ...


class ERC20InvalidSpender(ContractRevert): ...


_REVERT_CLASSES: dict[str, type[ContractRevert]] = {
    cls.__name__: cls
    for cls in list(globals().values())
    if isinstance(cls, type) and issubclass(cls, ContractRevert) and cls is not ContractRevert
}

# OpenZeppelin 5 errors the contracts can raise, so they decode even from a partial ABI.
_OZ_ERRORS: list[dict[str, Any]] = [
    {"type": "error", "name": "AccessControlUnauthorizedAccount",
     "inputs": [{"name": "account", "type": "address"}, {"name": "neededRole", "type": "bytes32"}]},
    {"type": "error", "name": "AccessControlBadConfirmation", "inputs": []},
    {"type": "error", "name": "AccessControlInvalidDefaultAdmin",
     "inputs": [{"name": "defaultAdmin", "type": "address"}]},
    {"type": "error", "name": "AccessControlEnforcedDefaultAdminRules", "inputs": []},
    {"type": "error", "name": "AccessControlEnforcedDefaultAdminDelay",
     "inputs": [{"name": "schedule", "type": "uint48"}]},
    {"type": "error", "name": "ERC20InsufficientBalance",
     "inputs": [{"name": "sender", "type": "address"}, {"name": "balance", "type": "uint256"},
                {"name": "needed", "type": "uint256"}]},
    {"type": "error", "name": "ERC20InvalidSender", "inputs": [{"name": "sender", "type": "address"}]},
    {"type": "error", "name": "ERC20InvalidReceiver", "inputs": [{"name": "receiver", "type": "address"}]},
    {"type": "error", "name": "ERC20InsufficientAllowance",
     "inputs": [{"name": "spender", "type": "address"}, {"name": "allowance", "type": "uint256"},
                {"name": "needed", "type": "uint256"}]},
    {"type": "error", "name": "ERC20InvalidApprover", "inputs": [{"name": "approver", "type": "address"}]},
    {"type": "error", "name": "ERC20InvalidSpender", "inputs": [{"name": "spender", "type": "address"}]},
]  # fmt: skip

_PANIC_CODES = {
    0x01: "assert failed",
    0x11: "arithmetic overflow or underflow",
    0x12: "division or modulo by zero",
    0x21: "invalid enum value",
    0x22: "bad storage byte array",
    0x31: "pop on empty array",
    0x32: "array index out of bounds",
    0x41: "out of memory",
    0x51: "call to a zero-initialized function",
}


def revert_class(name: str) -> type[ContractRevert]:
    """The exception class for the Solidity error ``name`` (created on first use if unknown)."""
    cls = _REVERT_CLASSES.get(name)
    if cls is None:
        cls = type(name, (ContractRevert,), {"__module__": __name__})
        _REVERT_CLASSES[name] = cls
    return cls


def _abi_type(inp: dict[str, Any]) -> str:
    t = inp["type"]
    if t.startswith("tuple"):
        return "(" + ",".join(_abi_type(c) for c in inp["components"]) + ")" + t[5:]
    return t


class ErrorDecoder:
    """Maps 4-byte selectors of every ``error`` entry in the given ABIs to decoders."""

    def __init__(self, abis: Iterable[Sequence[dict[str, Any]]] = ()) -> None:
        self._by_selector: dict[bytes, tuple[str, list[str], list[str]]] = {}
        self.add(_OZ_ERRORS)
        for abi in abis:
            self.add(abi)

    def add(self, abi: Sequence[dict[str, Any]]) -> None:
        for entry in abi:
            if entry.get("type") != "error":
                continue
            types = [_abi_type(i) for i in entry.get("inputs", [])]
            names = [i.get("name") or f"arg{n}" for n, i in enumerate(entry.get("inputs", []))]
            sig = f"{entry['name']}({','.join(types)})"
            self._by_selector[function_signature_to_4byte_selector(sig)] = (
                entry["name"],
                types,
                names,
            )

    def decode(
        self, data: bytes | str | None, contract: str | None = None, function: str | None = None
    ) -> ContractRevert:
        """The exception for revert ``data`` (bytes or 0x-hex)."""
        raw = _to_bytes(data)
        ctx = {"contract": contract, "function": function, "data": raw}
        if len(raw) < 4:
            return UnknownRevert("UnknownRevert", {"data": "0x" + raw.hex()}, **ctx)
        sel, body = raw[:4], raw[4:]
        if sel == function_signature_to_4byte_selector("Error(string)"):
            (reason,) = abi_decode(["string"], body)
            return RevertWithReason("Error", {"reason": reason}, **ctx)
        if sel == function_signature_to_4byte_selector("Panic(uint256)"):
            (code,) = abi_decode(["uint256"], body)
            return PanicRevert(
                "Panic", {"code": code, "meaning": _PANIC_CODES.get(code, "unknown")}, **ctx
            )
        known = self._by_selector.get(sel)
        if known is None:
            return UnknownRevert("UnknownRevert", {"data": "0x" + raw.hex()}, **ctx)
        name, types, names = known
        values = abi_decode(types, body)
        enums = _ENUM_ARGS.get(name, {})
        args = {
            n: _normalize(enums[n](v) if n in enums else v)
            for n, v in zip(names, values, strict=True)
        }
        return revert_class(name)(name, args, **ctx)


def _to_bytes(data: Any) -> bytes:
    if data is None:
        return b""
    if isinstance(data, Mapping):
        data = data.get("data", "")
    if isinstance(data, (bytes, bytearray)):
        return bytes(data)
    text = str(data)
    rep = re.search(r"""b(['"]).*\1""", text, re.S)
    if rep and "0x" not in text:
        try:
            value = ast.literal_eval(rep.group(0))
            if isinstance(value, bytes):
                return value
        except (ValueError, SyntaxError):
            pass
    m = re.search(r"0x[0-9a-fA-F]*", text)
    return bytes.fromhex(m.group(0)[2:]) if m and len(m.group(0)) % 2 == 0 else b""


def _normalize(v: Any) -> Any:
    if isinstance(v, IntEnum):
        return v
    if isinstance(v, str) and Web3.is_address(v):
        return to_checksum_address(v)
    if isinstance(v, (bytes, bytearray, HexBytes)):
        return bytes(v)
    if isinstance(v, (list, tuple)):
        return [_normalize(x) for x in v]
    return v


# ---------------------------------------------------------------------------- helpers


def make_commitment(
    chain_id: int,
    coordinator: str,
    task_id: int,
    round: int,
    sender: str,
    cid: str,
    sha256: bytes,
    num_samples: int,
    salt: bytes,
) -> bytes:
    """The value to commit: ``keccak256(abi.encode(chainid, coordinator, taskId, round, sender,
    cid, sha256, numSamples, salt))``. It binds the deployment, the task, the round and the
    sender, so a commitment can be neither copied by another client nor replayed later."""
    return keccak(
        abi_encode(
            ["uint256", "address", "uint256", "uint32", "address", "string", "bytes32", "uint32", "bytes32"],
            [
                int(chain_id),
                to_checksum_address(coordinator),
                int(task_id),
                int(round),
                to_checksum_address(sender),
                cid,
                _bytes32(sha256, "sha256"),
                int(num_samples),
                _bytes32(salt, "salt"),
            ],
        )
    )


def new_salt() -> bytes:
    """A fresh random 32-byte commitment salt (store it until the reveal)."""
    return os.urandom(32)


def _bytes32(value: bytes | str, what: str) -> bytes:
    raw = bytes(HexBytes(value)) if isinstance(value, str) else bytes(value)
    if len(raw) != 32:
        raise ValueError(f"{what} must be 32 bytes, got {len(raw)}")
    return raw


def _snake(name: str) -> str:
    s = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name)
    return re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1_\2", s).lower().rstrip("_")


T = TypeVar("T")
#: One call of a contract function: its name and arguments (``Coordinator.send_calls``).
Call = tuple[str, Sequence[Any]]


@functools.cache
def _init_fields(cls: type) -> tuple[dict[str, Any], list[dataclasses.Field]]:
    """A dataclass's resolved type hints and constructor fields (resolving hints is slow)."""
    return get_type_hints(cls), [f for f in dataclasses.fields(cls) if f.init]


def _from_abi(cls: type[T], values: Any) -> T:
    """Build dataclass ``cls`` from a decoded ABI tuple/dict, converting enums, bytes, structs."""
    hints, fields = _init_fields(cls)
    if isinstance(values, Mapping):
        by_name = {_snake(k): v for k, v in values.items()}
        raw = [by_name[f.name] for f in fields]
    else:
        raw = list(values)
    out = {}
    for f, v in zip(fields, raw, strict=True):
        out[f.name] = _convert(hints[f.name], v)
    return cls(**out)


def _convert(hint: Any, v: Any) -> Any:
    if isinstance(hint, type):
        if issubclass(hint, IntEnum):
            return hint(v)
        if dataclasses.is_dataclass(hint):
            return _from_abi(hint, v)
        if hint is bytes:
            return bytes(HexBytes(v))
        if hint is str and isinstance(v, str) and Web3.is_address(v) and v.startswith("0x"):
            return to_checksum_address(v)
    if getattr(hint, "__origin__", None) is list:
        (inner,) = hint.__args__
        return [_convert(inner, x) for x in v]
    return _normalize(v)


# --------------------------------------------------------------------- struct views


@dataclass(frozen=True)
class ClientInfo:
    status: ClientStatus
    registered_at: int
    updated_at: int
    descriptor_hash: bytes


@dataclass(frozen=True)
class TaskParams:
    """Coordinator.TaskParams; amounts are in the reward token's smallest unit, durations in
    seconds (each at most ``MAX_PHASE_DURATION``)."""

    base_model_id: str
    base_model_hash: bytes
    hyper_params_cid: str
    initial_adapter_cid: str
    initial_adapter_sha256: bytes
    num_rounds: int
    max_failed_rounds: int
    min_participants: int
    max_participants: int
    weighting: Weighting
    sample_cap: int
    commit_duration: int
    reveal_duration: int
    aggregation_duration: int
    reward_per_update: int
    aggregator_reward: int
    reward_budget: int

    @classmethod
    def for_spec(
        cls,
        spec: Any,
        hyper_params_cid: str,
        initial_adapter_cid: str = "",
        initial_adapter_sha256: bytes = b"",
        *,
        num_rounds: int,
        min_participants: int,
        max_participants: int,
        max_failed_rounds: int,
        commit_duration: int,
        reveal_duration: int,
        aggregation_duration: int,
        reward_per_update: int,
        aggregator_reward: int,
        sample_cap: int,
        weighting: Weighting | str = Weighting.SAMPLES,
    ) -> TaskParams:
        """Parameters for a task whose spec (a ``TaskSpec``) is pinned at ``hyper_params_cid``.

        ``initial_adapter_sha256`` is the sha256 of the initial adapter's weights file (empty
        when the task starts from the bare base model). The reward budget covers every round
        with all participants and the aggregator paid in full (failed rounds pay nothing), so
        a task never runs short. A spec with client-level DP and an ε budget must fit its
        rounds into it (``prismesh.chain.privacy.plan_budget``: refused with ``BudgetExceeded``
        when the spec says ``on_budget = "stop"``, logged otherwise).
        """
        from prismesh.chain.privacy import plan_budget

        plan_budget(spec.privacy_spec, num_rounds, max_failed_rounds)
        per_round = reward_per_update * max_participants + aggregator_reward
        return cls(
            base_model_id=spec.base_model_id,
            base_model_hash=spec.base_model_hash,
            hyper_params_cid=hyper_params_cid,
            initial_adapter_cid=initial_adapter_cid,
            initial_adapter_sha256=bytes(initial_adapter_sha256) or b"\x00" * 32,
            num_rounds=num_rounds,
            max_failed_rounds=max_failed_rounds,
            min_participants=min_participants,
            max_participants=max_participants,
            weighting=parse_weighting(weighting),
            sample_cap=sample_cap,
            commit_duration=commit_duration,
            reveal_duration=reveal_duration,
            aggregation_duration=aggregation_duration,
            reward_per_update=reward_per_update,
            aggregator_reward=aggregator_reward,
            reward_budget=per_round * num_rounds,
        )

    # The ABI width of every integer field (the contract's own range checks come on top).
    _BITS: ClassVar[dict[str, int]] = {
        "num_rounds": 32, "max_failed_rounds": 32, "min_participants": 8, "max_participants": 8,
        "sample_cap": 32, "commit_duration": 32, "reveal_duration": 32, "aggregation_duration": 32,
        "reward_per_update": 128, "aggregator_reward": 128, "reward_budget": 256,
    }  # fmt: skip

    def to_abi(self) -> tuple[Any, ...]:
        """The ABI tuple; a value outside its field's integer type raises ``ValueError`` naming it."""
        for name, bits in self._BITS.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**bits:
                raise ValueError(f"task parameter {name}={value!r} is not a uint{bits}")
        return (
            self.base_model_id,
            _bytes32(self.base_model_hash, "base_model_hash"),
            self.hyper_params_cid,
            self.initial_adapter_cid,
            _bytes32(self.initial_adapter_sha256 or b"\x00" * 32, "initial_adapter_sha256"),
            self.num_rounds,
            self.max_failed_rounds,
            self.min_participants,
            self.max_participants,
            int(self.weighting),
            self.sample_cap,
            self.commit_duration,
            self.reveal_duration,
            self.aggregation_duration,
            self.reward_per_update,
            self.aggregator_reward,
            self.reward_budget,
        )

    @property
    def round_pool_max(self) -> int:
        """The most one accepted round can pay (every participant included, plus the fee)."""
        return self.reward_per_update * self.max_participants + self.aggregator_reward


def parse_weighting(value: Weighting | str | int) -> Weighting:
    """``Weighting`` from itself, its value or its name (``"samples"``, ``"uniform"``)."""
    if isinstance(value, Weighting):
        return value
    if isinstance(value, str):
        try:
            return Weighting[value.strip().upper()]
        except KeyError:
            names = ", ".join(w.name.lower() for w in Weighting)
            raise ValueError(f"unknown weighting {value!r}; known: {names}") from None
    return Weighting(int(value))


@dataclass(frozen=True)
class TaskState:
    """Coordinator.TaskState: the task and its current round (``phase`` is the stored phase;
    ``Coordinator.phase_of`` is live). The global adapter's CID is in the events only; its
    hash (the first 16 bytes of its keccak256) and its weights' sha256 are here."""

    status: TaskStatus
    phase: Phase
    participant_count: int
    commit_count: int
    reveal_count: int
    current_round: int
    completed_rounds: int
    failed_rounds: int
    opened_at: int
    rewards_paid: int
    global_cid_hash: bytes
    global_sha256: bytes
    creator: str


@dataclass(frozen=True)
class RoundInfo:
    """Coordinator.RoundInfo: the effective phase; deadlines and counts for the current round
    (earlier rounds report only their outcome)."""

    phase: Phase
    opened_at: int
    commit_deadline: int
    reveal_deadline: int
    aggregation_deadline: int
    commit_count: int
    reveal_count: int


@dataclass(frozen=True)
class Submission:
    """Coordinator.Submission: one client's submission in one round (empty for a round the
    client has moved past; the events keep every submission)."""

    status: SubmissionStatus
    commitment: bytes
    num_samples: int

    @property
    def committed(self) -> bool:
        return self.status >= SubmissionStatus.COMMITTED

    @property
    def revealed(self) -> bool:
        return self.status >= SubmissionStatus.REVEALED

    @property
    def accepted(self) -> bool:
        return self.status == SubmissionStatus.ACCEPTED


# ------------------------------------------------------------------------------ events


@dataclass(frozen=True)
class Event:
    """Common fields of every decoded event."""

    event: str
    address: str
    block_number: int
    tx_hash: str
    log_index: int


@dataclass(frozen=True)
class ClientRegistered(Event):
    client: str
    descriptor_hash: bytes


@dataclass(frozen=True)
class DescriptorUpdated(Event):
    client: str
    descriptor_hash: bytes


@dataclass(frozen=True)
class EncryptionKeySet(Event):
    account: str
    key: bytes


@dataclass(frozen=True)
class ClientStatusChanged(Event):
    client: str
    previous: ClientStatus
    current: ClientStatus
    by: str


@dataclass(frozen=True)
class RoleGranted(Event):
    role: bytes
    account: str
    sender: str


@dataclass(frozen=True)
class RoleRevoked(Event):
    role: bytes
    account: str
    sender: str


@dataclass(frozen=True)
class RoleAdminChanged(Event):
    role: bytes
    previous_admin_role: bytes
    new_admin_role: bytes


@dataclass(frozen=True)
class Transfer(Event):
    from_: str
    to: str
    value: int


@dataclass(frozen=True)
class Approval(Event):
    owner: str
    spender: str
    value: int


@dataclass(frozen=True)
class DefaultAdminTransferScheduled(Event):
    new_admin: str
    accept_schedule: int


@dataclass(frozen=True)
class DefaultAdminTransferCanceled(Event):
    pass


@dataclass(frozen=True)
class DefaultAdminDelayChangeScheduled(Event):
    new_delay: int
    effect_schedule: int


@dataclass(frozen=True)
class DefaultAdminDelayChangeCanceled(Event):
    pass


@dataclass(frozen=True)
class TaskCreated(Event):
    task_id: int
    creator: str
    params: TaskParams


@dataclass(frozen=True)
class ParticipantJoined(Event):
    task_id: int
    client: str
    participant_count: int


@dataclass(frozen=True)
class TaskStarted(Event):
    task_id: int
    participant_count: int


@dataclass(frozen=True)
class RoundOpened(Event):
    task_id: int
    round: int
    global_adapter_cid: str
    commit_deadline: int
    reveal_deadline: int
    aggregation_deadline: int


@dataclass(frozen=True)
class PhaseChanged(Event):
    task_id: int
    round: int
    previous: Phase
    current: Phase


@dataclass(frozen=True)
class UpdateCommitted(Event):
    task_id: int
    round: int
    client: str
    commitment: bytes


@dataclass(frozen=True)
class UpdateRevealed(Event):
    task_id: int
    round: int
    client: str
    cid: str
    sha256: bytes
    num_samples: int


@dataclass(frozen=True)
class AggregateAccepted(Event):
    task_id: int
    round: int
    aggregator: str
    aggregate_cid: str
    aggregate_sha256: bytes
    included: list[str]


@dataclass(frozen=True)
class RewardEarned(Event):
    """A reward credited to ``recipient`` (minted when it claims): a contributor's share for
    its update's contribution ``score`` (of ``SCORE_SCALE``), or the aggregator's fee."""

    task_id: int
    round: int
    recipient: str
    score: int
    amount: int
    is_aggregator: bool


@dataclass(frozen=True)
class RewardsClaimed(Event):
    task_id: int
    account: str
    amount: int


@dataclass(frozen=True)
class FeesClaimed(Event):
    aggregator: str
    amount: int


@dataclass(frozen=True)
class RoundFailed(Event):
    task_id: int
    round: int
    reason: str


@dataclass(frozen=True)
class MetricReported(Event):
    task_id: int
    round: int
    client: str
    metric: str
    value: int


@dataclass(frozen=True)
class TaskCompleted(Event):
    task_id: int
    final_adapter_cid: str


@dataclass(frozen=True)
class TaskFailed(Event):
    task_id: int
    reason: str


@dataclass(frozen=True)
class TaskCancelled(Event):
    task_id: int
    reason: str


EVENT_CLASSES: dict[str, type[Event]] = {
    cls.__name__: cls
    for cls in list(globals().values())
    if isinstance(cls, type) and issubclass(cls, Event) and cls is not Event
}


def _decode_event(cls: type[Event], log: Any) -> Event:
    args = dict(log["args"])
    if "from" in args:
        args["from_"] = args.pop("from")
    meta = {
        "event": log["event"],
        "address": to_checksum_address(log["address"]),
        "block_number": int(log["blockNumber"]),
        "tx_hash": "0x" + bytes(log["transactionHash"]).hex(),
        "log_index": int(log["logIndex"]),
    }
    hints = get_type_hints(cls)
    by_name = {_snake(k) if k != "from_" else k: v for k, v in args.items()}
    fields = {f.name for f in dataclasses.fields(cls)} - set(meta)
    missing = fields - set(by_name)
    if missing:
        raise ValueError(f"event {log['event']} lacks fields {sorted(missing)}")
    values = {name: _convert(hints[name], by_name[name]) for name in fields}
    return cls(**meta, **values)


# ------------------------------------------------------------------------- transactions


_IN_PROCESS_GAS = 10_000_000
_NONCE_LOCKS: dict[str, threading.Lock] = {}
_NONCE_LOCKS_GUARD = threading.Lock()


def _nonce_lock(address: str) -> threading.Lock:
    with _NONCE_LOCKS_GUARD:
        return _NONCE_LOCKS.setdefault(address, threading.Lock())


def _gas_limit(estimate: int) -> int:
    """The gas limit sent for an estimate: a fifth more and 10k, for state that moves between
    the estimate and the block."""
    return int(estimate * 1.2) + 10_000


def fee_fields(block: Mapping[str, Any], tip: int = 10**9) -> dict[str, int]:
    """EIP-1559 fees for a transaction after ``block``: the priority ``tip`` and room for the
    base fee to double."""
    return {"maxPriorityFeePerGas": tip, "maxFeePerGas": 2 * int(block.get("baseFeePerGas", 0) or 0) + tip}


def await_receipt(w3: Web3, tx_hash: bytes, timeout: float = 120.0) -> TxReceipt:
    """The receipt of a sent transaction, asked for at once and then after 2, 4, 8, ... ms (at
    most 50 ms apart). anvil answers a send before it mines, by well under a millisecond to a
    few: a fixed poll interval would have most transactions wait that interval in full."""
    import time

    from web3.exceptions import TimeExhausted, TransactionIndexingInProgress, TransactionNotFound

    deadline = time.monotonic() + timeout
    pause = 0.002
    while True:
        try:
            return w3.eth.get_transaction_receipt(tx_hash)
        except (TransactionNotFound, TransactionIndexingInProgress):
            pass
        if time.monotonic() >= deadline:
            raise TimeExhausted(f"transaction 0x{bytes(tx_hash).hex()} is not in the chain after {timeout} seconds")
        time.sleep(pause)
        pause = min(pause * 2, 0.05)


class TxSender:
    """Signs, sends and waits for transactions from one local account; decodes reverts."""

    def __init__(
        self,
        w3: Web3,
        account: LocalAccount,
        decoder: ErrorDecoder | None = None,
        timeout: float = 120.0,
    ) -> None:
        self.w3 = w3
        self.account = account
        self.decoder = decoder or ErrorDecoder()
        self.timeout = timeout
        self._chain_id: int | None = None
        self._in_process = type(w3.provider).__name__ == "EthereumTesterProvider"
        self._batched = isinstance(w3.provider, HTTPProvider)

    @property
    def chain_id(self) -> int:
        if self._chain_id is None:
            self._chain_id = int(self.w3.eth.chain_id)
        return self._chain_id

    def send(
        self, tx: dict[str, Any], contract: str | None = None, function: str | None = None
    ) -> TxReceipt:
        """Fill nonce, gas and fees into ``tx``, sign, send, wait; raise on revert."""
        tx = dict(tx)
        tx["from"] = self.account.address
        tx.setdefault("value", 0)
        # Threads of one process sending from the same account take nonces in turn.
        with _nonce_lock(self.account.address):
            if self._batched and self._fill_in_one_batch(tx, contract, function):
                signed = self.account.sign_transaction(tx)
                tx_hash = HexBytes(self.w3.manager.request_blocking(
                    "eth_sendRawTransaction", ["0x" + bytes(signed.raw_transaction).hex()]))
            else:
                self._fill(tx, contract, function)
                signed = self.account.sign_transaction(tx)
                try:
                    tx_hash = self.w3.eth.send_raw_transaction(signed.raw_transaction)
                except _reverts() as exc:
                    # The in-process chain executes on submission and raises instead of mining.
                    raise self._decode_exc(exc, contract, function) from exc
        receipt = await_receipt(self.w3, tx_hash, self.timeout)
        if receipt["status"] != 1:
            raise self._replay_failure(tx, receipt, contract, function)
        return receipt

    def _fill(self, tx: dict[str, Any], contract: str | None, function: str | None) -> None:
        """Gas, fees and nonce through web3, one request each (any provider)."""
        if "gas" not in tx:
            # Estimate without chainId/nonce: web3's validation would add an eth_chainId call.
            probe = {k: tx[k] for k in ("from", "to", "data", "value") if k in tx}
            try:
                if self._in_process:
                    # py-evm's estimate is a binary search (a dozen executions); one call
                    # finds a revert and the limit only bounds, it is not charged.
                    self.w3.eth.call(probe)  # type: ignore[arg-type]
                    tx["gas"] = _IN_PROCESS_GAS
                else:
                    tx["gas"] = _gas_limit(self.w3.eth.estimate_gas(probe))  # type: ignore[arg-type]
            except _reverts(ValueError) as exc:
                raise self._decode_exc(exc, contract, function) from exc
        if "maxFeePerGas" not in tx and "gasPrice" not in tx:
            block = self.w3.eth.get_block("latest")
            tx["gas"] = min(int(tx["gas"]), int(block["gasLimit"]))
            tx.update(fee_fields(block))
        tx.setdefault("chainId", self.chain_id)
        tx["nonce"] = self.w3.eth.get_transaction_count(self.account.address, "pending")

    def _fill_in_one_batch(self, tx: dict[str, Any], contract: str | None, function: str | None) -> bool:
        """Gas, fees and nonce in one JSON-RPC batch, as the requests go on the wire: three round
        trips and web3's formatting of each cost about 3 ms a transaction, the batch 0.6. False
        (and web3's requests from then on) when the node does not answer batches."""
        calls: list[tuple[str, list[Any]]] = []
        if "gas" not in tx:
            probe = {"from": tx["from"], "value": hex(int(tx["value"]))}
            if tx.get("to") is not None:
                probe["to"] = tx["to"]
            if tx.get("data") is not None:
                probe["data"] = tx["data"] if isinstance(tx["data"], str) else "0x" + bytes(tx["data"]).hex()
            calls.append(("eth_estimateGas", [probe]))
        fees = "maxFeePerGas" not in tx and "gasPrice" not in tx
        if fees:
            calls.append(("eth_getBlockByNumber", ["latest", False]))
        calls.append(("eth_getTransactionCount", [tx["from"], "pending"]))
        answers = self.w3.provider.make_batch_request(calls)  # type: ignore[attr-defined]
        if not isinstance(answers, list) or len(answers) != len(calls):
            self._batched = False
            return False
        results = []
        for (method, _), answer in zip(calls, answers, strict=True):
            if answer.get("error") is not None:
                raise self._rpc_failure(method, answer, contract, function)
            results.append(answer["result"])
        if "gas" not in tx:
            tx["gas"] = _gas_limit(int(results.pop(0), 16))
        if fees:
            block = results.pop(0)
            tx["gas"] = min(int(tx["gas"]), int(block["gasLimit"], 16))
            tx.update(fee_fields({"baseFeePerGas": int(block.get("baseFeePerGas") or "0x0", 16)}))
        tx.setdefault("chainId", self.chain_id)
        tx["nonce"] = int(results.pop(0), 16)
        return True

    def _rpc_failure(self, method: str, answer: Mapping[str, Any], contract: str | None,
                     function: str | None) -> Exception:
        """A batched request's error as web3 would have raised it: a revert decoded by name."""
        error = answer["error"]
        message = str(error.get("message", ""))
        raw = _to_bytes(error.get("data"))
        if raw:
            return self.decoder.decode(raw, contract, function)
        if "revert" in message:
            return UnknownRevert("UnknownRevert", {"data": "0x", "message": message}, contract=contract, function=function)
        return Web3RPCError(f"{method}: {message}", rpc_response=answer)  # type: ignore[arg-type]

    def _decode_exc(
        self, exc: Exception, contract: str | None, function: str | None
    ) -> ContractRevert:
        data = getattr(exc, "data", None)
        if data is None and exc.args:
            data = exc.args[-1] if isinstance(exc.args[-1], (str, bytes, dict)) else None
        raw = _to_bytes(data)
        if not raw and isinstance(exc, Web3RPCError):
            rpc = getattr(exc, "rpc_response", None) or {}
            raw = _to_bytes((rpc.get("error") or {}).get("data"))
        if not raw:
            message = getattr(exc, "message", None) or str(exc)
            if isinstance(exc, (ContractLogicError, *_in_process_failure())) and "revert" in str(message):
                return UnknownRevert(
                    "UnknownRevert",
                    {"data": "0x", "message": str(message)},
                    contract=contract,
                    function=function,
                )
            raise exc
        return self.decoder.decode(raw, contract, function)

    def _replay_failure(
        self, tx: dict[str, Any], receipt: TxReceipt, contract: str | None, function: str | None
    ) -> ContractRevert:
        call = {k: tx[k] for k in ("from", "to", "data", "value", "gas") if k in tx}
        try:
            self.w3.eth.call(call, int(receipt["blockNumber"]) - 1)  # type: ignore[arg-type]
        except _reverts(ValueError) as exc:
            try:
                return self._decode_exc(exc, contract, function)
            except Exception:
                pass
        return TransactionFailed(
            "TransactionFailed",
            {
                "tx_hash": "0x" + bytes(receipt["transactionHash"]).hex(),
                "gas_used": int(receipt["gasUsed"]),
            },
            contract=contract,
            function=function,
        )


# ------------------------------------------------------------------------------ reads


def _abi_type(param: Mapping[str, Any]) -> str:
    """The canonical ABI type string of a parameter (structs as ``(t1,t2,...)``)."""
    t = str(param["type"])
    if t.startswith("tuple"):
        return "(" + ",".join(_abi_type(c) for c in param["components"]) + ")" + t[len("tuple"):]
    return t


def _checksummed(param: Mapping[str, Any], value: Any) -> Any:
    """A decoded value with its addresses checksummed, as web3 returns them."""
    t = str(param["type"])
    if t.endswith("]"):
        inner = {**param, "type": t[: t.rindex("[")]}
        return [_checksummed(inner, v) for v in value]
    if t == "tuple":
        return tuple(_checksummed(c, v) for c, v in zip(param["components"], value, strict=True))
    if t == "address":
        return to_checksum_address(value)
    return value


class AbiFunction:
    """A function's selector and ABI types: its calldata encoded and its output decoded
    directly, without web3's contract-function machinery, which costs a local read about twice
    the node's round trip. Outputs come back as web3 returns them (checksummed addresses)."""

    __slots__ = ("name", "selector", "inputs", "outputs", "_params")

    def __init__(self, entry: Mapping[str, Any]) -> None:
        self.name = str(entry["name"])
        self.inputs = [_abi_type(p) for p in entry.get("inputs", [])]
        self._params = list(entry.get("outputs", []))
        self.outputs = [_abi_type(p) for p in self._params]
        self.selector = function_signature_to_4byte_selector(f"{entry['name']}({','.join(self.inputs)})")

    @classmethod
    def named(cls, abi: Sequence[Mapping[str, Any]], name: str) -> AbiFunction:
        """The (only) function called ``name`` in ``abi``."""
        (entry,) = [e for e in abi if e.get("type") == "function" and e.get("name") == name]
        return cls(entry)

    def encode(self, args: Sequence[Any]) -> bytes:
        return self.selector + abi_encode(self.inputs, list(args))

    def decode(self, raw: bytes) -> Any:
        values = abi_decode(self.outputs, bytes(raw))
        out = [_checksummed(p, v) for p, v in zip(self._params, values, strict=True)]
        return out[0] if len(out) == 1 else out

    def read(self, contract: Any, *args: Any) -> Any:
        """Call this view on ``contract`` (a web3 contract) at the latest block. Arguments it
        cannot encode, or an answer it cannot decode (no such contract there), go through
        web3's own call, which names the problem."""
        try:
            data = self.encode(args)
        except Exception:  # noqa: BLE001 - web3's path below names what is wrong with the arguments
            return getattr(contract.functions, self.name)(*args).call()
        try:
            # The request as it goes on the wire: web3's formatting of a call's fields and of
            # its answer costs as much again as the read itself.
            raw = contract.w3.manager.request_blocking(
                "eth_call", [{"to": contract.address, "data": "0x" + data.hex()}, "latest"])
            return self.decode(HexBytes(raw))
        except Exception:  # noqa: BLE001 - a revert or an undecodable answer: web3's call raises its own error
            return getattr(contract.functions, self.name)(*args).call()


_FUNCTIONS: dict[str, tuple[dict[str, AbiFunction], dict[str, AbiFunction]]] = {}


def _functions_of(abi: Sequence[Mapping[str, Any]], key: str) -> tuple[dict[str, AbiFunction], dict[str, AbiFunction]]:
    """The ABI's view and pure functions by name, and its other (transaction) functions by
    name; overloaded names are left to web3. Kept per ABI hash ``key``."""
    found = _FUNCTIONS.get(key)
    if found is None:
        entries = [e for e in abi if e.get("type") == "function"]
        names = [e["name"] for e in entries]
        views: dict[str, AbiFunction] = {}
        transactions: dict[str, AbiFunction] = {}
        for e in entries:
            if names.count(e["name"]) == 1:
                kind = views if e.get("stateMutability") in ("view", "pure") else transactions
                kind[e["name"]] = AbiFunction(e)
        found = _FUNCTIONS[key] = (views, transactions)
    return found


# ------------------------------------------------------------------------------ clients

C = TypeVar("C", bound="ContractClient")


_DECODERS: dict[tuple[str, ...], ErrorDecoder] = {}


def _decoder_for(manifest: Manifest) -> ErrorDecoder:
    """One ErrorDecoder per set of ABIs (building one hashes every error signature)."""
    key = tuple(sorted(manifest.abi_hashes.values()))
    dec = _DECODERS.get(key)
    if dec is None:
        dec = _DECODERS[key] = ErrorDecoder(manifest.abis.values())
    return dec


class ContractClient:
    """Base of the typed clients: one deployed contract, an optional sender, event decoding."""

    NAME: ClassVar[str] = ""

    def __init__(self, manifest: Manifest, w3: Web3, sender: LocalAccount | None = None) -> None:
        if self.NAME not in manifest.addresses:
            raise KeyError(
                f"manifest has no address for {self.NAME} (has {sorted(manifest.addresses)})"
            )
        self.manifest = manifest
        self.w3 = w3
        self.address = to_checksum_address(manifest.addresses[self.NAME])
        self.abi = manifest.abis[self.NAME]
        self.contract = w3.eth.contract(address=self.address, abi=self.abi)
        self._views, self._transactions = _functions_of(self.abi, manifest.abi_hashes[self.NAME])
        self.decoder = _decoder_for(manifest)
        self.sender = sender
        self._tx = TxSender(w3, sender, self.decoder) if sender is not None else None

    @classmethod
    def read_only(cls: type[C], manifest: Manifest, w3: Web3) -> C:
        """A client that can only call views and read events."""
        return cls(manifest, w3, None)

    def with_sender(self: C, sender: LocalAccount) -> C:
        """The same contract, sending from ``sender``."""
        return type(self)(self.manifest, self.w3, sender)

    # -- plumbing
    def _call(self, fn: str, *args: Any) -> Any:
        try:
            view = self._views.get(fn)
            if view is None:
                return getattr(self.contract.functions, fn)(*args).call()
            return view.read(self.contract, *args)
        except _reverts() as exc:
            helper = TxSender(self.w3, self.sender, self.decoder) if self.sender else None
            if helper is None:
                data = _to_bytes(getattr(exc, "data", None))
                if data:
                    raise self.decoder.decode(data, self.NAME, fn) from exc
                raise
            raise helper._decode_exc(exc, self.NAME, fn) from exc

    def _calldata(self, fn: str, args: Sequence[Any]) -> str:
        """``fn``'s calldata, encoded directly; arguments only web3 accepts (a struct as a dict,
        bytes as hex text) or refuses go through web3's encoder, which names the problem."""
        direct = self._transactions.get(fn)
        if direct is not None:
            try:
                return "0x" + direct.encode(args).hex()
            except Exception:  # noqa: BLE001 - web3's encoder below accepts or names it
                pass
        return self.contract.encode_abi(fn, args=list(args))

    def _transact(self, fn: str, *args: Any, gas: int | None = None, label: str | None = None) -> TxReceipt:
        """Send ``fn(*args)``; ``label`` names the transaction in errors, logs and metrics
        instead of ``fn`` (a batch is named by the calls it carries)."""
        label = label or fn
        if self._tx is None:
            raise PermissionError(f"{self.NAME} client is read-only: cannot send {label}()")
        tx: dict[str, Any] = {"to": self.address, "data": self._calldata(fn, args), "value": 0}
        if gas is not None:
            tx["gas"] = gas
        try:
            receipt = self._tx.send(tx, self.NAME, label)
        except ContractRevert as exc:
            telemetry.transaction(self._tx.account.address, self.NAME, label, error=exc.error_name)
            raise
        telemetry.transaction(self._tx.account.address, self.NAME, label, receipt)
        return receipt

    # -- events
    def get_events(
        self, name: str, from_block: int = 0, to_block: int | str = "latest", **filters: Any
    ) -> list[Event]:
        """Decoded ``name`` events of this contract in ``[from_block, to_block]``; ``filters``
        match indexed arguments by their Solidity names (e.g. ``taskId=1``)."""
        cls = EVENT_CLASSES.get(name)
        event = getattr(self.contract.events, name, None)
        if cls is None or event is None:
            raise ValueError(f"{self.NAME} has no event {name!r}")
        logs = event.get_logs(
            from_block=from_block, to_block=to_block, argument_filters=filters or None
        )
        return [_decode_event(cls, log) for log in logs]

    def events_in(self, receipt: TxReceipt, name: str | None = None) -> list[Event]:
        """Events of this contract emitted in ``receipt`` (all, or only ``name``), in log order."""
        out: list[Event] = []
        for entry in self.abi:
            if entry.get("type") != "event" or (name and entry["name"] != name):
                continue
            cls = EVENT_CLASSES.get(entry["name"])
            if cls is None:
                continue
            ev = getattr(self.contract.events, entry["name"])
            for log in ev().process_receipt(receipt, errors=_DISCARD):
                out.append(_decode_event(cls, log))
        return sorted(out, key=lambda e: e.log_index)



def _discard_marker() -> Any:
    from web3.logs import DISCARD

    return DISCARD


_DISCARD = _discard_marker()

GOVERNANCE_ROLE = keccak(text="GOVERNANCE_ROLE")
AGGREGATOR_ROLE = keccak(text="AGGREGATOR_ROLE")
AUDITOR_ROLE = keccak(text="AUDITOR_ROLE")
DEFAULT_ADMIN_ROLE = b"\x00" * 32
ROLE_NAMES = {
    GOVERNANCE_ROLE: "GOVERNANCE_ROLE",
    AGGREGATOR_ROLE: "AGGREGATOR_ROLE",
    AUDITOR_ROLE: "AUDITOR_ROLE",
    DEFAULT_ADMIN_ROLE: "DEFAULT_ADMIN_ROLE",
}


class Registry(ContractClient):
    """Typed client of Registry.sol: clients, roles, and the two-step admin transfer."""

    NAME = "Registry"

    def register(self, descriptor_hash: bytes) -> TxReceipt:
        """Register the sender with its institution descriptor hash."""
        return self._transact("register", _bytes32(descriptor_hash, "descriptor_hash"))

    def update_descriptor(self, descriptor_hash: bytes) -> TxReceipt:
        """Replace the sender's descriptor hash."""
        return self._transact("updateDescriptor", _bytes32(descriptor_hash, "descriptor_hash"))

    def approve(self, client: str) -> TxReceipt:
        """Approve a pending client or reinstate a suspended one (governance)."""
        return self._transact("approve", to_checksum_address(client))

    def suspend(self, client: str) -> TxReceipt:
        """Suspend an approved client (governance)."""
        return self._transact("suspend", to_checksum_address(client))

    def revoke(self, client: str) -> TxReceipt:
        """Revoke a client for good (governance)."""
        return self._transact("revoke", to_checksum_address(client))

    def get_client(self, client: str) -> ClientInfo:
        return _from_abi(ClientInfo, self._call("getClient", to_checksum_address(client)))

    def status_of(self, client: str) -> ClientStatus:
        return ClientStatus(self._call("statusOf", to_checksum_address(client)))

    def is_approved(self, client: str) -> bool:
        return bool(self._call("isApproved", to_checksum_address(client)))

    def is_aggregator(self, account: str) -> bool:
        return bool(self._call("isAggregator", to_checksum_address(account)))

    def is_governance(self, account: str) -> bool:
        return bool(self._call("isGovernance", to_checksum_address(account)))

    def is_auditor(self, account: str) -> bool:
        return bool(self._call("isAuditor", to_checksum_address(account)))

    def set_encryption_key(self, key: bytes) -> TxReceipt:
        """Publish (or rotate) the sender's X25519 public key (32 raw bytes)."""
        return self._transact("setEncryptionKey", _bytes32(key, "key"))

    def encryption_key_of(self, account: str) -> bytes:
        """The X25519 public key ``account`` published (32 zero bytes: none)."""
        return bytes(self._call("encryptionKeyOf", to_checksum_address(account)))

    def add_auditor(self, account: str) -> TxReceipt:
        """grantRole(AUDITOR_ROLE, account) (admin)."""
        return self.grant_role(AUDITOR_ROLE, account)

    def client_count(self) -> int:
        return int(self._call("clientCount"))

    def governance_role(self) -> bytes:
        return bytes(self._call("GOVERNANCE_ROLE"))

    def aggregator_role(self) -> bytes:
        return bytes(self._call("AGGREGATOR_ROLE"))

    def auditor_role(self) -> bytes:
        return bytes(self._call("AUDITOR_ROLE"))

    def add_aggregator(self, account: str) -> TxReceipt:
        """grantRole(AGGREGATOR_ROLE, account) (admin)."""
        return self.grant_role(AGGREGATOR_ROLE, account)

    def remove_aggregator(self, account: str) -> TxReceipt:
        """revokeRole(AGGREGATOR_ROLE, account) (admin)."""
        return self.revoke_role(AGGREGATOR_ROLE, account)

    # -- AccessControl
    def has_role(self, role: bytes, account: str) -> bool:
        """AccessControl.hasRole."""
        return bool(self._call("hasRole", role, to_checksum_address(account)))

    def get_role_admin(self, role: bytes) -> bytes:
        """AccessControl.getRoleAdmin."""
        return bytes(self._call("getRoleAdmin", role))

    def grant_role(self, role: bytes, account: str) -> TxReceipt:
        """AccessControl.grantRole (role admin only; never DEFAULT_ADMIN_ROLE)."""
        return self._transact("grantRole", role, to_checksum_address(account))

    def revoke_role(self, role: bytes, account: str) -> TxReceipt:
        """AccessControl.revokeRole (role admin only)."""
        return self._transact("revokeRole", role, to_checksum_address(account))

    def renounce_role(self, role: bytes, account: str) -> TxReceipt:
        """AccessControl.renounceRole (``account`` must be the sender)."""
        return self._transact("renounceRole", role, to_checksum_address(account))

    def supports_interface(self, interface_id: bytes) -> bool:
        """ERC-165 supportsInterface."""
        return bool(self._call("supportsInterface", interface_id))

    def default_admin_role(self) -> bytes:
        """AccessControl.DEFAULT_ADMIN_ROLE (zero)."""
        return bytes(self._call("DEFAULT_ADMIN_ROLE"))

    # -- default-admin rules: the admin moves in two steps with a delay
    def default_admin(self) -> str:
        """The one holder of DEFAULT_ADMIN_ROLE."""
        return to_checksum_address(self._call("defaultAdmin"))

    def owner(self) -> str:
        """Alias of ``default_admin`` (ERC-5313)."""
        return to_checksum_address(self._call("owner"))

    def pending_default_admin(self) -> tuple[str, int]:
        """(new admin, timestamp from which it may accept); zero address when none pending."""
        admin, schedule = self._call("pendingDefaultAdmin")
        return to_checksum_address(admin), int(schedule)

    def default_admin_delay(self) -> int:
        """Seconds between beginning and accepting an admin transfer."""
        return int(self._call("defaultAdminDelay"))

    def pending_default_admin_delay(self) -> tuple[int, int]:
        delay, schedule = self._call("pendingDefaultAdminDelay")
        return int(delay), int(schedule)

    def default_admin_delay_increase_wait(self) -> int:
        return int(self._call("defaultAdminDelayIncreaseWait"))

    def begin_default_admin_transfer(self, new_admin: str) -> TxReceipt:
        """Step one (current admin): schedule the transfer to ``new_admin``."""
        return self._transact("beginDefaultAdminTransfer", to_checksum_address(new_admin))

    def cancel_default_admin_transfer(self) -> TxReceipt:
        """Cancel a pending transfer (current admin)."""
        return self._transact("cancelDefaultAdminTransfer")

    def accept_default_admin_transfer(self) -> TxReceipt:
        """Step two (the new admin, once the delay has passed)."""
        return self._transact("acceptDefaultAdminTransfer")

    def change_default_admin_delay(self, new_delay: int) -> TxReceipt:
        """Schedule a new admin-transfer delay (current admin)."""
        return self._transact("changeDefaultAdminDelay", int(new_delay))

    def rollback_default_admin_delay(self) -> TxReceipt:
        """Cancel a scheduled delay change (current admin)."""
        return self._transact("rollbackDefaultAdminDelay")


class RewardToken(ContractClient):
    """Typed client of RewardToken.sol (ERC-20 whose only minter is the Coordinator)."""

    NAME = "RewardToken"

    def mint(self, to: str, amount: int) -> TxReceipt:
        """Mint (the minter only: every other sender reverts with NotMinter)."""
        return self._transact("mint", to_checksum_address(to), int(amount))

    def minter(self) -> str:
        """The only account that can mint (the Coordinator), fixed at deployment."""
        return to_checksum_address(self._call("minter"))

    def transfer(self, to: str, amount: int) -> TxReceipt:
        return self._transact("transfer", to_checksum_address(to), int(amount))

    def approve(self, spender: str, amount: int) -> TxReceipt:
        return self._transact("approve", to_checksum_address(spender), int(amount))

    def transfer_from(self, owner: str, to: str, amount: int) -> TxReceipt:
        return self._transact(
            "transferFrom", to_checksum_address(owner), to_checksum_address(to), int(amount)
        )

    def balance_of(self, account: str) -> int:
        return int(self._call("balanceOf", to_checksum_address(account)))

    def allowance(self, owner: str, spender: str) -> int:
        return int(
            self._call("allowance", to_checksum_address(owner), to_checksum_address(spender))
        )

    def total_supply(self) -> int:
        return int(self._call("totalSupply"))

    def name(self) -> str:
        return str(self._call("name"))

    def symbol(self) -> str:
        return str(self._call("symbol"))

    def decimals(self) -> int:
        return int(self._call("decimals"))


def sort_included(addresses: Iterable[str]) -> list[str]:
    """Checksummed addresses in the ascending numeric order ``submitAggregate`` requires."""
    return sorted((to_checksum_address(a) for a in addresses), key=lambda a: int(a, 16))


class Coordinator(ContractClient):
    """Typed client of Coordinator.sol (tasks, rounds, commit/reveal, aggregates, rewards)."""

    NAME = "Coordinator"

    # -- governance
    def create_task(self, params: TaskParams) -> TxReceipt:
        """Create a task (governance); the id is in the receipt's TaskCreated event
        (``task_id_from``)."""
        return self._transact("createTask", params.to_abi())

    def task_id_from(self, receipt: TxReceipt) -> int:
        """The id of the task created in ``receipt``."""
        events = self.events_in(receipt, "TaskCreated")
        if not events:
            raise ValueError("receipt holds no TaskCreated event")
        return int(events[0].task_id)  # type: ignore[attr-defined]

    def start_task(self, task_id: int) -> TxReceipt:
        """Start a task and open round 1 (governance)."""
        return self._transact("startTask", int(task_id))

    def cancel_task(self, task_id: int, reason: str) -> TxReceipt:
        """Cancel an unfinished task (governance)."""
        return self._transact("cancelTask", int(task_id), reason)

    # -- clients
    def join_task(self, task_id: int) -> TxReceipt:
        """Join a task before it starts (approved clients)."""
        return self._transact("joinTask", int(task_id))

    def commitment_for(
        self, task_id: int, round: int, cid: str, sha256: bytes, num_samples: int, salt: bytes,
        sender: str | None = None,
    ) -> bytes:
        """The commitment the sender (or ``sender``) must submit for these reveal values."""
        who = sender or (self.sender.address if self.sender is not None else None)
        if who is None:
            raise ValueError("commitment_for needs a sender")
        return make_commitment(
            self.manifest.chain_id, self.address, task_id, round, who, cid, sha256, num_samples, salt
        )

    def commit_update(self, task_id: int, round: int, commitment: bytes) -> TxReceipt:
        """Commit to an update (``commitment_for`` / ``make_commitment``)."""
        return self._transact(
            "commitUpdate", int(task_id), int(round), _bytes32(commitment, "commitment")
        )

    def reveal_update(
        self, task_id: int, round: int, cid: str, sha256: bytes, num_samples: int, salt: bytes
    ) -> TxReceipt:
        """Reveal the committed update (``num_samples`` is a uint32, at most the task's cap)."""
        if isinstance(num_samples, bool) or not 0 <= int(num_samples) < 2**32:
            raise ValueError(f"num_samples={num_samples!r} is not a uint32")
        return self._transact(
            "revealUpdate",
            int(task_id),
            int(round),
            cid,
            _bytes32(sha256, "sha256"),
            int(num_samples),
            _bytes32(salt, "salt"),
        )

    def report_metric(
        self, task_id: int, round: int, metric: str, value: float | int, scaled: bool = False
    ) -> TxReceipt:
        """Report a metric; ``value`` is multiplied by METRIC_SCALE unless ``scaled``."""
        return self.send_calls([self.metric_call(task_id, round, metric, value, scaled)])

    @staticmethod
    def metric_call(task_id: int, round: int, metric: str, value: float | int, scaled: bool = False) -> Call:
        """The ``reportMetric`` call of ``report_metric``, to be sent with others (``send_calls``)."""
        v = int(value) if scaled else round_half_even(value * METRIC_SCALE)
        return ("reportMetric", (int(task_id), int(round), metric, v))

    def send_calls(self, calls: Sequence[Call]) -> TxReceipt:
        """Send ``(function, args)`` calls of this contract as one transaction, in order: one call
        as itself, several through ``multicall``, which reverts them all with the first failing
        call's own error (``ContractRevert`` names it as if that call had been sent alone)."""
        if not calls:
            raise ValueError("send_calls needs at least one call")
        if len(calls) == 1:
            fn, args = calls[0]
            return self._transact(fn, *args)
        return self.multicall(calls)

    def multicall(self, calls: Sequence[Call]) -> TxReceipt:
        """Send ``calls`` through the contract's ``multicall``, all or none. The transaction is
        named by the functions it carries (``reportMetric+commitUpdate``) in errors, logs and
        metrics, so a commitment sent with a report is still counted as a commitment."""
        label = "+".join(dict.fromkeys(fn for fn, _ in calls)) or "multicall"
        return self._transact(
            "multicall", [bytes.fromhex(self._calldata(fn, args)[2:]) for fn, args in calls], label=label
        )

    def claim_rewards(self, task_id: int) -> TxReceipt:
        """Mint the sender's earned rewards of a task (reverts NothingToClaim when none)."""
        return self._transact("claimRewards", int(task_id))

    # -- anyone
    def advance_phase(self, task_id: int, round: int) -> TxReceipt:
        """Close a Commit or Reveal phase that waits only for clients no longer approved."""
        return self._transact("advancePhase", int(task_id), int(round))

    # -- aggregator
    def submit_aggregate(
        self,
        task_id: int,
        round: int,
        aggregate_cid: str,
        aggregate_sha256: bytes,
        scores: Mapping[str, int] | Sequence[str],
    ) -> TxReceipt:
        """Accept an aggregate for the round and credit rewards (aggregator role).

        ``scores`` maps each included client to its contribution score (0..SCORE_SCALE); a
        plain list of clients gives them equal scores. The client sorts them as the contract
        requires."""
        if not isinstance(scores, Mapping):
            scores = {c: SCORE_SCALE for c in scores}
        by_address = {to_checksum_address(c): int(v) for c, v in scores.items()}
        included = sort_included(by_address)
        return self._transact(
            "submitAggregate", int(task_id), int(round), aggregate_cid,
            _bytes32(aggregate_sha256, "aggregate_sha256"), included, [by_address[c] for c in included],
        )  # fmt: skip

    def fail_round(
        self, task_id: int, round: int, reason: str, global_adapter_cid: str | None = None
    ) -> TxReceipt:
        """Mark an Aggregating round failed and open a retry or fail the task. The round's
        global adapter CID is read from its RoundOpened event unless given."""
        if global_adapter_cid is None:
            global_adapter_cid = self.round_global_cid(task_id, round)
        return self._transact("failRound", int(task_id), int(round), global_adapter_cid, reason)

    def claim_fees(self) -> TxReceipt:
        """Mint the sender's earned aggregator fees (reverts NothingToClaim when none)."""
        return self._transact("claimFees")

    # -- views
    def task_count(self) -> int:
        return int(self._call("taskCount"))

    def get_task_params(self, task_id: int) -> TaskParams:
        return _from_abi(TaskParams, self._call("getTaskParams", int(task_id)))

    def get_task(self, task_id: int) -> TaskState:
        return _from_abi(TaskState, self._call("getTask", int(task_id)))

    def get_participants(self, task_id: int) -> list[str]:
        return [to_checksum_address(a) for a in self._call("getParticipants", int(task_id))]

    def is_participant(self, task_id: int, client: str) -> bool:
        return bool(self._call("isParticipant", int(task_id), to_checksum_address(client)))

    def get_round(self, task_id: int, round: int) -> RoundInfo:
        return _from_abi(RoundInfo, self._call("getRound", int(task_id), int(round)))

    def phase_of(self, task_id: int, round: int) -> Phase:
        """The effective phase now (time-driven moves included)."""
        return Phase(self._call("phaseOf", int(task_id), int(round)))

    def get_submission(self, task_id: int, round: int, client: str) -> Submission:
        return _from_abi(
            Submission,
            self._call("getSubmission", int(task_id), int(round), to_checksum_address(client)),
        )

    def rewards_owed(self, task_id: int, account: str) -> int:
        """Rewards ``account`` earned in the task and has not claimed."""
        return int(self._call("rewardsOwed", int(task_id), to_checksum_address(account)))

    def fees_owed(self, account: str) -> int:
        """Aggregator fees ``account`` earned and has not claimed."""
        return int(self._call("feesOwed", to_checksum_address(account)))

    def revealed_in(self, task_id: int, sha256: bytes) -> int:
        """The round in which this weights hash was revealed in the task (0: never)."""
        return int(self._call("revealedIn", int(task_id), _bytes32(sha256, "sha256")))

    def get_metric(self, task_id: int, round: int, client: str, metric: str) -> tuple[bool, int]:
        reported, value = self._call(
            "getMetric", int(task_id), int(round), to_checksum_address(client), metric
        )
        return bool(reported), int(value)

    def compute_commitment(
        self, task_id: int, round: int, sender: str, cid: str, sha256: bytes, num_samples: int,
        salt: bytes,
    ) -> bytes:
        """The contract's own commitment hash (checks ``make_commitment``)."""
        return bytes(
            self._call(
                "computeCommitment", int(task_id), int(round), to_checksum_address(sender), cid,
                _bytes32(sha256, "sha256"), int(num_samples), _bytes32(salt, "salt"),
            )
        )  # fmt: skip

    def registry_address(self) -> str:
        return to_checksum_address(self._call("registry"))

    def reward_token_address(self) -> str:
        return to_checksum_address(self._call("rewardToken"))

    def max_participants(self) -> int:
        return int(self._call("MAX_PARTICIPANTS"))

    def metric_scale(self) -> int:
        return int(self._call("METRIC_SCALE"))

    def score_scale(self) -> int:
        return int(self._call("SCORE_SCALE"))

    def max_phase_duration(self) -> int:
        return int(self._call("MAX_PHASE_DURATION"))

    # -- history (events): what storage no longer keeps
    def round_global_cid(self, task_id: int, round: int) -> str:
        """The CID of the adapter round ``round`` trains from (its RoundOpened event)."""
        events = self.get_events(
            "RoundOpened", self.manifest.deploy_block, taskId=int(task_id), round=int(round)
        )
        if not events:
            raise ValueError(f"task {task_id} has no round {round}")
        return str(events[-1].global_adapter_cid)  # type: ignore[attr-defined]

    def global_adapter_cid(self, task_id: int) -> str:
        """The task's current global adapter CID (its latest round's, or the final one)."""
        done = self.get_events("TaskCompleted", self.manifest.deploy_block, taskId=int(task_id))
        if done:
            return str(done[-1].final_adapter_cid)  # type: ignore[attr-defined]
        state = self.get_task(task_id)
        if state.current_round == 0:
            return self.get_task_params(task_id).initial_adapter_cid
        return self.round_global_cid(task_id, state.current_round)

    def accepted_aggregate(self, task_id: int, round: int) -> AggregateAccepted | None:
        """The round's AggregateAccepted event (None when it was not accepted)."""
        events = self.get_events(
            "AggregateAccepted", self.manifest.deploy_block, taskId=int(task_id), round=int(round)
        )
        return events[-1] if events else None  # type: ignore[return-value]

    def included(self, task_id: int, round: int) -> list[str]:
        """The clients included in the round's accepted aggregate (empty when none)."""
        ev = self.accepted_aggregate(task_id, round)
        return list(ev.included) if ev is not None else []


def round_half_even(x: float) -> int:
    """Round a float metric to an int deterministically."""
    return int(round(x))


def clients_for(
    manifest: Manifest, w3: Web3, sender: LocalAccount | None = None
) -> tuple[Registry, Coordinator, RewardToken]:
    """The three typed clients of a deployment, sharing one sender (or read-only)."""
    return (
        Registry(manifest, w3, sender),
        Coordinator(manifest, w3, sender),
        RewardToken(manifest, w3, sender),
    )
