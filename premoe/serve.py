"""An OpenAI-compatible server that retrieves a domain per request and swaps its experts in.

Two modes:

* **retrieval** (``premoe serve MODEL --store STORE --experts M``): the
  resident model holds M experts per layer (:class:`~premoe.bank.ExpertBank`);
  each request's layer-1 pattern picks the nearest stored domain (or the
  generalist, :mod:`premoe.retrieval`), the bank swaps in that domain's
  experts, then the model generates.
* **fixed** (``premoe serve COMPILED_DIR``): a compiled specialist or
  generalist served as it is.

One model state at a time: retrieval, swap and generation of a request run
under one lock, so no request ever sees a half-swapped model. Requests past
the queue limit are refused at once (429) rather than piling up. Every
response carries a ``premoe`` field: domain, distance, experts per layer and
what the swap read.

Example::

    engine = Engine.retrieval("testbed", "stores/testbed", experts=16)
    uvicorn.run(create_app(engine), port=8000)
    # curl localhost:8000/v1/completions -d '{"model": "testbed", "prompt": "def main():"}'
"""
from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from fastapi import FastAPI, Request  # module level: FastAPI resolves the handlers' string annotations here
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from premoe.errors import InputError


@dataclass
class ServeLimits:
    """Bounds that keep one bad request from taking the server down."""

    max_prompt_tokens: int = 2048  # longer prompts are refused (400 context_length_exceeded)
    max_tokens: int = 256  # generated tokens per request; larger requests are clamped to this
    max_queue: int = 8  # requests running or waiting for the model; more are refused at once (429)
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


