"""Parallel fetch-and-verify on a real local Ray, with honest and bad adapters in one batch."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from prismesh.aggregator.adapters import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    Adapter,
    load_adapter,
    save_adapter,
)
from prismesh.aggregator.parallel import (
    IDLE_AGENT,
    Rejected,
    StoreFetch,
    UpdateRef,
    Verified,
    ensure_ray,
    fetch_and_verify,
)
from prismesh.aggregator.strategies import get_strategy
from prismesh.aggregator.verify import expected_lora_shapes
from tests.test_strategies import LORA, TINY_QWEN3, train_client_adapters

NORM_BOUND = 50.0


def dir_digest(path: Path) -> str:
    """A stand-in content address: sha256 over the two files of an adapter directory."""
    h = hashlib.sha256()
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        h.update((path / name).read_bytes())
    return "sha256-" + h.hexdigest()


class DirFetch:
    """Picklable fetch from a table of local directories that re-hashes what it copied, as a
    content-addressed store does; a few CIDs crash the worker or hang, to exercise the batch."""

    def __init__(self, table: dict[str, str], crash: str = "", hang: str = "") -> None:
        self.table, self.crash, self.hang = table, crash, hang

    def __call__(self, cid: str, dest: Path) -> Path:
        if cid == self.crash:
            os._exit(3)
        if cid == self.hang:
            time.sleep(60)
        shutil.copytree(self.table[cid], dest)
        if dir_digest(dest) != cid:
            raise ValueError(f"bytes fetched for {cid} do not match it")
        return dest


@pytest.fixture(scope="session")
def ray_session():
    import ray

    ensure_ray(num_cpus=2)
    ensure_ray(num_cpus=2)  # idempotent
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    """Three honest PEFT adapters and several bad ones, each published under its digest."""
    root = tmp_path_factory.mktemp("published")
    honest = train_client_adapters(root / "honest", n_clients=3, steps=1)
    table: dict[str, str] = {}

    def publish(path: Path) -> str:
        cid = dir_digest(path)
        table[cid] = str(path)
        return cid

    cids = [publish(d) for d in honest]
    base = load_adapter(honest[0])
    nan_key = sorted(base.tensors)[3]
    poisoned = dict(base.tensors)
    poisoned[nan_key] = base.tensors[nan_key].copy()
    poisoned[nan_key][0, 0] = np.nan
    nan_cid = publish(save_adapter(Adapter(base.config, poisoned), root / "nan"))

    wide_cfg = dict(base.config, r=8, lora_alpha=16)
    wide = {
        k: np.zeros((8, v.shape[1]) if "lora_A" in k else (v.shape[0], 8), np.float32)
        for k, v in base.tensors.items()
    }
    shape_cid = publish(save_adapter(Adapter(wide_cfg, wide), root / "wide"))

    big = {k: v * (1e4 if "lora_B" in k else 1.0) for k, v in base.tensors.items()}
    big_cid = publish(save_adapter(Adapter(base.config, big), root / "big"))

    tampered = save_adapter(load_adapter(honest[1]), root / "tampered")
    tamper_cid = publish(tampered)
    blob = bytearray((tampered / WEIGHTS_NAME).read_bytes())
    blob[-1] ^= 0x01  # a flipped bit in the last tensor after the CID was computed
    (tampered / WEIGHTS_NAME).write_bytes(bytes(blob))

    items = [
        UpdateRef("0xa0", cids[0], 120),
        UpdateRef("0xtwice", cids[1], 10),
        UpdateRef("0xbad-nan", nan_cid, 50),
        UpdateRef("0xbad-shape", shape_cid, 50),
        UpdateRef("0xbad-tamper", tamper_cid, 50),
        UpdateRef("0xa1", cids[1], 45),
        UpdateRef("0xbad-missing", "sha256-" + "0" * 64, 50),
        UpdateRef("0xbad-norm", big_cid, 50),
        UpdateRef("0xtwice", cids[2], 999),  # a client listed twice
        UpdateRef("0xa2", cids[2], 300),
    ]
    expected_reason = {
        "0xbad-nan": f"non-finite values: {nan_key} has 1 NaN and 0 infinite values",
        "0xbad-shape": "config r=8 does not match the task's r=4",
        "0xbad-tamper": f"fetch failed (ValueError): bytes fetched for {tamper_cid} do not match",
        "0xbad-missing": "fetch failed (KeyError)",
        "0xbad-norm": "update norm bound exceeded: base_model.model.model.layers.",
    }
    return items, table, expected_reason


def check_outcome(results, items, expected_reason):
    assert [(r.client, r.cid) for r in results] == [(i.client, i.cid) for i in items]
    kinds = [type(r).__name__ for r in results]
    assert kinds == [
        "Verified",
        "Rejected",
        "Rejected",
        "Rejected",
        "Rejected",
        "Verified",
        "Rejected",
        "Rejected",
        "Rejected",
        "Verified",
    ]
    assert results[1].reason == results[8].reason == "client submitted 2 updates in one round"
    for r in results:
        if isinstance(r, Rejected) and r.client in expected_reason:
            assert r.reason.startswith(expected_reason[r.client]), (r.client, r.reason)
    shape_reason = next(r.reason for r in results if r.client == "0xbad-shape")
    assert (
        "wrong shape: base_model.model.model.layers.0.mlp.down_proj.lora_A.weight" in shape_reason
    )
    verified = [r for r in results if isinstance(r, Verified)]
    assert [v.num_samples for v in verified] == [120, 45, 300]
    return verified


def test_batch_in_ray_rejects_each_bad_update_with_its_reason(ray_session, batch, tmp_path):
    items, table, expected_reason = batch
    shapes = expected_lora_shapes(TINY_QWEN3, LORA)
    crash_item = UpdateRef("0xbad-crash", "sha256-crash", 10)
    fetch = DirFetch(table, crash="sha256-crash")
    results = fetch_and_verify(
        [*items, crash_item], fetch, shapes, LORA, NORM_BOUND, tmp_path / "work"
    )
    crash = results.pop()
    assert isinstance(crash, Rejected) and crash.reason.startswith("worker failed ("), crash
    verified = check_outcome(results, items, expected_reason)
    ref = load_adapter(table[items[0].cid])
    for key, value in ref.tensors.items():
        np.testing.assert_array_equal(verified[0].adapter.tensors[key], value)

    # the same batch, sequentially in this process, gives the same verdicts
    sequential = fetch_and_verify(
        items, fetch, shapes, LORA, NORM_BOUND, tmp_path / "seq", parallel=False
    )
    assert [getattr(r, "reason", None) for r in sequential] == [
        getattr(r, "reason", None) for r in results
    ]

    # shuffled submission order through Ray: byte-identical aggregates
    shuffled = list(items)
    random.Random(7).shuffle(shuffled)
    again = fetch_and_verify(shuffled, fetch, shapes, LORA, NORM_BOUND, tmp_path / "work2")
    for name in ("fedavg", "fedavg-exact"):
        blobs = []
        for k, res in enumerate((results, again)):
            ups = [r.to_update() for r in res if isinstance(r, Verified)]
            agg = get_strategy(name).aggregate(ups, None)
            assert agg.metrics["clients"] == ["0xa0", "0xa1", "0xa2"]
            out = save_adapter(agg.adapter, tmp_path / f"{name}-{k}")
            blobs.append((out / WEIGHTS_NAME).read_bytes())
        assert blobs[0] == blobs[1]

    # the round's global adapter reaches every worker: checked against it, a0 changed nothing
    glob = load_adapter(table[items[0].cid])
    for parallel in (True, False):
        res = fetch_and_verify(items[:1] + items[5:6], fetch, shapes, LORA, NORM_BOUND,
                               tmp_path / f"glob-{parallel}", parallel=parallel, global_adapter=glob)
        assert isinstance(res[0], Rejected) and res[0].reason.startswith("empty update"), res[0]
        assert isinstance(res[1], Verified)


def test_batch_timeout_rejects_the_straggler(ray_session, batch, tmp_path):
    items, table, _ = batch
    shapes = expected_lora_shapes(TINY_QWEN3, LORA)
    slow = UpdateRef("0xslow", "sha256-slow", 10)
    start = time.monotonic()
    results = fetch_and_verify(
        [items[0], slow],
        DirFetch(table, hang="sha256-slow"),
        shapes,
        LORA,
        NORM_BOUND,
        tmp_path,
        timeout_s=8.0,
    )
    assert time.monotonic() - start < 30
    assert isinstance(results[0], Verified)
    assert results[1] == Rejected("0xslow", "sha256-slow", "timed out after 8 s")


def test_embedded_store_fetch_rejects_a_tampered_block(ray_session, tmp_path):
    """The real storage path: adapters added to an embedded blockstore and fetched in Ray tasks
    through ``StoreFetch``; a flipped byte in a stored block surfaces as ``CIDMismatch``."""
    from prismesh.chain.storage import add_adapter, cid_of_path, open_store

    honest = train_client_adapters(tmp_path / "src", n_clients=3, steps=1)
    spec = f"embedded:{tmp_path / 'ipfs'}"
    store = open_store(spec)
    cids = [add_adapter(store, d) for d in honest]
    weights_block = store.block_path(cid_of_path(honest[2] / WEIGHTS_NAME))
    blob = bytearray(weights_block.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    weights_block.write_bytes(bytes(blob))

    never_added = save_adapter(Adapter({"r": 1}, {"x": np.zeros(3, np.float32)}), tmp_path / "n")
    absent = cid_of_path(never_added)
    sha = [hashlib.sha256((d / WEIGHTS_NAME).read_bytes()).hexdigest() for d in honest]
    items = [
        UpdateRef("0xc0", cids[0], 10, sha[0]),
        UpdateRef("0xc1", cids[1], 20, sha[0]),  # revealed hash of someone else's weights
        UpdateRef("0xc2", cids[2], 30, sha[2]),
        UpdateRef("0xc3", absent, 5),
    ]
    shapes = expected_lora_shapes(TINY_QWEN3, LORA)
    results = fetch_and_verify(items, StoreFetch(spec), shapes, LORA, NORM_BOUND, tmp_path / "w")
    assert isinstance(results[0], Verified) and results[0].weights_sha256 == sha[0]
    assert results[1] == Rejected(
        "0xc1", cids[1], f"adapter weights sha256 {sha[1]} differs from the revealed {sha[0]}"
    )
    assert isinstance(results[2], Rejected)
    assert results[2].reason.startswith("fetch failed (CIDMismatch)"), results[2].reason
    assert isinstance(results[3], Rejected)
    assert results[3].reason.startswith("fetch failed (BlockNotFound)"), results[3].reason
    assert absent in results[3].reason


def test_plan_verification_picks_in_process_or_ray_batches():
    from prismesh.aggregator.parallel import MIN_TASK_BYTES, adapter_bytes, plan_verification

    small = adapter_bytes(expected_lora_shapes(TINY_QWEN3, LORA))
    assert 0 < small < MIN_TASK_BYTES
    # parallel off: everything here, one after another
    plan = plan_verification(5, small, parallel=False, workers=8)
    assert plan.mode == "in-process" and plan.batches == ((0, 1, 2, 3, 4),)
    assert plan_verification(0, small, parallel=True, workers=2).batches == ()
    # small updates: one Ray task for the whole round, however many workers there are
    plan = plan_verification(3, small, parallel=True, workers=2)
    assert plan.mode == "ray" and plan.batches == ((0, 1, 2),)
    # large updates: one task per worker, every update exactly once, in order
    plan = plan_verification(7, MIN_TASK_BYTES, parallel=True, workers=3)
    assert len(plan.batches) == 3
    assert [i for b in plan.batches for i in b] == list(range(7))
    # never more tasks than updates, never fewer than one
    assert len(plan_verification(2, 10 * MIN_TASK_BYTES, parallel=True, workers=16).batches) == 2
    assert len(plan_verification(4, 1, parallel=True, workers=0).batches) == 1
    with pytest.raises(ValueError, match="non-negative"):
        plan_verification(-1, small, parallel=True, workers=2)


def test_large_updates_split_over_ray_workers(ray_session, batch, tmp_path):
    """Forcing a batch per worker (tiny ``min_task_bytes``) gives the verdicts of one batch."""
    items, table, expected_reason = batch
    shapes = expected_lora_shapes(TINY_QWEN3, LORA)
    results = fetch_and_verify(items, DirFetch(table), shapes, LORA, NORM_BOUND, tmp_path / "w",
                               min_task_bytes=1)
    check_outcome(results, items, expected_reason)


LIST_RAY_TREE = (
    "import os, sys, time\n"
    "from prismesh.aggregator.parallel import ensure_ray, start_ray_in_background, stop_ray\n"
    "assert start_ray_in_background(num_cpus=1)\n"
    "assert not ensure_ray(num_cpus=1)\n"
    "import ray\n"
    "assert ray.get(ray.remote(lambda: 7).remote()) == 7\n"
    "def tree():\n"
    "    kids, out = {}, []\n"
    "    for d in os.listdir('/proc'):\n"
    "        if d.isdigit():\n"
    "            try:\n"
    "                stat = open(f'/proc/{d}/stat').read().rsplit(')', 1)[1].split()\n"
    "                cmd = open(f'/proc/{d}/cmdline', 'rb').read().replace(b'\\0', b' ').decode()\n"
    "            except OSError:\n"
    "                continue\n"
    "            kids.setdefault(int(stat[1]), []).append((int(d), cmd))\n"
    "    todo = [os.getpid()]\n"
    "    while todo:\n"
    "        for pid, cmd in kids.get(todo.pop(), []):\n"
    "            out.append(cmd); todo.append(pid)\n"
    "    return out\n"
    "print('RUNNING', tree())\n"
    "print('AGENT_DEPS', 'ray.dashboard.optional_deps' in sys.modules)\n"
    "stop_ray(); time.sleep(1.5)\n"
    "print('AFTER', tree())\n"
)


def ray_tree(**env: str) -> tuple[list[str], list[str], bool]:
    """Start a local Ray in a fresh process, run a task, stop it: the process tree's command
    lines while it ran and after it stopped, and whether the driver imported the agents'
    dependencies."""
    import ast
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", LIST_RAY_TREE], capture_output=True, text=True, timeout=120,
                         env={**os.environ, **env})
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    running = next(line for line in lines if line.startswith("RUNNING ")).removeprefix("RUNNING ")
    after = next(line for line in lines if line.startswith("AFTER ")).removeprefix("AFTER ")
    deps = next(line for line in lines if line.startswith("AGENT_DEPS ")).removeprefix("AGENT_DEPS ")
    return ast.literal_eval(running), ast.literal_eval(after), deps == "True"


def test_lean_local_ray_runs_only_what_it_needs():
    """A local instance started here has no dashboard, monitor or log monitor process, idle
    agents in place of Ray's dashboard and runtime-env agents, and none of its processes
    outlive ``stop_ray``. The driver does not import what only Ray's own agents use (aiohttp,
    OpenTelemetry, Prometheus: 12 MiB)."""
    running, after, agent_deps = ray_tree()
    assert not agent_deps
    programs = [cmd.split(" ", 3)[:3] for cmd in running]
    assert any(p[0].endswith("/raylet") for p in programs) and any(p[0].endswith("/gcs_server") for p in programs)
    scripts = [p[-1] for p in programs]
    for unwanted in ("dashboard/dashboard.py", "autoscaler/_private/monitor.py", "log_monitor.py",
                     "dashboard/agent.py", "runtime_env/agent/main.py"):
        assert not any(s.endswith(unwanted) for s in scripts), unwanted
    idle = [cmd for cmd in running if cmd.split(" ", 4)[3:4] == [str(IDLE_AGENT)]]
    assert len(idle) == 2 and {c.split("--role=")[1].split()[0] for c in idle} == {"dashboard", "runtime-env"}
    assert after == [], after


def test_ray_own_agents_on_request():
    """``PRISMESH_RAY_AGENTS=ray`` keeps Ray's own agents (metrics, runtime environments)."""
    running, after, agent_deps = ray_tree(PRISMESH_RAY_AGENTS="ray")
    assert agent_deps
    text = "\n".join(running)
    assert "dashboard/agent.py" in text and "runtime_env/agent/main.py" in text
    assert not any(str(IDLE_AGENT) in cmd.split(" ", 4)[:4] for cmd in running) and after == []


