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
    p.add_argument("--strategy", default="fedavg",
                   help="aggregation strategy (`prismesh strategies` lists them), or an experiment configuration "
                        "with its options (default, fedavgm, fedprox, fairavg ...)")
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

    p = sub.add_parser(
        "experiment",
        help="the paper's protocol with pooled upper bound, seeds and intervals, strategies, new-site adaptation",
        description="Base model, single-client LoRAs, pooled-data LoRA and federated LoRA per strategy, over "
        "several seeds, with curves over rounds, 95%% intervals, the gap closed and new-site adaptation. "
        "Default: the offline stand-in model on the synthetic benchmark; --base-model and --data run the "
        "same protocol on a real checkpoint and MedQA/MedMCQA JSONL files.",
    )
    p.add_argument("--out", type=Path, default=Path("out/experiment"), help="results directory (default out/experiment)")
    p.add_argument("--preset", choices=("synthetic", "paper"), default="synthetic",
                   help="synthetic: the stand-in's tuned settings (default); paper: seed paper Table 1")
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default 0,1,2,3,4)")
    p.add_argument("--seed", type=int, default=None, help="one seed (same as --seeds S)")
    p.add_argument("--rounds", type=int, default=None, help="budget of one-epoch rounds (default: the preset's)")
    p.add_argument("--strategies", default=None,
                   help="comma-separated strategy configurations: " + ", ".join(_strategy_names()) + " (default: the preset's)")
    p.add_argument("--strategy", action="append", default=[], metavar='LABEL=JSON',
                   help='an extra configuration, e.g. m3=\'{"strategy": "fedavgm", "lr": 3}\' (repeatable)')
    p.add_argument("--base-model", type=Path, default=None, help="Hugging Face model directory (default: the stand-in)")
    p.add_argument("--data", action="append", default=[], metavar="NAME=TRAIN,TEST[,VAL]",
                   help="one client's MedQA/MedMCQA JSONL files (repeatable; default: the synthetic benchmark)")
    p.add_argument("--new-site", default=None, metavar="NAME=TRAIN,TEST",
                   help="a site outside the federation for new-site adaptation (synthetic: its own new site)")
    p.add_argument("--new-site-sizes", default="0,16,64,256", help="its training-set sizes (default 0,16,64,256)")
    p.add_argument("--new-site-from", default=None, help="the strategy whose final adapter it starts from (default: the first)")
    p.add_argument("--no-new-site", action="store_true", help="skip new-site adaptation")
    p.add_argument("--personalise", type=int, default=None, metavar="EPOCHS",
                   help="after the federation each client fine-tunes the global adapter on its own data for "
                        "EPOCHS epochs and is also scored with that model (default: the preset's; 0: off)")
    p.add_argument("--personalise-mu", type=float, default=None, metavar="MU",
                   help="proximal pull towards the global adapter while fine-tuning (default: the preset's)")
    p.add_argument("--split", choices=("test", "val"), default="test",
                   help="evaluate on test (reported figures) or val (choosing settings); default test")
    p.add_argument("--scoring", choices=("letter", "sum", "mean"), default=None,
                   help="headline scoring; all three are reported at the end of the budget (default: letter, the "
                        "MedQA standard; the synthetic preset's stand-in uses mean, see docs/learning.md)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one training setting (TrainConfig field, JSON value), repeatable")
    p.add_argument("--scale", type=float, default=1.0, help="synthetic benchmark size multiplier")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1 ...")
    p.add_argument("--eval-limit", type=int, default=None, help="evaluate on the first N questions of each set")
    p.add_argument("--fresh", action="store_true", help="recompute seeds whose result.json exists")
    p.add_argument("--dp-epsilon", default=None, metavar="EPS,...",
                   help="instead: the accuracy cost of DP at these ε (δ = 1e-5) against no DP, e.g. 1,4,8 (docs/privacy.md)")
    p.add_argument("--dp-level", choices=("sample", "client"), default="sample",
                   help="with --dp-epsilon: DP-SGD per patient record (sample) or per hospital at the aggregator (client)")
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


