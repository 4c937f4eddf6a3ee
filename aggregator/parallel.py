"""Fetch and verify every revealed adapter in parallel Ray tasks.

Each Ray task fetches a batch of updates by CID (the fetch verifies the bytes against the CID),
loads each and runs :func:`prismesh.aggregator.verify.verify_adapter` on it as an update of the
round's global adapter (its change, not its absolute size, is what the checks bound). Ray's per-task cost is
paid per batch, not per update: :func:`plan_verification` gives a task only as many updates as
make its work worth that cost, and no more tasks than there are CPUs. A batch streams its results
back one update at a time, so a timeout keeps what finished and a crashed worker costs only the
update it was on (the rest of its batch is retried one task each). Any failure — a fetch error, a
hash mismatch, a malformed file, a wrong shape, NaNs, a crashed worker, a timeout — becomes a
``Rejected`` with its reason, so one bad or hostile submission never stops the round. Results
come back in the input order, carrying the adapter's tensors (a worker's disk may be another
host's), ready for a strategy.

A local Ray is started lean (:func:`ensure_ray`): GCS, raylet and the workers, with
:mod:`~prismesh.aggregator.idle_agent` in place of the two agents the raylet insists on, and
without the dashboard server, the autoscaler monitor or the log monitor, which a single-host
instance has no use for. :func:`start_ray_in_background` overlaps its start-up with
other work.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prismesh.aggregator.adapters import WEIGHTS_NAME, Adapter, load_adapter
from prismesh.aggregator.strategies import ClientUpdate
from prismesh.aggregator.verify import verify_adapter

log = logging.getLogger("prismesh.aggregator")

Fetch = Callable[[str, Path], Path]
MAX_REASON_CHARS = 2000


@dataclass(frozen=True)
class UpdateRef:
    """A revealed update as the chain records it: who, which CID, how many training samples and,
    optionally, the revealed sha256 (hex) of its ``adapter_model.safetensors``."""

    client: str
    cid: str
    num_samples: int
    sha256: str | None = None


@dataclass(frozen=True)
class Verified:
    """An update that passed every check; ``path`` is where it was fetched (on the worker's host)."""

    client: str
    cid: str
    num_samples: int
    adapter: Adapter
    path: Path
    seconds: float
    weights_sha256: str = ""

    def to_update(self) -> ClientUpdate:
        """The strategy's view of this update."""
        return ClientUpdate(self.client, self.num_samples, self.adapter)


@dataclass(frozen=True)
class Rejected:
    """An update excluded from the aggregate, with the reason(s) joined by ``"; "``."""

    client: str
    cid: str
    reason: str


class StoreFetch:
    """A picklable fetch over a storage spec (``"embedded:/path"``, ``"kubo:http://..."``).

    Ray ships the callable to workers, so it carries only the spec string; each worker process
    opens the store once and fetches through ``prismesh.chain.storage.fetch_adapter``, which verifies the
    bytes against the CID and raises naming the CID on mismatch.
    """

    _stores: dict[str, Any] = {}

    def __init__(self, spec: str) -> None:
        self.spec = spec

    def __call__(self, cid: str, dest: Path) -> Path:
        from prismesh.chain.storage import fetch_adapter, open_store

        store = StoreFetch._stores.get(self.spec)
        if store is None:
            store = StoreFetch._stores[self.spec] = open_store(self.spec)
        return Path(fetch_adapter(store, cid, dest))

    def __repr__(self) -> str:
        return f"StoreFetch({self.spec!r})"


class SealedStoreFetch(StoreFetch):
    """A fetch for a task whose updates are sealed: fetches the ciphertext by CID (verified by
    the store), opens it with this aggregator's X25519 key, checks that it was sealed for this
    chain, coordinator, task, round and client, and writes the adapter to ``dest``. A clear
    directory in a sealed task is refused. The key travels to Ray workers as raw bytes, so keep
    such a cluster on hosts trusted with it."""

    needs_client = True

    def __init__(self, spec: str, private_key_raw: bytes, chain_id: int, coordinator: str, task: int,
                 round_: int) -> None:
        super().__init__(spec)
        self.private_key_raw = bytes(private_key_raw)
        self.context = (int(chain_id), str(coordinator), int(task), int(round_))

    def __call__(self, cid: str, dest: Path, client: str = "") -> Path:  # type: ignore[override]
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

        from prismesh.chain.sealing import SealContext, SealError, fetch_sealed_adapter, stored_kind
        from prismesh.chain.storage import open_store

        store = StoreFetch._stores.get(self.spec)
        if store is None:
            store = StoreFetch._stores[self.spec] = open_store(self.spec)
        chain_id, coordinator, task, rnd = self.context
        if stored_kind(store, cid) != "sealed":
            raise SealError(f"task {task} round {rnd} update of client {client}: the task requires sealed updates, "
                            f"but {cid} is not a sealed object")
        expected = SealContext(chain_id, coordinator, task, rnd, client, "update")
        key = X25519PrivateKey.from_private_bytes(self.private_key_raw)
        return Path(fetch_sealed_adapter(store, cid, dest, key, expected))

    def __repr__(self) -> str:
        return f"SealedStoreFetch({self.spec!r}, task/round {self.context[2]}/{self.context[3]})"


_RAY_LOCK = threading.Lock()


class _Starter:
    """Ray started on a thread of its own. The thread stays alive until :func:`stop_ray`: Ray's
    processes are tied to the thread that spawned them (``PR_SET_PDEATHSIG``) and die with it."""

    def __init__(self, address: str | None, num_cpus: int | None) -> None:
        self.ready, self.release = threading.Event(), threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(address, num_cpus), name="ray-start", daemon=True)

    def _run(self, address: str | None, num_cpus: int | None) -> None:
        try:
            started = ensure_ray(address, num_cpus)
        except BaseException as exc:  # noqa: BLE001 - reported by the ensure_ray that waits
            self.error = exc
            started = False
        finally:
            self.ready.set()
        if started:
            _warm_up_worker()
        self.release.wait()

    def wait(self) -> None:
        self.ready.wait()
        if self.error is not None:
            raise RuntimeError(f"Ray failed to start: {self.error}") from self.error


