"""The robustness benchmark: every attack of the harness against every strategy, over seeds.

One cell is a whole federated run on the synthetic benchmark: the honest hospitals plus the
malicious ones, each round's updates checked as the aggregator daemon checks them
(``verify_adapter`` against the round's global adapter, the task's norm bound), merged by the
strategy, and the final global evaluated on the honest hospitals' test sets (Min-Acc, H-mean).
The honest row runs the honest hospitals alone. Local training is deterministic, so a
hospital's training from a given global adapter is done once and shared by every cell that
needs it (all cells share round 1).
"""

from __future__ import annotations

import hashlib
import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from prismesh.runs.attacks import ATTACKS, Attack, checked, malicious_updates, task_checks

DEFAULT_STRATEGIES = (
    "fedavg", "fedavg-exact", "median", "trimmed-mean", "clipped-fedavg", "multi-krum", "geomedian",
)
HONEST = "honest"
DEFAULT_NORM_BOUND = 1.0e4  # the task spec's default


def parse_strategy(text: str) -> tuple[str, dict[str, Any]]:
    """``"name"`` or ``"name:key=value,key=value"`` (values read as JSON where they parse)."""
    name, _, rest = text.partition(":")
    options: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"strategy option {item!r} in {text!r} is not key=value")
        try:
            options[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            options[key.strip()] = value
    return name.strip(), options


class TrainingCache:
    """Local training memoised on (who trains, the starting adapter's bytes): training is
    deterministic on CPU, so the same hospital from the same global gives the same adapter."""

    def __init__(self, base: Path, config: Any, root: Path) -> None:
        self.base, self.config, self.root = Path(base), config, Path(root)
        self.done: dict[str, tuple[Path, int]] = {}
        self.trained = 0

    def train(self, label: str, examples: list, init: Path | None) -> tuple[Path, int]:
        from prismesh.node.trainer import train_lora

        h = hashlib.sha256(label.encode())
        if init is not None:
            for name in ("adapter_config.json", "adapter_model.safetensors"):
                h.update((Path(init) / name).read_bytes())
        key = f"{label}-{h.hexdigest()[:16]}"
        if key not in self.done:
            res = train_lora(self.base, examples, self.root / key, self.config, init_adapter=init, progress=False)
            self.done[key] = (res.adapter_dir, int(res.num_samples))
            self.trained += 1
        return self.done[key]


@dataclass
class Setup:
    """One seed's shared inputs: base model, honest data, the initial adapter, the checks."""

    seed: int
    base: Path
    train: dict[str, list]
    tests: dict[str, list]
    config: Any
    initial: Path
    lora: dict[str, Any]
    expected: dict[str, tuple[int, ...]]
    evaluator: Any
    cache: TrainingCache
    work: Path
    norm_bound: float = DEFAULT_NORM_BOUND
    attacker_sets: dict[tuple[bool, int], list] = field(default_factory=dict)


def make_setup(
    work: Path, seed: int, scale: float, norm_bound: float = DEFAULT_NORM_BOUND, base: Path | None = None
) -> Setup:
    """The benchmark of the day for ``seed``: the synthetic clients and the offline stand-in base
    model (or ``base``, any model directory whose tokenizer covers the benchmark)."""
    from prismesh.node.basemodel import ensure_base_model
    from prismesh.node.data import load_jsonl
    from prismesh.node.evaluate import Evaluator
    from prismesh.node.synthetic import BENCHMARK_TRAIN_CONFIG, make_benchmark
    from prismesh.node.trainer import TrainConfig, create_initial_adapter

    work = Path(work)
    base = Path(base) if base is not None else ensure_base_model(progress=False)
    clients = make_benchmark(work / "data", seed=seed, scale=scale)
    config = TrainConfig.from_dict({**BENCHMARK_TRAIN_CONFIG, "seed": seed, "device": "cpu"})
    initial = create_initial_adapter(base, work / "initial", config)
    expected, lora = task_checks(base, config)
    return Setup(
        seed=seed,
        base=base,
        train={c.name: load_jsonl(c.train_path) for c in clients},
        tests={c.name: load_jsonl(c.test_path) for c in clients},
        config=config,
        initial=initial,
        lora=lora,
        expected=expected,
        evaluator=Evaluator(base, device="cpu"),
        cache=TrainingCache(base, config, work / "trained"),
        work=work,
        norm_bound=norm_bound,
    )


def round_updates(
    setup: Setup, glob_dir: Path, attack: Attack | None, malicious: int
) -> list[Any]:
    """Every hospital's update for a round starting from ``glob_dir``: the honest ones' trained
    adapters, then ``malicious`` attackers' crafted ones (ids ``malicious-1``, ...)."""
    from prismesh.aggregator.adapters import load_adapter
    from prismesh.aggregator.strategies import ClientUpdate

    updates = []
    for name in sorted(setup.train):
        path, n = setup.cache.train(name, setup.train[name], glob_dir)
        updates.append(ClientUpdate(name, n, load_adapter(path)))
    if attack is None or malicious <= 0:
        return updates
    attack = replace(attack, norm_bound=setup.norm_bound)
    return updates + malicious_updates(
        attack, malicious, setup.train, glob_dir, len(updates), setup.cache.train, setup.attacker_sets
    )


def run_cell(
    setup: Setup, strategy: str, attack: Attack | None, malicious: int, rounds: int, evaluate: bool = True
) -> dict[str, Any]:
    """One federated run: ``rounds`` rounds of checks + ``strategy``; the final global (its
    directory is ``"final"``) evaluated on every honest hospital's test set unless ``evaluate``
    is off."""
    from prismesh.aggregator.adapters import load_adapter, save_adapter
    from prismesh.aggregator.strategies import get_strategy
    from prismesh.node.evaluate import fairness

    name, options = parse_strategy(strategy)
    rule = get_strategy(name, **options)
    tag = hashlib.sha256(f"{strategy}/{attack}/{malicious}".encode()).hexdigest()[:12]
    glob_dir = setup.initial
    history = []
    for r in range(1, rounds + 1):
        glob = load_adapter(glob_dir)
        updates = round_updates(setup, glob_dir, attack, malicious)
        verified, rejected = checked(updates, setup.expected, setup.lora, setup.norm_bound, glob_dir)
        result = rule.aggregate(verified, glob)
        excluded = result.metrics.get("excluded", {})
        included = sorted(u.client for u in verified if u.client not in excluded)
        glob_dir = save_adapter(result.adapter, setup.work / "globals" / f"{tag}-r{r}")
        history.append({
            "round": r,
            "included": included,
            "rejected": rejected,
            "excluded": excluded,
            "clip_factors": result.metrics.get("clip_factors", {}),
            "coefficients": result.metrics.get("coefficients", result.metrics.get("weights", {})),
        })
    acc = {c: setup.evaluator.accuracy(glob_dir, setup.tests[c]) for c in sorted(setup.tests)} if evaluate else {}
    fair = fairness(acc) if evaluate else {"min_acc": None, "h_mean": None, "macro_acc": None}
    return {
        "final": str(glob_dir),
        "seed": setup.seed,
        "strategy": strategy,
        "attack": attack.kind if attack is not None else HONEST,
        "malicious": malicious if attack is not None else 0,
        "accuracy": acc,
        "min_acc": fair["min_acc"],
        "h_mean": fair["h_mean"],
        "macro_acc": fair["macro_acc"],
        "malicious_rounds_included": sum(
            any(c.startswith("malicious-") for c in h["included"]) for h in history
        ),
        "rounds": history,
    }


def run_table(
    out: Path,
    *,
    seeds: Sequence[int] = (0, 1, 2),
    attacks: Sequence[str] = tuple(ATTACKS),
    strategies: Sequence[str] = DEFAULT_STRATEGIES,
    malicious: int = 1,
    scale: float = 1.0,
    rounds: int = 3,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Every (attack or honest) × strategy cell for every seed; writes ``results.json`` and
    ``table.md`` under ``out`` (results so far are rewritten after each cell)."""
    import tempfile

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for a in attacks:
        if a not in ATTACKS:
            raise ValueError(f"unknown attack {a!r}; known: {', '.join(ATTACKS)}")
    cells: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for seed in seeds:
        with tempfile.TemporaryDirectory(prefix=f"prismesh-robustness-{seed}-") as tmp:
            setup = make_setup(Path(tmp), seed, scale)
            rows: list[tuple[str, Attack | None]] = [(HONEST, None)]
            rows += [(a, Attack(a, seed=seed)) for a in attacks]
            for label, attack in rows:
                for strategy in strategies:
                    n_bad = 0 if attack is None else max(malicious, attack.clients)
                    cell = run_cell(setup, strategy, attack, n_bad, rounds)
                    cells.append(cell)
                    say(f"seed {seed} {label:<20} {strategy:<28} Min-Acc {100 * cell['min_acc']:5.1f} "
                        f"H-mean {100 * cell['h_mean']:5.1f} attacker included in "
                        f"{cell['malicious_rounds_included']}/{rounds} rounds  "
                        f"({time.perf_counter() - t0:.0f} s, {setup.cache.trained} trainings)")
                    results = {"seeds": list(seeds), "scale": scale, "rounds": rounds, "malicious": malicious,
                               "strategies": list(strategies), "attacks": [HONEST, *attacks], "cells": cells}
                    (out / "results.json").write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    table = render_table(results)
    (out / "table.md").write_text(table + "\n")
    say(table)
    return results


def render_table(results: dict[str, Any]) -> str:
    """Markdown: one row per attack (honest first), one column per strategy; each cell is the
    mean over seeds of Min-Acc / H-mean (%) and, under attack, the Min-Acc gap to the same
    strategy's honest row; ``†`` marks cells where an attacker was included in some round."""
    by: dict[tuple[str, str], list[dict]] = {}
    for c in results["cells"]:
        by.setdefault((c["attack"], c["strategy"]), []).append(c)
    strategies, attacks = results["strategies"], results["attacks"]
    seeds = sorted({c["seed"] for c in results["cells"]})
    lines = [
        f"Min-Acc / H-mean (%), mean over seeds {', '.join(map(str, seeds))}; in brackets the Min-Acc gap "
        f"to the strategy's honest row; † an attacker was included (paid) in at least one round. "
        f"{results['rounds']} rounds, scale {results['scale']}, {results['malicious']} malicious "
        f"(a colluding pair is 2).",
        "",
        "| attack | " + " | ".join(strategies) + " |",
        "|---|" + "---|" * len(strategies),
    ]
    honest = {s: statistics.mean(c["min_acc"] for c in by.get((HONEST, s), [])) for s in strategies if by.get((HONEST, s))}
    for a in attacks:
        cells = []
        for s in strategies:
            got = by.get((a, s))
            if not got:
                cells.append("")
                continue
            mn = 100 * statistics.mean(c["min_acc"] for c in got)
            hm = 100 * statistics.mean(c["h_mean"] for c in got)
            text = f"{mn:.1f} / {hm:.1f}"
            if a != HONEST and s in honest:
                text += f" ({mn - 100 * honest[s]:+.1f})"
            if any(c["malicious_rounds_included"] for c in got):
                text += " †"
            cells.append(text)
        lines.append(f"| {a} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
