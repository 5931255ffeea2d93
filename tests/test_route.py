"""`premoe route` in front of real `premoe serve` backends (compiled specialists of the tiny model) on loopback."""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

import domains
from premoe.errors import InputError
from premoe.route.app import route_server_config
from premoe.route.config import load_config
from premoe.route.router import Router
from premoe.serve import Engine, ServeLimits, start_in_thread, start_process

LIMITS = ServeLimits(max_prompt_tokens=64, max_tokens=8, max_queue=2, retrieval_tokens=32)
CODE = domains.texts("code", 5000, 1)[0][:60]
GERMAN = domains.texts("de", 5000, 1)[0][:60]
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def fleet(tiny_qwen3, tmp_path_factory):
    """{target: compiled checkpoint} for code, de and the generalist, and the store's path."""
    from premoe.compile import compile_checkpoint
    from premoe.plan import PlanRequest, make_plan

    out = tmp_path_factory.mktemp("fleet")
    from premoe.novelty import NoveltyParams

    # nearest: CODE's numbers (5000+) are bigrams the synthetic calibration text never had, so n-gram novelty
    # would send it to the generalist; these tests need it routed to the code backend
    profile, store = domains.make_store(tiny_qwen3, novelty=NoveltyParams(method="nearest"))
    dirs = {}
    for target, request in {"code": PlanRequest(experts=4, domain="code"), "de": PlanRequest(experts=4, domain="de"),
                            "generalist": PlanRequest(experts=4)}.items():
        dirs[target] = out / f"{target}-4"
        compile_checkpoint(tiny_qwen3, make_plan(profile, request), dirs[target], progress=False)
    return dirs, store.save(out / "store"), tiny_qwen3


@pytest.fixture(scope="module")
def backends(fleet):
    """In-process `premoe serve` servers, one per compiled checkpoint: {target: (url, engine)}."""
    running = {}
    for target, path in fleet[0].items():
        engine = Engine.fixed_model(path, LIMITS)
        url, server, thread = start_in_thread(engine)
        running[target] = (url, engine, server, thread)
    yield {t: (url, engine) for t, (url, engine, _, _) in running.items()}
    for _, _, server, thread in running.values():
        server.should_exit = True
        thread.join(timeout=10)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_config(tmp_path: Path, fleet, urls: dict[str, str], **extra) -> Path:
    path = tmp_path / "route.json"
    path.write_text(json.dumps({"model": str(fleet[2]), "store": str(fleet[1]), "name": "fleet",
                                "backends": {t: {"url": u} for t, u in urls.items()}, "health_interval": 0.2,
                                **extra}))
    return path


class RunningRouter:
    """The router on a free loopback port, in a thread, for the duration of a with-block."""

    def __init__(self, config: Path):
        import uvicorn

        self.router = Router.load(load_config(config))
        self.port = free_port()
        self.server = uvicorn.Server(route_server_config(self.router, "127.0.0.1", self.port))
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self):
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)


def urls_of(backends, **override) -> dict[str, str]:
    return {**{t: url for t, (url, _) in backends.items()}, **override}


def test_config_is_checked(tmp_path, fleet):
    cases = [({"model": "m", "store": "s", "backends": {"code": {"url": "http://x"}}}, "generalist"),
             ({"model": "m", "store": "s", "backends": {"generalist": {"url": "ftp://x"}}}, "url"),
             ({"model": "m", "store": "s", "backends": {"generalist": {"url": "http://x", "key": "k"}}}, "takes"),
             ({"model": "m", "store": "s", "backends": {}, "colour": "red"}, "unknown keys"),
             ({"model": "m", "store": "s", "backends": {"generalist": {"url": "http://x"}}, "health_interval": 0},
              "positive"),
             ({"store": "s", "backends": {}}, "\"model\"")]
    for raw, message in cases:
        path = tmp_path / "bad.json"
        path.write_text(json.dumps(raw))
        with pytest.raises(InputError, match=message):
            load_config(path)
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(InputError, match="not valid JSON"):
        load_config(tmp_path / "broken.json")
    stray = write_config(tmp_path, fleet, {"generalist": "http://127.0.0.1:1", "klingon": "http://127.0.0.1:1"})
    with pytest.raises(InputError, match="klingon"):
        Router.load(load_config(stray))


