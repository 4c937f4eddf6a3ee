"""What operators' monitoring reads from a daemon: Prometheus metrics on an optional port, and
log lines as JSON objects.

Metrics are off until :func:`serve` (or :func:`enable`) is called; until then every hook below
returns at once, so a daemon without a metrics port pays nothing. The daemons call the hooks at
the points where the thing counted happens (a round trained, an update pinned, a transaction
mined, a step retried); nothing here changes what a daemon does. Series carry ``role`` (node,
aggregator, committee) and ``name`` (the hospital's name, ...) so the daemons of an in-process
federation stay apart; exclusion reasons are folded into a few kinds, so a reason's free text
(CIDs, numbers) never makes a new series.
"""

from __future__ import annotations

import datetime
import json
import logging
import threading
from typing import Any

_LOCK = threading.Lock()
_METRICS: _Metrics | None = None
_ACTORS: dict[str, tuple[str, str]] = {}  # sending address -> (role, name)

# Ordered: the first fragment found in a reason (lower case) names its kind.
EXCLUSION_KINDS = (
    ("fetch failed", "fetch"),
    ("timed out", "timeout"),
    ("sha256", "hash mismatch"),
    ("unreadable", "unreadable"),
    ("updates in one round", "duplicate"),
    ("shape", "shape"),
    ("dtype", "dtype"),
    ("nan", "non-finite"),
    ("infinite", "non-finite"),
    ("finite", "non-finite"),
    ("norm", "norm bound"),
    ("||", "norm bound"),
    ("config", "config"),
    ("worker failed", "error"),
    ("verification error", "error"),
)


