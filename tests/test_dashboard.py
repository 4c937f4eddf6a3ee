"""The dashboard over a consortium history written through the real contracts on the embedded
chain (finalized by the HotStuff committee) and the real embedded store: what the index reads,
that it reads each block once, what the pages show and escape, stored objects that went missing
or bad, audits that name their failed checks, the live stream, and the read-only surface.

The browser test (a real Chromium over a federation that trains) is ``test_dashboard_browser``.
"""

from __future__ import annotations

import html.parser
import json
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from prismesh.chain.evm.contracts import SCORE_SCALE
from prismesh.chain.evm.deploy import deploy_to_devnet
from prismesh.chain.evm.devnet import start_embedded
from prismesh.chain.finality.committee import devnet_validator_keys, in_process_committee
from prismesh.chain.storage import open_store
from prismesh.dashboard.server import BackgroundServer
from prismesh.dashboard.service import open_dashboard
from tests.benchmarks.dashboard_history import (
    FIRST_CLIENT,
    create_task,
    fast,
    onboard,
    play_round,
    spec_for,
)

pytestmark = pytest.mark.timeout(300)

MARKUP_MODEL = "<script>alert('model')</script>"
MARKUP_METRIC = "<img src=x onerror=alert(1)>"
MARKUP_STRATEGY = "<b>fedavg</b>"


