"""The OpenAI-compatible server end to end with the official `openai` client (127.0.0.1, a free port,
in-process uvicorn stopped by the fixture)."""

from __future__ import annotations

import concurrent.futures
import json
import threading
import time
import urllib.error
import urllib.request

import pytest

from bench.serve import free_port
from engine import LLM

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")


@pytest.fixture(scope="module")
def server(tiny_models):
    from engine.server import create_app

    llm = LLM(tiny_models["llama"], max_model_len=256, page_size=8, num_pages=128, max_num_seqs=16,
              max_num_batched_tokens=32, backend="reference")
    app = create_app(llm, "tiny-llama")
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    base = f"http://127.0.0.1:{port}"
    client = openai.OpenAI(base_url=base + "/v1", api_key="unused", timeout=60, max_retries=0)
    yield llm, client, base
    srv.should_exit = True
    thread.join(timeout=15)


def _post(url, data: bytes):
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _get(url):
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.status, r.read().decode()


def test_models_health_completion_and_chat(server):
    llm, client, base = server
    assert [m.id for m in client.models.list().data] == ["tiny-llama"]
    assert _get(base + "/health")[0] == 200
    out = client.completions.create(model="tiny-llama", prompt="The quick brown fox", max_tokens=6, temperature=0,
                                    logprobs=0, extra_body={"ignore_eos": True})
    choice = out.choices[0]
    assert choice.finish_reason == "length" and out.usage.completion_tokens == 6
    assert len(choice.logprobs.token_logprobs) == 6 and all(lp <= 0 for lp in choice.logprobs.token_logprobs)
    # the same greedy request through the engine directly gives the same text
    from engine import SamplingParams

    direct = llm.generate("The quick brown fox", SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))[0]
    assert choice.text == direct.text
    chat = client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "Hello!"}],
                                          max_tokens=5, temperature=0.7, seed=3)
    assert chat.choices[0].message.role == "assistant"
    assert chat.usage.completion_tokens <= 5 and chat.choices[0].finish_reason in ("stop", "length")


def test_streaming_matches_non_streaming(server):
    _, client, _ = server
    kw = dict(model="tiny-llama", prompt="Hello, world", max_tokens=10, temperature=0, extra_body={"ignore_eos": True})
    full = client.completions.create(**kw).choices[0].text
    chunks = list(client.completions.create(stream=True, **kw))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full
    assert chunks[-1].choices[0].finish_reason == "length"
    chat_chunks = list(client.chat.completions.create(model="tiny-llama", stream=True, max_tokens=4, temperature=0,
                                                      messages=[{"role": "user", "content": "Hi"}]))
    assert chat_chunks[0].choices[0].delta.role == "assistant"
    assert chat_chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_32_concurrent_streams(server):

    llm, client, _ = server

    def one(i):
        stream = client.completions.create(model="tiny-llama", prompt=f"Request number {i}:", max_tokens=8,
                                           temperature=0.8, seed=i, stream=True, extra_body={"ignore_eos": True})
        n, reason = 0, None
        for chunk in stream:
            n += 1
            reason = chunk.choices[0].finish_reason or reason
        return n, reason

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one, range(32)))
    assert all(n == 8 and reason == "length" for n, reason in results), results
    assert llm.stats()["compiles_after_warmup"] == 0


def test_cancelled_stream_frees_its_pages(server):
    llm, client, _ = server
    stream = client.completions.create(model="tiny-llama", prompt="Tell me a very long story", max_tokens=200,
                                       temperature=0.8, stream=True, extra_body={"ignore_eos": True})
    it = iter(stream)
    for _ in range(3):
        next(it)
    assert llm.allocator.num_used > 0 and llm.stats()["running"] == 1
    stream.close()
    deadline = time.monotonic() + 5
    while llm.allocator.num_used > 0 or llm.stats()["running"] > 0:
        assert time.monotonic() < deadline, f"pages not freed after the client left: {llm.stats()}"
        time.sleep(0.02)
    assert llm.metrics.requests_aborted >= 1


def test_metrics_prometheus_text(server):
    _, _, base = server
    status, text = _get(base + "/metrics")
    assert status == 200
    for name in ("pallaskit_requests_running", "pallaskit_requests_waiting", "pallaskit_kv_pages_in_use",
                 "pallaskit_prefix_cache_hit_rate", "pallaskit_tokens_per_second",
                 "pallaskit_compilations_after_warmup 0", "pallaskit_time_to_first_token_seconds_bucket",
                 "pallaskit_time_per_output_token_seconds_count"):
        assert name in text, name


@pytest.mark.parametrize("body", [
    b"{not json",
    b"[1, 2]",
    json.dumps({"model": "tiny-llama"}).encode(),  # no prompt
    json.dumps({"prompt": "hi", "max_tokens": -1}).encode(),
    json.dumps({"prompt": "hi", "temperature": "hot"}).encode(),
    json.dumps({"prompt": "hi", "top_p": 0}).encode(),
    json.dumps({"prompt": "hi", "n": 2}).encode(),
    json.dumps({"prompt": [1, 2, 10**9]}).encode(),
    json.dumps({"prompt": "word " * 400}).encode(),  # longer than max_model_len
])
def test_malformed_completions_get_400(server, body):
    _, _, base = server
    status, payload = _post(base + "/v1/completions", body)
    assert status == 400, payload
    assert payload["error"]["type"] == "invalid_request_error" and payload["error"]["message"]


