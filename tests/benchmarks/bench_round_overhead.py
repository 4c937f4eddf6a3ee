"""Federation overhead beside a plain loop doing the same learning, measured in one run.

Two child processes, one after the other: the demo's federated work (``run_demo`` on anvil with
its HotStuff committee, contracts, store, three node daemons and the Ray-backed aggregator),
then a plain Python loop doing the same learning with the same functions and seeds: each client
trains in turn from the global adapter (``train_lora``), the task's strategy merges the updates
with the task's weights, each client evaluates the aggregate on its test set. Overhead is wall
time minus the clients' own training time (the trainer's measured seconds). Printed: overhead
per round over all rounds and over rounds 2+, both sides and their ratio; start-up (process
start to round 1); peak PSS of each side's whole process tree (``/proc/*/smaps_rollup``); and
whether the aggregates' CIDs and the accuracies match.

    OMP_NUM_THREADS=1 python -m tests.benchmarks.bench_round_overhead [--rounds 3] [--scale 1] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

# The federation's own parts of a round's overhead; evaluation and "other" (which holds the
# trainer's model loading) are on both sides.
OWN_PARTS = ("chain", "finality", "storage", "aggregation")
TARGETS = {"all_rounds": 1.5, "rounds_2plus": 1.1, "startup_vs_plain": 3.0, "startup_seconds": 25.0, "memory": 1.3}


# ---------------------------------------------------------------------------- process tree memory


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        kids.setdefault(ppid, []).append(int(entry))
    return kids


def tree_pss_kib(root: int) -> int:
    """Proportional set size of ``root`` and all its descendants, in KiB."""
    kids, todo, total = _children(), [root], 0
    while todo:
        pid = todo.pop()
        todo.extend(kids.get(pid, []))
        try:
            with open(f"/proc/{pid}/smaps_rollup") as fh:
                for line in fh:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            continue
    return total


def run_side(side: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Run one side in a child process; its result and the peak PSS of its process tree."""
    result = work / f"{side}.json"
    log = work / f"{side}.log"
    cmd = [sys.executable, "-m", "tests.benchmarks.bench_round_overhead", "--side", side,
           "--rounds", str(args.rounds), "--scale", str(args.scale), "--seed", str(args.seed),
           "--work", str(work), "--spawned", repr(time.time())]
    peak = 0
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        done = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not done.wait(0.25):
                peak = max(peak, tree_pss_kib(proc.pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        rc = proc.wait()
        done.set()
        sampler.join()
    if rc != 0:
        raise SystemExit(f"the {side} side failed (exit {rc}); see {log}:\n" + log.read_text()[-3000:])
    data = json.loads(result.read_text())
    data["peak_pss_mib"] = peak / 1024
    return data


# ---------------------------------------------------------------------------- the two sides


def federated_side(args: argparse.Namespace, spawned: float) -> dict[str, Any]:
    """The demo's rows, each round's evaluation moved into that round's row (the sites score an
    aggregate after the row that produced it closes), as the plain loop counts it."""
    from prismesh.runs.accounting import evaluation_with_its_round
    from prismesh.runs.demo import run_demo

    called = time.time()
    report = run_demo(Path(args.work) / "federated", seed=args.seed, scale=args.scale, rounds=args.rounds,
                      baselines=False, plots=False, chain="anvil")
    rows = report["timing"]["rows"]
    return {
        "startup_seconds": (called - spawned) + rows[0]["wall_seconds"],
        "rows": evaluation_with_its_round(rows[1:]),
        "cids": [r["aggregate_cid"] for r in report["rounds"]],
        "accuracy": [r["accuracy"] for r in report["rounds"]],
    }


def plain_side(args: argparse.Namespace, spawned: float) -> dict[str, Any]:
    """The same learning as the demo's federation, in a loop: same functions, data, seeds."""
    from prismesh.aggregator.adapters import load_adapter, save_adapter
    from prismesh.aggregator.daemon import aggregation_base
    from prismesh.aggregator.strategies import ClientUpdate, get_strategy
    from prismesh.aggregator.weights import WeightRule
    from prismesh.chain.evm.devnet import dev_accounts
    from prismesh.chain.storage import cid_of_path
    from prismesh.node.basemodel import ensure_base_model
    from prismesh.node.data import load_jsonl
    from prismesh.node.evaluate import Evaluator
    from prismesh.node.synthetic import make_benchmark
    from prismesh.node.trainer import TrainConfig, create_initial_adapter, train_lora
    from prismesh.runs.accounting import Ledger, rounded
    from prismesh.runs.demo import build_spec
    from prismesh.runs.federation import FIRST_CLIENT, TaskSettings

    work = Path(args.work) / "plain"
    base = ensure_base_model(progress=False)
    clients = make_benchmark(work / "data", seed=args.seed, scale=args.scale)
    spec = build_spec(base, args.seed, "fedavg")
    cfg = TrainConfig.from_dict({**spec.train_config(), "device": "cpu"})
    initial = create_initial_adapter(base, work / "initial-adapter", cfg, base_model_name=spec.base_model_id)
    # The federation's clients are devnet accounts; the aggregator orders updates by address.
    address = {c.name: dev_accounts()[FIRST_CLIENT + i].address for i, c in enumerate(clients)}
    rule = WeightRule("samples", TaskSettings().sample_cap)
    strategy = get_strategy(spec.strategy, **spec.strategy_options)
    data = {c.name: (load_jsonl(c.train_path), load_jsonl(c.test_path)) for c in clients}
    evaluator = None
    ledger = Ledger()
    started = time.time()
    rows, dirs, accuracy = [], [], []
    global_dir = initial
    for r in range(1, args.rounds + 1):
        updates, training = [], 0.0
        for c in clients:
            with ledger.part("training"):
                res = train_lora(base, data[c.name][0], work / f"r{r}-{c.name}", cfg, init_adapter=global_dir,
                                 progress=False, base_model_name=spec.base_model_id)
            training += float(res.metrics.get("seconds", 0.0))
            updates.append(ClientUpdate(address[c.name], rule.weight(min(int(res.num_samples), rule.sample_cap)),
                                        load_adapter(res.adapter_dir)))
        with ledger.part("aggregation"):
            updates.sort(key=lambda u: u.client)
            result = strategy.aggregate(updates, aggregation_base(spec, load_adapter(global_dir)))
            global_dir = save_adapter(result.adapter, work / f"aggregate-r{r}")
        with ledger.part("evaluation"):
            if evaluator is None:
                evaluator = Evaluator(base, device="cpu")
            # Scored as the nodes score their reports: with the task's metric scoring.
            accuracy.append({c.name: evaluator.accuracy(global_dir, data[c.name][1], scoring=spec.metric_scoring)
                             for c in clients})
        dirs.append(global_dir)
        rows.append(rounded(ledger.cut(f"round {r}", training=training)))
    return {
        "startup_seconds": started - spawned,
        "rows": rows,
        "cids": [cid_of_path(d) for d in dirs],
        "accuracy": accuracy,
    }


# ---------------------------------------------------------------------------- figures


def overheads(rows: list[dict[str, Any]], rounds: int) -> tuple[float, float]:
    """Overhead per round over all rounds and over rounds 2+ (a tail row after the last round
    counts with the last round: it holds that round's evaluation)."""
    def per_round(selected: list[dict[str, Any]], n: int) -> float:
        return sum(r["wall_seconds"] - r["training_seconds"] for r in selected) / n

    later = [r for r in rows if r["row"] != "round 1"]
    return per_round(rows, rounds), per_round(later, rounds - 1) if rounds > 1 else float("nan")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeat", type=int, default=1, help="runs of each side (medians are printed)")
    p.add_argument("--side", choices=("federated", "plain"), help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--spawned", type=float, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.rounds < 2:
        p.error("--rounds must be at least 2 (rounds 2+ are reported separately)")
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
    if args.side:
        side = federated_side if args.side == "federated" else plain_side
        result = side(args, args.spawned)
        (Path(args.work) / f"{args.side}.json").write_text(json.dumps(result, indent=1))
        return 0

    runs: dict[str, list[dict[str, Any]]] = {"federated": [], "plain": []}
    with tempfile.TemporaryDirectory(prefix="bench-overhead-") as tmp:
        args.work = tmp
        print(f"load before: {os.getloadavg()[0]:.2f} (1 min), OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}",
              flush=True)
        for i in range(args.repeat):
            # Alternate which side goes first, so a drifting load favours neither.
            for side in ("federated", "plain") if i % 2 == 0 else ("plain", "federated"):
                runs[side].append(run_side(side, args, Path(tmp)))
                print(f"  run {i + 1} {side}: done, load {os.getloadavg()[0]:.2f}", flush=True)
        print(f"load after: {os.getloadavg()[0]:.2f} (1 min)")
    figures = {side: [_figures(r, args.rounds) for r in results] for side, results in runs.items()}
    med = {side: {k: statistics.median(f[k] for f in figs) for k in figs[0]} for side, figs in figures.items()}
    fed, plain = med["federated"], med["plain"]
    matches = [f["cids"] == q["cids"] and _same_accuracy(f["accuracy"], q["accuracy"])
               for f in runs["federated"] for q in runs["plain"]]
    label = "median of " + str(args.repeat) if args.repeat > 1 else "one run"
    print(f"\n{args.rounds} rounds, scale {args.scale}, seed {args.seed}, {label} each")
    print("| | federated (demo) | plain loop | ratio | target |")
    print("|---|---:|---:|---:|---:|")
    rows = (
        ("overhead per round, all rounds (s)", "all", "{:.2f}", f"≤ {TARGETS['all_rounds']}x"),
        ("overhead per round, rounds 2+ (s)", "later", "{:.2f}", f"≤ {TARGETS['rounds_2plus']}x"),
        ("start-up to round 1 (s)", "startup", "{:.1f}",
         f"≤ {TARGETS['startup_seconds']:.0f} s, aim {TARGETS['startup_vs_plain']}x"),
        ("peak PSS of the process tree (MiB)", "pss", "{:.0f}", f"≤ {TARGETS['memory']}x"),
        ("clients' training, all rounds (s)", "training", "{:.2f}", ""),
    )
    for title, key, fmt, target in rows:
        ratio = f"{fed[key] / plain[key]:.2f}x" if plain[key] else "–"
        print(f"| {title} | {fmt.format(fed[key])} | {fmt.format(plain[key])} | {ratio} | {target} |")
    print(f"\nrounds 2+, per round (s), {label}:")
    print("| | federated (demo) | plain loop |")
    print("|---|---:|---:|")
    print(f"| chain + finality + storage + aggregation | {fed['own']:.2f} | {plain['own']:.2f} |")
    print(f"| other (daemons' own work; the trainer's model loading) | {fed['other']:.2f} | {plain['other']:.2f} |")
    print(f"| evaluation (the same work on both sides) | {fed['evaluation']:.2f} | {plain['evaluation']:.2f} |")
    print(f"rounds 2+ with the plain loop's evaluation time on both sides: {steady_ratio(fed, plain):.2f}x "
          f"(the shared evaluation's run-to-run spread taken out)")
    for name, side in (("federated", runs["federated"][-1]), ("plain loop", runs["plain"][-1])):
        print(f"\n{name} rows of the last run (overhead split, s):")
        for r in side["rows"]:
            split = ", ".join(f"{k} {v:.2f}" for k, v in r["overhead"].items() if v or k == "other")
            print(f"  {r['row']:<8} wall {r['wall_seconds']:.2f}, training {r['training_seconds']:.2f}: {split}")
    print(f"\naggregate CIDs match: {all(matches)} ({', '.join(runs['federated'][-1]['cids'])})")
    print(f"accuracies match to 4 decimals: {all(matches)}")
    return 0 if all(matches) else 1


def _figures(result: dict[str, Any], rounds: int) -> dict[str, float]:
    all_rounds, later = overheads(result["rows"], rounds)
    steady = [r for r in result["rows"] if r["row"] != "round 1"]

    def per_round(parts: tuple[str, ...]) -> float:
        return sum(r["overhead"].get(k, 0.0) for r in steady for k in parts) / max(1, rounds - 1)

    return {
        "all": all_rounds,
        "later": later,
        "startup": result["startup_seconds"],
        "pss": result["peak_pss_mib"],
        "training": sum(r["training_seconds"] for r in result["rows"]),
        "own": per_round(OWN_PARTS),
        "evaluation": per_round(("evaluation",)),
        "other": per_round(("other",)),
    }


def steady_ratio(fed: dict[str, float], plain: dict[str, float]) -> float:
    """Rounds 2+ with the plain loop's evaluation time on both sides: the evaluation is the same
    work, and on a shared machine it varies between runs by more than the federation costs."""
    same = plain["evaluation"]
    return (same + fed["own"] + fed["other"]) / (same + plain["own"] + plain["other"])


def _same_accuracy(a: list[dict[str, float]], b: list[dict[str, float]]) -> bool:
    return len(a) == len(b) and all(
        set(x) == set(y) and all(round(x[k], 4) == round(y[k], 4) for k in y) for x, y in zip(a, b, strict=True)
    )


if __name__ == "__main__":
    raise SystemExit(main())
