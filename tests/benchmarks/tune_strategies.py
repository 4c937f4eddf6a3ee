"""Choose strategy settings on the validation split: federations only, no baselines.

Every configuration runs the federation for ``--rounds`` one-epoch rounds on one benchmark seed
and is scored on the clients' **validation** files after every round (Min-Acc / H-mean, and at the
end each client's own- and shared-knowledge accuracy), so settings are chosen without touching
a test file. The reported seeds of ``prismesh experiment`` are never used here.

    .venv/bin/python -m tests.benchmarks.tune_strategies --seed 101 --rounds 10 \\
        --strategy 'u2={"strategy": "fedavgm", "inner": "fairavg", "lr": 2.0, "momentum": 0.0}' ...

Each configuration costs ``rounds`` passes over all clients' training data: minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=101)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--strategy", action="append", default=[], metavar="LABEL=JSON")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", type=Path, default=None, help="append one JSON line per configuration here")
    args = ap.parse_args()

    from transformers.utils import logging as hf_logging

    from prismesh.aggregator.strategies import client_settings, get_strategy
    from prismesh.node.basemodel import ensure_base_model
    from prismesh.node.evaluate import Evaluator
    from prismesh.node.synthetic import (
        BENCHMARK_SCORING,
        BENCHMARK_TRAIN_CONFIG,
        load_split,
        make_benchmark,
    )
    from prismesh.node.trainer import TrainConfig, create_initial_adapter
    from prismesh.runs.experiment import _fair, federate, part_acc, score

    hf_logging.disable_progress_bar()
    train_cfg = dict(BENCHMARK_TRAIN_CONFIG)
    for item in args.set:
        key, _, raw = item.partition("=")
        train_cfg[key] = json.loads(raw)
    base = ensure_base_model()
    with tempfile.TemporaryDirectory(prefix="prismesh-tune-") as tmp:
        work = Path(tmp)
        specs = make_benchmark(work / "data", seed=args.seed)
        train = {s.name: load_split(s, "train") for s in specs}
        val = {s.name: load_split(s, "val") for s in specs}
        config = TrainConfig.from_dict({**train_cfg, "seed": args.seed, "device": "cpu"})
        initial = create_initial_adapter(base, work / "initial", config)
        ev = Evaluator(base, device="cpu", max_length=config.max_length, scoring=BENCHMARK_SCORING)
        for item in args.strategy:
            label, _, raw = item.partition("=")
            spec = json.loads(raw)
            options = {k: v for k, v in spec.items() if k != "strategy"}
            extra = client_settings(spec["strategy"], options)
            cfg = TrainConfig.from_dict({**config.to_dict(), **extra}) if extra else config
            curve: list[dict] = []
            t0 = time.perf_counter()

            def on_round(r: int, adapter: Path, curve=curve) -> None:
                curve.append(score(ev, adapter, val, (BENCHMARK_SCORING,))[BENCHMARK_SCORING])

            federate(base, train, cfg, get_strategy(spec["strategy"], **options), args.rounds, work, initial,
                     on_round, label)
            last = curve[-1]
            names = list(val)
            row = {
                "label": label, "spec": spec, "seed": args.seed, "rounds": args.rounds, "train": train_cfg,
                "curve_h_mean": [round(_fair(p)["h_mean"], 4) for p in curve],
                "curve_min_acc": [round(_fair(p)["min_acc"], 4) for p in curve],
                "own": {c: part_acc(last[c], [c]) for c in names},
                "shared": {c: part_acc(last[c], [o for o in names if o != c]) for c in names},
                "seconds": round(time.perf_counter() - t0, 1),
            }
            print(f"{label:12s} final Min {100 * row['curve_min_acc'][-1]:.1f} H {100 * row['curve_h_mean'][-1]:.1f} | "
                  f"own {' '.join(f'{100 * v:.0f}' for v in row['own'].values())} | "
                  f"shared {' '.join(f'{100 * v:.0f}' for v in row['shared'].values())} | "
                  f"H by round {' '.join(f'{100 * h:.0f}' for h in row['curve_h_mean'])}", flush=True)
            if args.out is not None:
                with args.out.open("a") as fh:
                    fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