class World:
    """An embedded chain with its committee, a store, a history, a dashboard served from a
    thread; ``lock`` is the chain lock the test holds whenever it writes."""

    def __init__(self, root: Path) -> None:
        self.dev = start_embedded()
        keys = devnet_validator_keys(n=4)
        self.manifest = deploy_to_devnet(self.dev, validators=[k.address for k in keys],
                                         aggregators=[self.dev.accounts[1].address])
        self.committee = in_process_committee(self.dev, self.manifest.to_json(), keys=keys)
        self.store = open_store(f"embedded:{root / 'ipfs'}")
        self.lock = threading.RLock()
        self.history = onboard(self.dev, self.manifest, 3)
        self.tasks = []
        for _ in range(2):
            task = create_task(self.dev, self.manifest, self.store, self.history, rounds=2)
            for rnd in (1, 2):
                play_round(self.dev, self.manifest, self.store, self.history, task, rnd)
            self.tasks.append(task)
        # A task whose strings carry markup: the model id, the strategy, a metric name.
        spec = spec_for(3, strategy=MARKUP_STRATEGY)
        spec = type(spec)(**{**spec.__dict__, "base_model_id": MARKUP_MODEL})
        self.markup_task = create_task(self.dev, self.manifest, self.store, self.history, rounds=2, spec=spec)
        play_round(self.dev, self.manifest, self.store, self.history, self.markup_task, 1)
        fast(self.coordinator(0)).report_metric(self.markup_task, 1, MARKUP_METRIC, 0.5)
        self.committee.run_until_final()
        self.dash = open_dashboard(self.dev.w3, self.manifest, self.store, chain_lock=self.lock,
                                   descriptors=self.history.descriptors, poll_interval=0.1)
        self.server = BackgroundServer(self.dash)
        self.url = self.server.start()

    def coordinator(self, client: int):
        from prismesh.chain.evm.contracts import Coordinator

        return Coordinator(self.manifest, self.dev.w3, self.dev.accounts[FIRST_CLIENT + client])

    def get(self, path: str, headers: dict[str, str] | None = None, method: str = "GET") -> tuple[int, str, dict]:
        req = urllib.request.Request(self.url + path, headers=headers or {}, method=method)
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, r.read().decode(), dict(r.headers)
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode(), dict(e.headers)

    def wait_for(self, path: str, text: str, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        body = ""
        while time.monotonic() < deadline:
            status, body, _ = self.get(path)
            if status == 200 and text in body:
                return body
            time.sleep(0.1)
        raise AssertionError(f"{text!r} never appeared on {path}; last page:\n{body[:3000]}")

    def close(self) -> None:
        self.server.stop()


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    w = World(tmp_path_factory.mktemp("dashboard"))
    yield w
    w.close()


class Elements(html.parser.HTMLParser):
    """Tags and text of a page, as a browser's parser sees them."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def parse(body: str) -> Elements:
    p = Elements()
    p.feed(body)
    return p


def test_index_reads_what_the_chain_recorded(world: World) -> None:
    world.wait_for("/", f"task {world.markup_task}")
    task = world.dash.index.task(world.tasks[0])
    assert task.status == "Completed" and task.completed_rounds == 2 == task.num_rounds
    assert task.participants == world.history.hospitals
    r1 = task.rounds[1]
    assert [p for p, _ in r1.phases] == ["Open", "Commit", "Reveal", "Aggregating", "Finalized"]
    blocks = [b for _, b in r1.phases]
    assert blocks == sorted(blocks) and r1.aggregate_block == blocks[-1]
    assert list(r1.deadlines) == ["commit", "reveal", "aggregation"]
    assert r1.deadlines["commit"] < r1.deadlines["reveal"] < r1.deadlines["aggregation"]
    # Rewards split by contribution score: rewardPerUpdate x included x score / sum of scores.
    scores = [SCORE_SCALE * (i + 1) // 3 for i in range(3)]
    rewards = [10 * 10**18 * 3 * sc // sum(scores) for sc in scores]
    for i, address in enumerate(world.history.hospitals):
        c = r1.clients[address]
        assert c.status == "included" and c.num_samples == 100 + 10 * i
        assert (c.score, c.reward) == (scores[i], rewards[i])
        assert c.metrics["accuracy"] == pytest.approx(min(0.95, 0.2 + 0.1 + 0.03 * i))
    assert r1.aggregator_reward == 2 * 10**18
    assert task.rewards_paid == 2 * (sum(rewards) + 2 * 10**18)
    hospitals = {h.address: h for h in world.dash.index.hospital_list()}
    assert all(hospitals[a].status == "Approved" for a in world.history.hospitals)
    # Each hospital: 2 completed tasks x 2 rounds + 1 round of the markup task.
    assert [hospitals[a].rewards for a in world.history.hospitals] == [5 * r for r in rewards]
    info = world.dash.index.finality_snapshot()
    assert len(info.validators) == 4 and info.quorum == 3
    assert info.final_height == world.committee.final_height and info.certificates
    # Gas: every transaction of the round, each read once (receipt or single-transaction block).
    deadline = time.monotonic() + 30
    while world.dash.index.gas_of(r1)[1] and time.monotonic() < deadline:
        time.sleep(0.1)
    gas, pending = world.dash.index.gas_of(r1)
    with world.lock:
        expected = sum(int(world.dev.w3.eth.get_transaction_receipt(h)["gasUsed"]) for h in r1.txs)
    assert pending == 0 and gas == expected > 0


def test_each_final_block_is_read_once(world: World) -> None:
    """A refresh reads only blocks that became final since the last one."""
    index = world.dash.index
    world.wait_for("/", f"task {world.markup_task}")
    with world.lock:
        seen = index.events_seen
        index.refresh()
        assert index.events_seen == seen  # nothing new is final: nothing re-read
        play_round(world.dev, world.manifest, world.store, world.history, world.markup_task, 2)
        index.refresh()
        assert index.events_seen == seen  # mined but not final yet: not shown
        world.committee.run_until_final()
        index.refresh()
    # 3 commits + 3 reveals + 4 phase changes + aggregate + 4 rewards + completion + 3 metrics
    assert index.events_seen - seen == 19
    assert index.task(world.markup_task).status == "Completed"


def test_a_long_chain_is_read_a_batch_at_a_time(world: World) -> None:
    """A cold start reads a bounded range per refresh, so pages fill in as it goes, and ends
    with the same model as a reader that took it in one go."""
    from prismesh.dashboard.index import ChainIndex

    with world.lock:
        final = world.committee.final_height
        index = ChainIndex(world.dev.w3, world.manifest, chain_lock=world.lock, batch_blocks=25)
        index.refresh()
        assert not index.caught_up and index.indexed_to == world.manifest.deploy_block + 24
        refreshes = 1
        while not index.caught_up:
            index.refresh()
            refreshes += 1
        assert refreshes == -(-(final - world.manifest.deploy_block + 1) // 25)
        whole = ChainIndex(world.dev.w3, world.manifest, chain_lock=world.lock, batch_blocks=100_000)
        whole.refresh()
    assert whole.caught_up and index.events_seen == whole.events_seen
    assert sorted(index.tasks) == sorted(whole.tasks)
    for t in index.tasks:
        assert index.task(t).rounds.keys() == whole.task(t).rounds.keys()
        assert [r.phases for r in index.task(t).rounds.values()] == [r.phases for r in whole.task(t).rounds.values()]


def test_pages_escape_chain_and_store_strings(world: World) -> None:
    world.wait_for("/", MARKUP_STRATEGY.replace("<", "&lt;").replace(">", "&gt;"))
    for path in ("/", f"/tasks/{world.markup_task}"):
        status, body, _ = world.get(path)
        assert status == 200
        page = parse(body)
        tags = [t for t, _ in page.tags]
        assert "img" not in tags and "b" not in tags, path
        assert [a.get("src") for t, a in page.tags if t == "script"] == ["/static/live.js"], path
        assert all(not k.startswith("on") for _, attrs in page.tags for k in attrs), path
    text = "".join(parse(world.wait_for(f"/tasks/{world.markup_task}", "metric-name")).text)
    assert MARKUP_MODEL in text and MARKUP_METRIC in text  # shown, as text


def test_a_missing_or_corrupt_stored_object_shows_as_unverifiable(world: World) -> None:
    with world.lock:  # a task no page has shown yet
        task = create_task(world.dev, world.manifest, world.store, world.history, rounds=1)
        play_round(world.dev, world.manifest, world.store, world.history, task, 1)
        world.committee.run_until_final()
    deadline = time.monotonic() + 30
    while world.dash.index.task(task) is None or world.dash.index.task(task).status != "Completed":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    rnd = world.dash.index.task(task).rounds[1]
    missing, corrupt = (rnd.clients[a].cid for a in world.history.hospitals[:2])
    world.store.block_path(missing).unlink()
    path = world.store.block_path(corrupt)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    deadline = time.monotonic() + 60
    while True:  # the page loads at once; the verdicts follow from the background checks
        status, body, _ = world.get(f"/tasks/{task}")
        assert status == 200
        if "badge wait" not in body or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert body.count('class="badge bad"') == 2 and "verified ·" in body
    assert world.dash.checker.status(missing).state == "unverifiable"
    assert "corrupt" in world.dash.checker.status(corrupt).detail
    assert world.dash.checker.status(rnd.clients[world.history.hospitals[2]].cid).ok


def test_an_audit_names_each_failed_check(world: World) -> None:
    """The history's adapters are stand-in files, not PEFT directories: the audit must fail and
    say which checks failed; the result is cached by the task's last final block."""
    task = world.tasks[0]
    status, _, _ = world.get(f"/tasks/{task}/audit", method="POST", headers={"Origin": "http://evil.example"})
    assert status == 403
    status, body, _ = world.get(f"/tasks/{task}/audit", method="POST")
    assert status == 200  # the redirect after queueing
    body = world.wait_for(f"/tasks/{task}/audit", 'data-state="fail"', timeout=120)
    result = world.dash.audits.result(task)
    assert result.state == "done" and not result.ok and result.failures
    assert "adapter vs CID" in {f.check for f in result.failures}
    assert body.count('class="failed"') == len(result.failures)
    assert world.dash.audits.request(task) == "cached"


def test_live_stream_and_read_only_surface(world: World) -> None:
    req = urllib.request.Request(world.url + "/events")
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        line = r.readline().decode()
    data = json.loads(line.removeprefix("data: "))
    assert data["key"].count(".") == 2 and data["final"] == world.dash.index.finality_info.final_height
    status, body, headers = world.get(f"/tasks/{world.tasks[0]}", headers={"X-Fragment": "1"})
    assert status == 200 and not body.lstrip().startswith("<!doctype") and "Round timeline" in body
    assert "script-src 'self'" in headers["content-security-policy"] and headers["x-frame-options"] == "DENY"
    assert world.get("/", method="POST")[0] == 405
    assert world.get("/tasks/999")[0] == 404
    assert world.get("/?page=99")[0] == 404
    assert world.get("/?page=-1")[0] == 400
    assert world.get("/", headers={"Host": "evil.example"})[0] == 400  # no DNS rebinding
    assert world.get("/finality")[0] == 200 and world.get("/hospitals")[0] == 200
    assert world.get("/healthz")[0] == 200
    _, hospitals, _ = world.get("/hospitals")
    assert "hospital-a" in hospitals  # named by its descriptor, which matches the chain's hash


def test_exclusion_reasons_come_from_the_audit_findings() -> None:
    """The chain records who was included, not why the others were not; an audit re-derives the
    reasons from the chain and the store, and the task page shows them from its findings."""
    from prismesh.dashboard.audits import AuditResult, Check
    from prismesh.dashboard.views import audit_reasons

    client = "0x9965507D1a55bcC2695C58ba16FB37d819B0A4dc"
    checks = [
        Check("exclusion re-derived", f"round 2 {client.lower()}", True, "non-finite values: q_proj has 1 NaN"),
        Check("update rejected", f"round 3 {client}", True, "fetch failed (BlockNotFound): ..."),
        Check("adapter vs CID", f"round 1 {client} QmX", False, "block missing"),
    ]
    assert audit_reasons(AuditResult(1, "done", 9, False, checks)) == {
        (2, client): "non-finite values: q_proj has 1 NaN",
        (3, client): "fetch failed (BlockNotFound): ...",
    }
    assert audit_reasons(AuditResult(1, "running", 9)) == {} and audit_reasons(None) == {}
