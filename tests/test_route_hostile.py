"""`premoe route` in front of backends that misbehave: garbage, broken JSON, wrong statuses, hangs, frozen
processes, broken streams; and route configs a sceptical user gets wrong. Every request must still be answered
by the generalist (never a 500, a hang or the backend's garbage), and every bad config is one line."""
import asyncio
import json
import threading

import httpx
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from premoe.errors import InputError
from premoe.route.config import check_no_loop, load_config
from test_route import CODE, RunningRouter, backends, fleet, free_port, urls_of, write_config  # noqa: F401 - fixtures

COMPLETION = {"id": "cmpl-x", "object": "text_completion", "created": 1, "model": "m",
              "choices": [{"index": 0, "text": "ok", "logprobs": None, "finish_reason": "length"}],
              "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}


def http_answer(status: int, body: bytes, content_type: str | None = "application/json") -> bytes:
    head = f"HTTP/1.1 {status} X\r\ncontent-length: {len(body)}\r\n"
    return (head + (f"content-type: {content_type}\r\n" if content_type else "") + "\r\n").encode() + body


def event_stream(*events: bytes, end: bool = False) -> bytes:
    """A chunked text/event-stream answer made of ``events`` (each already a full line, or several); ``end``: and
    the chunk that ends it (else the stream stays open, or breaks when the connection closes)."""
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in events) + (b"0\r\n\r\n" if end else b"")
    return b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n" + chunks


def good_answer(stream: bool) -> bytes:
    if stream:
        return event_stream(b"data: " + json.dumps(COMPLETION).encode() + b"\n\n", b"data: [DONE]\n\n", end=True)
    return http_answer(200, json.dumps(COMPLETION).encode())


HANG = "hang"  # answer nothing, keep the connection open
CLOSE = "close"  # close the connection after what was written


class Hostile:
    """A loopback HTTP server: /health answers 200 (unless frozen), every POST gets ``answer(stream)``.

    ``answer`` returns raw bytes to write, optionally with ``HANG`` or ``CLOSE`` to do next.
    """

    def __init__(self):
        self.answer = good_answer
        self.frozen = False  # like a SIGSTOPped process: connections open, nothing ever answered
        self.hung_up = 0  # connections the router closed while this server left them hanging
        self.loop = asyncio.new_event_loop()
        started = threading.Event()
        threading.Thread(target=self._run, args=(started,), daemon=True).start()
        started.wait(10)
        self.url = f"http://127.0.0.1:{self.port}"

    def _run(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", 0))
        self.port = self.server.sockets[0].getsockname()[1]
        started.set()
        self.loop.run_forever()

    async def _serve(self, reader, writer) -> None:
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
                if self.frozen:
                    await asyncio.sleep(3600)
                length = next((int(line.split(":")[1]) for line in head.split("\r\n")
                               if line.lower().startswith("content-length:")), 0)
                body = await reader.readexactly(length)
                if head.startswith("GET /health"):
                    writer.write(http_answer(200, b'{"status": "ok"}'))
                    continue
                answer = self.answer(json.loads(body or b"{}").get("stream") is True)
                data, then = answer if isinstance(answer, tuple) else (answer, None)
                writer.write(data)
                await writer.drain()
                if then == HANG:
                    await reader.read()  # returns when the router closes the connection
                    self.hung_up += 1
                    return
                if then == CLOSE:
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def stop(self) -> None:
        async def shutdown() -> None:  # every connection handler ends (cancelled) before the loop stops
            self.server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)


@pytest.fixture()
def hostile():
    server = Hostile()
    yield server
    server.stop()


def route_to(tmp_path, fleet, backends, hostile, **extra):  # noqa: F811 - pytest fixtures
    """A router whose every domain backend is ``hostile`` and whose generalist is a real premoe serve."""
    urls = {"code": hostile.url, "de": hostile.url, "bible": hostile.url, "generalist": urls_of(backends)["generalist"]}
    return RunningRouter(write_config(tmp_path, fleet, urls, **extra))


