"""The finality-aware event stream: never before finality, each event once across restarts."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from prismesh.chain.finality.committee import in_process_committee
from prismesh.chain.finality.events import CursorError, FinalEventStream
from prismesh.chain.finality.gadget import FinalityGadgetClient
from tests.conftest import DESCRIPTOR, ChainEnv


def _registry_stream(env: ChainEnv, cursor: Path | None, **kw) -> FinalEventStream:
    registry = env.registry().contract if hasattr(env.registry(), "contract") else None
    address = env.manifest.address("Registry")
    abi = registry.abi if registry is not None else env.manifest.abis["Registry"]
    gadget = FinalityGadgetClient(env.w3, env.manifest.finality_gadget)
    return FinalEventStream(
        env.w3,
        (address, abi),
        ["ClientRegistered", "ClientStatusChanged"],
        gadget,
        cursor,
        from_block=env.manifest.deploy_block,
        **kw,
    )


def _register(env: ChainEnv, clients) -> list[int]:
    reg = env.registry()
    blocks = []
    for c in clients:
        blocks.append(reg.with_sender(c).register(DESCRIPTOR)["blockNumber"])
        blocks.append(reg.approve(c.address)["blockNumber"])
    return blocks


def test_events_only_after_finality_in_order(chain_env: ChainEnv, tmp_path: Path) -> None:
    committee = in_process_committee(chain_env.devnet, chain_env.manifest)
    stream = _registry_stream(chain_env, tmp_path / "cursor.json")
    blocks = _register(chain_env, chain_env.clients[:1])
    assert stream.poll() == []  # mined, not final
    final = committee.run_until_final()
    assert final >= blocks[-1]
    early = stream.poll()
    assert [e.block_number for e in early] == blocks
    more = _register(chain_env, chain_env.clients[1:2])
    assert stream.poll() == []  # the new blocks are not final yet
    assert FinalityGadgetClient(chain_env.w3, chain_env.manifest.finality_gadget).finalized_height() < more[0]
    committee.run_until_final()
    rest = stream.poll()
    events = early + rest
    blocks += more
    assert [e.name for e in events] == ["ClientRegistered", "ClientStatusChanged"] * 2
    assert [e.block_number for e in events] == blocks
    assert [e.position for e in events] == sorted(e.position for e in events)
    assert events[0].args["client"] == chain_env.clients[0].address
    assert stream.poll() == []


def test_restart_resumes_after_last_ack_exactly_once(chain_env: ChainEnv, tmp_path: Path) -> None:
    committee = in_process_committee(chain_env.devnet, chain_env.manifest)
    cursor = tmp_path / "state" / "cursor.json"
    seen: list[tuple[int, int]] = []
    clients = chain_env.clients[:6]
    stream = _registry_stream(chain_env, cursor)
    for step, batch in enumerate((clients[:2], clients[2:3], clients[3:6])):
        _register(chain_env, batch)
        committee.run_until_final()
        events = stream.poll()
        assert events
        # Handle (ack) all but the last event, then "crash": a new stream from the same file.
        for e in events[:-1]:
            stream.ack(e)
            seen.append(e.position)
        stream = _registry_stream(chain_env, cursor)
        replay = stream.poll()
        assert [e.position for e in replay] == [events[-1].position], step
        stream.ack(replay[0])
        seen.append(replay[0].position)
        assert json.loads(cursor.read_text())["block"] >= replay[0].block_number
    assert len(seen) == len(set(seen)) == 2 * len(clients)
    assert seen == sorted(seen)
    # A restart with everything acknowledged delivers nothing again.
    assert _registry_stream(chain_env, cursor).poll() == []


def _two_registered(env: ChainEnv, cursor: Path) -> tuple[FinalEventStream, list]:
    """A stream on ``cursor`` that has delivered two clients' final registrations (four events)."""
    committee = in_process_committee(env.devnet, env.manifest)
    stream = _registry_stream(env, cursor)
    _register(env, env.clients[:2])
    committee.run_until_final()
    events = stream.poll()
    assert len(events) == 4
    return stream, events


