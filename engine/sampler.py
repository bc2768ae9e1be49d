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

from engine.structured import KINDS as GRAMMAR_KINDS

TOP_LOGPROBS = 20  # the most alternatives a token's log-probabilities list (OpenAI's limit)
MAX_LOGIT_BIAS = 300  # entries one request's logit_bias may hold
# (row, token, bias) entries one step's sampler takes: a fixed shape, so the scheduler admits requests
# with a logit_bias while the running ones' entries fit (engine.scheduler.Scheduler).
LOGIT_BIAS_ENTRIES = 1024


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
    top_logprobs: int = 0  # alternatives returned per generated token (the most likely, 0..TOP_LOGPROBS)
    # token id -> a bias in [-100, 100] added to its logit before sampling (greedy too); at most
    # MAX_LOGIT_BIAS entries. The log-probabilities returned stay the model's.
    logit_bias: dict[int, float] | None = None
    # structured output: (kind, text) of the grammar the output must match (engine.structured:
    # ("json_schema", a JSON schema as JSON text) or ("lark", a Lark grammar)); None: free text
    grammar: tuple[str, str] | None = None

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
        if (not isinstance(self.top_logprobs, int) or isinstance(self.top_logprobs, bool)
                or not 0 <= self.top_logprobs <= TOP_LOGPROBS):
            raise ValueError(f"top_logprobs must be an integer in [0, {TOP_LOGPROBS}], got {self.top_logprobs!r}")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict) or len(self.logit_bias) > MAX_LOGIT_BIAS:
                raise ValueError(f"logit_bias must be a dict of at most {MAX_LOGIT_BIAS} token ids to biases, got "
                                 f"{type(self.logit_bias).__name__} of {len(self.logit_bias)} entries"
                                 if isinstance(self.logit_bias, dict) else
                                 f"logit_bias must be a dict of token ids to biases, got {self.logit_bias!r}")
            for t, b in self.logit_bias.items():
                if not isinstance(t, int) or isinstance(t, bool) or t < 0:
                    raise ValueError(f"logit_bias: token ids must be non-negative integers, got {t!r}")
                if not isinstance(b, (int, float)) or isinstance(b, bool) or not -100 <= b <= 100:
                    raise ValueError(f"logit_bias: biases must be numbers in [-100, 100], got {b!r} for token {t}")
            self.logit_bias = {int(t): float(b) for t, b in self.logit_bias.items()} or None
        if self.grammar is not None and (not isinstance(self.grammar, tuple) or len(self.grammar) != 2
                                         or self.grammar[0] not in GRAMMAR_KINDS
                                         or not isinstance(self.grammar[1], str)):
            raise ValueError(f"grammar: expected (one of {GRAMMAR_KINDS}, text), got {self.grammar!r}")
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


def sample_step(logits, samp):
    """The engine's sampler program: sample() over the step's rows, plus each row's TOP_LOGPROBS
    most likely tokens and their log-probabilities when a row in the step asks for alternatives.

    Args:
      logits: f32 [R, V].
      samp: per-row temperature, top_k, top_p, seeds, counters ([R] each); token_mask (i32 [R,
        ceil(V / 32)], bit j of word w allows token 32 w + j: structured output); the logit_bias entries
        bias_rows, bias_ids (i32) and bias_values (f32), [LOGIT_BIAS_ENTRIES] each, padded with
        zero biases; and the step's scalars any_filter (a row filters), any_top (a row wants
        alternatives), any_bias (a row has a logit_bias) and any_mask (a row has a grammar).
    Returns:
      (tokens i32 [R], logprobs f32 [R], top_ids i32 [R, TOP_LOGPROBS], top_logprobs f32 [R,
      TOP_LOGPROBS]). Sampling sees the biased logits; the log-probabilities (the chosen token's and
      the alternatives, in descending order) are the model's distribution's. The alternatives are
      zeros when no row asked (the top-k over the vocabulary is skipped).
    """
    biased = jax.lax.cond(samp["any_bias"],
                          lambda x: x.at[samp["bias_rows"], samp["bias_ids"]].add(samp["bias_values"]),
                          lambda x: x, logits)
    biased = jax.lax.cond(samp["any_mask"],  # structured output: disallowed tokens to -inf
                          lambda x: jnp.where(allowed_tokens(samp["token_mask"], x.shape[-1]), x, -jnp.inf),
                          lambda x: x, biased)
    tokens, _ = sample(biased, samp["temperature"], samp["top_k"], samp["top_p"], samp["seeds"],
                       samp["counters"], samp["any_filter"])
    chosen = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tokens[:, None], axis=-1)[:, 0]
    rows = logits.shape[0]

    def alternatives(x):
        return top_k_rows(jax.nn.log_softmax(x, axis=-1), TOP_LOGPROBS)

    def none(x):
        return jnp.zeros((rows, TOP_LOGPROBS), jnp.int32), jnp.zeros((rows, TOP_LOGPROBS), jnp.float32)

    top_ids, top_lps = jax.lax.cond(samp["any_top"], alternatives, none, logits)
    return tokens, chosen, top_ids, top_lps


def allowed_tokens(token_mask, vocab: int):
    """bool [R, vocab] of a token bitmask (int32 [R, ceil(vocab / 32)], llguidance's layout)."""
    bits = (token_mask[:, :, None].astype(jnp.uint32) >> jnp.arange(32, dtype=jnp.uint32)) & 1
    return bits.reshape(token_mask.shape[0], -1)[:, :vocab] == 1


def _argmax_rounds(x, k: int):
    """(positions i32 [R, k], values [R, k]): k rounds of argmax, each taking the largest entry left
    (the lowest position among equals) and masking it."""
    rows = x.shape[0]

    def take(i, carry):
        x, pos, vals = carry
        j = jnp.argmax(x, axis=-1)
        pos = pos.at[:, i].set(j.astype(jnp.int32))
        vals = vals.at[:, i].set(jnp.take_along_axis(x, j[:, None], axis=-1)[:, 0])
        return x.at[jnp.arange(rows), j].set(-jnp.inf), pos, vals

    init = (x, jnp.zeros((rows, k), jnp.int32), jnp.zeros((rows, k), x.dtype))
    _, pos, vals = jax.lax.fori_loop(0, k, take, init)
    return pos, vals


def top_k_rows(x, k: int, chunk: int = 128):
    """(ids i32 [R, k], values [R, k]): each row's k largest entries in descending order, exact.

    The k chunks of `chunk` entries with the largest maxima hold the row's k largest entries (a
    chunk outside them has k chunks above it, each holding an entry at least as large), so k
    rounds of argmax run over those k x chunk candidates after one pass over the row for the chunk
    maxima. Same result as lax.top_k up to the order of exactly equal values, at a fraction of its
    compile time on TPU (libtpu 0.0.51, [64, 128256] f32: ~1 s against ~2.3 s), which every
    sampler program pays at warm-up."""
    rows, vocab = x.shape
    padded = jnp.pad(x, ((0, 0), (0, -vocab % chunk)), constant_values=-jnp.inf).reshape(rows, -1, chunk)
    kc = min(k, padded.shape[1])
    chunks, _ = _argmax_rounds(padded.max(axis=-1), kc)  # [R, kc]
    candidates = jnp.take_along_axis(padded, chunks[:, :, None], axis=1).reshape(rows, kc * chunk)
    ids = (chunks[:, :, None] * chunk + jnp.arange(chunk, dtype=jnp.int32)).reshape(rows, kc * chunk)
    pos, values = _argmax_rounds(candidates, k)
    return jnp.take_along_axis(ids, pos, axis=-1), values