def _strategy_names() -> list[str]:
    from prismesh.runs.experiment import STRATEGY_CONFIGS

    return list(STRATEGY_CONFIGS)


def _experiment(args: argparse.Namespace) -> int:
    import json

    from prismesh.cli.errors import UsageError
    from prismesh.cli.output import configure_output
    from prismesh.runs.experiment import (
        STRATEGY_CONFIGS,
        Plan,
        command_line,
        presets,
        run_experiment,
    )

    configure_output(args.verbose)
    if args.dp_epsilon is not None:
        return _dp_experiment(args)
    preset = presets()[args.preset]
    try:
        if args.seed is not None and args.seeds is not None:
            raise UsageError("give --seed or --seeds, not both")
        seeds = [args.seed] if args.seed is not None else _int_list(args.seeds or "0,1,2,3,4", "--seeds")
        if not seeds or len(set(seeds)) != len(seeds):
            raise UsageError(f"--seeds must list distinct integers, got {args.seeds!r}")
        sizes = _int_list(args.new_site_sizes, "--new-site-sizes") if not args.no_new_site else []
        if any(k < 0 for k in sizes):
            raise UsageError("--new-site-sizes must be >= 0")
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.attack is not None:
        from prismesh.runs.attacks import ATTACKS

        if args.attack not in ATTACKS:
            raise UsageError(f"--attack {args.attack!r} is not an attack; choose from {', '.join(ATTACKS)}")
        if args.malicious < 1:
            raise UsageError(f"--malicious must be at least 1, got {args.malicious}")
    elif args.malicious != 1:
        raise UsageError("--malicious needs --attack KIND")
    rounds = args.rounds if args.rounds is not None else preset.rounds
    if rounds < 1:
        raise UsageError(f"--rounds must be >= 1, got {rounds}")
    if args.personalise is not None and args.personalise < 0:
        raise UsageError(f"--personalise must be >= 0 epochs, got {args.personalise}")
    if args.personalise_mu is not None and not args.personalise_mu >= 0:
        raise UsageError(f"--personalise-mu must be a number >= 0, got {args.personalise_mu}")
    names = [n.strip() for n in args.strategies.split(",") if n.strip()] if args.strategies else list(preset.strategies)
    strategies = {}
    for n in names:
        if n not in STRATEGY_CONFIGS:
            raise UsageError(f"--strategies: unknown configuration {n!r}; known: {', '.join(STRATEGY_CONFIGS)} "
                             "(or add one with --strategy LABEL=JSON)")
        strategies[n] = dict(STRATEGY_CONFIGS[n])
    for item in args.strategy:
        label, sep, raw = item.partition("=")
        try:
            spec = json.loads(raw) if sep else None
        except json.JSONDecodeError as exc:
            raise UsageError(f"--strategy {label}: not JSON ({exc})") from None
        if not label or not isinstance(spec, dict) or not isinstance(spec.get("strategy"), str):
            raise UsageError(f'--strategy must be LABEL={{"strategy": NAME, ...options}}, got {item!r}')
        strategies[label] = spec
    if not strategies:
        raise UsageError("no strategy to run")
    _check_strategies(strategies)
    train = dict(preset.train)
    for item in args.set:
        key, sep, raw = item.partition("=")
        if not sep:
            raise UsageError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            train[key] = json.loads(raw)
        except json.JSONDecodeError:
            train[key] = raw
    _check_train(train)
    if args.base_model is not None and not (args.base_model / "config.json").is_file():
        raise UsageError(f"--base-model {args.base_model}: not a Hugging Face model directory (no config.json)")
    data = _data_args(args.data) if args.data else None
    new_site = None
    if args.new_site:
        if data is None:
            raise UsageError("--new-site goes with --data (the synthetic benchmark has its own new site)")
        name, files = _named(args.new_site, "--new-site", 2, 2)
        new_site = (name, files[0], files[1])
    if args.new_site_from is not None and args.new_site_from not in strategies:
        raise UsageError(f"--new-site-from {args.new_site_from!r} is not among the strategies run: {', '.join(strategies)}")
    if data is not None and not new_site:
        sizes = []
    plan = Plan(
        out=args.out, seeds=seeds, rounds=rounds, strategies=strategies, train=train, preset=preset.name,
        base_model=args.base_model, data=data, new_site=new_site, new_site_sizes=tuple(sizes),
        new_site_from=args.new_site_from, split=args.split, scale=args.scale, scoring=args.scoring or ("letter" if args.base_model else preset.scoring),
        device=args.device, eval_limit=args.eval_limit, attack=args.attack, malicious=args.malicious,
        personalise=preset.personalise if args.personalise is None else args.personalise,
        personalise_mu=preset.personalise_mu if args.personalise_mu is None else args.personalise_mu,
        command=command_line(), notes=[preset.note],
    )
    run_experiment(plan, resume=not args.fresh)
    return 0


