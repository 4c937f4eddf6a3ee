"""Deployment: `prismesh deploy` (web3.py) and `brownie run scripts/deploy.py` write the same
manifest; manifests are validated on load; identities; the gas report covers every call."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from prismesh.chain.evm.contracts import (
    AGGREGATOR_ROLE,
    DEFAULT_ADMIN_ROLE,
    GOVERNANCE_ROLE,
    Coordinator,
    Registry,
    RewardToken,
    TokenMinterMismatch,
)
from prismesh.chain.evm.devnet import AnvilDevnet, free_port
from prismesh.chain.evm.manifest import (
    CORE_CONTRACTS,
    GADGET,
    ManifestError,
    default_manifest_path,
    is_deployed,
    load_manifest,
)
from prismesh.chain.evm.toolchain import abi_hash, compile_contracts, repo_root
from prismesh.chain.identity import (
    IdentityError,
    account_from_seed,
    descriptor_hash,
    dev_account,
    load_account,
    load_keystore,
    save_keystore,
)
from prismesh.cli import main as prismesh_main

ROOT = repo_root()
HAS_GADGET = (ROOT / "contracts" / "FinalityGadget.sol").is_file()


def _cli_deploy(anvil: AnvilDevnet, out: Path, *extra: str) -> int:
    return prismesh_main(["deploy", "--rpc-url", anvil.rpc_url or "", "--manifest", str(out), *extra])


def test_prismesh_deploy_writes_a_checked_manifest(anvil: AnvilDevnet, tmp_path: Path) -> None:
    out = tmp_path / "m.json"
    agg = anvil.accounts[3].address
    assert _cli_deploy(anvil, out, "--validators", "4", "--aggregator", agg) == 0
    m = load_manifest(out)
    assert m.chain_id == 31337 and m.kind == "anvil" and m.rpc_url == anvil.rpc_url
    assert m.governance == anvil.accounts[0].address and m.deployed_by == "web3"
    assert m.solc_version == "0.8.28" and m.deploy_block >= 1
    assert is_deployed(m, anvil.w3)
    arts = compile_contracts()
    for name in CORE_CONTRACTS:
        assert m.abi_hashes[name] == abi_hash(arts[name]["abi"])
        code = bytes(anvil.w3.eth.get_code(m.address(name)))
        expected = bytes.fromhex(arts[name]["deployedBytecode"][2:])
        assert len(code) == len(expected)
        if name == "Registry":  # the others' immutables are filled in at deployment
            assert code == expected
    if HAS_GADGET:
        assert m.finality_gadget == m.addresses[GADGET]
        assert m.abi_hashes[GADGET] == abi_hash(arts[GADGET]["abi"])
    # Wiring: the coordinator is the token's only minter, the named aggregator holds its role.
    assert RewardToken.read_only(m, anvil.w3).minter() == m.address("Coordinator")
    reg = Registry.read_only(m, anvil.w3)
    assert reg.has_role(AGGREGATOR_ROLE, agg) and reg.is_governance(m.governance)
    assert reg.default_admin() == m.governance and reg.default_admin_delay() == 2 * 24 * 3600
    coord = Coordinator.read_only(m, anvil.w3)
    assert coord.registry_address() == m.address("Registry")
    assert coord.reward_token_address() == m.address("RewardToken")


def test_deploy_hands_governance_to_another_account(anvil: AnvilDevnet, tmp_path: Path) -> None:
    """A multisig-style hand-off: the deployer pays for the deployment and keeps no role."""
    out = tmp_path / "m.json"
    multisig, deployer = anvil.accounts[7].address, anvil.accounts[0].address
    assert _cli_deploy(anvil, out, "--governance", multisig, "--admin-delay", "3600") == 0
    m = load_manifest(out)
    reg = Registry.read_only(m, anvil.w3)
    assert m.governance == reg.default_admin() == multisig and reg.default_admin_delay() == 3600
    assert reg.is_governance(multisig)
    for role in (DEFAULT_ADMIN_ROLE, GOVERNANCE_ROLE, AGGREGATOR_ROLE):
        assert not reg.has_role(role, deployer)
    assert _cli_deploy(anvil, tmp_path / "bad.json", "--governance", "0x1234") == 2


def test_coordinator_refuses_a_token_it_cannot_mint(anvil: AnvilDevnet) -> None:
    """The token's minter is fixed before the Coordinator exists; a mismatch fails the deploy."""
    from prismesh.chain.evm.contracts import ErrorDecoder, TxSender
    from prismesh.chain.evm.deploy import _deploy_one

    arts = compile_contracts()
    sender = TxSender(anvil.w3, anvil.accounts[0], ErrorDecoder(a["abi"] for a in arts.values()))
    registry, _ = _deploy_one(anvil.w3, sender, arts, "Registry", 0, anvil.accounts[0].address, [])
    token, _ = _deploy_one(anvil.w3, sender, arts, "RewardToken", anvil.accounts[9].address)
    with pytest.raises(TokenMinterMismatch) as exc:
        _deploy_one(anvil.w3, sender, arts, "Coordinator", registry, token)
    assert exc.value.args == {"minter": anvil.accounts[9].address}


