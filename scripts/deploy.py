"""``brownie run scripts/deploy.py``: deploy the PrisMesh contracts and write the manifest.

Writes the same manifest as ``prismesh deploy`` (chain id, kind, RPC URL, addresses, ABIs and
their hashes, deploy block, governance, finality gadget) through ``prismesh.chain.evm.deploy``, so nodes and
the aggregator cannot tell which tool deployed. Transactions are signed locally by the
deployer key.

Environment:
    PRISMESH_DEPLOYER_KEY  0x private key of the deployer (governance); on a devnet chain id
                           the default is devnet account 0.
    PRISMESH_MANIFEST      output path (default .prismesh/deployments/<chain id>.json).
    PRISMESH_VALIDATORS    a count N (devnet accounts 16..) or comma-separated addresses: also
                           deploy FinalityGadget with that validator set (default: none).
    PRISMESH_AGGREGATORS   comma-separated addresses granted the aggregator role.
"""

from __future__ import annotations

import os
from pathlib import Path

from brownie import Coordinator, Registry, RewardToken, accounts, network, project, web3

from prismesh.chain.evm.contracts import AGGREGATOR_ROLE, MINTER_ROLE
from prismesh.chain.evm.devnet import dev_accounts
from prismesh.chain.evm.manifest import GADGET, build_manifest, default_manifest_path, save_manifest

DEV_CHAIN_IDS = (31337, 131277)


def _validators(spec: str) -> list[str]:
    spec = spec.strip()
    if not spec or spec == "0":
        return []
    if spec.isdigit():
        n = int(spec)
        return [a.address for a in dev_accounts(16 + n)[16 : 16 + n]]
    return [web3.to_checksum_address(a.strip()) for a in spec.split(",") if a.strip()]


def main() -> None:
    chain_id = int(web3.eth.chain_id)
    key = os.environ.get("PRISMESH_DEPLOYER_KEY")
    if not key:
        if chain_id not in DEV_CHAIN_IDS:
            raise SystemExit(f"chain {chain_id} is not a devnet: set PRISMESH_DEPLOYER_KEY")
        key = "0x" + bytes(dev_accounts(1)[0].key).hex()
    gov = accounts.add(key)
    tx = {"from": gov}

    token = RewardToken.deploy(gov.address, tx)
    registry = Registry.deploy(gov.address, tx)
    coordinator = Coordinator.deploy(registry.address, token.address, tx)
    token.grantRole(MINTER_ROLE, coordinator.address, tx)
    for agg in filter(None, os.environ.get("PRISMESH_AGGREGATORS", "").split(",")):
        registry.grantRole(AGGREGATOR_ROLE, web3.to_checksum_address(agg.strip()), tx)

    deployed = {"RewardToken": token, "Registry": registry, "Coordinator": coordinator}
    validators = _validators(os.environ.get("PRISMESH_VALIDATORS", ""))
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
        deploy_block=int(token.tx.block_number),
        governance=gov.address,
        deployed_by="brownie",
    )
    out = Path(os.environ.get("PRISMESH_MANIFEST") or default_manifest_path(chain_id))
    save_manifest(manifest, out)
    for name, addr in manifest.addresses.items():
        print(f"{name:16s} {addr}")
    print(f"manifest: {out}")
