"""OpenAI-compatible HTTP server over one LLM: completions, chat completions (streamed over SSE),
/v1/models, /health and Prometheus /metrics.

The engine runs in one background thread (`AsyncEngine`): it steps while there is work and hands
each step's outputs to the request handlers' asyncio queues. A streaming client that disconnects
cancels its handler, which aborts the request: its pages are freed at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from engine.llm import LLM, StepOutput
from engine.sampler import SamplingParams

log = logging.getLogger("engine.server")


class RequestError(ValueError):
    def __init__(self, message: str, status: int = 400, param: str | None = None, type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.param, self.type = status, param, type_


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

    def submit(self, prompt, params: SamplingParams) -> tuple[str, asyncio.Queue]:
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


def _get(body: dict, name: str, types, default=None, *, check=None, what=""):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise RequestError(f"'{name}' must be {what or types}", param=name)
    if not isinstance(value, types):
        raise RequestError(f"'{name}' must be {what or getattr(types, '__name__', types)}, got {value!r}", param=name)
    if check is not None and not check(value):
        raise RequestError(f"'{name}' is out of range: {value!r} ({what})", param=name)
    return value


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    """The OpenAI usage object of one request."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


# Parameters this server does not implement yet, and the values that ask for nothing (accepted).
UNSUPPORTED = {"best_of": (None, 1), "suffix": (None, ""), "logit_bias": (None, {}), "tools": (None, []),
               "tool_choice": (None, "none", "auto"), "response_format": (None, {"type": "text"}),
               "functions": (None, []), "function_call": (None, "none", "auto")}


def _refuse_unsupported(body: dict) -> None:
    """A 400 naming a parameter the server would otherwise ignore (never a silent 200)."""
    for name, harmless in UNSUPPORTED.items():
        if name in body and body[name] not in harmless:
            raise RequestError(f"'{name}' is not supported by this server", param=name)


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


