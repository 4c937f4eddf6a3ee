"""Deploy the PrisMesh contracts with web3.py and write the deployment manifest."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from eth_account.signers.local import LocalAccount
from eth_utils import to_checksum_address
from web3 import Web3

from prismesh.chain.evm.contracts import AGGREGATOR_ROLE, MINTER_ROLE, ErrorDecoder, TxSender
from prismesh.chain.evm.manifest import (
    CORE_CONTRACTS,
    GADGET,
    Manifest,
    ManifestError,
    build_manifest,
    save_manifest,
)
from prismesh.chain.evm.toolchain import compile_contracts


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
    """Deploy to a ``prismesh.chain.evm.devnet.Devnet`` with its account 0 as governance."""
    return deploy(
        devnet.w3,
        devnet.accounts[0],
        validators=validators,
        aggregators=aggregators,
        kind=devnet.kind,
        rpc_url=devnet.rpc_url,
        manifest_path=manifest_path,
    )


