"""`premoe route`: one OpenAI endpoint in front of a fleet of specialist servers, picking one per request.

At scale a deployment runs one compiled specialist per domain (plus the
generalist) on any OpenAI-compatible server (vLLM, SGLang, llama.cpp's
server, ``premoe serve``). The router runs each request through the base
model's first MoE layer only (:class:`~premoe.retrieval.Retriever`, about
1/L of a forward pass), picks the nearest stored domain (or the generalist)
and forwards the request to that domain's backend:

* **the same front door as premoe serve**: body cap, read deadlines, API key,
  Host check (:mod:`premoe.guard`) and strict OpenAI validation
  (:mod:`premoe.openai_request`): a request a backend would refuse is refused
  here, with the same 400;
* **never drops a request**: a backend that is down (health check or a failed
  connection), overloaded (429), failing (5xx), misconfigured (401/403/404/405),
  silent past ``backend_timeout`` or answering something that is not a
  completion sends its request to the generalist, then to any other live
  backend; a request waiting on a backend whose health check fails moves on too. A backend that dies
  mid-stream is continued on the next one: the text streamed so far is
  appended to the prompt (for a chat, to the rendered chat prompt) and the
  rest streams on as the same response;
* **streaming passed through unbuffered**: every server-sent event is
  forwarded as soon as its line arrives;
* **visible decisions**: ``x-premoe-route-domain`` / ``-backend`` headers, a
  ``premoe_route`` field on non-streaming responses, and ``/metrics``
  (decisions per domain and backend, fallbacks by reason, retrieval and
  forwarding seconds, backend health).

The config is a small JSON file (relative paths are relative to it)::

    {"model": "testbed", "store": "store/", "name": "fleet",
     "backends": {"python": {"url": "http://127.0.0.1:8001"},
                  "de": {"url": "http://127.0.0.1:8002", "model": "de-25"},
                  "generalist": {"url": "http://127.0.0.1:8000", "api_key": "..."}}}

Example::

    router = Router.load(load_config("route.json"))
    uvicorn.run(create_route_app(router), port=9000)
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import httpx
from fastapi import FastAPI, Request  # module level: FastAPI resolves the handlers' string annotations here
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from premoe.errors import InputError, MissingFileError
from premoe.fileio import read_small_text
from premoe.modeling import TESTBEDS
from premoe.guard import ApiError, GuardConfig, deadline_protocol, error_body, guarded_app, loopback_hosts
from premoe.openai_request import OpenAIRequest, parse_request

GENERALIST = "generalist"


@dataclass(frozen=True)
class Backend:
    name: str  # a stored domain, or "generalist"
    url: str  # base URL; /v1/completions etc. are appended
    model: str | None = None  # model id sent to it; None: the "model" field is dropped
    api_key: str | None = None  # sent as a Bearer token


@dataclass(frozen=True)
class RouteConfig:
    model: str  # the fleet's base checkpoint: its first MoE layer picks the domain
    store: str  # pattern store built from that model
    backends: dict[str, Backend]  # domain (or "generalist") -> backend
    name: str = "premoe-route"  # model id clients send
    retrieval_tokens: int = 256  # request tokens retrieval looks at
    health_interval: float = 2.0  # seconds between health checks of every backend
    connect_timeout: float = 2.0  # a backend that does not accept a connection within this is down
    backend_timeout: float = 600.0  # a backend silent this long (non-streaming: its whole generation) is hung


# config key -> the largest value that still means something (seconds; tokens)
LIMITS = {"retrieval_tokens": 1 << 20, "health_interval": 3600.0, "connect_timeout": 3600.0,
          "backend_timeout": 86400.0}


def load_config(path: str | Path) -> RouteConfig:
    """Read and check a route config file (JSON); paths in it are relative to the file."""
    path = Path(path)
    raw = _read_json(path)
    if not isinstance(raw, dict) or not isinstance(raw.get("backends"), dict) or \
            not all(isinstance(raw.get(k), str) for k in ("model", "store")):
        raise InputError(f"route config {path} needs \"model\" and \"store\" (strings) and \"backends\" (an object "
                         "of domain -> {\"url\": ...})")
    unknown = set(raw) - {"model", "store", "backends", "name", *LIMITS}
    if unknown:
        raise InputError(f"route config {path}: unknown keys {', '.join(sorted(unknown))}")
    backends = {name: _backend(path, name, spec) for name, spec in raw["backends"].items()}
    if GENERALIST not in backends:
        raise InputError(f"route config {path} has no \"{GENERALIST}\" backend; requests that match no domain, and "
                         "those whose backend is down, go there")
    here = path.resolve().parent
    resolve = lambda p: p if p in TESTBEDS or Path(p).is_absolute() else str(here / p)  # noqa: E731
    options = {k: raw[k] for k in ("name", *LIMITS) if k in raw}
    for key, value in options.items():
        if key == "name" and not (isinstance(value, str) and value.strip()):
            raise InputError(f"route config {path}: \"name\" must be a non-empty string")
        if key != "name" and (isinstance(value, bool) or not isinstance(value, (int, float))
                              or not math.isfinite(value) or not 0 < value <= LIMITS[key]):
            raise InputError(f"route config {path}: \"{key}\" must be a positive number, got {value!r} (at most "
                             f"{LIMITS[key]:g})")
    if "retrieval_tokens" in options and not isinstance(options["retrieval_tokens"], int):
        raise InputError(f"route config {path}: \"retrieval_tokens\" must be a whole number of tokens, got "
                         f"{options['retrieval_tokens']!r}")
    return RouteConfig(resolve(raw["model"]), resolve(raw["store"]), backends, **options)


def _read_json(path: Path):
    """The config's JSON value; a duplicated key is an error (JSON would silently keep the last one)."""

    def unique(pairs: list[tuple[str, object]]) -> dict:
        keys = [k for k, _ in pairs]
        twice = sorted({k for k in keys if keys.count(k) > 1})
        if twice:
            raise InputError(f"route config {path} names {', '.join(map(repr, twice))} twice; JSON would keep only "
                             "the last one, so say each once")
        return dict(pairs)

    try:
        text = read_small_text(path, "route config").removeprefix("\ufeff")  # a BOM, as some editors write
        return json.loads(text, object_pairs_hook=unique)
    except FileNotFoundError:
        raise MissingFileError(f"route config {path} does not exist") from None
    except InputError:
        raise
    except RecursionError:
        raise InputError(f"route config {path} is nested too deeply to be a route config") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(f"route config {path} is not valid JSON ({e}); see `premoe route --help`") from None


