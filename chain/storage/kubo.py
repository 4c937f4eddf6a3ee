"""Kubo daemon backend over the documented RPC API (``POST /api/v0/<command>``).

Plain ``requests`` is used instead of ``ipfshttpclient`` (unmaintained, refuses Kubo >= 0.9).
Writes go through ``/api/v0/add`` (a streamed ``multipart/form-data`` body, Kubo's directory
encoding) with the importer parameters pinned explicitly (``chunker=size-262144``,
``hash=sha2-256``, ``cid-version``, ``raw-leaves``); the root CID Kubo answers is compared with the
one computed locally, so a daemon configured with another import profile is caught instead of
silently producing different on-chain CIDs. Reads never trust the daemon: every block comes from
``/api/v0/block/get`` and is re-hashed and decoded here.
"""

from __future__ import annotations

import json
import os
import stat as stat_mod
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote_plus

import requests

from prismesh.chain.storage import unixfs
from prismesh.chain.storage.store import (
    DEFAULT_KUBO_API,
    AddedCallback,
    BlockNotFound,
    StorageError,
    Store,
    normalize_cid,
)
from prismesh.chain.storage.unixfs import UnixFSError


def api_url(address: str = DEFAULT_KUBO_API) -> str:
    """Base URL (``http://host:port``) for a multiaddr like ``/ip4/127.0.0.1/tcp/5001`` or a URL."""
    address = address.strip()
    if address.startswith(("http://", "https://")):
        return address.rstrip("/").removesuffix("/api/v0")
    parts = [p for p in address.split("/") if p]
    if len(parts) < 4 or parts[2] != "tcp":
        raise ValueError(
            f"Kubo API address {address!r} is neither an http(s) URL nor a multiaddr like "
            "/ip4/127.0.0.1/tcp/5001"
        )
    proto, host, _tcp, port = parts[:4]
    if proto not in ("ip4", "ip6", "dns", "dns4", "dns6"):
        raise ValueError(f"unsupported multiaddr protocol {proto!r} in {address!r}")
    if not port.isdigit():
        raise ValueError(f"port {port!r} in {address!r} is not a number")
    scheme = "https" if parts[4:5] == ["https"] else "http"
    if proto == "ip6":
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}"


@dataclass(frozen=True)
class _Part:
    name: str  # path relative to the parent of the added root, '/'-separated
    content_type: str
    path: Path | None = None  # file whose bytes are the part body
    body: bytes = b""
    size: int = 0


class MultipartBody:
    """A streamed ``multipart/form-data`` body in Kubo's file encoding, with a known length.

    Directories come as ``application/x-directory`` parts before their entries, files as
    ``application/octet-stream``, symlinks as ``application/symlink``; each part's filename is the
    query-escaped relative path (``planets%2Fmars.txt``), as Kubo's multipart reader expects.
    Having ``__len__`` lets ``requests`` send a Content-Length instead of chunked encoding.
    """

    def __init__(self, parts: list[_Part], boundary: str | None = None):
        self.boundary = boundary or uuid.uuid4().hex
        self._segments: list[bytes | tuple[Path, int]] = []
        for index, part in enumerate(parts):
            lead = b"" if index == 0 else b"\r\n"
            header = (
                f"--{self.boundary}\r\n"
                f'Content-Disposition: form-data; name="file"; filename="{quote_plus(part.name)}"\r\n'
                f"Content-Type: {part.content_type}\r\n\r\n"
            ).encode()
            self._segments.append(lead + header)
            if part.path is not None:
                self._segments.append((part.path, part.size))
            elif part.body:
                self._segments.append(part.body)
        self._segments.append(f"\r\n--{self.boundary}--\r\n".encode())
        self._length = sum(s[1] if isinstance(s, tuple) else len(s) for s in self._segments)
        self._index = 0
        self._handle: Any = None
        self._left = 0

    @property
    def content_type(self) -> str:
        return f"multipart/form-data; boundary={self.boundary}"

    def __len__(self) -> int:
        return self._length

    def __iter__(self):
        while True:
            piece = self.read(1 << 16)
            if not piece:
                return
            yield piece

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            size = 1 << 20
        while self._index < len(self._segments):
            segment = self._segments[self._index]
            if isinstance(segment, bytes):
                self._index += 1
                if segment:
                    return segment
                continue
            path, expected = segment
            if self._handle is None:
                self._handle = open(path, "rb")
                self._left = expected
            piece = self._handle.read(min(size, self._left)) if self._left else b""
            if piece:
                self._left -= len(piece)
                return piece
            self._handle.close()
            self._handle = None
            if self._left:
                raise StorageError(f"{path} shrank while it was being uploaded")
            self._index += 1
        return b""


def multipart_parts(path: Path, include_hidden: bool = False) -> list[_Part]:
    """Parts for ``path`` in Kubo's order: a directory before its entries, entries sorted."""
    parts: list[_Part] = []

    def visit(current: Path, name: str) -> None:
        st = os.lstat(current)
        if stat_mod.S_ISLNK(st.st_mode):
            parts.append(_Part(name, "application/symlink", body=os.readlink(current).encode()))
        elif stat_mod.S_ISDIR(st.st_mode):
            parts.append(_Part(name, "application/x-directory"))
            for child in sorted(os.listdir(current)):
                if child.startswith(".") and not include_hidden:
                    continue
                visit(current / child, f"{name}/{child}")
        elif stat_mod.S_ISREG(st.st_mode):
            parts.append(_Part(name, "application/octet-stream", path=current, size=st.st_size))
        else:
            raise StorageError(f"unrecognized file type for {current}")

    if not path.exists() and not path.is_symlink():
        raise StorageError(f"no such file or directory: {path}")
    visit(path, path.name)
    return parts


