"""The engine's traceable attention and MoE agree with reference/ (which needs concrete metadata)."""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import xla_ops
from tests.common import assert_close, nan_poison, ragged_batches

# the modules (reference/__init__ may re-export functions of the same names)
rpa_ref = importlib.import_module("reference.ragged_paged_attention")
moe_ref = importlib.import_module("reference.fused_moe")


@settings(max_examples=6)
@given(batch=ragged_batches(max_seqs=4, max_q=12, max_kv=40, page_sizes=(4, 8)),
       cache_dtype=st.sampled_from(["float32", "int8", "float8_e4m3fn"]),
       window=st.sampled_from([None, 5]), soft_cap=st.sampled_from([None, 20.0]), seed=st.integers(0, 999))
def test_attention_matches_reference(batch, cache_dtype, window, soft_cap, seed):
    rng = np.random.default_rng(seed)
    h, hkv, d = 4, 2, 16
    t = batch.num_tokens
    q = jnp.asarray(rng.standard_normal((t, h, d)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((t, hkv, d)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((t, hkv, d)), jnp.float32)
    shape = (batch.num_pages, batch.page_size, hkv, d)
    scale = None if cache_dtype == "float32" else 0.05
    k_cache = rpa_ref.quantize_store(rng.standard_normal(shape), cache_dtype, scale)
    v_cache = rpa_ref.quantize_store(rng.standard_normal(shape), cache_dtype, scale)
    if cache_dtype == "float32":  # unused pages hold NaN: never read
        k_cache, v_cache = nan_poison(k_cache, batch.unused_pages), nan_poison(v_cache, batch.unused_pages)
    meta = (jnp.asarray(batch.kv_lens), jnp.asarray(batch.page_indices), jnp.asarray(batch.cu_q_lens),
            jnp.asarray(batch.distribution))
    kw = dict(sliding_window=window, soft_cap=soft_cap, k_scale=scale, v_scale=scale)
    want, wk, wv = rpa_ref.ragged_paged_attention(q, k, v, k_cache, v_cache, *meta, **kw)
    got, gk, gv = jax.jit(lambda *a: xla_ops.ragged_paged_attention(*a, **kw))(q, k, v, k_cache, v_cache, *meta)
    n = int(batch.cu_q_lens[batch.num_seqs])
    assert_close(got[:n], want[:n], 2e-5, "attention output")
    assert np.all(np.asarray(got[n:]) == 0)
    for used in sorted(batch.used_pages):  # the written pages are bit-exact
        np.testing.assert_array_equal(np.asarray(gk[used].astype(jnp.float32)), np.asarray(wk[used].astype(jnp.float32)))
        np.testing.assert_array_equal(np.asarray(gv[used].astype(jnp.float32)), np.asarray(wv[used].astype(jnp.float32)))


@pytest.mark.parametrize("renormalize", [True, False])
def test_moe_standin_matches_reference(renormalize):
    rng = np.random.default_rng(3)
    t, dm, e, f = 7, 16, 4, 8
    x = jnp.asarray(rng.standard_normal((t, dm)), jnp.float32)
    logits = jnp.asarray(rng.standard_normal((t, e)), jnp.float32)
    wgu = jnp.asarray(rng.standard_normal((e, dm, 2 * f)), jnp.float32)
    wd = jnp.asarray(rng.standard_normal((e, f, dm)), jnp.float32)
    want = moe_ref.fused_moe(x, logits, wgu, wd, top_k=2, renormalize=renormalize)
    got = xla_ops.fused_moe(x, logits, wgu, wd, top_k=2, renormalize=renormalize)
    assert_close(got, want, 2e-5, "moe")
