"""Contribution scoring over a growing task history: re-read every round vs kept across rounds.

Each round's updates are scored against everything the task published before it (earlier
globals and reveals). The aggregator used to fetch, parse and measure that whole history again
every round; it now keeps each published adapter, measured, across rounds (``PublishedAdapters``)
and remembers the updates it has just verified. This benchmark builds a task's history in a
real embedded store (adapters shaped like the demo's tiny Qwen3, or Qwen3-1.7B with
``--model 1.7b``), then times each round's history read + scoring both ways in one run and
checks that the scores are identical.

    OMP_NUM_THREADS=1 python -m tests.benchmarks.bench_scoring_history [--rounds 10] [--clients 3] [--model tiny]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from prismesh.aggregator.adapters import Adapter, save_adapter
from prismesh.aggregator.contribution import PublishedAdapters, published_before, score_updates
from prismesh.aggregator.strategies import ClientUpdate
from prismesh.chain.storage import EmbeddedStore, add_adapter
from prismesh.node.basemodel import MODEL_CONFIG
from tests.benchmarks.bench_aggregation import QWEN3_1_7B, TARGETS, make_adapters, moved_adapters

MODELS = {"tiny": MODEL_CONFIG, "1.7b": QWEN3_1_7B}


def build_history(store: EmbeddedStore, work: Path, model: dict, rounds: int, clients: int,
                  seed: int) -> list[tuple[str, Adapter, list[tuple[str, Adapter]]]]:
    """Per round: the global adapter's CID and adapter, and the clients' (CID, adapter)."""
    lora = {"r": 8, "lora_alpha": 16, "target_modules": TARGETS}
    glob = make_adapters(1, lora, seed, model)[0]
    history = []
    for r in range(1, rounds + 1):
        glob_cid = add_adapter(store, save_adapter(glob, work / f"g{r}"))
        updates = moved_adapters(glob, clients, seed=seed + r)
        ups = [(add_adapter(store, save_adapter(u, work / f"u{r}-{i}")), u) for i, u in enumerate(updates)]
        history.append((glob_cid, glob, ups))
        mean = {k: np.mean([u.tensors[k] for u in updates], axis=0).astype(np.float32) for k in glob.tensors}
        glob = Adapter(dict(glob.config), mean)
    return history


def known_cids(history: list, r: int) -> list[str]:
    """What the chain lists as published before round ``r`` (1-based): every global up to it,
    then every earlier round's reveals."""
    return [g for g, _, _ in history[:r]] + [c for _, _, ups in history[: r - 1] for c, _ in ups]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--clients", type=int, default=3)
    p.add_argument("--model", choices=sorted(MODELS), default="tiny")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.rounds < 2 or args.clients < 2:
        p.error("--rounds and --clients must be at least 2")
    with tempfile.TemporaryDirectory(prefix="bench-scoring-") as tmp:
        root = Path(tmp)
        store = EmbeddedStore(root / "ipfs")
        t0 = time.perf_counter()
        history = build_history(store, root / "adapters", MODELS[args.model], args.rounds, args.clients, args.seed)
        print(f"history: {args.rounds} rounds x {args.clients} clients, {args.model}-shaped adapters, "
              f"built in {time.perf_counter() - t0:.1f} s")
        kept = PublishedAdapters()
        print("| round | known adapters | re-read every round (ms) | kept across rounds (ms) | ratio |")
        print("|---:|---:|---:|---:|---:|")
        totals = [0.0, 0.0]
        for r in range(1, args.rounds + 1):
            glob_cid, glob, ups = history[r - 1]
            updates = [ClientUpdate(f"0x{i:040x}", 1, u) for i, (_, u) in enumerate(ups)]
            cids = known_cids(history, r)
            t = time.perf_counter()
            before = published_before(None, store, 1, r, root / "reread", cids=cids)
            old = score_updates(updates, glob, before)
            reread = time.perf_counter() - t
            t = time.perf_counter()
            for cid, u in ups:  # what the aggregator keeps after verifying the round
                kept.add(cid, u)
            kept.add(glob_cid, glob)
            new = score_updates(updates, glob, published_before(None, store, 1, r, root / "kept", cids=cids,
                                                                cache=kept))
            kept_s = time.perf_counter() - t
            if new != old:
                raise SystemExit(f"round {r}: scores differ: {old} vs {new}")
            totals[0] += reread
            totals[1] += kept_s
            print(f"| {r} | {len(before)} | {reread * 1e3:.1f} | {kept_s * 1e3:.1f} | {reread / kept_s:.1f}x |")
        print(f"| all | | {totals[0] * 1e3:.0f} | {totals[1] * 1e3:.0f} | {totals[0] / totals[1]:.1f}x |")
        print(f"scores identical in every round; adapters kept: {kept.bytes_kept / 2**20:.1f} MiB "
              f"(budget {kept.max_bytes / 2**20:.0f} MiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
