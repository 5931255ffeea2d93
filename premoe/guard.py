"""The HTTP front door of premoe's servers: what every request passes before any handler runs.

One raw ASGI middleware (:class:`Guard`) and one uvicorn protocol
(:func:`deadline_protocol`), shared by ``premoe serve`` and anything else
that serves OpenAI-style JSON. In order, a request:

1. gets a request id (``x-request-id`` on every response; server-side logs name it);
2. is refused (400) when its Host header is not one of the bound loopback names
   (DNS rebinding: a web page on evil.example must not reach a loopback server);
3. is refused (401) without the API key as a Bearer token, unless its path is open (``/health``);
4. for POST: is refused (415) unless it is ``application/json``, and (413) as soon as its
   body passes ``max_body`` bytes, from its Content-Length header or while counting the
   bytes that arrive; the body must arrive within ``read_timeout`` seconds (408);
5. reaches the app with its body already read, so handlers never read an unbounded stream.

Connections whose headers do not arrive within ``read_timeout`` are closed by
:func:`deadline_protocol` (uvicorn itself waits forever). Every refusal is
an OpenAI error body: ``{"error": {"message", "type", "param", "code"}}``.

Example::

    app = Guard(fastapi_app, GuardConfig(api_key="s3cret", allowed_hosts=loopback_hosts("127.0.0.1", 8000)))
    uvicorn.run(app, host="127.0.0.1", port=8000, http=deadline_protocol(10.0))
"""
from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import secrets
import time
import uuid
from dataclasses import dataclass
from typing import Callable

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")


log = logging.getLogger("premoe.guard")  # server-side record of internal errors


class ApiError(Exception):
    """An error answered with OpenAI's error JSON (and optional headers, e.g. Retry-After)."""

    def __init__(self, status: int, message: str, code: str | None = None, kind: str = "invalid_request_error",
                 param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.kind = status, message, code, kind
        self.param, self.headers = param, headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.kind, self.code, self.param)


def internal_error(error: BaseException, request_id: str) -> ApiError:
    """Log ``error`` with its request id; the client gets the id, never the exception's text."""
    log.error("request %s failed", request_id, exc_info=error)
    return ApiError(500, f"internal server error (request id {request_id}); the server's log has the details",
                    "internal_error", "server_error")


def error_body(message: str, kind: str = "invalid_request_error", code: str | None = None,
               param: str | None = None) -> dict:
    """OpenAI's error shape; text that came from the client is made encodable (lone surrogates escaped)."""
    return {"error": {"message": _printable(message), "type": kind, "param": param and _printable(param),
                      "code": code}}


def _printable(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


@dataclass(frozen=True)
class GuardConfig:
    """What a request must satisfy before it reaches the app."""

    max_body: int = 1 << 20  # bytes of request body; more is refused (413) before it is parsed
    read_timeout: float = 30.0  # seconds a client may take to send its headers, and again its body (408)
    api_key: str | None = None  # required as "Authorization: Bearer KEY" when set (401 otherwise)
    allowed_hosts: frozenset[str] | None = None  # accepted Host headers (lower case); None: any
    open_paths: frozenset[str] = frozenset({"/health"})  # answered without the API key


def loopback_hosts(host: str, port: int) -> frozenset[str] | None:
    """The Host headers a server bound to ``host`` accepts: loopback names (+ ``:port``), or None beyond loopback.

    A server bound to 0.0.0.0 or a public address is reached under names it
    cannot know, so only loopback binds get the check.
    """
    if not is_loopback(host):
        return None
    return frozenset(n for name in LOOPBACK_NAMES for n in (name, f"{name}:{port}"))


def check_bindable(host: str, port: int) -> None:
    """Refuse, before the model loads, an address the server could not listen on (a port in use, a bad --host).

    uvicorn would otherwise log its own ``ERROR: [Errno 98] ...`` after the load and exit 1 or 3.
    """
    import socket

    from premoe.errors import InputError

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no clash
            probe.bind(address)
    except socket.gaierror as e:
        raise InputError(f"--host {host!r} is not an address or a name this machine resolves ({e.strerror}); "
                         "give e.g. 127.0.0.1 or 0.0.0.0") from e
    except OSError as e:
        raise InputError(f"cannot listen on {host}:{port}: {e.strerror or e}; choose another --port, or stop what "
                         "listens there") from e


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def exposure_warning(host: str, api_key: str | None) -> str | None:
    """The warning to print when ``host`` reaches beyond this machine and no API key protects it."""
    if api_key or is_loopback(host):
        return None
    return (f"WARNING: binding {host} without an API key: anyone who can reach this port can use the model. "
            "Set --api-key (or PREMOE_API_KEY), or bind 127.0.0.1.")


class Guard:
    """Raw ASGI middleware: request id, Host check, API key, content type, bounded and timed body read."""

    def __init__(self, app, config: GuardConfig):
        self.app, self.config = app, config
        self._key = config.api_key.encode() if config.api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = uuid.uuid4().hex[:16]
        scope.setdefault("state", {})["request_id"] = request_id
        send = _with_header(send, b"x-request-id", request_id.encode())
        try:
            self._check_headers(scope)
            if scope["method"] in ("POST", "PUT", "PATCH"):
                receive = await self._read_body(scope, receive)
        except ApiError as e:
            await send_error(send, e)
            return
        await self.app(scope, receive, send)

    def _check_headers(self, scope) -> None:
        headers = _headers(scope)
        if self.config.allowed_hosts is not None:
            host = headers.get(b"host", b"").decode("latin-1").lower()
            if host not in self.config.allowed_hosts:
                raise ApiError(400, f"Host header {host[:100]!r} is not a name this server is bound to "
                                    f"({', '.join(sorted(n for n in self.config.allowed_hosts if ':' not in n[1:]))})",
                               "invalid_host")
        if self._key is not None and scope["path"] not in self.config.open_paths:
            scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
            if scheme.lower() != b"bearer" or not secrets.compare_digest(token.strip(), self._key):
                raise ApiError(401, "a valid API key is required: send 'Authorization: Bearer <key>'",
                               "invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        if scope["method"] in ("POST", "PUT", "PATCH"):
            media = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
            if media != b"application/json":
                raise ApiError(415, f"the request body must be 'application/json', not {media.decode('latin-1')[:100]!r}",
                               "unsupported_media_type")
            length = headers.get(b"content-length")
            if length is not None:
                if not length.strip().isdigit():
                    raise ApiError(400, "the Content-Length header is not a number", "invalid_content_length")
                if int(length) > self.config.max_body:
                    raise _too_large(self.config.max_body)

    async def _read_body(self, scope, receive):
        """Read the whole body (at most ``max_body`` bytes, within ``read_timeout``) and replay it to the app."""
        chunks, size = [], 0
        deadline = time.monotonic() + self.config.read_timeout
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                raise ApiError(408, f"the request body did not arrive within {self.config.read_timeout:g} s",
                               "request_timeout") from None
            if message["type"] == "http.disconnect":
                return _replay(b"", receive, disconnected=True)
            size += len(message.get("body", b""))
            if size > self.config.max_body:
                raise _too_large(self.config.max_body)
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                return _replay(b"".join(chunks), receive)


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"the request body is larger than this server's limit of {limit} bytes "
                         "(the server's --max-body)", "request_too_large")


def _replay(body: bytes, receive, disconnected: bool = False):
    """A ``receive`` that returns the buffered body once, then the client's own messages (its disconnect)."""
    sent = False

    async def replay():
        nonlocal sent
        if disconnected:
            return {"type": "http.disconnect"}
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # no checkpoint of our own: Starlette's is_disconnected() polls through this

    return replay


def _headers(scope) -> dict[bytes, bytes]:
    return {k.lower(): v for k, v in scope["headers"]}


def _with_header(send, name: bytes, value: bytes):
    async def wrapped(message):
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), (name, value)]}
        await send(message)

    return wrapped


