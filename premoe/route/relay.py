"""Moving one request through the fleet until a backend answers it: failover, and streams continued mid-way.

The rules, in the order they apply:

1. **Order.** :meth:`Router.candidates <premoe.route.router.Router.candidates>`:
   the retrieved domain's backend, the generalist, then every other backend
   by name; backends marked down go after all live ones (never skipped: a
   backend marked down may be back before its health check says so).
2. **Opening** (:func:`answer`). A backend's answer is passed on to the
   client when it is a 200 or a 4xx about the request itself. It is skipped
   for the next candidate, with the reason that ``/metrics`` counts, when:

   * no connection, or it broke: ``down``, and it is marked down;
   * silent past ``backend_timeout``: ``hung``, and it is marked down;
   * its health check failed while the request waited: ``down``, and it is marked down;
   * 429: ``overloaded``;
   * 5xx: ``error``;
   * 401, 403, 404 or 405 (the router's key, model id or URL is wrong for it): ``refused``;
   * any other status but 200 and 4xx; a stream's 200 that is not
     ``text/event-stream``; a non-streaming 200 that is not a completion or
     is larger than :data:`MAX_ANSWER_BYTES`: ``bad_answer``.

   Each backend is tried once. When every backend has been skipped the
   client gets 503 ``no_backend`` with ``Retry-After: 2``; a client that
   disconnects while waiting gets nothing (499), and its backend's
   connection is closed, which cancels the work there.
3. **Mid-stream** (:func:`relay`). A stream's events are forwarded line by
   line as they arrive. Its backend dies (reason ``died_mid_stream``, marked
   down) when the connection breaks, it goes silent past ``backend_timeout``,
   its health check fails or its stream ends without ``[DONE]``; it answers
   ``bad_answer`` (not marked down) when an event is not OpenAI's JSON (that
   event is never forwarded). Either way the text streamed so far is
   appended to the prompt (for a chat, to the rendered chat prompt) and the
   rest is asked of the next backend (rule 1's order, rule 2's skips) that
   has not streamed part of this answer yet, as a completion stream with
   ``max_tokens`` less what was streamed; its events keep the stream's
   id and, for a chat, chat chunks' shape. A stream that ends on the
   backend's own error event is finished, not continued. When no backend can
   continue, or one refuses the continuation (4xx), the stream ends with an
   error event, then ``[DONE]``.

Example::

    call = Call(parsed, body, "/v1/completions", hit.domain)
    backend, response, content = await answer(router, client, call, parsed.stream, request)
    if content is None:  # a stream: pass its events on
        return StreamingResponse(relay(router, client, call, backend, response, started))
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import anyio
import httpx
from fastapi import Request

from premoe.guard import ApiError, error_body
from premoe.openai_request import OpenAIRequest
from premoe.route.config import Backend
from premoe.route.router import Router

POLL_S = 0.1  # how often a request waiting on a backend checks that its client and that backend are still there
MAX_ANSWER_BYTES = 64 << 20  # a non-streaming answer larger than this is no completion: the backend is broken
MISCONFIGURED = frozenset({401, 403, 404, 405})  # the router's key, model id or URL is wrong for that backend
CONTINUED_FIELDS = ("temperature", "top_p", "stop", "seed", "user")  # what a continuation keeps of the request


class ClientGone(Exception):
    """The client disconnected while its request waited on a backend (its connection is closed, cancelling it)."""


class _Failed(Exception):
    """A backend could not answer: moved on to the next one, for ``reason``."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class Call:
    """One client request on its way through the fleet."""

    request: OpenAIRequest
    body: dict  # the client's JSON, validated
    path: str  # /v1/completions or /v1/chat/completions
    domain: str  # what retrieval chose
    fallbacks: list[str] = field(default_factory=list)  # reasons a backend was skipped

    def body_for(self, backend: Backend) -> dict:
        """The JSON sent to ``backend``: the client's, with the backend's own model id (or none)."""
        body = {k: v for k, v in self.body.items() if k != "model"}
        return {**body, "model": backend.model} if backend.model else body


