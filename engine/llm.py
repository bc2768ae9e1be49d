"""The engine: LLM(model_dir, ...) loads a Hugging Face checkpoint and serves requests step by step.

    llm = LLM(model_dir, max_model_len=4096, backend="auto")
    outs = llm.generate(["Hello", [1, 2, 3]], SamplingParams(max_tokens=32, temperature=0))

An embedding checkpoint (sentence-transformers pooling files, or config.json's is_causal: false) runs
as task "embed": `llm.embed(["some text", ...])` gives one vector per input (engine/pooling.py).

`add_request` / `step` / `abort` are the incremental interface the server drives from its engine thread.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import threading
import time
import uuid

import jax
import jax.numpy as jnp
import numpy as np

from engine import distributed, parallel, weights
from engine.config import CheckpointError, load_config
from engine.kv_cache import PageAllocator
from engine.metrics import Metrics
from engine.models import spec_for
from engine.models.decoder import load_params
from engine.ops import Ops
from engine.pooling import POOLING_MODES, PoolingParams, finish_embedding, load_pooling
from engine.runner import ModelRunner, token_buckets
from engine.sampler import SamplingParams
from engine.scheduler import Scheduler, Sequence, Status
from engine.structured import GrammarCompiler
from engine.tokenizer import Detokenizer, Tokenizer

log = logging.getLogger("engine")

KV_CACHE_DTYPES = {"auto": None, "fp8": "float8_e4m3fn", "int8": "int8", "bfloat16": "bfloat16",
                   "float32": "float32"}
# Fixed per-tensor KV scales for quantized caches (no calibration pass yet): stored = x / scale.
KV_SCALES = {"float8_e4m3fn": 1.0, "int8": 1.0 / 8.0}


@dataclasses.dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    logprobs: list[float]
    finish_reason: str | None  # "stop" | "length" | "abort" | "error" | None (still running)
    num_cached_tokens: int = 0
    num_preemptions: int = 0
    # per generated token, its SamplingParams.top_logprobs most likely (token id, log-probability)
    top_logprobs: list[list[tuple[int, float]]] = dataclasses.field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclasses.dataclass
class StepOutput:
    """What one step produced for one request (the server streams these)."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[float]
    delta_text: str
    finish_reason: str | None
    new_top_logprobs: list[list[tuple[int, float]]] = dataclasses.field(default_factory=list)  # see RequestOutput
    embedding: np.ndarray | None = None  # an embedding input's float32 vector (its only output)
    error: str | None = None  # finish_reason "error": why the engine failed this request


@dataclasses.dataclass
class EmbeddingOutput:
    """An embedding input's result (task "embed")."""

    request_id: str
    prompt_token_ids: list[int]
    embedding: np.ndarray  # float32 [hidden] (or [dimensions]), L2-normalized unless asked otherwise
    finish_reason: str = "stop"


