"""Daemons that wait, heal and never act on a history the chain lost: the bad-input cases and
recovery paths, each on the real parts (anvil, the committee, the embedded store, PEFT).

The multi-process fault campaign (SIGKILL of every component at every phase) is in
``test_faults.py``; this file covers each fault on its own, in-process where that is exact.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from prismesh.chain.evm.contracts import Phase, TaskStatus
from prismesh.chain.localstate import (
    ConfigError,
    StateDirLock,
    StateDirLocked,
    StateFile,
    Stopped,
    retry_until,
)
from prismesh.chain.storage import EmbeddedStore, cat_held, restore_held
from prismesh.cli import main as cli_main
from tests.conftest import ChainEnv, tiny_federation_inputs
from tests.test_federation import make_spec, start

REPO = Path(__file__).resolve().parents[1]
PRISMESH = str(REPO / ".venv" / "bin" / "prismesh")


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> tuple[Path, list]:
    return tiny_federation_inputs(tmp_path_factory.mktemp("bench"))


# ------------------------------------------------------------------ bad configuration


def _node_config(tmp: Path, **values) -> Path:
    base = {"name": "n", "manifest": "m.json", "keystore": "dev:2", "base_model": "model",
            "train_data": "train.jsonl", "state_dir": "state", **values}
    path = tmp / "node.json"
    path.write_text(json.dumps(base))
    return path


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"poll_interval": "fast"}, "field 'poll_interval' must be a number, got 'fast'"),
        ({"poll_interval": -1}, "field 'poll_interval' must be greater than 0"),
        ({"auto_join": "yes"}, "field 'auto_join' must be true or false"),
        ({"descriptor": "hospital"}, "field 'descriptor' must be a table"),
        ({"finality": None, "name": 3}, "field 'name' must be a string"),
    ],
)
def test_malformed_config_values_are_named(tmp_path: Path, capsys, values, message) -> None:
    code = cli_main(["node", "--config", str(_node_config(tmp_path, **values))])
    err = capsys.readouterr().err
    assert code == 1
    assert err.count("\n") == 1 and err.startswith("error: ") and str(tmp_path / "node.json") in err
    assert message in err


def test_aggregator_config_values_are_named(tmp_path: Path, capsys) -> None:
    cfg = tmp_path / "agg.toml"
    cfg.write_text('manifest = "m.json"\nkeystore = "dev:1"\nstate_dir = "s"\nray_num_cpus = "two"\n')
    assert cli_main(["aggregator", "--config", str(cfg)]) == 1
    assert "field 'ray_num_cpus' must be an integer, got 'two'" in capsys.readouterr().err


def test_missing_keystore_says_the_file_does_not_exist(tmp_path: Path, capsys) -> None:
    code = cli_main(["node", "--config", str(_node_config(tmp_path, keystore="keys/node.json"))])
    err = capsys.readouterr().err
    assert code == 1
    assert f"keystore file {tmp_path / 'keys' / 'node.json'} does not exist" in err


def test_wrong_chain_id_is_refused_at_once(chain_env: ChainEnv, tmp_path: Path, capsys) -> None:
    data = chain_env.manifest.to_json()
    data["chain_id"] = 4242
    (tmp_path / "m.json").write_text(json.dumps(data))
    started = time.monotonic()
    code = cli_main(["node", "--config", str(_node_config(tmp_path))])
    err = capsys.readouterr().err
    assert code == 1 and time.monotonic() - started < 20
    assert "serves chain id 31337 but the manifest is for chain id 4242" in err


def test_a_second_daemon_on_one_state_directory_is_refused(tmp_path: Path, capsys) -> None:
    state = tmp_path / "state"
    held = StateDirLock(state, "node").acquire()
    try:
        code = cli_main(["node", "--config", str(_node_config(tmp_path))])
        err = capsys.readouterr().err
        assert code == 1
        assert f"another node daemon (pid {os.getpid()}) already runs on {state}" in err
        with pytest.raises(StateDirLocked):
            StateDirLock(state, "node").acquire()
    finally:
        held.release()
    StateDirLock(state, "node").acquire().release()  # free again once the holder is gone


def test_rpc_down_at_start_is_waited_out_one_line_per_attempt(tmp_path: Path) -> None:
    """A node started while nothing answers at its RPC URL waits, logging one line per attempt
    and no traceback, and stops cleanly on SIGTERM (the multi-process fault tests show it
    connecting once the chain is back)."""
    from tests.cluster import free_port

    manifest = {"chain_id": 31337, "kind": "anvil", "rpc_url": f"http://127.0.0.1:{free_port()}", "addresses": {
        "Coordinator": "0x" + "11" * 20, "Registry": "0x" + "22" * 20, "RewardToken": "0x" + "33" * 20},
        "abi_hashes": {}, "deploy_block": 0, "abis": {}, "governance": "0x" + "44" * 20}
    (tmp_path / "m.json").write_text(json.dumps(manifest))
    cfg = _node_config(tmp_path, poll_interval=0.2)
    log = tmp_path / "node.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen([PRISMESH, "node", "--config", str(cfg)], stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while log.read_text().count("connecting to the chain") < 3 and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text()
    attempts = [ln for ln in text.splitlines() if "connecting to the chain" in ln]
    assert len(attempts) >= 3, text
    assert "(attempt 1)" in attempts[0] and "(attempt 2)" in attempts[1]
    assert all("cannot reach" in ln and "retrying in" in ln for ln in attempts)
    assert "Traceback" not in text
    assert "stopped cleanly" in text


def test_retry_lines_carry_a_traceback_only_with_debug(caplog, monkeypatch) -> None:
    calls = []

    def attempt():
        calls.append(1)
        if len(calls) < 3:
            raise requests.exceptions.ConnectionError("refused")
        return "up"

    log = logging.getLogger("prismesh.test")
    with caplog.at_level(logging.WARNING, logger="prismesh.test"):
        assert retry_until("reaching it", attempt, log=log, stop=threading.Event(), first=0.01) == "up"
    assert len(caplog.records) == 2 and not any(r.exc_info for r in caplog.records)
    assert all("reaching it failed" in r.getMessage() for r in caplog.records)
    caplog.clear()
    calls.clear()
    monkeypatch.setenv("PRISMESH_DEBUG", "1")
    with caplog.at_level(logging.WARNING, logger="prismesh.test"):
        retry_until("reaching it", attempt, log=log, stop=threading.Event(), first=0.01)
    assert all(r.exc_info for r in caplog.records)
    stop = threading.Event()
    stop.set()
    with pytest.raises(Stopped):
        retry_until("never", lambda: 1 / 0, log=log, stop=stop, first=0.01)
    with pytest.raises(ConfigError):
        retry_until("fatal", lambda: (_ for _ in ()).throw(ConfigError("bad")), log=log, stop=stop,
                    fatal=(ConfigError,))


def test_a_truncated_state_file_is_set_aside(tmp_path: Path) -> None:
    path = tmp_path / "node-state.json"
    state = StateFile(path)
    state.section("rounds")["1:1"] = {"stage": "revealed"}
    state.save()
    truncated = path.read_text()[:10]
    path.write_text(truncated)
    again = StateFile(path)
    assert again.data == {} and again.damaged is not None
    aside, why = again.damaged
    assert aside.read_text() == truncated  # kept for whoever wants to look at it
    assert aside.name.startswith("node-state.json.damaged-") and "Unterminated string" in why
    assert not path.exists()  # rebuilt from the chain, saved on the first change


def test_a_state_equal_to_the_file_is_not_written_again(tmp_path: Path) -> None:
    """A save is a durable write only when the state changed; a file removed behind the
    daemon's back is written again, and a state loaded from disk counts as written."""
    path = tmp_path / "node-state.json"
    state = StateFile(path)
    rec = state.section("rounds").setdefault("1:1", {"stage": "trained"})
    state.save()
    first = path.stat().st_ino
    state.save()
    assert path.stat().st_ino == first  # not replaced: nothing changed
    rec["stage"] = "committed"  # changed in place, as the daemons do
    state.save()
    assert path.stat().st_ino != first and json.loads(path.read_text())["rounds"]["1:1"]["stage"] == "committed"
    path.unlink()
    state.save()
    assert json.loads(path.read_text()) == state.data
    again, kept = StateFile(path), path.stat().st_ino
    again.save()
    assert path.stat().st_ino == kept


