"""Storage throughput: add + verify of a 256 MB file beside plain sha256 of the same bytes.

Run: ``.venv/bin/python -m tests.benchmarks.bench_storage [--size-mb 256] [--repeat 2]``

Everything is measured in one run on the same machine and the same (page-cached) file, so the
ratio says what the UnixFS importer, the block files and the verification cost on top of
hashing the bytes once. Memory is reported as the process's peak RSS: the file is streamed, so
it stays far below the file size.
"""

from __future__ import annotations

import argparse
import hashlib
import resource
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from prismesh.chain.storage import EmbeddedStore
from prismesh.chain.storage.unixfs import CHUNK_SIZE, cid_of_path

MB = 1_000_000
MIB = 1024 * 1024


def make_file(path: Path, size: int, seed: int = 256) -> None:
    rng = np.random.default_rng(seed)
    with open(path, "wb") as handle:
        left = size
        while left:
            piece = rng.bytes(min(left, 8 * MIB))
            handle.write(piece)
            left -= len(piece)


def plain_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while piece := handle.read(MIB):
            digest.update(piece)
    return digest.hexdigest()


def best_time(fn: Callable[[], object], repeat: int) -> tuple[float, object]:
    best = float("inf")
    result: object = None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=256, help="file size in MiB (256)")
    parser.add_argument("--repeat", type=int, default=2, help="best of N runs per figure (2)")
    parser.add_argument("--dir", type=Path, default=None, help="scratch directory (a temp dir)")
    args = parser.parse_args(argv)

    size = args.size_mb * MIB
    with tempfile.TemporaryDirectory(prefix="bench-storage-", dir=args.dir) as tmp:
        tmp_path = Path(tmp)
        src = tmp_path / "payload.bin"
        make_file(src, size)
        mb = size / MB

        t_sha, _ = best_time(lambda: plain_sha256(src), args.repeat)
        t_hash, cid = best_time(lambda: cid_of_path(src), args.repeat)

        add_times: list[float] = []
        verify_times: list[float] = []
        get_times: list[float] = []
        for i in range(args.repeat):
            store = EmbeddedStore(tmp_path / f"store{i}")
            start = time.perf_counter()
            added = store.add_path(src)
            add_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            blocks = store.verify(added)
            verify_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            store.get(added, tmp_path / f"out{i}.bin")
            get_times.append(time.perf_counter() - start)
            assert added == cid
            (tmp_path / f"out{i}.bin").unlink()
        t_add, t_verify, t_get = min(add_times), min(verify_times), min(get_times)
        t_add_verify = min(a + v for a, v in zip(add_times, verify_times, strict=True))

    peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"payload          : {args.size_mb} MiB ({size} bytes), {size // CHUNK_SIZE} chunks")
    print(f"root CID         : {cid} ({blocks} blocks)")
    print(f"plain sha256     : {mb / t_sha:8.1f} MB/s  ({t_sha:.2f} s)")
    print(f"only-hash (CID)  : {mb / t_hash:8.1f} MB/s  ({t_hash:.2f} s)")
    print(f"add (embedded)   : {mb / t_add:8.1f} MB/s  ({t_add:.2f} s)")
    print(f"verify (re-hash) : {mb / t_verify:8.1f} MB/s  ({t_verify:.2f} s)")
    print(f"get (verified)   : {mb / t_get:8.1f} MB/s  ({t_get:.2f} s)")
    print(f"add+verify       : {mb / t_add_verify:8.1f} MB/s  ({t_add_verify:.2f} s)")
    print(f"ratio add+verify / plain sha256 throughput: {t_sha / t_add_verify:.3f}")
    print(f"ratio only-hash / plain sha256 throughput : {t_sha / t_hash:.3f}")
    print(f"peak RSS         : {peak_rss_mib:.0f} MiB (payload {size / MIB:.0f} MiB, streamed)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