def _backend(path: Path, name: str, spec) -> Backend:
    where = f"route config {path}: backend {name!r}"
    if not name.strip():
        raise InputError(f"route config {path}: a backend's name is empty; name it after a stored domain or "
                         f"\"{GENERALIST}\"")
    if not isinstance(spec, dict) or not isinstance(spec.get("url"), str):
        raise InputError(f"{where} needs \"url\": \"http(s)://host:port\"")
    extra = set(spec) - {"url", "model", "api_key"}
    if extra or not all(isinstance(spec.get(k), (str, type(None))) for k in ("model", "api_key")):
        raise InputError(f"{where} takes \"url\", \"model\" and \"api_key\" (strings)")
    empty = [k for k in ("model", "api_key") if isinstance(spec.get(k), str) and not spec[k].strip()]
    if empty:
        raise InputError(f"{where}: \"{empty[0]}\" is empty; give a value or leave the key out")
    return Backend(name, _base_url(where, spec["url"]), spec.get("model"), spec.get("api_key"))


def _base_url(where: str, url: str) -> str:
    """``url`` without a trailing slash, if it is an http(s) server root (a path prefix is allowed, /v1 is not)."""
    from urllib.parse import urlsplit

    problem = None
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number in 0..65535
        httpx.URL(url)
    except (ValueError, httpx.InvalidURL) as e:
        problem = str(e)
    else:
        if parts.scheme not in ("http", "https") or not parts.hostname:
            problem = "it needs http:// or https:// and a host"
        elif any(c.isspace() for c in url) or parts.query or parts.fragment or parts.username or parts.password:
            problem = "it may not hold spaces, a query, a fragment or credentials (use \"api_key\")"
        elif parts.path.rstrip("/").endswith("/v1"):
            problem = ("it ends in /v1: give the server's root, premoe appends /v1/completions, "
                       "/v1/chat/completions and /health")
    if problem:
        raise InputError(f"{where}: \"url\" {url[:200]!r} is not http(s)://host:port: {problem}")
    return url.rstrip("/")


