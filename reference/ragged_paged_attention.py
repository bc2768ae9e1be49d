"""Readable pure-JAX reference for ragged paged attention with a fused KV-cache write: traceable
(the metadata may be traced arrays), so it also serves the engine's compiled "reference" backend.

The cache here has its natural layout: k_cache and v_cache, each [num_pages, page_size, Hkv, D].
(The kernel's packed layout lives in rpa/layout.py; this module imports nothing from rpa.)

Semantics (the contract of rpa.ragged_paged_attention):
- Sequence i has q_len_i = cu_q_lens[i+1] - cu_q_lens[i] new tokens, at positions
  kv_lens[i] - q_len_i ... kv_lens[i] - 1. Their keys/values are stored at page
  page_indices[i, p // page_size], slot p % page_size, before attention reads them.
- With a float8 / int8 cache the stored value is quantize(new / scale): a saturating cast for
  float8, round-half-to-even then clip to [-127, 127] for int8; attention reads stored * scale.
- A query at position p attends to keys at positions <= p (and > p - sliding_window when given);
  with causal=False (bidirectional encoders: prefill-only sequences) every query of sequence i
  attends to all of its kv_lens[i] keys (no sliding window),
  logits = (q . k) * sm_scale (default 1/sqrt(D)), soft-capped as soft_cap * tanh(logits / soft_cap)
  when given; sinks[h] adds exp(sinks[h]) to head h's softmax denominator only.
- Sequences past distribution[2] and tokens past cu_q_lens[num_seqs] are padding: they write
  nothing, and their outputs are zero here.
Everything accumulates in float32; the output has q's dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike, DTypeLike

from reference.quantization import QMAX


def quantize_store(x: ArrayLike, dtype: DTypeLike, scale: float | None = None) -> jax.Array:
    """The value a cache of `dtype` stores for a new key/value `x`: quantize(x / scale).

    float8: saturating cast (clip to +-max finite, then cast); int8: round half to even, clip to
    [-127, 127]; other dtypes: a plain cast. The quotient is taken in float32.

    Args:
      x: any shape; dtype: the cache's dtype; scale: the cache's scale (None: 1).
    Returns:
      x's shape in `dtype`.
    """
    dtype = jnp.dtype(dtype)
    y = jnp.asarray(x).astype(jnp.float32)
    if scale is not None:
        y = y / jnp.float32(scale)
    if dtype.name in ("float8_e4m3fn", "float8_e5m2"):
        big = QMAX[dtype.name]
        return jnp.clip(y, -big, big).astype(dtype)
    if dtype.name == "int8":
        return jnp.clip(jnp.round(y), -QMAX["int8"], QMAX["int8"]).astype(jnp.int8)
    return y.astype(dtype)


def dequantize(stored: ArrayLike, scale: float | None = None) -> jax.Array:
    """What attention reads for a stored cache value.

    Args:
      stored: cache values, any shape; scale: the cache's scale (None: 1).
    Returns:
      stored * scale in float32, stored's shape.
    """
    y = jnp.asarray(stored).astype(jnp.float32)
    return y if scale is None else y * jnp.float32(scale)


def token_metadata(cu_q_lens: jax.Array, kv_lens: jax.Array, distribution: jax.Array,
                   num_tokens: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Where each token of the step sits.

    Args:
      cu_q_lens: i32[S+1]; kv_lens: i32[S]; distribution: i32[3]; num_tokens: T.
    Returns:
      (sequence i32[T], position in that sequence i32[T] (0 for padding), real token bool[T]).
    """
    num_seqs = distribution[2]
    t = jnp.arange(num_tokens, dtype=jnp.int32)
    seq = jnp.searchsorted(cu_q_lens[1:], t, side="right").astype(jnp.int32)
    seq = jnp.clip(seq, 0, kv_lens.shape[0] - 1)
    q_len = cu_q_lens[seq + 1] - cu_q_lens[seq]
    pos = kv_lens[seq] - q_len + (t - cu_q_lens[seq])
    valid = t < cu_q_lens[num_seqs]
    return seq, jnp.where(valid, pos, 0), valid


