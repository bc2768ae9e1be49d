"""The compiled serving step: bucketed static shapes, all compiled at start-up, compilations counted.

A step's T tokens are padded to a token bucket and its sequences to S = min(bucket, max_num_seqs)
rows; the kernels treat rows past num_seqs and tokens past cu_q_lens[num_seqs] as padding, so one
executable per token bucket serves every batch mix that fits it. Buckets step by at most a quarter
(8, 16, 24, ..., 64, 80, 96, 112, 128, 160, 192, ...): padding 130 tokens costs 160, not 256.
"""

from __future__ import annotations

import functools
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np

from engine import kernel_tables
from engine.compile_counter import counter
from engine.config import ModelConfig, rope_inv_freq
from engine.models.decoder import forward
from engine.ops import Ops
from engine.sampler import sample
from engine.scheduler import StepPlan

log = logging.getLogger("engine")


def token_buckets(max_tokens: int, min_bucket: int = 8) -> list[int]:
    """Multiples of 8 from min_bucket to max_tokens, each at most 25% above the previous (and max_tokens)."""
    out, b = [], min_bucket
    while b < max_tokens:
        out.append(b)
        step = max(8, (1 << (b.bit_length() - 1)) // 4)
        b += step
    out.append(max_tokens)
    return out


def bucket_for(n: int, buckets: list[int]) -> int:
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"{n} tokens exceed the largest bucket {buckets[-1]}")


class ModelRunner:
    def __init__(self, cfg: ModelConfig, params, ops: Ops, *, page_size: int, num_pages: int, max_model_len: int,
                 max_num_seqs: int, max_num_batched_tokens: int, kv_dtype, kv_scales=None):
        self.cfg, self.params, self.ops = cfg, params, ops
        self.page_size, self.num_pages = page_size, num_pages
        self.pages_per_seq = -(-max_model_len // page_size)
        self.max_num_seqs = max_num_seqs
        self.buckets = token_buckets(max_num_batched_tokens)
        self.kv_dtype = jnp.dtype(kv_dtype)
        self.kv_scales = kv_scales
        self.inv_freq = rope_inv_freq(cfg)
        self.counter = counter()
        # Committed to the device like the step's outputs, so warm-up compiles what serving runs.
        self.caches = jax.device_put([ops.init_kv_cache(num_pages, page_size, cfg.num_kv_heads, cfg.head_dim,
                                                        self.kv_dtype) for _ in range(cfg.num_layers)],
                                     jax.devices()[0])
        self.lookups: list[kernel_tables.Lookup] = []
        self._bs: dict[int, tuple] | None = None  # bucket -> (rpa, gmm) block sizes: plan_block_sizes
        self._fns: dict[int, object] = {}
        self.baseline_compiles: int | None = None
        # statistics
        self.steps = 0
        self.real_tokens = 0
        self.padded_tokens = 0
        self.step_seconds = 0.0

    # ------------------------------------------------------------------ kernels' block sizes
    def plan_block_sizes(self) -> None:
        """Look up every bucket's kernel block sizes (kept for the "pallas" / "interpret" backends)."""
        from autotune import detect

        gen = detect()
        dtype = self.params["embed"].dtype
        moe_layer = next((lay for lay in self.params["layers"] if "router" in lay), None)
        self._bs = {}
        for b in self.buckets:
            lk = kernel_tables.rpa_lookup(b, q_dtype=dtype, kv_dtype=self.kv_dtype, num_q_heads=self.cfg.num_heads,
                                          num_kv_heads=self.cfg.num_kv_heads, head_dim=self.cfg.head_dim,
                                          page_size=self.page_size, max_model_len=self.pages_per_seq * self.page_size,
                                          generation=gen)
            self.lookups.append(lk)
            moe_bs = None
            if moe_layer is not None:
                mk = kernel_tables.moe_lookups(b, dtype, moe_layer["w_gate_up"], moe_layer["w_down"],
                                               self.cfg.num_experts_per_tok, gen)
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
            fwd = functools.partial(forward, cfg=self.cfg, ops=self.ops, inv_freq=self.inv_freq,
                                    kv_scales=self.kv_scales, attn_block_sizes=attn_bs, moe_block_sizes=moe_bs)

            def step(params, caches, batch, samp):
                logits, caches = fwd(params, caches, batch)
                tokens, logprobs = sample(logits, samp["temperature"], samp["top_k"], samp["top_p"], samp["seeds"],
                                          samp["counters"], samp["any_filter"])
                return tokens, logprobs, caches

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

    def warmup(self) -> float:
        """Compile (or load from the persistent cache) every bucket's step; returns the seconds taken."""
        _import_config_modules()
        if self._bs is None:
            self.plan_block_sizes()
        t0 = time.perf_counter()
        before = self.counter.compiles
        for b in self.buckets:
            batch, samp = self._empty_inputs(b, self._seqs(b))
            tokens, _, self.caches = self._step_fn(b)(self.params, self.caches, batch, samp)
            jax.block_until_ready(tokens)
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
        tokens, logprobs, self.caches = self._step_fn(t)(self.params, self.caches, batch, samp)
        tokens, logprobs = np.asarray(tokens), np.asarray(logprobs)
        self.step_seconds += time.perf_counter() - t0
        self.steps += 1
        self.real_tokens += n_tok
        self.padded_tokens += t
        return tokens[:len(items)], logprobs[:len(items)]

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
