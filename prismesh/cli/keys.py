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

    p = ks.add_parser(
        "box",
        help="X25519 encryption keys: create one beside a keystore, show it, publish it on chain",
        description="An encryption key (X25519) receives sealed updates and aggregates. It lives beside its "
        "keystore as <keystore>.x25519.pem, encrypted with the same password; its public half is published on "
        "chain beside the identity (Registry.setEncryptionKey), where clients look it up before sealing.",
    )
    p.add_argument("action", choices=("new", "show", "publish"),
                   help="new: write a key file; show: print its public key; publish: set it on chain")
    p.add_argument("--keystore", required=True,
                   help="the identity's keystore (the key file goes beside it), or dev:N for a devnet account")
    p.add_argument("--key-file", type=Path, default=None, help="another place for the key file")
    p.add_argument("--manifest", type=Path, default=None, help="deployment manifest (publish)")
    p.add_argument("--rpc-url", default=None, help="override the manifest's RPC URL (publish)")
    p.add_argument("--force", action="store_true", help="new: overwrite an existing key file")
    p.set_defaults(func=_box)


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


def _box(args: argparse.Namespace) -> int:
    from prismesh.chain.identity import PASSWORD_ENV, load_daemon_account, read_password
    from prismesh.chain.sealing import (
        box_key_path_for,
        fingerprint,
        load_daemon_box_key,
        new_box_key,
        public_key_bytes,
        save_box_key,
    )

    dev = args.keystore.startswith(("dev:", "0x"))
    if args.action == "new":
        if dev:
            raise UsageError("devnet accounts derive their encryption key from the signing key; nothing to create")
        path = args.key_file or box_key_path_for(args.keystore)
        if path.exists() and not args.force:
            raise CommandError(f"{path} exists; use --force to replace it (a new key cannot open what the old one could)")
        pw = read_password(str(path), confirm=True)
        if not pw:
            raise CommandError(f"no password: set {PASSWORD_ENV} or run on a terminal")
        key = new_box_key()
        save_box_key(key, path, pw)
        public = public_key_bytes(key)
        print(json.dumps({"key_file": str(path), "public_key": "0x" + public.hex(), "fingerprint": fingerprint(public)}))
        return 0
    account = load_daemon_account(args.keystore)
    try:
        key = load_daemon_box_key(args.keystore, account, args.key_file)
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    public = public_key_bytes(key)
    if args.action == "show":
        print(json.dumps({"address": account.address, "public_key": "0x" + public.hex(), "fingerprint": fingerprint(public)}))
        return 0
    if args.manifest is None:
        raise UsageError("publish needs --manifest")
    from prismesh.chain.evm.contracts import Registry
    from prismesh.chain.evm.manifest import connect_with

    manifest, w3 = connect_with(args.manifest, args.rpc_url)
    registry = Registry(manifest, w3, account)
    if registry.encryption_key_of(account.address) != public:
        registry.set_encryption_key(public)
    print(json.dumps({"address": account.address, "public_key": "0x" + public.hex(), "published": True}))
    return 0
