"""Daemon start-up shared by the node and the aggregator: open what a daemon needs in the order
that fails fastest, waiting out what a wait can fix (the chain's RPC endpoint, a Kubo daemon)
and refusing at once what it cannot (a second daemon on the state directory, a wrong chain)."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

from prismesh.chain.localstate import (
    ChainMismatch,
    ConfigError,
    StateDirLock,
    retry_until,
)


def connect_chain(manifest: Any, rpc_url: str | None = None) -> Any:
    """A Web3 for the deployment, after checking the endpoint serves the manifest's chain.

    Raises :class:`ChainMismatch` (do not retry: the config points at another chain) when the
    chain id differs, and the network's own exception when nothing answers (retry)."""
    from prismesh.chain.evm.devnet import http_web3

    url = rpc_url or manifest.rpc_url
    if not url:
        raise ConfigError(f"the manifest of a {manifest.kind} chain has no RPC URL; set rpc_url")
    w3 = http_web3(url)
    chain_id = int(w3.eth.chain_id)
    if chain_id != manifest.chain_id:
        raise ChainMismatch(
            f"{url} serves chain id {chain_id} but the manifest is for chain id {manifest.chain_id}; "
            "point rpc_url (or the manifest) at the right chain"
        )
    return w3


class DaemonParts:
    """What a daemon opens at start-up: its lock, key, deployment, chain and store."""

    def __init__(self, lock: StateDirLock, account: Any, manifest: Any, w3: Any, store: Any) -> None:
        self.lock = lock
        self.account = account
        self.manifest = manifest
        self.w3 = w3
        self.store = store


def stop_on_signals() -> threading.Event:
    """An event SIGTERM and SIGINT set, so a daemon's loop ends and it shuts down cleanly (signals
    can only be caught on the main thread; elsewhere the event is returned unhooked)."""
    import signal

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            signal.signal(sig, lambda *_: stop.set())
        except ValueError:  # not the main thread
            pass
    return stop


def with_metrics(config: Any, port: int | None, host: str | None) -> Any:
    """``config`` with the command line's metrics port and host, where given, over the file's."""
    from dataclasses import replace

    given = {k: v for k, v in (("metrics_port", port), ("metrics_host", host)) if v is not None}
    return replace(config, **given) if given else config


def open_daemon(role: str, label: str, config: Any, *, stop: threading.Event, log: logging.Logger) -> DaemonParts:
    """The start-up every daemon shares, in the order that fails fastest.

    What a wait cannot fix (a second daemon on the state directory, an unreadable keystore or
    manifest, a manifest for another chain, a malformed store spec) raises at once; what it can
    (the chain's RPC endpoint or a Kubo daemon not answering yet) is retried with back-off, one
    log line per attempt, until it answers or ``stop`` is set (:class:`Stopped`)."""
    from dataclasses import replace

    from prismesh.chain.evm.manifest import load_manifest
    from prismesh.chain.identity import load_daemon_account
    from prismesh.chain.storage import open_store

    lock = StateDirLock(config.state_dir, role).acquire()
    try:
        account = load_daemon_account(config.keystore)
        manifest = load_manifest(config.manifest)
        if config.rpc_url:
            manifest = replace(manifest, rpc_url=config.rpc_url)
        first = max(0.5, float(getattr(config, "poll_interval", 1.0)))
        w3 = retry_until(f"{label}: connecting to the chain at {manifest.rpc_url}",
                         lambda: connect_chain(manifest), log=log, stop=stop, first=first,
                         fatal=(ConfigError,))
        try:
            store = open_store(config.store)
        except ValueError as exc:
            raise ConfigError(f"{label}: field 'store': {exc}") from None
        if hasattr(store, "version"):  # a Kubo daemon: wait until it answers
            retry_until(f"{label}: reaching the store {config.store}", store.version, log=log,
                        stop=stop, first=first)
    except BaseException:
        lock.release()
        raise
    return DaemonParts(lock, account, manifest, w3, store)


def held_spec_bytes(store: Any, cid: str, copies: Path, logger: logging.Logger, who: str) -> bytes:
    """A task spec's bytes from the store, or from this daemon's own copy under ``copies``
    (written on first read), which is then re-added to the store under the same CID."""
    from prismesh.chain.storage import cat_held

    data, repaired = cat_held(store, cid, Path(copies) / f"{cid}.json")
    if repaired:
        logger.warning("%s: the store had lost or damaged task spec %s; re-added it from this "
                       "daemon's copy", who, cid)
    return data
