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
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise ValueError(f"top_k must be -1, 0 (off) or a positive integer, got {self.top_k!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
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


def _filter(scaled, top_k, top_p):
    """Mask (to -inf) the logits outside each row's top-k and top-p (nucleus) sets."""
    vocab = scaled.shape[-1]
    desc = -jnp.sort(-scaled, axis=-1)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    kth = jnp.take_along_axis(desc, (k - 1)[:, None], axis=-1)  # [S, 1]
    desc = jnp.where(jnp.arange(vocab)[None, :] < k[:, None], desc, -jnp.inf)
    probs = jax.nn.softmax(desc, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # probability mass strictly above each entry
    keep = (before < top_p[:, None]) | (jnp.arange(vocab)[None, :] == 0)
    last = jnp.sum(keep, axis=-1) - 1
    pth = jnp.take_along_axis(desc, last[:, None], axis=-1)
    threshold = jnp.maximum(kth, pth)
    return jnp.where(scaled >= threshold, scaled, -jnp.inf)


def sample(logits, temperature, top_k, top_p, seeds, counters, any_filter):
    """logits f32 [S, V]; per-row temperature f32, top_k i32, top_p f32, seeds u32, counters i32;
    any_filter: a bool scalar (skip the vocabulary sort when no row filters).
    Returns (tokens i32 [S], logprobs f32 [S])."""
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits / jnp.maximum(temperature, 1e-5)[:, None]
    scaled = jax.lax.cond(any_filter, _filter, lambda s, k, p: s, scaled, top_k, top_p)

    def gumbel(seed, counter):
        key = jax.random.fold_in(jax.random.key(seed), counter)
        return jax.random.gumbel(key, (logits.shape[-1],), jnp.float32)

    noise = jax.vmap(gumbel)(seeds, counters)
    drawn = jnp.argmax(scaled + noise, axis=-1).astype(jnp.int32)
    tokens = jnp.where(temperature > 0, drawn, greedy)
    chosen = jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
    return tokens, chosen
