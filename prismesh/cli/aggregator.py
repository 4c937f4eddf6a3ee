"""``prismesh aggregator | demo | experiment | audit``."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("aggregator", help="run the Ray-backed aggregator daemon")
    p.add_argument("--config", type=Path, required=True, help="aggregator TOML/JSON config")
    p.add_argument("--ray-address", default=None, help="join a Ray cluster (default: a local Ray)")
    p.add_argument("--once", action="store_true", help="handle what is pending, then exit")
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=_aggregator)

    p = sub.add_parser("demo", help="three hospitals, three federated rounds, on the embedded chain")
    p.add_argument("--out", type=Path, default=Path("out/demo"), help="report directory (default out/demo)")
    p.add_argument("--seed", type=int, default=0, help="benchmark, model and training seed (default 0)")
    p.add_argument("--scale", type=float, default=1.0, help="benchmark size multiplier")
    p.add_argument("--rounds", type=int, default=3, help="federated rounds (default 3, as in the paper)")
    p.add_argument("--strategy", default="fedavg", help="aggregation strategy (fedavg, fedavg-exact, median, trimmed-mean)")
    p.add_argument("--no-baselines", action="store_true", help="skip base/single-client baselines")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=_demo)

    p = sub.add_parser("experiment", help="the paper's protocol on the synthetic benchmark (Tables 2 and 3)")
    p.add_argument("--out", type=Path, default=Path("out/experiment"), help="results directory (default out/experiment)")
    p.add_argument("--seed", type=int, default=0, help="benchmark, model and training seed (default 0)")
    p.add_argument("--scale", type=float, default=1.0, help="benchmark size multiplier")
    p.add_argument("--rounds", type=int, default=3, help="rounds of one local epoch (default 3)")
    p.add_argument("--strategies", default="fedavg,fedavg-exact", help="comma-separated strategies to compare")
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=_experiment)

    p = sub.add_parser("audit", help="re-verify a task from the chain and the store alone")
    p.add_argument("--task", type=int, required=True, help="task id on the coordinator")
    p.add_argument("--manifest", type=Path, required=True, help="deployment manifest (JSON)")
    p.add_argument("--rpc-url", default=None, help="override the manifest's RPC URL")
    p.add_argument("--store", default="embedded", help="storage spec (embedded[:DIR] or kubo[:ADDR])")
    p.add_argument("--no-finality", action="store_true", help="skip the certificate checks")
    p.set_defaults(func=_audit)


def _logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )


def _aggregator(args: argparse.Namespace) -> int:
    from prismesh.aggregator.daemon import AGGREGATOR_EVENTS, AggregatorConfig, AggregatorDaemon
    from prismesh.aggregator.parallel import ensure_ray
    from prismesh.chain.finality.coordinator_stream import open_final_stream
    from prismesh.chain.identity import load_daemon_account
    from prismesh.chain.storage import open_store

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg = AggregatorConfig.load(args.config)
    account = load_daemon_account(cfg.keystore)
    w3, manifest = _connect(cfg.manifest, cfg.rpc_url)
    store = open_store(cfg.store)
    stream = open_final_stream(
        w3, manifest, AGGREGATOR_EVENTS,
        cfg.state_dir / "cursor.json", finality=cfg.finality,
    )
    if cfg.parallel:
        ensure_ray(args.ray_address or cfg.ray_address, None if (args.ray_address or cfg.ray_address) else cfg.ray_num_cpus)
    daemon = AggregatorDaemon(cfg, w3=w3, manifest=manifest, account=account, store=store, store_spec=cfg.store, stream=stream)
    if args.once:
        daemon.step()
        return 0
    daemon.run()
    return 0


def _connect(manifest_path: Path, rpc_url: str | None):
    from dataclasses import replace

    from prismesh.chain.evm.manifest import connect, load_manifest

    manifest = load_manifest(manifest_path)
    if rpc_url:
        manifest = replace(manifest, rpc_url=rpc_url)
    return connect(manifest), manifest


def _demo(args: argparse.Namespace) -> int:
    from prismesh.runs.demo import run_demo

    _logging(args.verbose)
    run_demo(args.out, seed=args.seed, scale=args.scale, rounds=args.rounds, strategy=args.strategy,
             baselines=not args.no_baselines, plots=not args.no_plots)
    return 0


def _experiment(args: argparse.Namespace) -> int:
    from prismesh.runs.experiment import run_experiment

    _logging(args.verbose)
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    run_experiment(args.out, seed=args.seed, scale=args.scale, rounds=args.rounds, strategies=strategies)
    return 0


def _audit(args: argparse.Namespace) -> int:
    from prismesh.aggregator.audit import audit_task
    from prismesh.chain.storage import open_store

    w3, manifest = _connect(args.manifest, args.rpc_url)
    report = audit_task(w3, manifest, open_store(args.store), args.task, check_finality=not args.no_finality)
    print(report.render())
    return 0 if report.ok else 1
