"""Content-addressed storage: Kubo-identical CIDs, two backends behind one interface, every read
verified against its CID. ``open_store(spec)`` opens a backend; ``add_adapter`` / ``fetch_adapter``
move PEFT adapter directories in and out."""

from prismesh.chain.storage.backends import open_store
from prismesh.chain.storage.embedded import EmbeddedStore
from prismesh.chain.storage.store import (
    ADAPTER_FILES,
    DEFAULT_KUBO_API,
    BlockNotFound,
    CheckReport,
    CIDMismatch,
    ObjectStat,
    StorageError,
    Store,
    add_adapter,
    cat_held,
    cid_of_path,
    fetch_adapter,
    normalize_cid,
    prismesh_home,
    restore_held,
)

__all__ = [
    "ADAPTER_FILES",
    "DEFAULT_KUBO_API",
    "BlockNotFound",
    "CIDMismatch",
    "CheckReport",
    "EmbeddedStore",
    "ObjectStat",
    "StorageError",
    "Store",
    "add_adapter",
    "cat_held",
    "cid_of_path",
    "fetch_adapter",
    "normalize_cid",
    "open_store",
    "prismesh_home",
    "restore_held",
]
