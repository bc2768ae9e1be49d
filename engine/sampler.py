"""Sampling parameters and the on-device sampler (greedy, temperature, top-k, top-p; seeded per request).

The sampler runs inside the compiled step: every row has its own temperature, top_k, top_p and
random stream (key = fold_in(key(seed), number of tokens already generated)), so a seeded request
draws the same tokens whatever else shares its batch. temperature 0 is greedy. The log-probability
returned is that of the chosen token under the model's distribution (log_softmax of the logits).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0  # 0 or -1: off
    top_p: float = 1.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = [int(t) for t in (self.stop_token_ids or [])]
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or not 0 <= self.temperature <= 100:
            raise ValueError(f"temperature must be a number in [0, 100], got {self.temperature!r}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or not -1 <= self.top_k < 2**31:
            raise ValueError(f"top_k must be -1, 0 (off) or a positive integer below 2**31, got {self.top_k!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)
                                      or not -2**63 <= self.seed < 2**64):
            raise ValueError(f"seed must be a 64-bit integer, got {self.seed!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop must be a non-empty string or a list of them, got {self.stop!r}")
        if self.top_k == -1:
            self.top_k = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def filters(self) -> bool:
        return not self.greedy and (self.top_k > 0 or self.top_p < 1.0)


def _order_keys(x):
    """f32 -> u32 with the same order (-inf lowest): bisection runs on these integers."""
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(1 << 31))


def _bisect(pred, rows: int, largest: bool):
    """Per row, the largest (largest=True) or smallest u32 t with pred(t) true, pred monotone in t
    (true below / above the answer); 32 halvings of the u32 range, no sort."""
    lo = jnp.zeros((rows,), jnp.uint32)
    hi = jnp.full((rows,), 0xFFFFFFFF, jnp.uint32)

    def step(_, bounds):
        lo, hi = bounds
        gap = hi - lo
        if largest:  # invariant: pred(lo)
            mid = lo + (gap >> 1) + (gap & 1)
            ok = pred(mid)
            return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)
        mid = lo + (gap >> 1)  # invariant: pred(hi)
        ok = pred(mid)
        return jnp.where(ok, lo, mid + 1), jnp.where(ok, mid, hi)

    lo, hi = jax.lax.fori_loop(0, 32, step, (lo, hi))
    return lo if largest else hi


def _filter(scaled, top_k, top_p):
    """Mask (to -inf) the logits outside each row's top-k and top-p (nucleus) sets.

    top-k keeps the values >= the k-th largest; top-p then keeps, in descending order, each value
    while the probability mass (softmax over the top-k set) strictly above it is < top_p (the
    largest value always). Both thresholds are found exactly by bisection on the values' ordered
    bit patterns (each a value of the row, ties kept together), which compiles to two small loops
    instead of a full-vocabulary sort."""
    rows, vocab = scaled.shape
    keys = _order_keys(scaled)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    kth = _bisect(lambda t: jnp.sum(keys >= t[:, None], axis=-1) >= k, rows, largest=True)
    in_k = keys >= kth[:, None]
    probs = jax.nn.softmax(jnp.where(in_k, scaled, -jnp.inf), axis=-1)
    pth = _bisect(lambda t: jnp.sum(jnp.where(keys > t[:, None], probs, 0.0), axis=-1) < top_p, rows,
                  largest=False)
    pth = jnp.where(top_p >= 1.0, jnp.uint32(0), pth)  # top_p 1: off (no float-rounding tail cut)
    keep = in_k & (keys >= pth[:, None])
    return jnp.where(keep, scaled, -jnp.inf)


def _mix32(x):
    """A 32-bit integer finalizer (the "lowbias32" xorshift-multiply hash): every input bit affects
    every output bit, and it is a bijection."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def gumbel_noise(seeds, counters, vocab: int):
    """Standard Gumbel noise [S, vocab], a pure function of (seed, counter, token id) per entry.

    A counter-based hash instead of jax.random's threefry: the same stream property (a row's noise
    depends on its own seed and token count only, never on the batch) at a few integer ops per
    entry, which XLA compiles in a fraction of threefry's time over a full vocabulary. Uniforms
    have 24 bits, in (0, 1) exclusive."""
    row = _mix32(_mix32(seeds.astype(jnp.uint32) ^ jnp.uint32(0x9E3779B9)) + counters.astype(jnp.uint32))
    bits = _mix32(row[:, None] ^ _mix32(jnp.arange(vocab, dtype=jnp.uint32) + jnp.uint32(0x632BE5AB))[None, :])
    u = ((bits >> 8).astype(jnp.float32) + 0.5) * (1.0 / (1 << 24))
    return -jnp.log(-jnp.log(u))


def sample(logits, temperature, top_k, top_p, seeds, counters, any_filter):
    """logits f32 [S, V]; per-row temperature f32, top_k i32, top_p f32, seeds u32, counters i32;
    any_filter: a bool scalar (skip the vocabulary sort when no row filters).
    Returns (tokens i32 [S], logprobs f32 [S])."""
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits / jnp.maximum(temperature, 1e-5)[:, None]
    scaled = jax.lax.cond(any_filter, _filter, lambda s, k, p: s, scaled, top_k, top_p)

    noise = gumbel_noise(seeds, counters, logits.shape[-1])
    drawn = jnp.argmax(scaled + noise, axis=-1).astype(jnp.int32)
    tokens = jnp.where(temperature > 0, drawn, greedy)
    chosen = jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
    return tokens, chosen