def test_requests_go_to_their_domains_backend(tmp_path, fleet, backends):
    with RunningRouter(write_config(tmp_path, fleet, urls_of(backends))) as running:
        expected = {text: running.router.retriever.retrieve(text, tokens=256).domain for text in (CODE, GERMAN)}
        for text in (CODE, GERMAN):
            response = httpx.post(running.url + "/v1/completions", json={"prompt": text, "max_tokens": 3,
                                                                          "model": "fleet"})
            assert response.status_code == 200, response.text
            body = response.json()
            domain = expected[text]
            backend = domain if domain in backends else "generalist"
            assert response.headers["x-premoe-route-domain"] == domain
            assert body["premoe_route"]["backend"] == backend and body["premoe_route"]["skipped"] == []
            assert body["model"] == Path(fleet[0][backend]).name  # the backend's own model id
            direct = httpx.post(backends[backend][0] + "/v1/completions", json={"prompt": text, "max_tokens": 3})
            assert body["choices"] == direct.json()["choices"]  # forwarded unchanged
        chat = httpx.post(running.url + "/v1/chat/completions",
                          json={"messages": [{"role": "user", "content": CODE}], "max_tokens": 3})
        assert chat.status_code == 200 and chat.json()["object"] == "chat.completion"
        metrics = httpx.get(running.url + "/metrics").text
        assert f'premoe_route_decisions_total{{domain="{expected[CODE]}"' in metrics
        assert 'premoe_route_backend_up{backend="generalist"} 1' in metrics


def test_bad_requests_are_refused_by_the_router_itself(tmp_path, fleet, backends):
    with RunningRouter(write_config(tmp_path, fleet, urls_of(backends))) as running:
        before = {t: e.metrics["requests"] for t, (_, e) in backends.items()}
        for body in ({"prompt": CODE, "seed": 1 << 64}, {"prompt": "a\ud800"}, {"prompt": CODE, "echo": True},
                     {"prompt": CODE, "model": "other"}):
            response = httpx.post(running.url + "/v1/completions", content=json.dumps(body),
                                  headers={"content-type": "application/json"})
            assert response.status_code in (400, 404) and set(response.json()["error"]) == {
                "message", "type", "param", "code"}
        assert httpx.post(running.url + "/v1/completions", content=b"x" * (2 << 20),
                          headers={"content-type": "application/json"}).status_code == 413
        assert {t: e.metrics["requests"] for t, (_, e) in backends.items()} == before  # nothing reached a backend


def test_dead_backend_sends_its_requests_to_the_generalist(tmp_path, fleet, backends):
    dead = f"http://127.0.0.1:{free_port()}"
    with RunningRouter(write_config(tmp_path, fleet, urls_of(backends, code=dead, de=dead))) as running:
        domain = running.router.retriever.retrieve(CODE, tokens=256).domain
        response = httpx.post(running.url + "/v1/completions", json={"prompt": CODE, "max_tokens": 3})
        assert response.status_code == 200 and response.headers["x-premoe-route-backend"] == "generalist"
        if domain in ("code", "de"):
            assert response.json()["premoe_route"]["skipped"] in ([], ["down"])  # [] once the health check saw it
            time.sleep(0.5)
            assert running.router.up[domain] is False
            assert 'premoe_route_backend_up{backend="code"} 0' in httpx.get(running.url + "/metrics").text


def test_overloaded_backend_sends_its_requests_to_the_generalist(tmp_path, fleet, backends):
    urls = urls_of(backends)
    with RunningRouter(write_config(tmp_path, fleet, {"code": urls["code"], "de": urls["code"],
                                                      "generalist": urls["generalist"]})) as running:
        engine = backends["code"][1]
        engine.queue.seconds_per_job = 0.01  # a request that finds the queue full waits ~20 ms, then 429
        engine.lock.acquire()
        blockers = [threading.Thread(target=httpx.post, args=(urls["code"] + "/v1/completions",),
                                     kwargs={"json": {"prompt": "x", "max_tokens": 1}, "timeout": 30})
                    for _ in range(LIMITS.max_queue)]
        try:
            for thread in blockers:
                thread.start()
            while engine.metrics["in_flight"] < LIMITS.max_queue:
                time.sleep(0.01)
            response = httpx.post(running.url + "/v1/completions", json={"prompt": CODE, "max_tokens": 3})
        finally:
            engine.lock.release()
        for thread in blockers:
            thread.join()
        assert response.status_code == 200 and response.headers["x-premoe-route-backend"] == "generalist"
        assert response.json()["premoe_route"]["skipped"] == ["overloaded"]
        assert 'premoe_route_fallbacks_total{reason="overloaded"} 1' in httpx.get(running.url + "/metrics").text


