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
  connection), overloaded (429) or failing (5xx) sends its request to the
  generalist, then to any other live backend. A backend that dies
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
from premoe.guard import ApiError, GuardConfig, deadline_protocol, guarded_app, loopback_hosts
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


def load_config(path: str | Path) -> RouteConfig:
    """Read and check a route config file (JSON); paths in it are relative to the file."""
    path = Path(path)
    try:
        raw = json.loads(read_small_text(path, "route config"))
    except FileNotFoundError:
        raise MissingFileError(f"route config {path} does not exist") from None
    except InputError:
        raise
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(f"route config {path} is not valid JSON ({e}); see `premoe route --help`") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("backends"), dict) or \
            not all(isinstance(raw.get(k), str) for k in ("model", "store")):
        raise InputError(f"route config {path} needs \"model\" and \"store\" (strings) and \"backends\" (an object "
                         "of domain -> {\"url\": ...})")
    unknown = set(raw) - {"model", "store", "backends", "name", "retrieval_tokens", "health_interval",
                          "connect_timeout"}
    if unknown:
        raise InputError(f"route config {path}: unknown keys {', '.join(sorted(unknown))}")
    backends = {name: _backend(path, name, spec) for name, spec in raw["backends"].items()}
    if GENERALIST not in backends:
        raise InputError(f"route config {path} has no \"{GENERALIST}\" backend; requests that match no domain, and "
                         "those whose backend is down, go there")
    here = path.resolve().parent
    resolve = lambda p: p if p in TESTBEDS or Path(p).is_absolute() else str(here / p)  # noqa: E731
    options = {k: raw[k] for k in ("name", "retrieval_tokens", "health_interval", "connect_timeout") if k in raw}
    for key, value in options.items():
        if key == "name" and not (isinstance(value, str) and value):
            raise InputError(f"route config {path}: \"name\" must be a non-empty string")
        if key != "name" and (isinstance(value, bool) or not isinstance(value, (int, float))
                              or not math.isfinite(value) or value <= 0):
            raise InputError(f"route config {path}: \"{key}\" must be a positive number, got {value!r}")
    if "retrieval_tokens" in options and not isinstance(options["retrieval_tokens"], int):
        raise InputError(f"route config {path}: \"retrieval_tokens\" must be a whole number of tokens, got "
                         f"{options['retrieval_tokens']!r}")
    return RouteConfig(resolve(raw["model"]), resolve(raw["store"]), backends, **options)


def _backend(path: Path, name: str, spec) -> Backend:
    if not isinstance(spec, dict) or not isinstance(spec.get("url"), str) or \
            not spec["url"].startswith(("http://", "https://")):
        raise InputError(f"route config {path}: backend {name!r} needs \"url\": \"http(s)://host:port\"")
    extra = set(spec) - {"url", "model", "api_key"}
    if extra or not all(isinstance(spec.get(k), (str, type(None))) for k in ("model", "api_key")):
        raise InputError(f"route config {path}: backend {name!r} takes \"url\", \"model\" and \"api_key\" (strings)")
    return Backend(name, spec["url"].rstrip("/"), spec.get("model"), spec.get("api_key"))


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
        self._metrics_lock = threading.Lock()
        self.counters: dict[str, float] = dict.fromkeys(
            ["requests", "retrieval_seconds", "forward_seconds", "forwarded", "unanswered", "continued_streams"], 0)
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
        with self._metrics_lock:
            lines = [f"premoe_route_{k}_total {v:g}" for k, v in self.counters.items()]
            lines += [f'premoe_route_decisions_total{{domain="{d}",backend="{b}"}} {n}'
                      for (d, b), n in sorted(self.decisions.items())]
            lines += [f'premoe_route_fallbacks_total{{reason="{r}"}} {n}' for r, n in sorted(self.fallbacks.items())]
            lines += [f'premoe_route_backend_up{{backend="{b}"}} {int(u)}' for b, u in sorted(self.up.items())]
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
            self.up[backend.name] = response.status_code == 200
        except httpx.HTTPError:
            self.up[backend.name] = False


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


