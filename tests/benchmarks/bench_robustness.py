"""The robustness table: every attack of the harness × every strategy, with the honest row.

    OMP_NUM_THREADS=1 .venv/bin/python -m tests.benchmarks.bench_robustness [--seeds 0 1 2] \
        [--strategies fedavg fedavg-exact ...] [--attacks sign-flip noise ...] [--out out/robustness]

One cell is three federated rounds on the synthetic benchmark of the day (``make_benchmark``,
its ``BENCHMARK_TRAIN_CONFIG``, the offline stand-in base model): the honest hospitals plus one
malicious hospital (a colluding pair is two) doing one of ``prismesh.runs.attacks.ATTACKS``,
every update checked as the aggregator daemon checks it, merged by the strategy; the final
global is evaluated on the honest hospitals' test sets. Prints each cell as it finishes and then
the table (Min-Acc / H-mean, mean over seeds, the gap of each cell's Min-Acc to the strategy's
honest row, † where an attacker was included in some round), and writes ``results.json`` (every
cell of every seed, with who was rejected, excluded and clipped each round) and ``table.md``.
Strategies take options as ``name:key=value,...``. About 20-60 s per cell on 2 cores.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from prismesh.cli.output import configure_output
    from prismesh.runs.attacks import ATTACKS
    from prismesh.runs.robustness import DEFAULT_STRATEGIES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--strategies", nargs="+", default=list(DEFAULT_STRATEGIES))
    parser.add_argument("--attacks", nargs="*", default=list(ATTACKS), choices=list(ATTACKS))
    parser.add_argument("--malicious", type=int, default=1, help="attackers per cell (a colluding pair is at least 2)")
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("out/robustness"))
    args = parser.parse_args(argv)
    configure_output(False)
    from prismesh.runs.robustness import run_table

    t0 = time.perf_counter()
    run_table(args.out, seeds=args.seeds, attacks=args.attacks, strategies=args.strategies,
              malicious=args.malicious, scale=args.scale, rounds=args.rounds)
    print(f"\n{time.perf_counter() - t0:.0f} s; wrote {args.out / 'results.json'} and {args.out / 'table.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