class ApiError(Exception):
    """An error answered with OpenAI's error JSON."""

    def __init__(self, status: int, message: str, code: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.code, self.kind = status, message, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": None, "code": self.code}}


# --------------------------------------------------------------------------- the model state


class Engine:
    """The served model: tokenizer, optional retrieval + expert bank, one lock, counters."""

    def __init__(self, model, tokenizer, name: str, limits: ServeLimits | None = None, bank=None, retriever=None,
                 experts: int | None = None, fixed: dict | None = None):
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.limits = limits or ServeLimits()
        self.bank, self.retriever, self.experts = bank, retriever, experts
        self.fixed = fixed or {}  # what a fixed model is (domain, experts), from its config
        self.lock = threading.Lock()  # held over retrieve + swap + generate
        self.slots = threading.BoundedSemaphore(self.limits.max_queue)
        self.context = int(getattr(model.config, "max_position_embeddings", 0) or 1 << 30)
        self._kept: dict[str, dict[int, list[int]]] = {}  # target -> its experts at M (make_plan, cached)
        self._metrics_lock = threading.Lock()
        self.metrics: dict[str, float] = dict.fromkeys(
            ["requests", "errors", "rejected", "retrievals", "fallbacks", "swaps", "swap_experts", "swap_bytes",
             "swap_seconds", "retrieval_seconds", "prompt_tokens", "completion_tokens", "in_flight"], 0)
        self.domains: dict[str, int] = {}  # requests served per domain
        self.current = retriever.store.domains[0] if retriever else self.fixed.get("domain")  # resident experts

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
            lines = [f"premoe_{k}{'' if k == 'in_flight' else '_total'} {v:g}" for k, v in self.metrics.items()]
            lines += [f'premoe_domain_requests_total{{domain="{d}"}} {n}' for d, n in sorted(self.domains.items())]
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


def _model_name(model: str | Path) -> str:
    return "testbed" if str(model) == "testbed" else Path(model).resolve().name


# --------------------------------------------------------------------------- OpenAI requests


def render_chat(tokenizer, messages: list[dict]) -> str:
    """The model's chat template with a generation prompt, else ``role: content`` lines and ``assistant:``."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


def parse_job(engine: Engine, body: dict, chat: bool) -> Job:
    """Validate an OpenAI request body into a :class:`Job` (raises :class:`ApiError`)."""
    model = body.get("model")
    if model is not None and model != engine.name:
        raise ApiError(404, f"the model {model!r} does not exist; this server serves {engine.name!r}",
                       "model_not_found")
    if body.get("n", 1) != 1:
        raise ApiError(400, "only n = 1 is supported", "unsupported_parameter")
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "'messages' must be a non-empty list of {role, content}")
        messages = [_message(m) for m in messages]
        prompt = render_chat(engine.tokenizer, messages)
        ids = engine.tokenizer(prompt, add_special_tokens=not getattr(engine.tokenizer, "chat_template", None))
        users = [m["content"] for m in messages if m["role"] == "user" and m["content"].strip()]
        retrieval_text = users[-1] if users else prompt  # the latest user turn says what the task is now
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise ApiError(400, "'prompt' must be a non-empty string (batches of prompts are not supported)")
        ids = engine.tokenizer(prompt)
        retrieval_text = prompt
    ids = ids["input_ids"]
    limit = min(engine.limits.max_prompt_tokens, engine.context - 1)
    if len(ids) > limit:
        raise ApiError(400, f"the prompt has {len(ids)} tokens; this server accepts at most {limit}",
                       "context_length_exceeded")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens")) or engine.limits.max_tokens
    temperature, top_p = body.get("temperature", 0.0) or 0.0, body.get("top_p", 1.0) or 1.0
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    checks = [(isinstance(max_tokens, int) and max_tokens > 0, "'max_tokens' must be a positive integer"),
              (isinstance(temperature, (int, float)) and 0 <= temperature <= 2, "'temperature' must be in [0, 2]"),
              (isinstance(top_p, (int, float)) and 0 < top_p <= 1, "'top_p' must be in (0, 1]"),
              (isinstance(stop, list) and all(isinstance(s, str) and s for s in stop), "'stop' must be strings"),
              (body.get("seed") is None or isinstance(body.get("seed"), int), "'seed' must be an integer"),
              (isinstance(body.get("min_tokens", 0), int) and body.get("min_tokens", 0) >= 0,
               "'min_tokens' must be a non-negative integer")]
    for ok, message in checks:
        if not ok:
            raise ApiError(400, message)
    max_tokens = max(1, min(max_tokens, engine.limits.max_tokens, engine.context - len(ids)))
    return Job(torch.tensor([ids], dtype=torch.long), retrieval_text, max_tokens,
               min(body.get("min_tokens", 0), max_tokens), float(temperature), float(top_p), stop, body.get("seed"))


def _message(message) -> dict:
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise ApiError(400, "each message must be an object with a 'role' and a 'content'")
    content = message.get("content")
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
    if not isinstance(content, str):
        raise ApiError(400, "message 'content' must be a string or a list of text parts")
    return {"role": message["role"], "content": content}


# --------------------------------------------------------------------------- HTTP


def create_app(engine: Engine):
    """The FastAPI app: /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics."""
    app = FastAPI(title="premoe", docs_url=None, redoc_url=None)
    started = int(time.time())

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError):
        engine.count(errors=1, rejected=int(error.status == 429))
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(Exception)
    async def server_error(request: Request, error: Exception):
        engine.count(errors=1)
        return JSONResponse(ApiError(500, f"{type(error).__name__}: {error}", None, "server_error").body(),
                            status_code=500)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": engine.name, "domain": engine.current,
                "in_flight": engine.metrics["in_flight"]}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(engine.metrics_text())

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": engine.name, "object": "model", "created": started,
                                            "owned_by": "premoe"}]}

    async def handle(request: Request, chat: bool):
        engine.count(requests=1)
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON ({e})") from e
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        job = parse_job(engine, body, chat)
        if not engine.slots.acquire(blocking=False):
            raise ApiError(429, f"the server is busy ({engine.limits.max_queue} requests queued); retry later",
                           "rate_limit_exceeded", "rate_limit_error")
        engine.count(in_flight=1)
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        if body.get("stream"):
            return StreamingResponse(_stream(engine, job, chat, ident), media_type="text/event-stream")
        try:
            result = await asyncio.to_thread(_release_after, engine, lambda: engine.run(job))
        except InputError as e:
            raise ApiError(400, str(e)) from e
        return JSONResponse(_response(engine, result, chat, ident))

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await handle(request, chat=True)

    return app


def _release_after(engine: Engine, work: Callable[[], Result]) -> Result:
    """Run ``work`` in a worker thread; its queue slot is freed when the work ends, not when the client leaves."""
    try:
        return work()
    finally:
        engine.count(in_flight=-1)
        engine.slots.release()


def _response(engine: Engine, result: Result, chat: bool, ident: str) -> dict:
    choice = ({"index": 0, "message": {"role": "assistant", "content": result.text}} if chat
              else {"index": 0, "text": result.text, "logprobs": None})
    return {"id": ident, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": engine.name, "choices": [{**choice, "finish_reason": result.finish_reason}],
            "usage": {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
                      "total_tokens": result.prompt_tokens + result.completion_tokens},
            "premoe": result.premoe}


def _stream(engine: Engine, job: Job, chat: bool, ident: str):
    """Start the request's worker now and return its server-sent events.

    Events: a first chunk carrying the ``premoe`` field, text deltas, a chunk
    with the finish reason and usage, then ``data: [DONE]``. The worker
    starts before the response does, so its queue slot is freed even if the
    client never reads a byte.
    """
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    cancel = threading.Event()
    put = lambda kind, value: loop.call_soon_threadsafe(events.put_nowait, (kind, value))  # noqa: E731

    def work() -> None:
        try:
            put("end", _release_after(engine, lambda: engine.run(job, lambda text: put("text", text),
                                                                  lambda info: put("info", info), cancel)))
        except Exception as e:  # noqa: BLE001 - reported to the client as an error event
            engine.count(errors=1)
            put("error", e)

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
                elif kind == "error":
                    yield f"data: {json.dumps(ApiError(500, str(value), None, 'server_error').body())}\n\n"
                    break
                else:
                    usage = {"prompt_tokens": value.prompt_tokens, "completion_tokens": value.completion_tokens,
                             "total_tokens": value.prompt_tokens + value.completion_tokens}
                    yield chunk({}, "", value.finish_reason, {"usage": usage})
                    break
            yield "data: [DONE]\n\n"
        finally:
            cancel.set()  # the client went away (or we are done): stop generating

    threading.Thread(target=work, name=f"premoe-{ident}", daemon=True).start()
    return events_out()


def start_in_thread(engine: Engine, host: str = "127.0.0.1", timeout: float = 20.0):
    """Serve ``engine`` with uvicorn in a daemon thread on a free port: ``(base url, server, thread)``.

    For tests and benchmarks that drive the real HTTP stack in-process; stop
    it with ``server.should_exit = True`` and ``thread.join()``.
    """
    import socket
    import threading
    import time

    import uvicorn

    with socket.socket() as sock:
        sock.bind((host, 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(engine), host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + timeout
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError(f"the server did not start on {host}:{port} within {timeout} s")
        time.sleep(0.02)
    return f"http://{host}:{port}", server, thread
