"""Content-addressed storage for adapters: one ``Store`` interface, two backends.

* ``EmbeddedStore`` (the default): a local blockstore under ``$PRISMESH_HOME/ipfs`` (``PRISMESH_HOME``
  defaults to ``~/.prismesh``). Nothing to start; one file per block, written atomically; pins in a
  JSON file written atomically, so they survive restarts.
* ``KuboStore`` (``chain.kubo``): a Kubo daemon over its ``/api/v0/`` RPC API.

Both produce the CIDs Kubo's ``ipfs add`` prints (``chain.unixfs``), and both re-hash every block
they read against its CID: a corrupted, truncated or missing block raises ``CIDMismatch`` or
``BlockNotFound`` naming the CID, and ``get`` writes into a temporary sibling of the destination
that is renamed into place only once everything was verified, so a failed fetch leaves nothing
behind.

Adapter helpers keep the PEFT layout (``adapter_config.json`` + ``adapter_model.safetensors``) so a
fetched directory loads with ``PeftModel.from_pretrained`` unchanged.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import tempfile
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from chain import unixfs
from chain.unixfs import Added, Importer, ImportOptions, Node, UnixFSError

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
    ) -> str:
        """Add a file or (recursively) a directory like ``ipfs add -r``; return the root CID."""

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


# --------------------------------------------------------------------------- embedded backend


class EmbeddedStore(Store):
    """Local persistent blockstore: ``blocks/<shard>/<KEY>.data`` plus ``pins.json``.

    Blocks are keyed by their multihash in upper-case base32 (Kubo's flatfs naming), so the
    same bytes added as CIDv0 and CIDv1 are stored once; the shard is the key's next-to-last
    character (32 directories, created once). Each block file is written to a temp file and
    renamed; whatever happens to the disk later is caught by the re-hash on read.
    """

    def __init__(self, root: str | os.PathLike[str] | None = None):
        self.root = Path(root) if root is not None else prismesh_home() / "ipfs"
        self.blocks_dir = self.root / "blocks"
        self.pins_file = self.root / "pins.json"
        self.blocks_dir.mkdir(parents=True, exist_ok=True)
        self._shards: set[str] = set()

    def __repr__(self) -> str:
        return f"EmbeddedStore({str(self.root)!r})"

    # -- blocks
    def block_path(self, cid: str | bytes) -> Path:
        mh = unixfs.cid_multihash(_cid_bytes(cid))
        key = base64.b32encode(mh).decode("ascii").rstrip("=")
        return self.blocks_dir / key[-2] / f"{key}.data"

    def _put_block(self, cid: bytes, data: bytes) -> None:
        path = self.block_path(cid)
        with contextlib.suppress(FileNotFoundError):
            if path.stat().st_size == len(data):
                return
        if path.parent.name not in self._shards:
            path.parent.mkdir(exist_ok=True)
            self._shards.add(path.parent.name)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def _read_block(self, cid: bytes) -> bytes:
        try:
            return self.block_path(cid).read_bytes()
        except FileNotFoundError:
            name = unixfs.cid_to_str(cid)
            raise BlockNotFound(f"block {name} not found in {self.root}", cid=name) from None

    def _has_block(self, cid: bytes) -> bool:
        return self.block_path(cid).is_file()

    # -- adding
    def add_path(
        self,
        path: str | os.PathLike[str],
        *,
        cid_version: int = 0,
        raw_leaves: bool | None = None,
        only_hash: bool = False,
        pin: bool = True,
        on_added: AddedCallback | None = None,
    ) -> str:
        options = ImportOptions(cid_version=cid_version, raw_leaves=raw_leaves)
        importer = Importer(options, sink=None if only_hash else self._put_block)
        if on_added is not None:
            importer.on_added = _relative_reporter(Path(path), on_added)
        try:
            root: Added = importer.add_path(path)
        except UnixFSError as exc:
            raise StorageError(str(exc)) from None
        cid = root.cid_str
        if pin and not only_hash:
            self._update_pins(add=cid)
        return cid

    # -- pins
    def _load_pins(self) -> dict[str, str]:
        try:
            raw = json.loads(self.pins_file.read_text())
        except FileNotFoundError:
            return {}
        except json.JSONDecodeError as exc:
            raise StorageError(f"pin file {self.pins_file} is not valid JSON: {exc}") from None
        return {str(k): str(v.get("type", "recursive")) for k, v in raw.get("pins", {}).items()}

    def _update_pins(self, add: str | None = None, remove: str | None = None) -> None:
        with _file_lock(self.root / ".pins.lock"):
            pins = self._load_pins()
            if add is not None:
                pins[add] = "recursive"
            if remove is not None:
                pins.pop(remove, None)
            body = {"pins": {k: {"type": v} for k, v in sorted(pins.items())}}
            _atomic_write(self.pins_file, json.dumps(body, indent=1).encode("utf-8"))

    def pin(self, cid: str) -> None:
        """Recursively pin ``cid``; every block must be present and intact."""
        name = normalize_cid(cid)
        self.verify(name)
        self._update_pins(add=name)

    def unpin(self, cid: str) -> None:
        name = normalize_cid(cid)
        if name not in self._load_pins():
            raise StorageError(f"{name} is not pinned", cid=name)
        self._update_pins(remove=name)

    def pins(self) -> dict[str, str]:
        return self._load_pins()

    def gc(self) -> int:
        """Delete blocks not reachable from a pin; return how many were removed."""
        live: set[Path] = set()
        for root in self._load_pins():
            for cid, _size in self.walk(root):
                live.add(self.block_path(cid))
        removed = 0
        for path in self.blocks_dir.glob("*/*.data"):
            if path not in live:
                path.unlink(missing_ok=True)
                removed += 1
        return removed


def _relative_reporter(top: Path, callback: AddedCallback) -> Callable[[Path, Added], None]:
    base = top.parent

    def report(path: Path, added: Added) -> None:
        callback(str(path.relative_to(base)), added.cid_str)

    return report


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    import fcntl

    with open(path, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


# --------------------------------------------------------------------------- factory


def open_store(spec: str | None = None) -> Store:
    """Open a store from a spec string.

    ``None`` / ``"embedded"`` → the embedded store under ``$PRISMESH_HOME/ipfs``;
    ``"embedded:/path"`` → an embedded store at ``/path``; ``"kubo"`` → a Kubo daemon at
    ``/ip4/127.0.0.1/tcp/5001``; ``"kubo:/ip4/…/tcp/…"`` or ``"kubo:http://host:port"`` → that
    daemon. With ``spec=None`` the ``PRISMESH_IPFS`` environment variable, when set, is used.
    """
    if spec is None:
        spec = os.environ.get("PRISMESH_IPFS") or "embedded"
    spec = spec.strip()
    kind, _, rest = spec.partition(":")
    if kind == "embedded":
        return EmbeddedStore(rest or None)
    if kind == "kubo":
        from chain.kubo import KuboStore

        return KuboStore(rest or DEFAULT_KUBO_API)
    raise ValueError(
        f"unknown store spec {spec!r}: use 'embedded', 'embedded:/path', 'kubo', "
        "'kubo:/ip4/127.0.0.1/tcp/5001' or 'kubo:http://host:port'"
    )


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


__all__ = [
    "ADAPTER_FILES",
    "BlockNotFound",
    "CIDMismatch",
    "EmbeddedStore",
    "ObjectStat",
    "Store",
    "StorageError",
    "add_adapter",
    "cid_of_path",
    "fetch_adapter",
    "normalize_cid",
    "open_store",
    "prismesh_home",
]