def post(running, stream: bool, chat: bool = False) -> httpx.Response:
    body = ({"messages": [{"role": "user", "content": CODE}]} if chat else {"prompt": CODE}) | {
        "max_tokens": 3, "stream": stream}
    return httpx.post(running.url + ("/v1/chat/completions" if chat else "/v1/completions"), json=body, timeout=30)


def assert_answered_by_the_generalist(response: httpx.Response, stream: bool, header: str = "generalist") -> None:
    """A 200 whose content all came from the generalist (``header``: the backend a stream started on)."""
    assert response.status_code == 200, response.text
    assert response.headers["x-premoe-route-backend"] == header
    if stream:
        lines = [line for line in response.text.splitlines() if line]
        assert lines[-1] == "data: [DONE]"
        events = [json.loads(line[len("data: "):]) for line in lines[:-1]]  # every line forwarded is JSON
        assert all("error" not in e and e["model"] == "generalist-4" for e in events), events
    else:
        body = response.json()
        assert body["model"] == "generalist-4" and body["choices"][0]["finish_reason"] in ("length", "stop")


GARBAGE = {  # backend answer (to a non-streaming and to a streaming request) -> fallback reason
    "html": (lambda stream: http_answer(200, b"<html>oops</html>", "text/html"), "bad_answer"),
    "broken_json": (lambda stream: http_answer(200, b'{"choices": [ oops'), "bad_answer"),
    "not_a_completion": (lambda stream: http_answer(200, b'{"error": {"message": "x"}}'), "bad_answer"),
    "a_json_list": (lambda stream: http_answer(200, b"[1, 2, 3]"), "bad_answer"),
    "redirect": (lambda stream: http_answer(301, b"", None), "bad_answer"),
    "not_found": (lambda stream: http_answer(404, b'{"detail": "Not Found"}'), "refused"),
    "bad_key": (lambda stream: http_answer(401, b'{"error": {"message": "bad key"}}'), "refused"),
    "model_not_found": (lambda stream: http_answer(404, b'{"error": {"code": "model_not_found"}}'), "refused"),
    "error_500": (lambda stream: http_answer(500, b"Internal Server Error", "text/plain"), "error"),
    "closes_mid_body": (lambda stream: (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 500"
                                        b"\r\n\r\n{\"choices\": [", CLOSE), "down"),  # a stream: not events
    "closes_before_answering": (lambda stream: (b"", CLOSE), "down"),
}


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("name", list(GARBAGE))
def test_a_backend_answering_garbage_sends_its_request_to_the_generalist(tmp_path, fleet, backends, hostile, name,  # noqa: F811
                                                                         stream):
    hostile.answer, reason = GARBAGE[name]
    with route_to(tmp_path, fleet, backends, hostile) as running:
        for chat in (False, True):
            response = post(running, stream, chat)
            assert_answered_by_the_generalist(response, stream)
            if not stream and not chat:
                assert response.json()["premoe_route"]["skipped"] in ([reason], [])  # []: marked down already
        metrics = httpx.get(running.url + "/metrics").text
        reason = "bad_answer" if stream and name == "closes_mid_body" else reason  # JSON where events were asked
        assert f'premoe_route_fallbacks_total{{reason="{reason}"}}' in metrics
        assert "premoe_route_unanswered_total 0" in metrics


STREAMS = {  # a 200 to a streaming request whose events are not OpenAI's -> the backend the stream starts on
    "not_an_event_stream": (lambda stream: http_answer(200, json.dumps(COMPLETION).encode()), "generalist"),
    "garbage_events": (lambda stream: event_stream(b"data: {not json}\n\n", b"data: [1, 2]\n\n"), "code"),
    "choices_not_a_list": (lambda stream: event_stream(b'data: {"choices": 5}\n\n', b"data: [DONE]\n\n"), "code"),
    "noise_then_garbage": (lambda stream: event_stream(b"garbage line\n\n", b"event: x\n\n", b"data: {oops\n\n"),
                           "code"),
}


