"""The web app: server-rendered pages (Starlette + Jinja2) and a server-sent event stream.

Why Starlette: the pages are HTML rendered on the server and one event stream; Starlette (the
ASGI toolkit FastAPI is built on) gives routing, streaming responses and middleware without
FastAPI's request-model layer, which a read-only app with four query parameters does not need.
Server-sent events rather than websockets: updates flow one way, and ``EventSource`` reconnects
by itself.

Safety: only GET/HEAD, plus POST to queue an audit (it computes, it never sends a transaction);
Jinja2 autoescaping for every string from the chain or the store; a strict content security
policy (scripts and styles from this server only, no inline code); Host headers limited to
loopback names when bound to loopback; a bounded number of event streams; pages cached under the
dashboard's key, so repeated loads cost a dictionary look-up.
"""

from __future__ import annotations

import asyncio
import datetime
import json
from collections import OrderedDict
from typing import Any
from urllib.parse import urlsplit

from jinja2 import Environment, PackageLoader, select_autoescape
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from prismesh.dashboard.views import NotFound, Unavailable, Views

LOOPBACK_HOSTS = ["127.0.0.1", "localhost", "[::1]", "::1"]
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",  # no-referrer would make the audit form post Origin: null
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}
PAGE_CACHE_SIZE = 256


def _short(value: Any, head: int = 6, tail: int = 4) -> str:
    text = str(value or "")
    return text if len(text) <= head + tail + 1 else f"{text[:head]}…{text[-tail:]}"


def _utc(ts: Any) -> str:
    if ts is None:
        return "—"
    return datetime.datetime.fromtimestamp(int(ts), datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _tokens(amount: Any, decimals: int = 18) -> str:
    if amount is None:
        return "—"
    value = int(amount) / 10**decimals
    return f"{value:,.4f}".rstrip("0").rstrip(".")


def _bytes(n: Any) -> str:
    if n is None:
        return "—"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:,.1f} GiB"