def test_deploy_without_validators_has_no_gadget(anvil: AnvilDevnet, tmp_path: Path) -> None:
    out = tmp_path / "m.json"
    assert _cli_deploy(anvil, out) == 0
    m = load_manifest(out)
    assert m.finality_gadget is None and GADGET not in m.addresses
    assert set(m.addresses) == set(CORE_CONTRACTS)


def test_deploy_refuses_unknown_chain_without_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    port = free_port()
    assert (
        prismesh_main(
            [
                "deploy",
                "--rpc-url",
                f"http://127.0.0.1:{port}",
                "--manifest",
                str(tmp_path / "m.json"),
            ]
        )
        == 1
    )
    err = capsys.readouterr().err
    assert err.startswith("error: no chain answers") and err.count("\n") == 1
    assert not (tmp_path / "m.json").exists()


def test_manifest_validation(anvil: AnvilDevnet, tmp_path: Path) -> None:
    out = tmp_path / "m.json"
    assert _cli_deploy(anvil, out) == 0
    with pytest.raises(ManifestError, match="not found"):
        load_manifest(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ManifestError, match="not JSON"):
        load_manifest(bad)
    data = json.loads(out.read_text())
    data["abis"]["Registry"] = data["abis"]["Registry"][1:]
    bad.write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="ABI of Registry does not match"):
        load_manifest(bad)
    data = json.loads(out.read_text())
    del data["addresses"]["Coordinator"]
    bad.write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="no address for Coordinator"):
        load_manifest(bad)
    assert default_manifest_path(31337) == ROOT / ".prismesh" / "deployments" / "31337.json"


def _brownie_project(tmp: Path, port: int) -> Path:
    """A copy of the brownie project whose `anvil` network listens on ``port`` (brownie
    writes build/ and the anvil port comes from the config; the repository stays untouched)."""
    proj = tmp / "brownie-project"
    proj.mkdir()
    shutil.copytree(ROOT / "contracts", proj / "contracts")
    shutil.copytree(
        ROOT / "scripts", proj / "scripts", ignore=shutil.ignore_patterns("__pycache__")
    )
    (proj / "node_modules").symlink_to(ROOT / "node_modules")
    config = yaml.safe_load((ROOT / "brownie-config.yaml").read_text())
    config["networks"]["anvil"]["cmd_settings"]["port"] = port
    (proj / "brownie-config.yaml").write_text(yaml.safe_dump(config))
    return proj


def _brownie_deploy(proj: Path, out: Path) -> subprocess.CompletedProcess:
    from prismesh.chain.evm.toolchain import install_bridge

    install_bridge()  # brownie runs ~/.solcx's solc: the bridge must be this checkout's
    env = dict(os.environ)
    env["PATH"] = (
        f"{ROOT / 'node_modules' / '.bin'}{os.pathsep}{ROOT / '.venv' / 'bin'}{os.pathsep}{env['PATH']}"
    )
    env.pop("PRISMESH_VALIDATORS", None)
    env.pop("PRISMESH_AGGREGATORS", None)
    env["PRISMESH_MANIFEST"] = str(out)
    proc = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "brownie"), "run", "scripts/deploy.py", "--network", "anvil"],
        cwd=proj, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "manifest:" in proc.stdout
    return proc


def test_brownie_run_deploy_writes_the_same_manifest(anvil: AnvilDevnet, tmp_path: Path) -> None:
    port = free_port()
    proj = _brownie_project(tmp_path, port)
    out = tmp_path / "brownie-manifest.json"
    # brownie launches its own anvil here and tears it down at exit: the script says so.
    proc = _brownie_deploy(proj, out)
    assert "NOTE: brownie launched this chain itself" in proc.stdout
    brownie_m = load_manifest(out)

    web3_out = tmp_path / "web3-manifest.json"
    assert _cli_deploy(anvil, web3_out, "--validators", "4") == 0
    web3_m = load_manifest(web3_out)

    b, w = json.loads(out.read_text()), json.loads(web3_out.read_text())
    assert set(b) == set(w)
    assert b["deployed_by"] == "brownie" and w["deployed_by"] == "web3"
    assert set(brownie_m.addresses) == set(web3_m.addresses)
    assert brownie_m.abi_hashes == web3_m.abi_hashes
    assert brownie_m.abis == web3_m.abis
    assert (brownie_m.chain_id, brownie_m.kind) == (web3_m.chain_id, web3_m.kind)
    assert brownie_m.governance == web3_m.governance == anvil.accounts[0].address
    assert brownie_m.rpc_url == f"http://127.0.0.1:{port}"
    assert (brownie_m.finality_gadget is not None) == HAS_GADGET
    # brownie built into the copy, never into the repository's build/, and through the same
    # pinned compiler and settings it produced the very same bytecode.
    arts = compile_contracts()
    for name in CORE_CONTRACTS:
        built = json.loads((proj / "build" / "contracts" / f"{name}.json").read_text())
        assert built["compiler"]["version"].startswith("0.8.28")
        assert "0x" + built["bytecode"].removeprefix("0x") == arts[name]["bytecode"], name

    # Attached to a chain that stays (what `prismesh devnet --detach --no-deploy` provides):
    # no warning, and on chain the same system `prismesh devnet` deploys.
    from prismesh.chain.evm.devnet import start_anvil
    from prismesh.chain.finality.gadget import FinalityGadgetClient

    live = start_anvil(port=port)
    try:
        proc = _brownie_deploy(proj, out)
        assert "NOTE:" not in proc.stdout
        m = load_manifest(out)
        assert is_deployed(m, live.w3)
        registry = Registry.read_only(m, live.w3)
        assert registry.is_aggregator(live.accounts[1].address)
        assert registry.is_governance(live.accounts[0].address)
        assert RewardToken.read_only(m, live.w3).minter() == m.address("Coordinator")
        gadget = FinalityGadgetClient(live.w3, m.finality_gadget)
        assert gadget.validators() == [a.address for a in live.accounts[16:20]]
    finally:
        live.stop()