@pytest.mark.parametrize("name", list(STREAMS))
def test_a_stream_of_garbage_is_never_forwarded(tmp_path, fleet, backends, hostile, name):  # noqa: F811
    """Garbage is never forwarded: the stream continues on the generalist (on it from the start if the answer
    was no event stream at all)."""
    hostile.answer, header = STREAMS[name]
    with route_to(tmp_path, fleet, backends, hostile) as running:
        for chat in (False, True):
            assert_answered_by_the_generalist(post(running, True, chat), True, header)


def test_a_backend_that_goes_silent_is_given_up_after_backend_timeout(tmp_path, fleet, backends, hostile):  # noqa: F811
    hostile.answer = lambda stream: (b"", HANG)  # /health still answers: only the timeout can tell
    with route_to(tmp_path, fleet, backends, hostile, backend_timeout=0.5) as running:
        response = post(running, False)
        assert_answered_by_the_generalist(response, False)
        assert response.json()["premoe_route"]["skipped"] == ["hung"]
        assert_answered_by_the_generalist(post(running, True, chat=True), True)


def test_a_client_that_leaves_frees_the_backend_it_waited_on(tmp_path, fleet, backends, hostile):  # noqa: F811
    """Closing the backend connection is how the backend learns to stop generating; a non-streaming request used
    to keep it open until the backend's whole answer arrived."""
    import socket
    import time

    hostile.answer = lambda stream: (b"", HANG)
    with route_to(tmp_path, fleet, backends, hostile) as running:
        body = json.dumps({"prompt": CODE, "max_tokens": 3}).encode()
        with socket.create_connection(("127.0.0.1", running.port)) as sock:
            sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{running.port}\r\ncontent-type: "
                         f"application/json\r\ncontent-length: {len(body)}\r\n\r\n".encode() + body)
            deadline = time.monotonic() + 10
            while running.router.counters["requests"] < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.2)  # forwarded to the hostile backend by now
        while hostile.hung_up < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert hostile.hung_up == 1


def test_a_stream_that_goes_silent_midway_is_continued_on_the_generalist(tmp_path, fleet, backends, hostile):  # noqa: F811
    event = {"id": "cmpl-dead", "object": "text_completion", "created": 1, "model": "code-4",
             "choices": [{"index": 0, "text": "def", "logprobs": None, "finish_reason": None}]}
    hostile.answer = lambda stream: (event_stream(b"data: " + json.dumps(event).encode() + b"\n\n"), HANG)
    with route_to(tmp_path, fleet, backends, hostile, backend_timeout=0.5) as running:
        response = post(running, True)
        lines = [line for line in response.text.splitlines() if line]
        events = [json.loads(line[len("data: "):]) for line in lines[:-1]]
        assert lines[-1] == "data: [DONE]" and events[0]["choices"][0]["text"] == "def"
        assert {e["id"] for e in events} == {"cmpl-dead"} and events[-1]["model"] == "generalist-4"
        assert events[-1]["choices"][0]["finish_reason"] in ("length", "stop")
        assert 'premoe_route_fallbacks_total{reason="died_mid_stream"} 1' in httpx.get(running.url + "/metrics").text


