"""Fetch and verify every revealed adapter in parallel Ray tasks.

One Ray task per update fetches the adapter by CID (the fetch verifies the bytes against the CID),
loads it and runs :func:`prismesh.aggregator.verify.verify_adapter` on it as an update of the
round's global adapter (its change, not its absolute size, is what the checks bound). Any failure — a fetch error, a hash
mismatch, a malformed file, a wrong shape, NaNs, a crashed worker, a timeout — becomes a
``Rejected`` with its reason, so one bad or hostile submission never stops the round. Results
come back in the input order, carrying the adapter's tensors (a worker's disk may be another
host's), ready for a strategy.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
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


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Start (or join) Ray once per process: a quiet local instance by default, no dashboard.

    ``address`` joins an existing cluster (``"auto"``, ``"ray://host:10001"``, ...); ``num_cpus``
    caps a local instance. A no-op when Ray is already initialised in this process.
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    if ray.is_initialized():
        return
    quiet = os.environ.get("PRISMESH_QUIET", "") not in ("", "0")
    kwargs: dict[str, Any] = {
        "include_dashboard": False,
        "logging_level": logging.ERROR if quiet else logging.WARNING,
        "log_to_driver": False,
    }
    if address is None:
        kwargs["num_cpus"] = num_cpus
    elif num_cpus is not None:
        raise ValueError("num_cpus applies to a local Ray only, not when joining a cluster")
    ray.init(address=address, **kwargs)


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


_REMOTE: Any = None


def _remote_task() -> Any:
    global _REMOTE
    if _REMOTE is None:
        import ray

        _REMOTE = ray.remote(max_retries=0)(fetch_and_verify_one)
    return _REMOTE


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
) -> list[Verified | Rejected]:
    """Fetch and verify ``items`` (one Ray task each); results are in the input order.

    ``fetch(cid, dest) -> dir`` must be picklable (a top-level function or e.g. :class:`StoreFetch`)
    and should raise when the bytes do not match the CID. Each update lands in its own folder under
    ``workdir``. A client listed more than once has every entry rejected (which one to keep would
    depend on the order). With
    ``parallel=False`` the same work runs in this process, one update after another (no Ray).
    ``timeout_s`` bounds the whole batch: updates not done by then are cancelled and rejected.
    ``global_adapter`` is the adapter the round started from: every update is checked as its
    change from it. Starts a local Ray if none is initialised.
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

    if not parallel:
        for i, item, dest in todo:
            results[i] = fetch_and_verify_one(
                item, fetch, expected, task_cfg, norm_bound, dest, global_adapter
            )
    elif todo:
        import ray
        from ray.exceptions import GetTimeoutError, RayError

        ensure_ray()
        task = _remote_task().options(num_cpus=num_cpus_per_task)
        exp_ref, cfg_ref, glob_ref = ray.put(expected), ray.put(task_cfg), ray.put(global_adapter)
        refs = [
            (i, item, task.remote(item, fetch, exp_ref, cfg_ref, norm_bound, dest, glob_ref))
            for i, item, dest in todo
        ]
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        for i, item, ref in refs:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                results[i] = ray.get(ref, timeout=left)
            except GetTimeoutError:
                ray.cancel(ref, force=True)
                results[i] = Rejected(item.client, item.cid, f"timed out after {timeout_s:g} s")
            except RayError as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                results[i] = Rejected(
                    item.client, item.cid, _clip(f"worker failed ({type(exc).__name__}): {first}")
                )
    out = [r for r in results if r is not None]
    for r in out:
        if isinstance(r, Rejected):
            log.warning("rejected update from %s (cid %s): %s", r.client, r.cid, r.reason)
    return out