def test_identity_keystores_and_descriptors(tmp_path: Path) -> None:
    acct = account_from_seed("hospital-a")
    assert (
        acct.address
        == account_from_seed("hospital-a").address
        != account_from_seed("hospital-b").address
    )
    path = save_keystore(acct, tmp_path / "keys" / "a.json", "pw", iterations=2)
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert load_keystore(path, "pw").address == acct.address
    with pytest.raises(IdentityError, match="cannot decrypt"):
        load_keystore(path, "wrong")
    with pytest.raises(IdentityError, match="empty password"):
        save_keystore(acct, tmp_path / "b.json", "")
    assert load_account("dev:1").address == dev_account(1).address
    assert load_account("0x" + bytes(acct.key).hex()).address == acct.address
    assert load_account(str(path), "pw").address == acct.address
    with pytest.raises(IdentityError, match="not dev:N"):
        load_account("nonsense")
    d1 = descriptor_hash({"name": "Hospital A", "country": "FR"})
    assert d1 == descriptor_hash({"country": "FR", "name": "Hospital A"}) and len(d1) == 32
    assert d1 != descriptor_hash({"country": "FR", "name": "Hospital B"})
    with pytest.raises(IdentityError):
        descriptor_hash({})


def test_gas_report_covers_every_external_call(anvil: AnvilDevnet, tmp_path: Path) -> None:
    from prismesh.chain.evm.gas import (
        AGGREGATE_FIXED_TARGET,
        AGGREGATE_PER_CLIENT_TARGET,
        COMMIT_REVEAL_TARGET,
        run_gas_report,
        write_report,
    )

    report = run_gas_report(anvil, sizes=(3, 8))
    measured = {(c, f) for c, f, *_ in report.rows()}
    arts = compile_contracts()
    for name in ("Registry", "Coordinator"):
        writes = {
            e["name"]
            for e in arts[name]["abi"]
            if e["type"] == "function" and e["stateMutability"] not in ("view", "pure")
        }
        assert writes <= {f for c, f in measured if c == name}, name
    for c, f, n, lo, avg, hi in report.rows():
        assert n >= 1 and 21_000 <= lo <= avg <= hi, (c, f)
    assert (
        report.round_total()
        == sum(
            report.calls[("Coordinator", fn)][i]
            for fn in ("commitUpdate", "revealUpdate")
            for i in range(3)
        )
        + report.calls[("Coordinator", "submitAggregate")][0]
    )
    # Each figure beside its target: per client per round, and per aggregate.
    rows = report.target_rows()
    assert {n for *_, n in rows} == {3, 8} and len(rows) == 2 * (1 + 2)
    for what, gas, target, n in rows:
        expected = COMMIT_REVEAL_TARGET if what.startswith("commit") else AGGREGATE_FIXED_TARGET + AGGREGATE_PER_CLIENT_TARGET * n
        assert target == expected and gas <= target, (what, n, gas, target)
    assert report.on_target()
    path = write_report(report, tmp_path / "gas.md")
    text = path.read_text()
    assert "| Coordinator | submitAggregate | 4 |" in text and "One 3-client round" in text
    assert "| 8 | aggregate, round 1 |" in text


def test_connect_checks_the_chain(anvil: AnvilDevnet, tmp_path: Path) -> None:
    import dataclasses

    from prismesh.chain.evm.manifest import connect

    out = tmp_path / "m.json"
    assert _cli_deploy(anvil, out) == 0
    m = load_manifest(out)
    assert is_deployed(m, connect(m))
    with pytest.raises(ManifestError, match="manifest is for chain 1"):
        connect(dataclasses.replace(m, chain_id=1))
    with pytest.raises(ManifestError, match="no chain answers"):
        connect(dataclasses.replace(m, rpc_url=f"http://127.0.0.1:{free_port()}"))
    with pytest.raises(ManifestError, match="no RPC URL"):
        connect(dataclasses.replace(m, rpc_url=None, kind="embedded"))
