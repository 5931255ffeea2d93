"""An OpenAI-compatible server that retrieves a domain per request and swaps its experts in.

Two modes:

* **retrieval** (``premoe serve MODEL --store STORE --experts M``): the
  resident model holds M experts per layer (:class:`~premoe.bank.ExpertBank`);
  each request's layer-1 pattern picks the nearest stored domain (or the
  generalist, :mod:`premoe.retrieval`), the bank swaps in that domain's
  experts, then the model generates.
* **fixed** (``premoe serve COMPILED_DIR``): a compiled specialist or
  generalist served as it is.

One model state at a time: one worker thread runs requests in arrival order
(:mod:`premoe.admission`), and retrieval, swap and generation of a request
run under one lock, so no request ever sees a half-swapped model. At most
``max_queue`` requests run or wait; a request that finds the queue full waits
briefly, in order, for a slot, and is refused (429 with a ``Retry-After``
estimate) only when none frees in time. A
client that disconnects cancels its request: still queued, it never runs;
running, generation stops at the next token. Nothing slow runs on the event
loop: bodies are capped and timed by :mod:`premoe.guard` before they are
read, parsed (:mod:`premoe.openai_request`) and tokenised in a thread, so
``/health`` answers while a huge body is refused or a generation runs.
Every response carries a ``premoe`` field: domain, distance, experts per
layer and what the swap read.

Example::

    engine = Engine.retrieval("testbed", "stores/testbed", experts=16)
    uvicorn.run(create_app(engine), port=8000)
    # curl localhost:8000/v1/completions -H 'content-type: application/json' -d '{"prompt": "def main():"}'
"""
from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from fastapi import Request  # module level: FastAPI resolves the handlers' string annotations here
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from premoe.admission import FifoWorker
from premoe.errors import InputError
from premoe.guard import ApiError, GuardConfig, guarded_app, internal_error, loopback_hosts, uvicorn_config
from premoe.openai_request import OpenAIRequest, check_model, model_list, parse_request

GAUGES = ("in_flight", "waiting")  # metrics that go up and down: admitted requests, requests waiting for a slot
DISCONNECT_POLL_S = 0.1  # how often a waiting non-streaming request checks that its client is still there


@dataclass
class ServeLimits:
    """Bounds that keep one bad request from taking the server down."""

    max_prompt_tokens: int = 2048  # longer prompts are refused (400 context_length_exceeded)
    max_tokens: int = 256  # generated tokens per request; larger requests (and null) are clamped to this
    max_queue: int = 8  # requests running or waiting for the model (FIFO); more are refused (429 + Retry-After)
    retrieval_tokens: int = 256  # request tokens the layer-1 pattern is computed from


@dataclass
class Job:
    """One generation request, validated."""

    input_ids: torch.Tensor  # (1, prompt tokens)
    retrieval_text: str  # what retrieval matches: the prompt, or the latest user message of a chat
    max_tokens: int
    min_tokens: int = 0  # generate at least this many (vLLM's extension; benchmarks use it for equal work)
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None


@dataclass
class Result:
    text: str
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    prompt_tokens: int
    completion_tokens: int
    premoe: dict


# --------------------------------------------------------------------------- the model state


