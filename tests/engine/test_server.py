"""The OpenAI-compatible server end to end with the official `openai` client (127.0.0.1, a free port,
in-process uvicorn stopped by the fixture)."""

from __future__ import annotations

import concurrent.futures
import json
import time
import urllib.error
import urllib.request

import pytest

from engine import LLM
from tests.engine.conftest import running_server

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")


@pytest.fixture(scope="module")
def server(tiny_models):
    llm = LLM(tiny_models["llama"], max_model_len=256, page_size=8, num_pages=128, max_num_seqs=16,
              max_num_batched_tokens=32, backend="reference")
    with running_server(llm, "tiny-llama") as (client, base):
        yield llm, client, base


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


def test_logprobs_alternatives_both_endpoints_streaming_too(server):
    """`logprobs` N (completions) / `top_logprobs` N (chat): per token the N most likely tokens of the
    model's distribution, in descending order, the greedy choice first; the same over a stream; and
    equal to a log-softmax of the reference forward's logits for the same position."""
    import numpy as np

    llm, client, _ = server
    kw = dict(model="tiny-llama", prompt="The quick brown fox", max_tokens=5, temperature=0,
              extra_body={"ignore_eos": True})
    lp = client.completions.create(logprobs=4, **kw).choices[0].logprobs
    assert len(lp.top_logprobs) == 5
    for tok, chosen, alts in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        # keyed by text, as OpenAI's: byte tokens that decode alike ("\ufffd") share one entry
        assert 1 <= len(alts) <= 5 and alts[tok] == pytest.approx(chosen)
        assert chosen == pytest.approx(max(alts.values()))  # greedy: the most likely token
    streamed = [c.choices[0].logprobs for c in client.completions.create(logprobs=4, stream=True, **kw)]
    assert [t for c in streamed for t in c.top_logprobs] == lp.top_logprobs
    assert [o for c in streamed for o in c.text_offset] == lp.text_offset

    msgs = [{"role": "user", "content": "Hello!"}]
    chat = client.chat.completions.create(model="tiny-llama", messages=msgs, max_tokens=4, temperature=0.9, seed=5,
                                          logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert content and all(len(c.top_logprobs) == 3 for c in content)
    for c in content:
        values = [a.logprob for a in c.top_logprobs]
        assert values == sorted(values, reverse=True) and c.logprob <= values[0] + 1e-6
        assert all(a.bytes == list(a.token.encode()) for a in c.top_logprobs)
    chunks = client.chat.completions.create(model="tiny-llama", messages=msgs, max_tokens=4, temperature=0.9, seed=5,
                                            logprobs=True, top_logprobs=3, stream=True)
    streamed = [x for ch in chunks if ch.choices and ch.choices[0].logprobs for x in ch.choices[0].logprobs.content]
    assert [[a.token for a in x.top_logprobs] for x in streamed] == [[a.token for a in c.top_logprobs] for c in content]

    # the first token's alternatives against the engine's own reference forward of the prompt
    from engine import SamplingParams

    out = llm.generate("The quick brown fox", SamplingParams(max_tokens=1, temperature=0, top_logprobs=20,
                                                             ignore_eos=True))[0]
    ids, values = zip(*out.top_logprobs[0])
    assert len(ids) == 20 and list(values) == sorted(values, reverse=True) and ids[0] == out.token_ids[0]
    probs = np.exp(np.asarray(values))
    assert 0 < probs.sum() <= 1 + 1e-5
    assert llm.stats()["compiles_after_warmup"] == 0


def test_n_and_best_of(server):
    """n choices are n candidates seeded seed, seed + 1, ...: each equals the single request with
    its seed; best_of keeps the n with the highest log-probability per token, in candidate order;
    usage counts every generated token; a stream of n choices interleaves them by index."""
    from engine import SamplingParams

    llm, client, _ = server
    kw = dict(model="tiny-llama", prompt="Once upon a time", max_tokens=6, temperature=1.0,
              extra_body={"ignore_eos": True})
    out = client.completions.create(n=3, seed=7, **kw)
    assert [c.index for c in out.choices] == [0, 1, 2] and out.usage.completion_tokens == 18
    singles = [client.completions.create(seed=7 + i, **kw).choices[0].text for i in range(4)]
    assert [c.text for c in out.choices] == singles[:3] and len(set(singles)) > 1

    best = client.completions.create(n=2, best_of=4, seed=7, logprobs=0, **kw)
    assert best.usage.completion_tokens == 24
    gens = llm.generate(["Once upon a time"] * 4, [SamplingParams(max_tokens=6, temperature=1.0, seed=7 + i,
                                                                   ignore_eos=True) for i in range(4)])
    ranked = sorted(range(4), key=lambda i: -sum(gens[i].logprobs) / 6)[:2]
    assert [c.text for c in best.choices] == [gens[i].text for i in sorted(ranked)]
    assert [c.logprobs.token_logprobs for c in best.choices] == [
        pytest.approx(gens[i].logprobs, abs=1e-5) for i in sorted(ranked)]

    chunks = list(client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "Hi"}],
                                                 n=2, max_tokens=5, temperature=0.9, seed=1, stream=True,
                                                 stream_options={"include_usage": True}))
    finished = {c.choices[0].index: c.choices[0].finish_reason for c in chunks if c.choices
                and c.choices[0].finish_reason}
    assert set(finished) == {0, 1} and chunks[-1].usage.completion_tokens <= 10
    whole = client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "Hi"}], n=2,
                                           max_tokens=5, temperature=0.9, seed=1)
    for i in (0, 1):
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == i)
        assert text == whole.choices[i].message.content
    deadline = time.monotonic() + 5
    while llm.allocator.num_used > 0:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert llm.stats()["compiles_after_warmup"] == 0