class _Failed(Exception):
    """A backend could not answer: moved on to the next one, for ``reason``."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


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


async def _open(client: httpx.AsyncClient, backend: Backend, path: str, body: dict, stream: bool) -> httpx.Response:
    """The backend's response (headers read; a stream's body not yet), or :class:`_Failed`."""
    request = client.build_request("POST", backend.url + path, json=body, headers=_auth(backend))
    try:
        response = await client.send(request, stream=stream)
    except httpx.HTTPError as e:
        raise _Failed(f"down ({type(e).__name__})") from e
    if response.status_code == 429 or response.status_code >= 500:
        await response.aclose()
        raise _Failed("overloaded" if response.status_code == 429 else f"error {response.status_code}")
    return response


async def _first_answer(router: Router, client: httpx.AsyncClient, call: _Call, stream: bool,
                        skip: set[str] = frozenset()) -> tuple[Backend, httpx.Response]:
    """Try the candidates in order until one answers; a dead one is marked down at once."""
    for backend in router.candidates(call.domain):
        if backend.name in skip:
            continue
        try:
            return backend, await _open(client, backend, call.path, call.body_for(backend), stream)
        except _Failed as e:
            if e.reason.startswith("down"):
                router.up[backend.name] = False
            call.fallbacks.append(e.reason.split(" ")[0])
    router.count(unanswered=1)
    raise ApiError(503, "no backend of this router could answer (all are down or overloaded); retry later",
                   "no_backend", "server_error", headers={"Retry-After": "2"})


def create_route_app(router: Router, guard: GuardConfig | None = None, docs: bool = False) -> FastAPI:
    """The router's FastAPI app: /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        limits = httpx.Limits(max_connections=256, max_keepalive_connections=64)
        timeout = httpx.Timeout(None, connect=router.config.connect_timeout)  # generations take what they take
        async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
            app.state.client = client
            watcher = asyncio.create_task(router.watch_health(client))
            yield
            watcher.cancel()

    app = guarded_app("premoe route", guard, docs, lifespan=lifespan)
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
        text = _retrieval_text(parsed)
        hit = await asyncio.to_thread(router.decide, text)
        call = _Call(parsed, json.loads(raw), "/v1/chat/completions" if chat else "/v1/completions", hit.domain)
        client: httpx.AsyncClient = request.app.state.client
        started_forward = time.perf_counter()
        backend, response = await _first_answer(router, client, call, parsed.stream)
        headers = {"x-premoe-route-domain": hit.domain, "x-premoe-route-backend": backend.name}
        if parsed.stream and response.status_code == 200:
            return StreamingResponse(_relay(router, client, call, backend, response, started_forward),
                                     media_type="text/event-stream", headers=headers)
        try:
            body = await _read_unless_client_leaves(request, response)
        finally:
            await response.aclose()
        if body is None:
            return Response(status_code=499)
        router.count(forwarded=1, forward_seconds=time.perf_counter() - started_forward)
        router.record(hit.domain, backend.name, call.fallbacks)
        content = json.loads(body) if response.headers.get("content-type", "").startswith("application/json") \
            else {"error": {"message": "the backend answered with something other than JSON", "type": "server_error",
                            "param": None, "code": "bad_backend"}}
        if response.status_code == 200 and isinstance(content, dict):
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


async def _read_unless_client_leaves(request: Request, response: httpx.Response) -> bytes | None:
    """The backend's whole body, or None once the client has gone (closing the backend's connection cancels it)."""
    reading = asyncio.ensure_future(response.aread())
    while True:
        done, _ = await asyncio.wait({reading}, timeout=0.1)
        if done:
            return reading.result()
        if await request.is_disconnected():
            reading.cancel()
            return None


async def _relay(router: Router, client: httpx.AsyncClient, call: _Call, backend: Backend,
                 response: httpx.Response, started: float):
    """Forward a backend's server-sent events as they arrive; continue on another backend if it dies mid-stream."""
    streamed: list[str] = []  # text deltas the client has received
    ident = None  # the stream's id, kept by continuations
    tried, continuing = {backend.name}, False
    while True:
        finished = False
        try:
            async for line in response.aiter_lines():
                if line == "data: [DONE]":
                    finished = True
                    break
                event = _event(line)
                if event is not None:
                    ident = ident or event.get("id")
                    streamed.append(_delta_text(event))
                    finished = "error" in event  # the backend's own error event: passed on, then [DONE]
                    line = "data: " + json.dumps(_as_continuation(event, call, ident) if continuing else event)
                yield line + "\n" if line else "\n"
        except httpx.HTTPError:
            pass  # died mid-stream: continued below
        finally:
            with anyio.CancelScope(shield=True):  # even when the client left: closing it cancels the backend's work
                await response.aclose()
        if finished:
            break
        call.fallbacks.append("died_mid_stream")
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
    return await _first_answer(router, client, continuation, stream=True, skip=tried)


def _event(line: str) -> dict | None:
    if not line.startswith("data: "):
        return None
    try:
        event = json.loads(line[len("data: "):])
    except ValueError:
        return None
    return event if isinstance(event, dict) else None


def _delta_text(event: dict) -> str:
    choices = event.get("choices") or [{}]
    choice = choices[0] if isinstance(choices[0], dict) else {}
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