def check_no_loop(config: RouteConfig, host: str, port: int) -> None:
    """Refuse a backend URL that is the router's own address: every request would be forwarded to itself."""
    from urllib.parse import urlsplit

    from premoe.guard import is_loopback

    everywhere = host in ("0.0.0.0", "::", "")
    for name, backend in config.backends.items():
        parts = urlsplit(backend.url)
        same_host = parts.hostname == host.strip("[]").lower() or \
            (is_loopback(parts.hostname) and (is_loopback(host) or everywhere))
        if same_host and (parts.port or (443 if parts.scheme == "https" else 80)) == port:
            raise InputError(f"route config: backend {name!r} ({backend.url}) is this router's own address "
                             f"({host}:{port}); requests would be forwarded to the router itself. Give the backend's "
                             "URL or another --port")


# --------------------------------------------------------------------------- the router's state


class Router:
    """Retrieval over the first MoE layer, backend health, and the counters /metrics shows."""

    def __init__(self, config: RouteConfig, retriever, tokenizer):
        self.config, self.retriever, self.tokenizer = config, retriever, tokenizer
        domains = set(retriever.store.domains) | {GENERALIST}
        stray = sorted(set(config.backends) - domains)
        if stray:
            raise InputError(f"route config names backends for {', '.join(stray)}, which the store does not have "
                             f"(its domains: {', '.join(sorted(retriever.store.domains))})")
        self.lock = threading.Lock()  # the retriever handles one request at a time
        self.up: dict[str, bool] = dict.fromkeys(config.backends, True)  # optimistic until the first check
        self.failed_checks: dict[str, int] = dict.fromkeys(config.backends, 0)  # requests waiting on one give up
        self._metrics_lock = threading.Lock()
        self.counters: dict[str, float] = dict.fromkeys(
            ["requests", "retrieval_seconds", "forward_seconds", "forwarded", "unanswered", "continued_streams",
             "errors", "rejected"], 0)  # errors: refused by the router itself (4xx); rejected: 429s among them
        self.decisions: dict[tuple[str, str], int] = {}  # (retrieved domain, backend that answered) -> requests
        self.fallbacks: dict[str, int] = {}  # reason -> requests moved to another backend

    @classmethod
    def load(cls, config: RouteConfig) -> "Router":
        """Load the store, the base model up to its first MoE layer, and the tokenizer."""
        from premoe.adapters import get_adapter
        from premoe.modeling import load_tokenizer, model_identity
        from premoe.retrieval import Retriever
        from premoe.store import Store

        store = Store.load(config.store)
        if model_identity(config.model)["config_hash"] != store.model["config_hash"]:
            raise InputError(f"store {config.store} was built for {store.model['name']}, not {config.model}; "
                             "build a store for the fleet's base model")
        model = load_first_layers(config.model, store.moe_layers[0] + 1)
        tokenizer = load_tokenizer(config.model)
        return cls(config, Retriever(model, get_adapter(model.config, model), store, tokenizer), tokenizer)

    def decide(self, text: str):
        """The retrieval for ``text`` (runs the first MoE layer; call it off the event loop)."""
        with self.lock:
            hit = self.retriever.retrieve(text, tokens=self.config.retrieval_tokens)
        self.count(retrieval_seconds=hit.seconds)
        return hit

    def candidates(self, domain: str) -> list[Backend]:
        """Backends to try in order: the domain's, the generalist, every other; the live ones first."""
        names = [domain, GENERALIST, *sorted(self.config.backends)]
        ordered = [self.config.backends[n] for n in dict.fromkeys(names) if n in self.config.backends]
        return [b for b in ordered if self.up[b.name]] + [b for b in ordered if not self.up[b.name]]

    def count(self, **increments: float) -> None:
        with self._metrics_lock:
            for key, value in increments.items():
                self.counters[key] += value

    def record(self, domain: str, backend: str | None, fallbacks: list[str]) -> None:
        with self._metrics_lock:
            if backend is not None:
                self.decisions[domain, backend] = self.decisions.get((domain, backend), 0) + 1
            for reason in fallbacks:
                self.fallbacks[reason] = self.fallbacks.get(reason, 0) + 1

    def metrics_text(self) -> str:
        """Prometheus text format."""
        from premoe.serve import label

        with self._metrics_lock:
            lines = [f"premoe_route_{k}_total {v:g}" for k, v in self.counters.items()]
            lines += [f'premoe_route_decisions_total{{domain="{label(d)}",backend="{label(b)}"}} {n}'
                      for (d, b), n in sorted(self.decisions.items())]
            lines += [f'premoe_route_fallbacks_total{{reason="{r}"}} {n}' for r, n in sorted(self.fallbacks.items())]
            lines += [f'premoe_route_backend_up{{backend="{label(b)}"}} {int(u)}' for b, u in sorted(self.up.items())]
        return "\n".join(lines) + "\n"

    async def watch_health(self, client: httpx.AsyncClient) -> None:
        """Check every backend's /health forever, every ``health_interval`` seconds."""
        while True:
            await asyncio.gather(*(self._check(client, b) for b in self.config.backends.values()))
            await asyncio.sleep(self.config.health_interval)

    async def _check(self, client: httpx.AsyncClient, backend: Backend) -> None:
        try:
            response = await client.get(backend.url + "/health", headers=_auth(backend),
                                        timeout=self.config.connect_timeout)
            up = response.status_code == 200
        except Exception:  # noqa: BLE001 - whatever went wrong, it is not up; the watcher itself must never die
            up = False
        self.up[backend.name] = up
        if not up:
            self.failed_checks[backend.name] += 1


