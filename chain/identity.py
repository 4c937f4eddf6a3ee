"""Identities: client, aggregator and validator key pairs, their encrypted keystores, and the
institution descriptor hash a client registers with.

A participant *is* its key pair: the address is what the Registry approves and what every
commitment is bound to, so keys are created, stored (Ethereum V3 keystore, encrypted) and
loaded here and nowhere else.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_utils import keccak

from prismesh.chain.evm.devnet import dev_accounts
from prismesh.chain.localstate import atomic_write_bytes

PASSWORD_ENV = "PRISMESH_KEYSTORE_PASSWORD"


class IdentityError(ValueError):
    """A key or keystore could not be created, read or decrypted."""


def descriptor_hash(descriptor: Mapping[str, Any]) -> bytes:
    """keccak256 of the canonical JSON (sorted keys, no spaces) of an institution descriptor;
    the value a client passes to ``Registry.register``. Only the hash goes on chain."""
    if not descriptor:
        raise IdentityError("institution descriptor is empty")
    canonical = json.dumps(descriptor, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return keccak(canonical.encode())


def new_account() -> LocalAccount:
    """A fresh random key pair."""
    return Account.create()


def account_from_seed(seed: str | bytes) -> LocalAccount:
    """A deterministic key pair derived from ``seed`` (for reproducible demos and tests only)."""
    raw = seed.encode() if isinstance(seed, str) else bytes(seed)
    if not raw:
        raise IdentityError("seed is empty")
    return Account.from_key(keccak(b"prismesh-identity:" + raw))


def dev_account(index: int) -> LocalAccount:
    """Devnet account ``index`` (anvil's default mnemonic; funded on both devnets)."""
    if index < 0:
        raise IdentityError(f"dev account index must be >= 0, got {index}")
    return dev_accounts(index + 1)[index]


def save_keystore(
    account: LocalAccount, path: Path | str, password: str, iterations: int | None = None
) -> Path:
    """Write ``account`` as an encrypted V3 keystore (mode 0600, atomic). ``iterations`` lowers
    the KDF cost (pbkdf2) for tests; the default is scrypt at eth-account's strength."""
    path = Path(path)
    if not password:
        raise IdentityError("refusing to write a keystore with an empty password")
    if iterations is None:
        blob = Account.encrypt(account.key, password)
    else:
        blob = Account.encrypt(account.key, password, kdf="pbkdf2", iterations=iterations)
    atomic_write_bytes(path, json.dumps(blob).encode(), mode=0o600)
    return path


def load_keystore(path: Path | str, password: str) -> LocalAccount:
    """Decrypt a V3 keystore; raises ``IdentityError`` naming the file on a bad password."""
    path = Path(path)
    try:
        blob = json.loads(path.read_text())
    except FileNotFoundError:
        raise IdentityError(f"keystore not found: {path}") from None
    except json.JSONDecodeError as exc:
        raise IdentityError(f"keystore {path} is not JSON: {exc}") from None
    try:
        key = Account.decrypt(blob, password)
    except ValueError as exc:
        raise IdentityError(f"cannot decrypt keystore {path}: {exc}") from None
    return Account.from_key(key)


def load_account(spec: str, password: str | None = None) -> LocalAccount:
    """An account from a command-line spec: ``dev:N`` (devnet account N), a 0x-prefixed
    private key, or the path of a keystore (``password`` or ``$PRISMESH_KEYSTORE_PASSWORD``)."""
    if spec.startswith("dev:"):
        try:
            return dev_account(int(spec[4:]))
        except ValueError:
            raise IdentityError(f"bad dev account spec {spec!r}: expected dev:<index>") from None
    if spec.startswith("0x") and len(spec) == 66:
        try:
            return Account.from_key(spec)
        except Exception as exc:
            raise IdentityError(f"invalid private key: {exc}") from None
    path = Path(spec)
    if path.is_file():
        pw = password if password is not None else os.environ.get(PASSWORD_ENV)
        if pw is None:
            raise IdentityError(f"keystore {path} needs a password ({PASSWORD_ENV})")
        return load_keystore(path, pw)
    raise IdentityError(f"account spec {spec!r} is not dev:N, a 0x private key or a keystore file")


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
        raise IdentityError("the two passwords typed differ")
    return pw


def load_daemon_account(spec: str) -> LocalAccount:
    """The signing account of a daemon: ``dev:N``, a 0x key, or a keystore file whose password
    comes from the environment or an interactive prompt. Raises ``IdentityError`` with the
    file's name when it cannot be opened."""
    if spec.startswith(("dev:", "0x")) or not Path(spec).is_file():
        return load_account(spec)
    pw = read_password(f"keystore {spec}")
    if pw is None:
        raise IdentityError(
            f"keystore {spec} needs a password: set {PASSWORD_ENV} or run the daemon on a terminal"
        )
    return load_account(spec, password=pw)
