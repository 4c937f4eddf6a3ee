"""``prismesh dashboard``: the consortium's read-only web view of a deployment."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from prismesh.cli.errors import CommandError, UsageError
from prismesh.cli.output import add_daemon_output_arguments


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "dashboard",
        help="serve the consortium dashboard (read-only web pages over final chain events and the store)",
        description="Serve a read-only web dashboard of a deployment: tasks and their rounds, each "
        "hospital's commits, reveals, inclusion and rewards, the learning curves reported on chain, "
        "finality and its certificates, and audits run on demand. It needs no key and sends no "
        "transaction; it listens on loopback unless --host says otherwise.",
    )
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--manifest", type=Path, help="deployment manifest (JSON)")
    where.add_argument("--out", type=Path, help="a finished `prismesh demo --out DIR`: re-open its saved chain and store")
    p.add_argument("--rpc-url", default=None, help="override the manifest's RPC URL")
    p.add_argument("--store", default=None, help="storage spec (embedded[:DIR] or kubo[:ADDR]; default embedded)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, loopback only)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    p.add_argument("--poll", type=float, default=0.5, help="seconds between reads of new final events (default 0.5)")
    p.add_argument("--no-finality", action="store_true",
                   help="treat the latest block as final (a deployment without a finality gadget)")
    p.add_argument("--descriptors", type=Path, default=None,
                   help="JSON list of institution descriptors; a hospital whose on-chain descriptor hash "
                   "matches one is shown by its name (with --out: the demo's own, when it kept them)")
    add_daemon_output_arguments(p, metrics=False)
    p.set_defaults(func=_dashboard)


def load_descriptors(path: Path | None) -> list[dict[str, Any]]:
    if path is None:
        return []
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"--descriptors {path}: {exc}") from None
    if not isinstance(data, list) or not all(isinstance(d, dict) and d for d in data):
        raise UsageError(f"--descriptors {path}: expected a JSON list of non-empty objects")
    return data


def _dashboard(args: argparse.Namespace) -> int:
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be 0..65535, got {args.port}")
    if args.poll <= 0:
        raise UsageError(f"--poll must be positive, got {args.poll}")
    descriptors = load_descriptors(args.descriptors)
    from prismesh.cli.output import configure_output

    configure_output(False, level=logging.INFO, log_format=args.log_format)
    from prismesh.chain.evm.manifest import connect
    from prismesh.chain.storage import open_store
    from prismesh.cli.audit import chain_from_args
    from prismesh.dashboard.server import BackgroundServer, is_loopback
    from prismesh.dashboard.service import open_dashboard

    with chain_from_args(args) as (manifest, w3, demo_store):
        store = open_store(args.store or demo_store or "embedded")
        saved = args.out / "run" / "descriptors.json" if args.out is not None else None
        if not descriptors and saved is not None and saved.is_file():
            descriptors = load_descriptors(saved)
        dash = open_dashboard(
            w3, manifest, store,
            w3_for_audit=lambda: connect(manifest),
            finality=False if args.no_finality else None,
            poll_interval=args.poll,
            descriptors=descriptors,
        )
        server = BackgroundServer(dash, args.host, args.port)
        try:
            url = server.start()
        except RuntimeError as exc:
            raise CommandError(str(exc)) from None
        try:
            print(f"dashboard of chain {manifest.chain_id} on {url}/ (read-only; Ctrl-C stops it)", flush=True)
            if not is_loopback(args.host):
                print(f"note: listening on {args.host}: anyone who can reach this host can read the dashboard",
                      file=sys.stderr)
            wait_for_interrupt()
        finally:
            server.stop()
    return 0


def wait_for_interrupt() -> None:
    """Until Ctrl-C or SIGTERM."""
    import signal
    import threading

    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)


class _DemoDashboard:
    """The dashboard beside a running demo: started once its federation exists, kept open after
    the report until Ctrl-C, stopped before the demo's chain stops."""

    def __init__(self, fed: Any, port: int) -> None:
        from prismesh.chain.evm.devnet import http_web3
        from prismesh.chain.storage import open_store
        from prismesh.dashboard.server import BackgroundServer
        from prismesh.dashboard.service import open_dashboard

        rpc = fed.devnet.rpc_url
        descriptors = fed.descriptors()
        dash = open_dashboard(http_web3(rpc), fed.manifest, open_store(fed.store_spec),
                              w3_for_audit=lambda: http_web3(rpc), finality=fed.finality,
                              poll_interval=0.25, descriptors=descriptors)
        self.server = BackgroundServer(dash, "127.0.0.1", port)
        try:
            url = self.server.start()
        except RuntimeError as exc:
            raise CommandError(f"{exc}; pick another with --dashboard-port") from None
        print(f"      dashboard: {url}/ (live while the demo runs)", flush=True)

    def finished(self) -> None:
        print(f"      the dashboard stays open on the finished run at {self.server.url}/ ; Ctrl-C stops it",
              flush=True)
        wait_for_interrupt()

    def close(self) -> None:
        self.server.stop()


def demo_observer(port: int) -> Any:
    """What ``prismesh demo --dashboard`` hands the demo: opens the dashboard on its federation."""
    if not 0 <= port <= 65535:
        raise UsageError(f"--dashboard-port must be 0..65535, got {port}")
    return lambda fed: _DemoDashboard(fed, port)
