"""The HTTP server, driven by real clients (httpx, openai) against uvicorn on a free localhost port."""
import json
import threading
import time

import httpx
import pytest
from openai import OpenAI

import domains
from premoe.serve import Engine, ServeLimits, create_app, start_in_thread

LIMITS = ServeLimits(max_prompt_tokens=128, max_tokens=8, max_queue=2, retrieval_tokens=64)
CODE = domains.texts("code", 5000, 1)[0][:120]


@pytest.fixture(scope="module")
def built(tiny_qwen3, tmp_path_factory):
    """(profile, store directory) of the three synthetic domains."""
    profile, store = domains.make_store(tiny_qwen3)
    return profile, store.save(tmp_path_factory.mktemp("serve") / "store")


@pytest.fixture(scope="module")
def server(tiny_qwen3, built):
    """(base url, engine) of a retrieval server over the three synthetic domains, M = 4."""
    engine = Engine.retrieval(tiny_qwen3, built[1], 4, LIMITS, name="tiny")
    url, app, thread = start_in_thread(engine)
    yield url, engine
    app.should_exit = True
    thread.join(timeout=10)


@pytest.fixture()
def http(server):
    with httpx.Client(base_url=server[0], timeout=30) as client:
        yield client


@pytest.fixture()
def openai_client(server):
    return OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0)


def test_models_health_metrics(http):
    assert http.get("/v1/models").json()["data"][0]["id"] == "tiny"
    health = http.get("/health").json()
    assert health["status"] == "ok" and health["domain"] in domains.DOMAINS
    assert "premoe_requests_total" in http.get("/metrics").text


def test_completion_carries_retrieval_and_swap(openai_client, server):
    engine = server[1]
    result = openai_client.completions.create(model="tiny", prompt=CODE, max_tokens=5)
    assert result.object == "text_completion" and result.usage.completion_tokens <= 5
    info = result.model_extra["premoe"]
    expected = engine.retriever.retrieve(CODE, tokens=LIMITS.retrieval_tokens)
    assert info["domain"] == expected.domain and info["distances"] == expected.distances
    assert info["experts"] == {str(l): e for l, e in engine.retriever.store.kept(expected.domain, 4).items()}
    assert set(info["swapped"]) >= {"experts", "bytes", "seconds"}
    again = openai_client.completions.create(model="tiny", prompt=CODE, max_tokens=5)
    assert again.model_extra["premoe"]["swapped"]["experts"] == 0  # already resident
    assert again.choices[0].text == result.choices[0].text  # greedy by default


def test_chat_and_streaming_agree_with_plain_requests(openai_client, http):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": CODE}]
    plain = openai_client.chat.completions.create(model="tiny", messages=messages, max_tokens=6)
    assert plain.choices[0].message.role == "assistant"
    assert plain.model_extra["premoe"]["domain"] in (*domains.DOMAINS, "generalist")
    chunks = list(openai_client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant" and "premoe" in chunks[0].model_extra
    assert chunks[-1].choices[0].finish_reason == plain.choices[0].finish_reason
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == plain.choices[0].message.content
    with http.stream("POST", "/v1/completions", json={"prompt": CODE, "max_tokens": 6, "stream": True}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line[len("data: "):]) for line in lines[:-1]]
    streamed = "".join(e["choices"][0]["text"] for e in events)
    plain = http.post("/v1/completions", json={"prompt": CODE, "max_tokens": 6}).json()
    assert streamed == plain["choices"][0]["text"]
    assert events[-1]["usage"]["completion_tokens"] == plain["usage"]["completion_tokens"]


def test_stop_sequences_cut_the_text(http):
    full = http.post("/v1/completions", json={"prompt": CODE, "max_tokens": 8}).json()["choices"][0]["text"]
    if len(full) < 4:
        pytest.skip(f"greedy text {full!r} too short to cut")
    stop = full[2:4]
    cut = http.post("/v1/completions", json={"prompt": CODE, "max_tokens": 8, "stop": stop}).json()["choices"][0]
    assert cut["text"] == full[: full.find(stop)] and cut["finish_reason"] == "stop"