def sampling_from(body: dict, default_max_tokens: int) -> tuple[SamplingParams, dict]:
    _refuse_unsupported(body)
    n = _get(body, "n", int, 1)
    if n != 1:
        raise RequestError("only n=1 is supported", param="n")
    if body.get("echo"):
        raise RequestError("echo is not supported", param="echo")
    for name in ("presence_penalty", "frequency_penalty"):
        if _get(body, name, (int, float), 0):
            raise RequestError(f"'{name}' is not supported", param=name)
    requested = body.get("max_completion_tokens")
    requested = body.get("max_tokens") if requested is None else requested
    max_tokens = default_max_tokens if requested is None else requested
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise RequestError(f"'max_tokens' must be an integer >= 1, got {max_tokens!r}", param="max_tokens")
    stop = body.get("stop")
    if stop is not None and not (isinstance(stop, str) or (isinstance(stop, list) and all(isinstance(s, str) for s in stop))):
        raise RequestError("'stop' must be a string or a list of strings", param="stop")
    stop_ids = _get(body, "stop_token_ids", list, None)
    if stop_ids is not None and not all(isinstance(t, int) and not isinstance(t, bool) for t in stop_ids):
        raise RequestError("'stop_token_ids' must be a list of integers", param="stop_token_ids")
    _check_text(stop, "stop")
    try:
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=_get(body, "temperature", (int, float), 1.0),
            top_p=_get(body, "top_p", (int, float), 1.0),
            top_k=_get(body, "top_k", int, 0),
            seed=_get(body, "seed", int, None),
            stop=stop,
            stop_token_ids=stop_ids,
            ignore_eos=_get(body, "ignore_eos", bool, False),
        )
    except ValueError as err:
        param = next((p for p in ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop") if p in str(err)), None)
        raise RequestError(str(err), param=param) from None
    extras = {"explicit_max_tokens": requested is not None,
              "stream": _get(body, "stream", bool, False),
              "include_usage": bool((_get(body, "stream_options", dict, {}) or {}).get("include_usage"))}
    return params, extras


def _completion_logprobs_wanted(body: dict) -> bool:
    """Completions' `logprobs`: null, or an int 0..20 (0: the chosen tokens' log-probabilities)."""
    lp = body.get("logprobs")
    if lp is None or lp is False:
        return False
    if not isinstance(lp, int) or not 0 <= lp <= 20:
        raise RequestError(f"'logprobs' must be an integer in [0, 20], got {lp!r}", param="logprobs")
    if lp > 0:
        raise RequestError("'logprobs' > 0 (the top alternatives) is not supported by this server yet; 0 returns "
                           "the chosen tokens' log-probabilities", param="logprobs")
    return True


def _chat_logprobs_wanted(body: dict) -> bool:
    """Chat's `logprobs` (a bool) and `top_logprobs` (an int 0..20, with logprobs true)."""
    lp, top = body.get("logprobs"), body.get("top_logprobs")
    if lp is not None and not isinstance(lp, bool):
        raise RequestError(f"'logprobs' must be a boolean, got {lp!r}", param="logprobs")
    if top is not None:
        if not isinstance(top, int) or isinstance(top, bool) or not 0 <= top <= 20:
            raise RequestError(f"'top_logprobs' must be an integer in [0, 20], got {top!r}", param="top_logprobs")
        if not lp:
            raise RequestError("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
        if top > 0:
            raise RequestError("'top_logprobs' > 0 is not supported by this server yet", param="top_logprobs")
    return bool(lp)


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


def _completion_prompt(body: dict) -> str | list:
    """The one prompt of a completions request: a string or a list of token ids."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    _check_text(prompt, "prompt")
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        raise RequestError("batched prompts are not supported: send one prompt per request", param="prompt")
    if prompt is None or not isinstance(prompt, (str, list)):
        raise RequestError("'prompt' must be a string or a list of token ids", param="prompt")
    return prompt


def _chat_prompt_ids(llm: LLM, body: dict, params: SamplingParams, explicit_max_tokens: bool) -> list[int]:
    """The token ids of a chat request's messages under the chat template; without an explicit
    max_tokens the reply is capped by the room left in the model length (params is updated)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list", param="messages")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise RequestError("each message needs a 'role'", param="messages")
        if isinstance(m.get("content"), list):  # [{"type": "text", "text": ...}, ...]
            parts = m["content"]
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in parts):
                raise RequestError("only text content parts are supported", param="messages")
            if not all(isinstance(p.get("text"), str) for p in parts):
                raise RequestError("a text content part needs a string 'text'", param="messages")
            m["content"] = "".join(p["text"] for p in parts)
        if not isinstance(m.get("content"), str):
            raise RequestError("each message needs a string 'content'", param="messages")
        _check_text(m["content"], "messages")
    try:
        text = llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    except ValueError as err:
        raise RequestError(str(err), param="messages") from None
    prompt_ids = llm.tokenizer.encode(text, add_special_tokens=False)
    # a chat reply stops where the model ends its turn: cap max_tokens by the room left
    if not explicit_max_tokens:
        params.max_tokens = max(1, min(params.max_tokens, llm.max_model_len - len(prompt_ids) - 1))
    return prompt_ids


def _completion_logprobs(llm: LLM, tokens: list[int], lps: list[float]) -> dict:
    """The logprobs object of a completion choice."""
    strs = [llm.tokenizer.decode([t], skip_special_tokens=False) for t in tokens]
    offs, at = [], 0
    for s in strs:
        offs.append(at)
        at += len(s)
    return {"tokens": strs, "token_logprobs": lps, "top_logprobs": None, "text_offset": offs}


def _chat_logprobs(llm: LLM, tokens: list[int], lps: list[float]) -> dict:
    """The logprobs object of a chat choice."""
    out = []
    for t, lp in zip(tokens, lps):
        s = llm.tokenizer.decode([t], skip_special_tokens=False)
        out.append({"token": s, "logprob": lp, "bytes": list(s.encode()), "top_logprobs": []})
    return {"content": out}


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


def _submit(engine: AsyncEngine, prompt, params: SamplingParams) -> tuple[str, asyncio.Queue]:
    if not engine.alive:
        raise RequestError("the engine is not running", 503, type_="server_error")
    try:
        return engine.submit(prompt, params)
    except ValueError as err:
        raise RequestError(str(err), param="prompt") from None


async def _collect(engine: AsyncEngine, rid: str, queue: asyncio.Queue,
                   request: Request | None = None) -> tuple[list, list, str, str]:
    """(token ids, logprobs, text, finish reason) of a whole request; aborts it if the handler is
    cancelled or the client goes away (checked every quarter second)."""
    toks, lps, text, reason = [], [], "", None
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
            if isinstance(item, BaseException):
                raise RequestError(f"engine error: {item}", 500, type_="server_error")
            toks += item.new_token_ids
            lps += item.new_logprobs
            text += item.delta_text
            reason = item.finish_reason
    finally:
        if reason is None:
            engine.abort(rid)
    return toks, lps, text, reason


def _sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


async def _stream_events(engine: AsyncEngine, rid: str, queue: asyncio.Queue, head: dict, choice,
                         n_prompt: int, include_usage: bool, first: dict | None = None):
    """Server-sent events of one streamed request: an optional first chunk, one chunk per engine
    output (`choice(item)`), the usage chunk when asked for, then [DONE]. A client that goes away
    before the end aborts the request in the engine."""
    reason, n_out = None, 0
    try:
        if first is not None:
            yield _sse({**head, "created": int(time.time()), "choices": [first]})
        while reason is None:
            item = await queue.get()
            if isinstance(item, BaseException):
                yield _sse({"error": {"message": f"engine error: {item}", "type": "server_error"}})
                return
            reason = item.finish_reason
            n_out += len(item.new_token_ids)
            yield _sse({**head, "created": int(time.time()), "choices": [choice(item)]})
        if include_usage:
            yield _sse({**head, "created": int(time.time()), "choices": [], "usage": usage(n_prompt, n_out)})
        yield "data: [DONE]\n\n"
    finally:
        if reason is None:
            engine.abort(rid)


# ------------------------------------------------------------------------------- the app


def create_app(llm: LLM, model_name: str | None = None) -> FastAPI:
    """The FastAPI app serving `llm` as `model_name` (default: the model directory's name).

    Args:
      llm: the engine; it steps in a background thread started and stopped with the app.
      model_name: the id under /v1/models, which requests' "model" must match.
    Returns:
      The app: /health, /v1/models, /metrics, /v1/completions, /v1/chat/completions.
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
        params, extras = sampling_from(body, 16)
        prompt = _completion_prompt(body)
        want_lp = _completion_logprobs_wanted(body)
        cid = f"cmpl-{uuid.uuid4().hex}"
        if isinstance(prompt, str):  # off the event loop: a long prompt must not stall other requests
            prompt = await asyncio.to_thread(_encode_prompt, llm, prompt)
        n_prompt = len(prompt)
        _check_room(llm, n_prompt, params, extras["explicit_max_tokens"])
        rid, queue = _submit(engine, prompt, params)

        if extras["stream"]:
            def choice(item):
                return {"index": 0, "text": item.delta_text, "finish_reason": item.finish_reason,
                        "logprobs": _completion_logprobs(llm, item.new_token_ids, item.new_logprobs) if want_lp
                        else None}

            head = {"id": cid, "object": "text_completion", "model": name}
            return StreamingResponse(_stream_events(engine, rid, queue, head, choice, n_prompt,
                                                    extras["include_usage"]), media_type="text/event-stream")

        toks, lps, text, reason = await _collect(engine, rid, queue, request)
        return {"id": cid, "object": "text_completion", "created": int(time.time()), "model": name,
                "choices": [{"index": 0, "text": text, "finish_reason": reason,
                             "logprobs": _completion_logprobs(llm, toks, lps) if want_lp else None}],
                "usage": usage(n_prompt, len(toks))}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await _read_body(request, name)
        params, extras = sampling_from(body, max(1, llm.max_model_len // 2))
        want_lp = _chat_logprobs_wanted(body)
        prompt_ids = await asyncio.to_thread(_chat_prompt_ids, llm, body, params, extras["explicit_max_tokens"])
        cid = f"chatcmpl-{uuid.uuid4().hex}"
        n_prompt = len(prompt_ids)
        _check_room(llm, n_prompt, params, extras["explicit_max_tokens"])
        rid, queue = _submit(engine, prompt_ids, params)

        if extras["stream"]:
            def choice(item):
                return {"index": 0, "delta": {"content": item.delta_text} if item.delta_text else {},
                        "finish_reason": item.finish_reason,
                        "logprobs": _chat_logprobs(llm, item.new_token_ids, item.new_logprobs) if want_lp else None}

            head = {"id": cid, "object": "chat.completion.chunk", "model": name}
            first = {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None, "logprobs": None}
            return StreamingResponse(_stream_events(engine, rid, queue, head, choice, n_prompt,
                                                    extras["include_usage"], first), media_type="text/event-stream")

        toks, lps, text, reason = await _collect(engine, rid, queue, request)
        return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason,
                             "logprobs": _chat_logprobs(llm, toks, lps) if want_lp else None}],
                "usage": usage(n_prompt, len(toks))}

    return app
