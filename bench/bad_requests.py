"""The bad-input catalogue: ~155 bad and edge-case request bodies sent to a running server, each
answer classified.

    python -m bench.bad_requests [--model DIR] [--json OUT] [--verbose] [--server-cwd TREE]

Without --model a tiny random-weight llama is written to a temporary directory. The server
(`python -m engine.serve`, reference backend, 127.0.0.1, a free port) runs as a subprocess; with
--server-cwd it runs from another checkout (cwd and PYTHONPATH = TREE: e.g. a git worktree of an
older commit, to count before and after). Classes:

  ok           200 and what was asked is honoured (n finished choices, logprobs alternatives, JSON
               under response_format, a tool call, a stream that reaches [DONE], ...)
  400-named    4xx whose error.param names a field of the body (or "model", or a missing required field)
  4xx-unnamed  4xx without such a param (correct only where the body has no fields: not JSON, an array)
  200-ignored  200 but something asked was not applied, or a value that must be refused was accepted
  5xx, timeout (no answer in 10 s), down (/health not 200 within 2 s after the case; restarted)

Exit status 0 when every case is answered as expected and the server is healthy at the end.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

CLASSES = ("ok", "400-named", "4xx-unnamed", "200-ignored", "5xx", "timeout", "down")
CMPL, CHAT, EMB = "/v1/completions", "/v1/chat/completions", "/v1/embeddings"
REQUIRED = {CMPL: "prompt", CHAT: "messages", EMB: "input"}
# honoured or not cannot be seen in the answer: a 200 to a non-default value counts as ignored
UNCHECKABLE = {"suffix": ("", None), "presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0)}


@dataclasses.dataclass
class Case:
    name: str
    endpoint: str
    body: object = None  # the JSON body (its top-level keys are the fields a 400 may name)
    raw: bytes | None = None  # sent instead of json.dumps(body): NaN, lone surrogates, not JSON
    reject: bool = False  # a correct server must refuse it: any 200 is "200-ignored"
    fieldless: bool = False  # no field to name (not a JSON object): an unnamed 4xx is correct too

    def data(self) -> bytes:
        return self.raw if self.raw is not None else json.dumps(self.body).encode()


def with_raw(name, endpoint, body: dict, field: str, token: str, reject=True) -> Case:
    """`body` with `field` set to a JSON token json.dumps cannot write (NaN, Infinity, "\\ud800")."""
    raw = json.dumps({**body, field: "@RAW@"}).replace('"@RAW@"', token).encode()
    return Case(name, endpoint, {**body, field: None}, raw, reject)


# ------------------------------------------------------------------------------- classification


def _sse(text: str) -> tuple[list[dict], bool]:
    """The events of a server-sent stream, and whether it ended with [DONE]."""
    events, done = [], False
    for line in text.splitlines():
        if line.startswith("data:"):
            payload = line[5:].strip()
            if payload == "[DONE]":
                done = True
            else:
                events.append(json.loads(payload))
    return events, done


def _chat_choice_ok(body: dict, c: dict, n_top) -> str | None:
    """Why a chat choice does not honour the body (None when it does)."""
    msg, reason = c.get("message") or {}, c.get("finish_reason")
    tools, choice = body.get("tools"), body.get("tool_choice")
    if tools and choice not in (None, "none", "auto"):
        calls = msg.get("tool_calls") or []
        want = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
        names = {t["function"]["name"] for t in tools}
        if reason != "tool_calls" or not calls or calls[0]["function"]["name"] not in ({want} if want else names):
            return "no tool call"
        json.loads(calls[0]["function"]["arguments"])
        return None
    if reason not in ("stop", "length"):
        return f"finish_reason {reason!r}"
    fmt = body.get("response_format") or {}
    if fmt.get("type") in ("json_object", "json_schema"):
        obj = json.loads(msg.get("content") or "")  # ValueError: not JSON
        schema = (fmt.get("json_schema") or {}).get("schema") or {}
        if not isinstance(obj, dict) or any(k not in obj for k in schema.get("required", [])):
            return "output does not match response_format"
    if body.get("logprobs") is True:
        content = (c.get("logprobs") or {}).get("content")
        if not content or (n_top and any(len(t["top_logprobs"]) != n_top for t in content)):
            return f"logprobs / top_logprobs={n_top} missing"
    return None


def _cmpl_choice_ok(body: dict, c: dict) -> str | None:
    if c.get("finish_reason") not in ("stop", "length") or not isinstance(c.get("text"), str):
        return "unfinished choice"
    n_lp = body.get("logprobs")
    if isinstance(n_lp, int) and not isinstance(n_lp, bool):
        lp = c.get("logprobs") or {}
        tokens = lp.get("tokens") or []
        if not tokens or len(lp.get("token_logprobs") or []) != len(tokens):
            return "logprobs missing"
        if n_lp > 0:
            tops = lp.get("top_logprobs") or []
            # keyed by token text: tokens of the same text ("\ufffd" byte pieces) merge, so an entry may
            # hold fewer than N + 1, but never more, and some entry holds N
            if len(tops) != len(tokens) or not all(1 <= len(t) <= n_lp + 1 for t in tops) \
                    or max(map(len, tops)) < n_lp:
                return f"logprobs={n_lp} alternatives missing"
        bias = body.get("logit_bias") or {}
        if any(v >= 50 for v in bias.values()) and len(set(tokens)) != 1:
            return "logit_bias +100 not applied"
    if body.get("echo") is True and not c["text"].startswith(str(body.get("prompt"))):
        return "echo not applied"
    return None


def honoured(endpoint: str, body, answer: str) -> str | None:
    """Why a 200 answer does not honour what `body` asked (None when it does). Raises on a malformed answer."""
    body = body if isinstance(body, dict) else {}
    for field, default in UNCHECKABLE.items():
        if body.get(field) not in (None, *default):
            return f"{field} cannot be seen in the answer"
    n = body.get("n") or 1
    if endpoint == EMB:
        x = body.get("input")
        data = json.loads(answer)["data"]
        want = 1 if isinstance(x, str) or (x and isinstance(x[0], int)) else len(x)
        dims = body.get("dimensions")
        bad = len(data) != want or any(dims and len(d["embedding"]) != dims for d in data)
        return "wrong embeddings" if bad else None
    if body.get("stream") is True:
        events, done = _sse(answer)
        if not done or any("error" in e for e in events):
            return "stream did not reach [DONE]"
        finished = {c["index"] for e in events for c in e.get("choices", []) if c.get("finish_reason")}
        if finished != set(range(n)):
            return f"{len(finished)} of {n} streamed choices finished"
        if (body.get("stream_options") or {}).get("include_usage") and not any(e.get("usage") for e in events):
            return "usage chunk missing"
        lps = [c["logprobs"] for e in events for c in e.get("choices", []) if c.get("logprobs")]
        if body.get("logprobs") not in (None, False) and not lps:
            return "streamed logprobs missing"
        n_top = body.get("top_logprobs")
        if n_top and any(len(t["top_logprobs"]) != n_top for lp in lps for t in lp.get("content") or []):
            return f"streamed top_logprobs={n_top} missing"
        return None
    out = json.loads(answer)
    choices = out["choices"]
    if len(choices) != n:
        return f"{len(choices)} choices, n={n}"
    best_of = body.get("best_of")
    if best_of and best_of > n and out["usage"]["completion_tokens"] <= n * body.get("max_tokens", 16):
        return "best_of candidates not generated"  # (the catalogue's best_of case sets ignore_eos)
    top = body.get("top_logprobs")
    for c in choices:
        why = _chat_choice_ok(body, c, top) if endpoint == CHAT else _cmpl_choice_ok(body, c)
        if why:
            return why
    return None


def classify(case: Case, status: int | None, answer: str) -> tuple[str, str]:
    """(class, detail) of one answer; status None is no answer in time."""
    if status is None:
        return "timeout", answer
    if status >= 500:
        return "5xx", answer[:200]
    if status >= 400:
        try:
            param = json.loads(answer)["error"]["param"]
        except (ValueError, KeyError, TypeError):
            param = None
        fields = set(case.body) if isinstance(case.body, dict) else set()
        named = isinstance(param, str) and param.split(".")[0].split("[")[0] in \
            fields | {"model", REQUIRED.get(case.endpoint)}
        return ("400-named" if named else "4xx-unnamed"), f"param={param!r}: {answer[:160]}"
    if case.reject:
        return "200-ignored", "accepted a value that must be refused: " + answer[:160]
    try:
        why = honoured(case.endpoint, case.body, answer)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as err:
        why = f"malformed answer ({type(err).__name__}: {err})"
    return ("200-ignored", f"{why}: {answer[:160]}") if why else ("ok", "")


def expected(case: Case, cls: str) -> bool:
    return cls in ("ok", "400-named") or (case.fieldless and cls == "4xx-unnamed")


# ------------------------------------------------------------------------------- the catalogue


def catalogue(close_brace: int | None = None) -> list[Case]:
    """The cases; `close_brace` (the token id of "}") lets json_object finish on a random-weight model."""
    C = {"prompt": "Hello there", "max_tokens": 4}
    H = {"messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 4}
    cases: list[Case] = []

    def add(name, ep, base, reject=False, **fields):
        cases.append(Case(name, ep, {**base, **fields}, reject=reject))

    # the issue's list: (name, endpoint, must be refused, fields over the endpoint's base body)
    fn = {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
          "additionalProperties": False}
    tools = {"tools": [{"type": "function", "function": {"name": "get_time", "parameters": fn}}], "max_tokens": 80,
             "seed": 1}
    part = [{"type": "text", "text": 5}], [{"type": "text", "text": None}]
    big = "word " * (1 << 20)  # 5 MB
    close = {"logit_bias": {str(close_brace): 8}} if close_brace is not None else {}
    lp3 = {"logprobs": True, "top_logprobs": 3}
    for name, ep, reject, fields in [
            ("top_k=2**31", CMPL, 0, {"top_k": 2**31}), ("top_k=2**63", CMPL, 0, {"top_k": 2**63}),
            ("top_k=10**30", CMPL, 0, {"top_k": 10**30}), ("top_k=2**31", CHAT, 0, {"top_k": 2**31}),
            ("text part text=5", CHAT, 1, {"messages": [{"role": "user", "content": part[0]}]}),
            ("text part text=null", CHAT, 1, {"messages": [{"role": "user", "content": part[1]}]}),
            ("logprobs=-1", CMPL, 1, {"logprobs": -1}), ("logprobs=100", CMPL, 1, {"logprobs": 100}),
            ("logprobs='x'", CMPL, 1, {"logprobs": "x"}), ("logprobs=true", CMPL, 1, {"logprobs": True}),
            ("top_logprobs=50", CHAT, 1, {"logprobs": True, "top_logprobs": 50}),
            ("top_logprobs=-1", CHAT, 1, {"logprobs": True, "top_logprobs": -1}),
            ("top_logprobs without logprobs", CHAT, 1, {"top_logprobs": 2}),
            ("logprobs='yes'", CHAT, 1, {"logprobs": "yes"}),
            ("logprobs=3", CMPL, 0, {"logprobs": 3}), ("logprobs=0", CMPL, 0, {"logprobs": 0}),
            ("logprobs=3 stream", CMPL, 0, {"logprobs": 3, "stream": True}), ("top_logprobs=3", CHAT, 0, lp3),
            ("top_logprobs=3 stream", CHAT, 0, {**lp3, "stream": True}),
            ("best_of=3", CMPL, 0, {"best_of": 3, "ignore_eos": True}),  # ignore_eos: see honoured()
            ("best_of=1 n=2", CMPL, 1, {"best_of": 1, "n": 2}),
            ("best_of=3 stream", CMPL, 1, {"best_of": 3, "stream": True}),  # the best are known at the end
            ("suffix", CMPL, 0, {"suffix": " the end"}), ("echo", CMPL, 0, {"echo": True}),
            ("logit_bias +100", CMPL, 0, {"logit_bias": {"42": 100}, "logprobs": 0, "temperature": 0, "max_tokens": 6}),
            ("logit_bias -100", CHAT, 0, {"logit_bias": {"42": -100}}),
            ("logit_bias key 'abc'", CMPL, 1, {"logit_bias": {"abc": 1}}),
            ("logit_bias value 500", CMPL, 1, {"logit_bias": {"1": 500}}),
            ("logit_bias id past vocab", CHAT, 1, {"logit_bias": {"999999": 1}}),
            ("logit_bias a list", CHAT, 1, {"logit_bias": [1, 2]}),
            ("tools required", CHAT, 0, {**tools, "tool_choice": "required"}),
            ("tools named", CHAT, 0, {**tools, "tool_choice": {"type": "function", "function": {"name": "get_time"}}}),
            ("tools auto", CHAT, 0, {**tools, "tool_choice": "auto"}),
            ("tools none", CHAT, 0, {**tools, "tool_choice": "none"}),
            ("tools named unknown", CHAT, 1, {**tools, "tool_choice": {"type": "function", "function": {"name": "x"}}}),
            ("tools malformed", CHAT, 1, {"tools": [{"type": "function"}], "tool_choice": "required"}),
            ("tool_choice without tools", CHAT, 1, {"tool_choice": "required"}),
            ("response_format json_object", CHAT, 0, {"response_format": {"type": "json_object"}, "max_tokens": 120,
                                                      "temperature": 0.7, "seed": 3, **close}),
            ("response_format json_schema", CHAT, 0, {"max_tokens": 120, "seed": 1, "response_format": {
                "type": "json_schema", "json_schema": {"name": "t", "schema": fn}}}),
            ("response_format text", CHAT, 0, {"response_format": {"type": "text"}}),
            ("response_format xml", CHAT, 1, {"response_format": {"type": "xml"}}),
            ("response_format json_schema no schema", CHAT, 1, {"response_format": {"type": "json_schema"}}),
            ("response_format 'json'", CHAT, 1, {"response_format": "json"}),
            ("max_tokens 10**6", CMPL, 1, {"max_tokens": 10**6}), ("max_tokens 10**6", CHAT, 1, {"max_tokens": 10**6}),
            ("max_completion_tokens 10**6", CHAT, 1, {"max_completion_tokens": 10**6}),
            ("5 MB prompt", CMPL, 1, {"prompt": big}),
            ("5 MB message", CHAT, 1, {"messages": [{"role": "user", "content": big}]})]:
        add(f"{'cmpl' if ep == CMPL else 'chat'} {name}", ep, C if ep == CMPL else H, bool(reject), **fields)
    cases.append(with_raw("cmpl lone surrogate prompt", CMPL, C, "prompt", '"a\\ud800b"'))
    cases.append(with_raw("chat lone surrogate content", CHAT, H, "messages",
                          '[{"role": "user", "content": "a\\ud800b"}]'))
    cases.append(with_raw("cmpl stop lone surrogate", CMPL, C, "stop", '"\\udfff"'))
    # 6000 levels: past Python's recursion limit (a parser that recurses must not crash the server)
    cases.append(Case("cmpl array nested 6000 deep", CMPL, raw=b"[" * 6000 + b"]" * 6000, reject=True, fieldless=True))
    cases.append(Case("chat messages nested 6000 deep", CHAT, raw=b'{"messages": ' + b"[" * 6000 + b"]" * 6000 + b"}",
                      reject=True, fieldless=True))

    # a sweep per field: (field, value, must be refused, endpoints: c completions, h chat, b both);
    # "NaN" etc. go as raw tokens
    sweep = [("temperature", "hot", 1, "c"), ("temperature", -1, 1, "c"), ("temperature", 3, 1, "h"),
             ("temperature", True, 1, "c"), ("temperature", "NaN", 1, "b"), ("temperature", "Infinity", 1, "h"),
             ("temperature", 0, 0, "b"), ("top_p", 0, 1, "c"), ("top_p", 1.5, 1, "c"), ("top_p", "x", 1, "h"),
             ("top_p", "NaN", 1, "c"), ("top_p", 0.5, 0, "h"), ("top_k", -2, 1, "h"), ("top_k", 1.5, 1, "c"),
             ("top_k", "5", 1, "h"), ("top_k", 5, 0, "c"), ("n", 0, 1, "h"), ("n", 1000, 1, "c"), ("n", "2", 1, "h"),
             ("n", 2, 0, "b"), ("seed", "x", 1, "c"), ("seed", 2**64, 1, "h"),
             ("seed", 7, 0, "h"), ("stop", 5, 1, "c"), ("stop", [1], 1, "h"), ("stop", [], 0, "c"),
             ("stop", ["\n", "."], 0, "h"), ("stream", "yes", 1, "h"), ("stream", True, 0, "b"),
             ("stream_options", "x", 1, "c"), ("stream_options", {"include_usage": "x"}, 1, "h"),
             ("max_tokens", 0, 1, "h"), ("max_tokens", -5, 1, "c"), ("max_tokens", "10", 1, "h"),
             ("max_tokens", "Infinity", 1, "h"), ("max_tokens", None, 0, "c"),
             ("presence_penalty", 3, 1, "c"), ("presence_penalty", "x", 1, "h"), ("presence_penalty", 0.5, 0, "c"),
             ("frequency_penalty", "-Infinity", 1, "h"), ("frequency_penalty", 0.5, 0, "h"),
             ("stop_token_ids", [-1], 1, "c"), ("stop_token_ids", "x", 1, "h"), ("stop_token_ids", [0], 0, "c"),
             ("ignore_eos", "yes", 1, "h"), ("ignore_eos", True, 0, "c"), ("model", "no-such-model", 1, "b"),
             ("model", 5, 1, "c"), ("user", 5, 1, "h"), ("unknown_field", 1, 0, "b")]
    for ep, base, tag, letter in ((CMPL, C, "cmpl", "c"), (CHAT, H, "chat", "h")):
        for field, value, reject, where in sweep:
            if where not in ("b", letter):
                continue
            if value in ("NaN", "Infinity", "-Infinity"):
                cases.append(with_raw(f"{tag} {field}={value}", ep, base, field, value))
            else:
                add(f"{tag} {field}={value!r}", ep, base, bool(reject), **{field: value})
        add(f"{tag} stream_options include_usage", ep, base, stream=True, stream_options={"include_usage": True})
        add(f"{tag} n=2 stream", ep, base, n=2, stream=True)
    add("chat stream_options without stream", CHAT, H, True, stream_options={"include_usage": True})  # as OpenAI
    add("chat max_completion_tokens=0", CHAT, H, True, max_completion_tokens=0)
    add("chat max_completion_tokens='x'", CHAT, H, True, max_completion_tokens="x")

    # shapes of messages and prompt: (label, value, must be refused)
    for label, msgs, reject in [
            ("[]", [], 1), ("a string", "hi", 1), ("[{}]", [{}], 1), ("no content", [{"role": "user"}], 1),
            ("role 5", [{"role": 5, "content": "hi"}], 1), ("content 5", [{"role": "user", "content": 5}], 1),
            ("content null", [{"role": "user", "content": None}], 1),
            ("image part", [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], 1),
            ("text parts", [{"role": "user", "content": [{"type": "text", "text": "hi"}]}], 0),
            ("system + user", [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}], 0),
            ("empty content", [{"role": "user", "content": ""}], 0)]:
        add(f"chat messages {label}", CHAT, H, bool(reject), messages=msgs)
    for label, prompt, reject in [
            ("token ids", [1, 2, 3], 0), ("[[ids]]", [[1, 2, 3]], 0), ("negative id", [-1], 1), ("[]", [], 1),
            ("id past vocab", [10**9], 1), ("5", 5, 1), ("null", None, 1), ("an object", {"a": 1}, 1),
            ("two prompts", ["a", "b"], 1)]:
        add(f"cmpl prompt {label}", CMPL, C, bool(reject), prompt=prompt)
    cases += [Case("chat messages missing", CHAT, {"max_tokens": 4}, reject=True),
              Case("cmpl prompt missing", CMPL, {"max_tokens": 4}, reject=True)]

    # bodies with no fields
    for ep, label, raw in ((CMPL, "not JSON", b"hello"), (CMPL, "an array", b"[1, 2]"), (CMPL, "empty", b""),
                           (CMPL, "null", b"null"), (CMPL, "truncated", b'{"prompt": "hi"'),
                           (CHAT, "not JSON", b"{'messages': []}"), (CHAT, "empty", b"")):
        cases.append(Case(f"{'cmpl' if ep == CMPL else 'chat'} body {label}", ep, raw=raw, reject=True,
                          fieldless=True))

    # embeddings (only an embedding model serves them: a text generator answers 400 naming "model")
    for label, body, reject in [
            ("a string", {"input": "hello"}, 0), ("strings", {"input": ["a", "b"]}, 0),
            ("token ids", {"input": [1, 2, 3]}, 0),
            ("empty string", {"input": ""}, 1), ("empty list", {"input": []}, 1),
            ("too long", {"input": "word " * 4000}, 1), ("dimensions 0", {"input": "hi", "dimensions": 0}, 1),
            ("dimensions huge", {"input": "hi", "dimensions": 10**9}, 1),
            ("encoding int8", {"input": "hi", "encoding_format": "int8"}, 1),
            ("input missing", {}, 1)]:
        cases.append(Case(f"emb {label}", EMB, body, reject=bool(reject)))
    return cases


# ------------------------------------------------------------------------------- the server and the run


def send(base: str, case: Case, timeout: float = 10.0) -> tuple[int | None, str]:
    """POST one case; (status, answer text), status None when the whole answer took over `timeout`."""
    req = urllib.request.Request(base + case.endpoint, data=case.data(), method="POST",
                                 headers={"Content-Type": "application/json"})
    deadline = time.monotonic() + timeout
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            chunks = []  # a stream is read line by line so that a trickle cannot outlive the deadline
            while (line := r.readline()) and time.monotonic() < deadline:
                chunks.append(line)
            if line and time.monotonic() >= deadline:
                return None, f"answer not finished in {timeout} s"
            return r.status, b"".join(chunks).decode("utf-8", "replace")
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode("utf-8", "replace")
    except (TimeoutError, OSError) as err:  # no answer, or the connection dropped (a crashed server)
        return None, f"{type(err).__name__}: {err}"


def healthy(base: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(base + "/health", timeout=timeout) as r:
            return r.status == 200
    except (OSError, ValueError):
        return False


class Server:
    """`python -m engine.serve` as a subprocess on 127.0.0.1, from `cwd` (another checkout) if given."""

    def __init__(self, model: str, cwd: str | None, log_path: Path):
        from bench.serve import free_port

        self.port, self.log_path, self.proc = free_port(), log_path, None
        self.base = f"http://127.0.0.1:{self.port}"
        self.cmd = [sys.executable, "-m", "engine.serve", "--model", model, "--backend", "reference", "--host",
                    "127.0.0.1", "--port", str(self.port), "--max-model-len", "256", "--max-num-batched-tokens",
                    "64", "--no-compile-cache", "--log-level", "warning"]
        self.cwd, self.env = cwd, tree_env(cwd)

    def start(self, timeout: float = 120.0) -> None:
        with open(self.log_path, "a") as log:
            self.proc = subprocess.Popen(self.cmd, cwd=self.cwd, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.alive:
            if healthy(self.base):
                return
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"server not healthy in {timeout} s:\n{self.log_path.read_text()[-3000:]}")

    def stop(self) -> None:
        """Terminate the process by its PID, kill it after 10 s."""
        if self.alive:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def tree_env(cwd: str | None) -> dict:
    """The environment of a process that must import `cwd`'s engine, not the editable install's."""
    env = dict(os.environ)
    if cwd:
        env["PYTHONPATH"] = cwd + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run(server: Server, cases: list[Case], verbose: bool, max_restarts: int = 5) -> list[dict]:
    """Every case in turn; a server that is down after a case is restarted (at most `max_restarts`
    times; after that the remaining cases are "down" unsent)."""
    results, restarts = [], 0
    for case in cases:
        status, secs, t0 = None, 0.0, time.monotonic()
        if not server.alive and restarts > max_restarts:
            cls, detail = "down", "not sent: the server is down and its restarts are spent"
        else:
            status, answer = send(server.base, case)
            secs = time.monotonic() - t0
            cls, detail = classify(case, status, answer)
            if not healthy(server.base):
                cls, detail = "down", f"/health not 200 within 2 s after the case ({detail})"[:300]
                server.stop()
                restarts += 1
                if restarts <= max_restarts:
                    try:
                        server.start()
                    except RuntimeError as err:
                        print(err, file=sys.stderr)
                        restarts = max_restarts + 1
        results.append({"name": case.name, "endpoint": case.endpoint, "status": status, "class": cls,
                        "expected": expected(case, cls), "seconds": round(secs, 3), "detail": detail})
        if verbose:
            print(f"{case.name:48s} {status!s:>7s} {cls}", flush=True)
    return results


def final_checks(server: Server) -> dict:
    """After the catalogue: /health, one greedy completion (an embedding model: one embedding), the process."""
    probe = Case("greedy", CMPL, {"prompt": "Hello", "max_tokens": 4, "temperature": 0})
    status, answer = send(server.base, probe)
    if status == 400 and '"param":"model"' in answer.replace(" ", ""):  # the model serves embeddings
        probe = Case("embedding", EMB, {"input": "Hello"})
        status, answer = send(server.base, probe)
    return {"health": healthy(server.base), "probe": probe.name,
            "probe_ok": classify(probe, status, answer)[0] == "ok", "alive": server.alive}


def report(results: list[dict], final: dict) -> bool:
    """Print the counts per class and per endpoint and the verdict; True when all is as expected."""
    table = {ep: collections.Counter(r["class"] for r in results if r["endpoint"] == ep)
             for ep in sorted({r["endpoint"] for r in results})}
    table["total"] = collections.Counter(r["class"] for r in results)
    print(f"{'':22s}" + "".join(f"{c:>12s}" for c in CLASSES) + f"{'cases':>8s}")
    for ep, counts in table.items():
        print(f"{ep:22s}" + "".join(f"{counts[c]:>12d}" for c in CLASSES) + f"{sum(counts.values()):>8d}")
    slow = sorted(results, key=lambda r: -r["seconds"])[:3]  # a refusal should be quick: e.g. the 5 MB prompt
    print("slowest: " + ", ".join(f"{r['name']} {r['seconds']:.1f} s ({r['class']})" for r in slow))
    right = sum(r["expected"] for r in results)
    good = right == len(results) and final["health"] and final["probe_ok"] and final["alive"]
    print(f"verdict: {'PASS' if good else 'FAIL'}: {right} of {len(results)} cases answered as expected; after "
          f"them /health {'200' if final['health'] else 'not 200'}, {final['probe']} "
          f"{'ok' if final['probe_ok'] else 'failed'}, server process {'alive' if final['alive'] else 'dead'}")
    return good


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.bad_requests", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint directory (default: a tiny random-weight llama, written here)")
    ap.add_argument("--json", help="write the per-case results to this file")
    ap.add_argument("--verbose", action="store_true", help="one line per case")
    ap.add_argument("--server-cwd", help="run the server from this checkout (cwd and PYTHONPATH)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:  # written by the server's tree: its own checkpoint format
            model = str(Path(tmp) / "tiny-llama")
            subprocess.run([sys.executable, "-m", "engine.make_tiny_model", "--arch", "llama", model],
                           cwd=args.server_cwd, env=tree_env(args.server_cwd), check=True, stdout=subprocess.DEVNULL)
        vocab = json.loads((Path(model) / "tokenizer.json").read_text())["model"].get("vocab", {})
        cases = catalogue(vocab.get("}") if isinstance(vocab, dict) else None)
        server = Server(model, args.server_cwd, Path(tmp) / "server.log")
        server.start()
        try:
            results = run(server, cases, args.verbose)
            final = final_checks(server)
        finally:
            server.stop()
    if args.json:
        Path(args.json).write_text(json.dumps({"cases": results, "final": final}, indent=1))
    return 0 if report(results, final) else 1


if __name__ == "__main__":
    sys.exit(main())
