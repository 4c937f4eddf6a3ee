"""The command line's error contract: every expected failure ends in one line and a known code.

``error: <what went wrong>; <what to do>`` on standard error, exit code 2 when the command line
itself was wrong (an unknown option, a missing or malformed argument) and 1 for every failure
at run time (a file, the chain, the store, a contract that refused). ``--debug`` or
``PRISMESH_DEBUG=1`` adds the traceback. Commands raise :class:`CommandError` (or
:class:`UsageError`) for failures they detect themselves; library exceptions are explained by
:func:`explain`, which knows the project's error types and the usual network failures.
"""

from __future__ import annotations

USAGE = 2
RUNTIME = 1


class CommandError(Exception):
    """A failure a command detected itself; ``code`` is the exit status."""

    code = RUNTIME

    def __init__(self, message: str, *, code: int | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class UsageError(CommandError):
    """The command line was wrong: an argument is missing, malformed or contradicts another."""

    code = USAGE


# Custom errors of the contracts that a user can act on, and what to do about them.
_REVERT_HINTS = {
    "NotGovernance": "sign with the governance key (--account)",
    "NotAggregator": "grant the aggregator role first (prismesh govern add-aggregator)",
    "AccessControlUnauthorizedAccount": "sign with an account that holds that role",
    "UnknownTask": "list tasks with `prismesh govern status`",
    "ClientNotApproved": "governance must approve the client first (prismesh govern approve)",
    "NotParticipant": "the client must join the task before it starts",
    "NotEnoughParticipants": "wait for more clients to join, or lower --min-participants",
    "NotRegistered": "the node registers itself when its daemon first starts (prismesh node)",
    "InvalidTaskParameter": "fix that task parameter",
    "WrongTaskStatus": "check the task's state with `prismesh govern status`",
}


def explain(exc: BaseException) -> tuple[str, int]:
    """The one-line message and exit code for ``exc``."""
    if isinstance(exc, CommandError):
        return str(exc), exc.code
    name = type(exc).__name__
    message = _network_message(exc)
    if message is not None:
        return message, RUNTIME
    try:
        from prismesh.chain.evm.contracts import ContractRevert
    except ImportError:  # pragma: no cover - the chain wing is always installed
        ContractRevert = ()  # type: ignore[assignment,misc]  # noqa: N806
    if isinstance(exc, ContractRevert):
        hint = _REVERT_HINTS.get(exc.error_name)
        text = f"the contract refused: {exc}"
        return (f"{text}; {hint}" if hint else text), RUNTIME
    if name in _EXPECTED:
        return f"{_EXPECTED[name]}{exc}", RUNTIME
    if isinstance(exc, FileNotFoundError):
        return f"file not found: {exc.filename or exc}", RUNTIME
    if isinstance(exc, PermissionError):
        return f"permission denied: {exc.filename or exc}", RUNTIME
    if isinstance(exc, OSError) and exc.filename:
        return f"{exc.filename}: {exc.strerror or exc}", RUNTIME
    return f"unexpected {name}: {exc} (run with --debug for the traceback)", RUNTIME


# The project's own error types: their messages already name the file, field or object.
_EXPECTED = {
    "ConfigError": "",
    "ChainMismatch": "",
    "StateDirLocked": "",
    "ManifestError": "",
    "TaskSpecError": "",
    "IdentityError": "",
    "StorageError": "storage: ",
    "CIDMismatch": "storage: ",
    "BlockNotFound": "storage: ",
    "UnixFSError": "storage: ",
    "DataFormatError": "",
    "TrainConfigError": "",
    "ToolchainError": "toolchain: ",
    "DevnetError": "devnet: ",
    "AdapterFormatError": "",
    "CursorError": "",
    "ChainDiverged": "",
    "GadgetRevert": "the finality gadget refused: ",
}


def _network_message(exc: BaseException) -> str | None:
    """Unreachable RPC endpoints and stores, from requests' and web3's exceptions."""
    from prismesh.chain.localstate import network_message

    return network_message(exc)
