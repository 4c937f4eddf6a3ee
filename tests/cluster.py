"""A multi-process PrisMesh deployment for end-to-end and fault tests, and the fault campaign.

:class:`Cluster` runs what the README walkthrough runs, each a separate OS process: anvil and
the HotStuff committee (``prismesh devnet --detach``), three ``prismesh node`` daemons and one
``prismesh aggregator``, sharing one embedded store directory. Governance acts in-process with
the devnet's account 0. :func:`run_campaign` kills (SIGKILL) a randomly chosen component at a
random moment of a round, restarts it, and checks what must hold after every fault: the task
completes, each client's commit, reveal and reward appear exactly once, no certified block is
lost, and the audit passes. The fault tests and ``tests/benchmarks/bench_faults.py`` share it.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PRISMESH = str(REPO / ".venv" / "bin" / "prismesh")
PASSWORD = "cluster-test-password"
NODE_NAMES = ("a", "b", "c")
REWARD_TOKENS = 10
TARGETS = ("q_proj", "v_proj")
COMPONENTS = ("node", "aggregator", "committee", "anvil")
PHASES = ("opened", "training", "committed", "revealed", "aggregating", "accepted")


class ClusterError(AssertionError):
    """Something the cluster waited for did not happen; the message carries the logs' tails."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:  # a zombie child counts as gone
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except (OSError, IndexError):
        return True
    return state != "Z"


