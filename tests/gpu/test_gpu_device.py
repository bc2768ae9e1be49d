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
from tests.gpu.test_gpu_interpret import check_rpa, gmm_case, qmm_case, rpa_case, run_rpa, run_w8a8

pytestmark = [
    pytest.mark.device,
    pytest.mark.skipif(jax.devices()[0].platform != "gpu", reason="needs an NVIDIA GPU"),
]


@pytest.mark.parametrize("q_lens,kv_lens,bs,kw", [
    ([1] * 8, [1, 17, 300, 1000, 16, 129, 777, 64], dict(block_kv=128, num_stages=2, num_splits=1), {}),
    ([1] * 5, [2000, 5, 1500, 700, 33], dict(block_kv=64, num_stages=4, num_splits=4), {}),
    ([1, 1, 7, 40], [90, 300, 7, 260], dict(block_kv=128, num_stages=2, num_splits=2), {}),
    ([1, 3], [500, 333], dict(block_kv=64, num_stages=3, num_splits=2), dict(sliding_window=100, soft_cap=30.0)),
])
def test_rpa_gpu_matches_reference(rng, q_lens, kv_lens, bs, kw):
    c = rpa_case(rng, q_lens, kv_lens, hq=32, hkv=8, d=128)
    out, cache = run_rpa(c, interpret=False, block_sizes=bs, **kw)
    check_rpa(c, out, cache, **kw)


@pytest.mark.parametrize("offset", [0, 2])
def test_gmm_gpu_matches_reference(rng, offset):
    from moe import gpu as mg

    sizes = np.asarray([100, 0, 200, 150, 90], np.int32)
    lhs, rhs, ref = gmm_case(rng, sizes, offset, 640, 256, 512, 2)
    for bs in (mg.GmmBlockSizes(tile_m=64, tile_n=128, wg_dim="m", num_stages=3),
               mg.GmmBlockSizes(tile_m=128, tile_n=128, num_stages=3)):
        out = mg.gmm_gpu(lhs, rhs, jnp.asarray(sizes), group_offset=offset, block_sizes=bs)
        assert rel_error(np.asarray(out.astype(jnp.float32)), ref) < 1e-2


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("layout", ["kn", "nk"])
def test_qmm_gpu_matches_reference(rng, fmt, layout):
    from quant import gpu as qg

    x, w, scales, ref = qmm_case(rng, fmt, 16, 2048, 1024)
    if layout == "kn":
        out = qg.quantized_matmul_decode(x, w, scales, fmt=fmt,
                                         block_sizes=dict(tk=64, num_stages=4, consumers=1, k_splits=2, tn=128))
    else:
        out = qg.quantized_matmul_decode_nk(x, qg.prepare_weights_nk(w), scales, fmt=fmt,
                                            block_sizes=dict(tk=128, num_stages=4, consumers=2, k_splits=2, tn=64))
    assert rel_error(np.asarray(out.astype(jnp.float32)), ref) < 1e-2


def test_public_rpa_runs_the_gpu_kernel_on_a_gpu_layout_cache(rng):
    """rpa.ragged_paged_attention on a GPU picks rpa/gpu.py for a GPU-layout cache (rpa.kv_cache_shape's
    default there) and matches implementation="xla" on the same inputs."""
    import rpa

    q_lens = [1, 1, 1, 6]
    c = rpa_case(rng, q_lens, [300, 17, 1000, 90], hq=32, hkv=8, d=128, pad=2)
    npages = c["kv_cache"].shape[0]
    assert rpa.kv_cache_shape(npages, 16, 8, 128, jnp.bfloat16) == (npages, 2, 8, 16, 128)
    args = [jnp.asarray(c[n], jnp.bfloat16) for n in ("q", "k", "v", "kv_cache")]
    meta = [jnp.asarray(c[n]) for n in ("kv_lens", "page_indices", "cu_q_lens", "distribution")]
    out, cache = rpa.ragged_paged_attention(*args, *meta, implementation="pallas")
    ref_out, ref_cache = rpa.ragged_paged_attention(*args, *meta, implementation="xla")
    n = sum(q_lens)
    err = float(jnp.max(jnp.abs(out[:n].astype(jnp.float32) - ref_out[:n].astype(jnp.float32))))
    assert err < 2e-2, err
    np.testing.assert_array_equal(np.asarray(cache.astype(jnp.float32)), np.asarray(ref_cache.astype(jnp.float32)))


@pytest.mark.parametrize("fmt", ["int8", "float8_e4m3fn"])
@pytest.mark.parametrize("bs", [{}, dict(tile_m=64, tile_n=128, num_stages=5)])
def test_w8a8_gpu_matches_reference(rng, fmt, bs):
    out, ref = run_w8a8(rng, fmt, 300, 1024, 768, bs, interpret=False)
    assert rel_error(out, ref) < 1e-4


def test_rpa_gpu_prefill_chunk_matches_reference(rng):
    """A 700-token chunk behind a 300-token prefix plus decode tokens: the prefill kernel's blocks."""
    c = rpa_case(rng, [1, 700, 1], [500, 1000, 77], hq=32, hkv=8, d=128, pad=5)
    out, cache = run_rpa(c, interpret=False)
    check_rpa(c, out, cache)