def parse_add_response(text: str) -> list[dict[str, Any]]:
    """Entries of ``/api/v0/add``'s newline-delimited JSON, progress lines dropped."""
    entries = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError:
            raise StorageError(
                f"Kubo add answered a line that is not JSON: {line[:200]!r}"
            ) from None
        if "Message" in item and item.get("Type") == "error":
            raise StorageError(f"Kubo add failed: {item['Message']}")
        if "Hash" in item:
            entries.append(item)
    return entries


class KuboStore(Store):
    """Store backed by a Kubo daemon; every block read is verified locally."""

    def __init__(
        self,
        address: str = DEFAULT_KUBO_API,
        *,
        timeout: float = 120.0,
        offline: bool = False,
        session: requests.Session | None = None,
    ):
        self.address = address
        self.base_url = api_url(address)
        self.timeout = timeout
        self.offline = offline
        self.session = session or requests.Session()

    def __repr__(self) -> str:
        return f"KuboStore({self.base_url!r})"

    # -- transport
    def _post(
        self,
        command: str,
        params: list[tuple[str, str]] | None = None,
        *,
        data: Any = None,
        headers: dict[str, str] | None = None,
        cid: str | None = None,
    ) -> requests.Response:
        url = f"{self.base_url}/api/v0/{command}"
        try:
            response = self.session.post(
                url, params=params or [], data=data, headers=headers, timeout=self.timeout
            )
        except requests.RequestException as exc:
            subject = f" for {cid}" if cid else ""
            raise StorageError(f"Kubo RPC {url} failed{subject}: {exc}", cid=cid) from None
        if response.status_code != 200:
            message = response.text.strip()
            try:
                message = str(response.json().get("Message", message))
            except ValueError:
                pass
            error_cls = BlockNotFound if _is_not_found(message) else StorageError
            raise error_cls(
                f"Kubo {command} answered HTTP {response.status_code}: {message}", cid=cid
            )
        return response

    def _json(self, command: str, params: list[tuple[str, str]], cid: str | None = None) -> Any:
        response = self._post(command, params, cid=cid)
        try:
            return response.json()
        except ValueError:
            raise StorageError(
                f"Kubo {command} answered something that is not JSON: {response.text[:200]!r}",
                cid=cid,
            ) from None

    def version(self) -> str:
        return str(self._json("version", [])["Version"])

    # -- blocks
    def _read_block(self, cid: bytes) -> bytes:
        name = unixfs.cid_to_str(cid)
        params = [("arg", name)]
        if self.offline:
            params.append(("offline", "true"))
        try:
            response = self._post("block/get", params, cid=name)
            return response.content
        except requests.RequestException as exc:  # body cut short while streaming
            raise StorageError(f"Kubo block/get {name} failed: {exc}", cid=name) from None

    def _has_block(self, cid: bytes) -> bool:
        name = unixfs.cid_to_str(cid)
        try:
            self._json("block/stat", [("arg", name), ("offline", "true")], cid=name)
        except BlockNotFound:
            return False
        return True

    def _delete_block(self, cid: bytes) -> None:
        # Kubo refuses to drop a block under a pin: the reply names the pin to remove first.
        name = unixfs.cid_to_str(cid)
        self._json("block/rm", [("arg", name), ("force", "true")], cid=name)

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
        path = Path(path)
        try:
            expected = unixfs.cid_of_path(
                path, cid_version=cid_version, raw_leaves=raw_leaves,
                wrap_with_directory=wrap_with_directory,
            )
        except UnixFSError as exc:
            raise StorageError(str(exc)) from None
        if only_hash:
            return expected
        use_raw = cid_version == 1 if raw_leaves is None else raw_leaves
        params = [
            ("cid-version", str(cid_version)),
            ("raw-leaves", "true" if use_raw else "false"),
            ("chunker", f"size-{unixfs.CHUNK_SIZE}"),
            ("hash", "sha2-256"),
            ("pin", "true" if pin else "false"),
            ("progress", "false"),
            ("wrap-with-directory", "true" if wrap_with_directory else "false"),
        ]
        body = MultipartBody(multipart_parts(path))
        response = self._post("add", params, data=body, headers={"Content-Type": body.content_type})
        entries = parse_add_response(response.text)
        if not entries:
            raise StorageError(f"Kubo add of {path} returned no CID")
        if on_added is not None:
            for entry in entries:
                on_added(str(entry.get("Name", "")), str(entry["Hash"]))
        root = normalize_cid(str(entries[-1]["Hash"]))
        if root != expected:
            raise StorageError(
                f"Kubo added {path} as {root} but the UnixFS importer computes {expected}; "
                "the daemon's Import settings (chunker, max links, raw leaves) differ from "
                "Kubo's defaults",
                cid=root,
            )
        return root

    # -- pins
    def pin(self, cid: str) -> None:
        name = normalize_cid(cid)
        reply = self._json("pin/add", [("arg", name), ("recursive", "true")], cid=name)
        pinned = [normalize_cid(c) for c in reply.get("Pins", [])]
        if name not in pinned:
            raise StorageError(f"Kubo pin/add did not confirm {name}: {reply}", cid=name)

    def unpin(self, cid: str) -> None:
        name = normalize_cid(cid)
        self._json("pin/rm", [("arg", name), ("recursive", "true")], cid=name)

    def pins(self) -> dict[str, str]:
        reply = self._json("pin/ls", [("type", "recursive")])
        keys = reply.get("Keys") or {}
        return {normalize_cid(k): str(v.get("Type", "recursive")) for k, v in keys.items()}


def _is_not_found(message: str) -> bool:
    lowered = message.lower()
    return "not found" in lowered or "could not find" in lowered
