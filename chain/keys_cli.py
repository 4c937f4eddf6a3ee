"""``prismesh keys``: make and inspect the encrypted keystores the daemons sign with.

A node or aggregator *is* its key, so the key is created on the host that uses it and never
leaves it unencrypted. The password comes from ``$PRISMESH_KEYSTORE_PASSWORD`` or, on a
terminal, from a prompt; the daemons read it the same way (:func:`load_daemon_account`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

PASSWORD_ENV = "PRISMESH_KEYSTORE_PASSWORD"


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


def read_password(what: str, *, confirm: bool = False) -> str | None:
    """The keystore password: ``$PRISMESH_KEYSTORE_PASSWORD``, else a prompt when stdin is a
    terminal, else None (a daemon under a supervisor must not hang on a prompt nobody sees)."""
    pw = os.environ.get(PASSWORD_ENV)
    if pw is not None:
        return pw
    if not sys.stdin.isatty():
        return None
    import getpass

    pw = getpass.getpass(f"password for {what}: ")
    if confirm and getpass.getpass("repeat it: ") != pw:
        raise SystemExit("error: the passwords differ")
    return pw


def load_daemon_account(spec: str) -> Any:
    """The signing account of a daemon: ``dev:N``, a 0x key, or a keystore file whose password
    comes from the environment or an interactive prompt. Raises ``IdentityError`` with the
    file's name when it cannot be opened."""
    from chain.identity import IdentityError, load_account

    if spec.startswith(("dev:", "0x")) or not Path(spec).is_file():
        return load_account(spec)
    pw = read_password(f"keystore {spec}")
    if pw is None:
        raise IdentityError(
            f"keystore {spec} needs a password: set {PASSWORD_ENV} or run the daemon on a terminal"
        )
    return load_account(spec, password=pw)


def _new(args: argparse.Namespace) -> int:
    from chain.identity import IdentityError, dev_account, new_account, save_keystore

    if args.out.exists() and not args.force:
        print(f"error: {args.out} exists (use --force to replace it)", file=sys.stderr)
        return 2
    if args.pbkdf2_iterations is not None and args.pbkdf2_iterations < 1:
        print("error: --pbkdf2-iterations must be >= 1", file=sys.stderr)
        return 2
    pw = read_password(str(args.out), confirm=True)
    if not pw:
        print(f"error: no password: set {PASSWORD_ENV} or run on a terminal", file=sys.stderr)
        return 2
    try:
        account = dev_account(args.from_dev) if args.from_dev is not None else new_account()
        save_keystore(account, args.out, pw, iterations=args.pbkdf2_iterations)
    except IdentityError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"address": account.address, "keystore": str(args.out)}))
    return 0


def _address(args: argparse.Namespace) -> int:
    from chain.identity import IdentityError

    try:
        account = load_daemon_account(str(args.keystore))
    except IdentityError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(account.address)
    return 0
