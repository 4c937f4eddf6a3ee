"""The storage interface every backend implements, its errors, and the PEFT adapter helpers.

Backends: ``EmbeddedStore`` (``embedded.py``, the default: a local blockstore under
``$PRISMESH_HOME/ipfs``) and ``KuboStore`` (``kubo.py``: a Kubo daemon over its ``/api/v0/`` RPC
API); ``backends.open_store`` picks one from a spec string.

Both produce the CIDs Kubo's ``ipfs add`` prints (``prismesh.chain.storage.unixfs``), and both re-hash every block
they read against its CID: a corrupted, truncated or missing block raises ``CIDMismatch`` or
``BlockNotFound`` naming the CID, and ``get`` writes into a temporary sibling of the destination
that is renamed into place only once everything was verified, so a failed fetch leaves nothing
behind.

Adapter helpers keep the PEFT layout (``adapter_config.json`` + ``adapter_model.safetensors``) so a
fetched directory loads with ``PeftModel.from_pretrained`` unchanged.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from prismesh.chain.storage import unixfs
from prismesh.chain.storage.unixfs import Node, UnixFSError

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
DEFAULT_KUBO_API = "/ip4/127.0.0.1/tcp/5001"

AddedCallback = Callable[[str, str], None]
"""Called with ``(name, cid)`` for every file and directory added, in Kubo's output order."""


# --------------------------------------------------------------------------- errors


class StorageError(Exception):
    """A storage operation failed; ``cid`` names the object or block concerned, when known."""

    def __init__(self, message: str, cid: str | None = None):
        super().__init__(message)
        self.cid = cid


class CIDMismatch(StorageError):
    """A block's bytes do not hash to its CID (corrupted or truncated)."""


class BlockNotFound(StorageError):
    """A block needed to read an object is not available from the store."""


@dataclass(frozen=True)
class ObjectStat:
    """What ``ipfs files stat`` reports: type, payload size, DAG size, links of the root."""

    cid: str
    type: str
    size: int
    cumulative_size: int
    links: int


def _cid_bytes(cid: str | bytes) -> bytes:
    try:
        return unixfs.parse_cid(cid)
    except UnixFSError as exc:
        raise StorageError(str(exc), cid=str(cid)) from None


def normalize_cid(cid: str | bytes) -> str:
    """The canonical text form (v0 base58 / v1 base32) of any CID spelling."""
    return unixfs.cid_to_str(_cid_bytes(cid))


def prismesh_home() -> Path:
    return Path(os.environ.get("PRISMESH_HOME") or Path.home() / ".prismesh").expanduser()


# --------------------------------------------------------------------------- the interface