# ------------------------------------------------------------------ storage


def _adapter_dir(tmp: Path) -> Path:
    d = tmp / "adapter"
    d.mkdir()
    (d / "adapter_config.json").write_text('{"r": 4}\n')
    (d / "adapter_model.safetensors").write_bytes(os.urandom(600_000))
    return d


def test_a_damaged_block_is_replaced_by_adding_the_same_bytes(tmp_path: Path) -> None:
    store = EmbeddedStore(tmp_path / "ipfs")
    src = _adapter_dir(tmp_path)
    cid = store.add_path(src)
    leaf = next(p for p in store.blocks_dir.glob("*/*.data") if p.stat().st_size > 200_000)
    raw = bytearray(leaf.read_bytes())
    raw[100] ^= 0xFF
    leaf.write_bytes(bytes(raw))  # same size: the old writer skipped it
    report = store.check(cid)
    assert not report.ok and len(report.damaged) == 1 and report.checked >= 4
    assert store.add_path(src) == cid
    assert store.check(cid).ok and store.verify(cid) == report.checked


def test_check_repair_drops_damaged_and_lists_missing_blocks(tmp_path: Path, capsys) -> None:
    store = EmbeddedStore(tmp_path / "ipfs")
    src = _adapter_dir(tmp_path)
    cid = store.add_path(src)
    blocks = sorted(store.blocks_dir.glob("*/*.data"), key=lambda p: p.stat().st_size)
    blocks[-1].write_bytes(blocks[-1].read_bytes()[:1000])  # truncated
    blocks[-2].unlink()  # missing
    spec = f"embedded:{store.root}"
    assert cli_main(["ipfs", "--store", spec, "verify", cid]) == 1
    out, err = capsys.readouterr()
    assert out.count("damaged ") == 1 and out.count("missing ") == 1
    assert "1 damaged and 1 missing block(s)" in err and "--repair" in err
    assert cli_main(["ipfs", "--store", spec, "verify", "--repair", cid]) == 1
    out, err = capsys.readouterr()
    assert "removed " in out and not blocks[-1].exists()
    assert restore_held(store, cid, src) and store.check(cid).ok
    assert cli_main(["ipfs", "--store", spec, "verify", cid]) == 0
    blocks[-1].parent.mkdir(exist_ok=True)
    (blocks[-1].parent / "BAD.data").write_bytes(b"junk")
    assert cli_main(["ipfs", "--store", spec, "verify", "--all"]) == 1
    assert cli_main(["ipfs", "--store", spec, "verify", "--all", "--repair"]) == 0
    capsys.readouterr()