# --------------------------------------------------------------------------- opening: rule 2


async def answer(router: Router, client: httpx.AsyncClient, call: Call, stream: bool,
                 request: Request) -> tuple[Backend, httpx.Response, dict | None]:
    """(backend, response, its JSON) from the first backend that answers properly (rule 2 of the module).

    A stream's 200 comes back unread (JSON None) for :func:`relay`; any
    other answer is read whole, and a backend whose connection breaks, that
    goes silent past ``backend_timeout`` or whose 200 is not a completion
    passes the request on to the next. Raises :class:`ApiError` 503 when no
    backend answers, :class:`ClientGone` when the client left meanwhile.
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


async def _first_answer(router: Router, client: httpx.AsyncClient, call: Call, stream: bool,
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


async def _open(client: httpx.AsyncClient, backend: Backend, path: str, body: dict, stream: bool) -> httpx.Response:
    """The backend's response (headers read, body not yet), or :class:`_Failed` when it cannot serve the request."""
    try:
        request = client.build_request("POST", backend.url + path, json=body, headers=backend.auth_headers())
        response = await client.send(request, stream=True)
    except (httpx.HTTPError, httpx.InvalidURL) as e:
        raise _Failed(_reason(e)) from e
    reason = _unusable(response.status_code, response.headers.get("content-type", ""), stream)
    if reason:
        await _close(response)
        raise _Failed(reason)
    return response


def _unusable(status: int, content_type: str, stream: bool) -> str | None:
    """Why a response with these headers is not the backend's answer (rule 2's table), None when it is."""
    if status == 429:
        return "overloaded"
    if status >= 500:
        return f"error {status}"
    if status in MISCONFIGURED:
        return f"refused {status}"
    if status != 200 and not 400 <= status < 500:
        return f"bad_answer {status}"
    if stream and status == 200 and not content_type.startswith("text/event-stream"):
        return "bad_answer (not an event stream)"
    return None


async def _wait(router: Router, backend: Backend, work, request: Request | None = None):
    """``work``'s result; :class:`ClientGone` once ``request``'s client left, :class:`_Failed` once a health check
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
                raise ClientGone()
    finally:
        if not task.done():
            task.cancel()
            task.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved: asyncio logs nothing


def _skipped(router: Router, call: Call, backend: Backend, reason: str) -> None:
    """Note why ``backend`` was skipped; a dead or hung one is marked down until its health check passes."""
    if reason.startswith(("down", "hung")):
        router.mark_down(backend)
    call.fallbacks.append(reason.split(" ")[0])


def _reason(error: Exception) -> str:
    """The fallback reason for a failed call: ``hung`` (silent too long), ``down (...)`` or :class:`_Failed`'s."""
    if isinstance(error, _Failed):
        return error.reason
    return "hung" if isinstance(error, httpx.ReadTimeout) else f"down ({type(error).__name__})"


async def _read_capped(response: httpx.Response) -> bytes:
    """The whole body, or :class:`_Failed` past :data:`MAX_ANSWER_BYTES`."""
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
    """Close a backend's response, even when the client left: closing it cancels the backend's work."""
    with anyio.CancelScope(shield=True):
        await response.aclose()


# --------------------------------------------------------------------------- streams: rule 3


@dataclass
class _Relayed:
    """What the client has received of one streamed answer, across the backends that produced it."""

    text: list[str] = field(default_factory=list)  # text deltas the client has received
    ident: str | None = None  # the stream's id, kept by continuations
    continuing: bool = False  # events now come from a continuation: dressed as the original stream's
    finished: bool = False  # the current backend ended the stream ([DONE], or after its own error event)
    reason: str = "died_mid_stream"  # why the current backend's stream stopped, when it did not finish