def test_streams_pass_through_as_they_are_generated(tmp_path, fleet, backends):
    urls = urls_of(backends)
    config = write_config(tmp_path, fleet, {"code": urls["generalist"], "de": urls["generalist"],
                                            "generalist": urls["generalist"]})
    engine = backends["generalist"][1]
    handle = engine.model.register_forward_pre_hook(lambda module, args: time.sleep(0.05))  # 50 ms per token
    try:
        with RunningRouter(config) as running:
            body = {"prompt": CODE, "max_tokens": 8, "min_tokens": 8, "stream": True}
            started, arrivals, lines = time.perf_counter(), [], []
            with httpx.stream("POST", running.url + "/v1/completions", json=body, timeout=30) as response:
                for line in response.iter_lines():
                    if line:
                        arrivals.append(time.perf_counter() - started)
                        lines.append(line)
            direct = httpx.post(urls["generalist"] + "/v1/completions", json={**body, "stream": False}).json()
    finally:
        handle.remove()
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line[6:]) for line in lines[:-1]]
    assert "".join(e["choices"][0]["text"] for e in events) == direct["choices"][0]["text"]
    assert arrivals[0] < arrivals[-1] - 0.2  # the first event came ~8 x 50 ms before the last: not buffered


def start_backend(path: Path, port: int) -> subprocess.Popen:
    """A real `premoe serve` process."""
    return start_process([str(path), "--max-tokens", "200", "--max-queue", "32"], port, timeout=60,
                         env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}, quiet=True)


@pytest.mark.slow
def test_a_backend_killed_mid_stream_and_under_load_loses_no_request(tmp_path, fleet, backends):
    port = free_port()
    process = start_backend(fleet[0]["code"], port)
    urls = urls_of(backends)
    config = write_config(tmp_path, fleet, {"code": f"http://127.0.0.1:{port}", "de": f"http://127.0.0.1:{port}",
                                            "generalist": urls["generalist"]})
    generalist = backends["generalist"][1]
    generalist.limits.max_tokens, generalist.queue.max_queue = 200, 64
    try:
        with RunningRouter(config) as running:
            outcomes: list = []

            def request(i: int) -> None:
                body = {"prompt": CODE, "max_tokens": 40, "min_tokens": 40, "stream": i % 2 == 0}
                with httpx.stream("POST", running.url + "/v1/completions", json=body, timeout=120) as response:
                    text = response.read().decode()
                outcomes.append((response.status_code, body["stream"], text))

            body = {"prompt": CODE, "max_tokens": 200, "min_tokens": 200, "stream": True, "temperature": 2.0,
                    "seed": 1}  # sampled text has spaces, so the random model's text streams in many chunks
            with httpx.stream("POST", running.url + "/v1/completions", json=body, timeout=120) as response:
                assert response.headers["x-premoe-route-backend"] == "code", response.headers
                lines = response.iter_lines()
                events = []
                for line in lines:  # read until the backend has sent some text, then kill it
                    if line.startswith("data: {"):
                        events.append(json.loads(line[6:]))
                        if events[-1]["choices"][0]["text"]:
                            break
                load = [threading.Thread(target=request, args=(i,)) for i in range(12)]
                for thread in load:
                    thread.start()
                os.kill(process.pid, signal.SIGKILL)
                rest = [line for line in lines if line]
            for thread in load:
                thread.join()
    finally:
        process.kill()
        generalist.limits.max_tokens, generalist.queue.max_queue = LIMITS.max_tokens, LIMITS.max_queue
    assert rest[-1] == "data: [DONE]"
    events += [json.loads(line[6:]) for line in rest[:-1]]
    assert all("error" not in e for e in events) and len({e["id"] for e in events}) == 1
    assert [e["model"] for e in events][0] == "code-4" and events[-1]["model"] == "generalist-4"  # continued there
    assert events[-1]["choices"][0]["finish_reason"] in ("length", "stop")
    assert len(outcomes) == 12 and all(status == 200 for status, _, _ in outcomes)
    assert all(text.rstrip().endswith("data: [DONE]") and '"error"' not in text for _, stream, text in outcomes
               if stream)
    assert all(json.loads(text)["usage"]["completion_tokens"] == 40 for _, stream, text in outcomes if not stream)
    assert running.router.counters["continued_streams"] >= 1


def test_cli_reports_a_bad_config_in_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    missing = subprocess.run([sys.executable, "-c", "from premoe.cli import main; main()", "route",
                              str(tmp_path / "nope.json")], capture_output=True, text=True, env=env, timeout=60)
    assert missing.returncode == 2 and missing.stderr.strip().count("\n") == 0 and "nope.json" in missing.stderr
    port = subprocess.run([sys.executable, "-c", "from premoe.cli import main; main()", "route", "x.json", "--port",
                           "70000"], capture_output=True, text=True, env=env, timeout=60)
    assert port.returncode == 2 and "--port" in port.stderr and "Traceback" not in port.stderr