def test_a_deleted_store_directory_is_recreated_and_refilled(tmp_path: Path) -> None:
    store = EmbeddedStore(tmp_path / "ipfs")
    src = _adapter_dir(tmp_path)
    cid = store.add_path(src)
    shutil.rmtree(tmp_path / "ipfs")
    assert not store.has(cid)
    assert restore_held(store, cid, src)
    assert store.check(cid).ok and cid in store.pins()


def test_restore_held_never_adds_a_copy_that_is_not_the_cid(tmp_path: Path) -> None:
    store = EmbeddedStore(tmp_path / "ipfs")
    src = _adapter_dir(tmp_path)
    cid = store.add_path(src, only_hash=True)
    (src / "adapter_config.json").write_text('{"r": 8}\n')
    assert not restore_held(store, cid, src)
    assert not store.has(cid)
    assert not restore_held(store, cid, None)


def test_task_spec_is_kept_and_re_added_with_its_cid(tmp_path: Path, capsys) -> None:
    from prismesh.chain.taskspec import TaskSpec

    spec = TaskSpec(base_model_id="test/model", base_model_sha256="ab" * 32)
    store = EmbeddedStore(tmp_path / "ipfs")
    cid = store.add_bytes(spec.to_bytes())
    copy = tmp_path / "specs" / f"{cid}.json"
    assert cat_held(store, cid, copy) == (spec.to_bytes(), False) and copy.exists()
    shutil.rmtree(tmp_path / "ipfs")
    assert cat_held(store, cid, copy) == (spec.to_bytes(), True)
    assert store.cat(cid) == spec.to_bytes()
    # From the command line: the pretty file `govern make-spec` writes gives another CID with a
    # plain `ipfs add`; `ipfs add-spec` adds its canonical bytes, the CID the task carries.
    pretty = tmp_path / "task.json"
    pretty.write_text(json.dumps(spec.to_dict(), indent=2, sort_keys=True) + "\n")
    shutil.rmtree(tmp_path / "ipfs")
    store_spec = f"embedded:{tmp_path / 'ipfs'}"
    assert cli_main(["ipfs", "--store", store_spec, "add", "-Q", str(pretty)]) == 0
    assert capsys.readouterr().out.strip() != cid
    assert cli_main(["ipfs", "--store", store_spec, "add-spec", str(pretty)]) == 0
    assert capsys.readouterr().out.strip() == cid
    assert EmbeddedStore(tmp_path / "ipfs").cat(cid) == spec.to_bytes()


# ------------------------------------------------------------------ the chain's history


def _registry_events(env: ChainEnv, cursor: Path):
    from prismesh.chain.finality.events import FinalEventStream

    return FinalEventStream(env.w3, (env.manifest.address("Registry"), env.manifest.abis["Registry"]),
                            ["ClientRegistered"], None, cursor, finality=False,
                            from_block=env.manifest.deploy_block)


def test_a_chain_that_lost_or_replaced_handled_blocks_is_refused_and_resynced(
    chain_env: ChainEnv, tmp_path: Path
) -> None:
    from prismesh.chain.finality.events import ChainDiverged
    from tests.conftest import DESCRIPTOR

    cursor = tmp_path / "cursor.json"
    reg = chain_env.registry()
    clients = iter(chain_env.clients)

    def register() -> int:
        return reg.with_sender(next(clients)).register(DESCRIPTOR)["blockNumber"]

    def handle(stream) -> list:
        events = stream.poll()
        for ev in events:
            stream.ack(ev)
        return events

    stream = _registry_events(chain_env, cursor)
    register()
    chain_env.devnet.mine(2)
    handle(stream)
    kept = chain_env.w3.eth.block_number
    # 1. The chain loses blocks the stream handled (a devnet restarted from an old state).
    snap = chain_env.devnet.snapshot()
    lost = [register(), register()]
    assert len(handle(stream)) == 2 and json.loads(cursor.read_text())["block_hash"]
    chain_env.devnet.revert(snap)
    restarted = _registry_events(chain_env, cursor)
    with pytest.raises(ChainDiverged, match=f"below block {lost[-1]}") as info:
        restarted.poll()
    assert "refusing to act on this history" in str(info.value)
    assert info.value.safe_height <= kept
    restarted.resync(info.value.safe_height)
    assert handle(restarted) == []  # nothing new: the lost registrations are not replayed
    # 2. The chain is replaced: other blocks at the same heights (a redeployed devnet).
    snap = chain_env.devnet.snapshot()
    mine = register()
    chain_env.devnet.mine(1)
    assert [ev.block_number for ev in handle(restarted)] == [mine]
    chain_env.devnet.revert(snap)
    theirs = register()
    chain_env.devnet.mine(2)
    with pytest.raises(ChainDiverged, match="has hash") as info:
        restarted.poll()
    assert info.value.safe_height < mine
    restarted.resync(info.value.safe_height)
    assert [ev.block_number for ev in handle(restarted)] == [theirs]


