"""Device tier for the GPU kernels (needs an NVIDIA Hopper GPU; skipped elsewhere).

Fresh random inputs per test (rng fixture), float64 / float32-HIGHEST references, NaN-poisoned
cache pages for RPA.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.common import rel_error
from tests.gpu import rpa_ref

pytestmark = [
    pytest.mark.device,
    pytest.mark.skipif(jax.devices()[0].platform != "gpu", reason="needs an NVIDIA GPU"),
]


def _bf16(x):
    return np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32))


@pytest.mark.parametrize("q_lens,kv_lens,bs,kw", [
    ([1] * 8, [1, 17, 300, 1000, 16, 129, 777, 64], dict(block_kv=128, num_stages=2, num_splits=1), {}),
    ([1] * 5, [2000, 5, 1500, 700, 33], dict(block_kv=64, num_stages=4, num_splits=4), {}),
    ([1, 1, 7, 40], [90, 300, 7, 260], dict(block_kv=128, num_stages=2, num_splits=2), {}),
    ([1, 3], [500, 333], dict(block_kv=64, num_stages=3, num_splits=2), dict(sliding_window=100, soft_cap=30.0)),
])
def test_rpa_gpu_matches_reference(rng, q_lens, kv_lens, bs, kw):
    from rpa import gpu as rg

    hq, hkv, d, ps = 32, 8, 128, 16
    pps = max(-(-kv // ps) for kv in kv_lens) + 2
    npages = sum(-(-kv // ps) for kv in kv_lens) + 5
    c = rpa_ref.make_case(rng, q_lens=q_lens, kv_lens=kv_lens, num_q_heads=hq, num_kv_heads=hkv, head_dim=d,
                          page_size=ps, num_pages=npages, pages_per_seq=pps, num_tokens=sum(q_lens) + 3)
    for key in ("q", "k", "v", "kv_cache"):
        c[key] = _bf16(c[key])
    ref_out, ref_cache = rpa_ref.reference(**c, **kw)
    a = {k: jnp.asarray(v, jnp.bfloat16 if k in ("q", "k", "v", "kv_cache") else None) for k, v in c.items()}
    out, cache = rg.ragged_paged_attention_gpu(a["q"], a["k"], a["v"], a["kv_cache"], a["kv_lens"],
                                               a["page_indices"], a["cu_q_lens"], a["distribution"],
                                               block_sizes=bs, **kw)
    out = np.asarray(out.astype(jnp.float32))
    assert not np.isnan(out).any()
    assert rel_error(out, ref_out) < 1e-2
    written = ~np.isnan(ref_cache)
    np.testing.assert_array_equal(np.asarray(cache.astype(jnp.float32))[written],
                                  ref_cache[written].astype(np.float32))


@pytest.mark.parametrize("offset", [0, 2])
def test_gmm_gpu_matches_reference(rng, offset):
    import importlib

    from moe import gpu as mg

    gref = importlib.import_module("reference.gmm")

    m, k, n = 640, 256, 512
    sizes = np.asarray([100, 0, 200, 150, 90], np.int32)
    lhs = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    rhs = jnp.asarray(rng.standard_normal((2, k, n)), jnp.bfloat16)
    ref = np.asarray(gref.gmm(lhs.astype(jnp.float32), rhs.astype(jnp.float32), jnp.asarray(sizes),
                              group_offset=offset))
    for bs in (mg.GmmBlockSizes(tile_m=64, tile_n=128, wg_dim="m", num_stages=3),
               mg.GmmBlockSizes(tile_m=128, tile_n=128, num_stages=3)):
        out = mg.gmm_gpu(lhs, rhs, jnp.asarray(sizes), group_offset=offset, block_sizes=bs)
        assert rel_error(np.asarray(out.astype(jnp.float32)), ref) < 1e-2


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("layout", ["kn", "nk"])
def test_qmm_gpu_matches_reference(rng, fmt, layout):
    from quant import gpu as qg
    from quant.tensor import pack_int4

    m, k, n = 16, 2048, 1024
    lim = 127 if fmt == "int8" else 7
    vals = rng.integers(-lim, lim + 1, (k, n)).astype(np.int8)
    scales = (rng.uniform(0.5, 1.5, (1, n)) / lim).astype(np.float32)
    x = _bf16(rng.standard_normal((m, k)))
    ref = x.astype(np.float64) @ (vals.astype(np.float64) * scales)
    w = pack_int4(jnp.asarray(vals)) if fmt == "int4" else jnp.asarray(vals)
    if layout == "kn":
        out = qg.quantized_matmul_decode(jnp.asarray(x, jnp.bfloat16), w, jnp.asarray(scales), fmt=fmt,
                                         block_sizes=dict(tk=64, num_stages=4, consumers=1, k_splits=2, tn=128))
    else:
        out = qg.quantized_matmul_decode_nk(jnp.asarray(x, jnp.bfloat16), qg.prepare_weights_nk(w),
                                            jnp.asarray(scales), fmt=fmt,
                                            block_sizes=dict(tk=128, num_stages=4, consumers=2, k_splits=2, tn=64))
    assert rel_error(np.asarray(out.astype(jnp.float32)), ref) < 1e-2


def test_public_rpa_runs_the_gpu_kernel_on_a_gpu_layout_cache(rng):
    """rpa.ragged_paged_attention on a GPU picks rpa/gpu.py for a GPU-layout cache (rpa.kv_cache_shape's
    default there) and matches implementation="xla" on the same inputs."""
    import rpa

    hq, hkv, d, ps = 32, 8, 128, 16
    q_lens, kv_lens = [1, 1, 1, 6], [300, 17, 1000, 90]
    pps = max(-(-kv // ps) for kv in kv_lens) + 1
    npages = sum(-(-kv // ps) for kv in kv_lens) + 4
    assert rpa.kv_cache_shape(npages, ps, hkv, d, jnp.bfloat16) == (npages, 2, hkv, ps, d)
    c = rpa_ref.make_case(rng, q_lens=q_lens, kv_lens=kv_lens, num_q_heads=hq, num_kv_heads=hkv, head_dim=d,
                          page_size=ps, num_pages=npages, pages_per_seq=pps, num_tokens=sum(q_lens) + 2)
    args = [jnp.asarray(c[n], jnp.bfloat16) for n in ("q", "k", "v", "kv_cache")]
    meta = [jnp.asarray(c[n]) for n in ("kv_lens", "page_indices", "cu_q_lens", "distribution")]
    out, cache = rpa.ragged_paged_attention(*args, *meta, implementation="pallas")
    ref_out, ref_cache = rpa.ragged_paged_attention(*args, *meta, implementation="xla")
    n = sum(q_lens)
    err = float(jnp.max(jnp.abs(out[:n].astype(jnp.float32) - ref_out[:n].astype(jnp.float32))))
    assert err < 2e-2, err
    np.testing.assert_array_equal(np.asarray(cache.astype(jnp.float32)), np.asarray(ref_cache.astype(jnp.float32)))


@pytest.mark.parametrize("fmt", ["int8", "float8_e4m3fn"])
def test_w8a8_gpu_matches_reference(rng, fmt):
    import quant
    from quant import gpu, gpu_w8a8
    from reference.quantized_matmul import quantized_matmul_qt

    m, k, n = 300, 1024, 768
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    qw = quant.quantize(jnp.asarray(rng.standard_normal((k, n)) * 0.05, jnp.float32), fmt)
    ref = np.asarray(quantized_matmul_qt(x, qw, act_quant=fmt, out_dtype=jnp.float32))
    for bs in ({}, dict(tile_m=64, tile_n=128, num_stages=5)):
        out = gpu_w8a8.quantized_matmul_w8a8(x, qw, act_quant=fmt, values_nk=gpu.prepare_weights_nk(qw.values),
                                             block_sizes=bs, out_dtype=jnp.float32)
        assert rel_error(np.asarray(out), ref) < 1e-4


def test_rpa_gpu_prefill_chunk_matches_reference(rng):
    """A 700-token chunk behind a 300-token prefix plus decode tokens: the prefill kernel's blocks."""
    from rpa import gpu as rg

    hq, hkv, d, ps = 32, 8, 128, 16
    q_lens, kv_lens = [1, 700, 1], [500, 1000, 77]
    pps = max(-(-kv // ps) for kv in kv_lens) + 1
    npages = sum(-(-kv // ps) for kv in kv_lens) + 4
    c = rpa_ref.make_case(rng, q_lens=q_lens, kv_lens=kv_lens, num_q_heads=hq, num_kv_heads=hkv, head_dim=d,
                          page_size=ps, num_pages=npages, pages_per_seq=pps, num_tokens=sum(q_lens) + 5)
    for key in ("q", "k", "v", "kv_cache"):
        c[key] = _bf16(c[key])
    ref_out, _ = rpa_ref.reference(**c)
    a = {k: jnp.asarray(v, jnp.bfloat16 if k in ("q", "k", "v", "kv_cache") else None) for k, v in c.items()}
    out, _ = rg.ragged_paged_attention_gpu(a["q"], a["k"], a["v"], a["kv_cache"], a["kv_lens"], a["page_indices"],
                                           a["cu_q_lens"], a["distribution"])
    n = sum(q_lens)
    out = np.asarray(out.astype(jnp.float32))[:n]
    assert not np.isnan(out).any()
    assert rel_error(out, ref_out[:n]) < 1e-2