def load_first_layers(model: str | Path, layers: int):
    """The checkpoint with only its first ``layers`` decoder layers (fp32, eval): all retrieval runs.

    Later layers' weights are never read, so a router for a 700 GB model
    holds a few GB. Falls back to the whole model if the config cannot be cut.
    """
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from premoe.modeling import load_model, resolve_model_path, transformers_config
    from premoe.progress import loading

    path = resolve_model_path(model)
    config = transformers_config(path)
    config.num_hidden_layers = layers
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "weights of layers N.. not used" is the point, not a problem
    try:
        with loading(path):  # transformers' bar only for a long load on a terminal (premoe.progress)
            return AutoModelForCausalLM.from_pretrained(path, config=config, dtype=torch.float32).eval()
    except (ValueError, TypeError, RuntimeError, OSError):
        return load_model(model)
    finally:
        hf_logging.set_verbosity(verbosity)


def _auth(backend: Backend) -> dict[str, str]:
    return {"authorization": f"Bearer {backend.api_key}"} if backend.api_key else {}


# --------------------------------------------------------------------------- forwarding

POLL_S = 0.1  # how often a request waiting on a backend checks that its client and that backend are still there
MAX_ANSWER_BYTES = 64 << 20  # a non-streaming answer larger than this is no completion: the backend is broken
MISCONFIGURED = frozenset({401, 403, 404, 405})  # the router's key, model id or URL is wrong for that backend


