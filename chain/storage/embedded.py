"""The embedded blockstore: nothing to start, one file per block, pins in a JSON file."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from prismesh.chain.storage import unixfs
from prismesh.chain.storage.store import (
    AddedCallback,
    BlockNotFound,
    StorageError,
    Store,
    _cid_bytes,
    normalize_cid,
    prismesh_home,
)
from prismesh.chain.storage.unixfs import Added, Importer, ImportOptions, UnixFSError


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
            # An existing block is kept only when it is intact: writing an object again is how
            # a damaged or truncated block gets repaired.
            if path.stat().st_size == len(data) and unixfs.verify_block(cid, path.read_bytes()):
                return
        if path.parent.name not in self._shards or not path.parent.is_dir():
            # Created once per shard, and again if the store directory was deleted meanwhile.
            path.parent.mkdir(parents=True, exist_ok=True)
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

    def _delete_block(self, cid: bytes) -> None:
        self.block_path(cid).unlink(missing_ok=True)

    def check_all(self, *, repair: bool = False) -> tuple[int, list[Path]]:
        """Re-hash every block file against the multihash it is named by; with ``repair``,
        delete the damaged ones. Returns how many were checked and the damaged files."""
        checked, damaged = 0, []
        for path in sorted(self.blocks_dir.glob("*/*.data")):
            key = path.name[: -len(".data")]
            try:
                mh = base64.b32decode(key + "=" * (-len(key) % 8))
                ok = unixfs.verify_block(unixfs.make_cid(1, 0x55, mh), path.read_bytes())
            except (ValueError, UnixFSError, OSError):
                ok = False
            checked += 1
            if not ok:
                damaged.append(path)
                if repair:
                    path.unlink(missing_ok=True)
        return checked, damaged

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
        wrap_with_directory: bool = False,
    ) -> str:
        options = ImportOptions(cid_version=cid_version, raw_leaves=raw_leaves)
        importer = Importer(options, sink=None if only_hash else self._put_block)
        if on_added is not None:
            importer.on_added = _relative_reporter(Path(path), on_added)
        try:
            if wrap_with_directory:
                root: Added = importer.add_wrapped(path)
            else:
                root = importer.add_path(path)
        except UnixFSError as exc:
            raise StorageError(str(exc)) from None
        cid = root.cid_str
        if wrap_with_directory and on_added is not None:
            on_added("", cid)
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
        self.root.mkdir(parents=True, exist_ok=True)
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