def test_anvil_killed_keeps_every_certified_block(tmp_path: Path) -> None:
    """Final implies durable: SIGKILL anvil right after certificates were posted; the restart
    from its state file holds every certified block with the same hash, and a new committee
    certifies the work sent afterwards (anvil's BLOCKHASH of restored blocks is worked around)."""
    from prismesh.chain.evm.deploy import deploy_to_devnet
    from prismesh.chain.evm.devnet import start_anvil
    from prismesh.chain.finality.committee import devnet_validator_keys, start_committee_thread
    from prismesh.chain.identity import descriptor_hash

    state = tmp_path / "anvil-state.json"
    dev = start_anvil(state_file=state)
    keys = devnet_validator_keys(n=4)
    try:
        manifest = deploy_to_devnet(dev, validators=[k.address for k in keys],
                                    aggregators=[dev.accounts[1].address], manifest_path=tmp_path / "m.json")
        committee = start_committee_thread(dev, manifest.to_json(), keys=keys)
        from prismesh.chain.evm.contracts import Registry

        certified: dict[int, bytes] = {}
        for i in range(3):
            block = Registry(manifest, dev.w3, dev.accounts[2 + i]).register(descriptor_hash({"i": i}))["blockNumber"]
            committee.wait_final(block, timeout=60)
            for cert, _ in committee.certificates:
                certified[cert.height] = cert.block_hash
        assert committee.durability is not None and committee.durability.count >= 1
        committee.stop()
        dev.proc.kill()  # SIGKILL: anvil writes nothing on the way down
        dev.proc.wait()
        dev.proc = None
        dev = start_anvil(state_file=state, port=dev.port)
        for height, block_hash in certified.items():
            assert bytes(dev.w3.eth.get_block(height)["hash"]) == block_hash, height
        committee = start_committee_thread(dev, manifest.to_json(), keys=keys)
        block = Registry(manifest, dev.w3, dev.accounts[6]).register(descriptor_hash({"i": 9}))["blockNumber"]
        assert committee.wait_final(block, timeout=60) >= block
        committee.stop()
    finally:
        dev.stop()


def _tear(dump: dict) -> dict:
    """What anvil answers when a block is mined while it dumps: the accounts already hold the
    new block's effects, the block list and the transaction records do not."""
    torn = json.loads(json.dumps(dump))
    last = max(torn["blocks"], key=lambda b: int(b["header"]["number"], 16))
    torn["blocks"].remove(last)
    hashes = {e["transaction"]["hash"] for e in last["transactions"]}
    torn["transactions"] = [t for t in torn["transactions"] if t["info"]["transaction_hash"] not in hashes]
    torn["best_block_number"] -= 1
    return torn


def test_a_torn_anvil_dump_is_recognised(tmp_path: Path) -> None:
    """The three ways a dump can tear (accounts ahead of the blocks, a block without its
    transaction records, records without their block) are each named; a whole dump passes."""
    from prismesh.chain.evm.contracts import await_receipt
    from prismesh.chain.evm.devnet import anvil_dump_inconsistency, request_anvil_dump, start_anvil

    dev = start_anvil()
    try:
        sent = [
            dev.w3.eth.send_transaction({"from": dev.accounts[i].address, "to": dev.accounts[5].address, "value": 1})
            for i in range(3)
        ]
        for tx in sent:  # anvil mines after it answers: the chain is quiet only once all three are mined
            await_receipt(dev.w3, tx, 30.0)
        whole = json.loads(request_anvil_dump(dev.w3))
    finally:
        dev.stop()
    assert anvil_dump_inconsistency(whole) is None
    assert "nonce 1 but 0 transaction(s)" in anvil_dump_inconsistency(_tear(whole))
    no_records = json.loads(json.dumps(whole))
    no_records["transactions"].pop()
    assert "1 transaction(s) of its blocks have no record" in anvil_dump_inconsistency(no_records)
    no_block = json.loads(json.dumps(whole))
    no_block["blocks"] = [b for b in no_block["blocks"] if int(b["header"]["number"], 16) < 3]
    no_block["best_block_number"] = 2
    assert "1 record(s) belong to no block" in anvil_dump_inconsistency(no_block)
    gap = json.loads(json.dumps(whole))
    gap["blocks"] = [b for b in gap["blocks"] if int(b["header"]["number"], 16) != 1]
    assert "without a gap" in anvil_dump_inconsistency(gap)


