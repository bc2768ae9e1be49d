"""The compiled serving step: bucketed static shapes, all compiled at start-up, compilations counted.

A step's T tokens are padded to a token bucket and its sequences to S = min(bucket, max_num_seqs)
rows; the kernels treat rows past num_seqs and tokens past cu_q_lens[num_seqs] as padding, so one
executable per token bucket serves every batch mix that fits it (token_buckets: 14 programs for a
2048-token budget, and 2 sampler programs, compiled concurrently at start-up). An embedding model's
runner (pooling set) compiles the steps alone: each returns the pooled hidden states, nothing is sampled.
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from engine import distributed, kernel_tables, layer_groups, parallel, structured
from engine.compile_counter import counter
from engine.config import ModelConfig, rope_inv_freq
from engine.models.decoder import forward
from engine.ops import Ops
from engine.sampler import LOGIT_BIAS_ENTRIES, sample_step
from engine.scheduler import StepPlan

log = logging.getLogger("engine")


# 24 and 40 left out: a decode step of 17-24 or 33-40 sequences pads to 32 or 48 rows, nearly free
# next to reading the weights; the padding on bench serve's datasets stays under 9% (6.3% with
# them), for two programs fewer to compile (~5 s of a cold start on this project's host)
SMALL_BUCKETS = (8, 16, 32, 48, 64, 80, 96, 128, 160, 192, 256)
# Row counts of the sampler programs below max_num_seqs (engine.runner.ModelRunner.sampler_rows):
# decode-sized steps of up to 64 sequences share one, the rest the max_num_seqs program.
SAMPLER_ROWS = (64,)


def token_buckets(max_tokens: int) -> list[int]:
    """The compiled steps' token counts: SMALL_BUCKETS below 256 (decode-sized steps: their count is
    the running sequences', padding them is nearly free next to reading the weights), then powers
    of two, then max_tokens. Prefill-sized steps fill a bucket exactly (the scheduler gives a
    chunk's excess back to the next step: engine.scheduler.Scheduler's buckets), so 2048 tokens
    take 14 programs; `python -m bench.padding` measures the padding on bench serve's datasets."""
    out = [b for b in SMALL_BUCKETS if b < max_tokens]
    b = 512
    while b < max_tokens:
        out.append(b)
        b *= 2
    out.append(max_tokens)
    return out


def bucket_for(n: int, buckets: list[int]) -> int:
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"{n} tokens exceed the largest bucket {buckets[-1]}")


