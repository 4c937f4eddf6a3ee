"""Sealed objects: adapters (and small secrets) encrypted to the recipients a task names.

Storage is trusted for availability only, and anything pinned can be read by anyone who asks
for its CID. So a client's adapter is sealed before it is stored: a fresh 256-bit data key
encrypts the adapter's files once (AES-256-GCM), and the data key is wrapped for each recipient
with HPKE (RFC 9180, base mode: DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, AES-256-GCM) from the
``cryptography`` package. Nothing here is a home-made primitive: the only framing of our own is
the length-prefixed layout of the header and of the file bundle.

A sealed object is one file::

    b"PRISMESH-SEALED/1\\n" | u32 header length | header (canonical JSON) | AES-256-GCM ciphertext

The header names the *context* (chain, coordinator, task, round, the sender, and what the object
is), the recipients (address, X25519 public key, wrapped data key) and the payload nonce. The
whole header is the payload's associated data and the context is each wrap's HPKE ``info``, so
a ciphertext moved to another round, client or task, or a header edited in any byte, fails to
open. The CID covers the ciphertext, so storage verification and pinning work unchanged; the
plaintext weights' sha256 is what a client reveals on chain, so a recipient checks what it
decrypted against the chain.

Encryption keys: X25519 key pairs whose public halves sit on chain beside their holders'
identities (``Registry.setEncryptionKey``). A daemon keeps its private key in a PKCS#8 PEM file
encrypted with its keystore's password (``<keystore>.x25519.pem``); devnet accounts and raw
0x keys derive theirs from the signing key (demos and tests only).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prismesh.chain.localstate import atomic_write_bytes

MAGIC = b"PRISMESH-SEALED/1\n"
FORMAT = "prismesh-sealed/1"
SUITE_NAME = "HPKE-base(X25519, HKDF-SHA256, AES-256-GCM) key wrap; AES-256-GCM payload"
BUNDLE_MAGIC = b"PRISMESH-BUNDLE/1\n"
KEY_FILE_SUFFIX = ".x25519.pem"
KINDS = ("update", "aggregate", "dp-seed")
_WRAP_INFO = b"prismesh-sealed/1 data key\n"
_MAX_HEADER = 1 << 20


class SealError(ValueError):
    """A sealed object that cannot be opened; the message says which and why."""


class NotSealed(SealError):
    """The bytes are not a sealed object (a clear adapter, or garbage)."""


class NotARecipient(SealError):
    """The key at hand is not among the object's recipients."""


class WrongContext(SealError):
    """The object was sealed for another chain, task, round, sender or purpose."""


class Tampered(SealError):
    """A wrapped key or the payload fails authentication (modified, truncated, or forged)."""


# ----------------------------------------------------------------------------- context


