"""``prismesh aggregator``: the Ray-backed aggregator daemon."""

from __future__ import annotations

import argparse
from pathlib import Path

from prismesh.cli.output import add_daemon_output_arguments


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("aggregator", help="run the Ray-backed aggregator daemon")
    p.add_argument("--config", type=Path, required=True, help="aggregator TOML/JSON config")
    p.add_argument("--ray-address", default=None, help="join a Ray cluster (default: a local Ray)")
    p.add_argument("--once", action="store_true", help="handle what is pending, then exit")
    p.add_argument("-v", "--verbose", action="store_true", help="also show Ray's own warnings")
    add_daemon_output_arguments(p)
    p.set_defaults(func=_aggregator)


def _aggregator(args: argparse.Namespace) -> int:
    import logging

    from prismesh.cli.output import configure_output

    configure_output(args.verbose, level=logging.INFO, log_format=args.log_format)
    from prismesh.aggregator.daemon import AGGREGATOR_EVENTS, AggregatorConfig, AggregatorDaemon
    from prismesh.aggregator.parallel import ensure_ray
    from prismesh.chain.evm.manifest import connect_with
    from prismesh.chain.finality.coordinator_stream import open_final_stream
    from prismesh.chain.identity import load_daemon_account
    from prismesh.chain.storage import open_store

    cfg = AggregatorConfig.load(args.config)
    port = args.metrics_port if args.metrics_port is not None else cfg.metrics_port
    if port is not None:
        from prismesh.chain import telemetry

        host = args.metrics_host or cfg.metrics_host
        logging.getLogger("prismesh.aggregator").info(
            "metrics on http://%s:%d/metrics", host, telemetry.serve(port, host))
    account = load_daemon_account(cfg.keystore)
    manifest, w3 = connect_with(cfg.manifest, cfg.rpc_url)
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