async def send_error(send, error: ApiError) -> None:
    """Answer with ``error`` as OpenAI JSON and close the connection (the body may not have been read)."""
    payload = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
               (b"connection", b"close"), *((k.lower().encode(), v.encode()) for k, v in error.headers.items())]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


# --------------------------------------------------------------------------- the app around it


def guarded_app(title: str, guard: GuardConfig | None = None, docs: bool = False,
                count: Callable[..., None] | None = None, **fastapi_options):
    """A FastAPI app behind :class:`Guard` whose every error is OpenAI-shaped and leaks no internals.

    ``docs`` turns on /openapi.json, /docs and /redoc (off: they describe the
    server to anyone who asks); ``count(errors=, rejected=)`` hears of every
    error answered.
    """
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    count = count or (lambda **kw: None)
    app = FastAPI(title=title, openapi_url="/openapi.json" if docs else None, docs_url="/docs" if docs else None,
                  redoc_url="/redoc" if docs else None, **fastapi_options)
    app.add_middleware(Guard, config=guard or GuardConfig())

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError):
        count(errors=1, rejected=int(error.status == 429))
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException):  # 404 / 405 from routing
        return JSONResponse(error_body(str(error.detail)), status_code=error.status_code,
                            headers=getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def server_error(request: Request, error: Exception):
        count(errors=1)
        request_id = request.state.request_id  # this handler runs outside the Guard, so it sets the header too
        return JSONResponse(internal_error(error, request_id).body(), status_code=500,
                            headers={"x-request-id": request_id})

    return app


def uvicorn_config(app, host: str, port: int, guard: GuardConfig):
    """The uvicorn config premoe runs an app with (``serve`` and ``route`` alike): header deadline, short keep-alive."""
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, log_level="warning", http=deadline_protocol(guard.read_timeout),
                          timeout_keep_alive=5)


# --------------------------------------------------------------------------- slow clients


def deadline_protocol(read_timeout: float):
    """A uvicorn HTTP protocol class that closes connections whose request headers take over ``read_timeout`` s.

    uvicorn's own keep-alive timer only runs between requests; a client that
    opens a connection and trickles (or never sends) its headers would hold it
    forever. Pass the class as ``uvicorn.Config(http=...)``.
    """
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class DeadlineH11Protocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is h11.IDLE and data:  # part of a request's head: it must complete in time
                if self._header_timer is None:
                    self._arm()
            elif self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def connection_lost(self, exc) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._header_timer = self.loop.call_later(read_timeout, self._too_slow)

        def send_400_response(self, msg: str) -> None:  # malformed HTTP: OpenAI's error JSON, not uvicorn's text
            payload = json.dumps(error_body("the request is not valid HTTP/1.1 (a duplicated Host or Content-Length, "
                                            "headers too large, ...)", code="invalid_http")).encode()
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                       (b"connection", b"close")]
            for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"),
                          h11.Data(data=payload), h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
            self.transport.close()

        def _too_slow(self) -> None:
            self._header_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

    return DeadlineH11Protocol