def test_logit_bias(server):
    """-100 bans a token, +100 forces one (greedy and sampled, every step), on both endpoints; the
    log-probabilities returned stay the model's."""
    from engine import SamplingParams

    llm, client, _ = server
    kw = dict(model="tiny-llama", prompt="The quick brown fox", max_tokens=3, temperature=0, logprobs=0,
              extra_body={"ignore_eos": True})
    plain = client.completions.create(**kw).choices[0]
    greedy = llm.generate("The quick brown fox", SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))[0]
    assert plain.logprobs.token_logprobs == pytest.approx(greedy.logprobs, abs=1e-5)
    banned = client.completions.create(logit_bias={str(greedy.token_ids[0]): -100}, **kw).choices[0]
    # the next most likely token instead, with the model's (lower) log-probability
    assert banned.logprobs.token_logprobs[0] < plain.logprobs.token_logprobs[0]
    forced = client.completions.create(logit_bias={"42": 100}, **{**kw, "temperature": 1.0, "seed": 3})
    assert forced.choices[0].logprobs.tokens == [llm.tokenizer.decode([42])] * 3
    chat = client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=3, temperature=0.8, seed=2, logit_bias={"42": 100},
                                          extra_body={"ignore_eos": True})
    assert chat.choices[0].message.content == llm.tokenizer.decode([42] * 3)
    assert llm.stats()["compiles_after_warmup"] == 0


PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags"],
          "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0,
                                                                               "maximum": 150},
                         "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
                         "score": {"type": "number"}, "ok": {"type": "boolean"}}}


def test_json_schema_output_validates_every_time(server):
    """response_format json_schema through the openai client: 50 seeded random-weight generations
    (sampled, a reply far from JSON without the grammar) each parse and validate against the
    schema (jsonschema); json_object gives a JSON object; the grammar is compiled once."""
    jsonschema = pytest.importorskip("jsonschema")
    llm, client, _ = server
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    msgs = [{"role": "user", "content": "Describe a person as JSON."}]

    def one(seed):
        out = client.chat.completions.create(model="tiny-llama", messages=msgs, max_tokens=120, temperature=1.0,
                                             seed=seed, response_format=fmt)
        return out.choices[0]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        choices = list(pool.map(one, range(50)))
    for c in choices:
        assert c.finish_reason == "stop", c
        jsonschema.validate(json.loads(c.message.content), PERSON)
    assert len({c.message.content for c in choices}) > 40  # sampled, not one fixed answer
    free = client.chat.completions.create(model="tiny-llama", messages=msgs, max_tokens=20, temperature=1.0, seed=1)
    with pytest.raises(ValueError):
        json.loads(free.choices[0].message.content)  # without the grammar, no JSON
    # any JSON object: a random-weight model would write one without end, so a logit_bias toward "}"
    # (applied with the grammar's mask) closes it
    close = llm.tokenizer.tok.token_to_id("}")
    obj = client.chat.completions.create(model="tiny-llama", messages=msgs, max_tokens=120, temperature=0.7, seed=3,
                                         response_format={"type": "json_object"}, logit_bias={str(close): 8})
    assert obj.choices[0].finish_reason == "stop" and isinstance(json.loads(obj.choices[0].message.content), dict)
    assert llm.grammars._compiled.cache_info().misses <= 3  # PERSON, any object (and a tool schema elsewhere)
    assert llm.stats()["compiles_after_warmup"] == 0