class LLM:
    def __init__(self, model_dir, *, max_model_len: int = 4096, page_size: int | None = None,
                 num_pages: int | None = None, max_num_seqs: int = 256, max_num_batched_tokens: int = 2048,
                 backend: str = "auto", quantization: str | None = None, kv_cache_dtype: str = "auto",
                 compile_cache_dir=None, dtype: str | None = None, prefix_caching: bool = True,
                 gpu_memory_utilization: float = 0.85, warmup: bool = True, tensor_parallel_size: int = 1,
                 num_processes: int | None = None, process_id: int | None = None,
                 coordinator_address: str | None = None, scan_layers: bool = True,
                 structured_outputs: bool = True, task: str = "auto", pooling: str | None = None):
        """See the module docstring. tensor_parallel_size: devices the model is split over (one
        mesh; engine/parallel.py). num_processes / process_id / coordinator_address: several
        processes (hosts) serving one model through jax.distributed (engine/distributed.py): process
        0 schedules and serves, the others call follow(); tensor_parallel_size must then cover every
        device of every process. scan_layers: the step scans over stacked runs of identical layers
        (one compiled layer body each; engine/layer_groups.py); False unrolls every layer (the same
        tokens, a longer compile). task: "generate", "embed" (an embedding model: add_request takes
        engine.pooling.PoolingParams, embed() gives vectors) or "auto" ("embed" for a checkpoint that
        declares sentence-transformers pooling or bidirectional attention). pooling: an embedding
        model's pooling mode ("last", "mean", "cls"; default: the checkpoint's, else "last")."""
        t_start = time.perf_counter()
        if (num_processes or 1) > 1 or coordinator_address is not None:
            distributed.initialize(coordinator_address, num_processes, process_id)
            if tensor_parallel_size != jax.device_count():
                raise ValueError(f"tensor_parallel_size={tensor_parallel_size}: with several processes the model is "
                                 f"split over all {jax.device_count()} devices of the job")
            distributed.check_same_config(dict(
                model=str(model_dir), max_model_len=max_model_len, page_size=page_size, num_pages=num_pages,
                max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens, backend=backend,
                quantization=quantization, kv_cache_dtype=kv_cache_dtype, dtype=dtype, prefix_caching=prefix_caching,
                tensor_parallel_size=tensor_parallel_size))
        if compile_cache_dir is not None:
            enable_compile_cache(compile_cache_dir)
        self.model_dir = str(model_dir)
        self.config = cfg = load_config(model_dir)
        self.task, self.pooling = _resolve_task(model_dir, cfg, task, pooling)
        if self.task == "embed" and jax.process_count() > 1:
            raise ValueError("task='embed': embedding models are served by one process")
        # The mesh first: a size that does not split the model fails before anything is loaded.
        self.layout = None if tensor_parallel_size == 1 else parallel.plan(cfg, tensor_parallel_size)
        self.ops = Ops(backend)
        self.tokenizer = Tokenizer(model_dir, cfg)
        if max_model_len > cfg.max_position_embeddings:
            log.warning("max_model_len %d > max_position_embeddings %d: using the latter", max_model_len,
                        cfg.max_position_embeddings)
            max_model_len = cfg.max_position_embeddings
        self.max_model_len = max_model_len
        qdtype = weights.quantization_dtype(quantization)
        self.dtype = jnp.dtype(dtype or cfg.dtype)
        if kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype: expected one of {', '.join(KV_CACHE_DTYPES)}, got {kv_cache_dtype!r}")
        kv_dtype = jnp.dtype(KV_CACHE_DTYPES[kv_cache_dtype] or self.dtype)
        kv_scales = None
        if kv_dtype.name in KV_SCALES:
            kv_scales = (KV_SCALES[kv_dtype.name], KV_SCALES[kv_dtype.name])
        reader = weights.CheckpointReader(model_dir)
        # Committed to one device, so every leaf has the same sharding at warm-up and while serving
        # (a weight that is committed only later, e.g. by a quantization step, would recompile the step).
        self.param_specs = None
        if self.layout is None:
            params = load_params(reader, cfg, spec_for(cfg.family), self.dtype, qdtype)
            self.params = jax.device_put(params, jax.devices()[0])
        else:  # loaded and reordered in host memory: each chip then receives only its shard
            with jax.default_device(parallel.host_device()):
                params = load_params(reader, cfg, spec_for(cfg.family), self.dtype, qdtype)
                self.params, self.param_specs = parallel.shard_params(params, cfg, self.layout)
        del params  # self.params holds the weights; the runner's layer stacking frees the per-layer arrays
        t_loaded = time.perf_counter()

        if not page_size:  # the kernels: the page size their tables are tuned at (rpa.report)
            from rpa.report import recommended_page_size

            page_size = 16 if self.ops.backend == "reference" else recommended_page_size(max_model_len)
        pages_per_seq = -(-max_model_len // page_size)
        if num_pages is None:
            num_pages = self._default_num_pages(page_size, kv_dtype, pages_per_seq, max_num_seqs,
                                                gpu_memory_utilization)
        if num_pages < pages_per_seq:
            raise ValueError(f"num_pages={num_pages} pages of {page_size} tokens cannot hold one sequence of "
                             f"max_model_len={max_model_len} ({pages_per_seq} pages needed)")
        max_num_seqs = min(max_num_seqs, max_num_batched_tokens)
        self.allocator = PageAllocator(num_pages, page_size, prefix_caching=prefix_caching)
        self.scheduler = Scheduler(self.allocator, max_num_seqs=max_num_seqs,
                                   max_num_batched_tokens=max_num_batched_tokens, max_model_len=max_model_len,
                                   buckets=token_buckets(max_num_batched_tokens))
        self.runner = ModelRunner(cfg, self.params, self.ops, page_size=page_size, num_pages=num_pages,
                                  max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                                  max_num_batched_tokens=max_num_batched_tokens, kv_dtype=kv_dtype,
                                  kv_scales=kv_scales, layout=self.layout, param_specs=self.param_specs,
                                  scan_layers=scan_layers,
                                  pooling=self.pooling.mode if self.task == "embed" else None)
        # structured output (engine.structured); one process only: the followers of a multi-process
        # engine would need the leader's token bitmask every step
        self.grammars = (GrammarCompiler(self.tokenizer.tok, cfg.vocab_size, self.tokenizer.eos_token_ids)
                         if structured_outputs and jax.process_count() == 1 and self.task == "generate" else None)
        self.params, self.param_specs = self.runner.params, self.runner.param_specs
        self.metrics = Metrics()
        self.lock = threading.RLock()
        self._seqs: dict[str, Sequence] = {}
        self._detok: dict[str, Detokenizer] = {}
        self._finished: dict[str, RequestOutput] = {}
        self._rng = random.Random(0)
        self.runner.plan_block_sizes()
        self.warmup_seconds = self.runner.warmup() if warmup else 0.0
        self.startup_seconds = time.perf_counter() - t_start
        log.info("engine ready: %s (%s) backend=%s [%s], dtype=%s, quantization=%s, kv cache %s: %d pages x %d "
                 "tokens; load %.1f s, start-up %.1f s, %d XLA compilations (%d from the persistent cache)",
                 cfg.architecture, self.model_dir, self.ops.backend,
                 "; ".join(f"{k}: {v}" for k, v in self.ops.sources.items()), self.dtype.name, qdtype,
                 kv_dtype.name, num_pages, page_size, t_loaded - t_start, self.startup_seconds,
                 self.runner.counter.compiles, self.runner.counter.persistent_cache_hits)

    def _default_num_pages(self, page_size, kv_dtype, pages_per_seq, max_num_seqs, utilization):
        local = self.config if self.layout is None else parallel.local_config(self.config, self.layout)
        per_page = self.config.num_layers * self.ops.kv_cache_bytes_per_page(  # per device: its KV heads
            page_size, local.num_kv_heads, self.config.head_dim, kv_dtype)
        device = jax.devices()[0] if self.layout is None else self.layout.mesh.devices.flat[0]
        try:
            stats = device.memory_stats()
        except Exception:  # noqa: BLE001 - CPU backends may not report memory
            stats = None
        if stats and stats.get("bytes_limit"):  # after the weights (this device's shard) are placed
            return kv_pages_that_fit(stats["bytes_limit"], stats.get("bytes_in_use", 0), utilization, per_page,
                                     pages_per_seq)
        return pages_per_seq * min(max_num_seqs, 8)

    # ------------------------------------------------------------------ requests
    def _prompt_ids(self, prompt, room: int = 1) -> list[int]:
        """A prompt's token ids, checked; `room`: positions it must leave free in max_model_len."""
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids = list(prompt)
        else:
            raise ValueError("prompt: expected a string or a list of token ids")
        if not ids:
            raise ValueError("prompt: empty")
        bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise ValueError(f"prompt: token ids {bad[:5]} outside the vocabulary [0, {self.config.vocab_size})")
        if len(ids) + room > self.max_model_len:
            raise ValueError(f"prompt: {len(ids)} tokens; this engine's max_model_len is {self.max_model_len}"
                             + (" (prompt plus at least one generated token)" if room else ""))
        return ids

    def add_request(self, prompt, params: SamplingParams | PoolingParams | None = None,
                    request_id: str | None = None) -> str:
        """Queue a request (a string or token ids); returns its id. ValueError for a bad request.
        params: SamplingParams (task "generate") or PoolingParams (task "embed"); None: the defaults."""
        if self.task == "embed":
            return self._add_embed_request(prompt, params or PoolingParams(), request_id)
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params: this engine generates text (task 'generate'); expected SamplingParams, got "
                             f"{type(params).__name__}")
        ids = self._prompt_ids(prompt)
        if params.top_k > self.config.vocab_size:
            raise ValueError(f"top_k={params.top_k} exceeds the vocabulary size {self.config.vocab_size} "
                             "(-1 or 0 turn top-k off)")
        if params.logit_bias and max(params.logit_bias) >= self.config.vocab_size:
            raise ValueError(f"logit_bias: token {max(params.logit_bias)} is outside the vocabulary "
                             f"(size {self.config.vocab_size})")
        matcher = None
        if params.grammar is not None:
            if self.grammars is None:
                raise ValueError("grammar: structured output is off in this engine (LLM(structured_outputs=True), "
                                 "one process)")
            matcher = self.grammars.matcher(params.grammar)  # ValueError: a grammar llguidance refuses
        return self._enqueue(request_id, ids, params, params.seed, matcher, Detokenizer(self.tokenizer, params.stop))

    def _enqueue(self, request_id: str | None, ids: list[int], params, seed: int | None, matcher=None,
                 detok: Detokenizer | None = None) -> str:
        """Queue a checked request under its id (new unless given; seed None: the engine's own draw);
        returns the id."""
        rid = request_id or uuid.uuid4().hex
        with self.lock:
            if rid in self._seqs:
                raise ValueError(f"request id {rid!r} already in use")
            if seed is None:
                seed = self._rng.getrandbits(32)
            seq = Sequence(rid, ids, params, seed, arrival=time.monotonic(), matcher=matcher)
            self._seqs[rid] = seq
            if detok is not None:
                self._detok[rid] = detok
            self.scheduler.add(seq)
            self.metrics.prompt_tokens += len(ids)
        return rid

    def _add_embed_request(self, prompt, params: PoolingParams, request_id: str | None) -> str:
        if not isinstance(params, PoolingParams):
            raise ValueError(f"params: this engine serves embeddings (task 'embed'); expected PoolingParams, got "
                             f"{type(params).__name__}")
        ids = self._prompt_ids(prompt, room=0)
        budget = self.scheduler.max_num_batched_tokens
        if len(ids) > budget:  # computed whole, in one step
            raise ValueError(f"prompt: {len(ids)} tokens; an embedding input is computed in one step of at most "
                             f"max_num_batched_tokens={budget} tokens")
        if params.dimensions is not None and params.dimensions > self.config.hidden_size:
            raise ValueError(f"dimensions: {params.dimensions} exceeds the model's {self.config.hidden_size}")
        return self._enqueue(request_id, ids, params, 0)

    def abort(self, request_id: str) -> bool:
        """Drop a request now, freeing its pages; False when it is unknown or already finished."""
        with self.lock:
            seq = self._seqs.pop(request_id, None)
            if seq is None:
                return False
            self.scheduler.free(seq)
            seq.status, seq.finish_reason = Status.FINISHED, "abort"
            self._detok.pop(request_id, None)
            self.metrics.requests_aborted += 1
            return True

    def has_unfinished(self) -> bool:
        with self.lock:
            return self.scheduler.has_work()

    # ------------------------------------------------------------------ one step
    def step(self) -> list[StepOutput]:
        with self.lock:
            plan = self.scheduler.schedule()
            if not plan.scheduled:
                return []
            if self.task == "embed":
                return self._embed_step(plan)
            tokens, logprobs, top = self.runner.execute(plan)
            now = time.monotonic()
            outs = []
            for i, (item, tok, lp) in enumerate(zip(plan.scheduled, tokens.tolist(), logprobs.tolist())):
                seq = item.seq
                self.scheduler.advance(item)
                if not item.samples:
                    continue
                seq.output_ids.append(int(tok))
                seq.output_logprobs.append(float(lp))
                alternatives = []
                if seq.params.top_logprobs and top is not None:
                    k = seq.params.top_logprobs
                    alternatives = [list(zip(top[0][i, :k].tolist(), top[1][i, :k].tolist()))]
                    seq.output_top_logprobs += alternatives
                if seq.first_token_time is None:
                    seq.first_token_time = now
                    self.metrics.ttft.observe(now - seq.arrival)
                reason = self._finish_reason(seq, int(tok))
                error = None
                if seq.matcher is not None:
                    seq.matcher.consume_token(int(tok))
                    if seq.matcher.is_error():  # the bitmask should never allow it: fail, never a silent stop
                        reason, error = "error", f"structured output: {seq.matcher.get_error()}"
                        log.error("request %s: %s", seq.request_id, error)
                    elif seq.matcher.is_stopped():  # the grammar is complete
                        reason = reason or "stop"
                detok = self._detok[seq.request_id]
                delta = detok.update(self._visible(seq), final=reason is not None)
                if detok.stopped and reason is None:
                    reason = "stop"
                    delta += detok.update(self._visible(seq), final=True)
                self.metrics.on_tokens(1)
                if reason is not None:
                    self._finish(seq, reason, now)
                outs.append(StepOutput(seq.request_id, [int(tok)], [float(lp)], delta, reason, alternatives,
                                       error=error))
            return outs

    def _embed_step(self, plan) -> list[StepOutput]:
        """One step of whole embedding inputs: each finishes now, its pages freed."""
        pooled = self.runner.execute_embed(plan)
        outs = []
        for item, row in zip(plan.scheduled, pooled):
            seq = item.seq
            self.scheduler.advance(item)
            vec = finish_embedding(row, seq.params, self.pooling)
            self._retire(seq, "stop")
            self._finished[seq.request_id] = EmbeddingOutput(seq.request_id, seq.prompt_ids, vec)
            outs.append(StepOutput(seq.request_id, [], [], "", "stop", embedding=vec))
        return outs

    def _visible(self, seq: Sequence) -> list[int]:
        """Output ids that make up the text (a final eos / stop token is not shown)."""
        ids = seq.output_ids
        if ids and seq.finish_reason is None and self._is_stop_token(seq, ids[-1]):
            return ids[:-1]
        return ids

    def _is_stop_token(self, seq: Sequence, tok: int) -> bool:
        return tok in seq.params.stop_token_ids or (not seq.params.ignore_eos and tok in self.tokenizer.eos_token_ids)

    def _finish_reason(self, seq: Sequence, tok: int) -> str | None:
        if self._is_stop_token(seq, tok):
            return "stop"
        if len(seq.output_ids) >= seq.params.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    def _retire(self, seq: Sequence, reason: str) -> None:
        """A finished sequence leaves the engine: its pages freed, counted."""
        seq.status, seq.finish_reason = Status.FINISHED, reason
        self.scheduler.free(seq)
        self._seqs.pop(seq.request_id, None)
        self.metrics.requests_finished += 1

    def _finish(self, seq: Sequence, reason: str, now: float) -> None:
        self._retire(seq, reason)
        n = len(seq.output_ids)
        if n > 1 and seq.first_token_time is not None:
            self.metrics.tpot.observe((now - seq.first_token_time) / (n - 1))
        detok = self._detok.pop(seq.request_id)
        self._finished[seq.request_id] = RequestOutput(
            seq.request_id, seq.prompt_ids, list(seq.output_ids), detok.text, list(seq.output_logprobs), reason,
            seq.num_cached_tokens, seq.num_preemptions, list(seq.output_top_logprobs))

    def pop_finished(self, request_id: str) -> RequestOutput | EmbeddingOutput | None:
        with self.lock:
            return self._finished.pop(request_id, None)

    # ------------------------------------------------------------------ batch API
    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 ) -> list[RequestOutput]:
        """Run prompts (strings or token-id lists) to completion; outputs in the prompts' order."""
        return self._run_all(prompts, sampling_params)

    def _run_all(self, prompts, params) -> list:
        """Queue prompts (one, or a list; params one for all or a list) and step until all finish;
        their outputs in order."""
        single = isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int))
        if single:
            prompts = [prompts]
        params = params if isinstance(params, list) else [params] * len(prompts)
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, params)]
        while self.has_unfinished():
            self.step()
        return [self.pop_finished(i) for i in ids]

    def embed(self, prompts, params: PoolingParams | None = None) -> list[EmbeddingOutput]:
        """Embed inputs (strings or token-id lists; task "embed"); outputs in the inputs' order."""
        if self.task != "embed":
            raise ValueError("embed(): this engine generates text (task 'generate'); load an embedding checkpoint "
                             "or pass task='embed'")
        return self._run_all(prompts, params)

    # ------------------------------------------------------------------ several processes
    def follow(self) -> int:
        """A follower process (process_id > 0): run the leader's steps until it shuts down; returns
        the steps run. Raises RuntimeError when the processes sampled different tokens."""
        steps = self.runner.follow()
        self._agree()
        jax.distributed.shutdown()  # with the leader's (a barrier): neither outlives the other's service
        return steps

    def shutdown(self) -> None:
        """The leader: stop the followers, check that every process sampled the same tokens
        (RuntimeError if not) and leave jax.distributed (the engine cannot step after it). A no-op
        with one process."""
        channel = self.runner.channel
        if channel is None or not channel.leader:
            return
        channel.stop()
        self._agree()
        jax.distributed.shutdown()

    def _agree(self) -> None:
        channel = self.runner.channel
        sums = channel.agree()
        if len(set(sums)) != 1:
            raise RuntimeError(f"the processes sampled different tokens over {channel.steps} steps "
                               f"(checksums by process: {sums})")
        log.info("process %d: %d steps; all %d processes sampled identical tokens (crc32 %08x)",
                 jax.process_index(), channel.steps, len(sums), sums[0])

    # ------------------------------------------------------------------ statistics
    def stats(self) -> dict:
        r, s, a = self.runner, self.scheduler, self.allocator
        return dict(running=len(s.running), waiting=len(s.waiting), kv_pages_in_use=a.num_used,
                    kv_pages_total=a.num_pages, prefix_cache_hit_rate=s.prefix_hit_rate,
                    preemptions=s.num_preemptions, chunked_prefills=s.num_chunked, steps=r.steps,
                    padding_waste=r.padding_waste,
                    compiles_after_warmup=r.compiles_after_warmup, token_buckets=list(r.buckets),
                    table_lookups=r.table_summary, startup_seconds=self.startup_seconds,
                    warmup_seconds=self.warmup_seconds)