@pytest.mark.parametrize("body, status, code", [
    (b"{not json", 400, "invalid_json"),
    (b"[1, 2]", 400, None),
    (json.dumps({"model": "gpt-9", "prompt": "hi"}).encode(), 404, "model_not_found"),
    (json.dumps({"prompt": "def add " * 200}).encode(), 400, "context_length_exceeded"),
    (json.dumps({"prompt": "hi", "max_tokens": -3}).encode(), 400, None),
    (json.dumps({"prompt": "hi", "n": 2}).encode(), 400, "unsupported_parameter"),
    (json.dumps({"prompt": ""}).encode(), 400, None),
])
def test_bad_requests_get_openai_errors_and_the_server_stays_up(http, body, status, code):
    response = http.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    assert response.status_code == status
    error = response.json()["error"]
    assert error["message"] and error["code"] == code
    assert http.get("/health").status_code == 200
    assert http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200


def test_bad_chat_messages(http):
    response = http.post("/v1/chat/completions", json={"messages": "hello"})
    assert response.status_code == 400 and "messages" in response.json()["error"]["message"]


def test_max_tokens_is_capped(http):
    result = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 10_000}).json()
    assert result["usage"]["completion_tokens"] <= LIMITS.max_tokens


def test_burst_is_served_or_refused_cleanly(server, http):
    base, engine = server
    statuses: list[int] = []

    def post(prompt: str) -> None:
        with httpx.Client(base_url=base, timeout=60) as client:
            statuses.append(client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 3}).status_code)

    engine.lock.acquire()  # hold the model so the queue fills deterministically
    try:
        queued = [threading.Thread(target=post, args=(p,)) for p in (CODE, "Der Fuchs")]
        for thread in queued:
            thread.start()
        deadline = time.time() + 10
        while engine.metrics["in_flight"] < LIMITS.max_queue and time.time() < deadline:
            time.sleep(0.01)
        refused = http.post("/v1/completions", json={"prompt": "hi"})
        assert refused.status_code == 429 and refused.json()["error"]["type"] == "rate_limit_error"
    finally:
        engine.lock.release()
    for thread in queued:
        thread.join()
    assert statuses == [200, 200]
    burst = [threading.Thread(target=post, args=(text,)) for text in domains.texts("bible", 0, 1)[0].split(",")[:8]]
    for thread in burst:
        thread.start()
    for thread in burst:
        thread.join()
    assert set(statuses) <= {200, 429} and len(statuses) == 2 + len(burst)
    assert http.get("/health").json()["in_flight"] == 0
    metrics = http.get("/metrics").text
    assert "premoe_rejected_total" in metrics and "premoe_swap_bytes_total" in metrics


def test_fixed_mode_serves_a_compiled_checkpoint(tiny_qwen3, built, tmp_path):
    from fastapi.testclient import TestClient

    from premoe.compile import compile_checkpoint
    from premoe.plan import PlanRequest, make_plan

    plan = make_plan(built[0], PlanRequest(experts=4, domain="de"))
    compile_checkpoint(tiny_qwen3, plan, tmp_path / "de-4", progress=False)
    engine = Engine.fixed_model(tmp_path / "de-4", LIMITS)
    with TestClient(create_app(engine)) as client:
        assert client.get("/health").json()["domain"] == "specialist:de"
        result = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                          "max_tokens": 3}).json()
    assert result["model"] == "de-4" and result["premoe"]["domain"] == "specialist:de"
    assert result["premoe"]["experts"] == {str(l): e for l, e in plan.kept.items()}
    assert result["premoe"]["swapped"]["experts"] == 0


def test_cli_checks_its_options(tiny_qwen3):
    from click.testing import CliRunner

    from premoe.cli.serve import command
    from premoe.errors import InputError

    with pytest.raises(InputError, match="--experts"):
        CliRunner().invoke(command, [str(tiny_qwen3), "--store", "somewhere"], catch_exceptions=False)
    with pytest.raises(InputError, match="--store"):
        CliRunner().invoke(command, [str(tiny_qwen3), "--experts", "4"], catch_exceptions=False)


def test_chat_rendering_uses_the_models_template_when_it_has_one():
    import copy

    import tiny
    from premoe.serve import render_chat

    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    plain = copy.deepcopy(tiny.tiny_tokenizer())
    plain.chat_template = None
    assert render_chat(plain, messages) == "system: be brief\nuser: hi\nassistant:"
    templated = copy.deepcopy(plain)
    templated.chat_template = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
                               "{% if add_generation_prompt %}<assistant>{% endif %}")
    assert render_chat(templated, messages) == "<system>be brief<user>hi<assistant>"