def test_tool_calls_required_and_named(server):
    """tools with tool_choice "required" / a named function: the reply is a tool call whose
    arguments validate against the function's parameters; finish_reason "tool_calls"."""
    jsonschema = pytest.importorskip("jsonschema")
    _, client, _ = server
    weather = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                                "days": {"type": "integer", "minimum": 1, "maximum": 7}},
               "required": ["city", "days"], "additionalProperties": False}
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": weather}},
             {"type": "function", "function": {"name": "get_time", "parameters": {
                 "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
                 "additionalProperties": False}}}]
    msgs = [{"role": "user", "content": "Weather in Paris?"}]
    for seed in range(6):
        out = client.chat.completions.create(model="tiny-llama", messages=msgs, max_tokens=80, temperature=1.0,
                                             seed=seed, tools=tools, tool_choice="required")
        c = out.choices[0]
        assert c.finish_reason == "tool_calls" and c.message.content is None
        (call,) = c.message.tool_calls
        params = {t["function"]["name"]: t["function"]["parameters"] for t in tools}[call.function.name]
        jsonschema.validate(json.loads(call.function.arguments), params)
    named = client.chat.completions.create(model="tiny-llama", messages=msgs, max_tokens=80, temperature=1.0,
                                           seed=9, tools=tools,
                                           tool_choice={"type": "function", "function": {"name": "get_time"}})
    (call,) = named.choices[0].message.tool_calls
    assert call.function.name == "get_time" and json.loads(call.function.arguments)["zone"] in ("UTC", "CET")


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
    json.dumps({"prompt": "hi", "n": 0}).encode(),
    json.dumps({"prompt": "hi", "n": 2, "best_of": 1}).encode(),
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
    ("/v1/completions", {"prompt": "hi", "top_k": 10**6}, "top_k"),  # past the vocabulary
    ("/v1/completions", {"prompt": "hi", "logprobs": -1}, "logprobs"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 100}, "logprobs"),
    ("/v1/completions", {"prompt": "hi", "logprobs": "x"}, "logprobs"),
    ("/v1/completions", {"prompt": "hi", "best_of": 21}, "best_of"),
    ("/v1/completions", {"prompt": "hi", "best_of": 2, "stream": True}, "best_of"),
    ("/v1/completions", {"prompt": "hi", "n": 129}, "n"),
    ("/v1/completions", {"prompt": "hi", "suffix": "!"}, "suffix"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"x": 10}}, "logit_bias"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"5": 101}}, "logit_bias"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"5": "a"}}, "logit_bias"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"1000000": 1}}, "logit_bias"),  # past the vocabulary
    ("/v1/completions", {"prompt": "hi", "logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias"),
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
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                              "tools": [{"type": "function", "function": {"name": "f"}}]}, "tool_choice"),  # auto
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tool_choice": "required",
                              "tools": [{"type": "function"}]}, "tools"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tool_choice": "required",
                              "tools": [{"type": "function", "function": {"name": "f"}}], "stream": True}, "stream"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tool_choice": {
        "type": "function", "function": {"name": "g"}}, "tools": [{"type": "function", "function": {"name": "f"}}]},
     "tool_choice"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                              "response_format": {"type": "json_schema"}}, "response_format"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "minProperties": "a"}}}},
     "response_format"),  # a schema llguidance refuses
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                              "response_format": {"type": "xml"}}, "response_format"),
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


