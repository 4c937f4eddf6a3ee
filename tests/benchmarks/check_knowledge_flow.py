"""Does knowledge flow? Federated LoRA vs. single-client LoRA on the synthetic benchmark.

An in-process simulation of the paper's experiment (no chain, no storage): every round each
client trains one local epoch from the current global adapter, the adapters' LoRA A and B
tensors are averaged weighted by sample count (FedAvg), and the result is the next global
adapter. Single-client LoRA gets the same budget: 3 chained 1-epoch rounds on its own data
only (a "federation" of one, so the learning-rate schedule is identical). Prints the
cross-dataset table, the split of accuracy into own vs. others' facts, and Min-Acc / H-mean.

    .venv/bin/python -m tests.benchmarks.check_knowledge_flow [--seeds 0 1] [--rounds 3]

It is a check, not a test: it takes a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path


def fedavg(adapters: list[Path], weights: list[float], out_dir: Path) -> Path:
    """Sample-weighted average of every LoRA tensor (A and B separately)."""
    from safetensors.torch import load_file, save_file

    total = float(sum(weights))
    acc: dict = {}
    for path, w in zip(adapters, weights, strict=True):
        for name, t in load_file(str(path / "adapter_model.safetensors")).items():
            acc[name] = acc.get(name, 0) + t.double() * (w / total)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.float().contiguous() for k, v in sorted(acc.items())},
              str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    shutil.copy(adapters[0] / "adapter_config.json", out_dir / "adapter_config.json")
    return out_dir


def run(seed: int, rounds: int, work: Path, scale: float, quiet: bool) -> dict:
    from prismesh.node.basemodel import ensure_base_model
    from prismesh.node.data import load_jsonl
    from prismesh.node.evaluate import Evaluator, cross_dataset_matrix, render_markdown
    from prismesh.node.synthetic import BENCHMARK_TRAIN_CONFIG, fact_owner, make_benchmark
    from prismesh.node.trainer import TrainConfig, train_lora

    base = ensure_base_model(progress=not quiet)
    specs = make_benchmark(work / f"bench-{seed}", seed=seed, scale=scale)
    train = {s.name: load_jsonl(s.train_path) for s in specs}
    tests = {s.name: load_jsonl(s.test_path) for s in specs}
    config = TrainConfig.from_dict({**BENCHMARK_TRAIN_CONFIG, "seed": seed})
    t0 = time.perf_counter()
    epoch_seconds: list[float] = []

    # Single-client LoRA: `rounds` chained one-epoch rounds on the client's own data.
    singles: dict[str, Path] = {}
    for name, examples in train.items():
        adapter = None
        for r in range(rounds):
            res = train_lora(base, examples, work / f"s{seed}-single-{name}-r{r}", config,
                             init_adapter=adapter, progress=False)
            adapter = res.adapter_dir
            epoch_seconds.append(res.metrics["seconds"])
        singles[name] = adapter

    # Federated LoRA: FedAvg over all clients every round.
    global_adapter = None
    for r in range(rounds):
        outs, weights = [], []
        for name, examples in train.items():
            res = train_lora(base, examples, work / f"s{seed}-fed-{name}-r{r}", config,
                             init_adapter=global_adapter, progress=False)
            outs.append(res.adapter_dir)
            weights.append(res.num_samples)
            epoch_seconds.append(res.metrics["seconds"])
        global_adapter = fedavg(outs, weights, work / f"s{seed}-global-r{r}")
    train_seconds = time.perf_counter() - t0

    ev = Evaluator(base)
    rows: dict[str, Path | None] = {"Base model": None}
    rows.update({f"+ LoRA ({n})": p for n, p in singles.items()})
    rows[f"Federated LoRA ({rounds} rounds)"] = global_adapter
    t1 = time.perf_counter()
    matrix = cross_dataset_matrix(ev, rows, tests)
    eval_seconds = time.perf_counter() - t1

    # Own vs. others' facts, per row and test set: where the accuracy comes from.
    split: dict[str, dict[str, list[float]]] = {}
    for label, adapter in rows.items():
        split[label] = {}
        for tname, examples in tests.items():
            preds = ev.predictions(adapter, examples)
            own = [p == m.answer for p, m in zip(preds, examples, strict=True) if fact_owner(m.id) == tname]
            oth = [p == m.answer for p, m in zip(preds, examples, strict=True) if fact_owner(m.id) != tname]
            split[label][tname] = [sum(own) / max(1, len(own)), sum(oth) / max(1, len(oth))]

    # "Best single" as in the paper's Table 3: the single-client LoRA with the highest Macro-Acc.
    best_single = max(singles, key=lambda n: matrix["rows"][f"+ LoRA ({n})"]["macro_acc"])
    single_rows = [matrix["rows"][f"+ LoRA ({n})"] for n in singles]
    fed = matrix["rows"][f"Federated LoRA ({rounds} rounds)"]
    best = matrix["rows"][f"+ LoRA ({best_single})"]
    if not quiet:
        print(render_markdown(matrix, title=f"seed {seed}"))
        print("accuracy on (own facts / others' facts) of each test set:")
        for label, d in split.items():
            cells = "  ".join(f"{t}: {100 * a:.0f}/{100 * b:.0f}" for t, (a, b) in d.items())
            print(f"  {label:<28} {cells}")
        print(f"train {train_seconds:.0f}s (max local epoch {max(epoch_seconds):.1f}s), "
              f"eval {eval_seconds:.1f}s for {len(rows)} rows")
    return {
        "seed": seed,
        "matrix": matrix,
        "own_vs_others": split,
        "best_single": best_single,
        "federated": {k: fed[k] for k in ("macro_acc", "min_acc", "h_mean")},
        "best_single_metrics": {k: best[k] for k in ("macro_acc", "min_acc", "h_mean")},
        "max_over_singles": {k: max(r[k] for r in single_rows) for k in ("macro_acc", "min_acc", "h_mean")},
        "max_local_epoch_seconds": max(epoch_seconds),
        "eval_seconds_all_rows": eval_seconds,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--json", type=Path, default=None, help="write all results here")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory(prefix="prismesh-kflow-") as tmp:
        for seed in args.seeds:
            results.append(run(seed, args.rounds, Path(tmp), args.scale, args.quiet))
    print("\nsummary (percent)           Macro-Acc  Min-Acc  H-mean")
    ok = True
    for r in results:
        f, b = r["federated"], r["best_single_metrics"]
        print(f"seed {r['seed']} best single ({r['best_single']:<10}) "
              f"{100 * b['macro_acc']:6.2f}  {100 * b['min_acc']:6.2f}  {100 * b['h_mean']:6.2f}")
        print(f"seed {r['seed']} federated                 "
              f"{100 * f['macro_acc']:6.2f}  {100 * f['min_acc']:6.2f}  {100 * f['h_mean']:6.2f}")
        m = r["max_over_singles"]
        print(f"seed {r['seed']} max over singles           "
              f"{100 * m['macro_acc']:6.2f}  {100 * m['min_acc']:6.2f}  {100 * m['h_mean']:6.2f}")
        ok &= f["min_acc"] > b["min_acc"] and f["h_mean"] > b["h_mean"]
    print("federated beats the best single LoRA on Min-Acc and H-mean for every seed:", ok)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