async def relay(router: Router, client: httpx.AsyncClient, call: Call, backend: Backend, response: httpx.Response,
                started: float) -> AsyncIterator[str]:
    """Forward a backend's server-sent events as they arrive; continue on another backend if it dies mid-stream.

    Rule 3 of the module. Counts the request as forwarded (``started``: when
    forwarding began, :func:`time.perf_counter`) once the stream ends.
    """
    relayed, tried = _Relayed(), {backend.name}
    while True:
        async with contextlib.aclosing(_pass_on(router, call, backend, response, relayed)) as lines:
            async for line in lines:
                yield line
        if relayed.finished:
            break
        call.fallbacks.append(relayed.reason)
        if relayed.reason != "bad_answer":
            router.mark_down(backend)
        router.count(continued_streams=1)
        try:
            backend, response = await _continue(router, client, call, "".join(relayed.text), tried)
        except ApiError as e:  # every backend is down: say so in the stream's own format
            yield f"data: {json.dumps(e.body())}\n\n"
            break
        tried.add(backend.name)
        relayed.continuing = True
    yield "data: [DONE]\n\n"
    router.count(forwarded=1, forward_seconds=time.perf_counter() - started)
    router.record(call.domain, backend.name, call.fallbacks)


async def _pass_on(router: Router, call: Call, backend: Backend, response: httpx.Response,
                   relayed: _Relayed) -> AsyncIterator[str]:
    """One backend's part of a stream, line by line; leaves ``relayed.finished`` or ``.reason`` for :func:`relay`.

    Forwarded: OpenAI events, blank separators and comments (keep-alives);
    dropped: other SSE fields (``event:``, ``id:``, ``retry:``) and noise.
    """
    relayed.finished, relayed.reason = False, "died_mid_stream"
    try:
        lines = response.aiter_lines()
        while (line := await _wait(router, backend, _next_line(lines))) is not None:
            if line.startswith("data:") and line[5:].strip() == "[DONE]":
                relayed.finished = True
                return
            if line.startswith("data:"):
                event = _event(line)
                if event is None:
                    relayed.reason = "bad_answer"
                    return
                relayed.ident = relayed.ident or event.get("id")
                relayed.text.append(_delta_text(event))
                relayed.finished = "error" in event  # the backend's own error event: passed on, then [DONE]
                line = "data: " + json.dumps(_as_continuation(event, call, relayed.ident) if relayed.continuing
                                             else event)
            elif line and not line.startswith(":"):
                continue
            yield line + "\n" if line else "\n"
    except (httpx.HTTPError, _Failed):
        pass  # died mid-stream: relay continues it
    finally:
        await _close(response)


async def _next_line(lines) -> str | None:
    """The next line of a response, None at its end."""
    try:
        return await lines.__anext__()
    except StopAsyncIteration:
        return None


async def _continue(router: Router, client: httpx.AsyncClient, call: Call, partial: str,
                    tried: set[str]) -> tuple[Backend, httpx.Response]:
    """Open a completion stream on the next backend that continues ``partial`` from where the dead one stopped."""
    from premoe.serve import render_chat

    request = call.request
    prompt = (render_chat(router.tokenizer, request.messages) if request.chat else request.prompt) + partial
    body = {k: v for k, v in call.body.items() if k in CONTINUED_FIELDS}
    if request.max_tokens is not None:
        done = len(router.tokenizer(partial, add_special_tokens=False)["input_ids"]) if partial else 0
        body["max_tokens"] = max(1, request.max_tokens - done)
    continuation = Call(request, {**body, "prompt": prompt, "stream": True}, "/v1/completions", call.domain,
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
    """The text an event adds: a completion chunk's ``text`` or a chat chunk's ``delta.content``."""
    choices = event.get("choices") or [{}]
    choice = choices[0]
    delta = choice.get("delta") if isinstance(choice.get("delta"), dict) else {}
    text = choice.get("text", delta.get("content"))
    return text if isinstance(text, str) else ""


def _as_continuation(event: dict, call: Call, ident: str | None) -> dict:
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