def test_agent_dependency_check_is_answered_only_while_the_head_starts(monkeypatch):
    """While a lean head node starts, Ray's check for its agents' dependencies is answered
    without importing them (the idle agents need none); afterwards Ray's own check is back."""
    import ray._private.utils as ray_utils

    from prismesh.aggregator.parallel import _lean_head_node

    own = ray_utils.get_dashboard_dependency_error
    monkeypatch.delenv("PRISMESH_RAY_AGENTS", raising=False)
    with _lean_head_node():
        assert isinstance(ray_utils.get_dashboard_dependency_error(), ImportError)
    assert ray_utils.get_dashboard_dependency_error is own
    monkeypatch.setenv("PRISMESH_RAY_AGENTS", "ray")
    with _lean_head_node():
        assert ray_utils.get_dashboard_dependency_error is own


def test_unknown_ray_agents_setting_is_refused(monkeypatch):
    """A misspelt ``PRISMESH_RAY_AGENTS`` is named before any Ray process starts."""
    from prismesh.aggregator.parallel import _lean_head_node

    monkeypatch.setenv("PRISMESH_RAY_AGENTS", "Ray")
    with pytest.raises(ValueError, match="PRISMESH_RAY_AGENTS must be 'idle'.*got 'Ray'"):
        with _lean_head_node():
            pass


