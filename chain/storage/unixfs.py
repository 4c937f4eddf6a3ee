"""UnixFS importer and decoder that reproduces the CIDs Kubo's ``ipfs add`` prints.

Adapters and aggregates are referenced on-chain by CID, so anybody holding the same bytes must
derive the same CID with stock Kubo. This module is the one place that knows how Kubo (boxo's
importer) turns bytes into blocks:

* fixed-size chunker, 262144-byte chunks (``--chunker=size-262144``, Kubo's default);
* balanced DAG layout, at most 174 links per node (Kubo's ``Import.UnixFSFileMaxLinks`` default);
* dag-pb nodes with UnixFS ``Data`` protobufs, sha2-256 multihashes;
* CIDv0 with dag-pb leaves by default; ``cid_version=1`` implies raw leaves (codec ``raw``), as
  ``ipfs add --cid-version 1`` does; ``raw_leaves`` may be set explicitly either way;
* directories as UnixFS ``Directory`` nodes with links sorted by name (``ipfs add -r``); hidden
  entries are skipped like Kubo without ``--hidden``; symlinks become UnixFS ``Symlink`` nodes.

The importer streams: it holds one chunk plus at most 174 links per tree level, so memory stays
bounded for any file size. Blocks go to a caller-supplied sink (``None`` for ``--only-hash``).

CIDs are handled as bytes internally (CIDv0 = the multihash; CIDv1 = version, codec, multihash)
and rendered as Kubo prints them: base58btc ``Qm...`` for v0, base32 ``b...`` for v1. Parsing of
user-supplied CID strings (any multibase) goes through the ``multiformats`` package.
"""

from __future__ import annotations

import hashlib
import os
import stat as stat_mod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import base58
from multiformats import CID

CHUNK_SIZE = 262144
MAX_LINKS = 174
# Kubo switches a directory to a HAMT shard once the estimated size of its links
# (name + binary CID) exceeds this; such directories are refused rather than mis-encoded.
HAMT_THRESHOLD = 262144

CODEC_DAG_PB = 0x70
CODEC_RAW = 0x55
MH_SHA2_256 = 0x12

# UnixFS Data.DataType
T_RAW, T_DIRECTORY, T_FILE, T_METADATA, T_SYMLINK, T_HAMT_SHARD = range(6)

BlockSink = Callable[[bytes, bytes], None]
"""Receives ``(cid_bytes, block_bytes)`` for every block the importer creates."""


class UnixFSError(ValueError):
    """Malformed input to the importer or a block that is not valid dag-pb/UnixFS."""


# --------------------------------------------------------------------------- varints, protobuf


def encode_varint(value: int) -> bytes:
    """Unsigned LEB128, as used by protobuf, multihash and CID prefixes."""
    if value < 0:
        raise ValueError(f"varint must be non-negative, got {value}")
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def decode_varint(buf: bytes | memoryview, pos: int) -> tuple[int, int]:
    """Decode one varint at ``pos``; return ``(value, next_pos)``."""
    result = 0
    shift = 0
    end = len(buf)
    while True:
        if pos >= end:
            raise UnixFSError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise UnixFSError("varint too long")


def _key(field_no: int, wire_type: int) -> bytes:
    return encode_varint((field_no << 3) | wire_type)


def _pb_bytes(field_no: int, payload: bytes) -> bytes:
    return _key(field_no, 2) + encode_varint(len(payload)) + payload


def _pb_uint(field_no: int, value: int) -> bytes:
    return _key(field_no, 0) + encode_varint(value)


def _iter_fields(buf: bytes | memoryview) -> Iterator[tuple[int, int, int | memoryview]]:
    """Yield ``(field_no, wire_type, value)``; length-delimited values come as memoryviews."""
    view = memoryview(buf)
    pos = 0
    end = len(view)
    while pos < end:
        key, pos = decode_varint(view, pos)
        field_no, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, pos = decode_varint(view, pos)
            yield field_no, wire_type, value
        elif wire_type == 2:
            length, pos = decode_varint(view, pos)
            if pos + length > end:
                raise UnixFSError("truncated length-delimited field")
            yield field_no, wire_type, view[pos : pos + length]
            pos += length
        elif wire_type == 1:
            pos += 8
        elif wire_type == 5:
            pos += 4
        else:
            raise UnixFSError(f"unsupported protobuf wire type {wire_type}")
        if pos > end:
            raise UnixFSError("truncated protobuf field")