def _replayed(env: ChainEnv, cursor: Path) -> list[tuple[int, int]]:
    """What a daemon restarted from ``cursor`` is delivered: the positions not yet on disk."""
    return [e.position for e in _registry_stream(env, cursor).poll()]


def test_deferred_acks_reach_disk_together(chain_env: ChainEnv, tmp_path: Path) -> None:
    """Acknowledgements made with ``durable=False`` leave the cursor file as it was (a crash
    then delivers those events again) until ``flush`` writes them in one write; a later
    durable ack carries the deferred ones with it."""
    cursor = tmp_path / "cursor.json"
    stream, events = _two_registered(chain_env, cursor)
    before = cursor.read_text() if cursor.exists() else None
    for e in events[:3]:
        stream.ack(e, durable=False)
    assert (cursor.read_text() if cursor.exists() else None) == before
    assert _replayed(chain_env, cursor) == [e.position for e in events]
    writes = []
    real = stream._save_cursor
    stream._save_cursor = lambda: (writes.append(1), real())[1]  # type: ignore[method-assign]
    stream.flush()
    stream.flush()  # nothing more to write
    assert len(writes) == 1
    assert _replayed(chain_env, cursor) == [events[3].position]
    stream.ack(events[3], durable=False)
    _register(chain_env, chain_env.clients[2:3])
    in_process_committee(chain_env.devnet, chain_env.manifest).run_until_final()
    more = stream.poll()  # a poll writes what was deferred before it
    assert _replayed(chain_env, cursor) == [e.position for e in more]
    stream.ack(more[0], durable=False)
    stream.ack(more[1])  # durable: carries the deferred one
    assert _replayed(chain_env, cursor) == []
    with pytest.raises(ValueError, match="never delivered"):
        stream.ack(dataclasses.replace(more[1], log_index=more[1].log_index + 99))


def test_deferred_acks_are_bounded(chain_env: ChainEnv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """However long a batch, at most ``MAX_DEFERRED_ACKS`` acknowledgements wait for a write:
    a crash while catching up on a long history replays no more than that."""
    from prismesh.chain.finality import events as events_module

    monkeypatch.setattr(events_module, "MAX_DEFERRED_ACKS", 3)
    cursor = tmp_path / "cursor.json"
    stream, events = _two_registered(chain_env, cursor)
    for e in events[:2]:
        stream.ack(e, durable=False)
    assert _replayed(chain_env, cursor) == [e.position for e in events]
    stream.ack(events[2], durable=False)  # the third pending one: written
    assert _replayed(chain_env, cursor) == [events[3].position]


def test_auto_ack_and_finality_disabled(chain_env: ChainEnv, tmp_path: Path) -> None:
    cursor = tmp_path / "c.json"
    fast = _registry_stream(chain_env, cursor, auto_ack=True)
    fast.finality = False
    blocks = _register(chain_env, chain_env.clients[:1])
    got = fast.poll()
    assert [e.block_number for e in got] == blocks  # latest block counts as final
    again = _registry_stream(chain_env, cursor, auto_ack=True)
    again.finality = False
    assert again.poll() == []


def test_bad_inputs_are_named(chain_env: ChainEnv, tmp_path: Path) -> None:
    address = chain_env.manifest.address("Registry")
    abi = chain_env.manifest.abis["Registry"]
    with pytest.raises(ValueError, match="NoSuchEvent"):
        FinalEventStream(chain_env.w3, (address, abi), ["NoSuchEvent"], lambda: 0)
    with pytest.raises(ValueError, match="final_height"):
        FinalEventStream(chain_env.w3, (address, abi), ["ClientRegistered"])
    cursor = tmp_path / "c.json"
    cursor.write_text("{not json")
    with pytest.raises(CursorError, match=str(cursor)):
        FinalEventStream(chain_env.w3, (address, abi), ["ClientRegistered"], lambda: 0, cursor)
    cursor.write_text(json.dumps({"address": address, "events": ["Other"], "block": 1, "log_index": 0}))
    with pytest.raises(CursorError, match="belongs to"):
        FinalEventStream(chain_env.w3, (address, abi), ["ClientRegistered"], lambda: 0, cursor)
