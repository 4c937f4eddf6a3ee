"""``prismesh demo | experiment``: whole-system runs on one machine."""

from __future__ import annotations

import argparse
from pathlib import Path

from prismesh.cli.errors import UsageError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="three hospitals, three federated rounds, on a devnet with its finality committee",
        description="Three hospitals, an aggregator, the contracts and a HotStuff committee on a "
        "local anvil, three federated rounds on the synthetic benchmark, then a report read back "
        "from the chain. The chain's state is kept under OUT/run/chain, so `prismesh audit --out "
        "OUT` and `prismesh govern status --out OUT` work after the demo has exited.",
    )
    p.add_argument("--out", type=Path, default=Path("out/demo"), help="report directory (default out/demo)")
    p.add_argument("--seed", type=int, default=0, help="benchmark, model and training seed (default 0)")
    p.add_argument("--scale", type=float, default=1.0, help="benchmark size multiplier")
    p.add_argument("--rounds", type=int, default=3, help="federated rounds (default 3, as in the paper)")
    p.add_argument("--strategy", default="fedavg", help="aggregation strategy (`prismesh strategies` lists them)")
    p.add_argument("--chain", choices=("anvil", "embedded"), default="anvil",
                   help="anvil (default; its state is kept in OUT) or the in-process py-evm chain (gone at exit)")
    p.add_argument("--no-baselines", action="store_true", help="skip base/single-client baselines")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true", help="log every daemon step; keep the libraries' own output")
    p.add_argument("--dashboard", action="store_true",
                   help="open the consortium dashboard on the demo's chain and store while it runs (and after, "
                   "until Ctrl-C)")
    p.add_argument("--dashboard-port", type=int, default=8000, help="its port on 127.0.0.1 (default 8000; 0 picks one)")
    p.set_defaults(func=_demo)

    p = sub.add_parser("experiment", help="the paper's protocol on the synthetic benchmark (Tables 2 and 3)")
    p.add_argument("--out", type=Path, default=Path("out/experiment"), help="results directory (default out/experiment)")
    p.add_argument("--seed", type=int, default=0, help="benchmark, model and training seed (default 0)")
    p.add_argument("--scale", type=float, default=1.0, help="benchmark size multiplier")
    p.add_argument("--rounds", type=int, default=3, help="rounds of one local epoch (default 3)")
    p.add_argument("--strategies", default="fedavg,fedavg-exact", help="comma-separated strategies to compare")
    p.add_argument("--attack", default=None, metavar="KIND",
                   help="also run every strategy with malicious hospitals: sign-flip, noise, wrong-answers, "
                        "boosted-replacement, inflated-count, free-rider or collude (docs/robustness.md)")
    p.add_argument("--malicious", type=int, default=1, metavar="N",
                   help="how many malicious hospitals join (default 1; collude takes at least 2)")
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=_experiment)


def _demo(args: argparse.Namespace) -> int:
    observer = None
    if args.dashboard:
        from prismesh.cli.dashboard import demo_observer

        if args.chain != "anvil":
            raise UsageError("--dashboard needs --chain anvil: the embedded chain can only be read from the demo's own thread")
        observer = demo_observer(args.dashboard_port)
    from prismesh.cli.output import configure_output

    configure_output(args.verbose)
    from prismesh.runs.demo import run_demo

    run_demo(args.out, seed=args.seed, scale=args.scale, rounds=args.rounds, strategy=args.strategy,
             baselines=not args.no_baselines, plots=not args.no_plots, chain=args.chain, observer=observer)
    return 0


def _experiment(args: argparse.Namespace) -> int:
    from prismesh.cli.output import configure_output

    configure_output(args.verbose)
    from prismesh.runs.experiment import run_experiment

    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    if args.attack is not None:
        from prismesh.runs.attacks import ATTACKS

        if args.attack not in ATTACKS:
            raise UsageError(f"--attack {args.attack!r} is not an attack; choose from {', '.join(ATTACKS)}")
        if args.malicious < 1:
            raise UsageError(f"--malicious must be at least 1, got {args.malicious}")
    elif args.malicious != 1:
        raise UsageError("--malicious needs --attack KIND")
    run_experiment(args.out, seed=args.seed, scale=args.scale, rounds=args.rounds, strategies=strategies,
                   attack=args.attack, malicious=args.malicious)
    return 0