# --------------------------------------------------------------------------- CIDs


def multihash_sha256(data: bytes | memoryview) -> bytes:
    return b"\x12\x20" + hashlib.sha256(data).digest()


def make_cid(version: int, codec: int, mh: bytes) -> bytes:
    """Binary CID. CIDv0 is the bare multihash and can only name dag-pb blocks."""
    if version == 0:
        if codec != CODEC_DAG_PB:
            raise ValueError("CIDv0 can only address dag-pb blocks")
        return mh
    return encode_varint(1) + encode_varint(codec) + mh


def split_cid(cid: bytes) -> tuple[int, int, bytes]:
    """Return ``(version, codec, multihash)`` of a binary CID."""
    if len(cid) == 34 and cid[0] == MH_SHA2_256 and cid[1] == 0x20:
        return 0, CODEC_DAG_PB, cid
    version, pos = decode_varint(cid, 0)
    if version != 1:
        raise UnixFSError(f"unsupported CID version {version}")
    codec, pos = decode_varint(cid, pos)
    return 1, codec, bytes(cid[pos:])


def cid_to_str(cid: bytes) -> str:
    """Render as Kubo does: base58btc for CIDv0, lowercase base32 (``b`` prefix) for CIDv1."""
    version, _codec, mh = split_cid(cid)
    if version == 0:
        return base58.b58encode(mh).decode("ascii")
    import base64

    return "b" + base64.b32encode(cid).decode("ascii").lower().rstrip("=")


def parse_cid(text: str | bytes) -> bytes:
    """Parse a CID string in any multibase (or pass binary through) into binary form."""
    if isinstance(text, bytes):
        split_cid(text)
        return text
    text = text.strip()
    if text.startswith("/ipfs/"):
        text = text[len("/ipfs/") :]
    try:
        cid = CID.decode(text)
    except Exception as exc:  # multiformats raises several exception types
        raise UnixFSError(f"not a valid CID: {text!r} ({exc})") from None
    return bytes(cid)


def cid_multihash(cid: bytes) -> bytes:
    return split_cid(cid)[2]


def verify_block(cid: bytes, data: bytes | memoryview) -> bool:
    """True when ``data`` hashes to the multihash inside ``cid`` (sha2-256 only)."""
    mh = cid_multihash(cid)
    code, pos = decode_varint(mh, 0)
    length, pos = decode_varint(mh, pos)
    if code == 0x00:  # identity multihash: the data is inline
        return bytes(mh[pos : pos + length]) == bytes(data)
    if code != MH_SHA2_256:
        raise UnixFSError(f"unsupported multihash function 0x{code:x} in {cid_to_str(cid)}")
    return hashlib.sha256(data).digest() == mh[pos : pos + length]


# --------------------------------------------------------------------------- dag-pb + UnixFS


@dataclass(frozen=True)
class PBLink:
    cid: bytes
    name: str
    tsize: int


@dataclass
class PBNode:
    links: list[PBLink] = field(default_factory=list)
    data: bytes | memoryview | None = None


def encode_pbnode(links: Iterable[PBLink], data: bytes | None) -> bytes:
    """Canonical dag-pb: every PBLink (field 2) first, then Data (field 1).

    Link names are always written, even empty, as go-merkledag does for file chunks.
    """
    out = bytearray()
    for link in links:
        body = _pb_bytes(1, link.cid) + _pb_bytes(2, link.name.encode("utf-8"))
        body += _pb_uint(3, link.tsize)
        out += _pb_bytes(2, body)
    if data is not None:
        out += _pb_bytes(1, data)
    return bytes(out)


def decode_pbnode(block: bytes | memoryview) -> PBNode:
    node = PBNode()
    for field_no, wire, value in _iter_fields(block):
        if field_no == 2 and wire == 2:
            cid = b""
            name = ""
            tsize = 0
            for lf, lw, lv in _iter_fields(value):  # type: ignore[arg-type]
                if lf == 1 and lw == 2:
                    cid = bytes(lv)  # type: ignore[arg-type]
                elif lf == 2 and lw == 2:
                    name = bytes(lv).decode("utf-8")  # type: ignore[arg-type]
                elif lf == 3 and lw == 0:
                    tsize = int(lv)  # type: ignore[arg-type]
            if not cid:
                raise UnixFSError("dag-pb link without a hash")
            node.links.append(PBLink(cid, name, tsize))
        elif field_no == 1 and wire == 2:
            node.data = value  # type: ignore[assignment]  # a view: leaves are not copied
        else:
            raise UnixFSError(f"unexpected dag-pb field {field_no}")
    return node