def test_a_continuation_the_generalist_refuses_ends_the_stream_with_an_error_event(tmp_path, fleet, backends,  # noqa: F811
                                                                                  hostile):
    """The dead backend streamed more than the generalist's prompt limit (64 tokens): the continuation is refused."""
    event = {"id": "cmpl-dead", "object": "text_completion", "created": 1, "model": "code-4",
             "choices": [{"index": 0, "text": "word " * 100, "logprobs": None, "finish_reason": None}]}
    hostile.answer = lambda stream: (event_stream(b"data: " + json.dumps(event).encode() + b"\n\n"), CLOSE)
    with route_to(tmp_path, fleet, backends, hostile) as running:
        response = post(running, True)
    lines = [line for line in response.text.splitlines() if line]
    assert [json.loads(line[len("data: "):]) for line in lines[:1]] == [event] and lines[-1] == "data: [DONE]"
    assert len(lines) == 3 and json.loads(lines[1][len("data: "):])["error"]["code"] == "continuation_refused"


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_a_frozen_backend_loses_its_waiting_requests_to_the_generalist(tmp_path, fleet, backends, hostile, stream):  # noqa: F811
    """A stopped process accepts connections and never answers, /health included: the failed health check moves
    the requests waiting on it, long before backend_timeout."""
    with route_to(tmp_path, fleet, backends, hostile, connect_timeout=0.5, health_interval=0.1) as running:
        hostile.frozen = True  # from now on: the next health check fails >= 0.5 s later, the request is sent at once
        response = post(running, stream)
        assert_answered_by_the_generalist(response, stream)
        assert running.router.up["code"] is False


def test_a_dead_generalist_is_skipped_for_any_live_backend(tmp_path, fleet, backends, hostile):  # noqa: F811
    urls = {"code": hostile.url, "generalist": f"http://127.0.0.1:{free_port()}"}  # bible and de: the generalist's
    with RunningRouter(write_config(tmp_path, fleet, urls)) as running:
        for text in (CODE, "In the beginning God created the heaven and the earth."):
            for stream in (False, True):
                response = httpx.post(running.url + "/v1/completions", json={"prompt": text, "stream": stream},
                                      timeout=30)
                assert response.status_code == 200 and response.headers["x-premoe-route-backend"] == "code"


def test_no_backend_left_is_a_503_in_openai_shape(tmp_path, fleet, backends, hostile):  # noqa: F811
    hostile.answer = lambda stream: http_answer(200, b"<html/>", "text/html")
    urls = dict.fromkeys(["code", "de", "bible", "generalist"], hostile.url)
    with RunningRouter(write_config(tmp_path, fleet, urls)) as running:
        for stream in (False, True):
            response = post(running, stream)
            assert response.status_code == 503 and response.headers["retry-after"] == "2"
            assert response.json()["error"]["code"] == "no_backend"


def test_a_backends_own_4xx_about_the_request_is_passed_on_in_openai_shape(tmp_path, fleet, backends, hostile):  # noqa: F811
    hostile.answer = lambda stream: http_answer(400, b"prompt too long for me", "text/plain")
    with route_to(tmp_path, fleet, backends, hostile) as running:
        for stream in (False, True):
            response = post(running, stream)
            assert response.status_code == 400 and response.headers["x-premoe-route-backend"] == "code"
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and "prompt too long" in error["message"]


ANSWERS = st.tuples(st.sampled_from([200, 201, 302, 400, 401, 403, 404, 405, 409, 413, 422, 429, 500, 502, 503]),
                    st.sampled_from(["application/json", "text/event-stream", "text/html", None]),
                    st.sampled_from([json.dumps(COMPLETION).encode(), b'{"error": {"message": "no"}}', b"[]", b"",
                                     b"data: {}\n\n", b"\xff\xfe", b"{" * 5000, b"null"]) | st.binary(max_size=40))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(answer=ANSWERS, stream=st.booleans())
def test_whatever_a_backend_answers_the_client_gets_a_completion_or_a_4xx(tmp_path_factory, fleet, backends,  # noqa: F811
                                                                         router_in_front_of_hostile, answer, stream):
    running, hostile = router_in_front_of_hostile
    running.router.up = dict.fromkeys(running.router.up, True)
    status, kind, body = answer
    hostile.answer = lambda _: http_answer(status, body, kind)
    response = post(running, stream)
    backend = response.headers.get("x-premoe-route-backend")
    if response.status_code == 200 and not stream:
        assert isinstance(response.json()["choices"], list) and "premoe_route" in response.json()
        assert backend == "generalist" or (status, body) == (200, json.dumps(COMPLETION).encode())
    elif response.status_code == 200:  # the backend's events, or the generalist's continuation: never garbage
        lines = [line for line in response.text.splitlines() if line]
        assert lines[-1] == "data: [DONE]"
        assert all("error" not in json.loads(line[len("data: "):]) for line in lines[:-1])
    else:  # the backend's own complaint about the request, nothing else
        assert 400 <= status < 500 and status not in (401, 403, 404, 405, 429)
        assert (response.status_code, backend) == (status, "code") and isinstance(response.json()["error"], dict)