def test_a_torn_dump_is_taken_again_and_its_reload_keeps_every_log(tmp_path: Path) -> None:
    """anvil answers a torn dump first (as it does when a block is mined mid-dump): the state
    file written is the whole one, and anvil restarted from it has the commit's block, its
    receipt and its log, so no event is lost while its effect stays in contract storage."""
    import gzip

    from prismesh.chain.evm.contracts import Registry
    from prismesh.chain.evm.deploy import deploy_to_devnet
    from prismesh.chain.evm.devnet import anvil_dump_inconsistency, dump_anvil_state, start_anvil
    from prismesh.chain.identity import descriptor_hash

    state = tmp_path / "anvil-state.json"
    dev = start_anvil(state_file=state)
    try:
        manifest = deploy_to_devnet(dev, validators=[dev.accounts[0].address],
                                    aggregators=[dev.accounts[1].address], manifest_path=tmp_path / "m.json")
        receipt = Registry(manifest, dev.w3, dev.accounts[2]).register(descriptor_hash({"i": 1}))
        real = dev.w3.provider.make_request
        asked: list[str] = []

        def tearing_once(method, params):
            answer = real(method, params)
            if method == "anvil_dumpState":
                asked.append(method)
                if len(asked) == 1:
                    whole = json.loads(gzip.decompress(bytes.fromhex(answer["result"][2:])))
                    torn = json.dumps(_tear(whole)).encode()
                    answer = {**answer, "result": "0x" + gzip.compress(torn).hex()}
            return answer

        dev.w3.provider.make_request = tearing_once
        assert dump_anvil_state(dev.w3, state) == receipt["blockNumber"]
        assert len(asked) == 2
        dev.w3.provider.make_request = real
        assert anvil_dump_inconsistency(json.loads(state.read_text())) is None
        dev.proc.kill()
        dev.proc.wait()
        dev.proc = None
        dev = start_anvil(state_file=state, port=dev.port)
        logs = dev.w3.eth.get_logs({"fromBlock": receipt["blockNumber"], "toBlock": receipt["blockNumber"]})
        assert [bytes(log["transactionHash"]) for log in logs] == [bytes(receipt["transactionHash"])] * len(logs)
        assert logs, "the registration's event did not survive the restart"
        assert dev.w3.eth.get_transaction_receipt(receipt["transactionHash"])["status"] == 1
    finally:
        dev.stop()


def test_a_chain_busier_than_its_dumps_holds_mining_for_a_whole_one(tmp_path: Path) -> None:
    """Blocks mined faster than a dump is taken (every answer torn): after three torn answers
    mining is held while the dump is taken again. A transaction sent meanwhile waits in the
    pool and is mined as soon as mining resumes; the file written is whole and ends at the head
    of the held chain."""
    import gzip

    from prismesh.chain.evm.contracts import await_receipt
    from prismesh.chain.evm.devnet import anvil_dump_inconsistency, dump_anvil_state, start_anvil

    dev = start_anvil()
    try:
        w3 = dev.w3
        for i in range(3):
            tx = w3.eth.send_transaction({"from": dev.accounts[i].address, "to": dev.accounts[5].address, "value": 1})
            await_receipt(w3, tx, 30.0)
        real = w3.provider.make_request
        calls: list[tuple[str, list]] = []
        sent: list[str] = []

        def busy(method, params):
            calls.append((method, params))
            held = ("evm_setAutomine", [False]) in calls
            if method == "anvil_dumpState" and held and not sent:
                tx = real("eth_sendTransaction", [{"from": dev.accounts[6].address, "to": dev.accounts[5].address,
                                                   "value": "0x1"}])
                sent.append(tx["result"])
            if method == "anvil_dumpState" and not held:  # a block mined during every dump
                tx = real("eth_sendTransaction", [{"from": dev.accounts[7].address, "to": dev.accounts[5].address,
                                                   "value": "0x1"}])
                # Mined before the dump is taken (anvil answers a send just before it mines), so
                # the dump is whole and the tear below is the only one.
                while real("eth_getTransactionReceipt", [tx["result"]]).get("result") is None:
                    time.sleep(0.005)
            answer = real(method, params)
            if method == "anvil_dumpState" and not held:
                whole = json.loads(gzip.decompress(bytes.fromhex(answer["result"][2:])))
                answer = {**answer, "result": "0x" + gzip.compress(json.dumps(_tear(whole)).encode()).hex()}
            return answer

        w3.provider.make_request = busy
        height = dump_anvil_state(w3, tmp_path / "state.json")
        w3.provider.make_request = real
        methods = [m for m, _ in calls]
        assert methods.count("anvil_dumpState") >= 4 and methods[:3] == ["anvil_dumpState"] * 3
        assert calls[-1] == ("evm_setAutomine", [True])
        assert height == 6 and real("anvil_getAutomine", [])["result"] is True  # 3 + a block per torn dump
        dumped = json.loads((tmp_path / "state.json").read_text())
        assert anvil_dump_inconsistency(dumped) is None and dumped["best_block_number"] == height
        receipt = w3.eth.wait_for_transaction_receipt(sent[0], timeout=10)
        assert receipt["status"] == 1 and receipt["blockNumber"] == height + 1
    finally:
        dev.stop()


# ------------------------------------------------------------------ daemons, in-process


def _count_training(fed) -> dict[str, int]:
    counts = {h.name: 0 for h in fed.hospitals}
    for h in fed.hospitals:
        original = h.daemon.train_round

        def counted(*args, _name=h.name, _original=original, **kw):
            counts[_name] += 1
            return _original(*args, **kw)

        h.daemon.train_round = counted
    return counts