@dataclass
class UnixFSData:
    type: int
    data: bytes | memoryview | None = None
    filesize: int | None = None
    blocksizes: list[int] = field(default_factory=list)


def encode_unixfs(
    type_: int,
    data: bytes | None = None,
    filesize: int | None = None,
    blocksizes: Iterable[int] = (),
) -> bytes:
    """UnixFS ``Data`` message; ``blocksizes`` unpacked, as gogo-protobuf's proto2 writes them."""
    out = bytearray(_pb_uint(1, type_))
    if data is not None:
        out += _pb_bytes(2, data)
    if filesize is not None:
        out += _pb_uint(3, filesize)
    for size in blocksizes:
        out += _pb_uint(4, size)
    return bytes(out)


def decode_unixfs(buf: bytes | memoryview) -> UnixFSData:
    result = UnixFSData(type=-1)
    for field_no, wire, value in _iter_fields(buf):
        if field_no == 1 and wire == 0:
            result.type = int(value)  # type: ignore[arg-type]
        elif field_no == 2 and wire == 2:
            result.data = value  # type: ignore[assignment]  # a view into the block
        elif field_no == 3 and wire == 0:
            result.filesize = int(value)  # type: ignore[arg-type]
        elif field_no == 4 and wire == 0:
            result.blocksizes.append(int(value))  # type: ignore[arg-type]
        elif field_no == 4 and wire == 2:  # packed form, accepted on read
            view = value
            pos = 0
            while pos < len(view):  # type: ignore[arg-type]
                size, pos = decode_varint(view, pos)  # type: ignore[arg-type]
                result.blocksizes.append(size)
    if result.type < 0:
        raise UnixFSError("UnixFS Data without a Type")
    return result


# --------------------------------------------------------------------------- importer


@dataclass(frozen=True)
class ImportOptions:
    cid_version: int = 0
    raw_leaves: bool | None = None
    chunk_size: int = CHUNK_SIZE
    max_links: int = MAX_LINKS
    include_hidden: bool = False

    def __post_init__(self) -> None:
        if self.cid_version not in (0, 1):
            raise ValueError(f"unknown CID version {self.cid_version} (use 0 or 1)")
        if self.chunk_size <= 0:
            raise ValueError(f"chunk size must be positive, got {self.chunk_size}")
        if self.max_links < 2:
            raise ValueError(f"max links must be at least 2, got {self.max_links}")

    @property
    def use_raw_leaves(self) -> bool:
        return self.cid_version == 1 if self.raw_leaves is None else self.raw_leaves


@dataclass(frozen=True)
class Added:
    """One imported node: its CID, file size (payload bytes) and cumulative DAG size (Tsize)."""

    cid: bytes
    filesize: int
    tsize: int

    @property
    def cid_str(self) -> str:
        return cid_to_str(self.cid)


