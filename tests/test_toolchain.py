"""The offline solc toolchain: the solc-js bridge, py-solc-x through it, reproducible builds."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import solcx

from prismesh.chain.evm import toolchain
from prismesh.chain.evm.toolchain import (
    SOLC_VERSION,
    ToolchainError,
    abi_hash,
    bridge_path,
    compile_contracts,
    install_bridge,
    repo_root,
    run_standard_json,
    standard_input,
)

ROOT = repo_root()


@pytest.fixture(scope="module")
def bridge() -> Path:
    return install_bridge()


def test_bridge_speaks_solc_version(bridge: Path) -> None:
    out = subprocess.run(
        [str(bridge), "--version"], capture_output=True, text=True, check=True
    ).stdout
    assert out.splitlines()[0] == "solc, the solidity compiler commandline interface"
    # py-solc-x's own parser must read it, and find the bridge where it looks.
    assert re.search(r"Version: 0\.8\.28\+commit\.[0-9a-f]{8}", out)
    assert solcx.wrapper.get_solc_version(bridge) == solcx.wrapper.Version(SOLC_VERSION)
    assert solcx.wrapper.Version(SOLC_VERSION) in solcx.get_installed_solc_versions()


def test_install_bridge_is_idempotent(bridge: Path) -> None:
    before = bridge.stat().st_mtime_ns, bridge.read_bytes()
    assert install_bridge() == bridge
    assert (bridge.stat().st_mtime_ns, bridge.read_bytes()) == before
    assert os.access(bridge, os.X_OK)
    if not bridge.is_symlink():
        assert json.dumps(str(ROOT / "node_modules" / "solc")) in bridge.read_text()


def test_a_bridge_whose_checkout_is_gone_says_how_to_mend_it(tmp_path: Path) -> None:
    """A bridge installed from a checkout since moved or deleted answers a compile the way solc
    answers a failed one, naming the missing solc-js and the command that rewrites the bridge;
    ``install_bridge`` rewrites a bridge written for another checkout (or an older bridge)."""
    from prismesh.chain.evm.toolchain import _bridge_source

    gone = tmp_path / "gone" / "node_modules" / "solc"
    stale = tmp_path / f"solc-v{SOLC_VERSION}"
    stale.write_text(_bridge_source(gone, SOLC_VERSION + "+commit.00000000"))
    stale.chmod(0o755)
    out = subprocess.run([str(stale), "--standard-json"], input=json.dumps({"language": "Solidity", "sources": {}}),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    (error,) = json.loads(out.stdout)["errors"]
    assert error["severity"] == "error" and str(gone) in error["message"] and "install-bridge" in error["message"]
    env = dict(os.environ, SOLCX_BINARY_PATH=str(tmp_path))
    cmd = [str(ROOT / ".venv" / "bin" / "python"), "-m", "prismesh.chain.evm.toolchain", "install-bridge"]
    subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    if not stale.is_symlink():
        assert json.dumps(str(ROOT / "node_modules" / "solc")) in stale.read_text()


def test_install_bridge_entry_point(tmp_path: Path) -> None:
    env = dict(os.environ, SOLCX_BINARY_PATH=str(tmp_path))
    cmd = [str(ROOT / ".venv" / "bin" / "python"), "-m", "prismesh.chain.evm.toolchain", "install-bridge"]
    first = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert f"solc {SOLC_VERSION}" in first.stdout
    target = tmp_path / f"solc-v{SOLC_VERSION}"
    assert target.exists()
    mtime = target.stat().st_mtime_ns
    subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert target.stat().st_mtime_ns == mtime


def test_solcx_compile_standard_with_remapped_import(bridge: Path, tmp_path: Path) -> None:
    src = (
        "// SPDX-License-Identifier: MIT\npragma solidity 0.8.28;\n"
        'import {ERC20} from "@openzeppelin/contracts/token/ERC20/ERC20.sol";\n'
        'contract Tok is ERC20 { constructor() ERC20("T", "T") {} }\n'
    )
    input_json = {
        "language": "Solidity",
        "sources": {"Tok.sol": {"content": src}},
        "settings": {
            "remappings": ["@openzeppelin/=node_modules/@openzeppelin/"],
            "outputSelection": {"*": {"*": ["abi", "evm.bytecode.object"]}},
        },
    }
    out = solcx.compile_standard(
        input_json, solc_binary=bridge, base_path=str(ROOT), allow_paths=str(ROOT)
    )
    assert out["contracts"]["Tok.sol"]["Tok"]["evm"]["bytecode"]["object"]
    names = {e.get("name") for e in out["contracts"]["Tok.sol"]["Tok"]["abi"]}
    assert {"transfer", "balanceOf", "ERC20InsufficientBalance"} <= names


def test_bridge_refuses_imports_outside_allowed_paths(bridge: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "Secret.sol").write_text("pragma solidity 0.8.28; contract Secret {}")
    base = tmp_path / "project"
    base.mkdir()
    src = f'pragma solidity 0.8.28; import "{outside / "Secret.sol"}"; contract A {{}}'
    input_json = {"language": "Solidity", "sources": {"A.sol": {"content": src}}, "settings": {}}
    with pytest.raises(ToolchainError, match="outside of allowed directories"):
        run_standard_json(input_json, base_path=base)
    out = run_standard_json(input_json, base_path=base, allow_paths=[outside])
    assert {"A.sol", str(outside / "Secret.sol")} <= set(out["sources"])


def test_compile_errors_name_the_problem(tmp_path: Path) -> None:
    (tmp_path / "contracts").mkdir()
    (tmp_path / "contracts" / "Bad.sol").write_text(
        "pragma solidity 0.8.28; contract Bad { uint x = ; }"
    )
    with pytest.raises(ToolchainError, match="Bad.sol"):
        compile_contracts(root=tmp_path, use_cache=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ToolchainError, match="no Solidity sources"):
        compile_contracts(root=empty)


def test_same_sources_give_identical_bytecode_anywhere(tmp_path: Path) -> None:
    """A copy of the project at another absolute path, compiled cold, yields the exact bytes
    of the repository's build (relative source names, fixed settings, pinned compiler)."""
    reference = compile_contracts()
    copy = tmp_path / "elsewhere" / "project"
    shutil.copytree(ROOT / "contracts", copy / "contracts")
    (copy / "node_modules").mkdir(parents=True)
    for pkg in ("@openzeppelin", "solc"):
        (copy / "node_modules" / pkg).symlink_to(ROOT / "node_modules" / pkg)
    rebuilt = compile_contracts(root=copy, use_cache=False)
    assert set(rebuilt) == set(reference)
    for name, art in reference.items():
        assert rebuilt[name]["bytecode"] == art["bytecode"], name
        assert rebuilt[name]["deployedBytecode"] == art["deployedBytecode"], name
        assert abi_hash(rebuilt[name]["abi"]) == abi_hash(art["abi"])
    assert {"Registry", "Coordinator", "RewardToken"} <= set(reference)
    # The metadata hash embedded in the bytecode commits to the relative source names only.
    assert str(tmp_path).encode().hex() not in rebuilt["Registry"]["bytecode"]