def _int_list(text: str, what: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{what} must be comma-separated integers, got {text!r}") from None


def _named(item: str, what: str, least: int, most: int) -> tuple[str, list[Path]]:
    from prismesh.cli.errors import UsageError

    name, sep, rest = item.partition("=")
    files = [Path(x) for x in rest.split(",")] if sep else []
    if not name or not sep or not least <= len(files) <= most or any(not str(f) for f in files):
        shape = "NAME=TRAIN,TEST" + (",VAL" if most == 3 else "")
        raise UsageError(f"{what} expects {shape}, got {item!r}")
    for f in files:
        if not f.is_file():
            raise UsageError(f"{what} {name}: no such file {f}")
    return name, files


def _data_args(items: list[str]) -> dict[str, tuple[Path, Path, Path | None]]:
    from prismesh.cli.errors import UsageError
    from prismesh.node.data import DataFormatError, load_jsonl

    data: dict[str, tuple[Path, Path, Path | None]] = {}
    for item in items:
        name, files = _named(item, "--data", 2, 3)
        if name in data:
            raise UsageError(f"--data: client {name!r} given twice")
        for f in files:
            try:
                load_jsonl(f)
            except DataFormatError as exc:
                raise UsageError(f"--data {name}: {exc}") from None
        data[name] = (files[0], files[1], files[2] if len(files) == 3 else None)
    if len(data) < 2:
        raise UsageError("--data needs at least two clients (a federation of one is a single-client LoRA)")
    return data


def _check_strategies(strategies: dict) -> None:
    from prismesh.aggregator.strategies import get_strategy
    from prismesh.cli.errors import UsageError

    for label, spec in strategies.items():
        try:
            get_strategy(spec["strategy"], **{k: v for k, v in spec.items() if k != "strategy"})
        except ValueError as exc:
            raise UsageError(f"strategy {label}: {exc}") from None


def _check_train(train: dict) -> None:
    from prismesh.cli.errors import UsageError
    from prismesh.node.trainer import TrainConfig, TrainConfigError

    try:
        TrainConfig.from_dict({**train, "device": "cpu"})
    except TrainConfigError as exc:
        raise UsageError(f"training settings: {exc}") from None


def _dp_experiment(args: argparse.Namespace) -> int:
    from prismesh.cli.errors import UsageError
    from prismesh.runs.privacy_experiment import run_privacy_experiment

    try:
        epsilons = [float(x) for x in args.dp_epsilon.split(",") if x.strip()]
        seeds = ([int(x) for x in args.seeds.split(",") if x.strip()] if args.seeds
                 else [args.seed if args.seed is not None else 0])
    except ValueError as exc:
        raise UsageError(f"--dp-epsilon takes numbers and --seeds integers, comma-separated: {exc}") from None
    if not epsilons or any(e <= 0 for e in epsilons):
        raise UsageError("--dp-epsilon needs at least one ε > 0")
    if args.dp_batch is not None and args.dp_batch < 1:
        raise UsageError("--dp-batch must be >= 1")
    run_privacy_experiment(args.out, seeds=seeds, epsilons=epsilons, level=args.dp_level, scale=args.scale,
                           rounds=args.rounds if args.rounds is not None else 3, dp_batch=args.dp_batch, dp_lr=args.dp_lr)
    return 0


