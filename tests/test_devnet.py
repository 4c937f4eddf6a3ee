"""Devnets: the managed anvil process (state kept across restarts) and the embedded EVM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from prismesh.chain.evm.devnet import (
    ANVIL_CHAIN_ID,
    EMBEDDED_CHAIN_ID,
    AnvilDevnet,
    Devnet,
    DevnetError,
    dev_accounts,
    find_anvil,
    rpc_chain_id,
    start_anvil,
    start_embedded,
)
from prismesh.chain.evm.toolchain import repo_root

# anvil's documented default accounts for "test test ... junk" (m/44'/60'/0'/0/i).
ANVIL_ACCOUNT_0 = "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266"
ANVIL_ACCOUNT_1 = "0x70997970C51812dc3A010C7d01b50e0d17dc79C8"


def _send_value(dev: Devnet, sender_index: int, to: str, value: int) -> dict:
    acct = dev.accounts[sender_index]
    block = dev.w3.eth.get_block("latest")
    tx = {
        "to": to,
        "value": value,
        "gas": 21_000,
        "maxFeePerGas": 2 * int(block["baseFeePerGas"]) + 1,
        "maxPriorityFeePerGas": 1,
        "nonce": dev.w3.eth.get_transaction_count(acct.address),
        "chainId": dev.chain_id,
    }
    tx_hash = dev.w3.eth.send_raw_transaction(acct.sign_transaction(tx).raw_transaction)
    return dev.w3.eth.wait_for_transaction_receipt(tx_hash)


def test_dev_accounts_are_anvils_defaults() -> None:
    accounts = dev_accounts()
    assert len(accounts) >= 12
    assert (accounts[0].address, accounts[1].address) == (ANVIL_ACCOUNT_0, ANVIL_ACCOUNT_1)
    assert len({a.address for a in accounts}) == len(accounts)
    with pytest.raises(ValueError):
        dev_accounts(0)


def test_both_chains_fund_the_same_accounts(anvil: AnvilDevnet) -> None:
    emb = start_embedded()
    assert (anvil.kind, emb.kind) == ("anvil", "embedded")
    assert (anvil.chain_id, emb.chain_id) == (ANVIL_CHAIN_ID, EMBEDDED_CHAIN_ID)
    assert (
        int(anvil.w3.eth.chain_id) == ANVIL_CHAIN_ID
        and int(emb.w3.eth.chain_id) == EMBEDDED_CHAIN_ID
    )
    assert emb.rpc_url is None and anvil.rpc_url and anvil.rpc_url.startswith("http://127.0.0.1:")
    assert [a.address for a in anvil.accounts[:12]] == [a.address for a in emb.accounts[:12]]
    for dev in (anvil, emb):
        for acct in dev.accounts[:12]:
            assert dev.w3.eth.get_balance(acct.address) >= 10**21


@pytest.fixture(params=["anvil", "embedded"])
def any_devnet(request: pytest.FixtureRequest, anvil: AnvilDevnet) -> Devnet:
    return anvil if request.param == "anvil" else start_embedded()


def test_control_primitives(any_devnet: Devnet) -> None:
    dev = any_devnet
    start_block, start_time = dev.block_number, dev.timestamp
    dev.mine(3)
    assert dev.block_number == start_block + 3
    dev.increase_time(1000)
    assert dev.timestamp >= start_time + 1000
    assert dev.timestamp < start_time + 1000 + 60
    snap = dev.snapshot()
    target = dev.accounts[5].address
    balance = dev.w3.eth.get_balance(target)
    receipt = _send_value(dev, 4, target, 12345)
    assert receipt["status"] == 1
    assert dev.w3.eth.get_balance(target) == balance + 12345
    dev.revert(snap)
    assert dev.w3.eth.get_balance(target) == balance


def test_anvil_state_file_survives_restart(tmp_path: Path) -> None:
    state = tmp_path / "devnet" / "state.json"
    target = dev_accounts(8)[7].address
    with start_anvil(state_file=state) as dev:
        assert dev.healthy()
        _send_value(dev, 6, target, 777)
        dev.mine(4)
        block, balance = dev.block_number, dev.w3.eth.get_balance(target)
        nonce = dev.w3.eth.get_transaction_count(dev.accounts[6].address)
        port = dev.port
    assert state.is_file() and state.stat().st_size > 0
    assert rpc_chain_id(f"http://127.0.0.1:{port}", timeout=0.5) is None
    assert not dev.healthy()
    with start_anvil(state_file=state) as again:
        assert again.block_number == block
        assert again.w3.eth.get_balance(target) == balance
        assert again.w3.eth.get_transaction_count(again.accounts[6].address) == nonce
        _send_value(again, 6, target, 1)  # the chain goes on from there
        assert again.block_number == block + 1


def test_anvil_errors_are_clear(monkeypatch: pytest.MonkeyPatch, anvil: AnvilDevnet) -> None:
    with pytest.raises(DevnetError, match=f"port {anvil.port} is already in use"):
        start_anvil(port=anvil.port)  # the port is taken
    monkeypatch.setenv("PRISMESH_ANVIL", "/nonexistent/anvil")
    with pytest.raises(DevnetError, match="PRISMESH_ANVIL"):
        find_anvil()
    with pytest.raises(ValueError, match="block_time"):
        AnvilDevnet(block_time=0)


def test_a_local_devnet_is_reached_without_requests_and_keeps_its_errors(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A loopback endpoint's posts go over one kept-alive pool, not ``requests`` (whose
    per-call environment lookups cost more than anvil's answer); a restarted anvil on the same
    port is reached again on a fresh connection; a refused one raises requests' own
    ConnectionError, which web3 retries and the daemons' retry lines name. An endpoint elsewhere
    still goes through ``requests``."""
    import requests

    from prismesh.chain.evm.devnet import http_web3
    from prismesh.chain.localstate import network_message

    sessions: list[str] = []
    real_post = requests.Session.post

    def recorded(self, url, *args, **kwargs):
        sessions.append(url)
        return real_post(self, url, *args, **kwargs)

    monkeypatch.setattr(requests.Session, "post", recorded)
    state = tmp_path / "state.json"
    with start_anvil(state_file=state) as dev:
        port = dev.port
        w3 = http_web3(f"http://127.0.0.1:{port}", timeout=5)
        assert w3.eth.chain_id == ANVIL_CHAIN_ID
        dev.mine(2)
        assert w3.eth.block_number == dev.block_number == 2
        assert w3.eth.get_block("latest")["number"] == 2
    with pytest.raises(requests.exceptions.ConnectionError) as refused:
        w3.provider.make_request("eth_sendRawTransaction", ["0x00"])
    assert f"127.0.0.1:{port}" in network_message(refused.value)
    with start_anvil(state_file=state, port=port) as again:
        assert w3.eth.block_number == again.block_number == 2  # the dropped connection is replaced
    with socket.socket() as silent:  # accepts the connection, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        mute = http_web3(f"http://127.0.0.1:{silent.getsockname()[1]}", timeout=0.3)
        with pytest.raises(requests.exceptions.Timeout):
            mute.provider.make_request("eth_sendRawTransaction", ["0x00"])
    assert sessions == []
    elsewhere = http_web3("http://192.0.2.1:8545", timeout=0.2)  # TEST-NET-1: nothing answers
    with pytest.raises(requests.exceptions.RequestException):
        elsewhere.provider.make_request("eth_sendRawTransaction", ["0x00"])
    assert sessions == ["http://192.0.2.1:8545"]


