"""Issue 12.3-12.5 replayed against the real server: bounded bodies, slow and vanishing clients, a fair queue,
strict OpenAI validation, API key, Host check, no leaked internals; plus hypothesis over random bodies."""
import json
import socket
import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from premoe.guard import GuardConfig, exposure_warning, loopback_hosts
from premoe.serve import Engine, ServeLimits, create_app, start_in_thread

LIMITS = ServeLimits(max_prompt_tokens=64, max_tokens=8, max_queue=2, retrieval_tokens=32)
KEY = "premoe-test-key"


@pytest.fixture(scope="module")
def loaded(tiny_qwen3):
    from premoe.modeling import load_model, load_tokenizer

    return load_model(tiny_qwen3), load_tokenizer(tiny_qwen3)


def engine_of(loaded, limits=LIMITS) -> Engine:
    return Engine(loaded[0], loaded[1], "tiny", limits, fixed={"domain": "fixed"})


@pytest.fixture(scope="module")
def client(loaded):
    with TestClient(create_app(engine_of(loaded))) as c:
        yield c


@pytest.fixture()
def live(loaded):
    """A real uvicorn server: (url, engine, port). Short read timeout so slow-client tests stay fast."""
    engine = engine_of(loaded)
    url, server, thread = start_in_thread(engine, read_timeout=0.5)
    yield url, engine, int(url.rsplit(":", 1)[1])
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture()
def slow_model(loaded):
    """The tiny model at ~20 ms per forward step, so a generation lasts seconds."""
    handle = loaded[0].register_forward_pre_hook(lambda module, args: time.sleep(0.02))
    yield
    handle.remove()


def is_openai_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and isinstance(error["message"], str)
    return error