class Store(ABC):
    """Add, fetch, pin and verify UnixFS objects; every block read is checked against its CID."""

    # -- backend primitives
    @abstractmethod
    def _read_block(self, cid: bytes) -> bytes:
        """Raw bytes of one block as the backend holds them; ``BlockNotFound`` when absent."""

    @abstractmethod
    def _has_block(self, cid: bytes) -> bool: ...

    @abstractmethod
    def add_path(
        self,
        path: str | os.PathLike[str],
        *,
        cid_version: int = 0,
        raw_leaves: bool | None = None,
        only_hash: bool = False,
        pin: bool = True,
        on_added: AddedCallback | None = None,
        wrap_with_directory: bool = False,
    ) -> str:
        """Add a file or (recursively) a directory like ``ipfs add -r``; return the root CID.

        ``wrap_with_directory`` (``ipfs add -w``) adds a directory around ``path`` whose root
        CID is returned; ``on_added`` then reports it last, with an empty name."""

    @abstractmethod
    def pin(self, cid: str) -> None: ...

    @abstractmethod
    def unpin(self, cid: str) -> None: ...

    @abstractmethod
    def pins(self) -> dict[str, str]:
        """Pinned roots and their pin type (``recursive``)."""

    def _delete_block(self, cid: bytes) -> None:
        """Drop one block (a damaged one, so that adding the object again restores it)."""
        raise StorageError(
            f"{type(self).__name__} cannot drop single blocks", cid=unixfs.cid_to_str(cid)
        )

    # -- shared logic
    def add_bytes(
        self,
        data: bytes,
        *,
        cid_version: int = 0,
        raw_leaves: bool | None = None,
        only_hash: bool = False,
        pin: bool = True,
    ) -> str:
        """Add ``data`` as one UnixFS file (no name, like ``echo ... | ipfs add``)."""
        with tempfile.TemporaryDirectory(prefix="prismesh-add-") as tmp:
            path = Path(tmp) / "data"
            path.write_bytes(data)
            return self.add_path(
                path, cid_version=cid_version, raw_leaves=raw_leaves, only_hash=only_hash, pin=pin
            )

    def has(self, cid: str) -> bool:
        """True when the root block of ``cid`` is held by this store (no network fetch)."""
        return self._has_block(_cid_bytes(cid))

    def block(self, cid: str | bytes) -> bytes:
        """Fetch one block and re-hash it against its CID."""
        raw = _cid_bytes(cid)
        name = unixfs.cid_to_str(raw)
        data = self._read_block(raw)
        try:
            ok = unixfs.verify_block(raw, data)
        except UnixFSError as exc:
            raise StorageError(str(exc), cid=name) from None
        if not ok:
            raise CIDMismatch(
                f"block {name} is corrupted or truncated: its {len(data)} bytes do not hash "
                "to the CID",
                cid=name,
            )
        return data

    def node(self, cid: str | bytes) -> Node:
        """Fetch, verify and decode one block."""
        raw = _cid_bytes(cid)
        data = self.block(raw)
        try:
            return unixfs.decode_node(raw, data)
        except UnixFSError as exc:
            raise StorageError(
                f"block {unixfs.cid_to_str(raw)} is not valid UnixFS: {exc}",
                cid=unixfs.cid_to_str(raw),
            ) from None

    def stat(self, cid: str) -> ObjectStat:
        node = self.node(cid)
        block_size = len(self.block(node.cid))
        kind = "file" if node.kind == "raw" else node.kind
        cumulative = block_size + sum(link.tsize for link in node.links)
        return ObjectStat(normalize_cid(cid), kind, node.filesize, cumulative, len(node.links))

    def iter_file(self, cid: str | bytes) -> Iterator[bytes]:
        """Stream a file's bytes; memory holds one block per tree level."""
        node = self.node(cid)
        if node.kind not in ("file", "raw"):
            raise StorageError(
                f"{unixfs.cid_to_str(node.cid)} is a {node.kind}, not a file",
                cid=unixfs.cid_to_str(node.cid),
            )
        for piece in self._iter_node(node):
            yield piece if isinstance(piece, bytes) else bytes(piece)

    def _iter_node(self, node: Node) -> Iterator[bytes | memoryview]:
        if node.data:
            yield node.data
        for link, expected in zip(node.links, node.blocksizes, strict=True):
            child = self.node(link.cid)
            if child.kind not in ("file", "raw"):
                raise StorageError(
                    f"file {unixfs.cid_to_str(node.cid)} links to a {child.kind}",
                    cid=unixfs.cid_to_str(node.cid),
                )
            if child.filesize != expected:
                raise StorageError(
                    f"block {unixfs.cid_to_str(child.cid)} holds {child.filesize} bytes but its "
                    f"parent {unixfs.cid_to_str(node.cid)} expects {expected}",
                    cid=unixfs.cid_to_str(child.cid),
                )
            yield from self._iter_node(child)

    def cat(self, cid: str) -> bytes:
        """Whole file in memory; for small objects (use ``get`` or ``iter_file`` for large)."""
        return b"".join(self.iter_file(cid))

    def get(self, cid: str, dest: str | os.PathLike[str]) -> Path:
        """Write the object (file or directory tree) to ``dest``, which must not exist yet.

        Everything lands in a temporary sibling first and is renamed into place only after every
        block was verified, so on any error ``dest`` is left untouched.
        """
        dest = Path(dest)
        if dest.exists() or dest.is_symlink():
            raise StorageError(f"destination {dest} already exists", cid=str(cid))
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.parent / f".{dest.name}.partial-{uuid.uuid4().hex[:12]}"
        try:
            self._materialize(self.node(cid), tmp)
            os.replace(tmp, dest)
        except BaseException:
            _remove(tmp)
            raise
        return dest

    def _materialize(self, node: Node, target: Path) -> None:
        if node.kind in ("file", "raw"):
            with open(target, "xb") as handle:
                for piece in self._iter_node(node):
                    handle.write(piece)
        elif node.kind == "directory":
            target.mkdir()
            for link in node.links:
                _check_entry_name(link.name, node)
                self._materialize(self.node(link.cid), target / link.name)
        elif node.kind == "symlink":
            os.symlink(bytes(node.data).decode("utf-8"), target)
        else:  # pragma: no cover - decode_node only yields the kinds above
            raise StorageError(f"cannot write a {node.kind}", cid=unixfs.cid_to_str(node.cid))

    def walk(self, cid: str | bytes) -> Iterator[tuple[bytes, int]]:
        """Yield ``(cid, block_size)`` for every block of the DAG, each fetched and verified.

        File nodes are also checked for consistency: each child must hold exactly the number
        of bytes its parent's ``blocksizes`` promise, so a valid-but-foreign block is caught.
        """
        stack: list[tuple[bytes, int | None, bytes | None]] = [(_cid_bytes(cid), None, None)]
        while stack:
            current, expected, parent = stack.pop()
            data = self.block(current)
            yield current, len(data)
            try:
                node = unixfs.decode_node(current, data)
            except UnixFSError as exc:
                name = unixfs.cid_to_str(current)
                raise StorageError(f"block {name} is not valid UnixFS: {exc}", cid=name) from None
            if expected is not None and node.filesize != expected:
                name = unixfs.cid_to_str(current)
                raise StorageError(
                    f"block {name} holds {node.filesize} bytes but its parent "
                    f"{unixfs.cid_to_str(parent or b'')} expects {expected}",
                    cid=name,
                )
            if node.kind == "file":
                children = [
                    (lk.cid, size, current)
                    for lk, size in zip(node.links, node.blocksizes, strict=True)
                ]
            else:
                children = [(lk.cid, None, current) for lk in node.links]
            stack.extend(reversed(children))

    def verify(self, cid: str) -> int:
        """Fetch and re-hash every block of the DAG; return how many blocks were checked."""
        return sum(1 for _ in self.walk(cid))

    def check(self, cid: str, *, repair: bool = False) -> CheckReport:
        """Every block of the DAG under ``cid``, read and re-hashed, carrying on past bad ones.

        Unlike :meth:`verify`, which stops at the first bad block, this lists every damaged and
        missing block it can reach; with ``repair`` the damaged ones are dropped, so that adding
        the same bytes again (``ipfs add``, or a daemon that holds them) writes them afresh."""
        report = CheckReport(normalize_cid(cid))
        stack = [_cid_bytes(cid)]
        seen: set[bytes] = set()
        while stack:
            current = stack.pop()
            if current in seen:
                continue
            seen.add(current)
            name = unixfs.cid_to_str(current)
            try:
                data = self._read_block(current)
            except BlockNotFound:
                report.missing.append(name)
                continue
            report.checked += 1
            try:
                ok = unixfs.verify_block(current, data)
                node = unixfs.decode_node(current, data) if ok else None
            except UnixFSError:
                ok, node = False, None
            if not ok or node is None:
                report.damaged.append(name)
                if repair:
                    self._delete_block(current)
                    report.removed.append(name)
                continue
            stack.extend(link.cid for link in reversed(node.links))
        return report


