"""``prismesh node check``: everything a hospital's node needs, verified before its first transaction.

A node that starts with an unfunded key, a manifest for another chain or a model directory that
does not match the task dies (or, worse, waits silently) long after its operator walked away.
Each check here runs on its own, so one failure does not hide the others, and each failure says
what to do. Nothing is sent to the chain and no data leaves the host.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# A node's transactions in one round (commit, reveal, metric report) at a generous gas price:
# below this a node will run dry within a few rounds.
ROUND_GAS = 600_000
MIN_ROUNDS_OF_GAS = 10


@dataclass
class Check:
    """One line of the checklist."""

    name: str
    status: str  # "ok" | "warn" | "fail" | "skip"
    detail: str = ""
    hint: str = ""


class _Context:
    """What earlier checks found, for the later ones."""

    config: Any = None
    account: Any = None
    manifest: Any = None
    w3: Any = None


def run_checks(config_path: Path, *, hash_model: bool = True) -> list[Check]:
    """The checklist for the node configured in ``config_path``."""
    ctx = _Context()
    checks: list[Check] = []
    steps: list[tuple[str, Callable[[_Context], tuple[str, str, str]], tuple[str, ...]]] = [
        ("config", lambda c: _config(c, config_path), ()),
        ("keystore", _keystore, ("config",)),
        ("manifest", _manifest, ("config",)),
        ("rpc", _rpc, ("manifest",)),
        ("contracts", _contracts, ("rpc",)),
        ("finality", _finality, ("rpc",)),
        ("gas balance", _gas, ("rpc", "keystore")),
        ("registration", _registration, ("contracts", "keystore")),
        ("state directory", _state_dir, ("config",)),
        ("storage", _storage, ("config",)),
        ("base model", lambda c: _model(c, hash_model), ("config",)),
        ("training data", _train_data, ("config",)),
        ("test data", _test_data, ("config",)),
    ]
    passed: set[str] = set()
    for name, fn, needs in steps:
        missing = [n for n in needs if n not in passed]
        if missing:
            checks.append(Check(name, "skip", f"needs {', '.join(missing)}"))
            continue
        try:
            status, detail, hint = fn(ctx)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a line of the checklist
            status, detail, hint = "fail", f"{type(exc).__name__}: {exc}", ""
        checks.append(Check(name, status, detail, hint))
        if status in ("ok", "warn"):
            passed.add(name)
    return checks


def render(checks: list[Check]) -> str:
    marks = {"ok": "[ ok ]", "warn": "[warn]", "fail": "[FAIL]", "skip": "[skip]"}
    lines = []
    for c in checks:
        lines.append(f"{marks[c.status]} {c.name:<16} {c.detail}")
        if c.hint and c.status in ("fail", "warn"):
            lines.append(f"       {'':<16} -> {c.hint}")
    failed = sum(c.status == "fail" for c in checks)
    lines.append("ready: every check holds" if not failed else f"not ready: {failed} check(s) failed")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- checks


def _config(ctx: _Context, path: Path) -> tuple[str, str, str]:
    from prismesh.node.daemon import NodeConfig

    ctx.config = NodeConfig.load(path)
    return "ok", f"{path} (node {ctx.config.name!r})", ""


def _keystore(ctx: _Context) -> tuple[str, str, str]:
    from prismesh.chain.identity import PASSWORD_ENV, IdentityError, load_daemon_account

    try:
        ctx.account = load_daemon_account(ctx.config.keystore)
    except IdentityError as exc:
        return "fail", str(exc), f"create one with `prismesh keys new --out FILE`; the password comes from {PASSWORD_ENV}"
    return "ok", f"{ctx.config.keystore} -> {ctx.account.address}", ""


def _manifest(ctx: _Context) -> tuple[str, str, str]:
    from dataclasses import replace

    from prismesh.chain.evm.manifest import load_manifest

    ctx.manifest = load_manifest(ctx.config.manifest)
    if ctx.config.rpc_url:
        ctx.manifest = replace(ctx.manifest, rpc_url=ctx.config.rpc_url)
    return "ok", f"{ctx.config.manifest} (chain {ctx.manifest.chain_id}, {ctx.manifest.deployed_by})", ""


def _rpc(ctx: _Context) -> tuple[str, str, str]:
    from prismesh.chain.evm.manifest import ManifestError, connect

    try:
        ctx.w3 = connect(ctx.manifest)
    except ManifestError as exc:
        return "fail", str(exc), "check rpc_url in the config (or the manifest) and that the chain runs"
    return "ok", f"{ctx.manifest.rpc_url} answers as chain {ctx.manifest.chain_id}, block {ctx.w3.eth.block_number}", ""


def _contracts(ctx: _Context) -> tuple[str, str, str]:
    from prismesh.chain.evm.manifest import is_deployed

    if not is_deployed(ctx.manifest, ctx.w3):
        return "fail", "the manifest's contracts have no code on this chain", "ask governance for the manifest of this chain"
    return "ok", ", ".join(f"{k} {v[:10]}…" for k, v in sorted(ctx.manifest.addresses.items())), ""


def _finality(ctx: _Context) -> tuple[str, str, str]:
    if not ctx.config.finality:
        return "warn", "finality is off in the config: the node acts on blocks that may still change", "set finality = true"
    if not ctx.manifest.finality_gadget:
        return "fail", "the deployment has no finality gadget", "ask governance for a deployment with validators"
    from prismesh.chain.finality.gadget import FinalityGadgetClient

    gadget = FinalityGadgetClient(ctx.w3, ctx.manifest.finality_gadget, ctx.manifest.abis.get("FinalityGadget"))
    final, head = gadget.finalized_height(), int(ctx.w3.eth.block_number)
    if final == 0 and head > 1:
        return "warn", f"no block is final yet (head {head})", "is the validator committee running?"
    return "ok", f"final height {final}, head {head} (lag {head - final})", ""


def _gas(ctx: _Context) -> tuple[str, str, str]:
    balance = int(ctx.w3.eth.get_balance(ctx.account.address))
    price = int(ctx.w3.eth.gas_price) or 1
    need = ROUND_GAS * price * MIN_ROUNDS_OF_GAS
    eth = balance / 10**18
    if balance == 0:
        return "fail", f"{ctx.account.address} holds no gas money", (
            "on a devnet: `prismesh govern fund --manifest M ADDRESS`; on a real chain: transfer "
            "native currency to the address (docs/deployment.md, 'Funding keys')"
        )
    if balance < need:
        return "warn", f"{eth:.6g} ETH: fewer than {MIN_ROUNDS_OF_GAS} rounds of transactions", "top the key up"
    return "ok", f"{eth:.6g} ETH", ""


def _registration(ctx: _Context) -> tuple[str, str, str]:
    from prismesh.chain.evm.contracts import ClientStatus, Registry

    status = Registry.read_only(ctx.manifest, ctx.w3).status_of(ctx.account.address)
    if status == ClientStatus.APPROVED:
        return "ok", "approved by governance", ""
    if status == ClientStatus.NONE:
        return "warn", "not registered yet", "the daemon registers on its first start; then governance approves it"
    if status == ClientStatus.PENDING:
        return "warn", "registered, awaiting governance approval", f"governance runs `prismesh govern approve {ctx.account.address}`"
    return "fail", f"{status.name.lower()} by governance", "ask governance to reinstate the node"


def _state_dir(ctx: _Context) -> tuple[str, str, str]:
    import os
    import tempfile

    d = Path(ctx.config.state_dir)
    d.mkdir(parents=True, exist_ok=True)
    fd, probe = tempfile.mkstemp(dir=d, prefix=".write-probe-")
    os.close(fd)
    os.unlink(probe)
    return "ok", f"{d} is writable", ""


def _storage(ctx: _Context) -> tuple[str, str, str]:
    from prismesh.chain.storage import open_store

    store = open_store(ctx.config.store)
    cid = store.add_bytes(b"prismesh node check\n", only_hash=False, pin=False)
    if store.cat(cid) != b"prismesh node check\n":
        return "fail", f"{ctx.config.store}: a block read back differs", ""
    return "ok", f"{ctx.config.store}: write and verified read work", ""


def _model(ctx: _Context, hash_model: bool) -> tuple[str, str, str]:
    from prismesh.chain.taskspec import model_fingerprint

    d = Path(ctx.config.base_model)
    if not (d / "config.json").is_file():
        return "fail", f"{d} has no config.json", "point base_model at a Hugging Face model directory"
    from transformers import AutoConfig, AutoTokenizer

    cfg = AutoConfig.from_pretrained(d, local_files_only=True)
    AutoTokenizer.from_pretrained(d, local_files_only=True)
    detail = f"{d} ({cfg.model_type}, {getattr(cfg, 'num_hidden_layers', '?')} layers)"
    if hash_model:
        detail += f", sha256 {model_fingerprint(d)}"
    return "ok", detail, ""


def _train_data(ctx: _Context) -> tuple[str, str, str]:
    from prismesh.node.data import load_jsonl

    rows = load_jsonl(ctx.config.train_data)
    if not rows:
        return "fail", f"{ctx.config.train_data} holds no questions", ""
    return "ok", f"{ctx.config.train_data}: {len(rows)} questions ({rows[0].fmt}, {rows[0].language})", ""


def _test_data(ctx: _Context) -> tuple[str, str, str]:
    from prismesh.node.data import load_jsonl

    if ctx.config.test_data is None:
        return "ok", "none: each task's spec splits a test set off the training file", ""
    rows = load_jsonl(ctx.config.test_data)
    return "ok", f"{ctx.config.test_data}: {len(rows)} questions", ""