def _start_task(fed, task: int) -> None:
    """Nodes join (final events), governance starts the task, the aggregator sees round 1."""
    coord = fed.coordinator()
    _drive_nodes_until(fed, lambda: coord.get_task(task).participant_count == len(fed.hospitals))
    coord.start_task(task)
    fed.finalize()
    fed.aggregator.step()


def _drive_nodes_until(fed, predicate, limit: int = 60) -> None:
    for _ in range(limit):
        if predicate():
            return
        fed.finalize()
        for h in fed.hospitals:
            h.daemon.step()
        fed.finalize()
    raise AssertionError("the nodes did not get there")


def test_a_retried_round_reuses_an_unrevealed_adapter_and_the_audit_passes(tmp_path: Path, bench) -> None:
    """Round 1 fails with two of three reveals (the third node's reveal deadline passed). The
    retry starts from the same global adapter: the node that never revealed re-uses its kept
    adapter without training; the two that did cannot reveal the same weights again in the task
    (the contract refuses copies), so they train with a seed of the retry's round."""
    from prismesh.aggregator.audit import audit_task

    fed, task = start(tmp_path, bench, rounds=1)
    try:
        counts = _count_training(fed)
        coord = fed.coordinator()
        _start_task(fed, task)
        late, first = fed.hospitals[0], fed.hospitals[1:]
        stage = lambda: late.daemon.state.section("rounds").get(f"{task}:1", {}).get("stage")  # noqa: E731
        for _ in range(60):  # everyone commits; the late node then stops before revealing
            if len(coord.get_events("UpdateRevealed", fed.manifest.deploy_block, taskId=task)) >= 2:
                break
            fed.finalize()
            for h in fed.hospitals:
                if h is not late or stage() != "committed":
                    h.daemon.step()
        revealed = {ev.client for ev in coord.get_events("UpdateRevealed", fed.manifest.deploy_block, taskId=task)}
        assert late.daemon.address not in revealed and len(revealed) == 2
        deadline = coord.get_round(task, 1).reveal_deadline
        fed.devnet.increase_time(deadline - fed.devnet.timestamp + 1)
        assert coord.phase_of(task, 1) == Phase.AGGREGATING
        coord.fail_round(task, 1, "governance retries the round")
        state = fed.run_task(task)
        assert state.status == TaskStatus.COMPLETED
        assert counts == {first[0].name: 2, first[1].name: 2, late.name: 1}
        reveals = coord.get_events("UpdateRevealed", fed.manifest.deploy_block, taskId=task)
        by_round = {r: {ev.client: ev.cid for ev in reveals if ev.round == r} for r in (1, 2)}
        committed = late.daemon.state.section("rounds")
        assert by_round[2][late.daemon.address] == committed[f"{task}:2"]["cid"]
        for h in first:
            assert by_round[2][h.daemon.address] != by_round[1][h.daemon.address]
        report = audit_task(fed.w3, fed.manifest, fed.store, task)
        assert report.ok, report.render()
        assert any(f.check == "round outcome" and "governance retries" in f.detail for f in report.findings)
    finally:
        fed.close()


def test_a_deleted_store_is_refilled_without_retraining(tmp_path: Path, bench) -> None:
    fed, task = start(tmp_path, bench, rounds=1)
    try:
        counts = _count_training(fed)
        for h in fed.hospitals:
            h.daemon.config.heal_interval = 0.0  # check the store at every step
        _start_task(fed, task)  # the aggregator learns of the round (and keeps the spec)
        stages = lambda: [h.daemon.state.section("rounds").get(f"{task}:1", {}).get("stage") for h in fed.hospitals]  # noqa: E731
        _drive_nodes_until(fed, lambda: all(s in ("committed", "revealed") for s in stages()))
        shutil.rmtree(fed.root / "ipfs")
        state = fed.run_task(task)
        assert state.status == TaskStatus.COMPLETED
        assert counts == {h.name: 1 for h in fed.hospitals}
        coord = fed.coordinator()
        assert not coord.get_events("RoundFailed", fed.manifest.deploy_block, taskId=task)
        accepted = coord.get_events("AggregateAccepted", fed.manifest.deploy_block, taskId=task)
        assert len(accepted[0].included) == len(fed.hospitals)
        for ev in coord.get_events("UpdateRevealed", fed.manifest.deploy_block, taskId=task):
            assert fed.store.check(ev.cid).ok
    finally:
        fed.close()


def _after_evaluating(node, then) -> None:
    """Run ``then(event)`` right after ``node`` has evaluated an aggregate and recorded the
    report it owes, before anything sends it."""
    original = node._on_aggregate

    def wrapped(ev):
        done = original(ev)
        then(ev)
        return done

    node._on_aggregate = wrapped