def write_kv(k: ArrayLike, v: ArrayLike, k_cache: ArrayLike, v_cache: ArrayLike, kv_lens: ArrayLike,
             page_indices: ArrayLike, cu_q_lens: ArrayLike, distribution: ArrayLike, *, k_scale: float | None = None,
             v_scale: float | None = None) -> tuple[jax.Array, jax.Array]:
    """Store each real token's key/value (quantize_store) in its page slot.

    Args: as `ragged_paged_attention`.
    Returns:
      The updated (k_cache, v_cache), each [num_pages, page_size, Hkv, D].
    """
    kv_lens, page_indices, cu_q_lens, distribution = (
        jnp.asarray(a, jnp.int32) for a in (kv_lens, page_indices, cu_q_lens, distribution))
    k_cache, v_cache = jnp.asarray(k_cache), jnp.asarray(v_cache)
    num_pages, page_size = k_cache.shape[:2]
    seq, pos, valid = token_metadata(cu_q_lens, kv_lens, distribution, k.shape[0])
    page = page_indices[seq, jnp.clip(pos // page_size, 0, page_indices.shape[1] - 1)]
    page = jnp.where(valid, page, num_pages)  # padding tokens: an out-of-range page, dropped
    slot = pos % page_size
    k_cache = k_cache.at[page, slot].set(quantize_store(k, k_cache.dtype, k_scale), mode="drop")
    v_cache = v_cache.at[page, slot].set(quantize_store(v, v_cache.dtype, v_scale), mode="drop")
    return k_cache, v_cache


def ragged_paged_attention(q: jax.Array, k: ArrayLike, v: ArrayLike, k_cache: ArrayLike, v_cache: ArrayLike,
                           kv_lens: ArrayLike, page_indices: ArrayLike, cu_q_lens: ArrayLike,
                           distribution: ArrayLike, *, sm_scale: float | None = None,
                           sliding_window: int | None = None, soft_cap: float | None = None,
                           sinks: ArrayLike | None = None, k_scale: float | None = None,
                           v_scale: float | None = None, causal: bool = True,
                           ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Reference RPA (the semantics of the module docstring).

    Args:
      q: [T, Hq, D]; k, v: [T, Hkv, D]; k_cache, v_cache: [num_pages, page_size, Hkv, D];
      kv_lens: i32[S]; page_indices: i32[S, pages_per_seq]; cu_q_lens: i32[S+1];
      distribution: i32[3] = (decode_end, prefill_end, num_seqs); sinks: f32[Hq] or None;
      sm_scale (default 1/sqrt(D)), sliding_window, soft_cap, k_scale, v_scale: static numbers or None.
      causal: False lets every query see all of its sequence's keys (bidirectional attention).
    Returns:
      (out [T, Hq, D] in q.dtype, k_cache, v_cache) with the new tokens stored.
    """
    if not causal and sliding_window is not None:
        raise ValueError("sliding_window: not supported with causal=False (bidirectional attention)")
    kv_lens, page_indices, cu_q_lens, distribution = (
        jnp.asarray(a, jnp.int32) for a in (kv_lens, page_indices, cu_q_lens, distribution))
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    group = num_q_heads // num_kv_heads
    page_size = k_cache.shape[1]
    pages_per_seq = page_indices.shape[1]
    length = pages_per_seq * page_size
    if sm_scale is None:
        sm_scale = head_dim ** -0.5

    # 1. Store the new tokens first: attention reads them from the cache like any other key.
    k_cache, v_cache = write_kv(k, v, k_cache, v_cache, kv_lens, page_indices, cu_q_lens, distribution,
                                k_scale=k_scale, v_scale=v_scale)

    # 2. Each token attends to the keys of its own sequence at positions <= its own (all of them
    #    when not causal).
    seq, pos, valid = token_metadata(cu_q_lens, kv_lens, distribution, num_tokens)

    def attend(args: tuple[jax.Array, ...]) -> jax.Array:
        q_t, seq_t, pos_t, valid_t = args  # [Hq, D], scalars
        pages = page_indices[seq_t]  # every page of the sequence (unused entries masked below)
        keys = dequantize(k_cache[pages], k_scale).reshape(length, num_kv_heads, head_dim)
        vals = dequantize(v_cache[pages], v_scale).reshape(length, num_kv_heads, head_dim)
        key_pos = jnp.arange(length)
        allowed = ((key_pos <= pos_t) if causal else (key_pos < kv_lens[seq_t])) & valid_t
        if sliding_window is not None:
            allowed &= key_pos > pos_t - sliding_window
        keys = jnp.where(allowed[:, None, None], keys, 0.0)  # unused slots may hold anything (NaN)
        vals = jnp.where(allowed[:, None, None], vals, 0.0)
        keys = jnp.repeat(keys, group, axis=1)  # [L, Hq, D]: query head h reads KV head h // group
        vals = jnp.repeat(vals, group, axis=1)
        logits = jnp.einsum("hd,lhd->hl", q_t.astype(jnp.float32), keys,
                            precision=jax.lax.Precision.HIGHEST) * sm_scale
        if soft_cap is not None:
            logits = soft_cap * jnp.tanh(logits / soft_cap)
        logits = jnp.where(allowed[None, :], logits, -jnp.inf)
        m = jnp.max(logits, axis=-1, keepdims=True)
        if sinks is not None:
            m = jnp.maximum(m, jnp.asarray(sinks, jnp.float32)[:, None])
        m = jnp.where(jnp.isfinite(m), m, 0.0)  # padding tokens see no key at all
        p = jnp.exp(logits - m)
        denom = jnp.sum(p, axis=-1, keepdims=True)
        if sinks is not None:
            denom = denom + jnp.exp(jnp.asarray(sinks, jnp.float32)[:, None] - m)
        out = jnp.einsum("hl,lhd->hd", p, vals, precision=jax.lax.Precision.HIGHEST)
        out = out / jnp.where(denom > 0, denom, 1.0)
        return jnp.where(valid_t, out, 0.0)

    out = jax.lax.map(attend, (q, seq, pos, valid))
    return out.astype(q.dtype), k_cache, v_cache