def test_idle_agent_publishes_unused_ports_and_leaves_with_its_raylet(tmp_path):
    """The stand-in writes ``-1`` to each port file its raylet waits for, under Ray's file
    names, and exits once its parent is gone (here a process killed with SIGKILL)."""
    import signal
    import subprocess
    import sys

    from prismesh.aggregator.idle_agent import PORTS

    node = "ab" * 28
    agent = [sys.executable, "-S", "-I", str(IDLE_AGENT), f"--session-dir={tmp_path}", f"--node-id={node}"]
    raylet = subprocess.Popen(  # stands for the raylet: starts both agents, says their pids, waits
        [sys.executable, "-c", "import subprocess, sys, time\n"
         f"kids = [subprocess.Popen({agent!r} + [r]) for r in ('--role=dashboard', '--role=runtime-env')]\n"
         "print(*[k.pid for k in kids], flush=True)\ntime.sleep(600)\n"],
        stdout=subprocess.PIPE, text=True)
    pids = [int(x) for x in raylet.stdout.readline().split()]
    names = [n for role in PORTS.values() for n in role]
    deadline = time.time() + 20
    while time.time() < deadline and not all((tmp_path / f"{n}_{node}").exists() for n in names):
        time.sleep(0.05)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{n}_{node}" for n in names)
    assert {(tmp_path / f"{n}_{node}").read_text() for n in names} == {"-1"}

    def alive() -> list[int]:
        def running(pid: int) -> bool:
            try:
                return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
            except OSError:
                return False
        return [pid for pid in pids if running(pid)]

    assert alive() == pids and len(pids) == 2
    raylet.send_signal(signal.SIGKILL)
    raylet.wait()
    deadline = time.time() + 10
    while alive() and time.time() < deadline:
        time.sleep(0.1)
    assert alive() == []


