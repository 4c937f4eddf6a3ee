"""The fault campaign on the multi-process deployment (``tests/cluster.py``), and the faults a
running deployment must ride out: RPC down at start and mid-run, a deleted store, a corrupted
block, a truncated state file, a duplicate key.

Every campaign run creates a one-round task, SIGKILLs one component (a node, the aggregator,
the committee or anvil) at one phase of the round, restarts it, and requires: the task
completes, every client's commit, reveal and reward exactly once, no certified block lost, the
audit passes. The default suite runs one run per component; the slow suite runs 30 seeded
random runs (``PRISMESH_FAULT_SEED`` picks another schedule, ``PRISMESH_FAULT_RUNS`` another
count, ``PRISMESH_FAULT_COMPONENTS=anvil`` kills only the listed components).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from tests.cluster import COMPONENTS, NODE_NAMES, Cluster, run_campaign, summary, table

SEED = int(os.environ.get("PRISMESH_FAULT_SEED", "12"))
SMOKE_PLAN = [("node", "training"), ("aggregator", "aggregating"), ("committee", "committed"), ("anvil", "revealed")]

pytestmark = pytest.mark.timeout(1500)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Cluster:
    c = Cluster(tmp_path_factory.mktemp("cluster"))
    try:
        c.start()
        yield c
    finally:
        c.close()


def _report(cluster: Cluster, name: str, results) -> str:
    text = table(results) + "\n\n" + summary(results)
    (cluster.root / f"{name}.json").write_text(json.dumps([r.row() for r in results], indent=1))
    (cluster.root / f"{name}.md").write_text(text + "\n")
    print(f"\n{name} (seed {SEED}):\n{text}")
    return text


def _assert_all_ok(results, runs: int) -> None:
    bad = [r for r in results if r.outcome != "ok"]
    assert not bad, f"run {bad[0].run} ({bad[0].victim} at {bad[0].phase}): {bad[0].detail}"
    assert len(results) == runs


def test_one_kill_per_component(cluster: Cluster) -> None:
    results = run_campaign(cluster, len(SMOKE_PLAN), SEED, plan=SMOKE_PLAN)
    _report(cluster, "campaign-smoke", results)
    _assert_all_ok(results, len(SMOKE_PLAN))


@pytest.mark.slow
def test_rpc_down_at_start_and_mid_run(cluster: Cluster) -> None:
    """anvil dies; a node started meanwhile waits (one line per attempt, no traceback), every
    running daemon rides out the outage, and all of them carry on once anvil is back."""
    cluster.kill("anvil")
    cluster.kill("node-a")
    late = cluster.spawn_node("a")
    cluster.wait_for("the node's retries", lambda: late.text().count("connecting to the chain") >= 2, 60, 0.1)
    time.sleep(1.0)
    cluster.start_devnet()
    cluster.wait_for("the node to connect", lambda: "following final events" in late.text(), 90, 0.1)
    attempts = [ln for ln in late.text().splitlines() if "connecting to the chain" in ln]
    assert all("cannot reach" in ln and "retrying in" in ln for ln in attempts)
    assert "Traceback" not in late.text()
    for name in ("node-b", "node-c", "aggregator"):
        assert "Traceback" not in cluster.current[name].text()
    task = cluster.create_task(seed=2001)
    start = cluster.start_task(task)
    cluster.wait_done(task)
    assert cluster.check_task(task, start - 2) == []


@pytest.mark.slow
def test_deleted_store_and_corrupted_block_are_repaired(cluster: Cluster) -> None:
    """The shared store is deleted after round 1 and a block of round 2's aggregate is flipped:
    the daemons re-add what they hold (spec, adapters, aggregates) and nobody trains twice."""
    from prismesh.chain.storage import EmbeddedStore

    c = cluster.chain()
    task = cluster.create_task(seed=2002, rounds=3)
    start = cluster.start_task(task)
    accepted = lambda r: len(c.coord.get_events("AggregateAccepted", start, taskId=task)) >= r  # noqa: E731
    cluster.wait_for("round 1", lambda: accepted(1), 120, 0.05)
    # Gone at once, as a lost disk is: renamed away (the daemons may be writing to it), then removed.
    lost = cluster.root / "ipfs.lost"
    (cluster.root / "ipfs").rename(lost)
    shutil.rmtree(lost, ignore_errors=True)
    cluster.wait_for("round 2", lambda: accepted(2), 180, 0.05)
    aggregate = c.coord.get_events("AggregateAccepted", start, taskId=task)[1].aggregate_cid
    store = EmbeddedStore(cluster.root / "ipfs")
    leaf = max((store.block_path(cid) for cid, _ in store.walk(aggregate)), key=lambda p: p.stat().st_size)
    raw = bytearray(leaf.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    leaf.write_bytes(bytes(raw))
    cluster.wait_done(task, timeout=240)
    # The nodes put back round 1's adapters (the audit re-checks them) within a heal interval.
    deadline = time.monotonic() + 30
    while (problems := cluster.check_task(task, start - 2, rounds=3)) and time.monotonic() < deadline:
        time.sleep(1.0)
    assert problems == []
    agg = cluster.current["aggregator"].text()
    assert "re-added it from" in agg
    for name in NODE_NAMES:
        text = cluster.current[f"node-{name}"].text()
        for r in (1, 2, 3):
            assert text.count(f"task {task} round {r}: training on") <= 1, name


@pytest.mark.slow
def test_truncated_state_file_is_rebuilt(cluster: Cluster) -> None:
    proc = cluster.current["node-b"]
    proc.popen.terminate()
    assert proc.popen.wait(timeout=30) == 0
    state = cluster.root / "state" / "node-b" / "node-state.json"
    state.write_text(state.read_text()[: state.stat().st_size // 3])
    restarted = cluster.spawn_node("b")
    cluster.wait_for("the rebuilt node", lambda: "following final events" in restarted.text(), 90, 0.1)
    task = cluster.create_task(seed=2003)
    start = cluster.start_task(task)
    cluster.wait_done(task)
    assert cluster.check_task(task, start - 2) == []
    text = restarted.text()
    assert "node-state.json was damaged" in text and "rebuilding from the chain and the store" in text
    assert list(state.parent.glob("node-state.json.damaged-*"))
    trained = [ln for ln in text.splitlines() if "training on" in ln]
    assert trained and all(f"task {task} " in ln for ln in trained)  # no past round trained again


@pytest.mark.slow
def test_duplicate_key(cluster: Cluster) -> None:
    """Same state directory: the second daemon is refused at once. Another state directory
    (another host): the daemon that meets a commitment it did not make stops with exit 3."""
    from tests.conftest import tiny_federation_inputs

    twin = cluster.spawn_node("a", label="node-a-same-dir")
    assert twin.popen.wait(timeout=60) == 1
    assert "another node daemon (pid" in twin.text() and "already runs on" in twin.text()
    cluster.current.pop("node-a-same-dir")
    _, clients = tiny_federation_inputs(cluster.root / "other-host")
    other = clients[2]
    cfg = cluster.node_config("a-host2", "keys/node-a.json", Path(other.train_path), Path(other.test_path),
                              "state/node-a-host2")
    host2 = cluster.spawn_node("a", config=cfg, label="node-a-host2")
    cluster.wait_for("the second host", lambda: "following final events" in host2.text(), 90, 0.1)
    task = cluster.create_task(seed=2004)
    cluster.start_task(task)
    first = cluster.current["node-a"]
    _wait_one_stops(cluster, first, host2)
    stopped = first if not first.alive() else host2
    assert stopped.popen.returncode == 3, stopped.text()[-2000:]
    assert "another daemon is signing with the same key" in stopped.text()
    cluster.current.pop("node-a" if stopped is first else "node-a-host2")
    cluster.wait_done(task)
    if stopped is first:  # the second host took node a's place: stop it, bring node a back
        host2.popen.terminate()
        host2.popen.wait(timeout=30)
        cluster.current.pop("node-a-host2")
        back = cluster.spawn_node("a")
        cluster.wait_for("node a back", lambda: "following final events" in back.text(), 90)


def _wait_one_stops(cluster: Cluster, a, b) -> None:
    deadline = time.monotonic() + 120
    while a.alive() and b.alive():
        assert time.monotonic() < deadline, cluster.tails()
        time.sleep(0.1)


@pytest.mark.slow
@pytest.mark.campaign
def test_fault_campaign(cluster: Cluster) -> None:
    runs = int(os.environ.get("PRISMESH_FAULT_RUNS", "30"))
    components = tuple(c for c in os.environ.get("PRISMESH_FAULT_COMPONENTS", "").split(",") if c) or COMPONENTS
    results = run_campaign(cluster, runs, SEED, components=components)
    _report(cluster, "campaign", results)
    _assert_all_ok(results, runs)
    assert {r.component for r in results} == set(components)
