"""reference.ragged_paged_attention against an independent NumPy float64 loop written here."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reference.ragged_paged_attention import quantize_store, ragged_paged_attention
from tests.common import make_ragged_batch, nan_poison, ragged_batches, rel_error


def np_store(x, dtype, scale):
    """quantize(x / scale) in NumPy: saturating float8 cast, round-half-even + clip for int8."""
    y = np.asarray(x, np.float32)
    if scale is not None:
        y = (y / np.float32(scale)).astype(np.float32)
    name = np.dtype(dtype).name
    if name in ("float8_e4m3fn", "float8_e5m2"):
        big = float(ml_dtypes.finfo(dtype).max)
        return np.clip(y, -big, big).astype(dtype)
    if name == "int8":
        return np.clip(np.rint(y), -127, 127).astype(np.int8)
    return y.astype(dtype)


def np_rpa(q, k, v, k_cache, v_cache, kv_lens, page_indices, cu_q_lens, distribution, *, sm_scale, sliding_window,
           soft_cap, sinks, k_scale, v_scale):
    """Token by token, key by key, in float64."""
    k_cache, v_cache = np.array(k_cache), np.array(v_cache)
    ps = k_cache.shape[1]
    t_total, hq, d = q.shape
    hkv = k.shape[1]
    n = int(distribution[2])
    for i in range(n):
        q_len = int(cu_q_lens[i + 1] - cu_q_lens[i])
        for j in range(q_len):
            pos = int(kv_lens[i]) - q_len + j
            t = int(cu_q_lens[i]) + j
            page, slot = page_indices[i, pos // ps], pos % ps
            k_cache[page, slot] = np_store(k[t], k_cache.dtype, k_scale)
            v_cache[page, slot] = np_store(v[t], v_cache.dtype, v_scale)
    out = np.zeros((t_total, hq, d), np.float64)
    ks = 1.0 if k_scale is None else k_scale
    vs = 1.0 if v_scale is None else v_scale
    for i in range(n):
        q_len = int(cu_q_lens[i + 1] - cu_q_lens[i])
        for j in range(q_len):
            t = int(cu_q_lens[i]) + j
            pos = int(kv_lens[i]) - q_len + j
            for h in range(hq):
                g = h // (hq // hkv)
                logits, vals = [], []
                for p in range(pos + 1):
                    if sliding_window is not None and p <= pos - sliding_window:
                        continue
                    page, slot = page_indices[i, p // ps], p % ps
                    kk = k_cache[page, slot, g].astype(np.float64) * ks
                    s = float(np.dot(q[t, h].astype(np.float64), kk)) * sm_scale
                    if soft_cap is not None:
                        s = soft_cap * np.tanh(s / soft_cap)
                    logits.append(s)
                    vals.append(v_cache[page, slot, g].astype(np.float64) * vs)
                logits = np.array(logits)
                m = logits.max() if sinks is None else max(logits.max(), float(sinks[h]))
                w = np.exp(logits - m)
                denom = w.sum() + (0.0 if sinks is None else np.exp(float(sinks[h]) - m))
                out[t, h] = (w[:, None] * np.array(vals)).sum(0) / denom
    return out, k_cache, v_cache


CONFIGS = [
    dict(hq=4, hkv=2, d=32, cache=np.float32, q=np.float32, kw={}),
    dict(hq=6, hkv=2, d=16, cache=ml_dtypes.bfloat16, q=np.float32,
         kw=dict(sliding_window=7, soft_cap=3.0, sinks=True)),
    dict(hq=2, hkv=1, d=16, cache=np.int8, q=np.float32, kw=dict(k_scale=0.02, v_scale=0.03)),
    dict(hq=4, hkv=4, d=16, cache=ml_dtypes.float8_e4m3fn, q=ml_dtypes.bfloat16, kw=dict(k_scale=0.5, v_scale=0.25)),
    dict(hq=4, hkv=2, d=16, cache=ml_dtypes.float8_e5m2, q=np.float32, kw=dict(sm_scale=0.7)),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{np.dtype(c['cache']).name}-{sorted(c['kw'])}")
@given(batch=ragged_batches(max_seqs=3, max_q=6, max_kv=40, page_sizes=(8, 16)), seed=st.integers(0, 2**31 - 1))
@settings(max_examples=6)
def test_reference_matches_numpy_loop(cfg, batch, seed):
    rng = np.random.default_rng(seed)
    t = batch.num_tokens
    hq, hkv, d = cfg["hq"], cfg["hkv"], cfg["d"]
    q = (rng.standard_normal((t, hq, d))).astype(cfg["q"])
    k = (rng.standard_normal((t, hkv, d))).astype(cfg["q"])
    v = (rng.standard_normal((t, hkv, d))).astype(cfg["q"])
    kw = dict(cfg["kw"])
    shape = (batch.num_pages, batch.page_size, hkv, d)
    k_cache = np_store(rng.standard_normal(shape), cfg["cache"], kw.get("k_scale"))
    v_cache = np_store(rng.standard_normal(shape), cfg["cache"], kw.get("v_scale"))
    if np.dtype(cfg["cache"]).kind == "f":
        k_cache = np.asarray(nan_poison(k_cache, batch.unused_pages))
        v_cache = np.asarray(nan_poison(v_cache, batch.unused_pages))
    if kw.pop("sinks", False):
        kw["sinks"] = rng.standard_normal(hq).astype(np.float32)
    meta = (batch.kv_lens, batch.page_indices, batch.cu_q_lens, batch.distribution)
    out, kc, vc = jax.jit(lambda *a: ragged_paged_attention(*a, **kw))(q, k, v, k_cache, v_cache, *meta)
    full = dict(sm_scale=kw.get("sm_scale", d ** -0.5), sliding_window=kw.get("sliding_window"),
                soft_cap=kw.get("soft_cap"), sinks=kw.get("sinks"), k_scale=kw.get("k_scale"),
                v_scale=kw.get("v_scale"))
    want, wk, wv = np_rpa(q, k, v, k_cache, v_cache, *meta, **full)
    n = int(batch.cu_q_lens[batch.num_seqs])
    assert out.dtype == q.dtype
    tol = 1e-5 if np.dtype(cfg["q"]) == np.float32 else 1e-2
    if n:
        assert rel_error(out[:n], want[:n]) <= tol
    assert not np.asarray(out[n:], np.float32).any(), "padding tokens must give zeros"
    for got, exp in ((kc, wk), (vc, wv)):  # stored values bit-exact, everything else untouched
        assert np.array_equal(np.asarray(got).view(np.uint8), np.asarray(exp).view(np.uint8))


def test_quantize_store_rules():
    x = np.array([0.5, 1.5, 2.5, -0.5, -2.5, 1e6, -1e6, 3.49], np.float32)
    assert np.asarray(quantize_store(x, jnp.int8)).tolist() == [0, 2, 2, 0, -2, 127, -127, 3]
    assert np.asarray(quantize_store(x, jnp.int8, 0.5)).tolist() == [1, 3, 5, -1, -5, 127, -127, 7]
    f8 = np.asarray(quantize_store(x, jnp.float8_e4m3fn)).astype(np.float32)
    assert f8[5] == 448.0 and f8[6] == -448.0 and np.all(np.isfinite(f8))
    f8 = np.asarray(quantize_store(np.array([1e9], np.float32), jnp.float8_e5m2)).astype(np.float32)
    assert f8[0] == 57344.0


def test_padding_tokens_write_nothing(rng):
    batch = make_ragged_batch([2, 0], [5, 4], decode_end=0, prefill_end=1, page_size=8, rng=rng, extra_tokens=4)
    t = batch.num_tokens
    q = rng.standard_normal((t, 2, 8)).astype(np.float32)
    k = rng.standard_normal((t, 1, 8)).astype(np.float32)
    cache = rng.standard_normal((batch.num_pages, 8, 1, 8)).astype(np.float32)
    out, kc, vc = ragged_paged_attention(q, k, k, cache, cache, batch.kv_lens, batch.page_indices, batch.cu_q_lens,
                                         batch.distribution)
    changed = np.argwhere(np.any(np.asarray(kc) != cache, axis=(2, 3)))
    assert len(changed) == 2  # exactly the two new tokens of sequence 0
    assert not np.asarray(out[2:]).any()


def np_full_attention(q, k, v, k_cache, v_cache, kv_lens, page_indices, cu_q_lens, num_seqs, *, sm_scale):
    """Bidirectional attention per sequence in float64 matrices: every query of sequence i over all
    kv_lens[i] keys (its cached ones read from its pages, then this step's new ones)."""
    ps = k_cache.shape[1]
    group = q.shape[1] // k.shape[1]
    out = np.zeros(q.shape, np.float64)
    for i in range(num_seqs):
        lo, hi = int(cu_q_lens[i]), int(cu_q_lens[i + 1])
        pos = np.arange(int(kv_lens[i]) - (hi - lo))  # the cached positions
        pages, slots = page_indices[i, pos // ps], pos % ps
        keys = np.concatenate([k_cache[pages, slots], k[lo:hi]]).astype(np.float64)  # [kv_len, Hkv, D]
        vals = np.concatenate([v_cache[pages, slots], v[lo:hi]]).astype(np.float64)
        logits = np.einsum("thd,lhd->htl", q[lo:hi].astype(np.float64), np.repeat(keys, group, axis=1)) * sm_scale
        w = np.exp(logits - logits.max(axis=-1, keepdims=True))
        w /= w.sum(axis=-1, keepdims=True)
        out[lo:hi] = np.einsum("htl,lhd->thd", w, np.repeat(vals, group, axis=1))
    return out


@given(batch=ragged_batches(max_seqs=4, max_q=12, max_kv=40, page_sizes=(8, 16)), seed=st.integers(0, 2**31 - 1))
@settings(max_examples=10)
def test_non_causal_is_full_attention_per_sequence(batch, seed):
    """causal=False: each query sees every key of its sequence, whatever its position (float32, GQA 3)."""
    rng = np.random.default_rng(seed)
    t, hq, hkv, d = batch.num_tokens, 6, 2, 16
    q, k, v = (rng.standard_normal((t, h, d)).astype(np.float32) for h in (hq, hkv, hkv))
    shape = (batch.num_pages, batch.page_size, hkv, d)
    k_cache = np.asarray(nan_poison(rng.standard_normal(shape).astype(np.float32), batch.unused_pages))
    v_cache = np.asarray(nan_poison(rng.standard_normal(shape).astype(np.float32), batch.unused_pages))
    meta = (batch.kv_lens, batch.page_indices, batch.cu_q_lens, batch.distribution)
    out, kc, vc = jax.jit(lambda *a: ragged_paged_attention(*a, sm_scale=0.3, causal=False))(
        q, k, v, k_cache, v_cache, *meta)
    want = np_full_attention(q, k, v, k_cache, v_cache, batch.kv_lens, batch.page_indices, batch.cu_q_lens,
                             batch.num_seqs, sm_scale=0.3)
    n = int(batch.cu_q_lens[batch.num_seqs])
    if n:
        assert rel_error(out[:n], want[:n]) <= 1e-5
    assert not np.asarray(out[n:]).any(), "padding tokens must give zeros"
    causal_out, ckc, cvc = ragged_paged_attention(q, k, v, k_cache, v_cache, *meta, sm_scale=0.3)
    for got, exp in ((kc, ckc), (vc, cvc)):  # the same stores as the causal call
        assert np.array_equal(np.asarray(got).view(np.uint8), np.asarray(exp).view(np.uint8))


@given(batch=ragged_batches(max_seqs=4, max_kv=40, page_sizes=(8,), kinds=("decode",)),
       seed=st.integers(0, 2**31 - 1))
@settings(max_examples=6)
def test_non_causal_decode_equals_causal(batch, seed):
    """A decode query sits at its sequence's last position: it sees every key either way."""
    rng = np.random.default_rng(seed)
    t = batch.num_tokens
    q = rng.standard_normal((t, 4, 16)).astype(np.float32)
    k, v = (rng.standard_normal((t, 2, 16)).astype(np.float32) for _ in range(2))
    cache = rng.standard_normal((batch.num_pages, 8, 2, 16)).astype(np.float32)
    meta = (batch.kv_lens, batch.page_indices, batch.cu_q_lens, batch.distribution)
    for a, b in zip(ragged_paged_attention(q, k, v, cache, cache, *meta, causal=False),
                    ragged_paged_attention(q, k, v, cache, cache, *meta), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_non_causal_with_sliding_window_raises(rng):
    batch = make_ragged_batch([3], [3], decode_end=0, prefill_end=1, page_size=8, rng=rng)
    x = rng.standard_normal((batch.num_tokens, 1, 8)).astype(np.float32)
    cache = np.zeros((batch.num_pages, 8, 1, 8), np.float32)
    with pytest.raises(ValueError, match="^sliding_window"):
        ragged_paged_attention(x, x, x, cache, cache, batch.kv_lens, batch.page_indices, batch.cu_q_lens,
                               batch.distribution, sliding_window=4, causal=False)