def test_a_metric_report_that_reached_the_chain_before_a_crash_is_not_sent_again(tmp_path: Path, bench,
                                                                                   caplog) -> None:
    """A node reports round 1's accuracy, then dies before its state records it. The report is
    still owed in its state: folded into the round-2 commitment it makes the batch revert, so
    the commitment goes alone; at the end of the step the report is recognised as on chain."""
    fed, task = start(tmp_path, bench, rounds=2, report_metrics=True)
    try:
        node = fed.hospitals[0].daemon
        _after_evaluating(node, lambda ev: ev.round == 1 and node.coordinator.report_metric(
            ev.task_id, ev.round, "accuracy", 0.25))
        with caplog.at_level(logging.INFO, logger="prismesh"):
            assert fed.run_task(task).status == TaskStatus.COMPLETED
        assert "commitUpdate with the metric reports was refused (MetricAlreadyReported)" in caplog.text
        coord = fed.coordinator()
        metrics = coord.get_events("MetricReported", fed.manifest.deploy_block, taskId=task)
        addresses = sorted(h.daemon.address for h in fed.hospitals)
        assert sorted((e.round, e.client) for e in metrics) == [(r, a) for r in (1, 2) for a in addresses]
        assert coord.get_metric(task, 1, node.address, "accuracy") == (True, 250_000)
        assert node.address in coord.included(task, 2)
        assert all(r["sent"] for r in node.state.section("metrics").values())
    finally:
        fed.close()


def test_a_metric_report_the_chain_refuses_for_good_does_not_stall_the_node(tmp_path: Path, bench,
                                                                             caplog) -> None:
    """A node is suspended between evaluating the last aggregate and reporting it. Its reward
    claim, refused with the report folded in, goes alone; the report is refused alone too, is
    recorded as refused and is not tried again at every later step."""
    from prismesh.chain.evm.contracts import RewardToken

    fed, task = start(tmp_path, bench, rounds=1, report_metrics=True)
    try:
        node = fed.hospitals[0].daemon
        _after_evaluating(node, lambda ev: fed.registry().suspend(node.address))
        with caplog.at_level(logging.INFO, logger="prismesh"):
            assert fed.run_task(task).status == TaskStatus.COMPLETED
        assert "claimRewards with the metric reports was refused (ClientNotApproved)" in caplog.text
        assert f"metric report {task}:1 was refused" in caplog.text
        coord = fed.coordinator()
        (claim,) = coord.get_events("RewardsClaimed", fed.manifest.deploy_block, taskId=task, account=node.address)
        assert claim.amount > 0 and RewardToken(fed.manifest, fed.w3).balance_of(node.address) == claim.amount
        assert not coord.events_in(fed.w3.eth.get_transaction_receipt(claim.tx_hash), "MetricReported")
        reporters = {e.client for e in coord.get_events("MetricReported", fed.manifest.deploy_block, taskId=task)}
        assert node.address not in reporters and len(reporters) == len(fed.hospitals) - 1
        (rec,) = node.state.section("metrics").values()
        assert rec["sent"] and rec["refused"] == "ClientNotApproved"
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="prismesh"):
            node.step()
        assert "refused" not in caplog.text
    finally:
        fed.close()


