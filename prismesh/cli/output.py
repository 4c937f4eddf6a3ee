"""What long-running commands print: our own progress and log lines, not the libraries' chatter.

transformers draws a "Loading weights" bar for every model load and Ray warns at every start;
in a demo or a daemon log those drown the lines that matter. Unless ``--verbose``, they are
turned off here, before the libraries are imported (both read their settings at import time).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"
QUIET_ENV = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # transformers' bars follow huggingface_hub's switch
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "PRISMESH_QUIET": "1",  # read by ensure_ray: Ray logs errors only
}


LOG_FORMAT_ENV = "PRISMESH_LOG_FORMAT"


def add_daemon_output_arguments(parser: argparse.ArgumentParser, *, metrics: bool = True) -> None:
    """``--log-format text|json`` (default ``$PRISMESH_LOG_FORMAT`` or text) and, for daemons
    that count things, ``--metrics-port`` / ``--metrics-host``."""
    parser.add_argument("--log-format", choices=("text", "json"), default=os.environ.get(LOG_FORMAT_ENV) or "text",
                        help=f"log lines as text or one JSON object each (default: ${LOG_FORMAT_ENV} or text)")
    if metrics:
        from prismesh.chain.telemetry import add_arguments

        add_arguments(parser)


def configure_output(verbose: bool = False, *, level: int | None = None, log_format: str = "text") -> None:
    """Logging to standard error (INFO for daemons, WARNING for runs unless ``level``), as text or
    one JSON object per line (``log_format``), and, unless ``verbose``, silence for third-party
    progress bars and start-up warnings."""
    if not verbose:
        for key, value in QUIET_ENV.items():
            os.environ.setdefault(key, value)
        if "transformers" in sys.modules:  # already imported: switch its bars off directly
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
            hf_logging.set_verbosity_error()
    else:
        os.environ.pop("PRISMESH_QUIET", None)
    chosen = level if level is not None else (logging.INFO if verbose else logging.WARNING)
    logging.basicConfig(level=chosen, format=LOG_FORMAT, stream=sys.stderr)
    root = logging.getLogger()
    root.setLevel(chosen)
    if log_format == "json":
        from prismesh.chain.telemetry import JsonFormatter

        for handler in root.handlers:
            handler.setFormatter(JsonFormatter())
    elif log_format != "text":
        raise ValueError(f"log format must be 'text' or 'json', got {log_format!r}")


def daemon_output(args: object) -> None:
    """A daemon's output: INFO log lines (text or JSON), one per retry; ``--debug`` (or
    ``PRISMESH_DEBUG=1``) adds the traceback to each of them."""
    from prismesh.chain.localstate import DEBUG_ENV

    if getattr(args, "debug", False):
        os.environ[DEBUG_ENV] = "1"
    configure_output(bool(getattr(args, "verbose", False)), level=logging.INFO,
                     log_format=getattr(args, "log_format", "text"))