@dataclass(frozen=True)
class SealContext:
    """What a sealed object is for; bound into every wrap and into the payload's tag."""

    chain_id: int
    coordinator: str
    task: int
    round: int
    sender: str
    kind: str = "update"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"seal context kind must be one of {KINDS}, got {self.kind!r}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "chain_id": int(self.chain_id),
            "coordinator": self.coordinator.lower(),
            "task": int(self.task),
            "round": int(self.round),
            "sender": self.sender.lower(),
            "kind": self.kind,
        }

    @classmethod
    def from_dict(cls, data: Any) -> SealContext:
        try:
            return cls(int(data["chain_id"]), str(data["coordinator"]), int(data["task"]), int(data["round"]),
                       str(data["sender"]), str(data["kind"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise SealError(f"sealed header has a malformed context ({exc})") from None

    def describe(self) -> str:
        who = "aggregator" if self.kind != "update" else "client"
        return f"task {self.task} round {self.round} {self.kind} of {who} {self.sender}"

    def canonical(self) -> bytes:
        return _canonical(self.to_dict())


@dataclass(frozen=True)
class Recipient:
    """Someone an object is sealed to: an address and its X25519 public key (32 raw bytes)."""

    address: str
    public_key: bytes

    def __post_init__(self) -> None:
        if len(self.public_key) != 32 or self.public_key == b"\x00" * 32:
            raise ValueError(f"recipient {self.address}: an X25519 public key is 32 non-zero bytes")


@dataclass(frozen=True)
class SealedHeader:
    """What anyone can read of a sealed object without a key."""

    context: SealContext
    recipients: tuple[Recipient, ...]
    nonce: bytes
    wrapped: tuple[bytes, ...]
    header_bytes: bytes
    payload_offset: int

    def recipient_addresses(self) -> list[str]:
        return [r.address for r in self.recipients]

    def describe_recipients(self) -> str:
        return ", ".join(f"{r.address} (key {r.public_key.hex()[:12]}…)" for r in self.recipients)


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def _suite() -> Any:
    from cryptography.hazmat.primitives import hpke

    return hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)


# ----------------------------------------------------------------------------- seal / open


def seal(plaintext: bytes, recipients: Sequence[Recipient], context: SealContext) -> bytes:
    """Encrypt ``plaintext`` once and wrap its key for every recipient (see the module notes)."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    if not recipients:
        raise ValueError(f"{context.describe()}: no recipients to seal to")
    addresses = [r.address.lower() for r in recipients]
    if len(set(addresses)) != len(addresses):
        raise ValueError(f"{context.describe()}: a recipient is listed twice: {addresses}")
    suite = _suite()
    dek = AESGCM.generate_key(bit_length=256)
    info = _WRAP_INFO + context.canonical()
    entries = []
    for r in recipients:
        wrapped = suite.encrypt(dek, X25519PublicKey.from_public_bytes(r.public_key), info=info)
        entries.append({"address": r.address, "key": r.public_key.hex(), "wrapped": wrapped.hex()})
    nonce = os.urandom(12)
    header = _canonical({
        "format": FORMAT,
        "suite": SUITE_NAME,
        "context": context.to_dict(),
        "nonce": nonce.hex(),
        "recipients": entries,
    })
    prefix = MAGIC + struct.pack(">I", len(header)) + header
    return prefix + AESGCM(dek).encrypt(nonce, plaintext, prefix)


def is_sealed(blob: bytes) -> bool:
    return blob.startswith(MAGIC)


def read_header(blob: bytes) -> SealedHeader:
    """The header of a sealed object (no key needed); raises ``NotSealed`` / ``SealError``."""
    if not is_sealed(blob):
        raise NotSealed("not a sealed object (no PRISMESH-SEALED/1 header)")
    start = len(MAGIC)
    if len(blob) < start + 4:
        raise SealError("sealed object is truncated inside its header")
    (length,) = struct.unpack(">I", blob[start : start + 4])
    if length > _MAX_HEADER or len(blob) < start + 4 + length + 16:
        raise SealError("sealed object is truncated (header length exceeds the object)")
    raw = blob[start + 4 : start + 4 + length]
    try:
        header = json.loads(raw.decode())
        if header.get("format") != FORMAT:
            raise SealError(f"sealed object has format {header.get('format')!r}, expected {FORMAT!r}")
        recipients, wrapped = [], []
        for entry in header["recipients"]:
            recipients.append(Recipient(str(entry["address"]), bytes.fromhex(entry["key"])))
            wrapped.append(bytes.fromhex(entry["wrapped"]))
        nonce = bytes.fromhex(header["nonce"])
    except SealError:
        raise
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise SealError(f"sealed object has a malformed header ({type(exc).__name__}: {exc})") from None
    if len(nonce) != 12:
        raise SealError("sealed object has a malformed header (nonce is not 12 bytes)")
    return SealedHeader(SealContext.from_dict(header.get("context")), tuple(recipients), nonce,
                        tuple(wrapped), blob[: start + 4 + length], start + 4 + length)


def open_sealed(blob: bytes, private_key: Any, expected: SealContext | None = None) -> bytes:
    """Decrypt a sealed object with an X25519 private key; every failure is a ``SealError``
    naming the object's context: not sealed, sealed for another context, not addressed to this
    key, or failing authentication."""
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    header = read_header(blob)
    ctx = header.context
    if expected is not None and ctx.to_dict() != expected.to_dict():
        raise WrongContext(f"sealed for {ctx.describe()} (chain {ctx.chain_id}, coordinator {ctx.coordinator}), "
                           f"not for {expected.describe()} (chain {expected.chain_id}, coordinator {expected.coordinator})")
    mine = public_key_bytes(private_key)
    index = next((i for i, r in enumerate(header.recipients) if r.public_key == mine), None)
    if index is None:
        raise NotARecipient(f"{ctx.describe()} is sealed to {header.describe_recipients()}, "
                            f"not to key {mine.hex()[:12]}…")
    try:
        dek = _suite().decrypt(header.wrapped[index], private_key, info=_WRAP_INFO + ctx.canonical())
    except InvalidTag:
        raise Tampered(f"{ctx.describe()}: the data key wrapped for {header.recipients[index].address} "
                       "fails authentication (tampered or forged)") from None
    except ValueError as exc:
        raise Tampered(f"{ctx.describe()}: the data key wrapped for {header.recipients[index].address} "
                       f"is malformed ({exc})") from None
    try:
        return AESGCM(dek).decrypt(header.nonce, blob[header.payload_offset :], header.header_bytes)
    except InvalidTag:
        raise Tampered(f"{ctx.describe()}: the ciphertext fails authentication (tampered or truncated)") from None


# ----------------------------------------------------------------------------- directories


def bundle_dir(path: str | os.PathLike[str]) -> bytes:
    """The regular files of a flat directory in name order, length-prefixed (deterministic)."""
    root = Path(path)
    out = [BUNDLE_MAGIC]
    files = sorted(p for p in root.iterdir() if p.is_file())
    if not files:
        raise ValueError(f"{root}: no files to bundle")
    for p in files:
        name = p.name.encode()
        data = p.read_bytes()
        out.append(struct.pack(">H", len(name)) + name + struct.pack(">Q", len(data)) + data)
    return b"".join(out)


def unbundle(raw: bytes, dest: str | os.PathLike[str]) -> Path:
    """Write a bundle's files into ``dest`` (created; must not exist). Names are checked."""
    if not raw.startswith(BUNDLE_MAGIC):
        raise SealError("decrypted payload is not a PRISMESH-BUNDLE/1 file bundle")
    files: dict[str, bytes] = {}
    pos = len(BUNDLE_MAGIC)
    try:
        while pos < len(raw):
            (n,) = struct.unpack(">H", raw[pos : pos + 2])
            name = raw[pos + 2 : pos + 2 + n].decode()
            pos += 2 + n
            (size,) = struct.unpack(">Q", raw[pos : pos + 8])
            pos += 8
            if pos + size > len(raw):
                raise SealError("decrypted bundle is truncated")
            if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name or name in files:
                raise SealError(f"decrypted bundle has a bad or repeated file name {name!r}")
            files[name] = raw[pos : pos + size]
            pos += size
    except (struct.error, UnicodeDecodeError) as exc:
        raise SealError(f"decrypted bundle is malformed ({exc})") from None
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.open-"))
    for name, data in files.items():
        (staging / name).write_bytes(data)
    os.replace(staging, dest)
    return dest


def seal_dir(path: str | os.PathLike[str], recipients: Sequence[Recipient], context: SealContext) -> bytes:
    """Seal a flat directory (a PEFT adapter) as one object."""
    return seal(bundle_dir(path), recipients, context)


def open_to_dir(blob: bytes, private_key: Any, dest: str | os.PathLike[str],
                expected: SealContext | None = None) -> Path:
    """Open a sealed directory into ``dest``."""
    return unbundle(open_sealed(blob, private_key, expected), dest)


# ----------------------------------------------------------------------------- storage


def stored_kind(store: Any, cid: str) -> str:
    """``"directory"`` (a clear adapter), ``"sealed"`` or ``"file"`` (anything else)."""
    node = store.node(cid)
    if node.kind == "directory":
        return "directory"
    if node.kind not in ("file", "raw"):
        return node.kind
    head = b""
    for chunk in store.iter_file(cid):
        head += bytes(chunk)
        if len(head) >= len(MAGIC):
            break
    return "sealed" if head.startswith(MAGIC) else "file"


def fetch_sealed_adapter(store: Any, cid: str, dest: str | os.PathLike[str], private_key: Any,
                         expected: SealContext | None = None) -> Path:
    """Fetch a sealed adapter by CID (the store verifies the ciphertext), open it into ``dest``
    and check that it is a PEFT adapter directory."""
    from prismesh.chain.storage.store import ADAPTER_FILES

    path = open_to_dir(store.cat(cid), private_key, dest, expected)
    missing = [n for n in ADAPTER_FILES if not (path / n).is_file()]
    if missing:
        raise SealError(f"sealed object {cid} opened, but lacks {', '.join(missing)} (PEFT layout expected)")
    return path


def fetch_any_adapter(store: Any, cid: str, dest: str | os.PathLike[str], private_key: Any = None,
                      expected: SealContext | None = None) -> Path:
    """Fetch an adapter stored in the clear (a PEFT directory) or sealed (opened with
    ``private_key``) into ``dest``; a sealed one without a key is a ``NotARecipient`` error."""
    from prismesh.chain.storage import fetch_adapter

    kind = stored_kind(store, cid)
    if kind == "directory":
        return fetch_adapter(store, cid, dest)
    if kind != "sealed":
        raise SealError(f"{cid} is a {kind}, neither a PEFT adapter directory nor a sealed adapter")
    if private_key is None:
        header = read_header(store.cat(cid))
        raise NotARecipient(f"{header.context.describe()} ({cid}) is sealed to {header.describe_recipients()}; "
                            "no encryption key was given")
    return fetch_sealed_adapter(store, cid, dest, private_key, expected)


def add_sealed(store: Any, blob: bytes) -> str:
    """Add and pin a sealed object; its CID (over the ciphertext) is what goes on chain."""
    if not is_sealed(blob):
        raise ValueError("refusing to add an object without a sealed header as sealed")
    return store.add_bytes(blob, pin=True)


# ----------------------------------------------------------------------------- keys


def new_box_key() -> Any:
    """A fresh X25519 private key."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    return X25519PrivateKey.generate()


def public_key_bytes(private_key: Any) -> bytes:
    """The raw 32-byte public key of an X25519 private key (what goes on chain)."""
    from cryptography.hazmat.primitives import serialization

    return private_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def private_key_raw(private_key: Any) -> bytes:
    """The raw 32 bytes of an X25519 private key (to hand to a worker process)."""
    from cryptography.hazmat.primitives import serialization

    return private_key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                     serialization.NoEncryption())


def box_key_from_signing_key(signing_key: bytes) -> Any:
    """An X25519 key derived from a secp256k1 signing key (HKDF-SHA256). For devnet accounts and
    raw test keys only: a real deployment keeps a separate key file (see ``save_box_key``)."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    raw = HKDF(algorithm=hashes.SHA256(), length=32, salt=b"prismesh", info=b"x25519 from a devnet signing key").derive(
        bytes(signing_key))
    return X25519PrivateKey.from_private_bytes(raw)


def save_box_key(private_key: Any, path: str | os.PathLike[str], password: str) -> Path:
    """Write the key as an encrypted PKCS#8 PEM (mode 0600, atomic)."""
    from cryptography.hazmat.primitives import serialization

    if not password:
        raise ValueError("refusing to write an encryption key with an empty password")
    pem = private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.BestAvailableEncryption(password.encode()))
    path = Path(path)
    atomic_write_bytes(path, pem, mode=0o600)
    return path


