"""Aggregation and fetch-and-verify timings on Qwen3-1.7B-shaped LoRA adapters.

    .venv/bin/python -m tests.benchmarks.bench_aggregation [--clients 4 8] [--rank 8]
    .venv/bin/python -m tests.benchmarks.bench_aggregation --clients 4 32 --rank 16 --robust

Prints, side by side in one run: fedavg vs fedavg-exact aggregation time (and the exact
strategy's truncation error), the low-rank SVD used by fedavg-exact vs a dense SVD of ΔW for one
module, and Ray-parallel vs sequential fetch+verify of the same adapters. ``--robust`` adds every
robust strategy (or ``--strategies``) beside plain fedavg, on updates of a round's global adapter
(the situation of round 2 onwards), with the time of the update-level checks of one adapter.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from prismesh.aggregator.adapters import (
    CONFIG_NAME,
    LORA_A_SUFFIX,
    LORA_B_SUFFIX,
    WEIGHTS_NAME,
    Adapter,
)
from prismesh.aggregator.adapters import save_adapter as save
from prismesh.aggregator.lowrank import lowrank_svd, single_threaded_blas
from prismesh.aggregator.parallel import UpdateRef, Verified, ensure_ray, fetch_and_verify
from prismesh.aggregator.strategies import ClientUpdate, get_strategy
from prismesh.aggregator.verify import expected_lora_shapes, verify_adapter

QWEN3_1_7B = {
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "num_hidden_layers": 28,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapters(n: int, lora: dict, seed: int = 0, model: dict | None = None) -> list[Adapter]:
    """Client adapters shaped like a trained LoRA on ``model`` (Qwen3-1.7B unless told): A at
    PEFT's init scale, small non-zero B."""
    shapes = expected_lora_shapes(model or QWEN3_1_7B, lora)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        tensors = {}
        for key, shape in shapes.items():
            if key.endswith(LORA_A_SUFFIX):
                bound = 1.0 / np.sqrt(shape[1])
                tensors[key] = rng.uniform(-bound, bound, shape).astype(np.float32)
            else:
                tensors[key] = (rng.standard_normal(shape) * 1e-3).astype(np.float32)
        out.append(Adapter(dict(lora, peft_type="LORA"), tensors))
    return out