class Importer:
    """Turns byte streams and directory trees into blocks exactly as Kubo's ``ipfs add`` does."""

    def __init__(self, options: ImportOptions | None = None, sink: BlockSink | None = None):
        self.options = options or ImportOptions()
        self.sink = sink
        # Called with (path, Added) for each file and directory, children before parents,
        # which is the order ``ipfs add -r`` prints them in.
        self.on_added: Callable[[Path, Added], None] | None = None
        self.blocks = 0
        self.bytes_stored = 0

    # -- blocks
    def _emit(self, codec: int, block: bytes, version: int) -> bytes:
        cid = make_cid(version, codec, multihash_sha256(block))
        if self.sink is not None:
            self.sink(cid, block)
        self.blocks += 1
        self.bytes_stored += len(block)
        return cid

    def _dag_node(self, links: list[PBLink], unixfs: bytes) -> bytes:
        return encode_pbnode(links, unixfs)

    def _leaf(self, chunk: bytes) -> Added:
        opts = self.options
        if opts.use_raw_leaves:
            cid = self._emit(CODEC_RAW, chunk, 1)
            return Added(cid, len(chunk), len(chunk))
        # encode_pbnode((), encode_unixfs(T_FILE, chunk, n)) with a single copy of the chunk
        n = len(chunk)
        head = b"\x08\x02\x12" + encode_varint(n)
        tail = b"\x18" + encode_varint(n)
        size = len(head) + n + len(tail)
        block = b"".join((b"\x0a", encode_varint(size), head, chunk, tail))
        cid = self._emit(CODEC_DAG_PB, block, opts.cid_version)
        return Added(cid, n, len(block))

    def _empty_file(self) -> Added:
        opts = self.options
        if opts.use_raw_leaves:
            cid = self._emit(CODEC_RAW, b"", 1)
            return Added(cid, 0, 0)
        block = encode_pbnode((), encode_unixfs(T_FILE, None, 0))
        cid = self._emit(CODEC_DAG_PB, block, opts.cid_version)
        return Added(cid, 0, len(block))

    def _internal(self, children: list[Added]) -> Added:
        filesize = sum(c.filesize for c in children)
        unixfs = encode_unixfs(T_FILE, None, filesize, [c.filesize for c in children])
        links = [PBLink(c.cid, "", c.tsize) for c in children]
        block = encode_pbnode(links, unixfs)
        cid = self._emit(CODEC_DAG_PB, block, self.options.cid_version)
        return Added(cid, filesize, len(block) + sum(c.tsize for c in children))

    # -- files
    def add_stream(self, stream: BinaryIO) -> Added:
        """Import a byte stream with the balanced layout (boxo ``importer/balanced``)."""
        chunks = _Chunks(stream, self.options.chunk_size)
        first = chunks.next()
        if first is None:
            return self._empty_file()
        root = self._leaf(first)
        depth = 1
        while not chunks.done():
            root = self._fill([root], depth, chunks)
            depth += 1
        return root

    def _fill(self, children: list[Added], depth: int, chunks: _Chunks) -> Added:
        max_links = self.options.max_links
        while len(children) < max_links and not chunks.done():
            if depth == 1:
                chunk = chunks.next()
                assert chunk is not None
                children.append(self._leaf(chunk))
            else:
                children.append(self._fill([], depth - 1, chunks))
        return self._internal(children)

    def add_bytes(self, data: bytes) -> Added:
        import io

        return self.add_stream(io.BytesIO(data))

    def add_file(self, path: Path) -> Added:
        with open(path, "rb") as handle:
            return self.add_stream(handle)

    def add_symlink(self, target: str) -> Added:
        block = encode_pbnode((), encode_unixfs(T_SYMLINK, target.encode("utf-8")))
        cid = self._emit(CODEC_DAG_PB, block, self.options.cid_version)
        return Added(cid, 0, len(block))

    # -- directories
    def add_directory(self, path: Path) -> Added:
        entries: list[tuple[str, Added]] = []
        with os.scandir(path) as it:
            names = sorted((e.name for e in it), key=lambda n: n.encode("utf-8", "surrogateescape"))
        for name in names:
            if name.startswith(".") and not self.options.include_hidden:
                continue
            entries.append((name, self.add_path(path / name)))
        return self._directory_node(entries, where=str(path))

    def _directory_node(self, entries: list[tuple[str, Added]], where: str) -> Added:
        estimate = sum(len(n.encode("utf-8")) + len(a.cid) for n, a in entries)
        if estimate > HAMT_THRESHOLD:
            raise UnixFSError(
                f"directory {where} has {len(entries)} entries; Kubo would shard it (HAMT), "
                "which this importer does not produce"
            )
        entries.sort(key=lambda e: e[0].encode("utf-8"))
        links = [PBLink(a.cid, n, a.tsize) for n, a in entries]
        block = encode_pbnode(links, encode_unixfs(T_DIRECTORY))
        cid = self._emit(CODEC_DAG_PB, block, self.options.cid_version)
        return Added(cid, 0, len(block) + sum(a.tsize for _, a in entries))

    def add_wrapped(self, path: str | os.PathLike[str]) -> Added:
        """Import ``path`` inside a directory holding it under its own name, like
        ``ipfs add -w``: the root is that directory, so the name travels with the content."""
        path = Path(path)
        inner = self.add_path(path)
        return self._directory_node([(path.name, inner)], where=f"wrapper of {path}")

    def add_path(self, path: str | os.PathLike[str]) -> Added:
        """Import a file, a symlink or (recursively) a directory, like ``ipfs add -r``."""
        path = Path(path)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            raise UnixFSError(f"no such file or directory: {path}") from None
        if stat_mod.S_ISLNK(st.st_mode):
            added = self.add_symlink(os.readlink(path))
        elif stat_mod.S_ISDIR(st.st_mode):
            added = self.add_directory(path)
        elif stat_mod.S_ISREG(st.st_mode):
            added = self.add_file(path)
        else:
            raise UnixFSError(f"unrecognized file type for {path}")
        if self.on_added is not None:
            self.on_added(path, added)
        return added


