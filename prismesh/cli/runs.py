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
    p.add_argument("--sealed", action="store_true",
                   help="seal updates to the aggregator and an appointed auditor, aggregates to the members (docs/privacy.md)")
    p.add_argument("--dp-noise", type=float, default=None, metavar="SIGMA",
                   help="client-level DP at the aggregator with this noise multiplier (implies --sealed, fedavg-exact)")
    p.add_argument("--dp-clip", type=float, default=1.0, help="with --dp-noise: the ΔW norm bound (default 1)")
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
    p.add_argument("--dp-epsilon", default=None, metavar="EPS,...",
                   help="instead: the accuracy cost of DP at these ε (δ = 1e-5) against no DP, e.g. 1,4,8 (docs/privacy.md)")
    p.add_argument("--dp-level", choices=("sample", "client"), default="sample",
                   help="with --dp-epsilon: DP-SGD per patient record (sample) or per hospital at the aggregator (client)")
    p.add_argument("--seeds", default=None, help="with --dp-epsilon: comma-separated seeds (default: --seed)")
    p.add_argument("--dp-batch", type=int, default=None,
                   help="with --dp-level sample: DP-SGD's logical batch (default: the benchmark's batch x accumulation)")
    p.add_argument("--dp-lr", type=float, default=None, help="with --dp-level sample: DP-SGD's learning rate")
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
             baselines=not args.no_baselines, plots=not args.no_plots, chain=args.chain,
             sealed=args.sealed, dp_noise=args.dp_noise, dp_clip=args.dp_clip, observer=observer)
    return 0


def _experiment(args: argparse.Namespace) -> int:
    from prismesh.cli.output import configure_output

    configure_output(args.verbose)
    if args.dp_epsilon is not None:
        return _dp_experiment(args)
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


def _dp_experiment(args: argparse.Namespace) -> int:
    from prismesh.cli.errors import UsageError
    from prismesh.runs.privacy_experiment import run_privacy_experiment

    try:
        epsilons = [float(x) for x in args.dp_epsilon.split(",") if x.strip()]
        seeds = [int(x) for x in args.seeds.split(",") if x.strip()] if args.seeds else [args.seed]
    except ValueError as exc:
        raise UsageError(f"--dp-epsilon takes numbers and --seeds integers, comma-separated: {exc}") from None
    if not epsilons or any(e <= 0 for e in epsilons):
        raise UsageError("--dp-epsilon needs at least one ε > 0")
    if args.dp_batch is not None and args.dp_batch < 1:
        raise UsageError("--dp-batch must be >= 1")
    run_privacy_experiment(args.out, seeds=seeds, epsilons=epsilons, level=args.dp_level, scale=args.scale,
                           rounds=args.rounds, dp_batch=args.dp_batch, dp_lr=args.dp_lr)
    return 0