def make_environment() -> Environment:
    env = Environment(
        loader=PackageLoader("prismesh.dashboard", "templates"),
        autoescape=select_autoescape(default=True, default_for_string=True),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(short=_short, utc=_utc, tokens=_tokens, bytes=_bytes)
    return env


class Pages:
    """Renders pages, cached by (path, query, fragment, dashboard key)."""

    def __init__(self, dash: Any) -> None:
        self.dash = dash
        self.views = Views(dash)
        self.env = make_environment()
        self._cache: OrderedDict[tuple, bytes] = OrderedDict()

    def render(self, request: Request, template: str, build: Any) -> Response:
        fragment = request.headers.get("x-fragment") == "1"
        key = (request.url.path, str(request.url.query), fragment, self.dash.key)
        body = self._cache.get(key)
        if body is None:
            try:
                context = build()
            except NotFound as exc:
                return self.error(request, 404, str(exc))
            except Unavailable as exc:
                response = self.error(request, 503, str(exc))
                response.headers["Retry-After"] = "2"
                return response
            header = self.views.header()
            body = self.env.get_template(template).render(
                **context, header=header, fragment=fragment, title=self.dash.title, path=request.url.path
            ).encode()
            self._cache[key] = body
            while len(self._cache) > PAGE_CACHE_SIZE:
                self._cache.popitem(last=False)
        return HTMLResponse(body)

    def error(self, request: Request, status: int, message: str) -> Response:
        body = self.env.get_template("error.html").render(
            message=message, status=status, header=self.views.header(), fragment=False, title=self.dash.title,
            path=request.url.path,
        )
        return HTMLResponse(body, status_code=status)


class SecurityHeaders:
    """Adds the security headers to every response (pages, errors, static files, the stream)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        static = scope.get("path", "").startswith("/static/")

        async def send_with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                present = {k.lower() for k, _ in message.get("headers", [])}
                extra = [
                    (k.lower().encode(), v.encode())
                    for k, v in SECURITY_HEADERS.items()
                    if k.lower().encode() not in present and not (static and k == "Cache-Control")
                ]
                message = {**message, "headers": list(message.get("headers", [])) + extra}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _int_param(request: Request, name: str) -> int | None:
    raw = request.query_params.get(name)
    if raw is None:
        return None
    if not raw.isdigit() or len(raw) > 9:
        raise ValueError(f"query parameter {name} must be a positive whole number, got {raw!r}")
    return int(raw)


def create_app(dash: Any, *, allowed_hosts: list[str] | None = None, max_streams: int = 64,
               stream_check_s: float = 0.1, heartbeat_s: float = 15.0) -> Starlette:
    """The ASGI app over ``dash`` (a started or not yet started :class:`Dashboard`)."""
    pages = Pages(dash)
    streams = {"open": 0}

    def bad_request(request: Request, exc: ValueError) -> Response:
        return pages.error(request, 400, str(exc))

    async def tasks(request: Request) -> Response:
        try:
            page = _int_param(request, "page")
        except ValueError as exc:
            return bad_request(request, exc)
        return pages.render(request, "tasks.html", lambda: pages.views.tasks(page))

    async def task(request: Request) -> Response:
        try:
            page = _int_param(request, "rounds")
            task_id = int(request.path_params["task_id"])
        except ValueError as exc:
            return bad_request(request, exc)
        return pages.render(request, "task.html", lambda: pages.views.task(task_id, page))

    async def audit(request: Request) -> Response:
        task_id = int(request.path_params["task_id"])
        if request.method == "POST":
            origin = request.headers.get("origin")
            if origin and urlsplit(origin).netloc != request.headers.get("host"):
                return pages.error(request, 403, "audits are queued from this dashboard's own pages only")
            if dash.index.task(task_id) is None:
                return pages.error(request, 404, f"no task {task_id} on chain")
            dash.audits.request(task_id)
            back = request.query_params.get("back")
            target = f"/tasks/{task_id}" if back == "task" else f"/tasks/{task_id}/audit"
            return RedirectResponse(target, status_code=303)
        return pages.render(request, "audit.html", lambda: pages.views.audit(task_id))

    async def finality(request: Request) -> Response:
        return pages.render(request, "finality.html", pages.views.finality)

    async def hospitals(request: Request) -> Response:
        try:
            page = _int_param(request, "page")
        except ValueError as exc:
            return bad_request(request, exc)
        return pages.render(request, "hospitals.html", lambda: pages.views.hospitals(page))

    async def events(request: Request) -> Response:
        if streams["open"] >= max_streams:
            return PlainTextResponse("too many live views open; reload later", status_code=503)

        async def stream():
            streams["open"] += 1
            try:
                last, quiet = None, 0.0
                while True:
                    key = dash.key
                    if key != last:
                        last, quiet = key, 0.0
                        info = dash.index.finality_info
                        data = {"key": key, "head": info.head, "final": info.final_height, "lag": info.lag_blocks,
                                "error": dash.error,
                                "indexing": None if dash.index.caught_up else dash.index.indexed_to}
                        yield f"data: {json.dumps(data)}\n\n"
                    elif quiet >= heartbeat_s:
                        quiet = 0.0
                        yield ": keep-alive\n\n"
                    if await request.is_disconnected():
                        break
                    await asyncio.sleep(stream_check_s)
                    quiet += stream_check_s
            finally:
                streams["open"] -= 1

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"X-Accel-Buffering": "no"})

    async def health(request: Request) -> Response:
        ok = dash.error is None
        body = json.dumps({"ok": ok, "key": dash.key, "final": dash.index.finality_info.final_height,
                           "error": dash.error})
        return Response(body, status_code=200 if ok else 503, media_type="application/json")

    routes = [
        Route("/", tasks, methods=["GET", "HEAD"]),
        Route("/tasks/{task_id:int}", task, methods=["GET", "HEAD"]),
        Route("/tasks/{task_id:int}/audit", audit, methods=["GET", "HEAD", "POST"]),
        Route("/finality", finality, methods=["GET", "HEAD"]),
        Route("/hospitals", hospitals, methods=["GET", "HEAD"]),
        Route("/events", events, methods=["GET"]),
        Route("/healthz", health, methods=["GET", "HEAD"]),
        Mount("/static", app=StaticFiles(packages=[("prismesh.dashboard", "static")]), name="static"),
    ]
    middleware = [Middleware(SecurityHeaders)]
    if allowed_hosts:
        middleware.append(Middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts))

    async def not_found(request: Request, exc: Exception) -> Response:
        return pages.error(request, 404, f"no page at {request.url.path}")

    async def not_allowed(request: Request, exc: Exception) -> Response:
        return PlainTextResponse("this dashboard is read-only", status_code=405)

    return Starlette(routes=routes, middleware=middleware, exception_handlers={404: not_found, 405: not_allowed})
