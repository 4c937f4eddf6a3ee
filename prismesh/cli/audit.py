"""``prismesh audit``: re-verify a task from the chain and the store alone."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prismesh.cli.errors import CommandError, UsageError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "audit",
        help="re-verify a task from the chain and the store alone",
        description="Re-derive a task's history from the chain and the store: every adapter against "
        "its CID and revealed hash, every aggregate recomputed by the task's strategy, every finality "
        "certificate. Exit code 0 when every check holds, 1 otherwise.",
    )
    p.add_argument("--task", type=int, required=True, help="task id on the coordinator")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--manifest", type=Path, help="deployment manifest (JSON)")
    where.add_argument("--out", type=Path, help="a finished `prismesh demo --out DIR`: re-open its saved chain and store")
    p.add_argument("--rpc-url", default=None, help="override the manifest's RPC URL")
    p.add_argument("--store", default=None, help="storage spec (embedded[:DIR] or kubo[:ADDR]; default embedded)")
    p.add_argument("--no-finality", action="store_true", help="skip the certificate checks")
    p.add_argument("--key", default=None, metavar="KEY",
                   help="an auditor's X25519 key for tasks with sealed updates: a key file (PEM, password from "
                   "$PRISMESH_KEYSTORE_PASSWORD or a prompt) or dev:N; without it, checks that need plaintext are listed as not checked")
    p.set_defaults(func=_audit)


@contextlib.contextmanager
def chain_from_args(args: argparse.Namespace) -> Iterator[tuple[Any, Any, str | None]]:
    """``(manifest, w3, store spec or None)`` from ``--manifest [--rpc-url]`` or a demo's ``--out``."""
    if getattr(args, "out", None) is not None:
        if getattr(args, "rpc_url", None):
            raise UsageError("--rpc-url applies to --manifest, not to a demo's --out")
        from prismesh.runs.demo import reopen_chain

        with reopen_chain(args.out) as (manifest, w3, store):
            yield manifest, w3, store
        return
    from prismesh.chain.evm.manifest import connect_with

    manifest, w3 = connect_with(args.manifest, getattr(args, "rpc_url", None))
    yield manifest, w3, None


def _audit(args: argparse.Namespace) -> int:
    from prismesh.aggregator.audit import audit_task
    from prismesh.chain.storage import open_store

    key = _audit_key(args.key) if args.key else None
    with chain_from_args(args) as (manifest, w3, demo_store):
        store = open_store(args.store or demo_store or "embedded")
        report = audit_task(w3, manifest, store, args.task, check_finality=not args.no_finality, key=key)
    print(report.render())
    return 0 if report.ok else 1


def _audit_key(spec: str) -> Any:
    """An X25519 key from ``--key``: ``dev:N`` (derived from devnet account N) or a PEM file."""
    from prismesh.chain.identity import load_account, read_password
    from prismesh.chain.sealing import box_key_from_signing_key, load_box_key

    if spec.startswith("dev:"):
        return box_key_from_signing_key(bytes(load_account(spec).key))
    path = Path(spec)
    if not path.is_file():
        raise UsageError(f"--key {spec}: not dev:N and no such key file")
    try:
        return load_box_key(path, read_password(f"encryption key {path}"))
    except ValueError as exc:
        raise CommandError(str(exc)) from None
