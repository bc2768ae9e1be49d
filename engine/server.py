"""OpenAI-compatible HTTP server over one LLM: completions, chat completions (streamed over SSE),
embeddings (an embedding model's engine, task "embed"), /v1/models, /health and Prometheus /metrics.

The engine runs in one background thread (`AsyncEngine`): it steps while there is work and hands
each step's outputs to the request handlers' asyncio queues. A client that disconnects (streaming
or not) aborts its request: its pages are freed at once. Request bodies are validated by one
schema per endpoint (engine/api_schema.py); a request with n > 1 or best_of is that many engine
requests (candidates), collected or streamed together; a response_format or tool call holds the
output to a grammar (engine/structured.py). Tokenization and JSON parsing of large bodies run off
the event loop.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import logging
import threading
import time
import uuid

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from engine import structured
from engine.api_schema import (
    ChatRequest,
    CompletionRequest,
    EmbeddingRequest,
    RequestError,
    SamplingRequest,
    parse,
)
from engine.llm import LLM, StepOutput
from engine.pooling import PoolingParams
from engine.sampler import SamplingParams

log = logging.getLogger("engine.server")


class AsyncEngine:
    """Steps the LLM in a thread; per-request asyncio queues receive StepOutputs (or an exception).

    A step that raises fails the requests that were running in it (each gets a 500 error) and the
    loop goes on serving the others and new ones."""

    def __init__(self, llm: LLM):
        self.llm = llm
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)

    def start(self):
        self._thread.start()
        return self

    def stop(self):
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=10)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, prompt, params: SamplingParams | PoolingParams) -> tuple[str, asyncio.Queue]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        rid = uuid.uuid4().hex
        self._queues[rid] = (loop, queue)
        try:
            self.llm.add_request(prompt, params, request_id=rid)
        except ValueError:
            self._queues.pop(rid, None)
            raise
        self._wake.set()
        return rid, queue

    def abort(self, rid: str) -> None:
        self._queues.pop(rid, None)
        self.llm.abort(rid)

    def _deliver(self, rid: str, item) -> None:
        entry = self._queues.get(rid)
        if entry is not None:
            loop, queue = entry
            loop.call_soon_threadsafe(queue.put_nowait, item)
            if isinstance(item, StepOutput) and item.finish_reason is not None:
                self._queues.pop(rid, None)

    def _run(self):
        while not self._stop.is_set():
            try:
                if self.llm.has_unfinished():
                    for out in self.llm.step():
                        if out.finish_reason is not None and out.request_id in self._queues:
                            self.llm.pop_finished(out.request_id)
                        self._deliver(out.request_id, out)
                else:
                    self._wake.wait(0.05)
                    self._wake.clear()
            except Exception as err:  # noqa: BLE001 - fail the step's requests, keep serving the rest
                log.exception("engine step failed")
                with self.llm.lock:
                    in_step = [seq.request_id for seq in self.llm.scheduler.running]
                for rid in in_step:
                    self._deliver(rid, err)
                    self._queues.pop(rid, None)
                    self.llm.abort(rid)


# ------------------------------------------------------------------------------- request parsing


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    """The OpenAI usage object of one request."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _check_text(value, param: str) -> None:
    """Every string in a prompt or message must be encodable (a lone surrogate is not)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as err:
            raise RequestError(f"'{param}' is not valid Unicode text: {err.reason} at position {err.start}",
                               param=param) from None
    elif isinstance(value, list):
        for v in value:
            _check_text(v, param)


def sampling_params(req: SamplingRequest, default_max_tokens: int, top_logprobs: int = 0) -> SamplingParams:
    """The engine's SamplingParams of a validated request (api_schema)."""
    _check_text(req.stop, "stop")
    max_tokens = getattr(req, "max_completion_tokens", None) or req.max_tokens or default_max_tokens
    try:
        return SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                              seed=req.seed, stop=req.stop, stop_token_ids=req.stop_token_ids,
                              ignore_eos=req.ignore_eos, top_logprobs=top_logprobs,
                              logit_bias={int(t): b for t, b in (req.logit_bias or {}).items()} or None)
    except ValueError as err:
        param = next((p for p in ("logit_bias", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop")
                      if p in str(err)), None)
        raise RequestError(str(err), param=param) from None


def _explicit_max_tokens(req: SamplingRequest) -> bool:
    return req.max_tokens is not None or getattr(req, "max_completion_tokens", None) is not None


def candidate_params(params: SamplingParams, index: int) -> SamplingParams:
    """The SamplingParams of a request's `index`-th candidate (n > 1, best_of): a seeded request's
    candidates draw from seeds seed, seed + 1, ... (distinct and reproducible); unseeded ones each
    get the engine's own."""
    if index == 0 or params.seed is None:
        return params
    return dataclasses.replace(params, seed=(params.seed + index) % 2**64)


def _encode_prompt(llm: LLM, text: str) -> list[int]:
    """A completion prompt's ids; one longer than the model length is refused before its ids exist."""
    try:
        return llm.tokenizer.encode(text, limit=llm.max_model_len - 1)
    except ValueError as err:
        raise RequestError(f"{err}; this model's max_model_len is {llm.max_model_len} (prompt plus at least one "
                           "generated token)", param="prompt") from None


def _check_room(llm: LLM, n_prompt: int, params: SamplingParams, explicit: bool) -> None:
    """An explicit max_tokens that cannot fit after the prompt is a 400 naming both numbers."""
    if explicit and n_prompt + params.max_tokens > llm.max_model_len:
        raise RequestError(f"max_tokens={params.max_tokens} plus the prompt's {n_prompt} tokens exceeds this "
                           f"model's context of {llm.max_model_len} tokens", param="max_tokens")


def _completion_prompt(req: CompletionRequest) -> str | list[int]:
    """The one prompt of a completions request: a string or a list of token ids."""
    prompt = req.prompt
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        raise RequestError("batched prompts are not supported: send one prompt per request", param="prompt")
    _check_text(prompt, "prompt")
    return prompt


def _chat_grammar(req: ChatRequest) -> tuple[tuple[str, str] | None, list | None]:
    """(the grammar a chat request's output must match, the tools it must call) from its
    response_format and tools / tool_choice (engine.structured); (None, None) for free text."""
    fmt = req.response_format
    tools = req.tools or None
    choice = req.tool_choice
    if tools is not None and choice == "none":
        tools = None
    if tools is not None:
        if fmt not in (None, {"type": "text"}):
            raise RequestError("'response_format' and 'tools' cannot be combined", param="response_format")
        if req.stream:
            raise RequestError("streamed tool calls are not supported by this server; send 'stream': false",
                               param="stream")
        for t in tools:
            fn = t.get("function") if isinstance(t, dict) else None
            if t.get("type") != "function" or not isinstance(fn, dict) or not isinstance(fn.get("name"), str) \
                    or not isinstance(fn.get("parameters", {}), dict):
                raise RequestError("each tool must be {'type': 'function', 'function': {'name': str, 'parameters': "
                                   "a JSON schema}}", param="tools")
        if choice in (None, "auto"):
            raise RequestError("tool_choice 'auto' (the default with tools) is not supported by this server: ask for "
                               "'required' or a named function", param="tool_choice")
        if choice == "required":
            name = None
        elif isinstance(choice, dict) and choice.get("type") == "function" and \
                isinstance((choice.get("function") or {}).get("name"), str):
            name = choice["function"]["name"]
        else:
            raise RequestError(f"'tool_choice' must be 'none', 'required' or a named function, got {choice!r}",
                               param="tool_choice")
        try:
            schema = structured.tool_call_schema(tools, name)
        except ValueError as err:
            raise RequestError(str(err), param="tool_choice") from None
        return ("json_schema", json.dumps(schema)), tools
    if choice not in (None, "none", "auto"):
        raise RequestError("'tool_choice' needs 'tools'", param="tool_choice")
    if fmt is None or fmt == {"type": "text"}:
        return None, None
    if fmt.get("type") == "json_object":
        return ("json_schema", structured.ANY_JSON_OBJECT), None
    spec = fmt.get("json_schema")
    if fmt.get("type") == "json_schema" and isinstance(spec, dict) and isinstance(spec.get("schema"), dict):
        return ("json_schema", json.dumps(spec["schema"])), None
    raise RequestError("'response_format' must be {'type': 'text' | 'json_object'} or {'type': 'json_schema', "
                       "'json_schema': {'name': ..., 'schema': {...}}}", param="response_format")


def _tool_calls(text: str) -> list[dict]:
    """The OpenAI tool_calls of a reply generated under tool_call_schema."""
    call = json.loads(text)
    return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": call["name"], "arguments": json.dumps(call["arguments"])}}]


def _chat_prompt_ids(llm: LLM, req: ChatRequest, params: SamplingParams) -> list[int]:
    """The token ids of a chat request's messages under the chat template; without an explicit
    max_tokens the reply is capped by the room left in the model length (params is updated)."""
    messages = [{"role": m.role, "content": m.text} for m in req.messages]
    for m in messages:
        _check_text(m["content"], "messages")
    try:
        text = llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    except ValueError as err:
        raise RequestError(str(err), param="messages") from None
    try:
        prompt_ids = llm.tokenizer.encode(text, add_special_tokens=False, limit=llm.max_model_len - 1)
    except ValueError as err:
        raise RequestError(f"'messages': {err}; this model's max_model_len is {llm.max_model_len} (prompt plus at "
                           "least one generated token)", param="messages") from None
    # a chat reply stops where the model ends its turn: cap max_tokens by the room left
    if not _explicit_max_tokens(req):
        params.max_tokens = max(1, min(params.max_tokens, llm.max_model_len - len(prompt_ids) - 1))
    return prompt_ids


def _token_text(llm: LLM, token: int) -> str:
    return llm.tokenizer.decode([token], skip_special_tokens=False)


def _completion_logprobs(llm: LLM, tokens: list[int], lps: list[float], tops: list, offset: int = 0) -> dict:
    """The logprobs object of a completion choice (or of a streamed chunk whose text starts at
    `offset` characters into the completion): per token its text and log-probability, and with
    `logprobs` N > 0 a {text: log-probability} of its N most likely alternatives and the chosen
    token (up to N + 1 entries, as OpenAI's)."""
    strs = [_token_text(llm, t) for t in tokens]
    offs, at = [], offset
    for s in strs:
        offs.append(at)
        at += len(s)
    top = None
    if tops:
        top = []
        for s, lp, alts in zip(strs, lps, tops):
            entry = {}
            for t, a in alts:  # most likely first: of tokens with the same text, the likeliest's value
                entry.setdefault(_token_text(llm, t), a)
            entry[s] = lp  # the chosen token's own, as token_logprobs gives it
            top.append(entry)
    return {"tokens": strs, "token_logprobs": lps, "top_logprobs": top, "text_offset": offs}


def _chat_logprobs(llm: LLM, tokens: list[int], lps: list[float], tops: list) -> dict:
    """The logprobs object of a chat choice: per token its text, log-probability and UTF-8 bytes,
    and its `top_logprobs` most likely alternatives in descending order."""
    def item(t: int, lp: float) -> dict:
        s = _token_text(llm, t)
        return {"token": s, "logprob": lp, "bytes": list(s.encode())}

    tops = tops or [[] for _ in tokens]
    return {"content": [{**item(t, lp), "top_logprobs": [item(a, alp) for a, alp in alts]}
                        for t, lp, alts in zip(tokens, lps, tops)]}


def _metrics_text(llm: LLM) -> str:
    """The Prometheus text of /metrics: the engine's gauges and histograms."""
    st = llm.stats()
    gauges = {
        "pallaskit_requests_running": (st["running"], "Requests being computed"),
        "pallaskit_requests_waiting": (st["waiting"], "Requests waiting for admission"),
        "pallaskit_kv_pages_in_use": (st["kv_pages_in_use"], "KV cache pages referenced by requests"),
        "pallaskit_kv_pages_total": (st["kv_pages_total"], "KV cache pages"),
        "pallaskit_prefix_cache_hit_rate": (round(st["prefix_cache_hit_rate"], 6),
                                            "Prompt tokens served from the prefix cache / prompt tokens"),
        "pallaskit_tokens_per_second": (round(llm.metrics.tokens_per_second(), 3),
                                        "Generated tokens per second (last 10 s)"),
        "pallaskit_compilations_after_warmup": (st["compiles_after_warmup"], "XLA compilations after warm-up"),
        "pallaskit_padding_waste": (round(st["padding_waste"], 6), "Padding share of computed token slots"),
        "pallaskit_preemptions": (st["preemptions"], "Requests preempted (recomputed later)"),
    }
    return llm.metrics.render(gauges)


# ------------------------------------------------------------------------------- request handling


def _error(message: str, status: int = 400, param: str | None = None,
           type_: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": None}},
                        status_code=status)


async def _read_body(request: Request, name: str) -> dict:
    """The request's JSON object; a model other than `name` is a 404."""
    raw = await request.body()
    try:
        # a large body is parsed off the event loop (other requests and /health keep being served)
        body = json.loads(raw) if len(raw) < 1 << 16 else await asyncio.to_thread(json.loads, raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RequestError(f"request body is not valid JSON: {err}") from None
    except RecursionError:
        raise RequestError("request body is nested too deeply") from None
    if not isinstance(body, dict):
        raise RequestError("request body must be a JSON object")
    model = body.get("model")
    if model is not None and model != name:
        raise RequestError(f"the model '{model}' does not exist; this server serves '{name}'", 404, "model",
                           "NotFoundError")
    return body


def _submit(engine: AsyncEngine, requests: list[tuple], prompt_param: str = "prompt",
            grammar_param: str = "response_format") -> list[tuple[str, asyncio.Queue]]:
    """Queue the engine requests of one API request, (prompt, params) each; all or none. An error
    the engine names a field in is that field's (logit_bias, top_k, dimensions); a grammar it
    refuses is the fault of `grammar_param`, anything else of `prompt_param`."""
    if not engine.alive:
        raise RequestError("the engine is not running", 503, type_="server_error")
    submitted = []
    try:
        for prompt, params in requests:
            submitted.append(engine.submit(prompt, params))
    except ValueError as err:
        for rid, _ in submitted:
            engine.abort(rid)
        param = next((p for p in ("logit_bias", "top_k", "dimensions") if str(err).startswith(p)), prompt_param)
        param = grammar_param if str(err).startswith("grammar") else param
        raise RequestError(str(err), param=param) from None
    return submitted


def _candidates(prompt, params: SamplingParams, count: int) -> list[tuple]:
    """The (prompt, params) of a request's `count` candidates (candidate_params)."""
    return [(prompt, candidate_params(params, i)) for i in range(count)]


def _engine_failure(item) -> str | None:
    """What a request's queue item says of an engine fault: the exception its step raised, or the
    error its StepOutput ends with (None: no fault)."""
    if isinstance(item, BaseException):
        return f"engine error: {item}"
    return None if item.error is None else f"engine error: {item.error}"


@dataclasses.dataclass
class Candidate:
    """One generated candidate of a request, whole."""

    tokens: list[int]
    logprobs: list[float]
    top_logprobs: list
    text: str
    finish_reason: str
    embedding: np.ndarray | None = None  # an embedding input's vector

    @property
    def mean_logprob(self) -> float:
        """best_of's ranking: the log-probability per token (OpenAI's "best")."""
        return sum(self.logprobs) / max(1, len(self.logprobs))


async def _collect(engine: AsyncEngine, rid: str, queue: asyncio.Queue, request: Request | None = None) -> Candidate:
    """One candidate, whole; aborts it if the handler is cancelled or the client goes away (checked
    every quarter second)."""
    toks, lps, tops, text, reason, embedding = [], [], [], "", None, None
    checked = time.monotonic()
    try:
        while reason is None:
            try:
                item = await asyncio.wait_for(queue.get(), timeout=0.5)
            except TimeoutError:
                item = None
            if request is not None and time.monotonic() - checked >= 0.25:
                checked = time.monotonic()
                if await request.is_disconnected():
                    raise RequestError("client disconnected", 499)
            if item is None:
                continue
            if (failure := _engine_failure(item)) is not None:
                raise RequestError(failure, 500, type_="server_error")
            toks += item.new_token_ids
            lps += item.new_logprobs
            tops += item.new_top_logprobs
            text += item.delta_text
            reason = item.finish_reason
            embedding = item.embedding
    finally:
        if reason is None:
            engine.abort(rid)
    return Candidate(toks, lps, tops, text, reason, embedding)


async def _collect_all(engine: AsyncEngine, submitted: list, request: Request, keep: int) -> tuple[list, int]:
    """Every candidate of a request; returns (the `keep` best by mean log-probability in candidate
    order when there are more, else all; the tokens all of them generated). A failure aborts all."""
    tasks = [asyncio.ensure_future(_collect(engine, rid, queue, request)) for rid, queue in submitted]
    try:
        done = await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)  # each aborts its own request
        raise
    generated = sum(len(c.tokens) for c in done)
    if len(done) > keep:
        best = sorted(range(len(done)), key=lambda i: -done[i].mean_logprob)[:keep]
        done = [done[i] for i in sorted(best)]
    return done, generated


def _require_task(llm: LLM, task: str, name: str) -> None:
    """A generation request to an embedding model, or the reverse, is a 400 naming the model."""
    if llm.task != task:
        what = "serves embeddings: use /v1/embeddings" if llm.task == "embed" else \
            "generates text: /v1/embeddings needs an embedding model"
        raise RequestError(f"the model '{name}' {what}", param="model")


def _embedding_inputs(llm: LLM, req: EmbeddingRequest) -> list[list[int]]:
    """Each input's token ids: texts tokenized up to the token budget and the model length (an
    input is computed whole in one engine step; token-id inputs the engine checks on submit)."""
    limit = min(llm.max_model_len, llm.scheduler.max_num_batched_tokens)
    out = []
    for i, x in enumerate(req.inputs):
        if isinstance(x, str):
            _check_text(x, "input")
            if not x:
                raise RequestError(f"'input'[{i}]: an empty string has nothing to embed", param="input")
            try:
                x = llm.tokenizer.encode(x, limit=limit)
            except ValueError as err:
                raise RequestError(f"'input'[{i}]: {err}: an input is computed in one step of at most {limit} tokens "
                                   "(this engine's max_num_batched_tokens and max_model_len)", param="input") from None
        out.append(x)
    return out


def _embedding_data(vec: np.ndarray, index: int, encoding: str) -> dict:
    """One entry of an embeddings response: the vector as floats or as base64 of its little-endian
    float32 bytes (what OpenAI's client asks for by default)."""
    if encoding == "base64":
        value = base64.b64encode(np.asarray(vec, "<f4").tobytes()).decode("ascii")
    else:
        value = [float(v) for v in vec]
    return {"object": "embedding", "index": index, "embedding": value}


def _sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


async def _stream_events(engine: AsyncEngine, submitted: list, head: dict, choice, n_prompt: int,
                         include_usage: bool, first=None):
    """Server-sent events of one streamed request of len(submitted) choices: the first chunk of each
    choice (`first(index)`, when given), one chunk per engine output (`choice(index, item)`) in the
    order they come, the usage chunk when asked for, then [DONE]. A client that goes away before the
    end aborts every unfinished choice in the engine."""
    merged: asyncio.Queue = asyncio.Queue()

    async def forward(index: int, queue: asyncio.Queue):
        while True:
            item = await queue.get()
            await merged.put((index, item))
            if isinstance(item, BaseException) or item.finish_reason is not None:
                return

    pumps = [asyncio.ensure_future(forward(i, q)) for i, (_, q) in enumerate(submitted)]
    running, n_out = set(range(len(submitted))), 0
    try:
        if first is not None:
            for i in range(len(submitted)):
                yield _sse({**head, "created": int(time.time()), "choices": [first(i)]})
        while running:
            index, item = await merged.get()
            if (failure := _engine_failure(item)) is not None:
                running.discard(index)
                yield _sse({"error": {"message": failure, "type": "server_error"}})
                return
            if item.finish_reason is not None:
                running.discard(index)
            n_out += len(item.new_token_ids)
            yield _sse({**head, "created": int(time.time()), "choices": [choice(index, item)]})
        if include_usage:
            yield _sse({**head, "created": int(time.time()), "choices": [], "usage": usage(n_prompt, n_out)})
        yield "data: [DONE]\n\n"
    finally:
        for p in pumps:
            p.cancel()
        for i in running:
            engine.abort(submitted[i][0])


# ------------------------------------------------------------------------------- the app


def create_app(llm: LLM, model_name: str | None = None) -> FastAPI:
    """The FastAPI app serving `llm` as `model_name` (default: the model directory's name).

    Args:
      llm: the engine; it steps in a background thread started and stopped with the app.
      model_name: the id under /v1/models, which requests' "model" must match.
    Returns:
      The app: /health, /v1/models, /metrics, /v1/completions, /v1/chat/completions, /v1/embeddings.
    """
    name = model_name or llm.model_dir.rstrip("/").split("/")[-1]
    engine = AsyncEngine(llm)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        engine.stop()
        llm.shutdown()  # several processes: stop the followers, check they sampled the same tokens

    app = FastAPI(title="pallaskit engine", lifespan=lifespan)
    app.state.engine = engine
    app.state.model_name = name
    created = int(time.time())

    @app.exception_handler(RequestError)
    async def _request_error(request, exc: RequestError):  # noqa: RUF029
        return _error(str(exc), exc.status, exc.param, exc.type)

    @app.exception_handler(Exception)
    async def _unexpected(request, exc: Exception):  # noqa: RUF029
        log.error("request %s %s failed: %r", request.method, request.url.path, exc)
        return _error(f"internal error: {type(exc).__name__}: {exc}", 500, type_="server_error")

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc):  # noqa: RUF029
        return _error(f"invalid request: {exc.errors()}")

    @app.get("/health")
    async def health():  # noqa: RUF029
        if not engine.alive:
            return _error("engine not running", 503, type_="server_error")
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():  # noqa: RUF029
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created,
                                            "owned_by": "pallaskit", "max_model_len": llm.max_model_len}]}

    @app.get("/metrics")
    async def metrics():  # noqa: RUF029
        return PlainTextResponse(_metrics_text(llm), media_type="text/plain; version=0.0.4")

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await _read_body(request, name)
        req = parse(CompletionRequest, body, supported=("best_of",))
        _require_task(llm, "generate", name)
        want_lp = req.logprobs is not None
        params = sampling_params(req, 16, req.logprobs or 0)
        prompt = _completion_prompt(req)
        count = req.best_of or req.n
        if req.stream and count > req.n:
            raise RequestError("'best_of' > 'n' cannot be streamed (the best are known at the end)", param="best_of")
        cid = f"cmpl-{uuid.uuid4().hex}"
        if isinstance(prompt, str):  # off the event loop: a long prompt must not stall other requests
            prompt = await asyncio.to_thread(_encode_prompt, llm, prompt)
        n_prompt = len(prompt)
        _check_room(llm, n_prompt, params, _explicit_max_tokens(req))
        submitted = _submit(engine, _candidates(prompt, params, count))

        if req.stream:
            offsets = [0] * count  # per choice, characters of its tokens' texts so far (text_offset)

            def choice(index, item):
                lp = None
                if want_lp:
                    lp = _completion_logprobs(llm, item.new_token_ids, item.new_logprobs, item.new_top_logprobs,
                                              offsets[index])
                    offsets[index] += sum(len(t) for t in lp["tokens"])
                return {"index": index, "text": item.delta_text, "finish_reason": item.finish_reason, "logprobs": lp}

            head = {"id": cid, "object": "text_completion", "model": name}
            return StreamingResponse(_stream_events(engine, submitted, head, choice, n_prompt, req.include_usage),
                                     media_type="text/event-stream")

        done, generated = await _collect_all(engine, submitted, request, req.n)
        return {"id": cid, "object": "text_completion", "created": int(time.time()), "model": name,
                "choices": [{"index": i, "text": c.text, "finish_reason": c.finish_reason,
                             "logprobs": _completion_logprobs(llm, c.tokens, c.logprobs, c.top_logprobs) if want_lp
                             else None} for i, c in enumerate(done)],
                "usage": usage(n_prompt, generated)}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await _read_body(request, name)
        req = parse(ChatRequest, body)
        _require_task(llm, "generate", name)
        if req.top_logprobs is not None and not req.logprobs:
            raise RequestError("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
        want_lp = bool(req.logprobs)
        grammar, tools = _chat_grammar(req)
        params = sampling_params(req, max(1, llm.max_model_len // 2), req.top_logprobs or 0)
        params.grammar = grammar
        prompt_ids = await asyncio.to_thread(_chat_prompt_ids, llm, req, params)
        cid = f"chatcmpl-{uuid.uuid4().hex}"
        n_prompt = len(prompt_ids)
        _check_room(llm, n_prompt, params, _explicit_max_tokens(req))
        submitted = _submit(engine, _candidates(prompt_ids, params, req.n),
                            grammar_param="tools" if tools else "response_format")

        if req.stream:
            def choice(index, item):
                return {"index": index, "delta": {"content": item.delta_text} if item.delta_text else {},
                        "finish_reason": item.finish_reason,
                        "logprobs": _chat_logprobs(llm, item.new_token_ids, item.new_logprobs, item.new_top_logprobs)
                        if want_lp else None}

            def first(index):
                return {"index": index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None,
                        "logprobs": None}

            head = {"id": cid, "object": "chat.completion.chunk", "model": name}
            return StreamingResponse(_stream_events(engine, submitted, head, choice, n_prompt, req.include_usage,
                                                    first), media_type="text/event-stream")

        done, generated = await _collect_all(engine, submitted, request, req.n)

        def message(c: Candidate) -> tuple[dict, str]:
            if tools and c.finish_reason == "stop":  # the grammar closed the call
                return {"role": "assistant", "content": None, "tool_calls": _tool_calls(c.text)}, "tool_calls"
            return {"role": "assistant", "content": c.text}, c.finish_reason

        choices = []
        for i, c in enumerate(done):
            msg, reason = message(c)
            choices.append({"index": i, "message": msg, "finish_reason": reason,
                            "logprobs": _chat_logprobs(llm, c.tokens, c.logprobs, c.top_logprobs) if want_lp
                            else None})
        return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": name,
                "choices": choices, "usage": usage(n_prompt, generated)}

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        body = await _read_body(request, name)
        req = parse(EmbeddingRequest, body)
        _require_task(llm, "embed", name)
        inputs = await asyncio.to_thread(_embedding_inputs, llm, req)  # tokenized off the event loop
        params = PoolingParams(dimensions=req.dimensions)  # a size past the model's: the engine names dimensions
        submitted = _submit(engine, [(ids, params) for ids in inputs], prompt_param="input")
        done, _ = await _collect_all(engine, submitted, request, len(submitted))
        n_prompt = sum(len(ids) for ids in inputs)
        return {"object": "list", "model": name,
                "data": [_embedding_data(c.embedding, i, req.encoding_format) for i, c in enumerate(done)],
                "usage": {"prompt_tokens": n_prompt, "total_tokens": n_prompt}}

    return app