def test_cache_is_keyed_by_sources_and_settings(tmp_path: Path) -> None:
    copy = tmp_path / "p"
    (copy / "contracts").mkdir(parents=True)
    (copy / "node_modules").mkdir()
    (copy / "node_modules" / "solc").symlink_to(ROOT / "node_modules" / "solc")
    (copy / "contracts" / "A.sol").write_text(
        "pragma solidity 0.8.28; contract A { uint public x = 1; }"
    )
    first = compile_contracts(root=copy)
    cached = list((copy / "build" / "prismesh").glob("artifacts-*.json"))
    assert len(cached) == 1
    assert compile_contracts(root=copy) == first
    (copy / "contracts" / "A.sol").write_text(
        "pragma solidity 0.8.28; contract A { uint public x = 2; }"
    )
    second = compile_contracts(root=copy)
    assert second["A"]["bytecode"] != first["A"]["bytecode"]
    assert len(list((copy / "build" / "prismesh").glob("artifacts-*.json"))) == 2
    key_a = toolchain.compile_key(standard_input({"a.sol": "x"}))
    assert key_a != toolchain.compile_key(standard_input({"a.sol": "y"}))


def test_bridge_path_honours_solcx_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SOLCX_BINARY_PATH", str(tmp_path))
    assert bridge_path() == tmp_path / f"solc-v{SOLC_VERSION}"