class ModelRunner:
    def __init__(self, cfg: ModelConfig, params, ops: Ops, *, page_size: int, num_pages: int, max_model_len: int,
                 max_num_seqs: int, max_num_batched_tokens: int, kv_dtype, kv_scales=None,
                 layout: parallel.Layout | None = None, param_specs=None, materialize: bool = True,
                 scan_layers: bool = True, pooling: str | None = None):
        """layout / param_specs: tensor parallelism (engine/parallel.py: plan, shard_params), or None
        (one device). materialize=False keeps the caches abstract (ShapeDtypeStructs with their
        shardings): for compiling the step ahead of time on a compile-only mesh (engine/precompile.py).
        scan_layers: stack runs of identical layers and scan over them (engine/layer_groups.py; one
        compiled layer body per run, its caches one page pool); False unrolls every layer. The
        per-layer params passed in are consumed by the stacking (read self.params afterwards).
        pooling: an embedding model's pooling mode (engine.pooling.POOLING_MODES): each step returns
        its sequences' pooled hidden states (execute_embed) and no sampler program is compiled."""
        self.cfg, self.ops = cfg, ops
        self.pooling = pooling
        self.layout = layout
        if scan_layers:
            params, param_specs = layer_groups.stack(params, param_specs, None if layout is None else layout.mesh)
        self.params, self.param_specs = params, param_specs
        # layers per cache: a group's pool, or 1 per layer (unrolled)
        self.cache_layers = layer_groups.group_sizes(params) if scan_layers else [1] * cfg.num_layers
        # what one device's shard of the step sees (its heads); the model's config on one device
        self.local_cfg = cfg if layout is None else parallel.local_config(cfg, layout)
        # several processes: the leader's step inputs reach the others through this (engine/distributed.py)
        self.channel = distributed.StepChannel() if jax.process_count() > 1 else None
        self.page_size, self.num_pages = page_size, num_pages
        self.pages_per_seq = -(-max_model_len // page_size)
        self.max_num_seqs = max_num_seqs
        self.buckets = token_buckets(max_num_batched_tokens)
        self.kv_dtype = jnp.dtype(kv_dtype)
        self.kv_scales = kv_scales
        self.inv_freq = rope_inv_freq(cfg)
        self.counter = counter()
        # Committed to the device like the step's outputs, so warm-up compiles what serving runs.
        self.materialized = materialize
        self.caches = self._init_caches(num_pages, materialize)
        self.lookups: list[kernel_tables.Lookup] = []
        self._bs: dict[int, tuple] | None = None  # bucket -> (rpa, gmm) block sizes: plan_block_sizes
        self._fns: dict[int, object] = {}  # bucket -> the jitted step
        self._compiled: dict[int, object] = {}  # bucket -> its executable (compile_buckets)
        self.compile_seconds: dict[int, float] = {}
        # The sampler is a program of its own per row count (sampler_rows), shared by the buckets
        # with that count, instead of a copy compiled into every bucket's step.
        self._sampler = jax.jit(sample_step)
        self._compiled_samplers: dict[int, object] = {}  # rows -> its executable
        self.sampler_compile_seconds: dict[int, float] = {}
        self._any_token: dict[int, object] = {}  # rows -> an all-ones token bitmask kept on the device
        self.baseline_compiles: int | None = None
        # statistics
        self.steps = 0
        self.real_tokens = 0
        self.padded_tokens = 0
        self.step_seconds = 0.0

    def _init_caches(self, num_pages: int, materialize: bool = True):
        """Every layer's zeroed cache (one page pool of count x num_pages pages per layer group when
        the layers are scanned): on the device, or per device of the mesh (a leading mesh axis
        holding each device's KV heads); or their ShapeDtypeStructs (materialize=False)."""
        cfg, layout = self.local_cfg, self.layout

        def pool(count):
            return self.ops.init_kv_cache(count * num_pages, self.page_size, cfg.num_kv_heads, cfg.head_dim,
                                          self.kv_dtype)

        if layout is None:
            if not materialize:
                return [jax.eval_shape(functools.partial(pool, n)) for n in self.cache_layers]
            return jax.device_put([pool(n) for n in self.cache_layers], jax.devices()[0])
        sharding = NamedSharding(layout.mesh, P(parallel.AXES))
        if not materialize:
            return [jax.tree.map(lambda a: jax.ShapeDtypeStruct((layout.size, *a.shape), a.dtype, sharding=sharding),
                                 jax.eval_shape(functools.partial(pool, n))) for n in self.cache_layers]
        caches = []
        for n in self.cache_layers:
            shapes = jax.eval_shape(functools.partial(pool, n))
            make = jax.jit(lambda shapes=shapes: jax.tree.map(lambda a: jnp.zeros((layout.size, *a.shape), a.dtype),
                                                             shapes),
                           out_shardings=jax.tree.map(lambda _: sharding, shapes))
            caches.append(make())
        return caches

    # ------------------------------------------------------------------ kernels' block sizes
    def plan_block_sizes(self) -> None:
        """Look up every bucket's kernel block sizes (kept for the "pallas" / "interpret" backends)."""
        from autotune import detect

        gen = detect()  # the device, or the compile-only mesh in scope
        dtype = self.params["embed"].dtype
        if "layer_groups" in self.params:  # one layer's shapes (abstract: no device copy)
            layers = [jax.eval_shape(lambda g: jax.tree.map(lambda a: a[0], g), g) for g in self.params["layer_groups"]]
        else:
            layers = self.params["layers"]
        moe_layer = next((lay for lay in layers if "router" in lay), None)
        self._bs = {}
        for b in self.buckets:
            lk = kernel_tables.rpa_lookup(b, q_dtype=dtype, kv_dtype=self.kv_dtype,  # one device's heads
                                          num_q_heads=self.local_cfg.num_heads,
                                          num_kv_heads=self.local_cfg.num_kv_heads, head_dim=self.cfg.head_dim,
                                          page_size=self.page_size, max_model_len=self.pages_per_seq * self.page_size,
                                          generation=gen)
            self.lookups.append(lk)
            moe_bs = None
            if moe_layer is not None:
                shards = (1, 1) if self.layout is None else (self.layout.experts, self.layout.inner)
                mk = kernel_tables.moe_lookups(b, dtype, moe_layer["w_gate_up"], moe_layer["w_down"],
                                               self.cfg.num_experts_per_tok, gen, shards=shards)
                self.lookups.append(mk)
                moe_bs = mk.block_sizes
            self._bs[b] = (lk.block_sizes or None, moe_bs) if self.ops.uses_kernels else (None, None)
        self.table_summary = kernel_tables.summarize(self.lookups, gen)
        log.info("kernel tables: %s", self.table_summary)

    # ------------------------------------------------------------------ compiled steps
    def _seqs(self, bucket: int) -> int:
        return min(bucket, self.max_num_seqs)

    def sampler_rows(self, bucket: int) -> int:
        """Rows of the logits a bucket's step returns and its sampler program takes: its sequences
        padded to SAMPLER_ROWS (or max_num_seqs), so a few sampler programs serve every bucket. The
        padding rows cost the lm_head a few more rows of a matmul that reads its whole weight anyway."""
        seqs = self._seqs(bucket)
        return next((r for r in SAMPLER_ROWS if seqs <= r < self.max_num_seqs), self.max_num_seqs)

    @property
    def sampler_sizes(self) -> list[int]:
        """The sampler programs' row counts, one per distinct sampler_rows of the buckets (none for an
        embedding model)."""
        return sorted(self._sampler_rows_of(self.buckets))

    def _sampler_rows_of(self, buckets) -> list[int]:
        """The distinct sampler_rows of `buckets`, descending (none for an embedding model)."""
        return [] if self.pooling is not None else sorted({self.sampler_rows(b) for b in buckets}, reverse=True)

    def _step_fn(self, bucket: int):
        fn = self._fns.get(bucket)
        if fn is None:
            attn_bs, moe_bs = (self._bs or {}).get(bucket, (None, None))
            layout = self.layout
            fwd = functools.partial(forward, cfg=self.local_cfg, ops=self.ops, inv_freq=self.inv_freq,
                                    kv_scales=self.kv_scales, attn_block_sizes=attn_bs, moe_block_sizes=moe_bs,
                                    pooling=self.pooling)
            if layout is not None:
                fwd = functools.partial(fwd, par=parallel.MeshCollectives(layout))

            def step(params, caches, batch):
                if layout is not None:  # one device's shard: its weights, its cache
                    params = parallel.local_params(params)
                    caches = jax.tree.map(lambda a: a[0], caches)
                logits, caches = fwd(params, caches, batch)
                if layout is not None:
                    caches = jax.tree.map(lambda a: a[None], caches)
                return logits, caches

            if layout is not None:
                cache_specs = jax.tree.map(lambda _: P(parallel.AXES), self.caches)
                step = parallel.shard_map(step, layout.mesh, in_specs=(self.param_specs, cache_specs, P()),
                                          out_specs=(P(), cache_specs))
            fn = jax.jit(step, donate_argnums=(1,))
            self._fns[bucket] = fn
        return fn

    def _any_token_mask(self, rows: int):
        """The bitmask of steps without structured output: every token allowed, made once on the
        device (no per-step copy of its rows x structured.mask_words words)."""
        mask = self._any_token.get(rows)
        if mask is None:
            make = jax.jit(lambda: structured.any_token_mask(rows, self.cfg.vocab_size, jnp),
                           out_shardings=self._replicated())
            mask = self._any_token[rows] = make()
        return mask

    def _empty_inputs(self, t: int, s: int, rows: int | None = None):
        """A step's inputs for t tokens of s sequences, the logits taken at `rows` rows (default s)."""
        rows = s if rows is None else rows
        batch = dict(token_ids=np.zeros(t, np.int32), positions=np.zeros(t, np.int32),
                     kv_lens=np.zeros(s, np.int32), page_indices=np.zeros((s, self.pages_per_seq), np.int32),
                     cu_q_lens=np.zeros(s + 1, np.int32), distribution=np.zeros(3, np.int32),
                     logits_indices=np.zeros(rows, np.int32))
        samp = dict(temperature=np.zeros(rows, np.float32), top_k=np.zeros(rows, np.int32),
                    top_p=np.ones(rows, np.float32), seeds=np.zeros(rows, np.uint32),
                    counters=np.zeros(rows, np.int32), bias_rows=np.zeros(LOGIT_BIAS_ENTRIES, np.int32),
                    bias_ids=np.zeros(LOGIT_BIAS_ENTRIES, np.int32),
                    bias_values=np.zeros(LOGIT_BIAS_ENTRIES, np.float32), any_filter=np.bool_(False),
                    any_top=np.bool_(False), any_bias=np.bool_(False), any_mask=np.bool_(False))
        return batch, samp

    def compile_buckets(self, buckets: list[int] | None = None, workers: int | None = None,
                        progress=None) -> dict[int, float]:
        """Lower every bucket's step (serially: tracing holds the GIL), each compiled in a thread pool
        as soon as it is lowered, largest first (XLA's compiler releases the GIL); the executables
        serve the steps.

        Args:
          buckets: the buckets to compile (default: all), each with the sampler program of its rows
            (sampler_rows) unless already compiled.
          workers: compile threads (default: one per CPU core, at most one per program).
          progress: called with (bucket, seconds) as each step compiles and ("sampler", rows,
            seconds) as each sampler program does, or None.
        Returns:
          {bucket: seconds its compile took (wall, overlapping the others')}.
        """
        _import_config_modules()
        if self._bs is None:
            self.plan_block_sizes()
        order = sorted(buckets or self.buckets, reverse=True)
        samplers = [r for r in self._sampler_rows_of(order) if r not in self._compiled_samplers]

        def one(key, low):
            t0 = time.perf_counter()
            return key, low.compile(), time.perf_counter() - t0

        logits_info = {}  # rows -> the logits a lowered step returns (what its sampler takes)

        def lower(key):
            kind, n = key
            if kind == "sampler":
                bucket = next(b for b in order if self.sampler_rows(b) == n)
                return self._sampler.lower(logits_info[n], self._lowering_inputs(bucket, sampler=True)[1])
            low = self._step_fn(n).lower(self.params, self.caches, self._lowering_inputs(n)[0])
            info = low.out_info[0]
            logits_info[self.sampler_rows(n)] = jax.ShapeDtypeStruct(info.shape, info.dtype,
                                                                     sharding=self._replicated())
            return low

        workers = workers or min(len(order) + len(samplers), os.cpu_count() or 1)
        with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
            # each program's compile starts as soon as it is lowered: lowering the next overlaps it
            futures = [pool.submit(one, key, lower(key))
                       for key in [("step", b) for b in order] + [("sampler", r) for r in samplers]]
            for fut in futures:
                (kind, n), compiled, secs = fut.result()
                if kind == "sampler":
                    self._compiled_samplers[n] = compiled
                    self.sampler_compile_seconds[n] = secs
                    if progress is not None:
                        progress("sampler", n, secs)
                    continue
                self._compiled[n] = compiled
                self.compile_seconds[n] = secs
                if progress is not None:
                    progress(n, secs)
        return dict(self.compile_seconds)

    def _replicated(self):
        """The sharding of a replicated value on the step's mesh (None on one device)."""
        return None if self.layout is None else NamedSharding(self.layout.mesh, P())

    def warmup(self) -> float:
        """Compile (or load from the persistent cache) every bucket's step, then run each once;
        returns the seconds taken."""
        t0 = time.perf_counter()
        before = self.counter.compiles
        self.compile_buckets()
        log.info("compile seconds per bucket (concurrent): %s; sampler programs (rows: seconds): %s",
                 ", ".join(f"{b}: {self.compile_seconds[b]:.1f}" for b in self.buckets),
                 ", ".join(f"{r}: {t:.1f}" for r, t in sorted(self.sampler_compile_seconds.items())))
        for b in self.buckets:  # every process, in the same order (the step's collectives pair them up)
            batch, samp = self._inputs_for(b)
            if self.channel is not None:  # the channel's own collectives compile here too
                if self.channel.leader:
                    self.channel.send(b, batch, samp)
                else:
                    _, batch, samp = self.channel.receive(self._inputs_for)
            self._run(b, batch, samp)
        jax.block_until_ready(self.caches)
        self.baseline_compiles = self.counter.compiles
        secs = time.perf_counter() - t0
        log.info("warm-up: %d buckets %s compiled in %.1f s (%d XLA compilations, %d from the persistent cache)",
                 len(self.buckets), self.buckets, secs, self.counter.compiles - before,
                 self.counter.persistent_cache_hits)
        return secs

    @property
    def compiles_after_warmup(self) -> int:
        if self.baseline_compiles is None:
            return 0
        return self.counter.compiles - self.baseline_compiles

    def _step_inputs(self, plan: StepPlan, first_token: bool = False) -> tuple[int, dict, dict]:
        """(bucket, batch, sampling inputs) of plan.scheduled with the batch filled: tokens, positions
        and attention metadata, logits_indices at each sequence's last new token (its first with
        first_token: "cls" pooling). The sampling inputs are the bucket's empty ones."""
        items = plan.scheduled
        t = bucket_for(plan.num_tokens, self.buckets)
        batch, samp = self._inputs_for(t)
        off = 0
        for i, it in enumerate(items):
            seq = it.seq
            end = it.start + it.num_new
            batch["token_ids"][off:off + it.num_new] = seq.all_ids[it.start:end]
            batch["positions"][off:off + it.num_new] = np.arange(it.start, end)
            batch["kv_lens"][i] = end
            batch["page_indices"][i, :len(seq.pages)] = seq.pages
            batch["logits_indices"][i] = off if first_token else off + it.num_new - 1
            off += it.num_new
            batch["cu_q_lens"][i + 1] = off
        batch["cu_q_lens"][len(items) + 1:] = off
        batch["distribution"][:] = (plan.num_decodes, len(items), len(items))
        return t, batch, samp

    def _account(self, bucket: int, num_tokens: int, seconds: float) -> None:
        """One step's statistics (steps, padding, time)."""
        self.step_seconds += seconds
        self.steps += 1
        self.real_tokens += num_tokens
        self.padded_tokens += bucket

    def execute_embed(self, plan: StepPlan) -> np.ndarray:
        """Run one step of embedding inputs (each whole: engine.scheduler); returns the float32 pooled
        hidden states [n, hidden] of plan.scheduled."""
        # the pooled token of "last" and "cls" ("mean" reads cu_q_lens)
        t, batch, samp = self._step_inputs(plan, first_token=self.pooling == "cls")
        t0 = time.perf_counter()
        pooled = self._run(t, batch, samp)
        self._account(t, plan.num_tokens, time.perf_counter() - t0)
        return pooled[:len(plan.scheduled)]

    def execute(self, plan: StepPlan):
        """Run one scheduled step; returns host (tokens i32 [n], logprobs f32 [n], alternatives) for
        plan.scheduled, the alternatives (ids i32 [n, TOP_LOGPROBS], log-probabilities f32 [n,
        TOP_LOGPROBS]) when a request in the step asked for them, else None."""
        items = plan.scheduled
        t, batch, samp = self._step_inputs(plan)
        any_filter = any_top = False
        n_bias = 0
        matched = []  # (row, llguidance matcher) of the structured-output rows that sample
        for i, it in enumerate(items):
            seq = it.seq
            p = seq.params
            samp["temperature"][i] = p.temperature
            samp["top_k"][i] = p.top_k
            samp["top_p"][i] = p.top_p
            samp["seeds"][i] = seq.seed & 0xFFFFFFFF
            samp["counters"][i] = len(seq.output_ids)
            any_filter |= p.filters
            any_top |= p.top_logprobs > 0
            if seq.matcher is not None and it.samples:
                matched.append((i, seq.matcher))
            if p.logit_bias:  # the scheduler admits no more than the step's entries hold
                k = len(p.logit_bias)
                samp["bias_rows"][n_bias:n_bias + k] = i
                samp["bias_ids"][n_bias:n_bias + k] = list(p.logit_bias)
                samp["bias_values"][n_bias:n_bias + k] = list(p.logit_bias.values())
                n_bias += k
        samp["any_filter"] = np.bool_(any_filter)
        samp["any_top"] = np.bool_(any_top)
        samp["any_bias"] = np.bool_(n_bias > 0)
        t0 = time.perf_counter()
        if self.channel is not None:
            self.channel.send(t, batch, samp)
        token_mask = None
        if matched:
            def token_mask(rows: int) -> np.ndarray:
                mask = structured.any_token_mask(rows, self.cfg.vocab_size)  # rows without a grammar: any token
                for row, matcher in matched:
                    structured.fill_row(matcher, mask, row)
                return mask

        tokens, logprobs, top = self._run(t, batch, samp, token_mask)
        if self.channel is not None:
            self.channel.record(tokens)
        self._account(t, plan.num_tokens, time.perf_counter() - t0)
        n = len(items)
        return tokens[:n], logprobs[:n], (None if top is None else (top[0][:n], top[1][:n]))

    def _lowering_inputs(self, bucket: int, sampler: bool = False) -> tuple:
        """Inputs to lower the step with: as it takes them, or abstract (replicated on the mesh) when
        the caches are (materialize=False: a compile-only mesh); sampler: the sampler's, its token
        bitmask included."""
        batch, samp = self._inputs_for(bucket)
        if sampler:
            samp["token_mask"] = structured.any_token_mask(len(samp["top_p"]), self.cfg.vocab_size)
        if self.layout is not None and not self.materialized:
            rep = self._replicated()
            return jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype, sharding=rep),
                                (batch, samp))
        return self._device_inputs(batch, samp)

    def _device_inputs(self, batch: dict, samp: dict) -> tuple:
        """The step's inputs as it takes them: host arrays, or with several processes global arrays
        of the same host values."""
        if self.layout is not None and jax.process_count() > 1:
            return parallel.replicate((batch, samp), self.layout.mesh)
        return batch, samp

    def _inputs_for(self, bucket: int):
        return self._empty_inputs(bucket, self._seqs(bucket), self.sampler_rows(bucket))

    def _run(self, bucket: int, batch: dict, samp: dict, token_mask=None) -> tuple[np.ndarray, np.ndarray,
                                                                                tuple | None]:
        """One compiled step, then its sampler program (dispatched without waiting for the step);
        host (tokens, logprobs, (top ids, top log-probabilities) or None) of every row (the
        alternatives are read back only when a row asked for them). An embedding model's runner:
        the step alone, its host float32 pooled hidden states [rows, hidden].

        token_mask: None, or a function of the sampler's rows giving the step's token bitmask (int32
        [rows, mask_words]); it runs on the host while the device runs the step, and the sampler
        applies it (None: the device's all-ones mask, skipped)."""
        rows = self.sampler_rows(bucket)
        any_top = bool(samp["any_top"])
        step = self._compiled.get(bucket) or self._step_fn(bucket)
        device_batch, _ = self._device_inputs(batch, {})
        logits, self.caches = step(self.params, self.caches, device_batch)
        if self.pooling is not None:  # an embedding model: the pooled hidden states
            return np.asarray(logits)
        if token_mask is not None:  # the device is busy with the step meanwhile
            samp = dict(samp, token_mask=token_mask(rows), any_mask=np.bool_(True))
        _, samp = self._device_inputs({}, samp)
        if token_mask is None:
            samp = dict(samp, token_mask=self._any_token_mask(rows))
        sampler = self._compiled_samplers.get(rows) or self._sampler
        tokens, logprobs, top_ids, top_lps = sampler(logits, samp)
        top = (np.asarray(top_ids), np.asarray(top_lps)) if any_top else None
        return np.asarray(tokens), np.asarray(logprobs), top

    def follow(self) -> int:
        """A follower process: run the steps the leader sends until it stops; returns the steps run."""
        if self.channel is None or self.channel.leader:
            raise RuntimeError("follow() is for the follower processes of a multi-process engine")
        while (step := self.channel.receive(self._inputs_for)) is not None:
            bucket, batch, samp = step
            tokens = self._run(bucket, batch, samp)[0]
            self.channel.record(tokens)
        return self.channel.steps

    @property
    def padding_waste(self) -> float:
        """Fraction of computed token slots that were padding."""
        return 1.0 - self.real_tokens / self.padded_tokens if self.padded_tokens else 0.0


def _import_config_modules() -> None:
    """Import the jax modules that register jit-relevant config options before compiling anything.

    Importing one later (jax.experimental.pallas registers options that enter every jit cache key)
    changes the tracing context, and every step would be traced and compiled again.
    """
    try:
        import jax.experimental.pallas  # noqa: F401
        from jax.experimental.pallas import tpu  # noqa: F401
    except ImportError:
        pass
