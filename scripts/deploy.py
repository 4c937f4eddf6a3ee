"""``brownie run scripts/deploy.py``: deploy the PrisMesh contracts and write the manifest.

Deploys the same system as ``prismesh devnet`` / ``prismesh deploy`` (RewardToken, Registry,
Coordinator, the FinalityGadget with its validators, the aggregator role) and writes the same
manifest (chain id, kind, RPC URL, addresses, ABIs and their hashes, deploy block, governance,
finality gadget) through ``prismesh.chain.evm.manifest``, so nodes and the aggregator cannot tell
which tool deployed. Transactions are signed locally by the deployer key.

brownie attaches to a chain already listening at its network's address (start one with
``prismesh devnet --detach --no-deploy``); otherwise it launches its own anvil and stops it when
the script ends, which this script says before it deploys.

Environment:
    PRISMESH_DEPLOYER_KEY  0x private key of the deployer (governance); on a devnet chain id
                           the default is devnet account 0.
    PRISMESH_MANIFEST      output path (default .prismesh/deployments/<chain id>.json).
    PRISMESH_VALIDATORS    a count N (devnet accounts 16..) or comma-separated addresses for the
                           FinalityGadget; 0 for none (default on a devnet: 4, as `prismesh devnet`).
    PRISMESH_AGGREGATORS   comma-separated addresses granted the aggregator role (default on a
                           devnet: devnet account 1, as `prismesh devnet`).
    PRISMESH_GOVERNANCE    address that receives the admin and governance roles (default: the
                           deployer), e.g. a multisig contract.
    PRISMESH_ADMIN_DELAY   seconds between beginning and accepting an admin transfer
                           (default two days).
"""

from __future__ import annotations

import os
from pathlib import Path

from brownie import Coordinator, Registry, RewardToken, accounts, network, project, web3

from prismesh.chain.evm.deploy import DEFAULT_ADMIN_DELAY, create_address
from prismesh.chain.evm.devnet import DEV_CHAIN_IDS, dev_accounts
from prismesh.chain.evm.manifest import GADGET, build_manifest, default_manifest_path, save_manifest


def _validators(spec: str) -> list[str]:
    spec = spec.strip()
    if not spec or spec == "0":
        return []
    if spec.isdigit():
        n = int(spec)
        return [a.address for a in dev_accounts(16 + n)[16 : 16 + n]]
    return [web3.to_checksum_address(a.strip()) for a in spec.split(",") if a.strip()]


def _warn_if_ephemeral() -> None:
    """brownie stops a chain it launched itself when the script ends: say so before deploying."""
    rpc = network.rpc
    if rpc.is_active() and rpc.is_child():
        print(
            "NOTE: brownie launched this chain itself and stops it when the script ends, so the "
            "manifest written below will point at a chain that is gone.\n"
            "      For a chain that stays: `prismesh devnet --detach --no-deploy` first (brownie then "
            "attaches to it), or deploy with `prismesh devnet` / `prismesh deploy`.",
            flush=True,
        )


def main() -> None:
    chain_id = int(web3.eth.chain_id)
    devnet = chain_id in DEV_CHAIN_IDS
    _warn_if_ephemeral()
    key = os.environ.get("PRISMESH_DEPLOYER_KEY")
    if not key:
        if not devnet:
            raise SystemExit(f"chain {chain_id} is not a devnet: set PRISMESH_DEPLOYER_KEY")
        key = "0x" + bytes(dev_accounts(1)[0].key).hex()
    deployer = accounts.add(key)
    # EIP-1559 fees from the chain's base fee, so the same script runs on a chain that charges one
    tx = {"from": deployer, "priority_fee": "1 gwei"}
    governance = web3.to_checksum_address(os.environ.get("PRISMESH_GOVERNANCE") or deployer.address)
    delay = int(os.environ.get("PRISMESH_ADMIN_DELAY") or DEFAULT_ADMIN_DELAY)
    default_aggregators = dev_accounts(2)[1].address if devnet else ""
    aggregators = [
        web3.to_checksum_address(a.strip())
        for a in os.environ.get("PRISMESH_AGGREGATORS", default_aggregators).split(",")
        if a.strip()
    ]

    registry = Registry.deploy(delay, governance, aggregators, tx)
    # The token's only minter is the Coordinator deployed right after it (its constructor
    # checks this), so no key can ever mint.
    token = RewardToken.deploy(create_address(deployer.address, deployer.nonce + 1), tx)
    coordinator = Coordinator.deploy(registry.address, token.address, tx)

    deployed = {"RewardToken": token, "Registry": registry, "Coordinator": coordinator}
    validators = _validators(os.environ.get("PRISMESH_VALIDATORS", "4" if devnet else ""))
    if validators:
        containers = project.get_loaded_projects()[0]
        if hasattr(containers, GADGET):
            deployed[GADGET] = getattr(containers, GADGET).deploy(validators, tx)

    manifest = build_manifest(
        chain_id=chain_id,
        kind="anvil" if network.show_active() in ("development", "anvil") else "rpc",
        rpc_url=getattr(web3.provider, "endpoint_uri", None),
        addresses={name: c.address for name, c in deployed.items()},
        abis={name: c.abi for name, c in deployed.items()},
        deploy_block=int(registry.tx.block_number),
        governance=governance,
        deployed_by="brownie",
    )
    out = Path(os.environ.get("PRISMESH_MANIFEST") or default_manifest_path(chain_id))
    save_manifest(manifest, out)
    for name, addr in manifest.addresses.items():
        print(f"{name:16s} {addr}")
    print(f"manifest: {out}")
