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
from dataclasses import dataclass
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

