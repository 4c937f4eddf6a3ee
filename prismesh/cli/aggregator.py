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
    from prismesh.aggregator.daemon import run_aggregator
    from prismesh.cli.output import daemon_output

    daemon_output(args)
    return run_aggregator(args.config, ray_address=args.ray_address, once=args.once,
                          metrics_port=args.metrics_port, metrics_host=args.metrics_host)