_STARTER: _Starter | None = None


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Start (or join) Ray once per process; returns whether this call started a local instance.

    ``address`` joins an existing cluster (``"auto"``, ``"ray://host:10001"``, ...) unchanged;
    ``num_cpus`` caps a local instance. A local instance runs only the processes work needs
    (no dashboard server, autoscaler monitor or log monitor). Waits for a start begun by
    :func:`start_ray_in_background`; a no-op when Ray is already initialised in this process.
    """
    starter = _STARTER
    if starter is not None and starter.thread is not threading.current_thread():
        starter.wait()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    with _RAY_LOCK:
        if ray.is_initialized():
            return False
        quiet = os.environ.get("PRISMESH_QUIET", "") not in ("", "0")
        kwargs: dict[str, Any] = {
            "include_dashboard": False,
            "logging_level": logging.ERROR if quiet else logging.WARNING,
            "log_to_driver": False,
        }
        if address is not None:
            if num_cpus is not None:
                raise ValueError("num_cpus applies to a local Ray only, not when joining a cluster")
            ray.init(address=address, **kwargs)
            return False
        with _lean_head_node():
            ray.init(num_cpus=num_cpus, **kwargs)
        return True


def _warm_up() -> bool:
    from prismesh.chain.storage import fetch_adapter  # noqa: F401 - what StoreFetch imports

    return True


def _warm_up_worker() -> None:
    """Have a local worker import the verification code now, during start-up, not in round 1
    (the worker is idle until the first reveals anyway)."""
    try:
        import ray

        ray.get(ray.remote(max_retries=0)(_warm_up).remote(), timeout=120)
    except Exception as exc:  # noqa: BLE001 - a failed warm-up only costs the first round time
        log.debug("Ray worker warm-up failed: %s", exc)


def start_ray_in_background(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Begin :func:`ensure_ray` on a thread, so Ray's start-up overlaps other start-up work; the
    next ``ensure_ray`` (or ``fetch_and_verify``) waits for it. Returns False when Ray is
    already running or starting in this process."""
    global _STARTER
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    if ray.is_initialized() or _STARTER is not None:
        return False
    _STARTER = _Starter(address, num_cpus)
    _STARTER.thread.start()
    return True


def stop_ray() -> None:
    """Shut this process's Ray down (its local instance's processes with it)."""
    global _STARTER
    starter, _STARTER = _STARTER, None
    if starter is not None:
        starter.ready.wait()
    import ray

    if ray.is_initialized():
        ray.shutdown()
    if starter is not None:
        starter.release.set()
        starter.thread.join(timeout=10)


IDLE_AGENT = Path(__file__).with_name("idle_agent.py")
_AGENT_FLAGS = {"--dashboard_agent_command=": "dashboard", "--runtime_env_agent_command=": "runtime-env"}


