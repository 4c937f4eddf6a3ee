"""Deploy the PrisMesh contracts with web3.py and write the deployment manifest."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from eth_account.signers.local import LocalAccount
from eth_utils import to_checksum_address
from web3 import Web3

from prismesh.chain.evm.contracts import ErrorDecoder, TxSender
from prismesh.chain.evm.manifest import (
    CORE_CONTRACTS,
    GADGET,
    Manifest,
    ManifestError,
    build_manifest,
    save_manifest,
)
from prismesh.chain.evm.toolchain import compile_contracts

# Seconds between beginning and accepting a Registry admin transfer.
DEFAULT_ADMIN_DELAY = 2 * 24 * 3600


def create_address(sender: str, nonce: int) -> str:
    """The address a contract created by ``sender`` with ``nonce`` gets (CREATE)."""
    import rlp
    from eth_utils import keccak

    raw = keccak(rlp.encode([bytes.fromhex(to_checksum_address(sender)[2:]), int(nonce)]))
    return to_checksum_address(raw[12:])


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
    governance: str | None = None,
    admin_delay: int = DEFAULT_ADMIN_DELAY,
    validators: Sequence[str] | None = None,
    aggregators: Sequence[str] = (),
    kind: str = "rpc",
    rpc_url: str | None = None,
    manifest_path: Path | None = None,
    artifacts: dict[str, dict[str, Any]] | None = None,
    on_receipt: Callable[[str, str, Any], None] | None = None,
) -> Manifest:
    """Deploy Registry, RewardToken and Coordinator (and FinalityGadget when ``validators`` are
    given and its source exists), and write the manifest to ``manifest_path`` when given.

    ``governance`` (default: the deployer) receives the Registry's admin and governance roles;
    another address, e.g. a multisig contract, leaves the deployer with no role at all. The
    admin moves later only in two steps ``admin_delay`` seconds apart. ``aggregators`` hold
    the aggregator role from the start. The token is created with the Coordinator's address
    (computed from the deployer's nonce) as its only minter, and the Coordinator's constructor
    checks it, so no account can ever mint outside the Coordinator.

    ``on_receipt(contract, function, receipt)`` sees every transaction (the gas report uses it)."""
    arts = artifacts if artifacts is not None else compile_contracts()
    for name in CORE_CONTRACTS:
        if name not in arts:
            raise ManifestError(f"compiled artifacts lack {name}")
    sender = TxSender(w3, deployer, ErrorDecoder(a["abi"] for a in arts.values()))
    if on_receipt is not None:
        sender = _Recording(sender, on_receipt)
    gov = to_checksum_address(governance or deployer.address)
    aggs = [to_checksum_address(a) for a in aggregators]
    registry, first_block = _deploy_one(w3, sender, arts, "Registry", int(admin_delay), gov, aggs)
    nonce = w3.eth.get_transaction_count(deployer.address, "pending")
    predicted = create_address(deployer.address, nonce + 1)
    token, _ = _deploy_one(w3, sender, arts, "RewardToken", predicted)
    coordinator, _ = _deploy_one(w3, sender, arts, "Coordinator", registry, token)
    addresses = {"RewardToken": token, "Registry": registry, "Coordinator": coordinator}

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
    governance: str | None = None,
) -> Manifest:
    """Deploy to a ``prismesh.chain.evm.devnet.Devnet`` from its account 0 (governance unless
    ``governance`` names another account)."""
    return deploy(
        devnet.w3,
        devnet.accounts[0],
        governance=governance,
        validators=validators,
        aggregators=aggregators,
        kind=devnet.kind,
        rpc_url=devnet.rpc_url,
        manifest_path=manifest_path,
    )


