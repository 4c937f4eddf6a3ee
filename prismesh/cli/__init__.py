"""The ``prismesh`` command: one console script whose subcommands serve each role.

Each area registers its own subcommands through ``register(subparsers)`` and sets ``func`` on
its parsers (``func(args) -> int``). Heavy imports (torch, ray, brownie) stay inside the command
functions, so ``prismesh ipfs`` on a storage host never loads a training stack. Failures follow
one contract (:mod:`prismesh.cli.errors`): one line ``error: ...`` on standard error, exit code 2
for a wrong command line and 1 for a failure at run time; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import traceback

from prismesh import __version__
from prismesh.cli.errors import USAGE, explain

REGISTRARS = (
    "prismesh.cli.chain",
    "prismesh.cli.govern",
    "prismesh.cli.keys",
    "prismesh.cli.ipfs",
    "prismesh.cli.node",
    "prismesh.cli.aggregator",
    "prismesh.cli.runs",
    "prismesh.cli.audit",
    "prismesh.cli.dashboard",
)
DEBUG_ENV = "PRISMESH_DEBUG"


class Parser(argparse.ArgumentParser):
    """argparse with the project's usage-error line: ``error: ...`` and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"error: {message} (see `{self.prog} --help`)\n")
        raise SystemExit(USAGE)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="prismesh",
        description="Federated LoRA fine-tuning coordinated by EVM contracts with BFT finality.",
    )
    parser.add_argument("--version", action="version", version=f"prismesh {__version__}")
    parser.add_argument(
        "--debug",
        action="store_true",
        help=f"show the traceback of a failure (or set {DEBUG_ENV}=1)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    for name in REGISTRARS:
        importlib.import_module(name).register(sub)
    return parser


def debug_enabled(args: argparse.Namespace | None = None) -> bool:
    return bool(getattr(args, "debug", False)) or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`prismesh ipfs pin ls | head`): stop quietly, as Python advises.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except Exception as exc:  # noqa: BLE001 - the one place every failure is explained
        message, code = explain(exc)
        if debug_enabled(args):
            traceback.print_exc()
        logging.shutdown()
        print(f"error: {message}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
