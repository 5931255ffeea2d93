"""The router's HTTP side: the FastAPI app (/v1/completions, /v1/chat/completions, /v1/models, /health, /metrics)
and its uvicorn config.

A request passes the same front door as ``premoe serve`` (:mod:`premoe.guard`,
then :func:`~premoe.openai_request.parse_request`), is retrieved on the
router's model (:meth:`Router.decide <premoe.route.router.Router.decide>`),
and is forwarded by :mod:`premoe.route.relay`. Its decision shows in the
``x-premoe-route-domain`` / ``-backend`` headers and, unless it streams, in a
``premoe_route`` field of the response.

Example::

    router = Router.load(load_config("route.json"))
    uvicorn.Server(route_server_config(router, "127.0.0.1", 9000)).run()
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import time

import httpx
from fastapi import FastAPI, Request  # module level: FastAPI resolves the handlers' string annotations here
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from premoe.errors import InputError
from premoe.guard import ApiError, GuardConfig, guarded_app, loopback_hosts, uvicorn_config
from premoe.openai_request import OpenAIRequest, check_model, model_list, parse_request
from premoe.route.relay import Call, ClientGone, answer, relay
from premoe.route.router import Router


def create_route_app(router: Router, guard: GuardConfig | None = None, docs: bool = False) -> FastAPI:
    """The router's FastAPI app: /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics.

    Its lifespan owns the HTTP client every backend call shares and the
    health checker (:meth:`Router.watch_health`), so both end with the app.
    """

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
        return model_list(router.config.name, started)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _handle(router, request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _handle(router, request, chat=True)

    return app


async def _handle(router: Router, request: Request, chat: bool) -> Response:
    """Validate, retrieve, forward: one completion or chat request, answered by the first backend that can."""
    router.count(requests=1)
    raw = await request.body()
    parsed = await asyncio.to_thread(parse_request, raw, chat)  # the same 400s a backend would give
    check_model(parsed, router.config.name, "router")
    try:
        hit = await asyncio.to_thread(router.decide, _retrieval_text(parsed))
    except InputError as e:  # e.g. a text that the tokenizer turns into no tokens
        raise ApiError(400, str(e), param="messages" if chat else "prompt") from None
    call = Call(parsed, json.loads(raw), "/v1/chat/completions" if chat else "/v1/completions", hit.domain)
    started_forward = time.perf_counter()
    client = request.app.state.client
    try:
        backend, response, content = await answer(router, client, call, parsed.stream, request)
    except ClientGone:
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
    headers = {"x-premoe-route-domain": hit.domain, "x-premoe-route-backend": backend.name}
    if content is None:
        return StreamingResponse(relay(router, client, call, backend, response, started_forward),
                                 media_type="text/event-stream", headers=headers)
    router.count(forwarded=1, forward_seconds=time.perf_counter() - started_forward)
    router.record(hit.domain, backend.name, call.fallbacks)
    if response.status_code == 200:
        content["premoe_route"] = {"domain": hit.domain, "nearest": hit.nearest, "distance": hit.distance,
                                   "fallback": hit.fallback, "backend": backend.name, "skipped": call.fallbacks,
                                   "retrieval_seconds": hit.seconds}
    return JSONResponse(content, status_code=response.status_code, headers=headers)


def _retrieval_text(request: OpenAIRequest) -> str:
    """What retrieval matches: the prompt, or the latest user message of a chat (as ``premoe serve`` does)."""
    if not request.chat:
        return request.prompt
    return request.latest_user_message or "\n".join(m["content"] for m in request.messages) or " "


def route_server_config(router: Router, host: str, port: int, guard: GuardConfig | None = None, docs: bool = False):
    """The uvicorn config of the router: guarded app, header deadline (as ``premoe serve``)."""
    guard = guard or GuardConfig(allowed_hosts=loopback_hosts(host, port))
    return uvicorn_config(create_route_app(router, guard, docs), host, port, guard)