class _Failed(Exception):
    """A backend could not answer: moved on to the next one, for ``reason``."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class _ClientGone(Exception):
    """The client disconnected while its request waited on a backend (its connection is closed, cancelling it)."""


@dataclass
class _Call:
    """One client request on its way through the fleet."""

    request: OpenAIRequest
    body: dict  # the client's JSON, validated
    path: str  # /v1/completions or /v1/chat/completions
    domain: str  # what retrieval chose
    fallbacks: list[str] = field(default_factory=list)  # reasons a backend was skipped

    def body_for(self, backend: Backend) -> dict:
        body = {k: v for k, v in self.body.items() if k != "model"}
        return {**body, "model": backend.model} if backend.model else body


async def _wait(router: Router, backend: Backend, work, request: Request | None = None):
    """``work``'s result; :class:`_ClientGone` once ``request``'s client left, :class:`_Failed` once a health check
    of ``backend`` fails meanwhile (a frozen backend keeps its connections open and silent forever)."""
    checks = router.failed_checks[backend.name]
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=POLL_S)
            if done:
                return task.result()
            if router.failed_checks[backend.name] > checks:
                raise _Failed("down (stopped answering)")
            if request is not None and await request.is_disconnected():
                raise _ClientGone()
    finally:
        if not task.done():
            task.cancel()
            task.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved: asyncio logs nothing


async def _open(client: httpx.AsyncClient, backend: Backend, path: str, body: dict, stream: bool) -> httpx.Response:
    """The backend's response (headers read, body not yet), or :class:`_Failed` when it cannot serve the request.

    Passed on to the client: 200 and the 4xx that are about the request
    itself. Anything else moves the request on: 429, 5xx, a 401/403/404/405
    (the router's config is wrong for that backend, not the client's
    request), other statuses, and a stream that is not server-sent events.
    """
    try:
        request = client.build_request("POST", backend.url + path, json=body, headers=_auth(backend))
        response = await client.send(request, stream=True)
    except (httpx.HTTPError, httpx.InvalidURL) as e:
        raise _Failed(_reason(e)) from e
    status, kind = response.status_code, response.headers.get("content-type", "")
    reason = ("overloaded" if status == 429 else f"error {status}" if status >= 500
              else f"refused {status}" if status in MISCONFIGURED
              else f"bad_answer {status}" if status != 200 and not 400 <= status < 500
              else "bad_answer (not an event stream)" if stream and status == 200
              and not kind.startswith("text/event-stream") else None)
    if reason:
        await _close(response)
        raise _Failed(reason)
    return response


async def _first_answer(router: Router, client: httpx.AsyncClient, call: _Call, stream: bool,
                        request: Request | None = None, skip: set[str] = frozenset()) -> tuple[Backend, httpx.Response]:
    """Try the candidates in order until one answers; a dead one is marked down at once."""
    for backend in router.candidates(call.domain):
        if backend.name in skip:
            continue
        try:
            opening = _open(client, backend, call.path, call.body_for(backend), stream)
            return backend, await _wait(router, backend, opening, request)
        except _Failed as e:
            _skipped(router, call, backend, e.reason)
    router.count(unanswered=1)
    raise ApiError(503, "no backend of this router could answer (all are down, overloaded or broken); retry later",
                   "no_backend", "server_error", headers={"Retry-After": "2"})


async def _answer(router: Router, client: httpx.AsyncClient, call: _Call, stream: bool,
                  request: Request) -> tuple[Backend, httpx.Response, dict | None]:
    """(backend, response, its JSON) from the first backend that answers properly.

    A stream's 200 comes back unread (JSON None) for :func:`_relay`; any
    other answer is read whole, and a backend whose connection breaks, that
    goes silent past ``backend_timeout`` or whose 200 is not a completion
    passes the request on to the next.
    """
    tried: set[str] = set()
    while True:
        backend, response = await _first_answer(router, client, call, stream, request, skip=tried)
        tried.add(backend.name)
        if stream and response.status_code == 200:
            return backend, response, None
        try:
            body = await _wait(router, backend, _read_capped(response), request)
            return backend, response, _content(response.status_code, body)
        except (httpx.HTTPError, _Failed) as e:
            _skipped(router, call, backend, _reason(e))
        finally:
            await _close(response)


def _skipped(router: Router, call: _Call, backend: Backend, reason: str) -> None:
    if reason.startswith(("down", "hung")):
        router.up[backend.name] = False  # the health check brings it back
    call.fallbacks.append(reason.split(" ")[0])


def _reason(error: Exception) -> str:
    if isinstance(error, _Failed):
        return error.reason
    return "hung" if isinstance(error, httpx.ReadTimeout) else f"down ({type(error).__name__})"  # silent too long


async def _read_capped(response: httpx.Response) -> bytes:
    chunks, size = [], 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > MAX_ANSWER_BYTES:
            raise _Failed(f"bad_answer (more than {MAX_ANSWER_BYTES} bytes)")
        chunks.append(chunk)
    return b"".join(chunks)


def _content(status: int, body: bytes) -> dict:
    """A backend's answer as the client gets it: a 200 must be a completion (else :class:`_Failed`); a 4xx is
    passed on, in OpenAI's error shape."""
    try:
        content = json.loads(body)
    except (ValueError, RecursionError):
        content = None
    if status == 200:
        if not (isinstance(content, dict) and isinstance(content.get("choices"), list)):
            raise _Failed("bad_answer (not a completion)")
        return content
    if isinstance(content, dict) and isinstance(content.get("error"), dict):
        return content
    text = body[:200].decode("utf-8", "replace")
    return error_body(f"the backend refused the request with HTTP {status}: {text!r}", code="backend_refused")


async def _close(response: httpx.Response) -> None:
    with anyio.CancelScope(shield=True):  # even when the client left: closing it cancels the backend's work
        await response.aclose()


