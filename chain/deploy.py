"""Deploy the PrisMesh contracts with web3.py and read/write the deployment manifest.

The manifest (JSON) is what nodes and the aggregator read to find the chain: chain id, kind,
RPC URL, contract addresses, ABIs and their hashes, the deploy block (where event scans
start), the governance account, and the finality gadget when one was deployed. ``brownie run
scripts/deploy.py`` writes the same manifest through ``build_manifest``/``save_manifest``.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from eth_account.signers.local import LocalAccount
from eth_utils import to_checksum_address
from web3 import Web3

from chain.toolchain import SOLC_VERSION, abi_hash, canonical_abi, compile_contracts, repo_root

MANIFEST_FORMAT = 1
CORE_CONTRACTS = ("RewardToken", "Registry", "Coordinator")
GADGET = "FinalityGadget"


class ManifestError(ValueError):
    """A manifest file is missing, malformed or inconsistent."""


@dataclass(frozen=True)
class Manifest:
    """Where a PrisMesh deployment lives and how to talk to it."""

    chain_id: int
    kind: str
    rpc_url: str | None
    addresses: dict[str, str]
    abi_hashes: dict[str, str]
    deploy_block: int
    governance: str
    abis: dict[str, list[dict[str, Any]]] = field(repr=False)
    finality_gadget: str | None = None
    solc_version: str = SOLC_VERSION
    deployed_by: str = "web3"
    format: int = MANIFEST_FORMAT

    def address(self, name: str) -> str:
        """Checksummed address of contract ``name``; KeyError naming what exists otherwise."""
        try:
            return self.addresses[name]
        except KeyError:
            raise KeyError(f"no {name} in manifest (has {sorted(self.addresses)})") from None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: Path) -> Path:
        return save_manifest(self, path)


def default_manifest_path(chain_id: int, root: Path | None = None) -> Path:
    """``.prismesh/deployments/<chain_id>.json`` under the project root."""
    return (root or repo_root()) / ".prismesh" / "deployments" / f"{chain_id}.json"


def save_manifest(manifest: Manifest, path: Path) -> Path:
    """Write ``manifest`` atomically (temp file + rename) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(manifest.to_json(), fh, indent=2, sort_keys=True)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_manifest(path: Path | str) -> Manifest:
    """Read and check a manifest: every core contract present and every ABI matching its hash."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ManifestError(f"manifest not found: {path}") from None
    except json.JSONDecodeError as exc:
        raise ManifestError(f"manifest {path} is not JSON: {exc}") from None
    required = ("chain_id", "kind", "addresses", "abi_hashes", "deploy_block", "abis", "governance")
    missing = [k for k in required if k not in data]
    if missing:
        raise ManifestError(f"manifest {path} lacks {missing}")
    if data.get("format", MANIFEST_FORMAT) != MANIFEST_FORMAT:
        raise ManifestError(
            f"manifest {path} has format {data.get('format')}, expected {MANIFEST_FORMAT}"
        )
    for name in CORE_CONTRACTS:
        if name not in data["addresses"]:
            raise ManifestError(f"manifest {path} has no address for {name}")
    for name, abi in data["abis"].items():
        if abi_hash(abi) != data["abi_hashes"].get(name):
            raise ManifestError(f"manifest {path}: ABI of {name} does not match its hash")
    known = {f for f in Manifest.__dataclass_fields__}
    return Manifest(**{k: v for k, v in data.items() if k in known})


def build_manifest(
    *,
    chain_id: int,
    kind: str,
    rpc_url: str | None,
    addresses: dict[str, str],
    abis: dict[str, list[dict[str, Any]]],
    deploy_block: int,
    governance: str,
    deployed_by: str,
) -> Manifest:
    """Assemble a manifest (shared by the web3 deployer and the brownie script)."""
    addresses = {k: to_checksum_address(v) for k, v in sorted(addresses.items())}
    abis = {k: canonical_abi(abis[k]) for k in sorted(addresses)}
    return Manifest(
        chain_id=int(chain_id),
        kind=kind,
        rpc_url=rpc_url,
        addresses=addresses,
        abi_hashes={k: abi_hash(v) for k, v in abis.items()},
        deploy_block=int(deploy_block),
        governance=to_checksum_address(governance),
        abis=abis,
        finality_gadget=addresses.get(GADGET),
        deployed_by=deployed_by,
    )


def _deploy_one(
    w3: Web3, sender: Any, arts: dict[str, Any], name: str, *args: Any
) -> tuple[str, int]:
    factory = w3.eth.contract(abi=arts[name]["abi"], bytecode=arts[name]["bytecode"])
    data = factory.constructor(*args).data_in_transaction
    receipt = sender.send({"data": data, "value": 0}, name, "constructor")
    return to_checksum_address(receipt["contractAddress"]), int(receipt["blockNumber"])


def deploy(
    w3: Web3,
    deployer: LocalAccount,
    *,
    validators: Sequence[str] | None = None,
    aggregators: Sequence[str] = (),
    kind: str = "rpc",
    rpc_url: str | None = None,
    manifest_path: Path | None = None,
    artifacts: dict[str, dict[str, Any]] | None = None,
    on_receipt: Callable[[str, str, Any], None] | None = None,
) -> Manifest:
    """Deploy RewardToken, Registry and Coordinator (and FinalityGadget when ``validators`` are
    given and its source exists), grant the Coordinator MINTER_ROLE and ``aggregators`` the
    aggregator role, and write the manifest to ``manifest_path`` when given.

    ``deployer`` becomes governance (admin of every role). ``on_receipt(contract, function,
    receipt)`` sees every transaction (the gas report uses it)."""
    from chain.contracts import AGGREGATOR_ROLE, MINTER_ROLE, ErrorDecoder, TxSender

    arts = artifacts if artifacts is not None else compile_contracts()
    for name in CORE_CONTRACTS:
        if name not in arts:
            raise ManifestError(f"compiled artifacts lack {name}")
    sender = TxSender(w3, deployer, ErrorDecoder(a["abi"] for a in arts.values()))
    if on_receipt is not None:
        sender = _Recording(sender, on_receipt)
    gov = deployer.address
    token, first_block = _deploy_one(w3, sender, arts, "RewardToken", gov)
    registry, _ = _deploy_one(w3, sender, arts, "Registry", gov)
    coordinator, _ = _deploy_one(w3, sender, arts, "Coordinator", registry, token)
    addresses = {"RewardToken": token, "Registry": registry, "Coordinator": coordinator}

    token_c = w3.eth.contract(address=token, abi=arts["RewardToken"]["abi"])
    sender.send(
        {"to": token, "data": token_c.encode_abi("grantRole", args=[MINTER_ROLE, coordinator])},
        "RewardToken",
        "grantRole",
    )
    registry_c = w3.eth.contract(address=registry, abi=arts["Registry"]["abi"])
    for agg in aggregators:
        data = registry_c.encode_abi("grantRole", args=[AGGREGATOR_ROLE, to_checksum_address(agg)])
        sender.send({"to": registry, "data": data}, "Registry", "grantRole")

    if validators:
        if GADGET in arts:
            gadget, _ = _deploy_one(
                w3, sender, arts, GADGET, [to_checksum_address(v) for v in validators]
            )
            addresses[GADGET] = gadget

    manifest = build_manifest(
        chain_id=int(w3.eth.chain_id),
        kind=kind,
        rpc_url=rpc_url,
        addresses=addresses,
        abis={k: arts[k]["abi"] for k in addresses},
        deploy_block=first_block,
        governance=gov,
        deployed_by="web3",
    )
    if manifest_path is not None:
        save_manifest(manifest, manifest_path)
    return manifest


class _Recording:
    """A TxSender wrapper reporting each receipt."""

    def __init__(self, inner: Any, hook: Callable[[str, str, Any], None]) -> None:
        self.inner, self.hook = inner, hook

    def send(
        self, tx: dict[str, Any], contract: str | None = None, function: str | None = None
    ) -> Any:
        receipt = self.inner.send(tx, contract, function)
        self.hook(contract or "?", function or "?", receipt)
        return receipt


def deploy_to_devnet(
    devnet: Any,
    *,
    validators: Sequence[str] | None = None,
    aggregators: Sequence[str] = (),
    manifest_path: Path | None = None,
) -> Manifest:
    """Deploy to a ``chain.devnet.Devnet`` with its account 0 as governance."""
    return deploy(
        devnet.w3,
        devnet.accounts[0],
        validators=validators,
        aggregators=aggregators,
        kind=devnet.kind,
        rpc_url=devnet.rpc_url,
        manifest_path=manifest_path,
    )


def connect(manifest: Manifest) -> Web3:
    """A Web3 for the manifest's RPC URL, checked to reach the manifest's chain."""
    from chain.devnet import http_web3

    if not manifest.rpc_url:
        raise ManifestError(f"manifest of a {manifest.kind} chain has no RPC URL to connect to")
    w3 = http_web3(manifest.rpc_url)
    try:
        chain_id = int(w3.eth.chain_id)
    except Exception as exc:
        raise ManifestError(f"no chain answers at {manifest.rpc_url}: {exc}") from None
    if chain_id != manifest.chain_id:
        raise ManifestError(
            f"{manifest.rpc_url} is chain {chain_id}, the manifest is for chain {manifest.chain_id}"
        )
    return w3


def is_deployed(manifest: Manifest, w3: Web3) -> bool:
    """Whether every contract of ``manifest`` has code on the chain ``w3`` reaches."""
    if int(w3.eth.chain_id) != manifest.chain_id:
        return False
    return all(
        len(w3.eth.get_code(to_checksum_address(a))) > 0 for a in manifest.addresses.values()
    )
