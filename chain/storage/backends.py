"""Opening a store from a spec string (``embedded[:DIR]``, ``kubo[:ADDR]``)."""

from __future__ import annotations

import os

from prismesh.chain.storage.embedded import EmbeddedStore
from prismesh.chain.storage.kubo import KuboStore
from prismesh.chain.storage.store import DEFAULT_KUBO_API, Store


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
        return KuboStore(rest or DEFAULT_KUBO_API)
    raise ValueError(
        f"unknown store spec {spec!r}: use 'embedded', 'embedded:/path', 'kubo', "
        "'kubo:/ip4/127.0.0.1/tcp/5001' or 'kubo:http://host:port'"
    )