def test_a_5_mb_prompt_is_refused_at_once_naming_its_field(server):
    """A prompt no model length can hold is refused before it is tokenized (the tokenizer's bound on
    characters per token), on both endpoints, naming the field; one that fits is not."""
    llm, _, base = server
    big = "word " * 1_000_000
    for path, body, param in (("/v1/completions", {"prompt": big, "max_tokens": 4}, "prompt"),
                              ("/v1/chat/completions", {"messages": [{"role": "user", "content": big}],
                                                        "max_tokens": 4}, "messages")):
        status, payload = _post(base + path, json.dumps(body).encode())
        assert status == 400 and payload["error"]["param"] == param, payload
        # the tokenizer's bound refused it, not a count of its tokens (which tokenizing would give)
        assert "characters, more than" in payload["error"]["message"], payload
    tok, limit = llm.tokenizer, 100
    fits = "the quick brown fox " * 4
    assert len(tok.encode(fits, limit=limit)) <= limit
    with pytest.raises(ValueError, match="characters, more than 100 tokens"):
        tok.encode("a" * (limit * tok._max_token_chars + 1), limit=limit)



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


# ------------------------------------------------------------------ hypothesis: any request body

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_ANY = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=12),
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                    max_leaves=6)
# per field: (values the server must accept, values near or past its edge); a body mixes them
_UNIT = st.floats(0.05, 1.0)
_ODD = st.floats(-0.5, 2.5) | st.sampled_from([float("nan"), float("inf"), -float("inf")])
_TOKENS = st.lists(st.integers(3, 250), max_size=6)
_BAD_TOKENS = st.lists(st.integers(-2, 300) | st.sampled_from([10**6, 2**40]), min_size=1, max_size=4)
_COMMON = {
    "max_tokens": (st.integers(1, 6), st.integers(-2, 0) | st.sampled_from([2**31, 10**9])),
    "temperature": (st.floats(0.0, 2.0), _ODD), "top_p": (_UNIT, _ODD),
    "top_k": (st.integers(-1, 64), st.integers(-4, -2) | st.sampled_from([2**31, 10**6])),
    "n": (st.integers(1, 3), st.sampled_from([0, -1, 129])),
    "seed": (st.integers(-2**63, 2**64 - 1), st.sampled_from([2**64, -2**63 - 1, 2**70])),
    "stream": (st.booleans(), st.sampled_from(["yes", 1])),
    "stop": (st.text(min_size=1, max_size=3) | st.lists(st.text(min_size=1, max_size=3), max_size=2),
             st.sampled_from(["", [""], [1], "a\ud800"])),
    "stream_options": (st.fixed_dictionaries({"include_usage": st.booleans()}), st.just({"include_usage": "y"})),
    "presence_penalty": (st.just(0.0), _ODD), "frequency_penalty": (st.just(0.0), _ODD),
    "ignore_eos": (st.booleans(), st.just("no")),
    "logit_bias": (st.dictionaries(st.sampled_from(["1", "42", "199"]), st.floats(-100, 100), max_size=3),
                   st.dictionaries(st.sampled_from(["x", "-3", "1000000"]), st.floats(-150, 150), min_size=1,
                                   max_size=2) | st.just({"5": "a"})),
    "stop_token_ids": (_TOKENS, _BAD_TOKENS), "user": (st.text(max_size=5), st.just(5)),
    "model": (st.just("tiny-llama"), st.just("other")),
}
_COMPLETIONS = {**_COMMON,
                "prompt": (st.text(min_size=1, max_size=40) | st.lists(st.integers(3, 250), min_size=1, max_size=8),
                           st.sampled_from(["", [], [[1], [2]], ["a", "b"], "x\udc00"]) | _BAD_TOKENS),
                "best_of": (st.just(3), st.sampled_from([0, 21])),
                "logprobs": (st.integers(0, 20), st.sampled_from([-1, 21, True, "3"])),
                "echo": (st.just(False), st.just(True)), "suffix": (st.just(""), st.just("!"))}
_PART = st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=8)})
_MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant"]),
                                  "content": st.text(max_size=30) | st.lists(_PART, min_size=1, max_size=2)})
_BAD_MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["user", 5]),
                                      "content": _ANY | st.just([{"type": "image_url", "image_url": "x"}])})
_CHAT = {**_COMMON,
         "messages": (st.lists(_MESSAGE, min_size=1, max_size=3), st.lists(_BAD_MESSAGE, max_size=2) | _ANY),
         "max_completion_tokens": _COMMON["max_tokens"],
         "logprobs": (st.booleans(), st.sampled_from([1, "yes"])),
         "top_logprobs": (st.integers(0, 20), st.sampled_from([-1, 21])),
         "response_format": (st.just({"type": "text"}), st.just({"type": "json_object"})),
         "tools": (st.just([]), st.lists(_ANY, min_size=1, max_size=1)),
         "tool_choice": (st.sampled_from(["none", "auto"]), st.just("required"))}