def _resolve_task(model_dir, cfg, task: str, pooling: str | None):
    """(task, engine.pooling.PoolingConfig) of an engine: see LLM.__init__'s task and pooling."""
    if task not in ("auto", "generate", "embed"):
        raise ValueError(f"task: expected 'auto', 'generate' or 'embed', got {task!r}")
    if pooling is not None and pooling not in POOLING_MODES:
        raise ValueError(f"pooling: expected one of {', '.join(POOLING_MODES)}, got {pooling!r}")
    declared = load_pooling(model_dir)
    if task == "auto":
        task = "embed" if declared.declared or not cfg.is_causal or pooling is not None else "generate"
    if task == "generate" and not cfg.is_causal:
        raise ValueError(f"task='generate': {model_dir} is a bidirectional encoder (config.json is_causal: false); "
                         "it serves embeddings (task='embed')")
    if task == "generate" and pooling is not None:
        raise ValueError("pooling: only an embedding model (task='embed') pools")
    return task, dataclasses.replace(declared, mode=pooling or declared.mode)


def kv_pages_that_fit(bytes_limit: int, bytes_in_use: int, utilization: float, bytes_per_page: int,
                      pages_per_seq: int) -> int:
    """KV pages one device holds next to what is already on it (its shard of the weights).

    Args:
      bytes_limit, bytes_in_use: the device's memory_stats().
      utilization: the share of bytes_limit the engine may use (gpu_memory_utilization).
      bytes_per_page: one page of every layer's cache on this device (its KV heads).
      pages_per_seq: pages of one max_model_len sequence.
    Returns:
      The page count.
    Raises:
      ValueError: not even one sequence fits; the message gives the figures.
    """
    free = bytes_limit * utilization - bytes_in_use
    pages = int(free // bytes_per_page)
    if pages < pages_per_seq:
        gib = 2.0**30
        raise ValueError(
            f"the model does not fit: {bytes_in_use / gib:.2f} GiB in use per device after loading the weights, of "
            f"{bytes_limit / gib:.2f} GiB x gpu_memory_utilization {utilization} = {bytes_limit * utilization / gib:.2f} "
            f"GiB; one max_model_len sequence needs {pages_per_seq} KV pages of {bytes_per_page / 2**20:.2f} MiB per "
            f"device ({pages_per_seq * bytes_per_page / gib:.2f} GiB), {max(free, 0) / gib:.2f} GiB are left "
            "(raise tensor_parallel_size, quantize, or lower max_model_len)")
    return pages


def enable_compile_cache(path) -> None:
    """jax's persistent compilation cache in `path` (every executable is cached, however quick)."""
    from jax.experimental.compilation_cache import compilation_cache as cc

    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    cache_log = logging.getLogger("jax._src.compilation_cache")
    level = cache_log.level
    cache_log.setLevel(logging.WARNING)  # its "Resetting cache" INFO line is noise on the console
    try:
        cc.reset_cache()
    finally:
        cache_log.setLevel(level)


__all__ = ["LLM", "EmbeddingOutput", "PoolingParams", "RequestOutput", "SamplingParams", "StepOutput",
           "CheckpointError"]