def load_box_key(path: str | os.PathLike[str], password: str | None) -> Any:
    """Read an encrypted X25519 key file; ``ValueError`` naming the file on any failure."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ValueError(f"encryption key file not found: {path}") from None
    try:
        key = serialization.load_pem_private_key(raw, password.encode() if password else None)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"cannot open encryption key {path}: {exc}") from None
    if not isinstance(key, X25519PrivateKey):
        raise ValueError(f"{path} holds a {type(key).__name__}, not an X25519 key")
    return key


def box_key_path_for(keystore: str | os.PathLike[str]) -> Path:
    """Where a keystore's encryption key lives: beside it, ``<keystore>.x25519.pem``."""
    p = Path(keystore)
    return p.with_name(p.name + KEY_FILE_SUFFIX)


def load_daemon_box_key(keystore_spec: str, account: Any, key_file: str | os.PathLike[str] | None = None) -> Any:
    """A daemon's X25519 key: ``key_file`` when given, else the file beside its keystore (same
    password, from ``$PRISMESH_KEYSTORE_PASSWORD`` or a prompt), else, for ``dev:N`` and raw 0x
    keys only, one derived from the signing key. Raises ``ValueError`` saying what is missing."""
    from prismesh.chain.identity import read_password

    if key_file is None and (keystore_spec.startswith(("dev:", "0x")) or not Path(keystore_spec).is_file()):
        return box_key_from_signing_key(bytes(account.key))
    path = Path(key_file) if key_file is not None else box_key_path_for(keystore_spec)
    if not path.is_file():
        raise ValueError(f"no encryption key at {path}: create one with "
                         f"'prismesh keys box new --keystore {keystore_spec}'")
    return load_box_key(path, read_password(f"encryption key {path}"))


