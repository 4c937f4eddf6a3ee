"""The committee over real chains: in-process on the embedded chain, a thread beside anvil."""

from __future__ import annotations

import time

import pytest

from prismesh.chain.finality.committee import (
    Committee,
    devnet_validator_keys,
    gadget_address_from_manifest,
    in_process_committee,
    start_committee_thread,
)
from prismesh.chain.finality.gadget import FinalityGadgetClient, generate_validator_keys
from tests.conftest import DESCRIPTOR, ChainEnv


def _work(env: ChainEnv, client_index: int) -> int:
    client = env.clients[client_index]
    return env.registry().with_sender(client).register(DESCRIPTOR)["blockNumber"]


def test_embedded_chain_in_process_committee(embedded_env: ChainEnv) -> None:
    committee = in_process_committee(embedded_env.devnet, embedded_env.manifest)
    gadget = FinalityGadgetClient(embedded_env.w3, embedded_env.manifest.finality_gadget)
    block = _work(embedded_env, 0)
    assert committee.run_until_final() >= block
    assert gadget.finalized_height() >= block
    h, block_hash, view = gadget.finalized()
    assert block_hash == bytes(embedded_env.w3.eth.get_block(h)["hash"])
    assert view > 0
    # Not spinning: the certificate's own block needs no certificate.
    head = embedded_env.w3.eth.block_number
    assert committee.run_until_final() == gadget.finalized_height()
    assert embedded_env.w3.eth.block_number == head
    assert len(committee.certificates) == 1
    # More work, more certificates; heights grow.
    block2 = _work(embedded_env, 1)
    assert committee.run_until_final() >= block2
    assert len(committee.certificates) == 2


def test_committee_survives_f_silent_validators(chain_env: ChainEnv) -> None:
    keys = devnet_validator_keys(chain_env.devnet)
    committee = Committee(
        chain_env.w3,
        gadget_address_from_manifest(chain_env.manifest),
        keys,
        chain_env.validators[0],
        silent=[3],
    )
    block = _work(chain_env, 0)
    assert committee.run_until_final() >= block
    cert, receipt = committee.certificates[-1]
    assert keys[3].address not in cert.signers and len(cert.signers) == 3


def test_f_plus_one_silent_cannot_finalize(chain_env: ChainEnv) -> None:
    committee = Committee(
        chain_env.w3,
        gadget_address_from_manifest(chain_env.manifest),
        devnet_validator_keys(chain_env.devnet),
        chain_env.validators[0],
        silent=[2, 3],
    )
    _work(chain_env, 0)
    with pytest.raises(TimeoutError, match="validators down"):
        committee.run_until_final(max_events=3000)
    assert committee.client.finalized_height() == 0


def test_keys_must_match_the_gadget(chain_env: ChainEnv) -> None:
    with pytest.raises(ValueError, match="do not match"):
        Committee(
            chain_env.w3,
            gadget_address_from_manifest(chain_env.manifest),
            generate_validator_keys(4, seed=99),
            chain_env.validators[0],
        )


def test_thread_beside_anvil_finalizes_and_idles(chain_env: ChainEnv) -> None:
    committee = start_committee_thread(chain_env.devnet, chain_env.manifest)
    try:
        block = _work(chain_env, 0)
        assert committee.wait_final(block, timeout=30) >= block
        block2 = _work(chain_env, 1)
        assert committee.wait_final(block2, timeout=30) >= block2
        # Idle: certificates stop, so the chain stops growing.
        time.sleep(1.0)
        head = chain_env.w3.eth.block_number
        time.sleep(1.5)
        assert chain_env.w3.eth.block_number == head
        assert not committee.errors
    finally:
        committee.stop()


def test_refuses_a_chain_reverted_underneath(embedded_env: ChainEnv) -> None:
    dev = embedded_env.devnet
    snap = dev.snapshot()
    committee = in_process_committee(dev, embedded_env.manifest)
    _work(embedded_env, 0)
    committee.run_until_final()
    dev.revert(snap)
    with pytest.raises(RuntimeError, match="reverted"):
        committee.run_until_final()


def test_process_mode_beside_a_running_anvil(chain_env: ChainEnv, tmp_path) -> None:
    import subprocess
    import sys

    manifest_path = chain_env.manifest.save(tmp_path / "manifest.json")
    proc = subprocess.Popen(
        [sys.executable, "-m", "prismesh.chain.finality.committee", "--rpc", chain_env.devnet.rpc_url,
         "--manifest", str(manifest_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        block = _work(chain_env, 0)
        gadget = FinalityGadgetClient(chain_env.w3, chain_env.manifest.finality_gadget)
        deadline = time.monotonic() + 30
        while gadget.finalized_height() < block and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=15)
    assert gadget.finalized_height() >= block, out
    assert proc.returncode == 0, out
    assert "final height" in out
