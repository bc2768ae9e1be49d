"""The engine's "reference" attention (Ops.attention: reference.ragged_paged_attention traced inside a
jitted step, metadata as traced arrays) agrees with the reference run eagerly."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.ops import AttentionMeta, Ops
from reference.ragged_paged_attention import quantize_store, ragged_paged_attention
from tests.common import assert_close, nan_poison, ragged_batches


@settings(max_examples=6)
@given(batch=ragged_batches(max_seqs=4, max_q=12, max_kv=40, page_sizes=(4, 8)),
       cache_dtype=st.sampled_from(["float32", "int8", "float8_e4m3fn"]), seed=st.integers(0, 999))
def test_attention_matches_reference(batch, cache_dtype, seed):
    rng = np.random.default_rng(seed)
    h, hkv, d = 4, 2, 16
    t = batch.num_tokens
    q = jnp.asarray(rng.standard_normal((t, h, d)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((t, hkv, d)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((t, hkv, d)), jnp.float32)
    shape = (batch.num_pages, batch.page_size, hkv, d)
    scale = None if cache_dtype == "float32" else 0.05
    k_cache = quantize_store(rng.standard_normal(shape), cache_dtype, scale)
    v_cache = quantize_store(rng.standard_normal(shape), cache_dtype, scale)
    if cache_dtype == "float32":  # unused pages hold NaN: never read
        k_cache, v_cache = nan_poison(k_cache, batch.unused_pages), nan_poison(v_cache, batch.unused_pages)
    meta = (jnp.asarray(batch.kv_lens), jnp.asarray(batch.page_indices), jnp.asarray(batch.cu_q_lens),
            jnp.asarray(batch.distribution))
    want, wk, wv = ragged_paged_attention(q, k, v, k_cache, v_cache, *meta, k_scale=scale, v_scale=scale)
    ops = Ops("reference")
    step = jax.jit(lambda q, k, v, cache, *m: ops.attention(q, k, v, cache, AttentionMeta(*m), sm_scale=d ** -0.5,
                                                              k_scale=scale, v_scale=scale))
    got, (gk, gv) = step(q, k, v, (k_cache, v_cache), *meta)
    n = int(batch.cu_q_lens[batch.num_seqs])
    assert_close(got[:n], want[:n], 2e-5, "attention output")
    assert np.all(np.asarray(got[n:]) == 0)
    for used in sorted(batch.used_pages):  # the written pages are bit-exact
        np.testing.assert_array_equal(np.asarray(gk[used].astype(jnp.float32)), np.asarray(wk[used].astype(jnp.float32)))
        np.testing.assert_array_equal(np.asarray(gv[used].astype(jnp.float32)), np.asarray(wv[used].astype(jnp.float32)))