def raw_request(port: int, head: str, body: bytes = b"", timeout: float = 5.0) -> tuple[bytes, float]:
    """(what the server answered before closing, seconds to the first byte) for a hand-written request."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        started = time.perf_counter()
        sock.sendall(head.encode() + body)
        data = sock.recv(65536)
        first = time.perf_counter() - started
        while chunk := sock.recv(65536):
            data += chunk
        return data, first


# --------------------------------------------------------------------------- 12.3: no request stalls the server


def test_oversized_content_length_is_refused_before_reading(live):
    url, _, port = live
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {20 << 20}\r\n\r\n")
    answer, seconds = raw_request(port, head)
    assert answer.startswith(b"HTTP/1.1 413") and seconds < 1.0
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_too_large"


def test_health_answers_fast_while_a_20mb_chunked_body_is_refused(live):
    url, _, port = live
    outcome: dict = {}

    def send_20mb() -> None:  # chunked: no Content-Length, so the cap is enforced while counting
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            started = time.perf_counter()
            sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                         "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
            chunk = b"%x\r\n%s\r\n" % (1 << 16, b"x" * (1 << 16))
            sent = 0
            try:
                while sent < 20 << 20:
                    sock.sendall(chunk)
                    sent += 1 << 16
            except OSError:  # the server answered 413 and closed: the rest is never read
                pass
            outcome["sent"], outcome["answer"] = sent, sock.recv(65536)
            outcome["seconds"] = time.perf_counter() - started

    sender = threading.Thread(target=send_20mb)
    latencies = []
    with httpx.Client(base_url=url, timeout=5) as http:
        http.get("/health")  # connection warmed
        sender.start()
        while sender.is_alive():
            started = time.perf_counter()
            assert http.get("/health").status_code == 200
            latencies.append(time.perf_counter() - started)
            time.sleep(0.01)
    sender.join()
    assert outcome["answer"].startswith(b"HTTP/1.1 413"), outcome["answer"][:100]
    assert outcome["sent"] < 20 << 20 and outcome["seconds"] < 5
    assert len(latencies) >= 1 and max(latencies) < 0.1, latencies


def test_health_answers_fast_while_generating(live, slow_model):
    url, engine, _ = live
    done = threading.Event()

    def generate() -> None:
        with httpx.Client(base_url=url, timeout=30) as client:
            client.post("/v1/completions", json={"prompt": "hello", "max_tokens": 8, "min_tokens": 8})
        done.set()

    threading.Thread(target=generate).start()
    latencies = []
    with httpx.Client(base_url=url, timeout=5) as http:
        while engine.metrics["in_flight"] == 0 and not done.is_set():
            time.sleep(0.005)
        while not done.is_set():
            started = time.perf_counter()
            http.get("/health")
            latencies.append(time.perf_counter() - started)
            time.sleep(0.01)
    assert len(latencies) >= 5 and max(latencies) < 0.1, latencies


@pytest.mark.parametrize("headers", ["Content-Length: 5\r\nContent-Length: 50\r\n", "Content-Length: -5\r\n",
                                     "Host: evil.example\r\n"])
def test_malformed_http_gets_an_openai_error_too(live, headers):
    _, _, port = live
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"{headers}\r\n")
    answer, _ = raw_request(port, head, b'{"prompt": "hi"}')
    assert answer.startswith(b"HTTP/1.1 400"), answer[:100]
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "invalid_http"


def test_slow_headers_are_cut_off(live):
    _, _, port = live
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0")  # ... and nothing more
        started = time.perf_counter()
        assert sock.recv(1024) == b""  # closed by the server
        assert 0.3 < time.perf_counter() - started < 3


def test_silent_connection_is_cut_off(live):
    _, _, port = live
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        started = time.perf_counter()
        assert sock.recv(1024) == b""
        assert 0.3 < time.perf_counter() - started < 3


def test_slow_body_gets_408(live):
    _, _, port = live
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            "Content-Length: 100\r\n\r\n")
    answer, seconds = raw_request(port, head, b'{"prompt": ')
    assert answer.startswith(b"HTTP/1.1 408") and 0.3 < seconds < 3


def test_disconnect_cancels_a_running_generation(live, slow_model):
    url, engine, port = live
    body = json.dumps({"prompt": "hello", "max_tokens": 200, "min_tokens": 200}).encode()
    limits_before = engine.limits.max_tokens
    engine.limits.max_tokens = 200  # 200 steps x 20 ms: ~4 s if nobody cancels
    try:
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json"
                         f"\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
            deadline = time.time() + 5
            while engine.metrics["in_flight"] == 0 and time.time() < deadline:
                time.sleep(0.01)
            time.sleep(0.3)
        started = time.perf_counter()
        while engine.metrics["in_flight"] and time.perf_counter() - started < 5:
            time.sleep(0.01)
        assert time.perf_counter() - started < 1.0  # freed at the next token, not after 200
    finally:
        engine.limits.max_tokens = limits_before
    assert engine.metrics["cancelled"] == 1 and engine.metrics["completion_tokens"] < 100


def test_disconnect_while_queued_never_runs(live):
    url, engine, port = live
    ran = recording(engine)
    engine.lock.acquire()  # the model is busy: requests wait in the queue
    try:
        first = threading.Thread(target=lambda: httpx.post(url + "/v1/completions", json={"prompt": "first"},
                                                           timeout=30))
        first.start()
        while engine.metrics["in_flight"] < 1:
            time.sleep(0.01)
        body = json.dumps({"prompt": "abandoned"}).encode()
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: "
                         f"application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
            while engine.metrics["in_flight"] < 2:
                time.sleep(0.01)
        while engine.metrics["cancelled"] < 1:
            time.sleep(0.01)
    finally:
        engine.lock.release()
    first.join()
    deadline = time.time() + 5
    while engine.metrics["in_flight"] and time.time() < deadline:
        time.sleep(0.01)
    assert ran == ["first"] and engine.metrics["in_flight"] == 0


def recording(engine: Engine) -> list[str]:
    """The prompts ``engine`` runs, in the order it runs them."""
    order: list[str] = []
    run = engine.run
    engine.run = lambda job, *a, **k: (order.append(job.retrieval_text), run(job, *a, **k))[1]
    return order


def wait_for(condition, seconds: float = 10) -> None:
    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.01)


def test_full_queue_waits_in_order_for_a_slot_and_refuses_past_the_wait_list(live):
    url, engine, _ = live
    order = recording(engine)
    statuses: dict[str, int] = {}

    def post(prompt: str) -> None:
        statuses[prompt] = httpx.post(url + COMPLETIONS, json={"prompt": prompt, "max_tokens": 2},
                                      timeout=30).status_code

    threads = []
    engine.lock.acquire()  # the model is busy
    try:
        for i, prompt in enumerate(["one", "two", "three", "four"]):  # 2 admitted (max_queue), 2 on the wait list
            threads.append(threading.Thread(target=post, args=(prompt,)))
            threads[-1].start()
            wait_for(lambda: engine.metrics["in_flight"] + engine.metrics["waiting"] == i + 1)
        started = time.perf_counter()
        refused = httpx.post(url + COMPLETIONS, json={"prompt": "five"})  # the wait list is full too: at once
        assert time.perf_counter() - started < 0.5
        error = is_openai_error(refused, 429)
        assert error["type"] == "rate_limit_error" and int(refused.headers["retry-after"]) >= 1
    finally:
        engine.lock.release()
    for thread in threads:
        thread.join()
    assert order == ["one", "two", "three", "four"]
    assert statuses == dict.fromkeys(["one", "two", "three", "four"], 200)
    assert engine.metrics["in_flight"] == engine.metrics["waiting"] == 0


def test_a_waiting_request_gets_429_with_retry_after_when_no_slot_frees_in_time(live):
    url, engine, _ = live
    engine.queue.seconds_per_job = 0.1  # a waiter gives up after 2 x 0.1 s per place ahead of it
    threads = [threading.Thread(target=httpx.post, args=(url + COMPLETIONS,), kwargs={"json": hi(), "timeout": 30})
               for _ in range(2)]
    engine.lock.acquire()
    try:
        for thread in threads:
            thread.start()
        wait_for(lambda: engine.metrics["in_flight"] == 2)
        started = time.perf_counter()
        refused = httpx.post(url + COMPLETIONS, json=hi())
        assert 0.15 < time.perf_counter() - started < 1.5
        assert is_openai_error(refused, 429)["code"] == "rate_limit_exceeded"
        assert refused.headers["retry-after"] == "1"
    finally:
        engine.lock.release()
    for thread in threads:
        thread.join()
    assert engine.metrics["waiting"] == 0 and engine.metrics["rejected"] == 1


# --------------------------------------------------------------------------- 12.4: the OpenAI API, strictly

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


def hi(**fields) -> dict:
    return {"prompt": "hi", "max_tokens": 2, **fields}


def say(content) -> dict:
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 2}


BAD = [
    (COMPLETIONS, b'{"prompt": "a\\ud800b"}', "prompt"),  # lone surrogate
    (CHAT, b'{"messages": [{"role": "user", "content": "\\udfff"}]}', "messages[0].content"),
    (CHAT, say([1, 2]), "messages[0].content"),
    (CHAT, say([{"type": "image_url", "image_url": {"url": "x"}}]), "messages[0].content"),
    (CHAT, say([{"type": "text", "text": 5}]), "messages[0].content"),
    (CHAT, say({"text": "hi"}), "messages[0].content"),
    (CHAT, say(None), "messages[0].content"),
    (CHAT, {"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    (CHAT, {"messages": [{"role": "user", "content": "hi", "tool_calls": [{}]}]}, "messages[0]"),
    (CHAT, {"messages": []}, "messages"),
    (CHAT, {"messages": ["hi"]}, "messages[0]"),
    (CHAT, {**say("hi"), "max_tokens": 2, "max_completion_tokens": 2}, "max_tokens"),
    (COMPLETIONS, hi(seed=1 << 63), "seed"),
    (COMPLETIONS, hi(seed=-(1 << 63) - 1), "seed"),
    (COMPLETIONS, hi(seed="1"), "seed"),
    (COMPLETIONS, hi(seed=1.5), "seed"),
    (COMPLETIONS, hi(max_tokens=0), "max_tokens"),
    (COMPLETIONS, hi(max_tokens=-5), "max_tokens"),
    (COMPLETIONS, hi(max_tokens="5"), "max_tokens"),
    (COMPLETIONS, hi(max_tokens=True), "max_tokens"),
    (COMPLETIONS, hi(max_tokens=2.5), "max_tokens"),
    (COMPLETIONS, hi(temperature="hot"), "temperature"),
    (COMPLETIONS, hi(temperature=2.5), "temperature"),
    (COMPLETIONS, hi(temperature=False), "temperature"),
    (COMPLETIONS, hi(top_p=1.5), "top_p"),
    (COMPLETIONS, hi(top_p=-0.1), "top_p"),
    (COMPLETIONS, hi(top_p=[1]), "top_p"),
    (COMPLETIONS, hi(stream="yes"), "stream"),
    (COMPLETIONS, hi(stream=1), "stream"),
    (COMPLETIONS, hi(stream_options={"include_usage": True}), "stream_options"),
    (COMPLETIONS, hi(stop=5), "stop"),
    (COMPLETIONS, hi(stop=["a", 1]), "stop"),
    (COMPLETIONS, hi(stop=[""]), "stop"),
    (COMPLETIONS, hi(stop=["a", "b", "c", "d", "e"]), "stop"),
    (COMPLETIONS, hi(user=5), "user"),
    (COMPLETIONS, hi(model=5), "model"),
    (COMPLETIONS, hi(min_tokens=-1), "min_tokens"),
    (COMPLETIONS, hi(prompt=5), "prompt"),
    (COMPLETIONS, hi(prompt=["a", "b"]), "prompt"),
    (COMPLETIONS, hi(prompt=[1, 2, 3]), "prompt"),
    (COMPLETIONS, hi(prompt={"text": "hi"}), "prompt"),
    (COMPLETIONS, {"max_tokens": 2}, "prompt"),
    (COMPLETIONS, hi(logprobs=5), "logprobs"),
    (COMPLETIONS, hi(best_of=2), "best_of"),
    (COMPLETIONS, hi(echo=True), "echo"),
    (COMPLETIONS, hi(suffix="}"), "suffix"),
    (COMPLETIONS, hi(n=2), "n"),
    (COMPLETIONS, hi(presence_penalty=0.5), "presence_penalty"),
    (COMPLETIONS, hi(logit_bias={"5": 100}), "logit_bias"),
    (COMPLETIONS, hi(frobnicate=1), "frobnicate"),
    (CHAT, {**say("hi"), "tools": [{"type": "function"}]}, "tools"),
    (CHAT, {**say("hi"), "logprobs": True}, "logprobs"),
    (CHAT, {**say("hi"), "response_format": {"type": "json_object"}}, "response_format"),
    (COMPLETIONS, b'{"prompt": "hi", "x": ' + b"[" * 20 + b"]" * 20 + b"}", None),  # deeper than MAX_DEPTH
    (COMPLETIONS, b"[" * 100_000 + b"]" * 100_000, None),  # past the JSON parser's recursion limit
    (COMPLETIONS, b'{"prompt": "hi", "temperature": NaN}', None),
    (COMPLETIONS, b'{"prompt": "hi", "seed": ' + b"9" * 5000 + b"}", None),  # too many digits to parse
    (COMPLETIONS, b'\xff\xfe{"prompt": "hi"}', None),
    (COMPLETIONS, b'"just a string"', None),
    (COMPLETIONS, b"", None),
]


@pytest.mark.parametrize("path, body, param", BAD, ids=[f"{i}-{b[2] or ''}" for i, b in enumerate(BAD)])
def test_bad_bodies_get_a_400_that_names_the_field(client, path, body, param):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    error = is_openai_error(client.post(path, content=raw, headers={"content-type": "application/json"}), 400)
    assert error["param"] == param and error["type"] == "invalid_request_error"
    if param and param.isidentifier():
        assert repr(param) in error["message"]


@pytest.mark.parametrize("fields", [dict(n=1), dict(echo=False), dict(logprobs=None), dict(presence_penalty=0),
                                    dict(best_of=1), dict(logit_bias={}), dict(user="u-1"), dict(seed=(1 << 63) - 1),
                                    dict(seed=-(1 << 63)), dict(stop=None), dict(max_tokens=2.0)])
def test_no_op_values_of_unsupported_parameters_are_accepted(client, fields):
    assert client.post(COMPLETIONS, json=hi(**fields)).status_code == 200


def test_text_parts_are_accepted_and_mean_their_joined_text(client):
    parts = client.post(CHAT, json=say([{"type": "text", "text": "def "}, {"type": "text", "text": "add"}])).json()
    plain = client.post(CHAT, json=say("def add")).json()
    assert parts["choices"][0]["message"] == plain["choices"][0]["message"]
    assert parts["usage"] == plain["usage"]


def test_top_p_zero_is_greedy(client):
    greedy = client.post(COMPLETIONS, json=hi(max_tokens=8, min_tokens=8)).json()["choices"][0]["text"]
    for seed in (1, 2, 3):
        sampled = client.post(COMPLETIONS, json=hi(max_tokens=8, min_tokens=8, temperature=1.5, top_p=0, seed=seed))
        assert sampled.json()["choices"][0]["text"] == greedy
    for temperature in (1e-300, 1e-40, 1e-4):  # vanishing temperatures: greedy, not inf logits and a 500
        tiny = client.post(COMPLETIONS, json=hi(max_tokens=8, min_tokens=8, temperature=temperature, seed=1))
        assert tiny.json()["choices"][0]["text"] == greedy
    # and sampling does happen when top_p is not 0, so the check above can fail
    texts = {client.post(COMPLETIONS, json=hi(max_tokens=8, min_tokens=8, temperature=2, seed=s)).json()
             ["choices"][0]["text"] for s in range(4)}
    assert len(texts) > 1


@pytest.mark.parametrize("fields", [dict(max_tokens=None), {}])
def test_null_or_absent_max_tokens_means_as_many_as_the_server_allows(client, fields):
    body = {"prompt": "hi", "min_tokens": 1000, **fields}
    assert client.post(COMPLETIONS, json=body).json()["usage"]["completion_tokens"] == LIMITS.max_tokens


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x"])
def test_bodies_must_be_json(client, content_type):
    headers = {"content-type": content_type} if content_type else {}
    response = client.post(COMPLETIONS, content=json.dumps(hi()).encode(), headers=headers)
    assert is_openai_error(response, 415)["code"] == "unsupported_media_type"
    ok = client.post(COMPLETIONS, content=json.dumps(hi()).encode(),
                     headers={"content-type": "application/json; charset=utf-8"})
    assert ok.status_code == 200


def test_unknown_paths_and_methods_answer_in_openai_shape(client):
    assert is_openai_error(client.get("/v1/nothing"), 404)
    assert is_openai_error(client.get(COMPLETIONS), 405)


# --------------------------------------------------------------------------- 12.5: security posture


def test_api_key_is_required_except_for_health(loaded):
    with TestClient(create_app(engine_of(loaded), GuardConfig(api_key=KEY))) as c:
        assert c.get("/health").status_code == 200
        missing = c.post(COMPLETIONS, json=hi())
        assert is_openai_error(missing, 401)["code"] == "invalid_api_key"
        assert missing.headers["www-authenticate"] == "Bearer"
        for header in (f"Bearer {KEY}x", f"Bearer {KEY[:-1]}", f"Basic {KEY}", KEY, "Bearer "):
            assert c.post(COMPLETIONS, json=hi(), headers={"authorization": header}).status_code == 401
        assert c.get("/v1/models").status_code == 401 and c.get("/metrics").status_code == 401
        good = {"authorization": f"Bearer {KEY}"}
        assert c.post(COMPLETIONS, json=hi(), headers=good).status_code == 200
        assert c.get("/v1/models", headers={"authorization": f"bearer {KEY}"}).status_code == 200


def test_openai_client_with_the_key(loaded):
    from openai import AuthenticationError, OpenAI

    url, server, thread = start_in_thread(engine_of(loaded), api_key=KEY)
    try:
        good = OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
        assert good.completions.create(model="tiny", prompt="hi", max_tokens=2).usage.completion_tokens <= 2
        with pytest.raises(AuthenticationError):
            OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).completions.create(
                model="tiny", prompt="hi", max_tokens=2)
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_host_header_must_be_a_bound_loopback_name(live):
    url, _, port = live
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"LOCALHOST:{port}", "localhost", f"[::1]:{port}"):
        assert httpx.get(url + "/health", headers={"host": host}).status_code == 200, host
    for host in ("evil.example", f"evil.example:{port}", f"127.0.0.1.evil.example:{port}", f"localhost:{port + 1}"):
        response = httpx.post(url + COMPLETIONS, json=hi(), headers={"host": host})
        assert is_openai_error(response, 400)["code"] == "invalid_host", host
    answer, _ = raw_request(port, "GET /health HTTP/1.0\r\n\r\n")  # no Host at all
    assert answer.startswith(b"HTTP/1.1 400")


def test_host_check_only_on_loopback_and_warning_beyond_it():
    assert loopback_hosts("0.0.0.0", 8000) is None and loopback_hosts("192.168.1.5", 8000) is None
    assert loopback_hosts("::1", 8000) == loopback_hosts("127.0.0.1", 8000) == loopback_hosts("localhost", 8000)
    assert "localhost:8000" in loopback_hosts("127.0.0.2", 8000)
    assert exposure_warning("0.0.0.0", None).startswith("WARNING") and "--api-key" in exposure_warning("::", None)
    assert exposure_warning("0.0.0.0", KEY) is None and exposure_warning("127.0.0.1", None) is None


def test_docs_are_off_by_default(client, loaded):
    for path in ("/openapi.json", "/docs", "/redoc"):
        assert client.get(path).status_code == 404
    with TestClient(create_app(engine_of(loaded), docs=True)) as c:
        assert c.get("/openapi.json").json()["info"]["title"] == "premoe"
        assert c.get("/docs").status_code == 200


def test_internal_errors_do_not_leak(loaded, caplog):
    engine = engine_of(loaded)

    def explode(*args, **kwargs):
        raise RuntimeError("secret /home/alice/.cache/model.bin")

    engine.run = explode
    with TestClient(create_app(engine), raise_server_exceptions=False) as c:
        response = c.post(COMPLETIONS, json=hi())
        error = is_openai_error(response, 500)
        assert "secret" not in response.text and "RuntimeError" not in response.text
        request_id = response.headers["x-request-id"]
        assert request_id in error["message"] and error["type"] == "server_error"
        stream = c.post(COMPLETIONS, json=hi(stream=True))
        assert "secret" not in stream.text and stream.headers["x-request-id"] in stream.text
    logged = [r for r in caplog.records if r.name == "premoe.guard"]
    assert any(request_id in r.getMessage() and "secret" in str(r.exc_info[1]) for r in logged)


def test_cli_refuses_out_of_range_options(tiny_qwen3):
    from click.testing import CliRunner

    from premoe.cli.serve import command

    for option in (["--port", "80000"], ["--port", "0"], ["--max-queue", "0"], ["--max-queue", "-1"],
                   ["--max-tokens", "0"], ["--max-tokens", "-5"], ["--max-body", "10"], ["--read-timeout", "0"],
                   ["--experts", "0"]):
        result = CliRunner().invoke(command, [str(tiny_qwen3), *option])
        assert result.exit_code == 2 and option[0] in result.output and "Traceback" not in result.output, option


# --------------------------------------------------------------------------- 12.8: random and mutated bodies

FIELDS = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "stream",
          "stop", "seed", "user", "min_tokens", "logprobs", "echo", "best_of", "suffix", "stream_options",
          "presence_penalty", "logit_bias", "response_format", "tools"]
TEXT = st.text(st.characters(codec=None, exclude_categories=()), max_size=20) | st.sampled_from(
    ["hi", "", "tiny", "text", "user", "assistant", "\ud800", "def add(a, b):"])
SCALARS = (st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70) | st.integers(-3, 300)
           | st.floats(allow_nan=False, allow_infinity=False) | st.floats(0, 2) | st.floats(0, 1e-3) | TEXT)
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(TEXT | st.sampled_from(["type", "text", "role", "content"]), inner, max_size=4),
                      max_leaves=12)
VALID = {COMPLETIONS: {"prompt": "def add(a, b):", "max_tokens": 2},
         CHAT: {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}], "max_tokens": 2}}


@st.composite
def bodies(draw, path: str) -> bytes:
    """A random JSON body, a mutation of a valid one, or random bytes."""
    kind = draw(st.sampled_from(["mutated", "mutated", "random", "bytes"]))
    if kind == "bytes":
        return draw(st.binary(max_size=64))
    if kind == "random":
        return json.dumps(draw(st.dictionaries(st.sampled_from(FIELDS) | TEXT, VALUES, max_size=5))).encode()
    body = json.loads(json.dumps(VALID[path]))
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(FIELDS))
        if draw(st.booleans()) and key in body:
            del body[key]
        elif key == "messages" and draw(st.booleans()):  # mutate inside the nested message
            message = {"role": draw(st.sampled_from(["user", "system", "assistant", "tool"]) | TEXT),
                       "content": draw(VALUES)}
            earlier = body.get("messages")  # an earlier draw may have set it to any value
            body["messages"] = [message, *(earlier[:1] if isinstance(earlier, list) else [])]
        else:
            body[key] = draw(VALUES)
    body["max_tokens"] = body.get("max_tokens", 2) if draw(st.booleans()) else 2
    return json.dumps(body).encode()


def check_answer(response: httpx.Response) -> None:
    assert response.status_code != 500 and response.status_code < 600
    if response.status_code == 200:
        if response.headers["content-type"].startswith("text/event-stream"):
            assert response.text.rstrip().endswith("data: [DONE]")
            assert '"error"' not in response.text
        else:
            body = response.json()
            assert body["choices"][0]["finish_reason"] in ("stop", "length")
            assert body["usage"]["completion_tokens"] <= LIMITS.max_tokens
    else:
        assert 400 <= response.status_code < 500
        is_openai_error(response, response.status_code)


@pytest.mark.parametrize("path", [COMPLETIONS, CHAT])
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(data=st.data())
def test_random_and_mutated_bodies_never_crash_the_server(client, path, data):
    raw = data.draw(bodies(path))
    check_answer(client.post(path, content=raw, headers={"content-type": "application/json"}))


def test_a_huge_prompt_is_refused_without_tokenising_it(loaded, monkeypatch):
    engine = engine_of(loaded)
    limit = LIMITS.max_prompt_tokens
    longest = max(loaded[1].get_vocab(), key=len)
    fits = longest * (limit // 2)  # the longest token repeated: as many characters per token as text can have
    assert len(loaded[1](fits)["input_ids"]) <= limit and len(fits) <= engine.max_prompt_chars(limit)
    with TestClient(create_app(engine)) as c:
        calls = []
        monkeypatch.setattr(engine, "tokenizer", lambda *a, **k: calls.append(a) or loaded[1](*a, **k))
        huge = "x" * (engine.max_prompt_chars(limit) + 1)
        error = is_openai_error(c.post(COMPLETIONS, json=hi(prompt=huge)), 400)
        assert error["code"] == "context_length_exceeded" and "characters" in error["message"] and calls == []