def _idle_agent_commands(raylet_command: Sequence[str]) -> list[str]:
    """The raylet's command with its two agent commands replaced by :mod:`idle_agent` (same
    interpreter, no site packages), keeping the node id and session folder they were given."""
    out = []
    for arg in raylet_command:
        for flag, role in _AGENT_FLAGS.items():
            if arg.startswith(flag):
                keep = [a for a in shlex.split(arg[len(flag):]) if a.startswith(("--node-id=", "--session-dir="))]
                if len(keep) != 2:
                    raise RuntimeError(f"Ray's {role} agent command lacks --node-id or --session-dir: {arg[:300]}")
                arg = flag + subprocess.list2cmdline(
                    [sys.executable, "-S", "-I", str(IDLE_AGENT), f"--role={role}", *keep])
        out.append(arg)
    return out


@contextlib.contextmanager
def _lean_head_node() -> Iterator[None]:
    """While ``ray.init`` starts a local head node: no autoscaler monitor (nothing to scale),
    no log monitor (``log_to_driver`` is off, logs stay in the session folder), no dashboard
    server (``include_dashboard=False`` still starts one for usage statistics), and the raylet's
    dashboard and runtime-env agents replaced by :mod:`idle_agent` (no metrics export, no runtime
    environments: plain tasks on this host need neither; ``PRISMESH_RAY_AGENTS=ray`` keeps
    Ray's own). Ray's public ``init`` has no switch for these, so its node class and process
    launcher are swapped for the call."""
    import ray._private.node as ray_node
    import ray._private.services as ray_services
    import ray._private.utils as ray_utils

    agents = os.environ.get("PRISMESH_RAY_AGENTS", "idle")
    if agents not in ("idle", "ray"):
        raise ValueError(f"PRISMESH_RAY_AGENTS must be 'idle' (the default) or 'ray' (Ray's own agents), got {agents!r}")
    idle_agents = agents == "idle"
    base, launch, deps = ray_node.Node, ray_services.start_ray_process, ray_utils.get_dashboard_dependency_error

    class LeanNode(base):  # type: ignore[misc, valid-type]
        def __init__(self, ray_params: Any, *args: Any, head: bool = False, **kwargs: Any) -> None:
            if head:
                ray_params.no_monitor = True
                ray_params.include_log_monitor = False
            super().__init__(ray_params, *args, head=head, **kwargs)

        def start_api_server(self, *, include_dashboard: bool | None, raise_on_failure: bool) -> None:
            self._webui_url = None

    def lean_launch(command: list[str], process_type: str, *args: Any, **kwargs: Any) -> Any:
        if idle_agents and process_type == "raylet":
            command = _idle_agent_commands(command)
        return launch(command, process_type, *args, **kwargs)

    def no_agent_deps() -> ImportError:
        # Asked only to shape the agents' commands; answering it imports aiohttp, grpc,
        # OpenTelemetry and Prometheus into this process (12 MiB) for agents that do not run.
        return ImportError("Ray's own agents are replaced by idle agents")

    ray_node.Node, ray_services.start_ray_process = LeanNode, lean_launch
    if idle_agents:
        ray_utils.get_dashboard_dependency_error = no_agent_deps
    try:
        yield
    finally:
        ray_node.Node, ray_services.start_ray_process = base, launch
        ray_utils.get_dashboard_dependency_error = deps


# Below this many adapter bytes a Ray task costs more than the verification it parallelises.
MIN_TASK_BYTES = 32 * 2**20


@dataclass(frozen=True)
class VerificationPlan:
    """Where a round's updates are verified: ``"in-process"`` or ``"ray"``, and the batches
    (positions in the round's list of updates) that each become one Ray task."""

    mode: str
    batches: tuple[tuple[int, ...], ...]