def test_malformed_chat_and_client_errors(server):
    _, client, base = server
    for body in ({"messages": []}, {"messages": [{"role": "user"}]}, {"messages": "hi"}):
        status, payload = _post(base + "/v1/chat/completions", json.dumps(body).encode())
        assert status == 400 and "message" in payload["error"]
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny-llama", prompt="hi", max_tokens=0)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="hi", max_tokens=2)
    assert _get(base + "/health")[0] == 200  # still serving


DEEP = b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}"


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/completions", {"prompt": "hi", "top_k": 2**31}, "top_k"),
    ("/v1/completions", {"prompt": "hi", "top_k": 10**6}, "prompt"),  # past the vocabulary (named in the text)
    ("/v1/completions", {"prompt": "hi", "logprobs": -1}, "logprobs"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 100}, "logprobs"),
    ("/v1/completions", {"prompt": "hi", "logprobs": "x"}, "logprobs"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 3}, "logprobs"),  # alternatives: not served yet, never ignored
    ("/v1/completions", {"prompt": "hi", "best_of": 2}, "best_of"),
    ("/v1/completions", {"prompt": "hi", "suffix": "!"}, "suffix"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"5": 10}}, "logit_bias"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 10**6}, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "seed": 2**70}, "seed"),
    ("/v1/completions", {"prompt": "ab\ud800cd"}, "prompt"),
    ("/v1/completions", DEEP, None),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": None}]}]},
     "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "ab\ud800cd"}]}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": "yes"}, "logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": True,
                              "top_logprobs": 50}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": True,
                              "top_logprobs": -1}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": True,
                              "top_logprobs": 3}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                              "tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "required"},
     "tools"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                              "response_format": {"type": "json_object"}}, "response_format"),
])
def test_bad_requests_get_a_4xx_naming_the_parameter_and_the_server_keeps_serving(server, path, body, param):
    llm, client, base = server
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    status, payload = _post(base + path, data)
    assert status == 400, payload
    err = payload["error"]
    assert err["type"] == "invalid_request_error" and err["message"]
    if param is not None:
        assert err["param"] == param or param in err["message"], err
    assert _get(base + "/health")[0] == 200
    out = client.completions.create(model="tiny-llama", prompt=[5, 6, 7], max_tokens=3, temperature=0)
    assert out.choices[0].finish_reason == "length"
    assert llm.stats()["kv_pages_in_use"] == 0


def test_a_failing_step_fails_its_requests_and_the_engine_keeps_serving(server, monkeypatch):
    """An injected fault in one step: that step's request gets a JSON 500, /health stays 200, and the
    next request is served as before with every page returned."""
    llm, client, base = server
    want = client.completions.create(model="tiny-llama", prompt=[9, 10, 11], max_tokens=4, temperature=0)
    real = llm.runner.execute
    calls = {"n": 0}

    def failing(plan):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected device fault")
        return real(plan)

    monkeypatch.setattr(llm.runner, "execute", failing)
    status, payload = _post(base + "/v1/completions", json.dumps({"prompt": [1, 2, 3], "max_tokens": 4}).encode())
    assert status == 500 and payload["error"]["type"] == "server_error" and "injected" in payload["error"]["message"]
    assert _get(base + "/health")[0] == 200
    again = client.completions.create(model="tiny-llama", prompt=[9, 10, 11], max_tokens=4, temperature=0)
    assert again.choices[0].text == want.choices[0].text and calls["n"] > 1
    assert llm.stats()["kv_pages_in_use"] == 0


def test_a_non_streaming_client_that_disconnects_frees_its_pages(server, monkeypatch):
    """The client closes its connection mid-request: the request is aborted and its pages return."""
    import socket

    llm, _, base = server
    real = llm.runner.execute

    def slow(plan):  # 20 ms a step: 240 tokens take ~5 s, the disconnect is seen long before
        time.sleep(0.02)
        return real(plan)

    monkeypatch.setattr(llm.runner, "execute", slow)
    port = int(base.rsplit(":", 1)[1])
    body = json.dumps({"prompt": [5, 6, 7], "max_tokens": 240, "ignore_eos": True}).encode()
    before = llm.metrics.requests_aborted
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        deadline = time.monotonic() + 10
        while llm.stats()["running"] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
    deadline = time.monotonic() + 10
    while (llm.stats()["running"] or llm.stats()["kv_pages_in_use"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    st = llm.stats()
    assert st["running"] == 0 and st["kv_pages_in_use"] == 0, st
    assert llm.metrics.requests_aborted == before + 1  # aborted, not run to its 200 tokens