@pytest.fixture(scope="module")
def router_in_front_of_hostile(tmp_path_factory, fleet, backends):  # noqa: F811
    hostile = Hostile()
    running = route_to(tmp_path_factory.mktemp("hostile"), fleet, backends, hostile, health_interval=3600)
    with running:
        yield running, hostile
    hostile.stop()


def test_the_routers_own_refusals_are_counted(tmp_path, fleet, backends, hostile):  # noqa: F811
    with route_to(tmp_path, fleet, backends, hostile) as running:
        assert httpx.post(running.url + "/v1/completions", json={"prompt": CODE, "n": 2}).status_code == 400
        assert httpx.post(running.url + "/v1/completions", json={"prompt": CODE, "model": "x"}).status_code == 404
        metrics = httpx.get(running.url + "/metrics").text
        assert "premoe_route_requests_total 2" in metrics and "premoe_route_errors_total 2" in metrics


# --------------------------------------------------------------------------- configs


def config_with(tmp_path, specs: dict | None = None, raw: str | None = None, **keys):
    path = tmp_path / "route.json"
    body = {"model": "testbed", "store": "store", "backends": specs or {"generalist": {"url": "http://127.0.0.1:1"}},
            **keys}
    path.write_text(raw if raw is not None else json.dumps(body), encoding="utf-8")
    return path


@pytest.mark.parametrize("url, message", [
    ("http://", "a host"), ("http:", "a host"), ("http://[::1", "not http"), ("http://127.0.0.1:99999", "Port"),
    ("http://exa mple:80", "spaces"), ("http://127.0.0.1:8000?x=1", "query"), ("http://u:p@127.0.0.1:8000", "api_key"),
    ("http://127.0.0.1:8000/v1", "ends in /v1"), ("http://127.0.0.1:8000/v1/", "ends in /v1"), ("file:///x", "a host")])
def test_backend_urls_are_checked_when_the_config_loads(tmp_path, url, message):
    with pytest.raises(InputError, match=message):
        load_config(config_with(tmp_path, {"code": {"url": url}, "generalist": {"url": "http://127.0.0.1:1"}}))


def test_a_url_with_a_path_prefix_is_fine(tmp_path):
    config = load_config(config_with(tmp_path, {"generalist": {"url": "https://gpu.example/llm/"}}))
    assert config.backends["generalist"].url == "https://gpu.example/llm"


def test_a_name_given_twice_is_refused_not_silently_dropped(tmp_path):
    raw = ('{"model": "testbed", "store": "s", "backends": {"code": {"url": "http://127.0.0.1:1"}, '
           '"code": {"url": "http://127.0.0.1:2"}, "generalist": {"url": "http://127.0.0.1:3"}}}')
    with pytest.raises(InputError, match="'code' twice"):
        load_config(config_with(tmp_path, raw=raw))


@pytest.mark.parametrize("raw, message", [
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"), ("", "not valid JSON"), ("model: x\nstore: y\n", "not valid JSON"),
    (json.dumps({"model": "m", "store": "s", "backends": {"": {"url": "http://x"}}}), "name is empty"),
    (json.dumps({"model": "m", "store": "s", "backends": {"generalist": {"url": "http://x", "model": ""}}}),
     '"model" is empty'),
    (json.dumps({"model": "m", "store": "s", "backends": {"generalist": {"url": "http://x", "api_key": " "}}}),
     '"api_key" is empty'),
    (json.dumps({"model": "m", "store": "s", "backends": {"generalist": {"url": "http://x"}}, "name": " "}),
     '"name" must be'),
    (json.dumps({"model": "m", "store": "s", "backends": {"generalist": {"url": "http://x"}}, "health_interval": 1e308}),
     "got 1e[+]308 [(]at most 3600[)]"),
    (json.dumps({"model": "m", "store": "s", "backends": {"generalist": {"url": "http://x"}}, "backend_timeout": -1}),
     "positive")])
