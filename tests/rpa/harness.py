"""Shared helpers of the rpa tests: fixed-shape batches (one compile serves many hypothesis examples),
random inputs with NaN-poisoned unused pages and slots, and the kernel-vs-reference comparison."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

import rpa
from autotune.kernel_util import cdiv
from reference.ragged_paged_attention import quantize_store
from reference.ragged_paged_attention import ragged_paged_attention as reference_rpa
from tests.common import RaggedBatch, make_ragged_batch, rel_error, tolerance

# Small block sizes: several query blocks per prefill and several KV blocks per sequence.
SMALL_BLOCKS = rpa.BlockSizes(decode_kv_pages=2, prefill_q=8, prefill_kv_pages=1, mixed_q=8, mixed_kv_pages=2)


@dataclasses.dataclass(frozen=True)
class Shape:
    """Static shapes of a test configuration (fixed so that one compile serves every example)."""

    num_q_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 128
    page_size: int = 16
    num_tokens: int = 88
    max_seqs: int = 5
    pages_per_seq: int = 8
    num_pages: int = 40


def pad_batch(b: RaggedBatch, shape: Shape, rng) -> RaggedBatch:
    """Re-pad a RaggedBatch to the fixed shapes (garbage page-table entries where unused)."""
    n = b.num_seqs
    assert n < shape.max_seqs and int(b.cu_q_lens[n]) <= shape.num_tokens and b.num_pages <= shape.num_pages
    assert b.page_size == shape.page_size
    s, pps = shape.max_seqs, shape.pages_per_seq
    q_lens = np.zeros(s, np.int32)
    kv_lens = np.zeros(s, np.int32)
    q_lens[:n] = b.q_lens[:n]
    kv_lens[:n] = b.kv_lens[:n]
    table = rng.integers(0, shape.num_pages, size=(s, pps)).astype(np.int32)
    for i in range(n):
        need = cdiv(int(kv_lens[i]), shape.page_size)
        assert need <= pps
        table[i, :need] = b.page_indices[i, :need]
    cu = np.zeros(s + 1, np.int32)
    cu[1:] = np.cumsum(q_lens)
    return RaggedBatch(q_lens, kv_lens, table, cu, b.distribution.copy(), shape.page_size, shape.num_pages,
                       shape.num_tokens)


def batch_from_lengths(q_lens, kv_lens, *, decode_end, prefill_end, shape: Shape, rng, extra_pages=2) -> RaggedBatch:
    b = make_ragged_batch(q_lens, kv_lens, decode_end=decode_end, prefill_end=prefill_end,
                          page_size=shape.page_size, rng=rng, pages_per_seq=shape.pages_per_seq,
                          extra_pages=extra_pages)
    return pad_batch(b, shape, rng)


def slots(b: RaggedBatch, *, new: bool) -> np.ndarray:
    """bool [num_pages, page_size]: the slots this step's new tokens are stored in (new=True), or the
    cached (pre-step) slots of every sequence (new=False)."""
    mask = np.zeros((b.num_pages, b.page_size), bool)
    for i in range(b.num_seqs):
        cached = int(b.kv_lens[i]) - int(b.q_lens[i])
        for pos in range(cached, int(b.kv_lens[i])) if new else range(cached):
            mask[b.page_indices[i, pos // b.page_size], pos % b.page_size] = True
    return mask


def make_inputs(b: RaggedBatch, shape: Shape, rng, *, q_dtype=jnp.bfloat16, kv_dtype=jnp.bfloat16, k_scale=None,
                v_scale=None, sinks=False):
    """Random q/k/v, a packed cache whose every slot no sequence may read is poisoned (NaN; int8: -128)."""
    t, hq, hkv, d = shape.num_tokens, shape.num_q_heads, shape.num_kv_heads, shape.head_dim
    q = jnp.asarray(rng.standard_normal((t, hq, d)), q_dtype)
    k = jnp.asarray(rng.standard_normal((t, hkv, d)), q_dtype)
    v = jnp.asarray(rng.standard_normal((t, hkv, d)), q_dtype)
    pages = (b.num_pages, b.page_size, hkv, d)
    kp = quantize_store(rng.standard_normal(pages), kv_dtype, k_scale)
    vp = quantize_store(rng.standard_normal(pages), kv_dtype, v_scale)
    rows = slot_rows(rpa.pack_kv(kp, vp), hkv, d)
    keep = slots(b, new=False)
    poison = -128 if jnp.dtype(kv_dtype) == jnp.int8 else np.nan
    rows[~keep] = np.asarray(poison).astype(rows.dtype)
    cache = from_slot_rows(rows, jnp.dtype(kv_dtype))
    sk = jnp.asarray(rng.standard_normal(hq) * 2.0, jnp.float32) if sinks else None
    return q, k, v, jnp.asarray(cache), sk


def run_both(b: RaggedBatch, shape: Shape, inputs, *, block_sizes=SMALL_BLOCKS, **kw):
    """(kernel out, kernel cache, reference out, reference k/v caches, reference packed expectation)."""
    q, k, v, cache, sinks = inputs
    meta = tuple(jnp.asarray(x) for x in (b.kv_lens, b.page_indices, b.cu_q_lens, b.distribution))
    out, new_cache = rpa.ragged_paged_attention(q, k, v, cache, *meta, sinks=sinks, block_sizes=block_sizes,
                                                interpret=True, **kw)
    kc, vc = rpa.unpack_kv(cache, shape.num_kv_heads, shape.head_dim)
    ref_out, rk, rv = reference_rpa(q, k, v, kc, vc, *meta, sinks=sinks, **kw)
    return jax.block_until_ready(out), jax.block_until_ready(new_cache), ref_out, rk, rv


def slot_rows(cache, num_kv_heads: int, head_dim: int) -> np.ndarray:
    """A TPU-layout cache as [P, page_size, 2*Hkv, Dp] (K of head h at row 2h, V at 2h+1) in its value
    dtype: a packed (uint32) cache is split into its bfloat16 halves; the others are that already."""
    cache = np.asarray(cache)
    if cache.dtype != np.uint32:
        return cache.copy()
    dp = rpa.layout.padded_head_dim(head_dim)
    words = cache.reshape(cache.shape[0], -1, num_kv_heads, 1, dp)
    halves = np.concatenate([words & 0xFFFF, words >> 16], axis=3).astype(np.uint16)
    return halves.view(jnp.bfloat16).reshape(cache.shape[0], -1, 2 * num_kv_heads, dp)


def from_slot_rows(rows: np.ndarray, kv_dtype) -> jax.Array:
    """The inverse of slot_rows: the cache the kernel takes for `kv_dtype` values."""
    if not rpa.layout.packs(kv_dtype):
        return jnp.asarray(rows)
    p, page, two_h, dp = rows.shape
    bits = rows.view(np.uint16).astype(np.uint32).reshape(p, page, two_h // 2, 2, dp)
    return jnp.asarray((bits[:, :, :, 0] | (bits[:, :, :, 1] << 16)).reshape(p, -1, 128))


def _bits(x) -> np.ndarray:
    a = np.asarray(x)
    return a.view(np.uint8).reshape(*a.shape, a.dtype.itemsize)


def check(b: RaggedBatch, shape: Shape, inputs, results, *, tol=None):
    """Output close to the reference on real tokens, finite on padding; cache bit-exact."""
    q, k, v, cache, _ = inputs
    out, new_cache, ref_out, rk, rv = results
    n = int(b.cu_q_lens[b.num_seqs])
    tol = tol if tol is not None else tolerance(q.dtype, rpa.layout.cache_dtype(cache))
    assert out.shape == q.shape and out.dtype == q.dtype
    if n:
        err = rel_error(out[:n], ref_out[:n])
        assert err <= tol, f"output: relative error {err:.3e} > {tol:.1e}"
    assert bool(jnp.all(jnp.isfinite(out.astype(jnp.float32)))), "non-finite output (padding rows included)"

    d = shape.head_dim
    got = _bits(slot_rows(new_cache, shape.num_kv_heads, shape.head_dim))
    before = _bits(slot_rows(cache, shape.num_kv_heads, shape.head_dim))
    written = slots(b, new=True)
    # every slot that is not written: bit-for-bit unchanged (all lanes, all heads, K and V)
    assert np.array_equal(got[~written], before[~written]), "cache changed outside the written slots"
    # written slots: equal to the reference's stored values; padding lanes zero
    want_k, want_v = _bits(rk)[written], _bits(rv)[written]
    got_slots = got[written]  # [n, 2*Hkv, Dp, bytes]
    assert np.array_equal(got_slots[:, 0::2, :d], want_k), "stored keys differ from the reference"
    assert np.array_equal(got_slots[:, 1::2, :d], want_v), "stored values differ from the reference"
    assert not got_slots[:, :, d:].any(), "padding lanes of new slots are not zero"
