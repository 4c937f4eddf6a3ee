"""The deployment manifest: where a PrisMesh deployment lives and how to talk to it.

The manifest (JSON) is what nodes and the aggregator read to find the chain: chain id, kind,
RPC URL, contract addresses, ABIs and their hashes, the deploy block (where event scans
start), the governance account, and the finality gadget when one was deployed. Both
``prismesh deploy`` and ``brownie run scripts/deploy.py`` write it through ``build_manifest`` /
``save_manifest``.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from eth_utils import to_checksum_address
from web3 import Web3

from prismesh.chain.evm.toolchain import SOLC_VERSION, abi_hash, canonical_abi, repo_root

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


def connect(manifest: Manifest) -> Web3:
    """A Web3 for the manifest's RPC URL, checked to reach the manifest's chain."""
    from prismesh.chain.evm.devnet import http_web3

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


def connect_with(path: Path | str, rpc_url: str | None = None) -> tuple[Manifest, Web3]:
    """Load the manifest at ``path`` (its RPC URL replaced by ``rpc_url`` when given) and connect."""
    from dataclasses import replace

    manifest = load_manifest(path)
    if rpc_url:
        manifest = replace(manifest, rpc_url=rpc_url)
    return manifest, connect(manifest)


def is_deployed(manifest: Manifest, w3: Web3) -> bool:
    """Whether every contract of ``manifest`` has code on the chain ``w3`` reaches."""
    if int(w3.eth.chain_id) != manifest.chain_id:
        return False
    return all(
        len(w3.eth.get_code(to_checksum_address(a))) > 0 for a in manifest.addresses.values()
    )
