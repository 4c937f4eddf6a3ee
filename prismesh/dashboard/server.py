"""Serving the dashboard with uvicorn from a daemon thread: ``prismesh dashboard``, the dashboard
beside ``prismesh demo --dashboard``, the tests and the benchmark all use :class:`BackgroundServer`."""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
from typing import Any

from prismesh.dashboard.app import LOOPBACK_HOSTS, create_app

log = logging.getLogger("prismesh.dashboard")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def allowed_hosts_for(host: str) -> list[str] | None:
    """Bound to loopback, only loopback Host headers are served (no DNS rebinding from a web
    page); bound elsewhere, any (the operator chose to expose it)."""
    return list(LOOPBACK_HOSTS) if is_loopback(host) else None


def _config(dash: Any, host: str, port: int) -> Any:
    import uvicorn

    app = create_app(dash, allowed_hosts=allowed_hosts_for(host))
    return uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False, lifespan="off", ws="none",
                          timeout_graceful_shutdown=1)


class BackgroundServer:
    """The dashboard served from a daemon thread; ``url`` is where it answers (port 0 picks one)."""

    def __init__(self, dash: Any, host: str = "127.0.0.1", port: int = 0) -> None:
        import uvicorn

        self.dash = dash
        self.host = host
        self.server = uvicorn.Server(_config(dash, host, port))
        self.thread: threading.Thread | None = None

    def start(self, timeout: float = 20.0) -> str:
        self.dash.start()
        self.thread = threading.Thread(target=self.server.run, name="prismesh-dashboard-http", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.dash.stop()
                raise RuntimeError(f"the dashboard could not listen on {self.host} (port taken?)")
            time.sleep(0.02)
        return self.url

    @property
    def port(self) -> int:
        return int(self.server.servers[0].sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout=10)
            self.thread = None
        self.dash.stop()

    def __enter__(self) -> BackgroundServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
