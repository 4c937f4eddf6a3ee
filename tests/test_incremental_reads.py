"""Incremental event reads: the embedded chain's log index and the demo's task history read
each block once, and deliver each event once however often they are asked."""

from __future__ import annotations

from web3.providers.eth_tester.defaults import get_logs as eth_tester_get_logs

from tests.conftest import DESCRIPTOR, ChainEnv


def _scan(env: ChainEnv, **params) -> list[dict]:
    """eth-tester's own answer (a scan of every block in the range), for comparison."""
    return [dict(entry) for entry in eth_tester_get_logs(env.devnet.tester, [params])]


def test_embedded_log_queries_do_not_rescan_a_long_chain(embedded_env: ChainEnv) -> None:
    dev, manifest = embedded_env.devnet, embedded_env.manifest
    index = dev.log_index
    registry = manifest.address("Registry")
    reg = embedded_env.registry()
    params = {"from_block": manifest.deploy_block, "to_block": "latest", "address": registry}
    deployed = len(index.get_logs(**params))
    for c in embedded_env.clients[:2]:
        reg.with_sender(c).register(DESCRIPTOR)
    dev.mine(400)  # a long chain with nothing in it
    first = index.get_logs(**params)
    assert first == _scan(embedded_env, **params)
    assert len(first) == deployed + 2
    read = index.blocks_read

    reg.approve(embedded_env.clients[0].address)
    after = index.get_logs(**params)
    assert after == _scan(embedded_env, **params) and len(after) == deployed + 3
    assert index.blocks_read - read == 1  # only the new block was read
    assert index.get_logs(**params) == after and index.blocks_read - read == 1

    # a topic filter and a block range give eth-tester's answer without reading any block
    topic = first[-1]["topics"][0]
    narrow = {"from_block": first[-1]["block_number"], "to_block": "latest",
              "address": [registry], "topics": [topic]}
    assert index.get_logs(**narrow) == _scan(embedded_env, **narrow) == [first[-1]]
    assert index.blocks_read - read == 1
    # through web3, as every client of the chain queries it
    got = embedded_env.w3.eth.get_logs({"fromBlock": manifest.deploy_block, "address": registry})
    assert [int(g["blockNumber"]) for g in got] == [a["block_number"] for a in after]


def test_embedded_log_index_follows_a_revert(embedded_env: ChainEnv) -> None:
    dev, manifest = embedded_env.devnet, embedded_env.manifest
    params = {"from_block": manifest.deploy_block, "to_block": "latest",
              "address": manifest.address("Registry")}
    before = dev.log_index.get_logs(**params)
    snap = dev.snapshot()
    embedded_env.registry().with_sender(embedded_env.clients[0]).register(DESCRIPTOR)
    assert len(dev.log_index.get_logs(**params)) == len(before) + 1
    dev.revert(snap)
    embedded_env.registry().with_sender(embedded_env.clients[1]).register(DESCRIPTOR)
    again = dev.log_index.get_logs(**params)
    assert again == _scan(embedded_env, **params)
    assert len(again) == len(before) + 1


def test_demo_history_delivers_each_event_once_and_reads_only_new_blocks(embedded_env: ChainEnv) -> None:
    """The demo's progress printer (which also feeds its report) reads forward from the last
    block it read: every event of its task exactly once across polls, other tasks' not at all."""
    from types import SimpleNamespace

    from prismesh.runs.accounting import Ledger
    from prismesh.runs.demo import _RoundPrinter
    from tests.conftest import commit_reveal_all, open_task, task_params

    clients = embedded_env.clients[:2]
    other = open_task(embedded_env, clients)
    coord = embedded_env.coordinator()
    task = coord.task_id_from(coord.create_task(task_params()))
    for c in clients:
        coord.with_sender(c).join_task(task)
    coord.start_task(task)
    fed = SimpleNamespace(w3=embedded_env.w3, manifest=embedded_env.manifest)
    printer = _RoundPrinter(fed, task, Ledger())
    index = embedded_env.devnet.log_index
    printer.poll()
    assert [(e.event, e.round) for e in printer.events["RoundOpened"]] == [("RoundOpened", 1)]
    read, head = index.blocks_read, embedded_env.w3.eth.block_number
    printer.poll()
    printer.poll()
    assert len(printer.events["RoundOpened"]) == 1 and index.blocks_read == read
    commit_reveal_all(embedded_env, other, 1, clients)
    updates = commit_reveal_all(embedded_env, task, 1, clients)
    printer.poll()
    printer.poll()
    revealed = printer.events["UpdateRevealed"]
    assert [(e.client, e.cid) for e in revealed] == [(u.client.address, u.cid) for u in updates]
    assert all(e.task_id == task for events in printer.events.values() for e in events)
    # however often it was asked, each new block was read once
    assert index.blocks_read - read == embedded_env.w3.eth.block_number - head
