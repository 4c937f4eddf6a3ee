"""``prismesh keys``: make and inspect the encrypted keystores the daemons sign with.

A node or aggregator *is* its key, so the key is created on the host that uses it and never
leaves it unencrypted. The password comes from ``$PRISMESH_KEYSTORE_PASSWORD`` or, on a
terminal, from a prompt; the daemons read it the same way (``prismesh.chain.identity.load_daemon_account``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from prismesh.cli.errors import CommandError, UsageError


def register(sub: argparse._SubParsersAction) -> None:
    k = sub.add_parser("keys", help="create or inspect encrypted keystores")
    ks = k.add_subparsers(dest="keys_command", metavar="ACTION")
    ks.required = True

    p = ks.add_parser("new", help="create a key pair and write it as an encrypted V3 keystore")
    p.add_argument("--out", type=Path, required=True, help="keystore file to write")
    p.add_argument("--from-dev", type=int, default=None, metavar="N",
                   help="store devnet account N instead of a fresh key (local walkthroughs only)")
    p.add_argument("--pbkdf2-iterations", type=int, default=None,
                   help="use pbkdf2 with this many iterations instead of scrypt (tests only)")
    p.add_argument("--force", action="store_true", help="overwrite an existing file")
    p.set_defaults(func=_new)

    p = ks.add_parser("address", help="print the address a keystore holds (asks for its password)")
    p.add_argument("keystore", type=Path)
    p.set_defaults(func=_address)


def _new(args: argparse.Namespace) -> int:
    from prismesh.chain.identity import (
        PASSWORD_ENV,
        dev_account,
        new_account,
        read_password,
        save_keystore,
    )

    if args.out.exists() and not args.force:
        raise CommandError(f"{args.out} exists; use --force to replace it")
    if args.pbkdf2_iterations is not None and args.pbkdf2_iterations < 1:
        raise UsageError("--pbkdf2-iterations must be >= 1")
    pw = read_password(str(args.out), confirm=True)
    if not pw:
        raise CommandError(f"no password: set {PASSWORD_ENV} or run on a terminal")
    account = dev_account(args.from_dev) if args.from_dev is not None else new_account()
    save_keystore(account, args.out, pw, iterations=args.pbkdf2_iterations)
    print(json.dumps({"address": account.address, "keystore": str(args.out)}))
    return 0


def _address(args: argparse.Namespace) -> int:
    from prismesh.chain.identity import load_daemon_account

    print(load_daemon_account(str(args.keystore)).address)
    return 0