class Engine:
    """The served model: tokenizer, optional retrieval + expert bank, a FIFO worker, one lock, counters."""

    def __init__(self, model, tokenizer, name: str, limits: ServeLimits | None = None, bank=None, retriever=None,
                 experts: int | None = None, fixed: dict | None = None):
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.limits = limits or ServeLimits()
        self.bank, self.retriever, self.experts = bank, retriever, experts
        self.fixed = fixed or {}  # what a fixed model is (domain, experts), from its config
        self.lock = threading.Lock()  # held over retrieve + swap + generate
        self.context = int(getattr(model.config, "max_position_embeddings", 0) or 1 << 30)
        self._kept: dict[str, dict[int, list[int]]] = {}  # target -> its experts at M (make_plan, cached)
        self._metrics_lock = threading.Lock()
        self.metrics: dict[str, float] = dict.fromkeys(
            ["requests", "errors", "rejected", "cancelled", "retrievals", "fallbacks", "swaps", "swap_experts",
             "swap_bytes", "swap_seconds", "retrieval_seconds", "prompt_tokens", "completion_tokens", "in_flight",
             "waiting"], 0)
        self.domains: dict[str, int] = {}  # requests served per domain
        self.current = retriever.store.domains[0] if retriever else self.fixed.get("domain")  # resident experts
        self.queue = FifoWorker(self.limits.max_queue, f"premoe-{name}", self.count)  # runs requests in order
        self._longest_token: int | None = None

    @classmethod
    def retrieval(cls, model: str | Path, store: str | Path, experts: int, limits: ServeLimits | None = None,
                  name: str | None = None) -> "Engine":
        """Serve ``model`` with per-request expert retrieval from ``store``, M = ``experts`` slots per layer."""
        from premoe.bank import ExpertBank
        from premoe.modeling import load_tokenizer, model_identity
        from premoe.retrieval import Retriever
        from premoe.store import Store

        patterns = Store.load(store)
        identity = model_identity(model)
        if identity["config_hash"] != patterns.model["config_hash"]:
            raise InputError(f"store {store} was built for {patterns.model['name']}, not {identity['name']} "
                             "(different config); build a store for this model")
        bank = ExpertBank(model, patterns.kept(patterns.domains[0], experts))
        tokenizer = load_tokenizer(model)
        retriever = Retriever(bank.model, bank.adapter, patterns, tokenizer, router=bank.full_router)
        return cls(bank.model, tokenizer, name or _model_name(model), limits, bank, retriever, experts)

    @classmethod
    def fixed_model(cls, model: str | Path, limits: ServeLimits | None = None, name: str | None = None) -> "Engine":
        """Serve a checkpoint (a compiled specialist or generalist) as it is."""
        from premoe.modeling import load_model, load_tokenizer, read_config

        info = read_config(model).get("premoe") or {}  # written by `premoe compile`
        fixed = {"domain": info.get("target", "fixed"), "experts": info.get("kept_experts")}
        return cls(load_model(model), load_tokenizer(model), name or _model_name(model), limits, fixed=fixed)

    # ------------------------------------------------------------------ counters

    def count(self, **increments: float) -> None:
        with self._metrics_lock:
            for key, value in increments.items():
                self.metrics[key] += value

    def metrics_text(self) -> str:
        """Prometheus text format."""
        with self._metrics_lock:
            lines = [f"premoe_{k}{'' if k in GAUGES else '_total'} {v:g}" for k, v in self.metrics.items()]
            lines += [f'premoe_domain_requests_total{{domain="{label(d)}"}} {n}' for d, n in sorted(self.domains.items())]
        return "\n".join(lines) + "\n"

    # ------------------------------------------------------------------ one request

    def run(self, job: Job, on_text: Callable[[str], None] | None = None, on_info: Callable[[dict], None] | None = None,
            cancel: threading.Event | None = None) -> Result:
        """Retrieve, swap and generate under the lock; ``on_text`` gets text as it is produced."""
        with self.lock:
            info = self._prepare(job.retrieval_text)
            if on_info:
                on_info(info)
            text, finish, tokens = self._generate(job, on_text, cancel)
        self.count(prompt_tokens=job.input_ids.shape[1], completion_tokens=tokens)
        return Result(text, finish, int(job.input_ids.shape[1]), tokens, info)

    def max_prompt_chars(self, tokens: int) -> int:
        """A prompt longer than this many characters has more than ``tokens`` tokens, whatever its text.

        A token covers at most as many characters as its longest vocabulary
        entry (byte-level BPE: one character per byte; SentencePiece: the
        piece); ×4 leaves room for normalisers that merge characters. Lets a
        huge prompt be refused without tokenising it.
        """
        if self._longest_token is None:
            try:
                self._longest_token = max(len(t) for t in self.tokenizer.get_vocab())
            except Exception:  # noqa: BLE001 - a tokenizer without a vocabulary: no shortcut
                self._longest_token = 1 << 40
        return tokens * self._longest_token * 4

    def _prepare(self, text: str) -> dict:
        """Pick the domain for ``text`` and make the resident model hold its experts (lock held)."""
        if self.retriever is None:
            return {"domain": self.fixed.get("domain"), "distance": None, "experts": self.fixed.get("experts"),
                    "swapped": {"experts": 0, "bytes": 0, "seconds": 0.0}}
        hit = self.retriever.retrieve(text, tokens=self.limits.retrieval_tokens)
        if hit.domain not in self._kept:
            self._kept[hit.domain] = self.retriever.store.kept(hit.domain, self.experts)
        swap = self.bank.swap(self._kept[hit.domain])
        self.current = hit.domain
        self.count(retrievals=1, fallbacks=int(hit.fallback), retrieval_seconds=hit.seconds,
                   swaps=int(swap.experts > 0), swap_experts=swap.experts, swap_bytes=swap.bytes,
                   swap_seconds=swap.seconds)
        with self._metrics_lock:
            self.domains[hit.domain] = self.domains.get(hit.domain, 0) + 1
        return {"domain": hit.domain, "nearest": hit.nearest, "distance": hit.distance, "distances": hit.distances,
                "fallback": hit.fallback, "retrieval_seconds": hit.seconds,
                "experts": {str(l): e for l, e in self.bank.kept.items()}, "swapped": swap.as_dict()}

    @torch.no_grad()
    def _generate(self, job: Job, on_text, cancel) -> tuple[str, str, int]:
        """(text, finish reason, new tokens); text goes to ``on_text`` as the streamer finalises it."""
        from transformers import StoppingCriteria, StoppingCriteriaList, TextStreamer

        stops = _StopText(job.stop)

        def emit(chunk: str, final: bool = False) -> None:
            released = stops.feed(chunk, final)
            if released and on_text:
                on_text(released)

        class Stream(TextStreamer):
            def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
                emit(text)

        class Stop(StoppingCriteria):  # ends generation when the client went away or a stop string appeared
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full((input_ids.shape[0],), bool((cancel and cancel.is_set()) or stops.done))

        if job.seed is not None:
            torch.manual_seed(job.seed)
        sampling = (dict(do_sample=True, temperature=job.temperature, top_p=job.top_p, top_k=0) if job.temperature > 0
                    else dict(do_sample=False))  # top_k=0: OpenAI has no top-k, so none of transformers' default 50
        eos = self.tokenizer.eos_token_id
        out = self.model.generate(
            input_ids=job.input_ids, attention_mask=torch.ones_like(job.input_ids), max_new_tokens=job.max_tokens,
            min_new_tokens=job.min_tokens, pad_token_id=eos, stopping_criteria=StoppingCriteriaList([Stop()]),
            streamer=Stream(self.tokenizer, skip_prompt=True, skip_special_tokens=True), **sampling,
        )
        emit("", final=True)
        new = out[0, job.input_ids.shape[1]:]  # (new tokens,)
        ended = stops.done or len(new) < job.max_tokens or int(new[-1]) == eos
        return stops.text, ("stop" if ended else "length"), int(len(new))