def _bodies(fields: dict, required: str):
    """A request body: a random subset of the endpoint's fields, each a value the server must accept
    (mostly), one near or past its edge, or an arbitrary JSON value (NaN and infinities included);
    the required field usually present; sometimes an unknown field."""
    def body(draw):
        names = draw(st.lists(st.sampled_from(sorted(fields)), max_size=5, unique=True))
        if draw(st.integers(0, 9)) and required not in names:
            names.append(required)
        out = {}
        for n in names:
            kind = draw(st.integers(0, 19))
            good, edge = fields[n]
            out[n] = draw(_ANY if kind == 0 else edge if kind < 3 else good)
        if draw(st.integers(0, 9)) == 0:
            out[draw(st.text(min_size=1, max_size=6))] = draw(_ANY)
        return out
    return st.composite(lambda draw: body(draw))()


def _send(base: str, path: str, body: dict) -> tuple[int, dict | list]:
    """POST with a 10 s limit; a stream is read to its end (its events parsed)."""
    data = json.dumps(body).encode()  # NaN / Infinity as Python's json writes them
    req = urllib.request.Request(base + path, data=data, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            raw = r.read().decode()
            if r.headers.get("content-type", "").startswith("text/event-stream"):
                events = [line[6:] for line in raw.splitlines() if line.startswith("data: ")]
                assert events and events[-1] == "[DONE]", raw[-300:]
                return r.status, [json.loads(e) for e in events[:-1]]
            return r.status, json.loads(raw)
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


_SEEN: dict[int, int] = {}  # status -> answers in the hypothesis suite


def _check(body: dict, status: int, payload, required: str) -> None:
    _SEEN[status] = _SEEN.get(status, 0) + 1
    if status != 200:
        assert status in (400, 404), (status, body, payload)
        param = payload["error"]["param"]
        if status == 404:
            assert param == "model" and body.get("model") != "tiny-llama", (body, payload)
        else:  # names a field of the body, or the required one it lacks
            assert param in body or param == required, (body, payload)
        return
    if isinstance(payload, list):  # a stream: no error event, every choice finished
        assert not any("error" in e for e in payload), payload
        finished = {c["index"] for e in payload for c in e.get("choices", []) if c.get("finish_reason")}
        assert finished == set(range(body.get("n") or 1)), (body, payload[-3:])
        return
    assert len(payload["choices"]) == (body.get("n") or 1), (body, payload)
    assert all(c["finish_reason"] in ("stop", "length") for c in payload["choices"])
    assert payload["usage"]["completion_tokens"] >= len(payload["choices"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(completions=_bodies(_COMPLETIONS, "prompt"), chat=_bodies(_CHAT, "messages"))
def test_any_request_body_gets_200_or_a_4xx_naming_its_parameter(server, completions, chat):
    """Hypothesis-generated bodies for both endpoints (plausible and arbitrary values, NaN and
    infinities, unknown fields): each answer is a 200 with what was asked (n choices, every one
    finished; a stream to its [DONE]) or a 4xx naming a field of the body, within 10 s."""
    _, _, base = server
    for path, body, required in (("/v1/completions", completions, "prompt"), ("/v1/chat/completions", chat,
                                                                              "messages")):
        status, payload = _send(base, path, body)
        _check(body, status, payload, required)


def test_after_any_request_the_server_is_as_before(server):
    """Runs after the hypothesis suite (file order): /health answers, no page is held, no compile
    happened, and a greedy request gives the tokens the engine gives directly."""
    from engine import SamplingParams

    llm, client, base = server
    if _SEEN:  # the suite ran first: it reached both answers, not only refusals
        assert _SEEN.get(200, 0) >= 10 and _SEEN.get(400, 0) >= 10, _SEEN
    deadline = time.monotonic() + 10
    while llm.allocator.num_used > 0 or llm.stats()["running"] or llm.stats()["waiting"]:
        assert time.monotonic() < deadline, llm.stats()
        time.sleep(0.05)
    assert _get(base + "/health")[0] == 200 and llm.stats()["compiles_after_warmup"] == 0
    out = client.completions.create(model="tiny-llama", prompt="The quick brown fox", max_tokens=6, temperature=0,
                                    extra_body={"ignore_eos": True})
    direct = llm.generate("The quick brown fox", SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))[0]
    assert out.choices[0].text == direct.text
