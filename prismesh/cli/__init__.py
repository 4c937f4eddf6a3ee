"""The ``prismesh`` command: one console script whose subcommands wire the three roles together.

Each area registers its own subcommands through ``register(subparsers)``; heavy imports
(torch, ray, brownie) stay inside the command functions so that ``prismesh ipfs`` on a storage
host never loads a training stack.
"""

from __future__ import annotations

import argparse
import importlib
import sys

REGISTRARS = (
    "prismesh.cli.chain",
    "prismesh.cli.govern",
    "prismesh.cli.keys",
    "prismesh.cli.ipfs",
    "prismesh.cli.node",
    "prismesh.cli.aggregator",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prismesh",
        description="Federated LoRA fine-tuning coordinated by EVM contracts with BFT finality.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in REGISTRARS:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