@dataclass
class CheckReport:
    """What :meth:`Store.check` found under one root."""

    cid: str
    checked: int = 0
    damaged: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.damaged and not self.missing


def _check_entry_name(name: str, parent: Node) -> None:
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\x00" in name:
        raise StorageError(
            f"directory {unixfs.cid_to_str(parent.cid)} has an unsafe entry name {name!r}",
            cid=unixfs.cid_to_str(parent.cid),
        )


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.exists():
        shutil.rmtree(path, ignore_errors=True)



def cid_of_path(path: str | os.PathLike[str], cid_version: int = 0) -> str:
    """The CID ``ipfs add -r --only-hash`` prints for ``path``; touches no store."""
    try:
        return unixfs.cid_of_path(path, cid_version=cid_version)
    except UnixFSError as exc:
        raise StorageError(str(exc)) from None



# --------------------------------------------------------------------------- adapters


def _check_adapter_dir(path: Path, cid: str | None = None) -> None:
    if not path.is_dir():
        raise StorageError(f"adapter directory {path} does not exist or is not a directory", cid)
    missing = [name for name in ADAPTER_FILES if not (path / name).is_file()]
    if missing:
        where = f"adapter {cid}" if cid else f"adapter directory {path}"
        raise StorageError(f"{where} lacks {', '.join(missing)} (PEFT layout expected)", cid)