class _Chunks:
    """Fixed-size splitter with one chunk of look-ahead, so ``done()`` is known before layout."""

    def __init__(self, stream: BinaryIO, size: int):
        self._stream = stream
        self._size = size
        self._next: bytes | None = self._read()

    def _read(self) -> bytes | None:
        first = self._stream.read(self._size)
        if not first:
            return None
        if len(first) == self._size:
            return bytes(first)
        parts = [first]
        have = len(first)
        while have < self._size:
            part = self._stream.read(self._size - have)
            if not part:
                break
            parts.append(part)
            have += len(part)
        return b"".join(parts)

    def done(self) -> bool:
        return self._next is None

    def next(self) -> bytes | None:
        current = self._next
        if current is not None:
            self._next = self._read() if len(current) == self._size else None
        return current


# --------------------------------------------------------------------------- convenience


def cid_of_bytes(data: bytes, cid_version: int = 0, raw_leaves: bool | None = None) -> str:
    """CID ``ipfs add --only-hash`` prints for ``data``."""
    opts = ImportOptions(cid_version=cid_version, raw_leaves=raw_leaves)
    return Importer(opts).add_bytes(data).cid_str


def cid_of_path(
    path: str | os.PathLike[str],
    cid_version: int = 0,
    raw_leaves: bool | None = None,
    wrap_with_directory: bool = False,
) -> str:
    """CID ``ipfs add -r --only-hash [--cid-version N] [-w]`` prints for a file or directory."""
    importer = Importer(ImportOptions(cid_version=cid_version, raw_leaves=raw_leaves))
    added = importer.add_wrapped(path) if wrap_with_directory else importer.add_path(path)
    return added.cid_str


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class Node:
    """A decoded block: kind is ``file``, ``directory``, ``symlink`` or ``raw`` (a raw leaf)."""

    cid: bytes
    kind: str
    links: list[PBLink]
    data: bytes | memoryview
    filesize: int
    blocksizes: list[int]


_KINDS = {T_RAW: "file", T_FILE: "file", T_DIRECTORY: "directory", T_SYMLINK: "symlink"}


def decode_node(cid: bytes, block: bytes) -> Node:
    """Interpret a verified block according to its CID codec."""
    _version, codec, _mh = split_cid(cid)
    if codec == CODEC_RAW:
        return Node(cid, "raw", [], block, len(block), [])
    if codec != CODEC_DAG_PB:
        raise UnixFSError(f"{cid_to_str(cid)}: unsupported codec 0x{codec:x}")
    pb = decode_pbnode(block)
    if pb.data is None:
        raise UnixFSError(f"{cid_to_str(cid)}: dag-pb node without UnixFS data")
    fs = decode_unixfs(pb.data)
    if fs.type == T_HAMT_SHARD:
        raise UnixFSError(f"{cid_to_str(cid)}: HAMT-sharded directories are not supported")
    kind = _KINDS.get(fs.type)
    if kind is None:
        raise UnixFSError(f"{cid_to_str(cid)}: unsupported UnixFS type {fs.type}")
    payload = fs.data or b""
    if kind == "file":
        if len(fs.blocksizes) != len(pb.links):
            raise UnixFSError(
                f"{cid_to_str(cid)}: {len(pb.links)} links but {len(fs.blocksizes)} blocksizes"
            )
        filesize = fs.filesize if fs.filesize is not None else len(payload) + sum(fs.blocksizes)
        if filesize != len(payload) + sum(fs.blocksizes):
            raise UnixFSError(f"{cid_to_str(cid)}: filesize does not match its parts")
    else:
        filesize = len(payload) if kind == "symlink" else 0
    return Node(cid, kind, pb.links, payload, filesize, fs.blocksizes)