def test_idle_agent_refuses_incomplete_arguments(tmp_path):
    """Without a role, session folder or node id it names what is missing and writes nothing."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-S", "-I", str(IDLE_AGENT), "--role=dashboard", f"--session-dir={tmp_path}"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "node-id" in out.stderr
    out = subprocess.run([sys.executable, "-S", "-I", str(IDLE_AGENT), "--role=metrics", f"--session-dir={tmp_path}",
                          "--node-id=ab"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "role" in out.stderr
    assert list(tmp_path.iterdir()) == []


def test_idle_agent_commands_replace_only_the_two_agents():
    """The raylet's other flags stay as they are; each agent command becomes the idle agent with
    the node id and session folder Ray gave it; a command without them is refused."""
    import shlex

    from prismesh.aggregator.parallel import _idle_agent_commands

    raylet = ["/ray/raylet", "--node_id=n1", "--num_prestart_python_workers=1",
              "--dashboard_agent_command=/py /ray/dashboard/agent.py --node-id=n1 --grpc-port=0 "
              "--session-dir=/tmp/ray/s1 --head",
              "--runtime_env_agent_command=/py /ray/runtime_env/agent/main.py --node-id=n1 "
              "--runtime-env-agent-port=0 --session-dir=/tmp/ray/s1"]
    out = _idle_agent_commands(raylet)
    assert out[:3] == raylet[:3]
    for arg, role in ((out[3], "dashboard"), (out[4], "runtime-env")):
        flag, command = arg.split("=", 1)
        words = shlex.split(command)
        assert words[1:4] == ["-S", "-I", str(IDLE_AGENT)] and IDLE_AGENT.is_file()
        assert words[4:] == [f"--role={role}", "--node-id=n1", "--session-dir=/tmp/ray/s1"]
    with pytest.raises(RuntimeError, match="runtime-env agent command lacks"):
        _idle_agent_commands(["--runtime_env_agent_command=/py main.py --node-id=n1"])