def add_adapter(store: Store, adapter_dir: str | os.PathLike[str], *, cid_version: int = 0) -> str:
    """Add and pin a PEFT adapter directory; return its root CID (what goes on-chain)."""
    path = Path(adapter_dir)
    _check_adapter_dir(path)
    return store.add_path(path, cid_version=cid_version, pin=True)


def restore_held(store: Store, cid: str, local: str | os.PathLike[str] | bytes | None) -> bool:
    """Make ``cid`` whole in ``store`` again from a local copy of its bytes, if one is held.

    ``local`` is a file or directory whose content is ``cid`` (an adapter this daemon wrote, the
    aggregate it computed) or the bytes of a single-file object (a task spec). Returns True when
    the store now holds ``cid`` intact: it already did, or the damaged and missing blocks were
    written again from the local copy. Returns False (touching nothing) when the local copy is
    absent or is not ``cid``; a copy that is not what it claims is never added."""
    try:
        if store.check(cid).ok:
            return True
    except StorageError:
        pass
    if local is None:
        return False
    if isinstance(local, bytes):
        if unixfs.cid_of_bytes(local) != normalize_cid(cid):
            return False
        store.check(cid, repair=True)
        added = store.add_bytes(local)
    else:
        path = Path(local)
        if not path.exists() or cid_of_path(path) != normalize_cid(cid):
            return False
        store.check(cid, repair=True)
        added = store.add_path(path, pin=True)
    return added == normalize_cid(cid) and store.check(cid).ok


def cat_held(store: Store, cid: str, copy: str | os.PathLike[str]) -> tuple[bytes, bool]:
    """A small single-file object (a task spec), verified, with a local copy kept at ``copy``.

    The first read saves the bytes there; when the store later lost or damaged the object, it
    is written back from the copy (the same CID: the bytes are checked against it). Returns the
    bytes and whether the store had to be repaired; raises the store's error when neither the
    store nor the copy holds it."""
    copy = Path(copy)
    try:
        data = store.cat(cid)
    except StorageError as exc:
        try:
            held = copy.read_bytes()
        except OSError:
            raise exc from None
        if not restore_held(store, cid, held):
            raise
        return held, True
    if not copy.exists():
        copy.parent.mkdir(parents=True, exist_ok=True)
        tmp = copy.with_name(f".{copy.name}.{uuid.uuid4().hex[:8]}")
        tmp.write_bytes(data)
        os.replace(tmp, copy)
    return data, False


def fetch_adapter(store: Store, cid: str, dest: str | os.PathLike[str]) -> Path:
    """Fetch a verified PEFT adapter directory to ``dest`` (which must not exist yet).

    The directory only appears at ``dest`` once every block was verified and both PEFT files
    are present; ``PeftModel.from_pretrained(model, dest)`` loads it as-is.
    """
    dest = Path(dest)
    if dest.exists():
        raise StorageError(f"destination {dest} already exists", cid=cid)
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = dest.parent / f".{dest.name}.fetch-{uuid.uuid4().hex[:12]}"
    try:
        store.get(cid, staging)
        _check_adapter_dir(staging, cid)
        os.replace(staging, dest)
    except BaseException:
        _remove(staging)
        raise
    return dest