def derive_secret(private_key: Any, label: str, *parts: object) -> bytes:
    """32 secret bytes, a pure function of an X25519 private key and a label (HKDF-SHA256): the
    same after a restart, unknowable without the key (e.g. a round's DP noise seed)."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    raw = private_key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                    serialization.NoEncryption())
    info = "/".join([label, *(str(p).lower() for p in parts)]).encode()
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=b"prismesh secret", info=info).derive(raw)


def task_recipients(registry: Any, addresses: Sequence[str]) -> list[Recipient]:
    """The recipients a task names, with the keys they published on chain. Each must hold the
    aggregator or the auditor role and have published a key; otherwise ``SealError`` says who,
    and nothing should be sealed (a client never falls back to the clear)."""
    out = []
    for address in addresses:
        if not (registry.is_aggregator(address) or registry.is_auditor(address)):
            raise SealError(f"task recipient {address} holds neither the aggregator nor the auditor role")
        key = registry.encryption_key_of(address)
        if key == b"\x00" * 32:
            raise SealError(f"task recipient {address} has published no encryption key (Registry.setEncryptionKey)")
        out.append(Recipient(address, key))
    return out


def fingerprint(public_key: bytes) -> str:
    """A short, stable name for a public key in logs (sha256, 16 hex digits)."""
    return hashlib.sha256(public_key).hexdigest()[:16]
