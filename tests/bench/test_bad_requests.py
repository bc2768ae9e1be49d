"""bench.bad_requests' classifier on canned answers (no server) and its catalogue's shape."""

from __future__ import annotations

import json

from bench.bad_requests import CHAT, CMPL, EMB, Case, catalogue, classify, expected


def _error(param, status=400):
    return status, json.dumps({"error": {"message": "bad", "type": "invalid_request_error", "param": param}})


def _completion(n=1, logprobs=None):
    choices = [{"index": i, "text": "ab", "finish_reason": "length", "logprobs": logprobs} for i in range(n)]
    return 200, json.dumps({"choices": choices, "usage": {"completion_tokens": 2 * n}})


def test_4xx_named_unnamed_and_5xx():
    case = Case("t", CMPL, {"prompt": "hi", "temperature": "hot"}, reject=True)
    assert classify(case, *_error("temperature"))[0] == "400-named"
    assert classify(case, *_error("prompt"))[0] == "400-named"
    assert classify(case, *_error("model", 404))[0] == "400-named"
    assert classify(case, *_error("top_p"))[0] == "4xx-unnamed"  # not a field of this body
    assert classify(case, *_error(None))[0] == "4xx-unnamed"
    assert classify(case, 422, "not json")[0] == "4xx-unnamed"
    assert classify(Case("t", CHAT, {"max_tokens": 4}), *_error("messages"))[0] == "400-named"  # missing, required
    assert classify(case, 500, "Internal Server Error")[0] == "5xx"
    assert classify(case, None, "timed out")[0] == "timeout"
    fieldless = Case("t", CMPL, raw=b"hello", reject=True, fieldless=True)
    assert expected(fieldless, classify(fieldless, *_error(None))[0])
    assert not expected(case, "4xx-unnamed")


def test_200_honoured_or_ignored():
    assert classify(Case("t", CMPL, {"prompt": "hi", "temperature": 9}, reject=True), *_completion())[0] == \
        "200-ignored"
    asked = Case("t", CMPL, {"prompt": "hi", "logprobs": 2})
    assert classify(asked, *_completion())[0] == "200-ignored"  # logprobs asked, none came
    lp = {"tokens": ["a", "b"], "token_logprobs": [-1.0, -2.0], "top_logprobs": [{"a": -1, "x": -2, "y": -3},
                                                                                  {"b": -2, "x": -1}]}
    assert classify(asked, *_completion(logprobs=lp)) == ("ok", "")
    assert classify(Case("t", CMPL, {"prompt": "hi", "n": 2}), *_completion(n=1))[0] == "200-ignored"
    assert classify(Case("t", CMPL, {"prompt": "hi", "suffix": "x"}), *_completion())[0] == "200-ignored"
    fmt = Case("t", CHAT, {"messages": [], "response_format": {"type": "json_object"}})
    reply = {"choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "no"}}]}
    assert classify(fmt, 200, json.dumps(reply))[0] == "200-ignored"
    reply["choices"][0]["message"]["content"] = '{"a": 1}'
    assert classify(fmt, 200, json.dumps(reply))[0] == "ok"
    stream = Case("t", CMPL, {"prompt": "hi", "stream": True})
    chunk = 'data: {"choices": [{"index": 0, "text": "a", "finish_reason": "length"}]}\n\n'
    assert classify(stream, 200, chunk + "data: [DONE]\n\n")[0] == "ok"
    assert classify(stream, 200, chunk)[0] == "200-ignored"  # no [DONE]
    emb = Case("t", EMB, {"input": ["a", "b"]})
    assert classify(emb, 200, json.dumps({"data": [{"embedding": [0.1]}] * 2}))[0] == "ok"
    assert classify(emb, 200, json.dumps({"data": [{"embedding": [0.1]}]}))[0] == "200-ignored"


def test_catalogue_shape():
    cases = catalogue(close_brace=7)
    names = [c.name for c in cases]
    assert 130 <= len(cases) <= 170 and len(set(names)) == len(names)
    assert {c.endpoint for c in cases} == {CMPL, CHAT, EMB}
    assert all(isinstance(c.data(), bytes) for c in cases)
    assert b"\\ud800" in next(c for c in cases if c.name == "cmpl lone surrogate prompt").data()