class _Metrics:
    def __init__(self) -> None:
        from prometheus_client import (
            CollectorRegistry,
            Counter,
            Gauge,
            Histogram,
            gc_collector,
            platform_collector,
            process_collector,
        )

        r = self.registry = CollectorRegistry(auto_describe=True)
        process_collector.ProcessCollector(registry=r)
        platform_collector.PlatformCollector(registry=r)
        gc_collector.GCCollector(registry=r)
        seconds = (0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
        self.rounds_joined = Counter("prismesh_rounds_joined", "Rounds a node trained and pinned an update for",
                                     ["name"], registry=r)
        self.training = Histogram("prismesh_training_seconds", "Local LoRA training time per round", ["name"],
                                  buckets=seconds, registry=r)
        self.uploaded = Counter("prismesh_uploaded_bytes", "Bytes of the adapters a node pinned (UnixFS DAG size)",
                                ["name"], registry=r)
        self.transactions = Counter("prismesh_transactions", "Transactions sent, by outcome",
                                    ["role", "name", "contract", "function", "outcome"], registry=r)
        self.gas = Counter("prismesh_gas_used", "Gas used by mined transactions",
                           ["role", "name", "contract", "function"], registry=r)
        self.retries = Counter("prismesh_retries", "Daemon steps retried after a failure", ["role", "name"], registry=r)
        self.errors = Counter("prismesh_errors", "Failures by kind (exception type or revert name)",
                              ["role", "name", "kind"], registry=r)
        self.final_height = Gauge("prismesh_final_height", "The finality gadget's final height", ["role", "name"],
                                  registry=r)
        self.head_height = Gauge("prismesh_head_height", "The chain's head seen by the daemon", ["role", "name"],
                                 registry=r)
        self.lag = Gauge("prismesh_finality_lag_blocks", "Head minus final height", ["role", "name"], registry=r)
        self.aggregation = Histogram("prismesh_aggregation_seconds",
                                     "Fetch, verify and merge time of a round's updates", ["name"],
                                     buckets=seconds, registry=r)
        self.rounds_aggregated = Counter("prismesh_rounds_aggregated", "Rounds aggregated, by outcome",
                                         ["name", "outcome"], registry=r)
        self.exclusions = Counter("prismesh_exclusions", "Updates left out of an aggregate, by kind of reason",
                                  ["reason"], registry=r)
        self.certificates = Counter("prismesh_certificates", "Finality certificates posted", ["name"], registry=r)


def enable() -> Any:
    """Create the metrics (once); returns their ``CollectorRegistry``."""
    global _METRICS
    with _LOCK:
        if _METRICS is None:
            _METRICS = _Metrics()
        return _METRICS.registry


def disable() -> None:
    """Turn the hooks off again (tests); a metrics server already started keeps serving."""
    global _METRICS
    with _LOCK:
        _METRICS = None


def enabled() -> bool:
    return _METRICS is not None


def registry() -> Any:
    return _METRICS.registry if _METRICS is not None else None


def serve(port: int, host: str = "127.0.0.1") -> int:
    """Expose ``/metrics`` on ``host:port`` (loopback unless told otherwise; 0 picks a free
    port) from a daemon thread; returns the port."""
    from prometheus_client import start_http_server

    reg = enable()
    server, _thread = start_http_server(port, addr=host, registry=reg)
    return int(server.server_port)


def add_arguments(parser: Any) -> None:
    """``--metrics-port`` / ``--metrics-host`` on a daemon's command line."""
    parser.add_argument("--metrics-port", type=int, default=None,
                        help="serve Prometheus metrics on this port (default: off)")
    parser.add_argument("--metrics-host", default=None, help="address to serve metrics on (default 127.0.0.1)")


# ----------------------------------------------------------------------- hooks


def actor(address: str, role: str, name: str) -> None:
    """Label the transactions sent from ``address`` with the daemon that sends them."""
    _ACTORS[address] = (role, name)


def transaction(sender: str, contract: str | None, function: str | None, receipt: Any = None,
                error: str | None = None) -> None:
    """A transaction mined (``receipt``) or refused (``error``: the revert's name)."""
    m = _METRICS
    if m is None:
        return
    role, name = _ACTORS.get(sender, ("other", sender))
    contract, function = contract or "?", function or "?"
    if receipt is not None:
        m.transactions.labels(role, name, contract, function, "mined").inc()
        m.gas.labels(role, name, contract, function).inc(int(receipt["gasUsed"]))
    else:
        m.transactions.labels(role, name, contract, function, "reverted").inc()
        m.errors.labels(role, name, error or "revert").inc()


def round_joined(name: str, train_seconds: float) -> None:
    m = _METRICS
    if m is not None:
        m.rounds_joined.labels(name).inc()
        m.training.labels(name).observe(train_seconds)


def uploaded(name: str, nbytes: int) -> None:
    m = _METRICS
    if m is not None:
        m.uploaded.labels(name).inc(nbytes)


def retry(role: str, name: str, exc: BaseException) -> None:
    """A daemon step failed and will be retried."""
    m = _METRICS
    if m is not None:
        m.retries.labels(role, name).inc()
        m.errors.labels(role, name, type(exc).__name__).inc()


def error(role: str, name: str, kind: str) -> None:
    m = _METRICS
    if m is not None:
        m.errors.labels(role, name, kind).inc()


def finality(role: str, name: str, final: int, head: int) -> None:
    m = _METRICS
    if m is not None:
        m.final_height.labels(role, name).set(final)
        m.head_height.labels(role, name).set(head)
        m.lag.labels(role, name).set(max(0, head - final))


def observe_finality(role: str, name: str, stream: Any, w3: Any) -> None:
    """Read the final height (through the daemon's stream) and the head, when metrics are on."""
    if _METRICS is None:
        return
    try:
        finality(role, name, int(stream.final_height()), int(w3.eth.block_number))
    except Exception as exc:  # noqa: BLE001 - a metric never fails a step
        error(role, name, type(exc).__name__)


def aggregation(name: str, seconds: float, outcome: str) -> None:
    m = _METRICS
    if m is not None:
        m.aggregation.labels(name).observe(seconds)
        m.rounds_aggregated.labels(name, outcome).inc()


def exclusion_kind(reason: str) -> str:
    text = reason.lower()
    for fragment, kind in EXCLUSION_KINDS:
        if fragment in text:
            return kind
    return "other"


def exclusions(reasons: Any) -> None:
    """Each reason (text) of an update left out of an aggregate."""
    m = _METRICS
    if m is not None:
        for reason in reasons:
            m.exclusions.labels(exclusion_kind(str(reason))).inc()


def certificate(name: str, receipt: Any, final: int, head: int) -> None:
    m = _METRICS
    if m is None:
        return
    m.certificates.labels(name).inc()
    if receipt is not None:
        m.transactions.labels("committee", name, "FinalityGadget", "submitCertificate", "mined").inc()
        m.gas.labels("committee", name, "FinalityGadget", "submitCertificate").inc(int(receipt["gasUsed"]))
    finality("committee", name, final, head)


# ----------------------------------------------------------------------- JSON logs


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, and the
    exception's traceback when there is one; extra fields passed to a log call come along."""

    _STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in self._STANDARD and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)
