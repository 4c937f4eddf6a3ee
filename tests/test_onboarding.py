"""``prismesh node check``: the checklist a hospital runs before its node's first transaction."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from prismesh.chain.identity import new_account, save_keystore
from prismesh.node.check import run_checks
from tests.conftest import ChainEnv, tiny_federation_inputs

PASSWORD = "hospital-secret"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, list]:
    return tiny_federation_inputs(tmp_path_factory.mktemp("onboarding"))


def write_config(root: Path, env: ChainEnv, inputs: tuple[Path, list], **extra: str) -> tuple[Path, str]:
    base, clients = inputs
    account = new_account()
    keystore = save_keystore(account, root / "node.json", PASSWORD, iterations=2)
    manifest = env.manifest.save(root / "manifest.json")
    fields = {
        "name": '"hospital-x"',
        "manifest": f'"{manifest}"',
        "keystore": f'"{keystore}"',
        "base_model": f'"{base}"',
        "train_data": f'"{clients[0].train_path}"',
        "state_dir": f'"{root / "state"}"',
        "store": f'"embedded:{root / "ipfs"}"',
        **extra,
    }
    cfg = root / "node.toml"
    cfg.write_text("".join(f"{k} = {v}\n" for k, v in fields.items()))
    return cfg, account.address


def statuses(checks) -> dict[str, str]:
    return {c.name: c.status for c in checks}


def test_fresh_key_fails_on_gas_then_passes_once_funded(chain_env: ChainEnv, inputs, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRISMESH_KEYSTORE_PASSWORD", PASSWORD)
    cfg, address = write_config(tmp_path, chain_env, inputs)
    first = {c.name: c for c in run_checks(cfg)}
    assert first["gas balance"].status == "fail" and "govern fund" in first["gas balance"].hint
    assert first["registration"].status == "warn"  # not registered yet: the daemon does it
    assert all(first[n].status == "ok" for n in ("config", "keystore", "manifest", "rpc", "contracts",
                                                   "state directory", "storage", "base model", "training data"))
    assert "sha256" in first["base model"].detail

    from prismesh.cli import main

    assert main(["govern", "fund", "--manifest", str(tmp_path / "manifest.json"), address]) == 0
    assert statuses(run_checks(cfg))["gas balance"] == "ok"


def test_checklist_names_each_broken_part(chain_env: ChainEnv, inputs, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRISMESH_KEYSTORE_PASSWORD", "wrong")
    bad_data = tmp_path / "bad.jsonl"
    bad_data.write_text('{"question": "q"}\n')
    cfg, _ = write_config(tmp_path, chain_env, inputs, train_data=f'"{bad_data}"',
                          rpc_url='"http://127.0.0.1:9"')
    got = {c.name: c for c in run_checks(cfg, hash_model=False)}
    assert got["keystore"].status == "fail" and "node.json" in got["keystore"].detail
    assert got["rpc"].status == "fail" and "127.0.0.1:9" in got["rpc"].detail
    assert got["contracts"].status == "skip" and got["gas balance"].status == "skip"
    assert got["training data"].status == "fail" and "bad.jsonl:1" in got["training data"].detail
    assert got["base model"].status == "ok"


def test_cli_exit_codes(chain_env: ChainEnv, inputs, tmp_path: Path) -> None:
    cfg, _ = write_config(tmp_path, chain_env, inputs)
    env = {**os.environ, "PRISMESH_KEYSTORE_PASSWORD": PASSWORD}
    proc = subprocess.run([sys.executable, "-m", "prismesh", "node", "check", "--config", str(cfg),
                           "--no-model-hash"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "[FAIL] gas balance" in proc.stdout and "not ready" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "prismesh", "node", "check", "--config",
                           str(tmp_path / "missing.toml")], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "[FAIL] config" in proc.stdout and "not found" in proc.stdout