def test_block_time_mines_without_transactions() -> None:
    with start_anvil(block_time=0.2) as dev:
        first = dev.block_number
        import time

        time.sleep(1.0)
        assert dev.block_number > first


def test_prismesh_devnet_command(tmp_path: Path) -> None:
    """`prismesh devnet --detach` starts anvil, deploys, prints the manifest; a restart from
    the state file finds the contracts already there."""
    from prismesh.chain.evm.devnet import free_port, http_web3
    from prismesh.chain.evm.manifest import is_deployed, load_manifest

    port = free_port()
    state, manifest = tmp_path / "state.json", tmp_path / "manifest.json"
    base = [
        sys.executable,
        "-m",
        "prismesh",
        "devnet",
        "--port",
        str(port),
        "--state",
        str(state),
        "--manifest",
        str(manifest),
    ]
    try:
        out = subprocess.run(
            base + ["--detach"], cwd=repo_root(), capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 0, out.stderr
        assert "deployed:" in out.stdout and f"manifest:  {manifest}" in out.stdout
        m = load_manifest(manifest)
        assert m.rpc_url == f"http://127.0.0.1:{port}" and m.kind == "anvil"
        assert m.finality_gadget == m.addresses.get("FinalityGadget")
        assert is_deployed(m, http_web3(m.rpc_url))
        stop = subprocess.run(
            base + ["--stop"], cwd=repo_root(), capture_output=True, text=True, timeout=60
        )
        assert stop.returncode == 0, stop.stderr
        assert rpc_chain_id(m.rpc_url, timeout=0.5) is None
        again = subprocess.run(
            base + ["--detach"], cwd=repo_root(), capture_output=True, text=True, timeout=120
        )
        assert again.returncode == 0, again.stderr
        assert "already deployed" in again.stdout
        assert load_manifest(manifest).addresses == m.addresses
        assert is_deployed(m, http_web3(m.rpc_url))
        # The same command brings back whichever half died: the committee alone, or anvil
        # (from its state file, keeping the running committee).
        committee_pid = int((tmp_path / "committee.pid").read_text())
        os.kill(committee_pid, signal.SIGKILL)
        _wait_gone(committee_pid)
        res = subprocess.run(base + ["--detach"], cwd=repo_root(), capture_output=True, text=True, timeout=120)
        assert res.returncode == 0 and "its committee is gone: starting a new one" in res.stdout, res.stderr
        res = subprocess.run(base + ["--detach"], cwd=repo_root(), capture_output=True, text=True, timeout=120)
        assert res.returncode == 1 and "already runs" in res.stderr
        anvil_pid = int((tmp_path / "anvil.pid").read_text().split()[0])
        os.kill(anvil_pid, signal.SIGKILL)
        _wait_gone(anvil_pid)
        res = subprocess.run(base + ["--detach"], cwd=repo_root(), capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        assert "is gone; restarting it from" in res.stdout and "committee already running" in res.stdout
        assert is_deployed(m, http_web3(m.rpc_url))
    finally:
        subprocess.run(
            base + ["--stop"], cwd=repo_root(), capture_output=True, text=True, timeout=60
        )


def _wait_gone(pid: int, timeout: float = 10.0) -> None:
    from prismesh.cli.chain import _alive

    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