def plan_verification(
    count: int, bytes_each: int, *, parallel: bool, workers: int, min_task_bytes: int = MIN_TASK_BYTES
) -> VerificationPlan:
    """In this process when ``parallel`` is off; otherwise in Ray, in as many batches as the
    work fills (at least ``min_task_bytes`` each) and the cluster has ``workers`` for, at least
    one: a round of small updates is one Ray task, a round of large ones one task per worker."""
    if count < 0 or bytes_each < 0:
        raise ValueError(f"count and bytes_each must be non-negative, got {count} and {bytes_each}")
    if not parallel or count == 0:
        return VerificationPlan("in-process", (tuple(range(count)),) if count else ())
    n = max(1, min(max(1, workers), count, (count * bytes_each) // max(1, min_task_bytes)))
    size = math.ceil(count / n)
    batches = tuple(tuple(range(i, min(count, i + size))) for i in range(0, count, size))
    return VerificationPlan("ray", batches)


def adapter_bytes(expected_shapes: Mapping[str, Sequence[int]], itemsize: int = 4) -> int:
    """The size of an adapter's tensors with these shapes (float32 unless told)."""
    return sum(math.prod(int(d) for d in shape) for shape in expected_shapes.values()) * itemsize


def _clip(text: str) -> str:
    return text if len(text) <= MAX_REASON_CHARS else text[: MAX_REASON_CHARS - 3] + "..."


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", text)[:64] or "_"


def fetch_and_verify_one(
    item: UpdateRef,
    fetch: Fetch,
    expected_shapes: Mapping[str, Sequence[int]],
    lora_config: Mapping[str, Any],
    norm_bound: float | None,
    dest: Path,
    global_adapter: Adapter | None = None,
) -> Verified | Rejected:
    """Fetch one update into ``dest`` and verify it against the round's ``global_adapter``;
    every failure becomes a ``Rejected``."""
    start = time.perf_counter()
    try:
        if dest.exists():
            shutil.rmtree(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            if getattr(fetch, "needs_client", False):
                path = Path(fetch(item.cid, dest, item.client))  # type: ignore[call-arg]
            else:
                path = Path(fetch(item.cid, dest))
        except Exception as exc:
            return Rejected(
                item.client, item.cid, _clip(f"fetch failed ({type(exc).__name__}): {exc}")
            )
        try:
            weights = (path / WEIGHTS_NAME).read_bytes()
        except OSError as exc:
            return Rejected(item.client, item.cid, _clip(f"unreadable adapter: {exc}"))
        digest = hashlib.sha256(weights).hexdigest()
        if item.sha256 is not None and digest != item.sha256.lower().removeprefix("0x"):
            reason = f"adapter weights sha256 {digest} differs from the revealed {item.sha256}"
            return Rejected(item.client, item.cid, reason)
        try:
            adapter = load_adapter(path)
        except Exception as exc:
            return Rejected(item.client, item.cid, _clip(f"unreadable adapter: {exc}"))
        reasons = verify_adapter(adapter, expected_shapes, lora_config, norm_bound, global_adapter)
        if reasons:
            return Rejected(item.client, item.cid, _clip("; ".join(reasons)))
        elapsed = time.perf_counter() - start
        return Verified(item.client, item.cid, item.num_samples, adapter, path, elapsed, digest)
    except Exception as exc:  # a bug or an environment failure must still not sink the batch
        return Rejected(
            item.client, item.cid, _clip(f"verification error ({type(exc).__name__}): {exc}")
        )


def verify_batch(
    batch: Sequence[tuple[int, UpdateRef, Path]],
    fetch: Fetch,
    expected_shapes: Mapping[str, Sequence[int]],
    lora_config: Mapping[str, Any],
    norm_bound: float | None,
    global_adapter: Adapter | None = None,
) -> Iterator[tuple[int, Verified | Rejected]]:
    """One Ray task's work: each update of the batch in turn, yielded as soon as it is done."""
    for index, item, dest in batch:
        yield index, fetch_and_verify_one(item, fetch, expected_shapes, lora_config, norm_bound, dest, global_adapter)


_REMOTE: dict[str, Any] = {}


def _remote(name: str) -> Any:
    if name not in _REMOTE:
        import ray

        if name == "batch":
            _REMOTE[name] = ray.remote(max_retries=0, num_returns="streaming")(verify_batch)
        else:
            _REMOTE[name] = ray.remote(max_retries=0)(fetch_and_verify_one)
    return _REMOTE[name]


def _worker_failure(item: UpdateRef, exc: Exception) -> Rejected:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return Rejected(item.client, item.cid, _clip(f"worker failed ({type(exc).__name__}): {first}"))


def _ray_cpus() -> int:
    import ray

    return int(ray.cluster_resources().get("CPU", 1))


def fetch_and_verify(
    items: Sequence[UpdateRef],
    fetch: Fetch,
    expected_shapes: Mapping[str, Sequence[int]],
    lora_config: Mapping[str, Any],
    norm_bound: float | None,
    workdir: str | os.PathLike[str],
    *,
    parallel: bool = True,
    timeout_s: float | None = None,
    num_cpus_per_task: float = 1.0,
    global_adapter: Adapter | None = None,
    min_task_bytes: int = MIN_TASK_BYTES,
) -> list[Verified | Rejected]:
    """Fetch and verify ``items`` in Ray tasks batched by :func:`plan_verification`; results are
    in the input order.

    ``fetch(cid, dest) -> dir`` must be picklable (a top-level function or e.g. :class:`StoreFetch`)
    and should raise when the bytes do not match the CID. Each update lands in its own folder under
    ``workdir``. A client listed more than once has every entry rejected (which one to keep would
    depend on the order). With ``parallel=False`` the same work runs in this process, one update
    after another (no Ray). ``timeout_s`` bounds the whole batch: updates not done by then are
    cancelled and rejected. ``global_adapter`` is the adapter the round started from: every
    update is checked as its change from it. Starts a local Ray if none is initialised.
    """
    root = Path(workdir)
    root.mkdir(parents=True, exist_ok=True)
    expected = {k: tuple(int(d) for d in v) for k, v in expected_shapes.items()}
    task_cfg = dict(lora_config)
    results: list[Verified | Rejected | None] = [None] * len(items)
    todo: list[tuple[int, UpdateRef, Path]] = []
    counts = Counter(item.client for item in items)
    for i, item in enumerate(items):
        if counts[item.client] > 1:
            reason = f"client submitted {counts[item.client]} updates in one round"
            results[i] = Rejected(item.client, item.cid, reason)
            continue
        todo.append((i, item, root / f"{i:04d}-{_safe(item.client)}"))

    if todo and parallel:
        ensure_ray()
    plan = plan_verification(
        len(todo), adapter_bytes(expected), parallel=parallel,
        workers=_ray_cpus() if parallel and todo else 1, min_task_bytes=min_task_bytes,
    )
    if plan.mode == "in-process":
        for i, item, dest in todo:
            results[i] = fetch_and_verify_one(
                item, fetch, expected, task_cfg, norm_bound, dest, global_adapter
            )
    elif todo:
        _verify_in_ray(plan, todo, fetch, expected, task_cfg, norm_bound, results, timeout_s, num_cpus_per_task,
                       global_adapter)
    out = [r for r in results if r is not None]
    for r in out:
        if isinstance(r, Rejected):
            log.warning("rejected update from %s (cid %s): %s", r.client, r.cid, r.reason)
    return out


def _verify_in_ray(
    plan: VerificationPlan,
    todo: list[tuple[int, UpdateRef, Path]],
    fetch: Fetch,
    expected: dict[str, tuple[int, ...]],
    task_cfg: dict[str, Any],
    norm_bound: float | None,
    results: list[Verified | Rejected | None],
    timeout_s: float | None,
    num_cpus_per_task: float,
    global_adapter: Adapter | None = None,
) -> None:
    import ray
    from ray.exceptions import GetTimeoutError, RayError

    deadline = None if timeout_s is None else time.monotonic() + timeout_s

    def left() -> float | None:
        return None if deadline is None else max(0.0, deadline - time.monotonic())

    def timed_out(item: UpdateRef) -> Rejected:
        return Rejected(item.client, item.cid, f"timed out after {timeout_s:g} s")

    exp_ref, cfg_ref, glob_ref = ray.put(expected), ray.put(task_cfg), ray.put(global_adapter)
    batch_task = _remote("batch").options(num_cpus=num_cpus_per_task)
    running = []
    for positions in plan.batches:
        batch = [todo[p] for p in positions]
        running.append((batch, batch_task.remote(batch, fetch, exp_ref, cfg_ref, norm_bound, glob_ref)))
    retry: list[tuple[int, UpdateRef, Path]] = []
    for batch, gen in running:
        pending = {i: (item, dest) for i, item, dest in batch}
        while pending:
            ready, _ = ray.wait([gen], timeout=left())
            if not ready:
                ray.cancel(gen, force=True)
                for i, (item, _dest) in pending.items():
                    results[i] = timed_out(item)
                pending = {}
                break
            try:
                i, res = ray.get(next(gen))
            except StopIteration:
                break
            except RayError:
                # The worker died on the next update of its batch: that update and the ones
                # after it each get a task of their own, so the crash costs its update only.
                retry.extend((i, item, dest) for i, (item, dest) in pending.items())
                pending = {}
                break
            results[i] = res
            pending.pop(i, None)
        for i, (item, _dest) in pending.items():
            results[i] = Rejected(item.client, item.cid, "verification returned no result")
    if not retry:
        return
    single = _remote("single").options(num_cpus=num_cpus_per_task)
    refs = [(i, item, single.remote(item, fetch, exp_ref, cfg_ref, norm_bound, dest, glob_ref)) for i, item, dest in retry]
    for i, item, ref in refs:
        try:
            results[i] = ray.get(ref, timeout=left())
        except GetTimeoutError:
            ray.cancel(ref, force=True)
            results[i] = timed_out(item)
        except RayError as exc:
            results[i] = _worker_failure(item, exc)