def pid_from(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (FileNotFoundError, ValueError, IndexError):
        return None


def group_members(pgid: int) -> list[int]:
    """Live processes in process group ``pgid`` (what a killed daemon left behind)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            out.append(int(entry.name))
    return out


def kill_group(pgid: int) -> None:
    """End a process group this harness started (its leader was spawned in a new session)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(0.3)


@dataclass
class Proc:
    """One daemon incarnation: its process and its own log file."""

    name: str
    popen: subprocess.Popen
    log: Path
    started: float = field(default_factory=time.monotonic)

    def text(self) -> str:
        return read(self.log)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill9(self, group: bool = True) -> None:
        """SIGKILL the daemon (and, with ``group``, anything it started)."""
        try:
            if group:
                os.killpg(self.popen.pid, signal.SIGKILL)
            else:
                os.kill(self.popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.popen.wait(timeout=10)


@dataclass
class RunResult:
    """One campaign run: what was killed when, and how the system recovered."""

    run: int
    component: str
    victim: str
    phase: str
    task: int
    outcome: str = "ok"
    kill_to_done_s: float = 0.0
    restart_to_ready_s: float = 0.0
    task_seconds: float = 0.0
    leftover_processes: int = 0
    detail: str = ""

    def row(self) -> dict[str, Any]:
        return dict(self.__dict__)


class Cluster:
    """anvil + committee + three node daemons + one aggregator, each its own process."""

    def __init__(self, root: Path, *, poll_interval: float = 0.2) -> None:
        self.root = Path(root)
        self.poll_interval = poll_interval
        self.env = {**os.environ, "PRISMESH_KEYSTORE_PASSWORD": PASSWORD, "PYTHONUNBUFFERED": "1",
                    "RAY_USAGE_STATS_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false",
                    "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        self.env["PATH"] = f"{REPO / '.venv' / 'bin'}:{self.env.get('PATH', '')}"
        self.env.pop("PRISMESH_DEBUG", None)
        self.port = free_port()
        self.rpc_url = f"http://127.0.0.1:{self.port}"
        self.devdir = self.root / "devnet"
        self.manifest_path = self.devdir / "manifest.json"
        self.devnet_state = self.devdir / "anvil-state.json"
        self.store_spec = f"embedded:{self.root / 'ipfs'}"
        self.configs: dict[str, Path] = {}
        self.addresses: dict[str, str] = {}
        self.procs: list[Proc] = []
        self.current: dict[str, Proc] = {}
        self.certified: dict[int, bytes] = {}
        self.base: Path | None = None
        self._chain: Any = None

    # ------------------------------------------------------------------ set-up

    def start(self) -> Cluster:
        from prismesh.chain.identity import dev_account, save_keystore
        from tests.conftest import tiny_federation_inputs

        self.base, clients = tiny_federation_inputs(self.root)
        self.start_devnet(fresh=True)
        for i, (name, c) in enumerate(zip(NODE_NAMES, clients, strict=True)):
            account = dev_account(2 + i)
            self.addresses[name] = account.address
            save_keystore(account, self.root / "keys" / f"node-{name}.json", PASSWORD, iterations=2)
            self.configs[name] = self.node_config(name, f"keys/node-{name}.json", Path(c.train_path),
                                                  Path(c.test_path), f"state/node-{name}")
        agg = dev_account(1)
        self.addresses["aggregator"] = agg.address
        save_keystore(agg, self.root / "keys" / "aggregator.json", PASSWORD, iterations=2)
        cfg = self.root / "aggregator.toml"
        cfg.write_text(
            f'manifest = "{self.manifest_path}"\n'
            'keystore = "keys/aggregator.json"\n'
            'state_dir = "state/aggregator"\n'
            f'store = "{self.store_spec}"\n'
            "parallel = true\n"
            "ray_num_cpus = 1\n"
            f"poll_interval = {self.poll_interval}\n"
            "heal_interval = 2.0\n"
        )
        self.configs["aggregator"] = cfg
        for name in NODE_NAMES:
            self.spawn_node(name)
        self.spawn_aggregator()
        registry = self.chain().registry
        from prismesh.chain.evm.contracts import ClientStatus, Registry

        addrs = [self.addresses[n] for n in NODE_NAMES]
        self.wait_for("the nodes to register",
                      lambda: all(registry.status_of(a) != ClientStatus.NONE for a in addrs), 120, 0.3)
        gov = Registry(self.chain().manifest, self.chain().w3, dev_account(0))
        for a in addrs:
            if not gov.is_approved(a):
                gov.approve(a)
        for name in NODE_NAMES:
            self.wait_for(f"node {name} approved", lambda n=name: "approved; following final events"
                          in self.current[f"node-{n}"].text(), 60, 0.2)
        self.wait_for("the aggregator", lambda: "following final events" in self.current["aggregator"].text(), 120, 0.2)
        return self

    def node_config(self, name: str, keystore: str, train: Path, test: Path, state_dir: str,
                    **extra: Any) -> Path:
        cfg = self.root / f"node-{name}.toml"
        lines = [
            f'name = "hospital-{name}"',
            f'manifest = "{self.manifest_path}"',
            f'keystore = "{keystore}"',
            f'base_model = "{self.base}"',
            f'train_data = "{train}"',
            f'test_data = "{test}"',
            f'state_dir = "{state_dir}"',
            f'store = "{self.store_spec}"',
            'device = "cpu"',
            f"poll_interval = {self.poll_interval}",
            "heal_interval = 2.0",
            *(f"{k} = {json.dumps(v)}" for k, v in extra.items()),
            f'[descriptor]\ninstitution = "hospital {name}"\nkind = "hospital"',
        ]
        cfg.write_text("\n".join(lines) + "\n")
        return cfg

    def start_devnet(self, fresh: bool = False) -> subprocess.CompletedProcess:
        args = ["devnet", "--port", str(self.port), "--state", str(self.devnet_state),
                "--manifest", str(self.manifest_path), "--detach"]
        res = self.cli(*args, *(["--fresh"] if fresh else []), timeout=180)
        if res.returncode != 0:
            raise ClusterError(f"prismesh devnet failed:\n{res.stdout}\n{res.stderr}")
        return res

    # ------------------------------------------------------------------ processes

    def spawn(self, name: str, *args: str, cmd: list[str] | None = None) -> Proc:
        n = sum(1 for p in self.procs if p.name == name) + 1
        log = self.root / "logs" / f"{name}.{n}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("wb") as fh:
            popen = subprocess.Popen(
                cmd or [PRISMESH, *args], stdout=fh, stderr=subprocess.STDOUT, env=self.env,
                cwd=self.root, start_new_session=True,
            )
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        self.current[name] = proc
        return proc

    def spawn_node(self, name: str, config: Path | None = None, label: str | None = None) -> Proc:
        return self.spawn(label or f"node-{name}", "node", "--config", str(config or self.configs[name]), "-q")

    def spawn_aggregator(self) -> Proc:
        return self.spawn("aggregator", "aggregator", "--config", str(self.configs["aggregator"]))

    def spawn_committee(self) -> Proc:
        proc = self.spawn("committee", cmd=[
            sys.executable, "-m", "prismesh.chain.finality.committee", "--rpc", self.rpc_url,
            "--manifest", str(self.manifest_path), "--validators", "4", "--state", str(self.devnet_state),
        ])
        (self.devdir / "committee.pid").write_text(f"{proc.popen.pid}\n")
        return proc

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([PRISMESH, *args], env=self.env, cwd=self.root, capture_output=True,
                              text=True, timeout=timeout)

    def anvil_pid(self) -> int | None:
        return pid_from(self.devdir / "anvil.pid")

    def committee_pid(self) -> int | None:
        return pid_from(self.devdir / "committee.pid")

    def committee_log(self) -> str:
        proc = self.current.get("committee")
        return proc.text() if proc is not None else read(self.devdir / "committee.log")

    def kill(self, victim: str) -> None:
        """SIGKILL one component's main process, as a crash would (not its process group: what
        it leaves behind is part of what is measured)."""
        if victim == "anvil":
            pid = self.anvil_pid()
        elif victim == "committee":
            pid = self.committee_pid()
        else:
            pid = self.current[victim].popen.pid
        assert pid is not None, f"no pid for {victim}"
        os.kill(pid, signal.SIGKILL)
        if victim in self.current:
            self.current[victim].popen.wait(timeout=10)
        else:
            deadline = time.monotonic() + 10
            while alive(pid) and time.monotonic() < deadline:
                time.sleep(0.02)
        if victim == "anvil":
            self._chain = None

    def restart(self, victim: str) -> Proc | None:
        if victim == "anvil":
            self.start_devnet()
            return None
        if victim == "committee":
            return self.spawn_committee()
        if victim == "aggregator":
            return self.spawn_aggregator()
        return self.spawn_node(victim.removeprefix("node-"))

    def ready(self, victim: str, proc: Proc | None, final_before: int) -> bool:
        """Whether a restarted component is back at work."""
        if victim == "anvil":
            try:
                return self.chain().gadget.finalized_height() > final_before
            except Exception:  # noqa: BLE001 - still coming back
                return False
        assert proc is not None
        text = proc.text()
        if victim == "committee":
            return "final height" in text
        return "following final events" in text

    def tails(self, lines: int = 25) -> str:
        out = []
        latest = {p.name: p for p in self.procs}
        for p in latest.values():
            tail = p.text().splitlines()[-lines:]
            out.append(f"==== {p.log.name} (rc {p.popen.poll()}) ====\n" + "\n".join(tail))
        for extra in sorted(self.devdir.glob("*.log")):
            if extra.name.startswith("anvil-"):
                continue
            out.append(f"==== {extra.name} ====\n" + "\n".join(read(extra).splitlines()[-15:]))
        return "\n".join(out)

    def wait_for(self, what: str, predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if predicate():
                    return
            except Exception:  # noqa: BLE001 - the chain may be restarting; ask again
                pass
            dead = [p for name, p in self.current.items() if p.popen.poll() not in (None, 0, -signal.SIGKILL)]
            if dead:
                raise ClusterError(f"{dead[0].log.name} exited with {dead[0].popen.poll()} while waiting "
                                   f"for {what}\n{self.tails()}")
            time.sleep(interval)
        raise ClusterError(f"timed out after {timeout:.0f} s waiting for {what}\n{self.tails()}")

    def close(self) -> None:
        for p in self.procs:
            if p.popen.poll() is None:
                kill_group(p.popen.pid)
        self.cli("devnet", "--stop", "--state", str(self.devnet_state), timeout=60)
        for pid in (self.anvil_pid(), self.committee_pid()):
            if pid and alive(pid):
                kill_group(pid)

    # ------------------------------------------------------------------ the chain, in-process

    def chain(self) -> Any:
        if self._chain is None:
            from types import SimpleNamespace

            from prismesh.chain.evm.contracts import Coordinator, Registry, RewardToken
            from prismesh.chain.evm.devnet import http_web3
            from prismesh.chain.evm.manifest import load_manifest
            from prismesh.chain.finality.gadget import FinalityGadgetClient
            from prismesh.chain.identity import dev_account
            from prismesh.chain.storage import open_store

            manifest = load_manifest(self.manifest_path)
            w3 = http_web3(self.rpc_url, timeout=10)
            self._chain = SimpleNamespace(
                manifest=manifest, w3=w3,
                coord=Coordinator.read_only(manifest, w3),
                gov=Coordinator(manifest, w3, dev_account(0)),
                registry=Registry.read_only(manifest, w3),
                token=RewardToken.read_only(manifest, w3),
                gadget=FinalityGadgetClient(w3, manifest.finality_gadget),
                store=open_store(self.store_spec),
            )
        return self._chain

    def record_final(self) -> int:
        """Remember the gadget's final block and hash: it must never be lost afterwards."""
        c = self.chain()
        # Both reads at one block (a certificate may land between them), and not the newest
        # one, whose state anvil may still be writing while it answers.
        at = int(c.w3.eth.block_number) - 1
        f = c.gadget.contract.functions
        height = int(f.finalizedHeight().call(block_identifier=at))
        if height > 0:
            self.certified[height] = bytes(f.finalizedHash().call(block_identifier=at))
        return height

    def lost_certified(self) -> list[int]:
        """Certified heights whose block is no longer on the chain with the certified hash."""
        w3 = self.chain().w3
        lost = []
        for height, block_hash in sorted(self.certified.items()):
            try:
                found = bytes(w3.eth.get_block(height)["hash"])
            except Exception:  # noqa: BLE001 - missing block
                found = b""
            if found != block_hash:
                lost.append(height)
        return lost

    def final(self, block: int) -> bool:
        self.record_final()
        return self.chain().gadget.finalized_height() >= block

    def governance(self, what: str, action: Callable[[], Any], timeout: float = 60) -> Any:
        """A governance transaction, retried while the devnet restarts, waited until final."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                receipt = action()
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                self._chain = None
                time.sleep(0.5)
        self.wait_for(f"{what} to be final", lambda: self.final(int(receipt["blockNumber"])), timeout, 0.1)
        return receipt

    # ------------------------------------------------------------------ tasks

    def make_spec(self, seed: int, report_metrics: bool = False) -> Any:
        """A one-layer task; its training seed makes each task's adapters new (nodes keep the
        adapters they trained and would otherwise re-use them)."""
        from prismesh.chain.taskspec import LoraSpec, TaskSpec, model_fingerprint
        from prismesh.runs.federation import model_config_of

        assert self.base is not None
        return TaskSpec(
            base_model_id="test/tiny-qwen3",
            base_model_sha256=model_fingerprint(self.base),
            lora=LoraSpec(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS),
            model_config=model_config_of(self.base),
            train={"lr": 1e-3, "max_length": 96, "seed": seed},
            report_metrics=report_metrics,
        )

    def create_task(self, seed: int, rounds: int = 1, participants: int = 3, report_metrics: bool = False) -> int:
        from prismesh.chain.evm.contracts import TaskParams

        c = self.chain()
        spec = self.make_spec(seed, report_metrics)
        spec_cid = c.store.add_bytes(spec.to_bytes())
        unit = 10 ** c.token.decimals()
        params = TaskParams.for_spec(
            spec, spec_cid, "", num_rounds=rounds, min_participants=participants,
            max_participants=participants, max_failed_rounds=2, commit_duration=3600,
            reveal_duration=3600, aggregation_duration=3600, reward_per_update=REWARD_TOKENS * unit,
            aggregator_reward=2 * unit, sample_cap=4096,
        )
        receipt = self.governance("create-task", lambda: self.chain().gov.create_task(params))
        return self.chain().coord.task_id_from(receipt)

    def start_task(self, task: int, names: tuple[str, ...] = NODE_NAMES) -> int:
        """Wait until ``names`` joined (final), start the task; returns the start block."""
        addrs = [self.addresses[n] for n in names]

        def joined() -> bool:
            c = self.chain()
            if not all(c.coord.is_participant(task, a) for a in addrs):
                return False
            blocks = [ev.block_number for ev in c.coord.get_events("ParticipantJoined", c.manifest.deploy_block, taskId=task)]
            return self.final(max(blocks))

        self.wait_for(f"the nodes to join task {task}", joined, 90, 0.1)
        receipt = self.governance("start-task", lambda: self.chain().gov.start_task(task))
        return int(receipt["blockNumber"])

    def done(self, task: int) -> bool:
        from prismesh.chain.evm.contracts import TaskStatus

        self.record_final()
        return self.chain().coord.get_task(task).status in (
            TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED)

    def finished(self, task: int) -> bool:
        """The task is over, every node claimed what it earned, and all of it is final."""
        if not self.done(task):
            return False
        c = self.chain()
        start = c.manifest.deploy_block
        ends = [ev.block_number for name in ("TaskCompleted", "TaskFailed")
                for ev in c.coord.get_events(name, start, taskId=task)]
        earners = {ev.recipient for ev in c.coord.get_events("RewardEarned", start, taskId=task)
                   if not ev.is_aggregator and ev.amount > 0}
        claims = c.coord.get_events("RewardsClaimed", start, taskId=task)
        if not ends or {ev.account for ev in claims} != earners:
            return False
        return self.final(max([*ends, *(ev.block_number for ev in claims)]))

    def wait_done(self, task: int, timeout: float = 180) -> None:
        self.wait_for(f"task {task} to finish (final)", lambda: self.finished(task), timeout, 0.1)

    def check_task(self, task: int, from_block: int, rounds: int = 1,
                   names: tuple[str, ...] = NODE_NAMES, audit: bool = True) -> list[str]:
        """What must hold for a finished task; returns the violations (empty when none)."""
        from prismesh.aggregator.audit import audit_task
        from prismesh.chain.evm.contracts import TaskStatus

        c = self.chain()
        problems = []
        status = c.coord.get_task(task).status
        if status != TaskStatus.COMPLETED:
            problems.append(f"task {task} is {status.name}")
        addrs = [self.addresses[n] for n in names]
        expected = Counter({(r, a): 1 for r in range(1, rounds + 1) for a in addrs})
        for name in ("UpdateCommitted", "UpdateRevealed"):
            got = Counter((ev.round, ev.client) for ev in c.coord.get_events(name, from_block, taskId=task))
            if got != expected:
                problems.append(f"{name}: {dict(got)} instead of once per client per round")
        earned = [ev for ev in c.coord.get_events("RewardEarned", from_block, taskId=task) if not ev.is_aggregator]
        per_round = Counter((ev.round, ev.recipient) for ev in earned)
        if per_round != expected:
            problems.append(f"RewardEarned: {dict(per_round)} instead of once per client per round")
        claims = Counter(ev.account for ev in c.coord.get_events("RewardsClaimed", from_block, taskId=task))
        owed = {a: sum(ev.amount for ev in earned if ev.recipient == a) for a in addrs}
        if claims != Counter({a: 1 for a, amount in owed.items() if amount > 0}):
            problems.append(f"RewardsClaimed: {dict(claims)} instead of once per client that earned")
        unpaid = {a: c.coord.rewards_owed(task, a) for a in addrs if c.coord.rewards_owed(task, a)}
        if unpaid:
            problems.append(f"rewards still owed after the claims: {unpaid}")
        failed = c.coord.get_events("RoundFailed", from_block, taskId=task)
        if failed:
            problems.append(f"rounds failed: {[(ev.round, ev.reason) for ev in failed]}")
        accepted = c.coord.get_events("AggregateAccepted", from_block, taskId=task)
        if [ev.round for ev in accepted] != list(range(1, rounds + 1)):
            problems.append(f"accepted rounds {[ev.round for ev in accepted]}")
        lost = self.lost_certified()
        if lost:
            problems.append(f"certified blocks lost: {lost[:10]}")
        if audit:
            report = audit_task(c.w3, c.manifest, c.store, task)
            if not report.ok:
                problems.append("audit failed:\n" + report.render())
        return problems


# ---------------------------------------------------------------------- the campaign


def trigger(cluster: Cluster, phase: str, task: int, start_block: int) -> Callable[[], bool]:
    """A predicate that holds once the task's round 1 reached ``phase`` (on the latest chain)."""
    c = cluster.chain

    def count(name: str) -> int:
        return len(c().coord.get_events(name, start_block, taskId=task))

    if phase == "opened":
        return lambda: True
    if phase == "training":
        marks = (f"task {task} round 1: training on", f"task {task} round 1: re-using")
        return lambda: any(m in cluster.current[f"node-{n}"].text() for n in NODE_NAMES for m in marks)
    if phase == "committed":
        return lambda: count("UpdateCommitted") >= 1
    if phase == "revealed":
        return lambda: count("UpdateRevealed") >= 1
    if phase == "aggregating":
        return lambda: f"aggregating task {task} round 1" in cluster.current["aggregator"].text() or cluster.done(task)
    if phase == "accepted":
        return lambda: count("AggregateAccepted") >= 1
    raise ValueError(f"unknown phase {phase!r}")


def run_once(cluster: Cluster, run: int, rng: random.Random, component: str | None = None,
             phase: str | None = None) -> RunResult:
    """One task with one SIGKILL of ``component`` at ``phase`` (random when not given)."""
    component = component or rng.choice(COMPONENTS)
    phase = phase or rng.choice(PHASES)
    victim = f"node-{rng.choice(NODE_NAMES)}" if component == "node" else component
    t0 = time.monotonic()
    task = cluster.create_task(seed=1000 + run)
    start_block = cluster.start_task(task)
    result = RunResult(run, component, victim, phase, task)
    cluster.wait_for(f"phase {phase} of task {task}", trigger(cluster, phase, task, start_block), 120, 0.01)
    time.sleep(rng.uniform(0.0, 0.3))
    final_before = cluster.record_final()
    old_pid = cluster.current[victim].popen.pid if victim in cluster.current else None
    t_kill = time.monotonic()
    cluster.kill(victim)
    time.sleep(rng.uniform(0.2, 1.0))
    if old_pid is not None:
        # What the dead process left running (Ray's helpers, for the aggregator).
        result.leftover_processes = len(group_members(old_pid))
    t_restart = time.monotonic()
    proc = cluster.restart(victim)
    times: dict[str, float] = {}

    def recovered() -> bool:
        now = time.monotonic()
        if "ready" not in times and cluster.ready(victim, proc, final_before):
            times["ready"] = now
        if "done" not in times and cluster.finished(task):
            times["done"] = now
        return len(times) == 2

    cluster.wait_for(f"{victim} back and task {task} done", recovered, 180, 0.05)
    result.restart_to_ready_s = times["ready"] - t_restart
    result.kill_to_done_s = times["done"] - t_kill
    result.task_seconds = time.monotonic() - t0
    if old_pid is not None and group_members(old_pid):
        kill_group(old_pid)
    problems = cluster.check_task(task, start_block - 2)
    if problems:
        result.outcome = "FAIL"
        result.detail = "; ".join(problems)
    return result


def run_campaign(cluster: Cluster, runs: int, seed: int, *, plan: list[tuple[str, str]] | None = None,
                 on_result: Callable[[RunResult], None] | None = None,
                 components: tuple[str, ...] = COMPONENTS) -> list[RunResult]:
    """``runs`` seeded runs killing one of ``components`` (or the given ``plan`` of
    (component, phase) pairs)."""
    unknown = set(components) - set(COMPONENTS)
    if unknown or not components:
        raise ValueError(f"components must be some of {', '.join(COMPONENTS)}, got {', '.join(components) or 'none'}")
    rng = random.Random(seed)
    results = []
    for i in range(runs):
        component, phase = plan[i] if plan else (rng.choice(components), rng.choice(PHASES))
        try:
            res = run_once(cluster, i, rng, component, phase)
        except ClusterError as exc:
            text = str(exc)
            res = RunResult(i, component, component, phase, -1, outcome="FAIL",
                            detail=text.splitlines()[0] + "\n" + text[-6000:])
        results.append(res)
        if on_result is not None:
            on_result(res)
        if res.outcome != "ok":
            break
    return results


def table(results: list[RunResult]) -> str:
    """Runs × components × phases as a Markdown table, with the recovery times."""
    lines = ["| run | component | killed | phase | outcome | restart→ready s | kill→task done s |",
             "| ---: | --- | --- | --- | --- | ---: | ---: |"]
    for r in results:
        lines.append(f"| {r.run} | {r.component} | {r.victim} | {r.phase} | {r.outcome} | "
                     f"{r.restart_to_ready_s:.1f} | {r.kill_to_done_s:.1f} |")
    return "\n".join(lines)


def summary(results: list[RunResult]) -> str:
    """Per component: runs, failures, median and worst recovery times."""
    import statistics

    lines = ["| component | runs | ok | restart→ready s (median / max) | kill→done s (median / max) |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for comp in COMPONENTS:
        rs = [r for r in results if r.component == comp]
        if not rs:
            continue
        ready = [r.restart_to_ready_s for r in rs]
        done = [r.kill_to_done_s for r in rs]
        lines.append(f"| {comp} | {len(rs)} | {sum(r.outcome == 'ok' for r in rs)} | "
                     f"{statistics.median(ready):.1f} / {max(ready):.1f} | "
                     f"{statistics.median(done):.1f} / {max(done):.1f} |")
    return "\n".join(lines)


def remove_store(cluster: Cluster) -> None:
    shutil.rmtree(cluster.root / "ipfs")