def moved_adapters(glob: Adapter, n: int, seed: int = 1) -> list[Adapter]:
    """Clients that each trained one round from ``glob``: A nudged by 1 %, B by an update of the
    size of B itself (as after a round of local training)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        tensors = {}
        for key, v in glob.tensors.items():
            step = 0.01 * np.abs(v).mean() if key.endswith(LORA_A_SUFFIX) else 1e-3
            tensors[key] = (v + step * rng.standard_normal(v.shape)).astype(np.float32)
        out.append(Adapter(dict(glob.config), tensors))
    return out


ROBUST = ["clipped-fedavg", "multi-krum", "geomedian", "trimmed-mean", "median"]


def robust_section(args: argparse.Namespace, lora: dict, shapes: dict) -> None:
    glob = make_adapters(1, lora, seed=99)[0]
    adapters = moved_adapters(glob, max(args.clients))
    names = ["fedavg", "fedavg-exact", *args.strategies]
    print(f"\n== robust aggregation on updates of a global adapter (best of {args.robust_repeats}) ==", flush=True)
    rows = {}
    for n in args.clients:
        updates = [ClientUpdate(f"0x{i:02x}", 100 + 17 * i, a) for i, a in enumerate(adapters[:n])]
        times = rows[n] = {}
        for name in names:
            strategy = get_strategy(name)
            times[name], _ = best_of(
                lambda u=updates, s=strategy: s.aggregate(u, glob), args.robust_repeats
            )
            print(f"  {n} clients, {name}: {times[name]:.2f} s ({times[name] / times['fedavg']:.1f}x fedavg)", flush=True)
    print("\n| strategy | " + " | ".join(f"{n} clients: s (x fedavg)" for n in args.clients) + " |")
    print("|---|" + "---:|" * len(args.clients))
    for name in names:
        print(f"| {name} | " + " | ".join(f"{rows[n][name]:.2f} ({rows[n][name] / rows[n]['fedavg']:.1f}x)" for n in args.clients) + " |")
    t_check, reasons = best_of(lambda: verify_adapter(adapters[0], shapes, lora, 1e3, glob), args.repeats)
    assert reasons == [], reasons
    print(f"update-level checks of one adapter against the global (verify_adapter): {t_check:.3f} s")


def best_of(fn, repeats: int) -> tuple[float, object]:
    best, value = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        value = fn()
        best = min(best, time.perf_counter() - t)
    return best, value


def digest(path: Path) -> str:
    h = hashlib.sha256()
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        h.update((path / name).read_bytes())
    return h.hexdigest()


class CopyFetch:
    """Copies a published adapter directory and re-hashes it, as a content-addressed fetch does."""

    def __init__(self, table: dict[str, str]) -> None:
        self.table = table

    def __call__(self, cid: str, dest: Path) -> Path:
        shutil.copytree(self.table[cid], dest)
        if digest(dest) != cid:
            raise ValueError(f"bytes fetched for {cid} do not match it")
        return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ray-cpus", type=int, default=2)
    parser.add_argument("--robust", action="store_true", help="time the robust strategies too")
    parser.add_argument("--strategies", nargs="+", default=ROBUST, help="robust strategies to time")
    parser.add_argument("--robust-repeats", type=int, default=1)
    parser.add_argument("--skip-fetch", action="store_true", help="skip the fetch + verify section")
    args = parser.parse_args(argv)
    lora = {"r": args.rank, "lora_alpha": 2 * args.rank, "target_modules": TARGETS}
    shapes = expected_lora_shapes(QWEN3_1_7B, lora)
    n_params = sum(int(np.prod(s)) for s in shapes.values())
    print(
        f"Qwen3-1.7B-shaped LoRA r={args.rank}: {len(shapes) // 2} modules, "
        f"{n_params / 1e6:.2f} M parameters, {n_params * 4 / 2**20:.1f} MiB per adapter (float32)"
    )

    adapters = make_adapters(max(args.clients), lora)
    print(f"\n== aggregation (best of {args.repeats}) ==")
    print(
        f"{'clients':>7} {'fedavg s':>9} {'exact s':>9} {'exact/fedavg':>13} {'exact rel err':>14}"
    )
    for n in args.clients:
        updates = [ClientUpdate(f"0x{i:02x}", 100 + 17 * i, a) for i, a in enumerate(adapters[:n])]
        t_avg, _ = best_of(
            lambda u=updates: get_strategy("fedavg").aggregate(u, None), args.repeats
        )
        t_ex, res = best_of(
            lambda u=updates: get_strategy("fedavg-exact").aggregate(u, None), args.repeats
        )
        err = res.metrics["rel_frobenius_error_overall"]
        print(f"{n:>7} {t_avg:>9.3f} {t_ex:>9.3f} {t_ex / t_avg:>12.1f}x {err:>14.4f}")

    n = max(args.clients)
    module = "base_model.model.model.layers.0.self_attn.q_proj"
    b_cat = np.concatenate(
        [a.tensors[module + LORA_B_SUFFIX].astype(np.float64) for a in adapters[:n]], axis=1
    )
    a_cat = np.concatenate(
        [a.tensors[module + LORA_A_SUFFIX].astype(np.float64) for a in adapters[:n]], axis=0
    )
    with single_threaded_blas():
        t_low, (_, s_low, _) = best_of(lambda: lowrank_svd(b_cat, a_cat, args.rank), args.repeats)
        t_dense, s_dense = best_of(lambda: np.linalg.svd(b_cat @ a_cat)[1], 1)
    gap = np.max(np.abs(s_low - s_dense[: s_low.size])) / s_dense[0]
    print(
        f"\n== SVD of one ΔW (q_proj {b_cat.shape[0]}x{a_cat.shape[1]}, {n} clients, 1 thread) =="
    )
    print(
        f"low-rank (QR + {s_low.size}x{s_low.size} core) {t_low * 1e3:.1f} ms | dense SVD "
        f"{t_dense:.2f} s | dense/low-rank {t_dense / t_low:.0f}x | max singular value gap "
        f"{gap:.1e} (relative to the largest)"
    )

    if args.robust:
        del adapters
        robust_section(args, lora, shapes)
        adapters = make_adapters(n, lora)
    if args.skip_fetch:
        return 0
    print(f"\n== fetch + verify, {n} adapters ==")
    with tempfile.TemporaryDirectory(prefix="bench-agg-") as tmp:
        root = Path(tmp)
        table = {}
        for i, a in enumerate(adapters[:n]):
            d = save(a, root / "published" / f"c{i}")
            table[digest(d)] = str(d)
        items = [UpdateRef(f"0x{i:02x}", cid, 100) for i, cid in enumerate(table)]
        fetch = CopyFetch(table)

        def run(parallel: bool, tag: str) -> list:
            return fetch_and_verify(items, fetch, shapes, lora, 1e3, root / tag, parallel=parallel)

        t_seq, res = best_of(lambda: run(False, "seq"), args.repeats)
        assert all(isinstance(r, Verified) for r in res), res
        t0 = time.perf_counter()
        ensure_ray(num_cpus=args.ray_cpus)
        t_init = time.perf_counter() - t0
        t_cold, _ = best_of(lambda: run(True, "cold"), 1)
        t_par, res = best_of(lambda: run(True, "warm"), args.repeats)
        assert all(isinstance(r, Verified) for r in res), res
        print(
            f"sequential {t_seq:.3f} s | Ray ({args.ray_cpus} CPUs) first batch {t_cold:.3f} s, "
            f"warm {t_par:.3f} s | sequential/Ray-warm {t_seq / t_par:.2f}x "
            f"| ray.init {t_init:.1f} s"
        )
        import ray

        ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
