"""``prismesh experiment``: the paper's protocol on the synthetic benchmark.

Rows, as in the paper's Tables 2 and 3: the base model; each single-client LoRA (trained on its
own data only, for the same number of one-epoch rounds as the federation, so its learning-rate
schedule is identical); and federated LoRA with each aggregation strategy. Every row is
evaluated on every client's test set. The federation here runs in one process through the
same trainer and the same ``Strategy`` objects the daemons use; what the chain adds (ordering,
finality, rewards, audit) is exercised by the demo and the end-to-end tests.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any


def _say(text: str) -> None:
    print(text, flush=True)


def federate(base: Path, train: dict[str, list], config: Any, strategy_name: str, rounds: int,
             work: Path, initial: Path | None = None, weights: Any = None, attack: Any = None,
             malicious: int = 0) -> tuple[Path, list[dict]]:
    """Run ``rounds`` of local training + aggregation; returns the final adapter and per-round info.

    ``weights`` is the task's ``WeightRule`` (default: sample counts, uncapped), applied exactly
    as the aggregator daemon applies it. With ``attack`` (a ``prismesh.runs.attacks.Attack``),
    ``malicious`` attackers join every round and every update passes the aggregator daemon's
    per-update checks first."""
    from prismesh.aggregator.adapters import load_adapter, save_adapter
    from prismesh.aggregator.strategies import ClientUpdate, get_strategy
    from prismesh.aggregator.weights import WeightRule
    from prismesh.node.trainer import train_lora

    rule = weights if weights is not None else WeightRule("samples")

    strategy = get_strategy(strategy_name)
    label = strategy_name if attack is None else f"{strategy_name}-{attack.kind}"
    global_dir = initial
    history = []
    for r in range(1, rounds + 1):
        updates = []
        seconds = {}
        for name, examples in train.items():
            res = train_lora(base, examples, work / f"{label}-r{r}-{name}", config,
                             init_adapter=global_dir, progress=False)
            updates.append(ClientUpdate(name, rule.weight(res.num_samples), load_adapter(res.adapter_dir)))
            seconds[name] = round(float(res.metrics.get("seconds", 0.0)), 2)
        screening: dict[str, Any] = {}
        if attack is not None:
            updates, screening = _with_attackers(base, train, config, updates, attack, malicious, global_dir,
                                                 work / f"{label}-r{r}", rule)
        glob = load_adapter(global_dir) if global_dir is not None else None
        result = strategy.aggregate(updates, glob)
        global_dir = save_adapter(result.adapter, work / f"{label}-global-r{r}")
        metrics = {k: v for k, v in result.metrics.items()
                   if k.startswith("rel_frobenius_error_") or k in ("excluded", "clip_factors")}
        history.append({"round": r, "adapter": global_dir, "train_seconds": seconds,
                        "strategy_metrics": {**metrics, **screening}})
        _say(f"      {label} round {r}: aggregated {len(updates)} updates "
             f"(slowest local epoch {max(seconds.values()):.1f} s)")
    assert global_dir is not None
    return global_dir, history


def _with_attackers(base: Path, train: dict[str, list], config: Any, updates: list, attack: Any, malicious: int,
                    global_dir: Path | None, work: Path, rule: Any) -> tuple[list, dict[str, Any]]:
    """The round's honest updates plus the attackers' (their claims bounded by the task's
    ``rule`` like everyone's), screened by the per-update checks."""
    from dataclasses import replace

    from prismesh.node.trainer import train_lora
    from prismesh.runs.attacks import checked, malicious_updates, task_checks

    def trainer(name: str, examples: list, init: Path | None) -> tuple[Path, int]:
        res = train_lora(base, examples, work / name, config, init_adapter=init, progress=False)
        return res.adapter_dir, res.num_samples

    crafted = [replace(u, num_samples=rule.weight(u.num_samples))
               for u in malicious_updates(attack, malicious, train, global_dir, len(updates), trainer)]
    expected, lora = task_checks(base, config)
    kept, rejected = checked(updates + crafted, expected, lora, attack.norm_bound, global_dir)
    return kept, {"rejected": rejected}


def single_client(base: Path, examples: list, config: Any, rounds: int, work: Path, name: str,
                  initial: Path | None) -> Path:
    from prismesh.node.trainer import train_lora

    adapter = initial
    for r in range(1, rounds + 1):
        adapter = train_lora(base, examples, work / f"single-{name}-r{r}", config, init_adapter=adapter,
                             progress=False).adapter_dir
    assert adapter is not None
    return adapter


def run_experiment(out: Path, *, seed: int = 0, scale: float = 1.0, rounds: int = 3,
                   strategies: list[str] | None = None, attack: str | None = None,
                   malicious: int = 1) -> dict[str, Any]:
    """The paper's protocol. With ``attack`` (a kind of ``prismesh.runs.attacks.ATTACKS``), every
    strategy also runs with ``malicious`` attacking hospitals added (a colluding pair counts
    two), in rows labelled ``Federated LoRA (strategy + attack xN)``; accuracy is always taken
    on the honest hospitals' test sets."""
    from prismesh.node.basemodel import ensure_base_model
    from prismesh.node.data import load_jsonl
    from prismesh.node.evaluate import Evaluator, cross_dataset_matrix, render_markdown
    from prismesh.node.synthetic import BENCHMARK_TRAIN_CONFIG, make_benchmark
    from prismesh.node.trainer import TrainConfig, create_initial_adapter

    strategies = strategies or ["fedavg", "fedavg-exact"]
    threat = None
    if attack is not None:
        from prismesh.runs.attacks import Attack

        threat = Attack(attack, seed=seed)
        malicious = max(malicious, threat.clients)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    _say("[1/4] base model and benchmark")
    base = ensure_base_model(progress=True)
    clients = make_benchmark(out / "data", seed=seed, scale=scale)
    train = {c.name: load_jsonl(c.train_path) for c in clients}
    tests = {c.name: load_jsonl(c.test_path) for c in clients}
    config = TrainConfig.from_dict({**BENCHMARK_TRAIN_CONFIG, "seed": seed, "device": "cpu"})
    rows: dict[str, Path | None] = {"Base model": None}
    history: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="prismesh-experiment-") as tmp:
        work = Path(tmp)
        initial = create_initial_adapter(base, work / "initial", config)
        _say(f"[2/4] single-client LoRA ({rounds} one-epoch rounds on own data)")
        for c in clients:
            rows[f"LoRA ({c.name} only)"] = single_client(base, train[c.name], config, rounds, work, c.name, initial)
        _say(f"[3/4] federated LoRA, {rounds} rounds: {', '.join(strategies)}")
        for name in strategies:
            final, hist = federate(base, train, config, name, rounds, work, initial)
            rows[f"Federated LoRA ({name})"] = final
            history[name] = hist
            if threat is not None:
                key = f"{name} + {threat.kind} x{malicious}"
                final, hist = federate(base, train, config, name, rounds, work, initial,
                                       attack=threat, malicious=malicious)
                rows[f"Federated LoRA ({key})"] = final
                history[key] = hist
        _say("[4/4] evaluation of every row on every client's test set")
        ev = Evaluator(base, device="cpu")
        matrix = cross_dataset_matrix(ev, rows, tests)
        per_round = {
            name: [
                {"round": h["round"], "accuracy": {c: ev.accuracy(h["adapter"], tests[c]) for c in tests},
                 "train_seconds": h["train_seconds"], "strategy_metrics": h["strategy_metrics"]}
                for h in hist
            ]
            for name, hist in history.items()
        }
    for row in matrix["rows"].values():
        row.pop("adapter", None)  # temporary paths, meaningless after the run
    results = _summarize(matrix, per_round, clients, seed, scale, rounds, time.perf_counter() - t0)
    (out / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    (out / "table2.md").write_text(render_markdown(matrix, title="Cross-dataset accuracy (paper Table 2 analogue)") + "\n")
    (out / "table3.md").write_text(render_table3(results) + "\n")
    _say(render_table3(results))
    _say(results["verdict"]["text"])
    _say(f"wrote {out / 'results.json'}, {out / 'table2.md'}, {out / 'table3.md'}")
    return results


def _summarize(matrix: dict, per_round: dict, clients: list, seed: int, scale: float, rounds: int,
               seconds: float) -> dict[str, Any]:
    rows = matrix["rows"]
    singles = {k: v for k, v in rows.items() if k.startswith("LoRA (")}
    feds = {k: v for k, v in rows.items() if k.startswith("Federated")}
    best_single = max(singles, key=lambda k: (singles[k]["h_mean"], singles[k]["min_acc"]))
    verdict = {}
    lines = []
    for k, v in feds.items():
        better = v["min_acc"] > singles[best_single]["min_acc"] and v["h_mean"] > singles[best_single]["h_mean"]
        verdict[k] = better
        lines.append(
            f"{k}: Min-Acc {v['min_acc']:.3f} vs {singles[best_single]['min_acc']:.3f}, "
            f"H-mean {v['h_mean']:.3f} vs {singles[best_single]['h_mean']:.3f} "
            f"(best single-client row: {best_single}) -> {'higher' if better else 'NOT higher'}"
        )
    return {
        "seed": seed,
        "scale": scale,
        "rounds": rounds,
        "clients": [c.to_dict() for c in clients],
        "matrix": matrix,
        "per_round": per_round,
        "best_single": best_single,
        "verdict": {"federated_beats_best_single": verdict, "text": "\n".join(lines)},
        "seconds": round(seconds, 1),
    }


def render_table3(results: dict[str, Any]) -> str:
    """Fairness across clients (paper Table 3 analogue): the base model, the best single-client
    LoRA, and every federated strategy after each round, with Macro-Acc, Min-Acc and H-mean."""
    from prismesh.node.evaluate import fairness

    rows = results["matrix"]["rows"]
    clients = [c["name"] for c in results["clients"]]
    head = "| model | " + " | ".join(clients) + " | Macro-Acc | Min-Acc | H-mean |"
    lines = ["### Per-client accuracy and fairness (paper Table 3 analogue)", "", head,
             "|" + "---|" + "---:|" * (len(clients) + 3)]

    def line(label: str, acc: dict[str, float]) -> str:
        fair = fairness(acc)
        cells = " | ".join(f"{100 * acc[c]:.1f}" for c in clients)
        return f"| {label} | {cells} | {100 * fair['macro_acc']:.1f} | {100 * fair['min_acc']:.1f} | {100 * fair['h_mean']:.1f} |"

    lines.append(line("Base model", rows["Base model"]["acc"]))
    for label, row in rows.items():
        if label.startswith("LoRA ("):
            lines.append(line(label + (" (best)" if label == results["best_single"] else ""), row["acc"]))
    for name, hist in results["per_round"].items():
        for h in hist:
            lines.append(line(f"Federated LoRA ({name}), round {h['round']}", h["accuracy"]))
    return "\n".join(lines)
