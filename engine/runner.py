"""The compiled serving step: bucketed static shapes, all compiled at start-up, compilations counted.

A step's T tokens are padded to a token bucket and its sequences to S = min(bucket, max_num_seqs)
rows; the kernels treat rows past num_seqs and tokens past cu_q_lens[num_seqs] as padding, so one
executable per token bucket serves every batch mix that fits it (token_buckets: 16 programs for a
2048-token budget, compiled concurrently at start-up).
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

from engine import distributed, kernel_tables, layer_groups, parallel
from engine.compile_counter import counter
from engine.config import ModelConfig, rope_inv_freq
from engine.models.decoder import forward
from engine.ops import Ops
from engine.sampler import sample
from engine.scheduler import StepPlan

log = logging.getLogger("engine")


SMALL_BUCKETS = (8, 16, 24, 32, 40, 48, 64, 80, 96, 128, 160, 192, 256)


def token_buckets(max_tokens: int) -> list[int]:
    """The compiled steps' token counts: SMALL_BUCKETS below 256 (decode-sized steps: their count is
    the running sequences', padding them is nearly free next to reading the weights), then powers
    of two, then max_tokens. Prefill-sized steps fill a bucket exactly (the scheduler gives a
    chunk's excess back to the next step: engine.scheduler.Scheduler's buckets), so 2048 tokens
    take 16 programs; `python -m bench.padding` measures the padding on bench serve's datasets."""
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
                 scan_layers: bool = True):
        """layout / param_specs: tensor parallelism (engine/parallel.py: plan, shard_params), or None
        (one device). materialize=False keeps the caches abstract (ShapeDtypeStructs with their
        shardings): for compiling the step ahead of time on a compile-only mesh (engine/precompile.py).
        scan_layers: stack runs of identical layers and scan over them (engine/layer_groups.py; one
        compiled layer body per run, its caches one page pool); False unrolls every layer. The
        per-layer params passed in are consumed by the stacking (read self.params afterwards)."""
        self.cfg, self.ops = cfg, ops
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

    def _step_fn(self, bucket: int):
        fn = self._fns.get(bucket)
        if fn is None:
            attn_bs, moe_bs = (self._bs or {}).get(bucket, (None, None))
            layout = self.layout
            fwd = functools.partial(forward, cfg=self.local_cfg, ops=self.ops, inv_freq=self.inv_freq,
                                    kv_scales=self.kv_scales, attn_block_sizes=attn_bs, moe_block_sizes=moe_bs)
            if layout is not None:
                fwd = functools.partial(fwd, par=parallel.MeshCollectives(layout))

            def step(params, caches, batch, samp):
                if layout is not None:  # one device's shard: its weights, its cache
                    params = parallel.local_params(params)
                    caches = jax.tree.map(lambda a: a[0], caches)
                logits, caches = fwd(params, caches, batch)
                tokens, logprobs = sample(logits, samp["temperature"], samp["top_k"], samp["top_p"], samp["seeds"],
                                          samp["counters"], samp["any_filter"])
                if layout is not None:
                    caches = jax.tree.map(lambda a: a[None], caches)
                return tokens, logprobs, caches

            if layout is not None:
                cache_specs = jax.tree.map(lambda _: P(parallel.AXES), self.caches)
                step = parallel.shard_map(step, layout.mesh, in_specs=(self.param_specs, cache_specs, P(), P()),
                                          out_specs=(P(), P(), cache_specs))
            fn = jax.jit(step, donate_argnums=(1,))
            self._fns[bucket] = fn
        return fn

    def _empty_inputs(self, t: int, s: int):
        batch = dict(token_ids=np.zeros(t, np.int32), positions=np.zeros(t, np.int32),
                     kv_lens=np.zeros(s, np.int32), page_indices=np.zeros((s, self.pages_per_seq), np.int32),
                     cu_q_lens=np.zeros(s + 1, np.int32), distribution=np.zeros(3, np.int32),
                     logits_indices=np.zeros(s, np.int32))
        samp = dict(temperature=np.zeros(s, np.float32), top_k=np.zeros(s, np.int32),
                    top_p=np.ones(s, np.float32), seeds=np.zeros(s, np.uint32), counters=np.zeros(s, np.int32),
                    any_filter=np.bool_(False))
        return batch, samp

    def compile_buckets(self, buckets: list[int] | None = None, workers: int | None = None,
                        progress=None) -> dict[int, float]:
        """Lower every bucket's step (serially: tracing holds the GIL), each compiled in a thread pool
        as soon as it is lowered, largest first (XLA's compiler releases the GIL); the executables
        serve the steps.

        Args:
          buckets: the buckets to compile (default: all).
          workers: compile threads (default: one per CPU core, at most one per bucket).
          progress: called with (bucket, seconds) as each compile finishes, or None.
        Returns:
          {bucket: seconds its compile took (wall, overlapping the others')}.
        """
        _import_config_modules()
        if self._bs is None:
            self.plan_block_sizes()
        order = sorted(buckets or self.buckets, reverse=True)

        def one(b, low):
            t0 = time.perf_counter()
            return b, low.compile(), time.perf_counter() - t0

        workers = workers or min(len(order), os.cpu_count() or 1)
        with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
            # each bucket's compile starts as soon as it is lowered: lowering the next overlaps it
            futures = [pool.submit(one, b, self._step_fn(b).lower(self.params, self.caches, *self._lowering_inputs(b)))
                       for b in order]
            for fut in futures:
                b, compiled, secs = fut.result()
                self._compiled[b] = compiled
                self.compile_seconds[b] = secs
                if progress is not None:
                    progress(b, secs)
        return dict(self.compile_seconds)

    def warmup(self) -> float:
        """Compile (or load from the persistent cache) every bucket's step, then run each once;
        returns the seconds taken."""
        t0 = time.perf_counter()
        before = self.counter.compiles
        self.compile_buckets()
        log.info("compile seconds per bucket (concurrent): %s",
                 ", ".join(f"{b}: {self.compile_seconds[b]:.1f}" for b in self.buckets))
        for b in self.buckets:  # every process, in the same order (the step's collectives pair them up)
            batch, samp = self._inputs_for(b)
            if self.channel is not None:  # the channel's own collectives compile here too
                if self.channel.leader:
                    self.channel.send(b, batch, samp)
                else:
                    _, batch, samp = self.channel.receive(self._inputs_for)
            tokens, _ = self._run(b, batch, samp)
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

    def execute(self, plan: StepPlan):
        """Run one scheduled step; returns host (tokens i32 [n], logprobs f32 [n]) for plan.scheduled."""
        items = plan.scheduled
        n_tok = plan.num_tokens
        t = bucket_for(n_tok, self.buckets)
        s = self._seqs(t)
        batch, samp = self._empty_inputs(t, s)
        off = 0
        any_filter = False
        for i, it in enumerate(items):
            seq = it.seq
            end = it.start + it.num_new
            batch["token_ids"][off:off + it.num_new] = seq.all_ids[it.start:end]
            batch["positions"][off:off + it.num_new] = np.arange(it.start, end)
            batch["kv_lens"][i] = end
            batch["page_indices"][i, :len(seq.pages)] = seq.pages
            off += it.num_new
            batch["cu_q_lens"][i + 1] = off
            batch["logits_indices"][i] = off - 1
            p = seq.params
            samp["temperature"][i] = p.temperature
            samp["top_k"][i] = p.top_k
            samp["top_p"][i] = p.top_p
            samp["seeds"][i] = seq.seed & 0xFFFFFFFF
            samp["counters"][i] = len(seq.output_ids)
            any_filter |= p.filters
        batch["cu_q_lens"][len(items) + 1:] = off
        n_dec = plan.num_decodes
        batch["distribution"][:] = (n_dec, len(items), len(items))
        samp["any_filter"] = np.bool_(any_filter)
        t0 = time.perf_counter()
        if self.channel is not None:
            self.channel.send(t, batch, samp)
        tokens, logprobs = self._run(t, batch, samp)
        if self.channel is not None:
            self.channel.record(tokens)
        self.step_seconds += time.perf_counter() - t0
        self.steps += 1
        self.real_tokens += n_tok
        self.padded_tokens += t
        return tokens[:len(items)], logprobs[:len(items)]

    def _lowering_inputs(self, bucket: int) -> tuple:
        """Inputs to lower the step with: as it takes them, or abstract (replicated on the mesh) when
        the caches are (materialize=False: a compile-only mesh)."""
        batch, samp = self._inputs_for(bucket)
        if self.layout is not None and not self.materialized:
            rep = NamedSharding(self.layout.mesh, P())
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
        return self._empty_inputs(bucket, self._seqs(bucket))

    def _run(self, bucket: int, batch: dict, samp: dict) -> tuple[np.ndarray, np.ndarray]:
        """One compiled step; host (tokens, logprobs) of every row."""
        fn = self._compiled.get(bucket) or self._step_fn(bucket)
        tokens, logprobs, self.caches = fn(self.params, self.caches, *self._device_inputs(batch, samp))
        return np.asarray(tokens), np.asarray(logprobs)

    def follow(self) -> int:
        """A follower process: run the steps the leader sends until it stops; returns the steps run."""
        if self.channel is None or self.channel.leader:
            raise RuntimeError("follow() is for the follower processes of a multi-process engine")
        while (step := self.channel.receive(self._inputs_for)) is not None:
            bucket, batch, samp = step
            tokens, _ = self._run(bucket, batch, samp)
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