class _StopText:
    """Cuts generated text at the first stop string, holding back text that may be the start of one."""

    def __init__(self, stops: list[str]):
        self.stops, self.buffer, self.text, self.done = stops, "", "", False
        self.hold = max((len(s) for s in stops), default=1) - 1

    def feed(self, chunk: str, final: bool = False) -> str:
        """Text that can be released now: up to any stop string, all of it when ``final``."""
        if self.done:
            return ""
        self.buffer += chunk
        cuts = [i for i in (self.buffer.find(s) for s in self.stops) if i >= 0]
        if cuts:
            self.done = True
            out, self.buffer = self.buffer[: min(cuts)], ""
        else:
            keep = len(self.buffer) if final else max(0, len(self.buffer) - self.hold)
            out, self.buffer = self.buffer[:keep], self.buffer[keep:]
        self.text += out
        return out


def label(value: str) -> str:
    """``value`` as a Prometheus label value: a domain named ``a"b`` must not end the label early."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _model_name(model: str | Path) -> str:
    return "testbed" if str(model) == "testbed" else Path(model).resolve().name


# --------------------------------------------------------------------------- OpenAI requests


def render_chat(tokenizer, messages: list[dict]) -> str:
    """The model's chat template with a generation prompt, else ``role: content`` lines and ``assistant:``.

    Raises :class:`ApiError` 400 when the template refuses the messages (e.g. "roles must alternate").
    """
    from jinja2 import TemplateError

    if not getattr(tokenizer, "chat_template", None):
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except TemplateError as e:  # the template's own message about the input
        raise ApiError(400, f"the model's chat template refused these messages: {str(e)[:300]}",
                       param="messages") from None


def build_job(engine: Engine, raw: bytes, chat: bool) -> tuple[OpenAIRequest, Job]:
    """Validate a raw request body and tokenise it into a :class:`Job` (raises :class:`ApiError`).

    Runs in a thread: JSON parsing and tokenising are the slow parts of a
    request before it reaches the model.
    """
    request = parse_request(raw, chat)
    check_model(request, engine.name, "server")
    return request, make_job(engine, request)


def make_job(engine: Engine, request: OpenAIRequest) -> Job:
    """Tokenise a validated request; check it fits the prompt limit and the context; settle max_tokens."""
    limit = min(engine.limits.max_prompt_tokens, engine.context - 1)
    if request.chat:
        prompt = render_chat(engine.tokenizer, request.messages)
        retrieval_text = request.latest_user_message or prompt
    else:
        prompt = retrieval_text = request.prompt
    too_long = f"this server accepts at most {limit} prompt tokens"
    if len(prompt) > engine.max_prompt_chars(limit):  # refused without spending seconds tokenising it
        raise ApiError(400, f"the prompt has {len(prompt)} characters, more than {limit} tokens; {too_long}",
                       "context_length_exceeded", param="messages" if request.chat else "prompt")
    special = not (request.chat and getattr(engine.tokenizer, "chat_template", None))  # the template adds its own
    ids = engine.tokenizer(prompt, add_special_tokens=special)["input_ids"]
    if len(ids) > limit:
        raise ApiError(400, f"the prompt has {len(ids)} tokens; {too_long}", "context_length_exceeded",
                       param="messages" if request.chat else "prompt")
    if not ids:
        raise ApiError(400, "the prompt has no tokens", param="messages" if request.chat else "prompt")
    room = max(1, min(engine.limits.max_tokens, engine.context - len(ids)))
    max_tokens = room if request.max_tokens is None else min(request.max_tokens, room)  # null: as many as allowed
    return Job(torch.tensor([ids], dtype=torch.long), retrieval_text, max_tokens, min(request.min_tokens, max_tokens),
               0.0 if request.greedy else request.temperature, request.top_p, request.stop, request.seed)


# --------------------------------------------------------------------------- HTTP


def create_app(engine: Engine, guard: GuardConfig | None = None, docs: bool = False):
    """The FastAPI app: /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics.

    ``guard`` bounds and authenticates every request (:mod:`premoe.guard`);
    ``docs`` turns on /openapi.json, /docs and /redoc (off: they describe the
    server to anyone who asks).
    """
    app = guarded_app("premoe", guard, docs, engine.count)
    started = int(time.time())

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": engine.name, "domain": engine.current,
                "in_flight": engine.metrics["in_flight"]}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(engine.metrics_text())

    @app.get("/v1/models")
    async def models():
        return model_list(engine.name, started)

    async def handle(request: Request, chat: bool):
        engine.count(requests=1)
        body, job = await asyncio.to_thread(build_job, engine, await request.body(), chat)
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        if body.stream:
            return StreamingResponse(await _stream(engine, job, chat, ident, request.state.request_id),
                                     media_type="text/event-stream")
        cancel = threading.Event()
        future = await engine.queue.admit(lambda: engine.run(job, cancel=cancel))
        result = await _unless_client_leaves(engine, request, future, cancel)
        if result is None:
            return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
        return JSONResponse(_response(engine, result, chat, ident))

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await handle(request, chat=True)

    return app


async def _unless_client_leaves(engine: Engine, request: Request, future: Future,
                                cancel: threading.Event) -> Result | None:
    """The request's result, or None once its client has disconnected (the request is then cancelled)."""
    waiting = asyncio.wrap_future(future)
    while True:
        done, _ = await asyncio.wait({waiting}, timeout=DISCONNECT_POLL_S)
        if done:
            try:
                return waiting.result()
            except InputError as e:
                raise ApiError(400, str(e)) from e
        if await request.is_disconnected():
            future.cancel()  # still queued: it never runs
            cancel.set()  # running: generation stops at the next token
            waiting.add_done_callback(_ignore_outcome)
            engine.count(cancelled=1)
            return None