@pytest.mark.slow
def test_a_damaged_state_file_is_rebuilt_without_retraining(tmp_path: Path, bench) -> None:
    from prismesh.node.daemon import NODE_EVENTS, NodeDaemon
    from prismesh.runs.federation import TaskSettings, make_stream

    fed, task = start(tmp_path, bench, rounds=1)
    try:
        assert fed.run_task(task).status == TaskStatus.COMPLETED
        old = fed.hospitals[0]
        path = old.daemon.state.path
        path.write_text(path.read_text()[: len(path.read_text()) // 2])
        cfg = old.daemon.config
        stream = make_stream(fed.devnet, fed.manifest, NODE_EVENTS, cfg.state_dir / "cursor.json", True)
        fresh = NodeDaemon(cfg, w3=fed.w3, manifest=fed.manifest, account=old.daemon.account, store=fed.store,
                           stream=stream)
        assert fresh.state.damaged is not None
        old.daemon = fresh
        counts = _count_training(fed)
        fed.finalize()
        fresh.step()
        assert fresh.state.section("rounds")[f"{task}:1"]["stage"] == "closed"
        assert counts[old.name] == 0  # the finished round was recorded, not trained again
        task2 = fed.create_task(make_spec(bench[0]), TaskSettings(num_rounds=1, min_participants=2))
        assert fed.run_task(task2).status == TaskStatus.COMPLETED
        assert counts[old.name] == 1
    finally:
        fed.close()


@pytest.mark.slow
def test_a_second_daemon_with_the_same_key_is_stopped(tmp_path: Path, bench) -> None:
    from dataclasses import replace

    from prismesh.node.daemon import NODE_EVENTS, DuplicateIdentity, NodeDaemon
    from prismesh.runs.federation import make_stream

    fed, task = start(tmp_path, bench, rounds=1)
    try:
        first = fed.hospitals[0].daemon
        other = bench[1][2]  # another hospital's data: a different adapter, a different commitment
        cfg = replace(first.config, name="impostor", state_dir=tmp_path / "impostor",
                      train_data=Path(other.train_path), test_data=Path(other.test_path))
        stream = make_stream(fed.devnet, fed.manifest, NODE_EVENTS, cfg.state_dir / "cursor.json", True)
        impostor = NodeDaemon(cfg, w3=fed.w3, manifest=fed.manifest, account=first.account, store=fed.store,
                              stream=stream)
        _start_task(fed, task)
        with pytest.raises(DuplicateIdentity, match="another daemon is signing with the same key"):
            for _ in range(40):
                fed.step()
                impostor.step()
        assert impostor.state.section("rounds")[f"{task}:1"]["stage"] == "missed"
    finally:
        fed.close()


def test_readiness_reads_only_delivered_events(tmp_path: Path, bench) -> None:
    """The spurious failRound: the final height read after a poll can be newer than the events
    the aggregator was delivered; readiness must not count on reveals it has not seen. Without
    finality the latest block is final at once, which makes that window as wide as possible."""
    fed, task = start(tmp_path, bench, rounds=1, finality=False)
    try:
        coord = fed.coordinator()
        agg = fed.aggregator
        _start_task(fed, task)
        rec = agg.state.section("rounds")[f"{task}:1"]
        _drive_nodes_until(fed, lambda: coord.phase_of(task, 1) == Phase.AGGREGATING)
        assert rec["reveals"] == {}
        assert not agg._ready(rec)  # every reveal is final, none was delivered to it yet
        agg.step()
        assert len(rec["reveals"]) == len(fed.hospitals) and rec["status"] == "submitted"
        assert not coord.get_events("RoundFailed", fed.manifest.deploy_block, taskId=task)
    finally:
        fed.close()


# ------------------------------------------------------------------ deterministic adapters


def test_adapter_bytes_do_not_depend_on_the_process(tmp_path: Path, bench) -> None:
    """PEFT keeps target_modules as a set (saved in hash order, which changes with the process's
    hash seed); the trainer saves the config canonically, so another process writes
    byte-identical adapter files (the same CID) for the same tensors."""
    from prismesh.node.trainer import TrainConfig, create_initial_adapter

    base, _ = bench
    modules = ["v_proj", "q_proj", "o_proj", "k_proj", "gate_proj", "up_proj", "down_proj"]
    script = (
        "import sys, json; from pathlib import Path\n"
        "from prismesh.node.trainer import TrainConfig, create_initial_adapter\n"
        "cfg = TrainConfig.from_dict({'rank': 4, 'alpha': 8, 'device': 'cpu', 'target_modules': json.loads(sys.argv[3])})\n"
        "create_initial_adapter(Path(sys.argv[1]), Path(sys.argv[2]), cfg, 'test/tiny')\n"
    )
    seed = "1" if os.environ.get("PYTHONHASHSEED") != "1" else "2"
    env = {**os.environ, "PYTHONHASHSEED": seed, "OMP_NUM_THREADS": "1"}
    there = tmp_path / "other-process"
    subprocess.run([sys.executable, "-c", script, str(base), str(there), json.dumps(modules)], env=env,
                   check=True, timeout=300)
    cfg = TrainConfig.from_dict({"rank": 4, "alpha": 8, "device": "cpu", "target_modules": modules[::-1]})
    here = create_initial_adapter(base, tmp_path / "this-process", cfg, "test/tiny")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (here / name).read_bytes() == (there / name).read_bytes(), name
    config = json.loads((here / "adapter_config.json").read_text())
    assert config["target_modules"] == sorted(modules)
    assert list(config) == sorted(config)


@pytest.mark.slow
def test_daemons_refuse_a_lost_history_and_resynchronise(tmp_path: Path, bench) -> None:
    """The first fault of the field test: the chain loses a finished task (a devnet restarted
    from an old state), and the next create-task gets the same id again. Every daemon notices
    that its cursor is beyond the chain, sets aside what it learned from the lost blocks, and
    takes part in the new task under the old id."""
    from prismesh.chain.finality.committee import in_process_committee
    from prismesh.chain.finality.events import ChainDiverged
    from prismesh.runs.federation import TaskSettings

    fed, task = start(tmp_path, bench, rounds=1)
    try:
        assert fed.run_task(task).status == TaskStatus.COMPLETED
        snap = fed.devnet.snapshot()
        lost = fed.create_task(make_spec(bench[0]), TaskSettings(num_rounds=1, min_participants=2))
        assert fed.run_task(lost).status == TaskStatus.COMPLETED
        fed.devnet.revert(snap)  # the chain forgets the second task
        fed.committee = in_process_committee(fed.devnet, fed.manifest.to_json(), keys=fed.validator_keys)
        daemons = [h.daemon for h in fed.hospitals] + [fed.aggregator]
        for d in daemons:
            with pytest.raises(ChainDiverged, match="refusing to act on this history") as info:
                d.step()
            d.resync(info.value.safe_height)
        for h in fed.hospitals:
            rounds = h.daemon.state.section("rounds")
            assert f"{lost}:1" not in rounds and any(k.startswith(f"{lost}:1@") for k in h.daemon.state.section("orphaned"))
        again = fed.create_task(make_spec(bench[0]), TaskSettings(num_rounds=1, min_participants=2))
        assert again == lost
        assert fed.run_task(again).status == TaskStatus.COMPLETED
        accepted = fed.coordinator().get_events("AggregateAccepted", fed.manifest.deploy_block, taskId=again)
        assert len(accepted[0].included) == len(fed.hospitals)
    finally:
        fed.close()