def test_bad_configs_are_one_input_error(tmp_path, raw, message):
    with pytest.raises(InputError, match=message):
        load_config(config_with(tmp_path, raw=raw))


def test_a_config_an_editor_saved_with_a_bom_loads(tmp_path):
    path = config_with(tmp_path)
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert load_config(path).backends["generalist"].url == "http://127.0.0.1:1"


@pytest.mark.parametrize("url, host, port, loops", [
    ("http://127.0.0.1:9000", "127.0.0.1", 9000, True), ("http://localhost:9000", "127.0.0.1", 9000, True),
    ("http://127.0.0.1:9000", "0.0.0.0", 9000, True), ("http://[::1]:9000", "::1", 9000, True),
    ("http://127.0.0.1:9001", "127.0.0.1", 9000, False), ("http://10.0.0.5:9000", "127.0.0.1", 9000, False)])
def test_the_router_is_not_its_own_backend(tmp_path, url, host, port, loops):
    config = load_config(config_with(tmp_path, {"generalist": {"url": url}}))
    if loops:
        with pytest.raises(InputError, match="own address"):
            check_no_loop(config, host, port)
    else:
        check_no_loop(config, host, port)


@pytest.mark.parametrize("verb", ["serve", "route"])
def test_read_timeout_must_be_a_finite_number(verb, tmp_path, capsys):
    from premoe.cli import main

    for value in ("nan", "inf"):
        with pytest.raises(SystemExit) as exit_:
            main([verb, str(tmp_path), "--read-timeout", value])
        assert exit_.value.code == 2 and "--read-timeout" in capsys.readouterr().err, value


def test_serve_refuses_a_blank_model_name(tiny_qwen3, capsys, monkeypatch):
    import uvicorn

    from premoe.cli import main

    monkeypatch.setattr(uvicorn.Server, "run", lambda self: None)  # were it accepted, the test ends instead of serving
    with pytest.raises(SystemExit) as exit_:
        main(["serve", str(tiny_qwen3), "--name", " ", "--port", str(free_port())])
    assert exit_.value.code == 2 and "--name" in capsys.readouterr().err


def test_route_refuses_its_own_port_as_a_backend_before_loading(tmp_path):
    from premoe.cli.route import command

    port = free_port()
    path = config_with(tmp_path, {"generalist": {"url": f"http://127.0.0.1:{port}"}})
    result = CliRunner().invoke(command, [str(path), "--port", str(port)])
    assert isinstance(result.exception, InputError) and "own address" in str(result.exception)


def test_metrics_labels_are_escaped():
    """A domain named from a data file can hold quotes or a newline; /metrics must stay parseable."""
    import re
    import threading
    from types import SimpleNamespace

    from premoe.route.router import Router
    from premoe.serve import Engine

    weird = 'py"thon\\x\nnew'
    serve = Engine.metrics_text(SimpleNamespace(_metrics_lock=threading.Lock(), metrics={}, domains={weird: 3}))
    route = Router.metrics_text(SimpleNamespace(_metrics_lock=threading.Lock(), counters={}, fallbacks={},
                                                decisions={(weird, "generalist"): 2}, up={weird: True}))
    sample = re.compile(r'^[a-z_]+\{([a-z]+="(\\.|[^"\\])*",?)+\} \d+$')
    for text in (serve, route):
        lines = text.strip().splitlines()
        assert len(lines) == (1 if text is serve else 2) and all(sample.match(line) for line in lines), lines
    assert 'domain="py\\"thon\\\\x\\nnew"' in serve