def _ignore_outcome(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()  # retrieved, so asyncio does not log "never retrieved"


def _response(engine: Engine, result: Result, chat: bool, ident: str) -> dict:
    choice = ({"index": 0, "message": {"role": "assistant", "content": result.text}} if chat
              else {"index": 0, "text": result.text, "logprobs": None})
    return {"id": ident, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": engine.name, "choices": [{**choice, "finish_reason": result.finish_reason}],
            "usage": {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
                      "total_tokens": result.prompt_tokens + result.completion_tokens},
            "premoe": result.premoe}


async def _stream(engine: Engine, job: Job, chat: bool, ident: str, request_id: str):
    """Queue the request now (429 before any byte is sent) and return its server-sent events.

    Events: a first chunk carrying the ``premoe`` field, text deltas, a chunk
    with the finish reason and usage, then ``data: [DONE]``. When the client
    goes away the events generator is closed, which cancels the request.
    """
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    cancel = threading.Event()
    put = lambda kind, value: loop.call_soon_threadsafe(events.put_nowait, (kind, value))  # noqa: E731
    future = await engine.queue.admit(lambda: engine.run(job, lambda text: put("text", text),
                                                         lambda info: put("info", info), cancel))
    future.add_done_callback(lambda f: put("end", f))

    def chunk(delta: dict, text: str = "", finish: str | None = None, extra: dict | None = None) -> str:
        choice = {"index": 0, "delta": delta} if chat else {"index": 0, "text": text, "logprobs": None}
        data = {"id": ident, "object": "chat.completion.chunk" if chat else "text_completion",
                "created": int(time.time()), "model": engine.name,
                "choices": [{**choice, "finish_reason": finish}], **(extra or {})}
        return f"data: {json.dumps(data)}\n\n"

    async def events_out():
        try:
            while True:
                kind, value = await events.get()
                if kind == "info":
                    yield chunk({"role": "assistant", "content": ""}, extra={"premoe": value})
                elif kind == "text":
                    yield chunk({"content": value}, value)
                else:
                    if value.cancelled():
                        break
                    if value.exception() is not None:
                        engine.count(errors=1)
                        error = value.exception()
                        error = ApiError(400, str(error)) if isinstance(error, InputError) else \
                            internal_error(error, request_id)
                        yield f"data: {json.dumps(error.body())}\n\n"
                        break
                    result = value.result()
                    usage = {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
                             "total_tokens": result.prompt_tokens + result.completion_tokens}
                    yield chunk({}, "", result.finish_reason, {"usage": usage})
                    break
            yield "data: [DONE]\n\n"
        finally:
            if not future.done():
                engine.count(cancelled=1)
            future.cancel()  # the client went away (or we are done): a queued request never runs,
            cancel.set()  # a running one stops at the next token

    return events_out()


def base_url(host: str, port: int) -> str:
    """``http://host:port`` with an IPv6 address in brackets (``http://[::1]:8000``)."""
    return f"http://[{host}]:{port}" if ":" in host and not host.startswith("[") else f"http://{host}:{port}"


def server_config(engine: Engine, host: str, port: int, guard: GuardConfig | None = None, docs: bool = False):
    """The uvicorn config premoe serves with: the guarded app, header deadline, short keep-alive.

    ``guard`` defaults to Host checking for loopback binds.
    """
    guard = guard or GuardConfig(allowed_hosts=loopback_hosts(host, port))
    return uvicorn_config(create_app(engine, guard, docs), host, port, guard)


def start_in_thread(engine: Engine, host: str = "127.0.0.1", timeout: float = 20.0, docs: bool = False, **guard):
    """Serve ``engine`` with uvicorn in a daemon thread on a free port: ``(base url, server, thread)``.

    For tests and benchmarks that drive the real HTTP stack in-process; stop
    it with ``server.should_exit = True`` and ``thread.join()``. ``guard``:
    :class:`GuardConfig` fields; ``allowed_hosts`` defaults to the loopback
    names of the chosen port.
    """
    import socket

    import uvicorn

    with socket.socket() as sock:
        sock.bind((host, 0))
        port = sock.getsockname()[1]
    config = GuardConfig(**{"allowed_hosts": loopback_hosts(host, port), **guard})
    server = uvicorn.Server(server_config(engine, host, port, config, docs))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + timeout
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError(f"the server did not start on {host}:{port} within {timeout} s")
        time.sleep(0.02)
    return f"http://{host}:{port}", server, thread


def start_process(args: list[str], port: int, timeout: float = 120.0, env: dict | None = None,
                  quiet: bool = False):
    """Run ``premoe serve ARGS --port PORT`` in a child process and return it once ``/health`` answers 200.

    For benchmarks and tests that need a real server process (one per
    backend of a ``premoe route`` fleet, or one to load-test). Raises
    RuntimeError if the process exits or does not answer within ``timeout``.
    """
    import os
    import subprocess
    import sys

    import httpx

    quiet_io = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL} if quiet else {}
    process = subprocess.Popen([sys.executable, "-c", "from premoe.cli import main; main()", "serve", *args,
                                "--port", str(port)], env={**os.environ, **(env or {})}, **quiet_io)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"premoe serve exited with status {process.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return process
        except httpx.TransportError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"premoe serve did not answer /health within {timeout:g} s")