def create_route_app(router: Router, guard: GuardConfig | None = None, docs: bool = False) -> FastAPI:
    """The router's FastAPI app: /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        limits = httpx.Limits(max_connections=256, max_keepalive_connections=64)
        timeout = httpx.Timeout(router.config.backend_timeout, connect=router.config.connect_timeout)
        async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
            app.state.client = client
            watcher = asyncio.create_task(router.watch_health(client))
            yield
            watcher.cancel()

    app = guarded_app("premoe route", guard, docs, router.count, lifespan=lifespan)
    started = int(time.time())

    @app.get("/health")
    async def health():
        return {"status": "ok" if any(router.up.values()) else "degraded", "model": router.config.name,
                "backends": dict(router.up)}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(router.metrics_text())

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": router.config.name, "object": "model", "created": started,
                                            "owned_by": "premoe"}]}

    async def handle(request: Request, chat: bool):
        router.count(requests=1)
        raw = await request.body()
        parsed = await asyncio.to_thread(parse_request, raw, chat)  # the same 400s a backend would give
        if parsed.model is not None and parsed.model != router.config.name:
            raise ApiError(404, f"the model {parsed.model[:100]!r} does not exist; this router serves "
                                f"{router.config.name!r}", "model_not_found", param="model")
        try:
            hit = await asyncio.to_thread(router.decide, _retrieval_text(parsed))
        except InputError as e:  # e.g. a text that the tokenizer turns into no tokens
            raise ApiError(400, str(e), param="messages" if chat else "prompt") from None
        call = _Call(parsed, json.loads(raw), "/v1/chat/completions" if chat else "/v1/completions", hit.domain)
        started_forward = time.perf_counter()
        try:
            backend, response, content = await _answer(router, request.app.state.client, call, parsed.stream,
                                                        request)
        except _ClientGone:
            return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
        headers = {"x-premoe-route-domain": hit.domain, "x-premoe-route-backend": backend.name}
        if content is None:
            return StreamingResponse(_relay(router, request.app.state.client, call, backend, response,
                                            started_forward), media_type="text/event-stream", headers=headers)
        router.count(forwarded=1, forward_seconds=time.perf_counter() - started_forward)
        router.record(hit.domain, backend.name, call.fallbacks)
        if response.status_code == 200:
            content["premoe_route"] = {"domain": hit.domain, "nearest": hit.nearest, "distance": hit.distance,
                                       "fallback": hit.fallback, "backend": backend.name, "skipped": call.fallbacks,
                                       "retrieval_seconds": hit.seconds}
        return JSONResponse(content, status_code=response.status_code, headers=headers)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await handle(request, chat=True)

    return app


def _retrieval_text(request: OpenAIRequest) -> str:
    """What retrieval matches: the prompt, or the latest user message of a chat (as ``premoe serve`` does)."""
    if not request.chat:
        return request.prompt
    return request.latest_user_message or "\n".join(m["content"] for m in request.messages) or " "


async def _relay(router: Router, client: httpx.AsyncClient, call: _Call, backend: Backend,
                 response: httpx.Response, started: float):
    """Forward a backend's server-sent events as they arrive; continue on another backend if it dies mid-stream.

    Dying includes a broken connection, silence past ``backend_timeout``, a
    failed health check and an event that is not OpenAI's JSON (such an
    event is never forwarded).
    """
    streamed: list[str] = []  # text deltas the client has received
    ident = None  # the stream's id, kept by continuations
    tried, continuing = {backend.name}, False
    while True:
        finished, reason = False, "died_mid_stream"
        try:
            lines = response.aiter_lines()
            while (line := await _wait(router, backend, _next_line(lines))) is not None:
                if line.startswith("data:") and line[5:].strip() == "[DONE]":
                    finished = True
                    break
                if line.startswith("data:"):
                    event = _event(line)
                    if event is None:
                        reason = "bad_answer"
                        break
                    ident = ident or event.get("id")
                    streamed.append(_delta_text(event))
                    finished = "error" in event  # the backend's own error event: passed on, then [DONE]
                    line = "data: " + json.dumps(_as_continuation(event, call, ident) if continuing else event)
                elif line and not line.startswith(":"):
                    continue  # not part of OpenAI's streams (event:, id:, retry:, noise): dropped
                yield line + "\n" if line else "\n"  # events, blank separators and comments (keep-alives)
        except (httpx.HTTPError, _Failed):
            pass  # died mid-stream: continued below
        finally:
            await _close(response)
        if finished:
            break
        call.fallbacks.append(reason)
        if reason != "bad_answer":
            router.up[backend.name] = False
        router.count(continued_streams=1)
        try:
            backend, response = await _continue(router, client, call, "".join(streamed), tried)
        except ApiError as e:  # every backend is down: say so in the stream's own format
            yield f"data: {json.dumps(e.body())}\n\n"
            break
        tried.add(backend.name)
        continuing = True
    yield "data: [DONE]\n\n"
    router.count(forwarded=1, forward_seconds=time.perf_counter() - started)
    router.record(call.domain, backend.name, call.fallbacks)


async def _next_line(lines) -> str | None:
    """The next line of a response, None at its end."""
    try:
        return await lines.__anext__()
    except StopAsyncIteration:
        return None


async def _continue(router: Router, client: httpx.AsyncClient, call: _Call, partial: str,
                    tried: set[str]) -> tuple[Backend, httpx.Response]:
    """Open a completion stream on the next backend that continues ``partial`` from where the dead one stopped."""
    from premoe.serve import render_chat

    request = call.request
    prompt = (render_chat(router.tokenizer, request.messages) if request.chat else request.prompt) + partial
    body = {k: v for k, v in call.body.items() if k in ("temperature", "top_p", "stop", "seed", "user")}
    if request.max_tokens is not None:
        done = len(router.tokenizer(partial, add_special_tokens=False)["input_ids"]) if partial else 0
        body["max_tokens"] = max(1, request.max_tokens - done)
    continuation = _Call(request, {**body, "prompt": prompt, "stream": True}, "/v1/completions", call.domain,
                         call.fallbacks)
    backend, response = await _first_answer(router, client, continuation, stream=True, skip=tried)
    if response.status_code != 200:  # a 4xx about the continuation, e.g. the longer prompt is past its limit
        try:
            error = _content(response.status_code, await _read_capped(response))["error"]
        except (httpx.HTTPError, _Failed):
            error = {}
        finally:
            await _close(response)
        raise ApiError(response.status_code, f"the backend streaming this answer failed and {backend.name!r} could "
                                             f"not continue it: {str(error.get('message'))[:300]}",
                       "continuation_refused", "server_error")
    return backend, response


def _event(line: str) -> dict | None:
    """The JSON of a ``data:`` line if it is an OpenAI stream event (an error, or a list of choice objects)."""
    try:
        event = json.loads(line[len("data:"):].removeprefix(" "))
    except (ValueError, RecursionError):
        return None
    if not isinstance(event, dict):
        return None
    choices = event.get("choices")
    if "error" in event or (isinstance(choices, list) and all(isinstance(c, dict) for c in choices)):
        return event
    return None


def _delta_text(event: dict) -> str:
    choices = event.get("choices") or [{}]
    choice = choices[0]
    delta = choice.get("delta") if isinstance(choice.get("delta"), dict) else {}
    text = choice.get("text", delta.get("content"))
    return text if isinstance(text, str) else ""


def _as_continuation(event: dict, call: _Call, ident: str | None) -> dict:
    """A continuation's completion chunk, dressed as the original stream's (chat chunks for a chat)."""
    event = {**event, "id": ident or event.get("id")}
    if not call.request.chat or "choices" not in event:
        return event
    choices = []
    for choice in event["choices"]:
        text = choice.get("text", "")
        choices.append({"index": choice.get("index", 0), "delta": {"content": text} if text else {},
                        "finish_reason": choice.get("finish_reason")})
    return {**event, "object": "chat.completion.chunk", "choices": choices}


# --------------------------------------------------------------------------- serving


def route_server_config(router: Router, host: str, port: int, guard: GuardConfig | None = None, docs: bool = False):
    """The uvicorn config of the router: guarded app, header deadline (as ``premoe serve``)."""
    import uvicorn

    guard = guard or GuardConfig(allowed_hosts=loopback_hosts(host, port))
    return uvicorn.Config(create_route_app(router, guard, docs), host=host, port=port, log_level="warning",
                          http=deadline_protocol(guard.read_timeout), timeout_keep_alive=5)

