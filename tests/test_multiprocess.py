"""The multi-process deployment on a real anvil: `prismesh devnet` (anvil + contracts + the
HotStuff committee), three `prismesh node` processes and one `prismesh aggregator` process,
governance through `prismesh govern`, each a separate OS process that talks to the others only
through the chain and the shared store.

One two-round task carries the crash checks: in round 1 a node is killed with SIGKILL while it
trains and the aggregator is killed with SIGKILL once it has started aggregating; both are
restarted with the same configs. Round 2 runs undisturbed. The chain must show exactly one
commit and one reveal per node per round, one accepted aggregate per round with all three
nodes included, the rewards paid once, `prismesh audit` must recompute every aggregate, and
SIGTERM must stop every daemon cleanly.

All processes share one embedded store directory (``embedded:DIR``), which stands in for IPFS
on a single host; real hosts run a Kubo daemon each (``kubo:/ip4/127.0.0.1/tcp/5001``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.cluster import Proc, free_port, kill_group, pid_from, read
from tests.conftest import tiny_federation_inputs

REPO = Path(__file__).resolve().parents[1]
PRISMESH = str(REPO / ".venv" / "bin" / "prismesh")
PASSWORD = "multiprocess-test-password"
NODE_NAMES = ("a", "b", "c")
CRASH_NODE = "c"  # killed while training in round 1
PIN_CRASH_NODE = "a"  # killed right after pinning in round 2
ROUNDS = 2
REWARD_TOKENS = 10
TARGETS = "q_proj,v_proj"

pytestmark = pytest.mark.timeout(420)


@dataclass
class Deployment:
    root: Path
    env: dict
    manifest: Path
    store: str
    rpc_url: str
    devnet_state: Path
    configs: dict = field(default_factory=dict)
    addresses: dict = field(default_factory=dict)
    procs: list = field(default_factory=list)
    extra_pids: list = field(default_factory=list)

    def spawn(self, name: str, *args: str) -> Proc:
        n = sum(1 for p in self.procs if p.name == name) + 1
        log = self.root / "logs" / f"{name}.{n}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("wb") as fh:
            popen = subprocess.Popen(
                [PRISMESH, *args], stdout=fh, stderr=subprocess.STDOUT, env=self.env,
                cwd=self.root, start_new_session=True,
            )
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def node(self, name: str) -> Proc:
        return self.spawn(f"node-{name}", "node", "--config", str(self.configs[name]), "-q")

    def aggregator(self) -> Proc:
        return self.spawn("aggregator", "aggregator", "--config", str(self.configs["aggregator"]))

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([PRISMESH, *args], env=self.env, cwd=self.root, capture_output=True,
                              text=True, timeout=timeout)

    def govern(self, *args: str) -> str:
        res = self.cli("govern", args[0], "--manifest", str(self.manifest), *args[1:])
        assert res.returncode == 0, f"prismesh govern {' '.join(args)} failed:\n{res.stdout}\n{res.stderr}"
        return res.stdout

    def tails(self) -> str:
        out = []
        for p in self.procs:
            lines = p.text().splitlines()[-25:]
            out.append(f"==== {p.log.name} (rc {p.popen.poll()}) ====\n" + "\n".join(lines))
        for extra in sorted((self.root / "devnet").glob("*.log")):
            out.append(f"==== {extra.name} ====\n" + "\n".join(read(extra).splitlines()[-15:]))
        return "\n".join(out)

    def wait_for(self, what: str, predicate, timeout: float, interval: float = 0.05) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            dead = [p for p in self.procs if p.popen.poll() not in (None, 0, -signal.SIGKILL)]
            if dead:
                pytest.fail(f"{dead[0].log.name} exited with {dead[0].popen.poll()} while waiting for {what}\n{self.tails()}")
            time.sleep(interval)
        pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{self.tails()}")


@pytest.fixture(scope="module")
def deployment(tmp_path_factory) -> Deployment:
    from prismesh.chain.identity import dev_account, save_keystore

    root = tmp_path_factory.mktemp("multiprocess")
    env = {**os.environ, "PRISMESH_KEYSTORE_PASSWORD": PASSWORD, "PYTHONUNBUFFERED": "1",
           "RAY_USAGE_STATS_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env["PATH"] = f"{REPO / '.venv' / 'bin'}:{env.get('PATH', '')}"

    # Data and a tiny real base model every node shares (each host would hold its own copy).
    base, clients = tiny_federation_inputs(root)
    data = {}
    for name, c in zip(NODE_NAMES, clients, strict=True):
        train = Path(c.train_path)
        if name == CRASH_NODE:
            # Enough local data that training lasts a few seconds, so the kill lands inside it.
            lines = [ln for ln in train.read_text().splitlines() if ln.strip()]
            train = root / "data" / f"{name}-large.jsonl"
            train.write_text("\n".join(lines * 40) + "\n")
        data[name] = (train, Path(c.test_path))

    port = free_port()
    devdir = root / "devnet"
    dep = Deployment(root=root, env=env, manifest=devdir / "manifest.json", store=f"embedded:{root / 'ipfs'}",
                     rpc_url=f"http://127.0.0.1:{port}", devnet_state=devdir / "anvil-state.json")
    try:
        res = dep.cli("devnet", "--port", str(port), "--state", str(dep.devnet_state),
                      "--manifest", str(dep.manifest), "--fresh", "--detach", timeout=180)
        assert res.returncode == 0, f"prismesh devnet failed:\n{res.stdout}\n{res.stderr}"
        if "finality: HotStuff committee" not in res.stdout:
            # An older devnet without the committee: run it as its own process.
            log = devdir / "committee.log"
            with log.open("ab") as fh:
                committee = subprocess.Popen(
                    [sys.executable, "-m", "prismesh.chain.finality.committee", "--rpc", dep.rpc_url,
                     "--manifest", str(dep.manifest), "--validators", "4"],
                    stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True,
                )
            dep.extra_pids.append(committee.pid)

        # Keystores (devnet keys, cheap pbkdf2) and configs; node i signs as dev:2+i.
        for i, name in enumerate(NODE_NAMES):
            account = dev_account(2 + i)
            dep.addresses[name] = account.address
            save_keystore(account, root / "keys" / f"node-{name}.json", PASSWORD, iterations=2)
            train, test = data[name]
            cfg = root / f"node-{name}.toml"
            cfg.write_text(
                f'name = "hospital-{name}"\n'
                f'manifest = "{dep.manifest}"\n'
                f'keystore = "keys/node-{name}.json"\n'
                f'base_model = "{base}"\n'
                f'train_data = "{train}"\n'
                f'test_data = "{test}"\n'
                f'state_dir = "state/node-{name}"\n'
                f'store = "{dep.store}"\n'
                'device = "cpu"\n'
                "poll_interval = 0.3\n"
                f'[descriptor]\ninstitution = "hospital {name}"\nkind = "hospital"\n'
            )
            dep.configs[name] = cfg
        agg = dev_account(1)
        dep.addresses["aggregator"] = agg.address
        save_keystore(agg, root / "keys" / "aggregator.json", PASSWORD, iterations=2)
        cfg = root / "aggregator.toml"
        cfg.write_text(
            f'manifest = "{dep.manifest}"\n'
            'keystore = "keys/aggregator.json"\n'
            'state_dir = "state/aggregator"\n'
            f'store = "{dep.store}"\n'
            "parallel = true\n"
            "ray_num_cpus = 1\n"
            "poll_interval = 0.3\n"
        )
        dep.configs["aggregator"] = cfg
        dep.base = base
        yield dep
    finally:
        for p in dep.procs:
            if p.popen.poll() is None:
                kill_group(p.popen.pid)
        dep.cli("devnet", "--stop", "--state", str(dep.devnet_state), timeout=60)
        for pid in [*dep.extra_pids, pid_from(devdir / "anvil.pid"), pid_from(devdir / "committee.pid")]:
            if pid:
                kill_group(pid)


def chain_view(dep: Deployment):
    from prismesh.chain.evm.contracts import Coordinator, Registry, RewardToken
    from prismesh.chain.evm.manifest import connect, load_manifest

    manifest = load_manifest(dep.manifest)
    w3 = connect(manifest)
    return (manifest, Coordinator.read_only(manifest, w3), Registry.read_only(manifest, w3),
            RewardToken.read_only(manifest, w3))


def test_three_node_processes_and_aggregator_survive_kill9(deployment: Deployment) -> None:
    from prismesh.chain.evm.contracts import ClientStatus, TaskStatus

    dep = deployment
    manifest, coord, registry, token = chain_view(dep)
    nodes = {name: dep.node(name) for name in NODE_NAMES}
    aggregator = dep.aggregator()

    # Governance vets the nodes once they have registered themselves.
    addrs = [dep.addresses[n] for n in NODE_NAMES]
    dep.wait_for("all nodes registered",
                 lambda: all(registry.status_of(a) != ClientStatus.NONE for a in addrs), timeout=90, interval=0.3)
    dep.govern("approve", *addrs)

    spec = dep.root / "task.json"
    res = dep.cli("govern", "make-spec", "--base-model", str(dep.base), "--base-model-id", "test/tiny-qwen3",
                  "--rank", "4", "--alpha", "8", "--dropout", "0", "--target-modules", TARGETS,
                  "--no-report-metrics", "--train", json.dumps({"lr": 1e-3, "max_length": 96, "seed": 0}),
                  "--out", str(spec))
    assert res.returncode == 0, res.stderr
    out = dep.govern("create-task", "--spec", str(spec), "--store", dep.store, "--rounds", str(ROUNDS),
                     "--min-participants", "3", "--max-participants", "3", "--reward", str(REWARD_TOKENS))
    task = json.loads(out.strip().splitlines()[-1])["task"]

    def joined() -> bool:
        status = json.loads(dep.govern("status", str(task)))
        return sorted(status["participants"]) == sorted(addrs)

    dep.wait_for("all three nodes joined", joined, timeout=60, interval=1.0)
    assert "started with 3 participants" in dep.govern("start-task", str(task))

    # Round 1, node crash: SIGKILL while it trains, then restart it with the same config.
    victim = nodes[CRASH_NODE]
    marker = f"task {task} round 1: training on"
    dep.wait_for(f"node {CRASH_NODE} training", lambda: marker in victim.text(), timeout=60, interval=0.02)
    victim.kill9()
    before = victim.text()
    assert f"task {task} round 1: committed" not in before, "the node was not killed mid-round"
    restarted = dep.node(CRASH_NODE)
    dep.wait_for("the restarted node's reveal", lambda: f"task {task} round 1: revealed" in restarted.text(),
                 timeout=90, interval=0.2)
    pinned = [ln.rsplit(" ", 1)[-1] for ln in before.splitlines() if f"task {task} round 1: adapter pinned as" in ln]
    if pinned:  # killed between pinning and committing: the restart must re-use that adapter
        assert f"re-using pinned adapter {pinned[0]}" in restarted.text()

    # Round 1, aggregator crash: SIGKILL once it has started aggregating, then restart it.
    aggregating = f"aggregating task {task} round 1"
    dep.wait_for("the aggregator to start round 1", lambda: aggregating in aggregator.text(), timeout=90, interval=0.01)
    aggregator.kill9()
    first = aggregator.text()
    interrupted = f"task {task} round 1: aggregate" not in first
    aggregator2 = dep.aggregator()

    # Round 2, a node killed right after it pinned its adapter (before or just after its commit):
    # the restart must neither train again nor commit twice.
    late = nodes[PIN_CRASH_NODE]
    pinned_line = f"task {task} round 2: adapter pinned as"
    dep.wait_for(f"node {PIN_CRASH_NODE} to pin round 2", lambda: pinned_line in late.text(), timeout=120, interval=0.005)
    late.kill9()
    state_file = dep.root / "state" / f"node-{PIN_CRASH_NODE}" / "node-state.json"
    stage = json.loads(state_file.read_text())["rounds"][f"{task}:2"]
    late2 = dep.node(PIN_CRASH_NODE)

    def completed() -> bool:
        return coord.get_task(task).status in (TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED)

    dep.wait_for("the task to complete", completed, timeout=240, interval=0.5)
    state = coord.get_task(task)
    assert state.status == TaskStatus.COMPLETED, dep.tails()
    if interrupted:  # nothing was pinned before the kill: the restart recomputed the round
        assert aggregating in aggregator2.text()

    # The chain: one commit and one reveal per node per round, one accepted aggregate per round.
    start = manifest.deploy_block
    commits = Counter((ev.round, ev.client) for ev in coord.get_events("UpdateCommitted", start, taskId=task))
    reveals = Counter((ev.round, ev.client) for ev in coord.get_events("UpdateRevealed", start, taskId=task))
    expected = Counter({(r, a): 1 for r in range(1, ROUNDS + 1) for a in addrs})
    assert commits == expected
    assert reveals == expected
    accepted = coord.get_events("AggregateAccepted", start, taskId=task)
    assert [ev.round for ev in accepted] == list(range(1, ROUNDS + 1))
    for ev in accepted:
        assert sorted(ev.included) == sorted(addrs)
    opened = {ev.round: ev for ev in coord.get_events("RoundOpened", start, taskId=task)}
    assert opened[2].global_adapter_cid == accepted[0].aggregate_cid
    # Each node claims what its updates earned (split by contribution score) once the task is over.
    dep.wait_for("the nodes to claim their rewards",
                 lambda: all(coord.rewards_owed(task, a) == 0 for a in addrs), timeout=60, interval=0.5)
    earned = coord.get_events("RewardEarned", start, taskId=task)
    unit = 10 ** token.decimals()
    assert sum(e.amount for e in earned if not e.is_aggregator) <= ROUNDS * len(addrs) * REWARD_TOKENS * unit
    for a in addrs:
        assert token.balance_of(a) == sum(e.amount for e in earned if e.recipient == a)

    # The restarted node did its round-1 work once, in its second life.
    assert restarted.text().count(f"task {task} round 1: committed") == 1
    # The node killed after pinning re-used its adapter rather than training again.
    revealed_cid = {ev.round: ev.cid for ev in coord.get_events("UpdateRevealed", start, taskId=task)
                    if ev.client == dep.addresses[PIN_CRASH_NODE]}
    assert revealed_cid[2] == stage["cid"]
    assert f"task {task} round 2: training on" not in late2.text()
    if stage["stage"] == "pinned":
        assert f"task {task} round 2: re-using pinned adapter {stage['cid']}" in late2.text()

    # Anyone can recompute every aggregate from the chain and the store (this also shows the
    # aggregate submitted after the aggregator's crash equals an uninterrupted computation).
    audit = dep.cli("audit", "--task", str(task), "--manifest", str(dep.manifest), "--store", dep.store)
    assert audit.returncode == 0, audit.stdout + audit.stderr
    assert audit.stdout.count("aggregate recomputed") >= ROUNDS

    # SIGTERM stops every running daemon cleanly.
    running = [p for p in dep.procs if p.alive()]
    assert {p.name for p in running} == {f"node-{n}" for n in NODE_NAMES} | {"aggregator"}
    for p in running:
        p.popen.send_signal(signal.SIGTERM)
    for p in running:
        try:
            rc = p.popen.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{p.log.name} did not stop within 20 s of SIGTERM\n{dep.tails()}")
        assert rc == 0, f"{p.log.name} exited with {rc}\n{p.text()[-2000:]}"
        assert "stopped cleanly" in p.text()


def test_keys_new_writes_a_keystore_the_daemons_can_open(tmp_path: Path) -> None:
    env = {**os.environ, "PRISMESH_KEYSTORE_PASSWORD": PASSWORD}
    out = tmp_path / "k.json"
    res = subprocess.run([PRISMESH, "keys", "new", "--out", str(out), "--pbkdf2-iterations", "2"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    address = json.loads(res.stdout)["address"]
    assert oct(out.stat().st_mode & 0o777) == "0o600"
    res = subprocess.run([PRISMESH, "keys", "address", str(out)], env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.strip() == address
    # Refuses to overwrite; a wrong password names the file; no password and no terminal is an error.
    res = subprocess.run([PRISMESH, "keys", "new", "--out", str(out)], env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and "exists" in res.stderr
    bad = {**env, "PRISMESH_KEYSTORE_PASSWORD": "wrong"}
    res = subprocess.run([PRISMESH, "keys", "address", str(out)], env=bad, capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and str(out) in res.stderr
    none = {k: v for k, v in env.items() if k != "PRISMESH_KEYSTORE_PASSWORD"}
    res = subprocess.run([PRISMESH, "keys", "address", str(out)], env=none, capture_output=True, text=True,
                         timeout=60, stdin=subprocess.DEVNULL)
    assert res.returncode == 1 and "PRISMESH_KEYSTORE_PASSWORD" in res.stderr


def test_stream_rewind_redelivers_only_unhandled_events(tmp_path: Path) -> None:
    """What a daemon's retry after a failed step relies on: rewinding the final-event stream
    re-delivers exactly the events that were delivered but not acknowledged."""
    from prismesh.chain.finality.coordinator_stream import open_final_stream
    from prismesh.chain.taskspec import TaskSpec
    from prismesh.runs.federation import Federation, TaskSettings

    fed = Federation(tmp_path / "fed", finality=False, parallel=False)
    try:
        spec = TaskSpec(base_model_id="test/none", base_model_sha256="0" * 64)
        tasks = [fed.create_task(spec, TaskSettings(num_rounds=1)) for _ in range(3)]
        cursor = tmp_path / "cursor.json"
        stream = open_final_stream(fed.w3, fed.manifest, ("TaskCreated",), cursor, finality=False)
        first = stream.poll()
        assert [ev.task_id for ev in first] == tasks
        stream.ack(first[0])  # the step handled one event, then failed
        assert stream.poll() == []
        stream.rewind()
        assert [ev.task_id for ev in stream.poll()] == tasks[1:]
        again = open_final_stream(fed.w3, fed.manifest, ("TaskCreated",), cursor, finality=False)
        redelivered = again.poll()
        assert [ev.task_id for ev in redelivered] == tasks[1:]
        again.ack(redelivered[-1])
        again.rewind()
        assert again.poll() == []
    finally:
        fed.close()
